"""The container image as docs/container.md promises it, built with podman from a
bootstrapped Debian 12 base (topologies/container-build.sh): the demo runs inside without
host networking, Ctrl-C ends it, no secret or database of the checkout gets in, a source
edit rebuilds only the last layers, the fast tests pass in the test image, and the
host's Open vSwitch can be used instead of the container's.  Run by ``make
test-container`` (and CI); the images get unique names and are removed afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.container, pytest.mark.host]

ROOT = Path(__file__).resolve().parent.parent
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
BUILD_TIMEOUT = 1800


def build(context: Path, tag: str, target: str = "runtime") -> str:
    """container-build.sh's output (its progress and podman's build log)."""
    done = subprocess.run([str(context / "topologies/container-build.sh")], cwd=context, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT,
                          env={**os.environ, "TAG": tag, "TARGET": target, "VENV": str(ROOT / ".venv")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def image():
    tag = f"localhost/mbvisor-check-{uuid.uuid4().hex[:8]}:latest"
    try:
        build(ROOT, tag)
        yield tag
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def test_the_demo_runs_in_the_container_without_host_networking(image, tmp_path):
    done = subprocess.run([*RUN, "--privileged", "-v", f"{tmp_path}:/opt/mbvisor/results", image],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "demo.json").read_text())  # the results volume outlives --rm
    assert result["ok"] is True and all(result["checks"].values()), result
    assert "--network" not in RUN  # its switch and namespaces were the container's own


def test_ctrl_c_ends_the_container_and_its_switch(image):
    name = f"mbvisor-check-{uuid.uuid4().hex[:8]}"
    subprocess.run([*RUN, "-d", "--name", name, "--privileged", image], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 60
        while "[demo]" not in subprocess.run(["podman", "logs", name], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "the demo never started"
            time.sleep(0.2)
        started = time.monotonic()
        subprocess.run(["podman", "kill", "--signal", "INT", name], check=True, capture_output=True)
        waited = subprocess.run(["podman", "wait", name], capture_output=True, text=True, timeout=60)
        assert time.monotonic() - started < 30, "Ctrl-C left the container running"
        assert waited.stdout.strip() not in ("", "0"), "the demo was interrupted, not finished"
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)


def test_no_secret_or_database_gets_in_and_a_source_edit_rebuilds_only_the_last_layers(image, tmp_path):
    context = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
    shutil.copytree(ROOT / ".container", context / ".container")  # the wheelhouse the first build made
    (context / "token").write_text("s3cret\n")
    (context / "lab").mkdir()
    (context / "lab/controller.sqlite").write_bytes(b"SQLite format 3\0")
    (context / "controller/edited.py").write_text('"""A source edit."""\n')
    tag = f"localhost/mbvisor-check-{uuid.uuid4().hex[:8]}:latest"
    try:
        log = build(context, tag)
        # Everything up to the dependencies came from the cache: only the sources were copied again.
        assert log.count("Using cache") >= 4, log[-3000:]
        found = subprocess.run([*RUN, "--entrypoint", "sh", tag, "-c",
                                "ls /opt/mbvisor/controller/edited.py; ls /opt/mbvisor/token "
                                "/opt/mbvisor/lab/controller.sqlite /opt/mbvisor/.git 2>&1; command -v git gcc || true"],
                               capture_output=True, text=True, timeout=60).stdout
        assert "/opt/mbvisor/controller/edited.py" in found
        assert found.count("No such file or directory") == 3, found
        assert "/git" not in found and "/gcc" not in found, found
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
    size = int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True,
                              text=True, check=True).stdout)
    assert size < 600e6, f"the runtime image is {size / 1e6:.0f} MB"


def test_the_fast_tests_pass_in_the_test_image(image):
    tag = f"localhost/mbvisor-check-test-{uuid.uuid4().hex[:8]}:latest"
    try:
        build(ROOT, tag, target="test")
        done = subprocess.run([*RUN, tag], capture_output=True, text=True, timeout=900)  # make test-fast
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert " passed" in done.stdout and " failed" not in done.stdout
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def test_the_hosts_open_vswitch_or_the_containers_own_without_a_kernel_module(image):
    # Told to use the host's (its socket mounted): nothing is started, the host's is there.
    shown = subprocess.run([*RUN, "-e", "MBVISOR_OVS=host", "-v", "/var/run/openvswitch:/var/run/openvswitch",
                            image, "ovs-vsctl", "--timeout=10", "get", "Open_vSwitch", ".", "_uuid"],
                           capture_output=True, text=True, timeout=60)
    host = subprocess.run(["ovs-vsctl", "get", "Open_vSwitch", ".", "_uuid"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout == host.stdout, shown.stderr
    missing = subprocess.run([*RUN, "-e", "MBVISOR_OVS=host", image, "true"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "mount the host's /var/run/openvswitch" in missing.stderr
    # Its own, where loading a kernel module fails: the entry point never tries.
    own = subprocess.run([*RUN, "--privileged", "-v", "/bin/false:/usr/sbin/modprobe:ro", "-v", "/bin/false:/sbin/modprobe:ro",
                          image, "ovs-vsctl", "--timeout=10", "add-br", "br-check", "--", "set", "bridge", "br-check",
                          "datapath_type=netdev"], capture_output=True, text=True, timeout=60)
    assert own.returncode == 0, own.stderr
