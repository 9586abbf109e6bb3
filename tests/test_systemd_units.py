"""The shipped systemd units (topologies/*.service), installed as docs/systemd.md says
(ExecStart pointed at this checkout's mbvisor): ``systemd-analyze verify`` accepts them
and ``systemd-analyze security --offline`` rates them "OK" or better, and they keep the
promises docs/systemd.md makes (a token by credential, /run/mbvisor kept, network-online
wanted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = ("mbvisor-controller.service", "mbvisor-agent.service")
SHIPPED_BINARY = "/opt/mbvisor/.venv/bin/mbvisor"
GOOD_LEVELS = ("OK", "SAFE", "PERFECT")  # systemd's names for an exposure below 5.0


@pytest.fixture
def installed(tmp_path):
    """The units with ExecStart at this checkout's mbvisor, as an operator installs them."""
    here = Path(sys.executable).parent / "mbvisor"
    for unit in UNITS:
        text = (REPO / "topologies" / unit).read_text()
        assert SHIPPED_BINARY in text
        (tmp_path / unit).write_text(text.replace(SHIPPED_BINARY, str(here)))
    return tmp_path


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_verifies_the_unit(installed, unit):
    done = subprocess.run(["systemd-analyze", "verify", str(installed / unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_is_rated_ok_or_better(installed, unit):
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(installed / unit)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", done.stdout)
    assert found, done.stdout[-500:] + done.stderr
    assert float(found.group(1)) < 5.0 and found.group(2) in GOOD_LEVELS, found.group(0)


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_keeps_what_the_doc_promises(unit):
    text = (REPO / "topologies" / unit).read_text()
    settings = [line.strip() for line in text.splitlines() if "=" in line and not line.startswith("#")]
    assert "Wants=" in text and "network-online.target" in next(s for s in settings if s.startswith("Wants="))
    assert "LoadCredential=token:/etc/mbvisor/token" in settings
    assert "--token-file %d/token" in text
    assert "CapabilityBoundingSet=" in settings and "NoNewPrivileges=yes" in settings
    if unit == "mbvisor-agent.service":
        assert "RuntimeDirectoryPreserve=yes" in settings  # the launcher's state lives in /run/mbvisor too
    else:
        assert "DynamicUser=yes" in settings and "StateDirectory=mbvisor" in settings
