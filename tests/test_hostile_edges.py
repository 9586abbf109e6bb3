"""The agent and the REST edge against hostile inputs an adversarial review of the shell
found: huge or oddly named region files, counters moved back, VMs that move or leave
mid-request, dripping HTTP clients, floods of bad requests, oversized command objects and
long VM identities.  Each test failed before its fix."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest

from mbvisor.agents.agent import Agent, AgentSettings
from mbvisor.agents.discovery import VmChannel
from mbvisor.controller import rest
from mbvisor.controller.requests import requests_from_body
from mbvisor.guest import region as region_module
from mbvisor.guest import ring
from mbvisor.guest.commands import command_from_dict
from mbvisor.guest.errors import CommandError
from mbvisor.guest.reader import ChannelReader
from mbvisor.guest.region import open_channel_file

from test_agent_shell import (DPID, MAC, FakeController, guest, ok_answers, request, serving, shm,  # noqa: F401
                                    status_of, vm, wait_for)
from test_rest import COMMAND, FakeService, call, running, settings  # noqa: F401

# The largest region any valid geometry can use: 1024 slots of 64 KiB command + 64 KiB response.
MAX_RING = ring.Geometry(ring.MAX_SLOT_COUNT, ring.MAX_SLOT_SIZE, ring.MAX_SLOT_SIZE).region_size


# ---- agent: a big region file -------------------------------------------------------------


def test_reader_image_is_bounded_by_the_largest_ring_not_the_file_size(shm, monkeypatch):
    """The host's private image of a region is no bigger than the largest ring: a 4 GiB
    sparse region (free on tmpfs) must not cost the agent 4 GiB of memory."""
    path = shm()
    with open(path, "wb") as f:
        f.truncate(4 << 30)  # sparse: costs nothing in /dev/shm
    requested = []
    real = bytearray

    def recording(size=0, *args):
        if isinstance(size, int):
            requested.append(size)
            return real(min(size, 1 << 20))
        return real(size, *args)

    monkeypatch.setattr(region_module, "bytearray", recording, raising=False)
    region = open_channel_file("/dev/shm", os.path.basename(path))
    try:
        ChannelReader(region, "big")
    finally:
        region.close()
    assert max(requested) <= MAX_RING, f"the reader allocates {max(requested)} bytes for one channel"


@pytest.mark.parametrize("kind", ["huge sparse region", "undecodable name"])
def test_one_bad_region_does_not_keep_other_vms_unserved(shm, kind):
    """Whatever goes wrong opening one VM's region (a huge file, a name no file system can
    hold) is that channel's problem: the VMs after it in a discovery round are served."""
    if kind == "huge sparse region":
        bad = shm()
        with open(bad, "wb") as f:
            f.truncate(1 << 40)  # 1 TiB apparent size, 0 bytes used
    else:
        bad = "/dev/shm/mbvisor-test-\udc80bad"
    good = shm.region()
    good_writer = guest(good)
    vms = [vm(bad, "bad", port=5), vm(good, "good", port=6, mac="52:34:56:00:12:33")]
    with serving(vms, FakeController()) as agent:
        response = request(good_writer, "I 52:34:56:00:12:33", timeout=3)
        assert response.ok
        wait_for(lambda: status_of(agent, "bad")["problem"], what="the bad channel's problem in the status")


# ---- agent: publish behind consume makes the poller and the worker spin -------------------


def test_publish_behind_consume_is_idle_for_the_poller(shm):
    """A guest that writes publish < consume gives the worker nothing to do, and the poller
    must see exactly those counters as idle: otherwise it wakes the worker on every pass."""
    path = shm.region()
    writer = guest(path)
    header = writer.header()
    ring.write_u64(writer.region.buf, ring.OFFSET_CONSUME, 5)
    ring.write_u32(writer.region.buf, ring.OFFSET_HOST_EPOCH, header.guest_epoch)  # resume at 5
    ring.write_u64(writer.region.buf, ring.OFFSET_PUBLISH, 1)  # behind consume: "nothing to do"
    region = open_channel_file("/dev/shm", os.path.basename(path))
    try:
        reader = ChannelReader(region, "behind")
        assert reader.poll() is None
        assert region_module.read_counters(region.fd) == reader.idle_at()
        ring.write_u64(writer.region.buf, ring.OFFSET_PUBLISH, 6)  # the guest publishes again
        assert region_module.read_counters(region.fd) != reader.idle_at()
    finally:
        region.close()


# ---- agent: departed VM that moved to another bridge on the same port number ------------------


def test_a_vm_moved_to_another_bridge_has_its_old_offloads_removed(shm):
    """A VM moved from bridge A port 5 to bridge B port 5 has its offloads on A removed (the
    same port number on another bridge is another place)."""
    path = shm.region()
    guest(path)
    vms = [vm(path)]
    client = FakeController()
    agent = Agent(lambda: list(vms), client, AgentSettings(discovery_interval=0.01, removal_ceiling=0.02))
    try:
        agent.round()
        vms[0] = VmChannel("tap-vm0", path, 0xB2, 5, (MAC,), "vm0")  # same port number, other bridge
        # Rounds until the departed worker has ended and its removal was sent (bounded).
        wait_for(lambda: (agent.round(), (DPID, MAC) in client.deletes)[1],
                 what="the offloads on the old bridge removed")
    finally:
        agent.stop.set()
        agent.shutdown()


# ---- agent: closing a channel whose worker waits on the controller ---------------------------


def test_a_departing_vm_whose_forward_is_in_flight_does_not_stall_discovery(shm):
    """A departing VM whose worker waits on the controller does not hold discovery up (new
    VMs are served at once), and its removal waits until that worker has ended."""
    path, other = shm.region(), shm.region()
    writer, other_writer = guest(path), guest(other)
    release = threading.Event()

    def hang(requests):
        if requests[0]["channel"].startswith("vm0/"):  # only the departing VM's controller call hangs
            release.wait(20)
        return ok_answers(requests)

    vms = [vm(path)]
    client = FakeController(on_execute=hang)
    try:
        with serving(vms, client) as agent:
            writer.submit(f"@X {MAC}@".encode())
            wait_for(lambda: client.requests, what="the forward in flight")
            vms[:] = [vm(other, "new", port=6, mac="52:34:56:00:12:33")]  # vm0 leaves, another arrives
            # Served while the departed VM's worker is still blocked (joining it cost 5 s).
            response = request(other_writer, "I 52:34:56:00:12:33", timeout=3)
            assert not client.deletes  # the departed VM's worker still forwards: no removal yet
            release.set()
            wait_for(lambda: client.deletes, what="the removal once the worker ended")
            assert response.ok
    finally:
        release.set()


# ---- REST: slowloris ---------------------------------------------------------------------------


def test_slow_header_drip_cannot_hold_every_connection(shm):
    """Clients dripping one header byte now and then (each within the socket time-out) lose
    their slots after the header time-out, so they cannot take the API down."""
    stop = threading.Event()
    dripping = threading.Barrier(5)  # four drippers hold every slot before the GET comes

    def drip(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /v1/health HTTP/1.1\r\n")
            dripping.wait(timeout=10)
            while not stop.is_set():
                s.sendall(b"X")
                stop.wait(0.15)

    with running(FakeService(), rest_max_connections=4, rest_idle_timeout=0.4) as port:
        threads = [threading.Thread(target=drip, args=(port,), daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        dripping.wait(timeout=10)
        try:
            connection = __import__("http.client").client.HTTPConnection("127.0.0.1", port, timeout=3)
            connection.request("GET", "/v1/health")
            assert connection.getresponse().status == 200
        finally:
            stop.set()
            for t in threads:
                t.join(5)


# ---- REST: logging at a bounded rate -----------------------------------------------------------


def test_refused_requests_are_logged_at_a_bounded_rate(caplog):
    """architecture.md: a hostile request is answered and logged at a bounded rate (reads are
    open: anyone could otherwise write one line per request)."""
    api = rest.RestApi(FakeService(), settings())
    with caplog.at_level(logging.INFO, logger="mbvisor.rest"):
        for i in range(500):
            assert call(api, "GET", f"/v1/middleboxes/zz{i}/00:00:00:00:00:01").status_int == 400
    lines = [r for r in caplog.records if r.name == "mbvisor.rest"]
    assert len(lines) < 50, f"{len(lines)} log lines for 500 refused requests in well under a second"


# ---- REST: the command's JSON form has no size bound -------------------------------------------


def test_a_command_object_is_bounded_like_command_text():
    """The JSON form of a command is bounded like its text (4096 characters), so no
    megabyte comes back in an answer or is stored for replay."""
    huge = {"op": "Z" * 1_000_000}
    try:
        requests_from_body({**COMMAND, "command": huge})
    except Exception:
        return  # refused at the edge: fine
    with pytest.raises(CommandError) as raised:
        command_from_dict(huge)
    assert len(str(raised.value)) < 4096, f"a {len(str(raised.value))}-character SYNTAX answer text"


# ---- agent: channel names the controller refuses -------------------------------------------------


def test_a_long_vm_id_does_not_make_every_command_of_the_vm_fail(shm):
    """The channel name (vm-id/interface from OVS, any length) is bounded by the agent, so a
    long vm-id does not make the controller's edge refuse every command of the VM."""
    path = shm.region()
    writer = guest(path)

    def like_the_edge(requests):
        requests_from_body({"commands": requests})  # raises BadRequest as the REST edge would
        return ok_answers(requests)

    def edge(requests):
        from mbvisor.agents.controller_client import ControllerFailed
        from mbvisor.controller.requests import BadRequest
        try:
            return like_the_edge(requests)
        except BadRequest as error:
            raise ControllerFailed(f"controller answered HTTP 400 bad-request: {error}") from None

    long_vm = VmChannel("tap-vm0", path, DPID, 5, (MAC,), "vm-" + "x" * 260)
    with serving([long_vm], FakeController(on_execute=edge)):
        response = request(writer)
    assert response.ok, response.text
