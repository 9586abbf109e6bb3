"""The host agent end to end with real parts: OVS bridge, namespaces, the real controller,
the real agent process, and guests' commands written into real shared-memory regions."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import time

import pytest

from mbvisor.guest import ring
from mbvisor.guest.region import open_file
from mbvisor.guest.writer import ChannelWriter
from mbvisor.topologies.agent_run import AgentProcess, annotate, kill_9_and_restart, make_region
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import wait_until

pytestmark = pytest.mark.host

MB_MAC = "52:34:56:00:12:22"
OTHER_MAC = "52:34:56:00:12:33"


def mbctl(region: str, *arguments: str, timeout: float = 10) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", region, "--json",
                           "--timeout", str(timeout), *arguments], capture_output=True, text=True,
                          timeout=timeout + 30)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def setup(lab, tmp_path):
    regions = []
    controller = Controller(tmp_path).start()
    bridge = lab.bridge(controller=controller.target, fail_mode="secure")
    hosts = {"client": lab.host("client", ip="10.0.0.1/24"),
             "attacker": lab.host("attacker", ip="10.0.0.66/24"),
             "mb": lab.host("mb", ip="10.0.0.5/24", mac=MB_MAC),
             "mb2": lab.host("mb2", ip="10.0.0.6/24", mac=OTHER_MAC)}
    controller.wait_switch(bridge.dpid)
    lab.fill_arp(hosts.values())
    for name in ("mb", "mb2"):
        regions.append(make_region())
        annotate(hosts[name], regions[-1], f"vm-{name}")
    agent = AgentProcess(controller, tmp_path, bridges=(bridge.name,)).start()
    agent.wait_serving(f"vm-mb/{hosts['mb'].port_name}", f"vm-mb2/{hosts['mb2'].port_name}")
    yield {"controller": controller, "bridge": bridge, "hosts": hosts, "agent": agent,
           "region": regions[0], "region2": regions[1]}
    agent.stop()
    controller.stop()
    for region in regions:
        if os.path.exists(region):
            os.unlink(region)


def drops(bridge) -> int:
    return sum(f.n_packets for f in bridge.flows() if f.actions == "drop")


def test_the_agent_says_it_follows_open_vswitch(setup):
    ovsdb = setup["agent"].status()["ovsdb"]
    assert ovsdb["connected"] is True and ovsdb["remote"].endswith("/db.sock") and ovsdb["snapshots"] >= 1


def test_mbctl_success_means_the_flow_is_in_the_switch(setup):
    bridge, h, region = setup["bridge"], setup["hosts"], setup["region"]
    assert mbctl(region, "register", "firewall", "--mac", MB_MAC, "--ip", "10.0.0.5")[0] == 0
    code, answer = mbctl(region, "filter", "add", "--mac", MB_MAC, "--layer", "ip", "--src", "10.0.0.66")
    assert code == 0 and answer["status"] == "OK"
    assert any("nw_src=10.0.0.66" in line and "drop" in line for line in bridge.dump_flows())  # already there
    before, dropped = h["mb"].rx_packets(), drops(bridge)
    h["attacker"].send_udp(h["mb"], 9, count=20)
    wait_until(lambda: drops(bridge) - dropped >= 20, timeout=5, what="attack dropped in the switch")
    assert h["mb"].rx_packets() == before


def test_another_tenants_mac_is_refused_and_its_traffic_untouched(setup):
    h, region = setup["hosts"], setup["region"]
    code, answer = mbctl(region, "-w", f"@R F {OTHER_MAC} 10.0.0.6@@A {OTHER_MAC} I 4 s 10.0.0.66@")
    assert code == 1 and answer["status"] == "REFUSED"
    assert [(a["status"], a["code"]) for a in answer["answers"]] == [("REFUSED", "foreign-mac")] * 2
    assert all("is not this VM's MAC" in a["text"] for a in answer["answers"])
    assert setup["controller"].get("/v1/middleboxes")[1]["middleboxes"] == []
    before = h["mb2"].rx_packets()
    h["attacker"].send_udp(h["mb2"], 9, count=10)
    wait_until(lambda: h["mb2"].rx_packets() - before >= 10, timeout=5, what="other tenant's traffic")
    wait_until(lambda: [c["refused"] for c in setup["agent"].channels() if c["vm_id"] == "vm-mb"] == [1],
               timeout=5, what="the refusal counted in the agent's status")


def test_syntax_error_is_answered_by_the_agent(setup):
    code, answer = mbctl(setup["region"], "--raw", "-w", f"@A {MB_MAC} q 4 s 10.0.0.1@")
    assert code == 1 and answer["status"] == "SYNTAX" and "'q' is not a filter layer" in answer["text"]


def test_a_vm_that_goes_away_takes_its_offloads_with_it(setup):
    bridge, h, region = setup["bridge"], setup["hosts"], setup["region"]
    assert mbctl(region, "register", "firewall", "--mac", MB_MAC, "--ip", "10.0.0.5")[0] == 0
    assert mbctl(region, "filter", "add", "--mac", MB_MAC, "--layer", "ip", "--src", "10.0.0.66")[0] == 0
    cookie = f"cookie=0x4d42{MB_MAC.replace(':', '')}/-1"
    assert bridge.dump_flows(cookie)
    bridge.vsctl("remove", "Interface", h["mb"].port_name, "external_ids", "mbvisor-channel")
    wait_until(lambda: not bridge.dump_flows(cookie), timeout=10, what="offloads removed with the VM")
    assert setup["controller"].get("/v1/middleboxes")[1]["middleboxes"] == []


STREAM_RATE = 150.0  # commands/s: under the agent's limit (200/s), which another test is about


def _stream(region: str, texts: list[str], results) -> None:
    """A guest pipelining commands, paced under the agent's rate limit; reports (seq,
    status) of every answer it got."""
    writer = ChannelWriter(open_file(region))
    window, tickets, answers = 16, [], []
    due = time.monotonic()
    for text in texts:
        # The workload's pace, not a wait for anything.  Behind it (the window was full
        # while the killed process was away), it does not catch up: a burst of catching
        # up would exceed the agent's rate limit (200/s, burst 400) and be refused.
        due = max(due + 1 / STREAM_RATE, time.monotonic())
        time.sleep(max(0.0, due - time.monotonic()))
        tickets.append(writer.submit(f"@{text}@".encode(), timeout=60))
        if len(tickets) >= window:
            ticket = tickets.pop(0)
            response = writer.wait(ticket, timeout=60)
            answers.append((ticket.seq, response.status_name, response.text))
    answers += [(t.seq, r.status_name, r.text) for t in tickets for r in [writer.wait(t, timeout=60)]]
    results.put(answers)


def _commands(count: int) -> tuple[list[str], set[str]]:
    texts, kept, previous = [f"R F {MB_MAC} 10.0.0.5"], set(), None
    for i in range(count - 1):
        address = f"10.{50 + i // 250}.{i % 250}.1"
        if i % 4 == 3:
            texts.append(f"D {MB_MAC} I 4 s {previous}")
            kept.discard(f"A {MB_MAC} I 4 s {previous}")
        else:
            texts.append(f"A {MB_MAC} I 4 s {address}")
            kept.add(f"A {MB_MAC} I 4 s {address}")
            previous = address
    return texts, kept


@pytest.mark.parametrize("victim", ["controller", "agent"])
def test_killed_mid_stream_nothing_lost_nothing_twice(setup, victim):
    region, controller, agent = setup["region"], setup["controller"], setup["agent"]
    texts, expected = _commands(1000)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    guest = context.Process(target=_stream, args=(region, texts, results))
    guest.start()
    try:
        with open_file(region) as view:
            wait_until(lambda: ring.read_header(view.buf).consume >= 300, timeout=60, what="300 commands answered")
        kill_9_and_restart(controller if victim == "controller" else agent)
        answers = results.get(timeout=120)
        guest.join(timeout=30)
    finally:
        if guest.is_alive():
            guest.kill()
    assert [seq for seq, _, _ in answers] == list(range(len(texts)))  # one answer each, in order
    assert [(seq, text) for seq, status, text in answers if status != "OK"] == []
    status, view = controller.get(f"/v1/middleboxes/{setup['bridge'].dpid:016x}/{MB_MAC}")
    assert set(view["filters"]) == expected
    mb_cookie = (0x4D42 << 48) | int(MB_MAC.replace(":", ""), 16)  # not port security's drops
    # One drop per filter addressed to its MAC (each also has a group-frame form: filters.py).
    drops_installed = [f for f in setup["bridge"].flows() if f.actions == "drop" and f.cookie == mb_cookie
                       and f"dl_dst={MB_MAC}" in f.raw and "nw_src=" in f.raw]
    assert len(drops_installed) == len(expected)


def test_flood_and_garbage_slow_only_their_own_channel(setup, lab):
    good = lab.host("good", ip="10.0.0.7/24", mac="52:34:56:00:12:44")
    good_region = make_region()
    try:
        annotate(good, good_region, "vm-good")
        setup["agent"].wait_serving(f"vm-good/{good.port_name}")
        context = multiprocessing.get_context("fork")
        flood = context.Process(target=_flood, args=(setup["region"], 100_000))
        garbage = context.Process(target=_garbage, args=(setup["region2"], 5.0))
        flood.start()
        garbage.start()
        try:
            assert mbctl(good_region, "register", "firewall", "--mac", good.mac, "--ip", "10.0.0.7")[0] == 0
            for port in range(20):
                code, answer = mbctl(good_region, "filter", "add", "--mac", good.mac, "--layer", "transport",
                                     "--dst", str(1000 + port), "--proto", "udp")
                assert code == 0, answer
            flood.join(timeout=120)
            assert flood.exitcode == 0
        finally:
            for process in (flood, garbage):
                if process.is_alive():
                    process.kill()
        assert setup["agent"].alive()
        wait_until(lambda: {c["vm_id"]: c for c in setup["agent"].channels()}["vm-mb"]["answered"] >= 100_000,
                   timeout=10, what="the flood's answers in the agent's status")
        stats = {c["vm_id"]: c for c in setup["agent"].channels()}
        assert stats["vm-mb"]["rate_limited"] > 0
        assert stats["vm-good"]["rate_limited"] == 0 and stats["vm-good"]["answered"] == 21
    finally:
        os.unlink(good_region)


def _flood(region: str, count: int) -> None:
    writer = ChannelWriter(open_file(region))
    window = []
    for i in range(count):
        window.append(writer.submit(f"@A {MB_MAC} T 8 d {i % 65536}@".encode(), timeout=60))
        if len(window) >= 32:
            writer.wait(window.pop(0), timeout=60)
    for ticket in window:
        writer.wait(ticket, timeout=60)


def _garbage(region: str, seconds: float) -> None:
    import time
    with open_file(region) as view:
        deadline, chaos = time.monotonic() + seconds, random.Random(7)
        while time.monotonic() < deadline:
            offset = chaos.randrange(0, view.size - 64)
            view.buf[offset:offset + 16] = chaos.randbytes(16)
