"""The controller against a real OVS bridge (netdev datapath) with hosts in namespaces:
filters at every layer, redirects with conntrack NAT, cancel, restart and reconnection."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbvisor.controller.pipeline import BASE_COOKIE
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import wait_until

pytestmark = pytest.mark.host

MB_MAC = "52:34:56:00:12:22"
MB2_MAC = "52:34:56:00:12:33"


@pytest.fixture
def controller(tmp_path):
    running = Controller(tmp_path).start()
    yield running
    running.stop()


@pytest.fixture
def net(lab, controller):
    """client, attacker, two middleboxes and two backends on one controlled bridge."""
    bridge = lab.bridge(controller=controller.target, fail_mode="secure")
    hosts = {
        "client": lab.host("client", ip="10.0.0.1/24"),
        "attacker": lab.host("attacker", ip="10.0.0.66/24"),
        "mb": lab.host("mb", ip="10.0.0.5/24", mac=MB_MAC),
        "mb2": lab.host("mb2", ip="10.0.0.6/24", mac=MB2_MAC),
        "backend": lab.host("backend", ip="10.0.0.11/24"),
        "backend2": lab.host("backend2", ip="10.0.0.12/24"),
    }
    controller.wait_switch(bridge.dpid)
    lab.fill_arp(hosts.values())  # no ARP in the counters below
    return bridge, hosts


def dropped_in_switch(bridge) -> int:
    """Packets the switch dropped with offload flows (priority of filters)."""
    return sum(f.n_packets for f in bridge.flows() if f.actions == "drop")


def expect_arrivals(sender, target, port, count=20) -> None:
    """Every one of ``count`` datagrams reaches ``target``'s interface."""
    before = target.rx_packets()
    sender.send_udp(target, port, count=count)
    wait_until(lambda: target.rx_packets() - before >= count, timeout=5,
               what=f"{count} packets {sender.name} -> {target.name}:{port}")
    assert target.rx_packets() - before == count


def expect_dropped(bridge, sender, target, port, count=20) -> None:
    """The switch drops all ``count`` datagrams (its counters are the barrier) and none
    reaches ``target``'s interface."""
    before, dropped = target.rx_packets(), dropped_in_switch(bridge)
    sender.send_udp(target, port, count=count)
    wait_until(lambda: dropped_in_switch(bridge) - dropped >= count, timeout=5,
               what=f"{count} packets {sender.name} -> {target.name}:{port} dropped in the switch")
    assert target.rx_packets() == before


@pytest.mark.parametrize("layer, fields", [
    ("I", "4 s 10.0.0.66"),
    ("M", "4 s {attacker_mac}"),
    ("T", "9 d 5000 p udp"),
])
def test_filter_drops_only_matching_traffic_to_its_middlebox(net, controller, layer, fields):
    bridge, h = net
    mb, attacker, client = h["mb"], h["attacker"], h["client"]
    expect_arrivals(attacker, mb, 5000)
    controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5")
    filter_text = f"{layer} {fields.format(attacker_mac=attacker.mac)}"
    controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} {filter_text}")
    expect_dropped(bridge, attacker, mb, 5000)
    expect_arrivals(client, mb, 5001)               # traffic that matches no filter
    if layer != "T":
        expect_arrivals(client, mb, 5000)           # another source is not filtered
    expect_arrivals(attacker, h["mb2"], 5000)       # another tenant is untouched
    controller.ok(bridge.dpid, mb.ofport, f"D {MB_MAC} {filter_text}")
    expect_arrivals(attacker, mb, 5000)


def test_counters_and_rest_view_match_the_switch(net, controller):
    bridge, h = net
    mb = h["mb"]
    controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5")
    controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} I 4 s 10.0.0.66")
    expect_dropped(bridge, h["attacker"], mb, 7, count=30)
    status, view = controller.get(f"/v1/middleboxes/{bridge.dpid:016x}/{MB_MAC}")
    assert status == 200 and view["filters"] == [f"A {MB_MAC} I 4 s 10.0.0.66"]
    assert view["handled_in_switch"]["packets"] == 30
    status, flows = controller.get(f"/v1/middleboxes/{bridge.dpid:016x}/{MB_MAC}/flows")
    switch_view = bridge.dump_flows(f"cookie={int(view['cookie'], 16)}/-1")
    # To its MAC, in a group frame for its address, and the two double-tagged drops.
    assert len(flows["flows"]) == len(switch_view) == 4
    metrics = controller.metrics()
    assert f'mbvisor_packets_handled_in_switch{{dpid="{bridge.dpid:016x}",mac="{MB_MAC}"}} 30.0' in metrics
    assert 'mbvisor_commands_total{status="OK"} 2.0' in metrics


def test_cancel_leaves_no_flow_or_group_of_the_middlebox(net, controller):
    bridge, h = net
    mb = h["mb"]
    controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5")
    controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} T 9 d 1000-1100 p tcp")
    controller.ok(bridge.dpid, mb.ofport, f"R L {MB_MAC} 10.0.0.5 0 * 10.0.0.11,10.0.0.12")
    controller.ok(bridge.dpid, h["mb2"].ofport, f"R F {MB2_MAC} 10.0.0.6")
    controller.ok(bridge.dpid, h["mb2"].ofport, f"A {MB2_MAC} I 4 s 10.0.0.66")
    cookie = f"cookie=0x4d42{MB_MAC.replace(':', '')}/-1"
    assert len(bridge.dump_flows(cookie)) > 10 and bridge.ofctl("dump-groups").count("group_id") == 1
    controller.ok(bridge.dpid, mb.ofport, f"X {MB_MAC}")
    assert bridge.dump_flows(cookie) == []
    assert "group_id" not in bridge.ofctl("dump-groups")
    expect_dropped(bridge, h["attacker"], h["mb2"], 9)  # the other middlebox keeps its filter


def test_type0_redirect_serves_tcp_from_the_backend_as_the_middlebox(net, controller):
    bridge, h = net
    mb, client, backend = h["mb"], h["client"], h["backend"]
    backend.serve_http(8080)
    controller.ok(bridge.dpid, mb.ofport, f"R L {MB_MAC} 10.0.0.5 0 * 10.0.0.11")
    before = mb.rx_packets()
    for _ in range(5):
        response = client.http_get("http://10.0.0.5:8080/")
        assert response.status == 200 and response.peer[0] == "10.0.0.5"
        assert response.body.strip() == "backend"  # the server names its host
    assert mb.rx_packets() == before
    # The backend's own traffic is untouched: a direct connection to it still works.
    assert client.http_get("http://10.0.0.11:8080/").peer[0] == "10.0.0.11"


def test_type1_redirect_only_for_its_source(net, controller):
    bridge, h = net
    mb, client, attacker, backend = h["mb"], h["client"], h["attacker"], h["backend"]
    backend.serve_http(8080)
    mb.serve_http(8080)
    controller.ok(bridge.dpid, mb.ofport, f"R L {MB_MAC} 10.0.0.5 1 10.0.0.1 10.0.0.11")
    assert client.http_get("http://10.0.0.5:8080/").body.strip() == "backend"
    assert attacker.http_get("http://10.0.0.5:8080/").body.strip() == "mb"  # other sources reach the MB


def test_pool_spreads_connections_and_keeps_each_on_one_backend(net, controller):
    bridge, h = net
    mb, client = h["mb"], h["client"]
    for name in ("backend", "backend2"):
        h[name].serve_http(8080)
    controller.ok(bridge.dpid, mb.ofport, f"R L {MB_MAC} 10.0.0.5 0 * 10.0.0.11,10.0.0.12")
    served = [client.http_get("http://10.0.0.5:8080/").body.strip() for _ in range(24)]
    by_backend = {name: served.count(name) for name in ("backend", "backend2")}
    assert sum(by_backend.values()) == 24 and min(by_backend.values()) > 0, by_backend


def test_restart_restores_and_reconnect_changes_nothing_needlessly(net, controller, tmp_path):
    bridge, h = net
    mb = h["mb"]
    controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5")
    controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} I 4 s 10.0.0.66")
    expect_dropped(bridge, h["attacker"], mb, 7, count=10)
    flows_before = bridge.dump_flows(no_stats=True)
    controller.stop()
    controller.start()
    controller.wait_switch(bridge.dpid)
    assert controller.reconciliations()[-1].endswith("+0 ~0 -0 flows, +0 ~0 -0 groups")
    assert bridge.flow_packets("nw_src=10.0.0.66") == 10  # counters kept: nothing re-added
    assert bridge.dump_flows(no_stats=True) == flows_before
    # A switch that lost its flows gets them back when it reconnects.
    bridge.set_controller(None)
    bridge.del_flows()
    bridge.set_controller(controller.target)
    wait_until(lambda: sorted(bridge.dump_flows(no_stats=True)) == sorted(flows_before), timeout=20,
               what="flows restored after reconnection")
    expect_dropped(bridge, h["attacker"], mb, 7)


def test_batch_applies_in_order_and_answers_each(net, controller):
    bridge, h = net
    mb = h["mb"]
    answers = controller.batch(bridge.dpid, mb.ofport, [
        f"R F {MB_MAC} 10.0.0.5", f"A {MB_MAC} I 4 s 10.0.0.66", f"A {MB_MAC} q 4 s 10.0.0.1",
        f"A {MB_MAC} T 9 d 5000 p udp", f"I {MB_MAC}"])
    assert [a["status"] for a in answers] == ["OK", "OK", "SYNTAX", "OK", "OK"]
    assert answers[4]["text"] == f"A {MB_MAC} I 4 s 10.0.0.66"
    expect_dropped(bridge, h["attacker"], mb, 9)
    expect_dropped(bridge, h["client"], mb, 5000)


def test_a_load_asking_for_failures_is_applied_whole_and_names_only_the_failures(net, controller):
    bridge, h = net
    mb = h["mb"]
    failures = controller.load(bridge.dpid, mb.ofport, [
        f"R F {MB_MAC} 10.0.0.5", f"A {MB_MAC} I 4 s 10.0.0.66", f"A {MB_MAC} q 4 s 10.0.0.1",
        f"A {MB_MAC} T 9 d 5000 p udp", f"D {MB_MAC} I 4 s 10.9.9.9"])
    assert [(f["index"], f["status"], f["code"]) for f in failures] == [(2, "SYNTAX", "syntax"),
                                                                       (4, "REJECTED", "no-such-filter")]
    expect_dropped(bridge, h["attacker"], mb, 9)
    expect_dropped(bridge, h["client"], mb, 5000)


def test_each_middlebox_is_bound_to_its_own_bridge(lab, controller):
    """Two hypervisors' bridges on one controller: the same MAC on both is two middleboxes."""
    bridges = [lab.bridge(controller=controller.target, fail_mode="secure") for _ in range(2)]
    hosts = [(lab.host(f"mb{i}", ip="10.0.0.5/24", mac=MB_MAC, bridge=b),
              lab.host(f"at{i}", ip="10.0.0.66/24", bridge=b)) for i, b in enumerate(bridges)]
    for bridge in bridges:
        controller.wait_switch(bridge.dpid)
    for mb, attacker in hosts:
        mb.set_arp(attacker)
        attacker.set_arp(mb)
    (mb0, attacker0), (mb1, attacker1) = hosts
    controller.ok(bridges[0].dpid, mb0.ofport, f"R F {MB_MAC} 10.0.0.5")
    controller.ok(bridges[0].dpid, mb0.ofport, f"A {MB_MAC} I 4 s 10.0.0.66")
    expect_dropped(bridges[0], attacker0, mb0, 9)
    expect_arrivals(attacker1, mb1, 9)
    assert len(controller.get("/v1/middleboxes")[1]["middleboxes"]) == 1
    assert not [f for f in bridges[1].flows() if f.actions == "drop" and f.stats["cookie"] != f"{BASE_COOKIE:#x}"]


@pytest.mark.parametrize("launcher, framework", [
    ("mbvisor", "os_ken"), ("osken-manager", "os_ken"), ("ryu-manager", "ryu")])
def test_the_same_app_under_every_launcher(lab, tmp_path, launcher, framework):
    controller = Controller(tmp_path, launcher=launcher).start()
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        mb, attacker = lab.host("mb", ip="10.0.0.5/24", mac=MB_MAC), lab.host("attacker", ip="10.0.0.66/24")
        controller.wait_switch(bridge.dpid)
        lab.fill_arp()
        controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5")
        controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} I 4 s 10.0.0.66")
        expect_dropped(bridge, attacker, mb, 9)
        assert f"mbvisor controller running on {framework}" in controller.log.read_text()
    finally:
        controller.stop()


def test_mbvisor_controller_starts_lean_in_the_same_process(tmp_path):
    """``mbvisor controller`` replaces itself (same pid) by a process without eventlet's
    green DNS and setuptools' distutils shim, which would load dnspython, requests,
    cryptography and pkg_resources (~29 MB) for nothing."""
    controller = Controller(tmp_path).start()
    try:
        pid = controller.process.pid
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"EVENTLET_NO_GREENDNS=yes" in environment and b"SETUPTOOLS_USE_DISTUTILS=stdlib" in environment
        assert "cryptography" not in Path(f"/proc/{pid}/maps").read_text()
        assert controller.get("/v1/health")[0] == 200
    finally:
        controller.stop()


def test_idempotency_key_applies_once_and_replays_the_first_answer(net, controller):
    bridge, h = net
    mb = h["mb"]
    key = ("chan-1", 7, 0)
    first = controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5", key)
    again = controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5", key)
    assert again["replayed"] and again["text"] == first["text"] and not first["replayed"]
    status, answer = controller.command(bridge.dpid, mb.ofport, f"A {MB_MAC} I 4 d 10.0.0.9")
    assert status == 400 and answer["status"] == "SYNTAX" and "mask 4" in answer["text"]
    status, answer = controller.command(bridge.dpid, mb.ofport, f"A {MB2_MAC} I 4 s 10.0.0.9")
    assert status == 409 and answer["code"] == "not-registered"
    status, answer = controller.command(bridge.dpid, mb.ofport, f"X {MB_MAC}", token="wrong")
    assert status == 401 and answer["error"]["code"] == "unauthorised"
