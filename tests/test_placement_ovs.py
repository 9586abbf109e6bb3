"""mbvisor beside other OpenFlow apps on a real OVS bridge (docs/controller.md, "Beside
other apps"): in front of Ryu's simple_switch_13 and of ofctl_rest in one ryu-manager
process, and placed at a table offset by ``mbvisor controller`` itself.  Each app keeps
its own tables, the other app forwards what mbvisor lets through, and mbvisor's
filters still drop before it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from mbvisor.controller.pipeline import COOKIE_TAG, COOKIE_TAG_MASK
from mbvisor.topologies.controller_run import Controller, free_port
from mbvisor.topologies.netlab import settle, wait_until
from test_controller_ovs import MB_MAC, expect_arrivals, expect_dropped

pytestmark = pytest.mark.host

NEXT_TABLE = 10


def mbvisor_flows(bridge) -> list:
    return [f for f in bridge.flows() if f.cookie & COOKIE_TAG_MASK == COOKIE_TAG]


def hosts(lab, controller, bridge):
    controller.wait_switch(bridge.dpid)
    made = {"client": lab.host("client", ip="10.0.0.1/24"), "attacker": lab.host("attacker", ip="10.0.0.66/24"),
            "mb": lab.host("mb", ip="10.0.0.5/24", mac=MB_MAC)}
    lab.fill_arp(made.values())
    return made


def filtered_traffic_is_dropped_and_the_rest_forwarded(controller, bridge, h) -> int:
    """The attacker's datagrams reach the middlebox until its filter drops them; then the
    client's and the middlebox's 2 x 20 go through.  Returns what the next table had
    counted before those: OVS attributes a datapath flow's packets to the rules it
    translates to when its revalidator pulls the counters, so packets sent before the
    filter may land on it; the client's are counted from settled counters on."""
    mb, attacker, client = h["mb"], h["attacker"], h["client"]
    expect_arrivals(attacker, mb, 5000)
    controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5")
    controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} I 4 s 10.0.0.66")
    expect_dropped(bridge, attacker, mb, 5000)
    before = settle(lambda: forwarded_by_the_next_table(bridge), what="the next table's counters")
    expect_arrivals(client, mb, 5000)
    expect_arrivals(mb, client, 5001)
    return before


def forwarded_by_the_next_table(bridge) -> int:
    """Packets the other app's NORMAL flow in the next table forwarded."""
    return sum(f.n_packets for f in bridge.flows() if f.table == NEXT_TABLE and f.actions == "NORMAL")


def test_in_front_of_simple_switch_13_in_one_ryu_manager(lab, tmp_path):
    controller = Controller(tmp_path, launcher="ryu-manager", apps=("mbvisor.controller.simple_switch_after",),
                            environment={"MBVISOR_NEXT_TABLE": str(NEXT_TABLE)}).start()
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        h = hosts(lab, controller, bridge)
        filtered_traffic_is_dropped_and_the_rest_forwarded(controller, bridge, h)
        flows = bridge.flows()
        ours = [f for f in flows if f.cookie & COOKIE_TAG_MASK == COOKIE_TAG]
        theirs = [f for f in flows if f.cookie & COOKIE_TAG_MASK != COOKIE_TAG]
        assert {f.table for f in ours} <= set(range(0, 5))
        assert {f.table for f in theirs} == {NEXT_TABLE}, [f.raw for f in theirs]
        learned = " ".join(f.match for f in theirs if f.priority == 1)  # simple_switch learned whom it forwarded
        assert f"dl_dst={h['mb'].mac}" in learned and f"dl_dst={h['client'].mac}" in learned, learned
    finally:
        controller.stop()


def test_in_front_of_ofctl_rest_whose_flows_go_to_the_next_table(lab, tmp_path):
    wsapi = free_port()
    controller = Controller(tmp_path, launcher="ryu-manager", apps=("ryu.app.ofctl_rest",),
                            arguments=("--wsapi-port", str(wsapi)),
                            environment={"MBVISOR_NEXT_TABLE": str(NEXT_TABLE), "MBVISOR_AUDIT_INTERVAL": "0.5"}).start()
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        h = hosts(lab, controller, bridge)

        def add_flow(entry: dict) -> None:
            body = json.dumps({"dpid": bridge.dpid, **entry}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{wsapi}/stats/flowentry/add", body, method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200

        add_flow({"table_id": NEXT_TABLE, "priority": 0, "actions": [{"type": "OUTPUT", "port": "NORMAL"}]})
        before = filtered_traffic_is_dropped_and_the_rest_forwarded(controller, bridge, h)
        wait_until(lambda: forwarded_by_the_next_table(bridge) - before >= 40, timeout=10,  # the counters lag
                   what="what mbvisor let through (2 x 20 datagrams) counted in the next table")
        # An operator's flow in mbvisor's own table replaces mbvisor's there; its audit puts it back.
        def table_0_miss() -> list:
            return [(f.cookie, f.actions) for f in bridge.flows() if f.table == 0 and f.priority == 0 and not f.match]

        mbvisors = table_0_miss()
        assert len(mbvisors) == 1 and mbvisors[0][0] & COOKIE_TAG_MASK == COOKIE_TAG
        add_flow({"table_id": 0, "priority": 0, "cookie": 7, "actions": [{"type": "OUTPUT", "port": "NORMAL"}]})
        assert table_0_miss() == [(7, "NORMAL")]
        wait_until(lambda: table_0_miss() == mbvisors, timeout=10, what="mbvisor's table 0 miss flow put back by its audit")
        expect_dropped(bridge, h["attacker"], h["mb"], 5000)
    finally:
        controller.stop()


def test_mbvisor_controller_at_a_table_offset_with_another_app_in_its_process(lab, tmp_path):
    """tests/other_app.py owns table 0 (to mbvisor's first table) and the next table."""
    controller = Controller(tmp_path, arguments=("--table-offset", "2", "--next-table", str(NEXT_TABLE)),
                            apps=("other_app",), environment={"PYTHONPATH": str(Path(__file__).parent)}).start()
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        h = hosts(lab, controller, bridge)
        wait_until(lambda: len([f for f in bridge.flows() if f.cookie == 7]) == 2, what="the other app's flows")
        assert "tables 2..6, the rest to table 10" in controller.log.read_text()
        before = filtered_traffic_is_dropped_and_the_rest_forwarded(controller, bridge, h)
        wait_until(lambda: forwarded_by_the_next_table(bridge) - before >= 40, timeout=10,  # the counters lag
                   what="what mbvisor let through (2 x 20 datagrams) counted in the next table")
        assert {f.table for f in mbvisor_flows(bridge)} <= set(range(2, 7))
        assert len([f for f in bridge.flows() if f.cookie == 7]) == 2  # the others' stay
        described = controller.get(f"/v1/middleboxes/{bridge.dpid:016x}/{MB_MAC}")[1]
        # Counted at the placed tables: the 20 dropped, and maybe some of the attacker's 20 sent
        # before the filter (OVS attributes a datapath flow's packets when it pulls them).
        assert 20 <= described["handled_in_switch"]["packets"] <= 40, described
    finally:
        controller.stop()


def test_a_placement_a_switch_could_not_take_stops_the_controller_with_the_reason(tmp_path):
    controller = Controller(tmp_path, arguments=("--next-table", "3"))
    with pytest.raises(Exception, match="next table must be 5..253"):
        controller.start()
