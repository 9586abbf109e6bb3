"""The host agent's shell (agents/agent.py) with real regions in /dev/shm and real guest
writers, and an injected fake controller (a plain class with ControllerClient's methods):
the failure contract, departed VMs, one owner per reader, hostile regions, paths, rate
limits counting commands, bounded work and logging.  No OVS, no controller process."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mbvisor.agents.agent import (DAMAGED_PER_POLL, FRAME_KEY_SPACE, KEY_SEQ_SPACE, Agent, AgentSettings,
                                  open_channel_region)
from mbvisor.agents.batching import IN_FLIGHT
from mbvisor.agents.controller_client import ControllerClient, ControllerFailed, ControllerUnavailable
from mbvisor.agents.discovery import VmChannel
from mbvisor.guest import answers, ring
from mbvisor.guest.channel_errors import BadRegion, ChannelError, ChannelReset
from mbvisor.guest.region import open_file
from mbvisor.guest.writer import ChannelWriter
from mbvisor.topologies.netlab import wait_until

MAC = "52:34:56:00:12:22"
DPID = 0xA1


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """A stub controller's request handler: JSON answers, no access log."""

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def ok_answers(requests: list[dict]) -> list[dict]:
    return [{"status": "OK", "code": "ok", "text": r["command"], "replayed": False} for r in requests]


class FakeController:
    """ControllerClient's methods, with what happens scripted by the test: ``on_execute``
    and ``on_delete`` return the answer or raise, as the real client does."""

    url = "fake://controller"

    def __init__(self, on_execute=ok_answers, on_delete=lambda dpid, mac: True):
        self.on_execute, self.on_delete = on_execute, on_delete
        self.requests: list[list[dict]] = []
        self.deletes: list[tuple[int, str]] = []

    def execute(self, requests: list[dict]) -> list[dict]:
        self.requests.append(requests)
        return self.on_execute(requests)

    def delete_middlebox(self, dpid: int, mac: str) -> bool:
        self.deletes.append((dpid, mac))
        return self.on_delete(dpid, mac)


def failing(times: int, error: Exception, then=ok_answers):
    """A behaviour that raises ``error`` the first ``times`` calls, then does ``then``."""
    calls = []

    def behave(*args):
        calls.append(args)
        if len(calls) <= times:
            raise error
        return then(*args)
    return behave


@pytest.fixture
def shm():
    """Unique /dev/shm paths (regions, or anything else a test puts there), removed after."""
    made, regions = [], []

    def path() -> str:
        made.append(f"/dev/shm/mbvisor-test-{uuid.uuid4().hex[:12]}")
        return made[-1]

    def region(size: int = 1 << 20) -> str:
        regions.append(open_file(path(), create_size=size))
        return regions[-1].path

    path.region, path.regions = region, regions
    yield path
    for region_ in regions:
        region_.close()
    for name in made:
        if os.path.isdir(name) and not os.path.islink(name):
            os.rmdir(name)
        elif os.path.lexists(name):
            os.unlink(name)


def guest(path: str) -> ChannelWriter:
    """A guest's writer on the region, initialised (a fresh epoch)."""
    writer = ChannelWriter(open_file(path))
    writer.initialise(ring.Geometry(8))
    return writer


def vm(path: str, name: str = "vm0", port: int = 5, mac: str = MAC) -> VmChannel:
    return VmChannel(f"tap-{name}", path, DPID, port, (mac,), name)


@contextlib.contextmanager
def serving(vms: list[VmChannel], client: FakeController, **settings):
    """The agent's real run loop in a thread, over ``vms`` (the test may change the list)."""
    agent = Agent(lambda: list(vms), client, AgentSettings(discovery_interval=0.05, **settings))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive()


def status_of(agent: Agent, name: str = "vm0") -> dict:
    return {c["vm_id"]: c for c in agent.status()["channels"]}[name]


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    """The project's poll with a deadline (``netlab.wait_until``), with the agent's
    longer default: its threads answer on their own schedule."""
    return wait_until(condition, timeout=timeout, what=what)


def request(writer: ChannelWriter, text: str = f"X {MAC}", timeout: float = 5.0) -> ring.Response:
    return writer.request(f"@{text}@".encode(), timeout=timeout)


# ---- 1. failure contract -----------------------------------------------------------------


def test_permanent_controller_failure_is_answered_internal_at_once(shm):
    path = shm.region()
    writer = guest(path)
    client = FakeController(on_execute=failing(1, ControllerFailed("controller answered HTTP 500 internal: boom")))
    with serving([vm(path)], client, forward_deadline=30) as agent:
        started = time.monotonic()
        response = request(writer)
        assert response.status_name == "INTERNAL" and "HTTP 500" in response.text and "not applied" in response.text
        assert time.monotonic() - started < 2  # not the 30 s deadline: a 500 is not retried
        assert len(client.requests) == 1
        assert request(writer).ok  # the channel goes on
        wait_for(lambda: status_of(agent)["failed"] == 1, what="the failure counted")


def test_transient_failure_is_retried_then_answered_unavailable_at_the_deadline(shm):
    path = shm.region()
    writer = guest(path)
    client = FakeController(on_execute=failing(10**6, ControllerUnavailable("controller answered HTTP 503")))
    with serving([vm(path)], client, forward_deadline=0.6) as agent:
        started = time.monotonic()
        response = request(writer, timeout=10)
        elapsed = time.monotonic() - started
        assert response.status_name == "UNAVAILABLE"
        assert "NOT applied" in response.text and "HTTP 503" in response.text
        assert 0.6 <= elapsed < 3 and len(client.requests) >= 3
        assert all(r == client.requests[0] for r in client.requests)  # the same keys each time
        assert agent.status()["lanes"][0]["requests"] == 1  # the retries go alone, in nobody's batch
        wait_for(lambda: status_of(agent)["unavailable"] == 1, what="the UNAVAILABLE answer counted")


def test_transient_failure_that_clears_in_time_is_answered_ok(shm):
    path = shm.region()
    writer = guest(path)
    client = FakeController(on_execute=failing(3, ControllerUnavailable("connection refused")))
    with serving([vm(path)], client, forward_deadline=20) as agent:
        response = request(writer)
        assert response.ok and response.text == f"OK ok X {MAC}"
        assert len(client.requests) == 4
        wait_for(lambda: status_of(agent)["retries"] == 3 and not status_of(agent)["waiting_for_controller"])


def test_a_reinitialised_guest_abandons_the_forward(shm):
    path = shm.region()
    writer, other = guest(path), ChannelWriter(open_file(path))
    old_epoch = writer.header().guest_epoch
    reinitialised = threading.Event()

    def unavailable_until_reinitialised(requests):
        if requests[0]["epoch"] == old_epoch:
            if not reinitialised.is_set():
                other.initialise(ring.Geometry(8))  # the guest reboots while the agent waits
                reinitialised.set()
            raise ControllerUnavailable("switch not connected")
        return ok_answers(requests)

    client = FakeController(on_execute=unavailable_until_reinitialised)
    with serving([vm(path)], client, forward_deadline=30) as agent:
        ticket = writer.submit(f"@X {MAC}@".encode())
        with pytest.raises(ChannelReset):
            writer.wait(ticket, timeout=5)
        header = writer.header()
        assert header.guest_epoch != old_epoch
        assert ring.decode_response(writer.region.buf, header.geometry, 0, old_epoch) is None
        assert request(writer).ok  # the new epoch's first command, seq 0 again
        assert sum(r[0]["epoch"] == old_epoch for r in client.requests) == 1  # not retried after the reboot
        wait_for(lambda: status_of(agent)["abandoned"] == 1, what="the abandoned forward counted")


@pytest.mark.parametrize("counter", [2**62 + 5, 2**64 - 2])
def test_huge_guest_counters_give_bounded_keys_and_never_wedge(shm, counter):
    path = shm.region()
    writer = guest(path)
    header = writer.header()
    for offset in (ring.OFFSET_PUBLISH, ring.OFFSET_CONSUME):
        ring.write_u64(writer.region.buf, offset, counter)
    ring.write_u32(writer.region.buf, ring.OFFSET_HOST_EPOCH, header.guest_epoch)  # "the host was here"

    def like_the_controller(requests):
        if any(not 0 <= r["seq"] < 2**53 for r in requests):
            raise ControllerFailed("controller answered HTTP 400 bad-seq: seq out of range")
        return ok_answers(requests)

    client = FakeController(on_execute=like_the_controller)
    with serving([vm(path)], client):
        response = request(writer, f"X {MAC}@@I {MAC}")
        assert response.ok, response.text
    assert [r["seq"] for r in client.requests[0]] == [(counter % KEY_SEQ_SPACE) * FRAME_KEY_SPACE + k for k in (0, 1)]


def test_keys_stay_below_2_to_the_53_for_every_sequence_number():
    for seq in (0, 1, KEY_SEQ_SPACE - 1, KEY_SEQ_SPACE, 2**62, 2**64 - 1):
        assert 0 <= (seq % KEY_SEQ_SPACE) * FRAME_KEY_SPACE + FRAME_KEY_SPACE - 1 < 2**53


# ---- 2. departed VMs -----------------------------------------------------------------------


def removal_after_worker(agent: Agent) -> None:
    """The departed VMs' workers end (a removal waits for its worker), then one try."""
    for removal in agent.removals.values():
        if removal.worker is not None:
            removal.worker.join(timeout=5)
    agent.retry_removals()


def test_departed_vms_offloads_are_removed_once_the_controller_answers(shm, caplog):
    path = shm.region()
    vms = [vm(path)]
    client = FakeController(on_delete=failing(3, ControllerUnavailable("connection refused"),
                                              then=lambda dpid, mac: True))
    agent = Agent(lambda: list(vms), client, AgentSettings(discovery_interval=0.01, removal_ceiling=0.02))
    caplog.set_level(logging.INFO, "mbvisor")
    try:
        agent.round()
        vms.clear()  # the VM leaves while the controller is down
        agent.round()
        removal_after_worker(agent)
        assert agent.status()["pending_removals"] == [
            {"vm_id": "vm0", "dpid": f"{DPID:016x}", "mac": MAC, "attempts": 1}]
        wait_for(lambda: agent.round() or not agent.removals, what="the removal to succeed")
    finally:
        agent.shutdown()
    assert client.deletes == [(DPID, MAC)] * 4
    assert any("removed after 4 attempts" in r.getMessage() for r in caplog.records)


def test_a_removal_ends_on_404_and_is_cancelled_when_the_vm_comes_back(shm):
    path = shm.region()
    vms = [vm(path)]
    client = FakeController(on_delete=failing(1, ControllerUnavailable("down"), then=lambda dpid, mac: False))
    agent = Agent(lambda: list(vms), client, AgentSettings(discovery_interval=0.01, removal_ceiling=0.02))
    try:
        agent.round()
        vms.clear()
        agent.round()
        wait_for(lambda: agent.round() or not agent.removals, what="a 404 to end the removal")
        assert len(client.deletes) == 2
        vms.append(vm(path))
        agent.round()
        client.on_delete = failing(10**6, ControllerUnavailable("down"))
        vms.clear()
        agent.round()
        vms.append(vm(path))  # back on the same port with the same MAC: the same VM
        agent.round()
        assert agent.removals == {}
    finally:
        agent.shutdown()


# ---- 3. one owner per reader ---------------------------------------------------------------


def test_hostile_reinitialisations_while_status_is_read_never_break_the_channel(shm, caplog):
    path = shm.region()
    writer, saboteur = guest(path), ChannelWriter(open_file(path))
    chaos, hostile = random.Random(10), threading.Event()
    hostile.set()

    def reinitialise_between_taking_and_answering(requests):
        if hostile.is_set() and chaos.random() < 0.5:
            saboteur.initialise(ring.Geometry(chaos.choice([4, 8, 16])))
        for _ in range(chaos.randrange(20)):  # a random interleaving with the worker and the status reader
            time.sleep(0)
        return ok_answers(requests)

    client = FakeController(on_execute=reinitialise_between_taking_and_answering)
    stop, statuses = threading.Event(), []

    def read_status(agent):
        while not stop.is_set():
            statuses.append(agent.status())
            time.sleep(0)  # let the worker have the interpreter too

    with serving([vm(path)], client) as agent:
        reader_thread = threading.Thread(target=read_status, args=(agent,))
        reader_thread.start()
        try:
            deadline = time.monotonic() + 60  # a backstop: the loop ends on the count
            while len(client.requests) < 60 and time.monotonic() < deadline:
                with contextlib.suppress(ChannelError):  # reset under it, or not answered in time
                    request(writer, timeout=1)
        finally:
            stop.set()
            hostile.clear()
            reader_thread.join()
        assert request(ChannelWriter(open_file(path)), timeout=5).ok  # still served
        assert status_of(agent)["faults"] == 0
    assert len(statuses) > 100 and len(client.requests) >= 60
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class Untouchable:
    """Stands in for a reader that only its worker may touch."""

    def __getattr__(self, name):
        raise AssertionError(f"reader.{name} used outside the channel's worker")


def test_the_status_and_the_poller_never_call_into_a_reader(shm):
    path = shm.region()
    guest(path)
    with serving([vm(path)], FakeController()) as agent:
        channel = wait_for(lambda: agent.channels.get("vm0/tap-vm0"))
        wait_for(lambda: channel.snapshot, what="a first snapshot")
        reader, channel.reader = channel.reader, Untouchable()  # the guest is idle: the worker sleeps
        try:
            agent.status()
            agent.write_status()
            assert agent.poll_once() is False
        finally:
            channel.reader = reader


# ---- 4. hostile regions --------------------------------------------------------------------


def test_a_truncated_region_is_a_problem_of_its_channel_only(shm):
    bad, good = shm.region(), shm.region()
    bad_writer, good_writer = guest(bad), guest(good)
    with serving([vm(bad, "bad", port=5), vm(good, "good", port=6, mac="52:34:56:00:12:33")],
                 FakeController()) as agent:
        assert request(bad_writer).ok
        os.truncate(bad, 0)  # what anything with write access to the file can do
        wait_for(lambda: "shrank" in (status_of(agent, "bad")["problem"] or ""), what="the truncation noticed")
        assert request(good_writer, "I 52:34:56:00:12:33").ok
        os.truncate(bad, 1 << 20)
        fresh = ChannelWriter(open_file(bad))
        fresh.initialise(ring.Geometry(8))
        assert request(fresh).ok  # the same file, usable again, is served again
        assert status_of(agent, "bad")["faults"] == 0


def test_an_exception_in_the_agent_costs_one_command_not_the_channel(shm):
    path = shm.region()
    writer = guest(path)
    client = FakeController(on_execute=failing(1, RuntimeError("a bug")))
    with serving([vm(path)], client) as agent:
        response = request(writer)
        assert response.status_name == "INTERNAL" and "a bug" in response.text
        assert request(writer).ok
        assert status_of(agent)["faults"] == 1


# ---- 5. paths ------------------------------------------------------------------------------


def bad_paths(shm, tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (region path, what the status must say)."""
    target = shm.region()
    link, loop, directory, fifo = shm(), shm(), shm(), shm()
    os.symlink(target, link)
    os.symlink(loop, loop)
    os.mkdir(directory)
    os.mkfifo(fifo)
    outside = tmp_path / "region"
    outside.write_bytes(bytes(1 << 20))
    small = shm()
    with open(small, "wb") as file:
        file.write(bytes(4096))
    return {"link": (link, "symlink"), "loop": (loop, "symlink"), "dir": (directory, "directory"),
            "fifo": (fifo, "not a regular file"), "long": ("/dev/shm/" + "x" * 300, "not a file name"),
            "outside": (str(outside), "not in a channel directory"), "dotdot": ("/dev/shm/../tmp/x", "not in"),
            "relative": ("region", "not in"), "missing": (shm(), "does not exist"),
            "small": (small, "needs at least")}


def test_bad_paths_affect_their_channel_alone_and_are_reported(shm, tmp_path):
    good = shm.region()
    writer = guest(good)
    bad = bad_paths(shm, tmp_path)
    vms = [vm(good)] + [vm(path, name, port=10 + i) for i, (name, (path, _)) in enumerate(bad.items())]
    with serving(vms, FakeController()) as agent:  # run() starts with a round: must not raise
        assert request(writer).ok
        for name, (_, reason) in bad.items():
            assert reason in (status_of(agent, name)["problem"] or ""), name
        assert sorted(agent.channels[v.name].reader is not None for v in vms) == [False] * len(bad) + [True]


def test_a_symlinked_region_is_never_written(shm):
    target = shm.region()
    link = shm()
    os.symlink(target, link)
    guest(target)
    before = open(target, "rb").read(ring.HEADER_SIZE)
    with pytest.raises(BadRegion, match="symlink"):
        open_channel_region(link, ("/dev/shm",))
    with pytest.raises(ChannelError, match="not in a channel directory"):
        open_channel_region(target, ("/run/mbvisor",))
    assert open(target, "rb").read(ring.HEADER_SIZE) == before


def test_discovery_survives_any_exception_and_goes_on(shm, caplog):
    path = shm.region()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("ovsdb said something odd")
        return [vm(path)]

    agent = Agent(flaky, FakeController(), AgentSettings())
    try:
        agent.round()
        assert "refresh failed" in caplog.text and agent.channels == {}
        agent.round()
        assert list(agent.channels) == ["vm0/tap-vm0"]
    finally:
        agent.shutdown()


def test_a_region_replaced_under_its_path_is_reopened(shm):
    path = shm.region()
    writer = guest(path)
    with serving([vm(path)], FakeController()) as agent:
        assert request(writer).ok
        replacement = shm.region()
        fresh = guest(replacement)
        os.rename(replacement, path)  # the VM restarted with a new region file
        assert request(fresh, timeout=5).ok
        assert agent.channels["vm0/tap-vm0"].identity == (os.stat(path).st_dev, os.stat(path).st_ino)


# ---- 6. the rate limit counts commands -----------------------------------------------------


def test_rate_limit_counts_commands_not_frames(shm):
    path = shm.region()
    writer = guest(path)
    client = FakeController()
    with serving([vm(path)], client, rate=0.001, burst=5) as agent:
        big = request(writer, "@".join([f"I {MAC}@"] * 99 + [f"I {MAC}"]))
        assert big.status_name == "RATE_LIMITED" and "frame of 100 commands is more than this VM's burst of 5" \
            in big.text
        assert [(a.status, a.code) for a in answers.parse(big.text)] == [("RATE_LIMITED", "rate-limited")] * 100
        assert request(writer, f"X {MAC}@@I {MAC}@@I {MAC}").ok  # 3 of 5 tokens
        limited = request(writer, f"X {MAC}@@I {MAC}@@I {MAC}")  # 3 more: only 2 left
        assert limited.status_name == "RATE_LIMITED" and "frame of 3 command(s)" in limited.text
        assert sum(len(r) for r in client.requests) == 3
        wait_for(lambda: status_of(agent)["rate_limited"] == 103)


def test_a_vm_annotated_with_its_own_rate_limit_gets_it_and_the_others_keep_the_agents(shm):
    """``mbvisor-rate``/``mbvisor-burst``: a VM following a long list gets a burst that
    holds it; another VM keeps the agent's small one.  Changing the annotation changes the
    limit of the running channel, without closing it (its offloads stay)."""
    big, small = shm.region(), shm.region()
    big_writer, small_writer = guest(big), guest(small)
    vms = [dataclasses.replace(vm(big, "big"), burst=50.0), vm(small, "small", port=6, mac="52:34:56:00:12:33")]
    frame = "@".join([f"I {MAC}@"] * 29 + [f"I {MAC}"])
    with serving(vms, FakeController(), rate=0.001, burst=5) as agent:
        assert request(big_writer, frame).ok  # 30 of its 50
        limited = request(small_writer, frame.replace(MAC, "52:34:56:00:12:33"))
        assert limited.status_name == "RATE_LIMITED" and "burst of 5" in limited.text
        opened = agent.channels["big/tap-big"]
        vms[0] = dataclasses.replace(vms[0], burst=10.0)
        wait_for(lambda: agent.channels["big/tap-big"].bucket.burst == 10.0, what="the new limit")
        assert agent.channels["big/tap-big"] is opened and opened.reader is not None  # not reopened
        again = request(big_writer, frame)
        assert again.status_name == "RATE_LIMITED" and "burst of 10" in again.text


# ---- 7. bounded work and logging -----------------------------------------------------------


def test_phantom_slots_cost_bounded_work_and_log_lines(shm, caplog):
    hostile, good = shm.region(), shm.region()
    hostile_writer, good_writer = guest(hostile), guest(good)
    ring.write_u64(hostile_writer.region.buf, ring.OFFSET_PUBLISH, 2**31)  # publish = consume + 2^31
    caplog.set_level(logging.INFO)
    with serving([vm(hostile, "hostile"), vm(good, "good", port=6, mac="52:34:56:00:12:33")],
                 FakeController()) as agent:
        started = time.monotonic()
        wait_for(lambda: {c["vm_id"]: c for c in agent.status()["channels"]}.get("hostile", {}).get("corrupt"),
                 what="the hostile channel being worked on")
        for _ in range(5):
            assert request(good_writer, "I 52:34:56:00:12:33", timeout=2).ok
        corrupt = wait_for(lambda: status_of(agent, "hostile")["corrupt"])
        elapsed = time.monotonic() - started
    assert corrupt <= DAMAGED_PER_POLL * (elapsed / 0.05 + 2)
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1  # the first; the rest are counted (status) and summed up every 10 s
    assert len(caplog.records) < 20


# ---- 8. one request for the frames of many channels ----------------------------------------

# The first IN_FLIGHT channels' frames are held at the controller; the last two wait meanwhile.
MACS = tuple(f"52:34:56:00:12:{0x22 + k:02x}" for k in range(IN_FLIGHT + 2))
REFUSED_MAC, OTHER_MAC = MACS[-2:]


class HeldController(FakeController):
    """Requests wait until the test opens ``gate``, so the test knows which frames wait
    meanwhile; ``answer`` answers (or raises for) every request."""

    def __init__(self, answer):
        self.gate = threading.Event()

        def held(requests):
            self.gate.wait()
            return answer(requests)
        super().__init__(on_execute=held)


def channels(shm) -> tuple[list[ChannelWriter], list[VmChannel]]:
    paths = [shm.region() for _ in MACS]
    return [guest(p) for p in paths], [vm(p, f"vm{i}", 5 + i, mac) for i, (p, mac) in enumerate(zip(paths, MACS))]


def held_then_waiting(agent: Agent, client: HeldController, writers: list[ChannelWriter]) -> list:
    """The first channels' frames held at the controller, then the last two's waiting for
    them; the tickets, in the channels' order."""
    tickets = []
    for writer, mac in zip(writers, MACS):
        tickets.append(writer.submit(f"@X {mac}@".encode()))
        if len(tickets) <= IN_FLIGHT:
            wait_for(lambda: len(client.requests) == len(tickets), what="the frame in flight")
    wait_for(lambda: agent.lanes[DPID].waiting == 2, what="two frames waiting")
    client.gate.set()
    return tickets


def test_every_command_of_a_frame_gets_its_answer_and_a_frame_whose_answers_cannot_fit_is_refused(shm):
    """One record per command, never cut silently: 100 long refusals from the controller all
    arrive (status and code each; messages while they fit); a frame of more commands than
    the answer slot can hold records for is refused before anything is forwarded."""
    path = shm.region()
    writer = guest(path)
    long_refusal = lambda requests: [{"status": "REJECTED", "code": "not-registered", "replayed": False,
                                      "text": f"{r['command']} is refused because " + "x" * 200} for r in requests]
    client = FakeController(on_execute=long_refusal)
    with serving([vm(path)], client, burst=1000, rate=1000):
        response = request(writer, "@".join([f"X {MAC}@"] * 99 + [f"X {MAC}"]))
        records = answers.parse(response.text)
        assert response.status_name == "REJECTED" and not response.truncated
        assert [(r.status, r.code) for r in records] == [("REJECTED", "not-registered")] * 100
        assert records[0].message.startswith(f"X {MAC} is refused because xxx")
        too_many = request(writer, "@".join([f"X {MAC}@"] * 149 + [f"X {MAC}"]))
        assert too_many.status_name == "REFUSED" and answers.parse(too_many.text)[0].code == "too-many-commands"
        assert "a frame of 150 commands" in too_many.text and "nothing was applied" in too_many.text
        assert sum(len(r) for r in client.requests) == 100


def test_frames_of_several_channels_share_one_request_and_each_gets_its_own_answer(shm):
    writers, vms = channels(shm)

    def answer(requests):  # one channel's command is refused by the controller, the others applied
        return [{"status": "REJECTED", "code": "not-registered", "text": f"refused {r['command']}", "replayed": False}
                if REFUSED_MAC in r["command"] else ok_answers([r])[0] for r in requests]

    client = HeldController(answer)
    with serving(vms, client) as agent:
        tickets = held_then_waiting(agent, client, writers)
        responses = [writer.wait(ticket) for writer, ticket in zip(writers, tickets)]
    assert [(r.status_name, r.text) for r in responses] == [
        ("REJECTED", f"REJECTED not-registered refused X {mac}") if mac == REFUSED_MAC else ("OK", f"OK ok X {mac}")
        for mac in MACS]
    assert [len(request) for request in client.requests] == [1] * IN_FLIGHT + [2]
    for request in client.requests[-1]:  # each command with its own channel's place and key (the VM and its MAC)
        own = vms[MACS.index(request["command"].split()[1])]
        assert (request["channel"], request["port"], request["seq"]) == (own.key, own.port, 0)
        assert request["epoch"] == writers[vms.index(own)].header().guest_epoch


@pytest.mark.parametrize("failure, status", [
    (ControllerFailed("controller answered HTTP 400 bad-request: commands[1].command: too long"), "INTERNAL"),
    (ControllerUnavailable("switch 00000000000000a1 is not connected"), "UNAVAILABLE"),
])
def test_a_batch_failing_as_a_whole_is_asked_again_frame_by_frame_and_fails_only_its_cause(shm, tmp_path, capsys,
                                                                                          failure, status):
    """The controller refuses (or answers UNAVAILABLE to) every request holding one
    channel's command: the other, batched with it, is answered at once from a request of
    its own."""
    from mbvisor.agents.cli import main

    writers, vms = channels(shm)
    other = vms[MACS.index(OTHER_MAC)].vm_id

    def answer(requests):
        if any(REFUSED_MAC in r["command"] for r in requests):
            raise failure
        return ok_answers(requests)

    client = HeldController(answer)
    with serving(vms, client, forward_deadline=0.5) as agent:
        tickets = held_then_waiting(agent, client, writers)
        responses = dict(zip(MACS, (writer.wait(ticket) for writer, ticket in zip(writers, tickets))))
        refused = responses.pop(REFUSED_MAC)
        assert refused.status_name == status and str(failure) in refused.text
        assert [(r.status_name, r.text) for r in responses.values()] == [("OK", f"OK ok X {mac}") for mac in responses]
        wait_for(lambda: status_of(agent, other)["answered"] == 1, what="the other channel's status after its answer")
        assert status_of(agent, other)["retries"] == 0  # asked again at once, not after a back-off
        frames = len(MACS)
        assert agent.status()["lanes"] == [{"dpid": f"{DPID:016x}", "requests": frames - 1, "frames": frames,
                                            "commands": frames, "split": 1, "waiting": 0}]
        (tmp_path / "status.json").write_text(json.dumps(agent.status()))
    assert main(["agent-status", "--status-file", str(tmp_path / "status.json")]) == 0
    assert (f"commands for {DPID:016x}: {frames} in {frames} frame(s) in {frames - 1} request(s); 1 batch(es) "
            "failed as a whole and were asked again frame by frame") in capsys.readouterr().out
    assert [len(request) for request in client.requests[:IN_FLIGHT + 1]] == [1] * IN_FLIGHT + [2]
    later = [request[0]["command"] for request in client.requests[IN_FLIGHT + 1:] if len(request) == 1]
    assert len(later) == len(client.requests) - IN_FLIGHT - 1  # every try after the batch alone
    assert later.count(f"X {OTHER_MAC}") == 1 and set(later) == {f"X {REFUSED_MAC}", f"X {OTHER_MAC}"}


# ---- the real client's side of the contract, against a real HTTP server --------------------


class StubController:
    """A real HTTP server answering every request with the (status, body) given: what the
    controller of docs/rest.md answers, or fails with."""

    def __init__(self):
        self.reply: tuple[int, object] = (200, None)  # None: every command OK
        stub = self

        class Handler(JsonHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                commands = json.loads(self.rfile.read(length))["commands"]
                status, body = stub.reply
                self._send(status, {"answers": ok_answers(commands)} if body is None else body)

            def do_DELETE(self):
                self._send(*stub.reply)


        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubController()
    yield server
    server.close()


COMMAND = [{"dpid": "00000000000000a1", "port": 5, "command": f"X {MAC}", "channel": "vm0/tap0", "epoch": 1,
            "seq": 0}]


def error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


@pytest.mark.parametrize("status, body, raised, guest_status, words", [
    (400, error("bad-seq", "seq must be below 2^63"), ControllerFailed, "INTERNAL", "bad-seq"),
    (401, error("unauthorized", "bad token"), ControllerFailed, "INTERNAL", "token"),
    (409, error("key-reused", "the key names another command"), ControllerFailed, "REJECTED", "key-reused"),
    (500, error("internal", "boom"), ControllerFailed, "INTERNAL", "HTTP 500"),
    (200, {"answers": []}, ControllerFailed, "INTERNAL", "understands"),
    (503, error("starting", "not ready"), ControllerUnavailable, None, "503"),
    (200, {"answers": [{"status": "UNAVAILABLE", "code": "", "text": "switch not connected", "replayed": False}]},
     ControllerUnavailable, None, "switch not connected"),
])
def test_client_tells_permanent_from_transient_failures(stub, status, body, raised, guest_status, words):
    stub.reply = (status, body)
    with pytest.raises(raised, match=words) as caught:
        ControllerClient(stub.url, "token", timeout=5).execute(COMMAND)
    if guest_status:
        assert caught.value.status.name == guest_status


def test_client_no_connection_is_transient_and_removal_treats_404_as_done(stub):
    stub.reply = (404, error("not-found", "no such middlebox"))
    assert ControllerClient(stub.url).delete_middlebox(DPID, MAC) is False
    stub.reply = (200, {})
    assert ControllerClient(stub.url).delete_middlebox(DPID, MAC) is True
    stub.close()
    with pytest.raises(ControllerUnavailable, match="unreachable"):
        ControllerClient(stub.url, timeout=2).execute(COMMAND)


def test_a_500_from_the_real_client_is_answered_at_once_not_retried_forever(shm, stub):
    path = shm.region()
    writer = guest(path)
    stub.reply = (500, error("internal", "integer overflow"))
    agent = Agent(lambda: [vm(path)], ControllerClient(stub.url, timeout=5), AgentSettings(forward_deadline=30))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        response = request(writer, timeout=5)
        assert response.status_name == "INTERNAL" and "integer overflow" in response.text
    finally:
        agent.stop.set()
        thread.join(timeout=15)


def test_truncating_one_region_under_a_real_agent_process_leaves_the_others_served(shm, stub, tmp_path):
    bad, good = shm.region(), shm.region()
    bad_writer, good_writer = guest(bad), guest(good)
    static = tmp_path / "channels.json"
    static.write_text(json.dumps([
        {"interface": "tap-bad", "region": bad, "dpid": DPID, "port": 5, "macs": [MAC], "vm_id": "bad"},
        {"interface": "tap-good", "region": good, "dpid": DPID, "port": 6, "macs": [MAC], "vm_id": "good"}]))
    status_file = tmp_path / "status.json"
    with open(tmp_path / "agent.log", "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "mbvisor.agents.cli", "agent", "--static", str(static),
                                    "--controller", stub.url, "--status-file", str(status_file),
                                    "--discovery-interval", "0.2"], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        assert request(bad_writer, timeout=10).ok and request(good_writer).ok
        os.truncate(bad, 0)  # what the VM's QEMU process (or anything with write access) can do

        def bad_problem():
            channels = {c["vm_id"]: c for c in json.loads(status_file.read_text())["channels"]}
            return channels["bad"]["problem"] or ""
        assert "shrank" in wait_for(bad_problem, what="the truncated region reported")
        for _ in range(5):  # the agent touched the truncated region and still serves the others
            assert request(good_writer).ok
        assert process.poll() is None, (tmp_path / "agent.log").read_text()
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0


def test_agent_status_shows_unserved_channels_and_pending_removals(shm, tmp_path, capsys):
    from mbvisor.agents.cli import main

    path = shm.region()
    vms = [vm(path), vm(shm(), "missing", port=7)]
    status_file = tmp_path / "status.json"
    client = FakeController(on_delete=failing(10**6, ControllerUnavailable("down")))
    agent = Agent(lambda: list(vms), client, AgentSettings(status_file=status_file))
    try:
        agent.round()
        vms.pop(0)
        agent.round()
        removal_after_worker(agent)
        agent.write_status()
    finally:
        agent.shutdown()
    assert main(["agent-status", "--status-file", str(status_file)]) == 0
    out = capsys.readouterr().out
    assert "does not exist" in out
    assert f"offloads of departed VM vm0 ({MAC} on {DPID:016x}) not removed yet; 1 attempt(s) so far" in out


def test_status_file_is_written_when_it_changes_and_while_the_agent_lives(shm, tmp_path, monkeypatch):
    from mbvisor.agents import agent as agent_module

    path = shm.region()
    status_file = tmp_path / "status.json"
    agent = Agent(lambda: [vm(path)], FakeController(), AgentSettings(status_file=status_file))
    try:
        agent.round()
        first = os.stat(status_file).st_ino  # each write replaces the file
        agent.write_status()
        assert os.stat(status_file).st_ino == first  # nothing changed: not written again
        writer = guest(path)
        ticket = writer.submit(f"@X {MAC}@".encode())
        agent.poll_once()  # what the run loop does: the worker takes it
        assert writer.wait(ticket, timeout=5).ok  # served: the counters move
        wait_for(lambda: status_of(agent)["answered"] == 1, what="the worker's snapshot")
        agent.write_status()
        changed = os.stat(status_file).st_ino
        assert changed != first and json.loads(status_file.read_text())["channels"][0]["answered"] == 1
        monkeypatch.setattr(agent_module, "STATUS_REFRESH", 0.0)  # the refresh is due
        agent.write_status()
        assert os.stat(status_file).st_ino != changed
        writer.region.close()
    finally:
        agent.shutdown()


class KeptConnections(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 controller stub that answers every command OK, counts the connections
    it accepted, and can close each connection after ``close_after`` answers (as a server
    ending idle connections does) or reset every connection before it answers."""

    daemon_threads = True

    def __init__(self):
        self.connections = 0
        self.close_after: int | None = None
        self.reset_all = False
        stub = self

        class Handler(JsonHandler):
            protocol_version = "HTTP/1.1"
            answered = 0

            def setup(self):
                super().setup()
                stub.connections += 1

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if stub.reset_all:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                self._send(200, {"answers": ok_answers(body["commands"])})
                self.answered += 1
                if stub.close_after is not None and self.answered >= stub.close_after:
                    self.close_connection = True  # closed without a word, as an idle time-out does

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def kept():
    server = KeptConnections()
    yield server
    server.shutdown()
    server.server_close()


def test_client_keeps_one_connection_per_thread(kept):
    client = ControllerClient(kept.url, timeout=5)
    for _ in range(20):
        assert client.execute(COMMAND)[0]["status"] == "OK"
    assert kept.connections == 1
    other = threading.Thread(target=client.execute, args=(COMMAND,))
    other.start()
    other.join()
    assert kept.connections == 2  # another thread, its own connection


def test_client_sends_again_once_on_a_connection_closed_while_idle(kept):
    kept.close_after = 1  # every kept connection is gone by the time it is used again
    client = ControllerClient(kept.url, timeout=5)
    for _ in range(5):
        assert client.execute(COMMAND)[0]["status"] == "OK"
    assert kept.connections == 5


def test_client_does_not_retry_a_controller_that_resets_every_connection(kept):
    client = ControllerClient(kept.url, timeout=5)
    client.execute(COMMAND)
    kept.reset_all = True
    with pytest.raises(ControllerUnavailable, match="unreachable"):
        client.execute(COMMAND)
    assert kept.connections == 2  # the kept one, then one new one: no third attempt
