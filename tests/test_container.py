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

from mbvisor.topologies.netlab import wait_until

pytestmark = [pytest.mark.container, pytest.mark.host]

ROOT = Path(__file__).resolve().parent.parent
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
BUILD_TIMEOUT = 1800
BASE = "localhost/mbvisor-base:bookworm"  # what container-build.sh bootstraps


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
    assert set(result["checks"]) == {"attack_stopped_in_switch", "client_still_served", "middlebox_bypassed"}
    assert "--network" not in RUN  # its switch and namespaces were the container's own


@pytest.mark.parametrize("stopping", [("kill", "--signal", "INT"), ("stop", "--time", "20")],
                         ids=["ctrl-c", "podman-stop"])
def test_ctrl_c_or_podman_stop_ends_the_demo_cleanly(image, stopping):
    """SIGINT (Ctrl-C) or SIGTERM (podman stop) reaches the demo through tini: it removes its
    lab and exits 130, well before podman stop's SIGKILL (which would be 137)."""
    name = f"mbvisor-check-{uuid.uuid4().hex[:8]}"
    kept = [argument for argument in RUN if argument != "--rm"]  # its exit code and log are read after it ends
    subprocess.run([*kept, "-d", "--name", name, "--privileged", image], check=True, capture_output=True)
    try:
        wait_until(lambda: "[demo]" in subprocess.run(["podman", "logs", name], capture_output=True, text=True).stdout,
                   timeout=60, what="the demo started in the container")
        started = time.monotonic()
        subprocess.run(["podman", *stopping, name], check=True, capture_output=True, timeout=60)
        waited = subprocess.run(["podman", "wait", name], capture_output=True, text=True, timeout=60)
        assert time.monotonic() - started < 15, "the signal left the container running"
        assert waited.stdout.strip() == "130", f"exit {waited.stdout.strip()}: not the demo's own interrupted end"
        assert "interrupted; everything the demo created was removed" in subprocess.run(
            ["podman", "logs", name], capture_output=True, text=True).stdout
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


def shim(directory: Path, name: str, body: str) -> None:
    """An executable ``name`` in ``directory`` (put first on PATH) standing in for a tool."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_dockerignore_keeps_out_every_database_and_cache_a_checkout_holds(image, tmp_path):
    """docs/container.md: .dockerignore keeps out caches, token files and SQLite databases
    a lab left behind, wherever they are: a checkout after ``make coverage`` and a lab run
    in a sub-directory (found by a review: the patterns once matched at the top only)."""
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy2(ROOT / ".dockerignore", context / ".dockerignore")
    (context / "Dockerfile").write_text(f"FROM {BASE}\nCOPY . /ctx\n")
    leaks = {
        ".coverage": b"SQLite format 3\0",            # make coverage's database (with the host's paths)
        ".ruff_cache/0.17.6/1": b"cache",             # a linter's cache
        "lab/controller.sqlite-wal": b"\x37\x7f\x06\x82",  # the store runs in WAL mode: its latest state
        "lab/controller.sqlite-shm": b"\0",
        "lab/agent.token": b"s3cret\n",               # *.token only at the top
    }
    for name, data in leaks.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_bytes(data)
    tag = f"localhost/mbvisor-check-ignore-{uuid.uuid4().hex[:8]}:latest"
    try:
        built = subprocess.run(["podman", "build", "-q", "-t", tag, str(context)], capture_output=True, text=True,
                               timeout=300)
        assert built.returncode == 0, built.stderr
        found = subprocess.run([*RUN, "--entrypoint", "find", tag, "/ctx", "-type", "f"], capture_output=True,
                               text=True, timeout=60, check=True).stdout.split()
        inside = sorted(name for name in leaks if f"/ctx/{name}" in found)
        assert inside == [], f"in the image: {inside}"
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def test_the_build_script_says_why_the_base_could_not_be_bootstrapped(tmp_path):
    """An unreachable mirror ends the build saying so, with debootstrap's own last lines
    (it writes its errors to standard output; the script once sent that to /dev/null)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # No base image yet, so the script bootstraps one; nothing else of podman is reached.
    shim(bin_dir, "podman", '[ "$1 $2" = "image exists" ] && exit 1; echo "unexpected podman $*" >&2; exit 99')
    done = subprocess.run([str(ROOT / "topologies/container-build.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                               "MIRROR": "http://127.0.0.1:9/debian", "TAG": "localhost/mbvisor-check-never:latest"})
    assert done.returncode != 0
    after = done.stderr.split("(about 30 s)\n", 1)[1]  # what follows the progress line
    assert "debootstrap failed" in after and "E:" in after, f"the build failed without saying why:\n{done.stderr}"


def test_a_rebuild_without_network_uses_the_wheelhouse_it_already_has(image, tmp_path):
    """The wheelhouse the first build made (the ``image`` fixture) serves a rebuild without
    network: what it has is used offline (it was once resolved against the index again)."""
    wheels = ROOT / ".container" / "wheels"
    assert any(wheels.glob("*.whl"))
    checkout = tmp_path / "checkout"
    (checkout / "topologies").mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    shutil.copy2(ROOT / "topologies/container-build.sh", checkout / "topologies/container-build.sh")
    shutil.copytree(wheels, checkout / ".container" / "wheels")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The base exists and podman's build is cached: only the wheelhouse step is real here.
    shim(bin_dir, "podman", 'case "$1" in image) [ "$2" = inspect ] && echo 1; exit 0;; build) exit 0;; esac; exit 99')
    done = subprocess.run(["unshare", "-n", str(checkout / "topologies/container-build.sh")], cwd=checkout,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(ROOT / ".venv"),
                               "TAG": "localhost/mbvisor-check-never:latest"})
    assert done.returncode == 0, done.stderr[-2000:]
