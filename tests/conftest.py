"""Shared fixtures: channel regions with unique names that are removed even on failure."""

from __future__ import annotations

# eventlet.wsgi is imported before any test module imports http.server: importing it
# afterwards (eventlet.patcher.inject of its green copy) leaves the standard http.server
# bound to eventlet's green socketserver, and the agent tests' thread-based HTTP stubs then
# hang in eventlet's hub.  Seen with eventlet 0.33.2 (the order of collection decided it).
import eventlet.wsgi  # noqa: F401

import multiprocessing
import os
import subprocess
import uuid

import pytest

from mbvisor.guest import ring
from mbvisor.guest.region import open_file
from mbvisor.guest.writer import ChannelWriter


def pytest_collection_modifyitems(config, items):
    """Container builds take minutes: they run when asked for (``-m container``, which
    ``make test-container`` and CI do), and are deselected, not skipped, otherwise."""
    if "container" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("container") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("container")])
        items[:] = kept


@pytest.fixture
def region_path():
    """A unique /dev/shm file (what QEMU's memory backend uses), deleted afterwards."""
    path = f"/dev/shm/mbvisor-test-{uuid.uuid4().hex[:12]}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def make_channel(region_path):
    """Create the region, format it with a geometry, return (writer, path)."""
    opened = []

    def make(geometry: ring.Geometry | None = None, size: int = 1 << 20):
        region = open_file(region_path, create_size=max(size, (geometry or ring.Geometry(4)).region_size))
        opened.append(region)
        writer = ChannelWriter(region)
        writer.initialise(geometry)
        return writer

    yield make
    for region in opened:
        region.close()


# --- namespace lab (topologies/netlab.py) -------------------------------------------------

from mbvisor.topologies import netlab  # noqa: E402  (appended section)


@pytest.fixture
def lab():
    """A :class:`netlab.Lab` (unique prefix) whose bridges, namespaces, veths and processes are
    removed after the test, also when it fails.  Fails (never skips) without root/OVS/tools."""
    netlab.require_host_tools()
    with netlab.Lab() as the_lab:
        yield the_lab


@pytest.fixture
def spawn():
    """Start forked children (``multiprocessing``'s fork context: each opens its own region
    descriptor); whatever is still running at teardown is SIGKILLed and reaped."""
    started: list[multiprocessing.Process] = []

    def start(target, *args) -> multiprocessing.Process:
        process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(timeout=5)


@pytest.fixture
def netns_name():
    """The name of a network namespace of the test's own (with its own, empty, nftables
    ruleset, ipsets and iptables rules), deleted afterwards even if the test fails."""
    name = f"mbf-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


@pytest.fixture(autouse=True)
def no_command_left_carried_out():
    """A command left carried out by a test (a green thread killed in the middle, a helper
    never released) would hold every later test's bulk reading back (pacing.preparing)."""
    from mbvisor.controller import pacing
    yield
    assert not pacing._carrying and not pacing._on_switch and not pacing._preparing, "pacing state left behind"
    assert pacing.CPU_FREE.is_set()
