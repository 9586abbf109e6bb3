"""`mbvisor demo` (what `make demo` runs) tells its story, succeeds and leaves nothing behind."""

import json
import os
import subprocess
import sys


def test_demo_round_trips_every_step_and_cleans_up(tmp_path):
    output = tmp_path / "demo.json"
    done = subprocess.run([sys.executable, "-m", "mbvisor.agents.cli", "demo", "--output", str(output)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(output.read_text())
    assert result["ok"] and len(result["steps"]) == 10
    statuses = [step["status"] for step in result["steps"]]
    assert statuses.count("OK") == 8 and "SYNTAX" in statuses and "not sent" in statuses
    assert "column 22: 'q' is not a filter layer" in done.stdout
    assert "every step as expected" in done.stdout
    assert not os.path.exists(result["region"])
