"""Mininet end to end: the ``mbvisor`` topology (topologies/mininet_topo.py) under ``mn``, and
the Mininet lab (topologies/mininet_lab.py) with the real controller, agent and ``mbctl``.

Debian's mininet is a module of the system Python, not of this virtual environment, so
both run as ``/usr/bin/python3`` subprocesses; mbvisor's own processes use this venv's
python.  Every run has its own switch name (``mbs`` + 4 hex digits), so concurrent runs
never meet; whatever a run leaves behind is found by that name (and by the pids the lab
records) and removed here, never with ``mn -c`` (which would clean up the whole machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "topologies" / "mininet_lab.py"
TOPO = REPO / "topologies" / "mininet_topo.py"
SYSTEM_PYTHON = "/usr/bin/python3"
PACKETS = 200


def require_mininet() -> None:
    """Fail (never skip) with what is missing."""
    if os.geteuid() != 0:
        pytest.fail("the Mininet tests need root (Mininet and Open vSwitch)")
    missing = [tool for tool in ("ovs-vsctl", "ovs-ofctl", "ethtool", "mnexec", "telnet") if not shutil.which(tool)]
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import mininet.net"], capture_output=True, text=True) \
        if os.path.exists(SYSTEM_PYTHON) else None
    if probe is None or probe.returncode != 0 or missing:
        pytest.fail("Mininet is missing: `apt-get install -y mininet` (Debian's mininet 2.3.0 for "
                    f"{SYSTEM_PYTHON}; add it to topologies/host-setup.sh). Missing tools: {missing or 'none'}; "
                    f"import: {probe.stderr.strip() if probe else SYSTEM_PYTHON + ' not found'}")


def _recorded(state: Path) -> dict:
    try:
        return json.loads((state / "pids.json").read_text())["pids"]
    except (OSError, ValueError, KeyError):
        return {}


def _same_process(pid: int, cmdline: str) -> bool:
    """Alive, not a zombie, and still the process that was recorded (no reused pid)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") == cmdline
    except OSError:
        return False


def leftovers(switch: str, state: Path | None = None) -> dict[str, list]:
    """This run's bridge, ``<switch>-ethN`` links, regions and recorded processes still there."""
    found: dict[str, list] = {}
    if switch in subprocess.run(["ovs-vsctl", "--timeout=10", "list-br"], capture_output=True,
                                text=True).stdout.split():
        found["bridge"] = [switch]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    if names := re.findall(rf"^\d+: ({re.escape(switch)}(?:-eth\d+)?)[@:]", links, re.M):
        found["links"] = names
    if regions := sorted(p.name for p in Path("/dev/shm").glob(f"mbvisor-mn-{switch}-*")):
        found["regions"] = regions
    if state is not None:
        if alive := [f"{name}={p['pid']}" for name, p in _recorded(state).items()
                     if _same_process(p["pid"], p["cmdline"])]:
            found["processes"] = alive
    return found


def remove_leftovers(switch: str, state: Path | None = None) -> None:
    """Remove exactly what this run created (by its unique name and recorded pids)."""
    if state is not None:
        for name, p in _recorded(state).items():
            if _same_process(p["pid"], p["cmdline"]):
                try:  # agent and controller lead their own sessions; Mininet shells too (mnexec -d)
                    os.killpg(p["pid"], signal.SIGKILL)
                except OSError:
                    pass
    subprocess.run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", switch], capture_output=True)
    for link in leftovers(switch).get("links", []):
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    for region in Path("/dev/shm").glob(f"mbvisor-mn-{switch}-*"):
        region.unlink(missing_ok=True)


def run_until_done(argv: list[str], timeout: float, stdin: str | None = None) -> tuple[int, str]:
    """Run; past the timeout send SIGTERM (the lab cleans up on it), then SIGKILL."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, cwd=REPO)
    try:
        output, _ = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"{argv[1]} took more than {timeout:.0f} s:\n{output[-4000:]}")
    return process.returncode, output


def test_lab_offloads_the_attackers_filter_into_the_switch(tmp_path):
    require_mininet()
    switch, state, result_file = "mbs" + secrets.token_hex(2), tmp_path / "state", tmp_path / "result.json"
    argv = [SYSTEM_PYTHON, str(LAB), "--switch", switch, "--python", sys.executable, "--state-dir", str(state),
            "--result", str(result_file), "--packets", str(PACKETS)]
    try:
        code, output = run_until_done(argv, timeout=90)
    finally:
        left = leftovers(switch, state)
        remove_leftovers(switch, state)
    logs = "".join(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
                   for log in sorted(state.glob("*.log")))
    assert not left, f"the lab left {left} behind:\n{output[-3000:]}"
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line (exit {code}):\n{output[-4000:]}{logs}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["error"] is None, f"{result['error']}\n{output[-4000:]}{logs}"
    assert result["switch"] == switch and result["leftovers"] == {} and result["cleanup_problems"] == []

    offload = result["offload"]
    assert offload["ok"] and len(offload["commands"]) == 8, offload          # 4 hosts, both link ends
    assert all(c["exit"] == 0 and c["tx_checksumming"] == "off" for c in offload["commands"]), offload

    assert [(step["exit"], step["answer"]["status"]) for step in result["mbctl"]] == [(0, "OK"), (0, "OK")]
    assert result["agent_channel"]["forwarded"] == 2 and result["agent_channel"]["problem"] is None

    before, after = result["before"], result["after"]
    assert before["attack"]["reached"] > 0 and before["attack"]["received_by_app"] > 0, before
    assert after["attack"]["reached"] == 0 and after["attack"]["received_by_app"] == 0, after
    assert 0.9 * PACKETS <= after["attack"]["dropped_in_switch"] <= PACKETS, after
    # the client's datagrams still arrive, with good checksums: what reaches mb1-eth0 reaches the
    # receiving socket (the userspace datapath may lose a frame on a busy machine: 90 % is enough)
    for phase in (before, after):
        client = phase["client"]
        assert client["received_by_app"] >= 0.9 * PACKETS and client["dropped_in_switch"] == 0, phase
        assert client["received_by_app"] == client["reached"], phase
    assert code == 0 and result["ok"], output[-3000:]
    assert json.loads(result_file.read_text()) == result


def test_mn_custom_topology_annotates_the_middleboxes_and_cleans_up():
    """The ``mn --custom`` way, through the file's own launcher (mn without its global clean-up):
    the CLI annotates both middleboxes when it starts and removes their regions when it ends."""
    require_mininet()
    switch = "mbs" + secrets.token_hex(2)
    holder = socket.socket()  # bound, never listening: no other run's controller can take the port
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    commands = "mbvisor status\nsh ls /dev/shm\nsh ovs-vsctl get Bridge %s datapath_type\nexit\n" % switch
    argv = [SYSTEM_PYTHON, str(TOPO), "--topo", f"mbvisor,2,switch={switch}",
            "--switch", "ovs,datapath=user,protocols=OpenFlow13",
            "--controller", f"remote,ip=127.0.0.1,port={port}", "--nolistenport"]
    try:
        code, output = run_until_done(argv, timeout=60, stdin=commands)
    finally:
        holder.close()
        left = leftovers(switch)
        remove_leftovers(switch)
    assert code == 0, output[-3000:]
    assert not left, f"mn left {left} behind:\n{output[-3000:]}"
    for index, mac in ((1, "52:34:56:00:12:22"), (2, "52:34:56:00:12:23")):
        host = f"mb{index}"
        region = f"/dev/shm/mbvisor-mn-{switch}-{host}"
        assert re.search(rf'^(?:mininet> )?{host} {switch}-eth{3 + index} \{{attached-mac="{mac}", '
                         rf'mbvisor-channel="{region}", mbvisor-ips="10.0.0.{4 + index}", mbvisor-tenant=mbvisor, '
                         rf'vm-id={switch}-{host}\}}', output, re.M), output[-3000:]
        assert f"mbvisor-mn-{switch}-{host}\n" in output  # the region existed while the CLI ran
    assert "netdev" in output


def test_make_mininet_passes_its_options_to_the_lab():
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "mininet", "MININET_ARGS=--middleboxes 3 --packets 50"],
                         capture_output=True, text=True, timeout=60)
    lab_lines = [line for line in dry.stdout.splitlines() if "mininet_lab.py" in line]
    assert dry.returncode == 0 and len(lab_lines) == 1
    assert lab_lines[0].endswith("--middleboxes 3 --packets 50")
