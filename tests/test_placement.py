"""mbvisor's pipeline placed among another app's tables (controller/placement.py): the
placement moves every table and every action naming one, hands what mbvisor lets
through to the next table, refuses placements a switch could not take, and the shell
installs, counts and traces through placed tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakeswitch import parser
from mbvisor.controller.flows import Surroundings, compile_switch, counts_as_handled
from mbvisor.controller.model import Binding, Draft, State, decide
from mbvisor.controller.pipeline import COOKIE_TAG, COOKIE_TAG_MASK, Flow, Group
from mbvisor.controller.placement import LAST_TABLE, Placement, placement_from
from mbvisor.controller.service import Settings
from mbvisor.guest.grammar import parse_command
from test_controller_shell import BACKEND_PORT, CLIENT_PORT, DPID, MAC, MB_PORT, Host
from test_controller_flows import NEIGHBOURS

TABLE_AT = {"goto": 1, "resubmit": 1, "ct_nat": 2, "ct_commit": 2}  # the actions that name a table, and where


def table_of(action: tuple) -> int:
    return action[TABLE_AT[action[0]]]


def a_switch() -> tuple:
    """A firewall with filters of every kind and a load balancer with redirects, compiled."""
    state = State()
    commands = [f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16", f"A {MAC} I 4 s 10.67.0.0/16",
                f"A {MAC} T 13 s 1024-2047 d 53 p udp", "R L 52:34:56:00:12:33 10.0.0.6 0 * 10.0.0.11,10.0.0.12",
                "R L 52:34:56:00:12:33 10.0.0.6 1 10.9.0.0/16 10.0.0.13"]
    draft = Draft(state)
    for port, text in zip([MB_PORT, MB_PORT, MB_PORT, MB_PORT, 4, 4], commands):
        draft.record(decide(draft, Binding(DPID, port), parse_command(text)))
    return compile_switch(draft.state(), DPID, Surroundings(neighbours=NEIGHBOURS))


def test_the_default_placement_changes_nothing():
    config = a_switch()
    default = Placement()
    assert default.is_default
    assert {default.flow(f) for f in config.flows} == config.flows
    assert {default.group(g) for g in config.groups} == config.groups


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 253 - LAST_TABLE), st.one_of(st.none(), st.integers(0, 254)))
def test_a_placement_moves_every_table_and_hands_the_rest_to_the_next_table(offset, next_table):
    placement = Placement(offset, next_table)
    try:
        placement.check()
    except ValueError:
        assert next_table is not None and not offset + LAST_TABLE < next_table <= 253
        return
    config = a_switch()
    assert any(("normal",) in f.actions for f in config.flows)  # the shape this test is about
    for compiled in config.flows:
        placed = placement.flow(compiled)
        assert placed.table == compiled.table + offset and placed.table in placement.tables
        assert (placed.priority, placed.match, placed.cookie) == (compiled.priority, compiled.match, compiled.cookie)
        for before, after in zip(compiled.actions, placed.actions):
            if before == ("normal",):
                assert after == (("goto", next_table) if next_table is not None else before)
            elif before[0] in TABLE_AT:
                assert table_of(after) == table_of(before) + offset and table_of(after) in placement.tables
            else:
                assert after == before
        # OpenFlow only goes forward: every goto leaves for a later table.
        assert all(target > placed.table for kind, target in
                   (a[:2] for a in placed.actions if a[0] == "goto"))
    for group in config.groups:
        for bucket in placement.group(group).buckets:
            assert ("normal",) not in bucket or next_table is None
            assert all(a[0] != "goto" for a in bucket)  # a bucket holds actions, not instructions


def test_placements_a_switch_could_not_take_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="offset must be 0..249"):
        Placement(-1).check()
    with pytest.raises(ValueError, match="offset must be 0..249"):
        Placement(250).check()
    with pytest.raises(ValueError, match=r"next table must be 5..253.*0..4, not 4"):
        Placement(0, 4).check()
    with pytest.raises(ValueError, match=r"next table must be 13..253.*not 3"):
        Placement(8, 3).check()
    with pytest.raises(ValueError, match=r"next table must be 5..253.*not 254"):
        Placement(0, 254).check()  # OVS keeps table 254 for itself
    with pytest.raises(ValueError, match="the next table must be a table number, not 'ten'"):
        placement_from("0", "ten")
    assert placement_from(None, None) == Placement()
    assert placement_from("", "") == Placement()
    assert placement_from("3", "10") == Placement(3, 10)
    with pytest.raises(ValueError, match="next table"):
        Settings.from_environment({"MBVISOR_NEXT_TABLE": "2", "MBVISOR_STATE_DIR": "/tmp"})
    assert Settings.from_environment({"MBVISOR_TABLE_OFFSET": "20", "MBVISOR_NEXT_TABLE": "30",
                                      "MBVISOR_STATE_DIR": "/tmp"}).placement == Placement(20, 30)


def a_front_app(fake, offset: int) -> None:
    """Another app's table 0 sends every packet to mbvisor's first table."""
    if offset:
        fake.tables.flow_mod(parser.OFPFlowMod(fake.datapath, table_id=0, priority=0, match=parser.OFPMatch(),
                                               instructions=[parser.OFPInstructionGotoTable(offset)]))


def an_app_behind(fake, table: int) -> None:
    """Another app's table forwards what it is handed (NORMAL, for the trace)."""
    fake.tables.flow_mod(parser.OFPFlowMod(fake.datapath, table_id=table, priority=0, match=parser.OFPMatch(),
                                           instructions=[parser.OFPInstructionActions(
                                               fake.datapath.ofproto.OFPIT_APPLY_ACTIONS,
                                               [parser.OFPActionOutput(fake.datapath.ofproto.OFPP_NORMAL)])]))


@pytest.mark.parametrize("offset, next_table", [(0, 10), (3, 10), (3, None)])
def test_the_shell_installs_counts_and_forwards_through_placed_tables(tmp_path, offset, next_table):
    placement = Placement(offset, next_table)
    host = Host(tmp_path, placement=placement)
    try:
        fake = host.switch()
        a_front_app(fake, offset)
        if next_table is not None:
            an_app_behind(fake, next_table)
        fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)  # answers ARP through the tables
        host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16", f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
        ours = [f for f in fake.flows() if f.cookie & COOKIE_TAG_MASK == COOKIE_TAG]
        assert ours and {f.table for f in ours} <= set(placement.tables)
        assert {f.table for f in ours} >= {offset, offset + 1, offset + 2}
        assert len(fake.flows()) == len(ours) + bool(offset) + (next_table is not None)  # the others' stay
        dropped = fake.trace(CLIENT_PORT, count=True, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.66.1.1",
                             ipv4_dst="10.0.0.5")
        assert dropped.verdict == "drop" and dropped.path[-1][0] == offset + 1
        passed = fake.trace(CLIENT_PORT, eth_dst="52:34:56:00:99:99", eth_type=0x0800, ipv4_src="10.1.1.1")
        assert passed.verdict == "normal"
        assert passed.path[-1][0] == (next_table if next_table is not None else offset + 1)
        redirected = fake.trace(CLIENT_PORT, count=True, ct_state=0x21, eth_dst=MAC, eth_type=0x0800,
                                ipv4_src="10.0.0.1", ipv4_dst="10.0.0.5")
        assert redirected.verdict == "output" and redirected.ports == [BACKEND_PORT]
        assert host.service.handled_packets(DPID, MAC)["packets"] == 2  # counted at the logical tables
        assert host.service.reconcilers[DPID].installed.flow_count() == len(ours)
    finally:
        host.close()


def test_counts_as_handled_reads_logical_tables():
    """The counters' rule is about logical tables: a placed switch's are read back first."""
    placement = Placement(7, 20)
    flow = placement.flow(Flow(1, 3000, (), (), 1))
    assert counts_as_handled(placement.logical_table(flow.table), 3000, True)
    assert not counts_as_handled(flow.table, 3000, True)
    assert placement.group(Group(5, ((("normal",),),))).buckets == ((("resubmit", 20),),)
