"""tests/fakeswitch.py: the in-memory OpenFlow 1.3 switch the controller shell's unit tests
run on.  Fast and without OVS: flows compiled by ``controller.flows`` and encoded by
``controller.ofmessages`` go through it as bytes and are read back with flow statistics;
bundles, barriers, traces and injected faults behave as documented there."""

from __future__ import annotations

import pytest

from fakeswitch import (OFPBFC_BAD_ID, OFPBFC_MSG_FAILED, OFPBFC_TIMEOUT, ONF, FakeSwitch, canonical, decode,
                        serialized, wait_until)
from mbvisor.controller.flows import (BASE_COOKIE, Flow, Neighbour, Surroundings, base_config, compile_switch,
                                      cookie_of)
from mbvisor.controller.pipeline import COOKIE_TAG, COOKIE_TAG_MASK
from mbvisor.controller.model import Binding, State, apply
from mbvisor.controller.pipeline import port_cookie
from mbvisor.controller.ofmessages import encoded_actions, flow_mod, group_mod, instructions, normal_match
from mbvisor.guest.grammar import parse_command
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

MAC = "52:34:56:00:12:22"
CLIENT_PORT = 1
NEIGHBOURS = Surroundings(neighbours={f"10.0.0.{i}": Neighbour(f"02:00:00:00:00:{i:02x}", 10 + i) for i in range(1, 10)},
                          metered=False)  # these tests install flows without the controller's meter set-up
COMMANDS = (
    f"R F {MAC} 10.0.0.100",
    f"A {MAC} I 4 s 10.66.0.0/16",
    f"A {MAC} T 12 s 1000-1999 d 80",
    f"A {MAC} M 2 t 5",
    f"R L {MAC} 10.0.0.100 0 * 10.0.0.5,10.0.0.6",
)


def state_of(*texts: str) -> State:
    """A State built by applying commands, as tests/test_controller_flows.py builds them."""
    state = State()
    for text in texts:
        state = apply(state, Binding(1, 5), parse_command(text)).state
    return state


class Sink(list):
    """Everything the switch answered, in order."""

    def __call__(self, message) -> None:
        self.append(message)

    def replies(self, xid: int) -> list:
        return [m for m in self if m.xid == xid]

    def errors(self) -> list:
        return [m for m in self if isinstance(m, parser.OFPErrorMsg)]


@pytest.fixture
def sink():
    return Sink()


@pytest.fixture
def switch(sink):
    with FakeSwitch(1, sink=sink) as fake:
        yield fake


def send(switch, *messages) -> list[int]:
    datapath = switch.datapath
    for message in messages:
        datapath.set_xid(message)
        assert datapath.send_msg(message)
    return [m.xid for m in messages]


def barrier(switch, sink) -> None:
    """Send a barrier and wait for its reply: everything before it was processed."""
    (xid,) = send(switch, parser.OFPBarrierRequest(switch.datapath))
    wait_until(lambda: sink.replies(xid), what="barrier reply")


def request(switch, sink, message) -> list:
    """A multipart request; the bodies of all its replies, joined (as the controller does)."""
    (xid,) = send(switch, message)
    wait_until(lambda: any(not r.flags & ofp.OFPMPF_REPLY_MORE for r in sink.replies(xid)), what="last reply")
    return [entry for reply in sink.replies(xid) for entry in reply.body]


def flow_stats(switch, sink, cookie: int = 0, mask: int = 0, table: int = ofp.OFPTT_ALL) -> list:
    dp = switch.datapath
    return request(switch, sink, parser.OFPFlowStatsRequest(dp, 0, table, ofp.OFPP_ANY, ofp.OFPG_ANY, cookie, mask,
                                                             parser.OFPMatch()))


def install(switch, config) -> None:
    dp = switch.datapath
    send(switch, *[group_mod(dp, g, "add") for g in sorted(config.groups)],
         *[flow_mod(dp, f, "add") for f in config.flows])


def comparable(datapath, flows) -> set:
    """Compiled flows as the switch reports them: normal matches, actions as wire bytes."""
    return {(f.table, f.priority, normal_match(f.match), f.cookie,
             encoded_actions(datapath, instructions(datapath, f.actions))) for f in flows}


def reported(datapath, stats) -> set:
    return {(s.table_id, s.priority, normal_match(s.match.items()), s.cookie,
             encoded_actions(datapath, s.instructions)) for s in stats}


def drop_flow(source: str, priority: int = 3000, cookie: int = 0x4D42_0000_0000_0001) -> Flow:
    return Flow(0, priority, (("eth_dst", MAC), ("eth_type", 0x0800), ("ipv4_src", source)), (), cookie)


# --- the wire ---------------------------------------------------------------------------------

def test_local_parsers_round_trip_to_the_same_bytes(switch):
    """What os-ken cannot decode is parsed here; re-encoding the result gives the same bytes."""
    dp = switch.datapath
    config = compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS)
    inner = flow_mod(dp, next(iter(config.flows)), "add")
    messages = [
        group_mod(dp, next(iter(config.groups)), "add"),
        parser.OFPBarrierRequest(dp),
        parser.OFPFlowStatsRequest(dp, 0, 1, ofp.OFPP_ANY, ofp.OFPG_ANY, COOKIE_TAG, COOKIE_TAG_MASK,
                                   parser.OFPMatch(eth_type=0x0800, ipv4_src=("10.0.0.0", "255.0.0.0"))),
        parser.OFPGroupDescStatsRequest(dp, 0),
        parser.OFPPortDescStatsRequest(dp, 0),
        parser.OFPPacketOut(dp, ofp.OFP_NO_BUFFER, ofp.OFPP_CONTROLLER,
                            [parser.OFPActionOutput(ofp.OFPP_FLOOD)], b"\x01" * 60),
        parser.ONFBundleAddMsg(dp, 7, ofp.ONF_BF_ATOMIC, inner, []),
    ]
    for message in messages:
        dp.set_xid(message)
        message.serialize()
        decoded = decode(dp, bytes(message.buf))
        assert type(decoded) is type(message)
        decoded.xid, decoded.buf = None, None
        decoded.set_xid(message.xid)
        decoded.serialize()
        assert bytes(decoded.buf) == bytes(message.buf), type(message).__name__
    assert isinstance(decode(dp, bytes(messages[-1].buf)).message, parser.OFPFlowMod)


def test_compiled_flows_and_groups_read_back_as_sent(switch, sink):
    config = compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS)
    install(switch, config)
    dp = switch.datapath
    assert reported(dp, flow_stats(switch, sink)) == comparable(dp, config.flows)
    assert switch.flow_count() == len(config.flows)
    groups = request(switch, sink, parser.OFPGroupDescStatsRequest(dp, 0))
    assert sorted(g.group_id for g in groups) == sorted(g.group_id for g in config.groups)
    assert all(g.type == ofp.OFPGT_SELECT and len(g.buckets) == 2 for g in groups)
    mine = flow_stats(switch, sink, cookie_of(MAC), 0xFFFFFFFFFFFFFFFF)
    assert {s.cookie for s in mine} == {cookie_of(MAC)} and len(mine) == len(config.flows) - len(base_config(NEIGHBOURS).flows)
    assert not sink.errors()


def test_many_flows_are_reported_in_several_replies():
    sink = Sink()
    with FakeSwitch(1, sink=sink) as switch:
        dp = switch.datapath
        flows = [drop_flow(f"10.{i // 250}.{i % 250}.1") for i in range(1200)]
        send(switch, *[flow_mod(dp, f, "add") for f in flows])
        stats = flow_stats(switch, sink)
        replies = [m for m in sink if isinstance(m, parser.OFPFlowStatsReply)]
        assert len(stats) == 1200 and len(replies) > 1
        assert [bool(r.flags & ofp.OFPMPF_REPLY_MORE) for r in replies] == [True] * (len(replies) - 1) + [False]
        assert all(r.msg_len <= 0xFFFF for r in replies)


# --- flow and group semantics (OVS 3.1) -------------------------------------------------------

def test_add_replaces_the_same_flow_and_keeps_its_counters_like_ovs(switch, sink):
    dp = switch.datapath
    flow = drop_flow("10.0.0.66")
    send(switch, flow_mod(dp, flow, "add"))
    barrier(switch, sink)
    assert switch.trace(CLIENT_PORT, count=True, length=100, eth_dst=MAC, eth_type=0x0800,
                        ipv4_src="10.0.0.66").verdict == "drop"
    again = Flow(flow.table, flow.priority, flow.match, (("output", 3),), flow.cookie + 1)
    send(switch, flow_mod(dp, again, "add"))
    (stat,) = flow_stats(switch, sink)
    assert (stat.packet_count, stat.byte_count, stat.cookie) == (1, 100, flow.cookie + 1)
    reset = flow_mod(dp, again, "add")
    reset.flags = ofp.OFPFF_RESET_COUNTS
    send(switch, reset)
    assert flow_stats(switch, sink)[0].packet_count == 0


def test_a_fully_masked_field_is_the_exact_match(switch, sink):
    dp = switch.datapath
    exact = drop_flow("10.0.0.66")
    masked = Flow(0, 3000, (("eth_dst", (MAC, "ff:ff:ff:ff:ff:ff")), ("eth_type", 0x0800),
                            ("ipv4_src", ("10.0.0.66", "255.255.255.255"))), (("output", 3),), exact.cookie)
    send(switch, flow_mod(dp, exact, "add"), flow_mod(dp, masked, "modify"))
    (stat,) = flow_stats(switch, sink)
    assert dict(stat.match.items()) == {"eth_dst": MAC, "eth_type": 0x0800, "ipv4_src": "10.0.0.66"}
    assert encoded_actions(dp, stat.instructions) == encoded_actions(dp, instructions(dp, masked.actions))


def test_delete_by_cookie_in_every_table_leaves_other_cookies(switch, sink):
    config = compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS)
    install(switch, config)
    dp = switch.datapath
    send(switch, parser.OFPFlowMod(dp, cookie=cookie_of(MAC), cookie_mask=0xFFFFFFFFFFFFFFFF, table_id=ofp.OFPTT_ALL,
                                   command=ofp.OFPFC_DELETE, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
                                   match=parser.OFPMatch()))
    assert {s.cookie for s in flow_stats(switch, sink)} == {BASE_COOKIE, port_cookie(0)}
    assert switch.flow_count() == len(base_config(NEIGHBOURS).flows)


def test_strict_delete_and_modify_touch_one_flow(switch, sink):
    dp = switch.datapath
    low, high = drop_flow("10.0.0.66", 100), drop_flow("10.0.0.66", 200)
    send(switch, flow_mod(dp, low, "add"), flow_mod(dp, high, "add"))
    changed = Flow(0, 200, high.match, (("normal",),), high.cookie)
    send(switch, flow_mod(dp, changed, "modify"), flow_mod(dp, low, "delete"))
    barrier(switch, sink)
    assert [(e.table, e.priority) for e in switch.flows()] == [(0, 200)]
    assert switch.trace(1, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.0.0.66").verdict == "normal"


def test_delete_by_out_port_and_loose_match(switch, sink):
    dp = switch.datapath
    to_three = Flow(0, 10, (("eth_type", 0x0800), ("ipv4_src", "10.0.0.1")), (("output", 3),), 1)
    to_four = Flow(0, 10, (("eth_type", 0x0800), ("ipv4_src", "10.0.0.2")), (("output", 4),), 1)
    other = Flow(0, 10, (("eth_type", 0x0806),), (("output", 3),), 1)
    send(switch, *[flow_mod(dp, f, "add") for f in (to_three, to_four, other)])
    send(switch, parser.OFPFlowMod(dp, table_id=0, command=ofp.OFPFC_DELETE, out_port=3, out_group=ofp.OFPG_ANY,
                                   match=parser.OFPMatch(eth_type=0x0800)))
    switch.settle()
    assert {dict(e.ofp_match().items()).get("ipv4_src") for e in switch.flows()} == {"10.0.0.2", None}
    assert [type(m) for m in switch.received] == [parser.OFPFlowMod] * 4


def test_groups_exist_before_flows_use_them(switch, sink):
    config = compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS)
    dp = switch.datapath
    group = min(config.groups)
    user = next(f for f in config.flows if f.actions == (("group", group.group_id),))
    too_early = flow_mod(dp, user, "add")
    add_flow, _, again, modify_missing = send(
        switch, too_early, group_mod(dp, group, "add"), group_mod(dp, group, "add"),
        group_mod(dp, type(group)(group.group_id + 1, group.buckets), "modify"))
    barrier(switch, sink)
    assert [(e.xid, e.type, e.code) for e in sink.errors()] == [
        (add_flow, ofp.OFPET_BAD_ACTION, ofp.OFPBAC_BAD_OUT_GROUP),
        (again, ofp.OFPET_GROUP_MOD_FAILED, ofp.OFPGMFC_GROUP_EXISTS),
        (modify_missing, ofp.OFPET_GROUP_MOD_FAILED, ofp.OFPGMFC_UNKNOWN_GROUP)]
    assert sink.errors()[0].data == bytes(too_early.buf[:64])   # as OVS: the request's first 64 bytes
    send(switch, flow_mod(dp, user, "add"), group_mod(dp, group.group_id, "delete"))
    barrier(switch, sink)
    assert switch.flow_count() == 0 and switch.groups == {}   # the group took its flow with it


def test_a_match_without_its_prerequisite_is_refused(switch, sink):
    dp = switch.datapath
    (xid,) = send(switch, flow_mod(dp, Flow(0, 10, (("ipv4_src", "10.0.0.1"),), (), 1), "add"))
    barrier(switch, sink)
    assert [(e.xid, e.type, e.code) for e in sink.errors()] == [(xid, ofp.OFPET_BAD_MATCH, ofp.OFPBMC_BAD_PREREQ)]
    assert switch.flow_count() == 0


# --- bundles ----------------------------------------------------------------------------------

def bundle(switch, bundle_id: int, messages, commit: bool = True) -> dict:
    """Open, add, commit; returns the xids by role."""
    dp = switch.datapath
    ctrl = lambda kind: parser.ONFBundleCtrlMsg(dp, bundle_id, kind, ofp.ONF_BF_ATOMIC, [])  # noqa: E731
    (opened,) = send(switch, ctrl(ofp.ONF_BCT_OPEN_REQUEST))
    added = []
    for message in messages:
        dp.set_xid(message)
        add = parser.ONFBundleAddMsg(dp, bundle_id, ofp.ONF_BF_ATOMIC, message, [])
        add.set_xid(message.xid)
        assert dp.send_msg(add)
        added.append(add.xid)
    committed = send(switch, ctrl(ofp.ONF_BCT_COMMIT_REQUEST))[0] if commit else None
    return {"open": opened, "added": added, "commit": committed}


def test_a_bundle_is_applied_whole(switch, sink):
    config = compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS)
    dp = switch.datapath
    xids = bundle(switch, 7, [group_mod(dp, g, "add") for g in sorted(config.groups)]
                  + [flow_mod(dp, f, "add") for f in config.flows])
    wait_until(lambda: sink.replies(xids["commit"]))
    (reply,) = sink.replies(xids["commit"])
    assert isinstance(reply, parser.ONFBundleCtrlMsg) and (reply.type, reply.bundle_id, reply.flags) == (
        ofp.ONF_BCT_COMMIT_REPLY, 7, 0)
    assert sink.replies(xids["open"])[0].type == ofp.ONF_BCT_OPEN_REPLY
    assert reported(dp, flow_stats(switch, sink)) == comparable(dp, config.flows)


def test_a_bundle_with_one_bad_message_changes_nothing(switch, sink):
    dp = switch.datapath
    kept = drop_flow("10.0.0.1")
    send(switch, flow_mod(dp, kept, "add"))
    bad = flow_mod(dp, Flow(0, 10, (("eth_type", 0x0800),), (("group", 99),), 1), "add")
    xids = bundle(switch, 8, [flow_mod(dp, drop_flow("10.0.0.2"), "add"), flow_mod(dp, kept, "delete"), bad])
    wait_until(lambda: sink.replies(xids["commit"]))
    inner_error, commit_error = sink.errors()
    assert (inner_error.xid, inner_error.type, inner_error.code) == (
        xids["added"][2], ofp.OFPET_BAD_ACTION, ofp.OFPBAC_BAD_OUT_GROUP)
    assert (commit_error.xid, commit_error.type, commit_error.exp_type, commit_error.experimenter) == (
        xids["commit"], ofp.OFPET_EXPERIMENTER, OFPBFC_MSG_FAILED, ONF)
    assert [e.match for e in switch.flows()] == [canonical(parser.OFPMatch(**dict(kept.match)))]


def test_bundle_misuse_is_answered_with_bundle_errors(switch, sink):
    dp = switch.datapath
    commit_unknown, discard_unknown = send(
        switch, parser.ONFBundleCtrlMsg(dp, 5, ofp.ONF_BCT_COMMIT_REQUEST, ofp.ONF_BF_ATOMIC, []),
        parser.ONFBundleCtrlMsg(dp, 5, ofp.ONF_BCT_DISCARD_REQUEST, ofp.ONF_BF_ATOMIC, []))
    xids = bundle(switch, 6, [flow_mod(dp, drop_flow("10.0.0.3"), "add")], commit=False)
    (discarded,) = send(switch, parser.ONFBundleCtrlMsg(dp, 6, ofp.ONF_BCT_DISCARD_REQUEST, ofp.ONF_BF_ATOMIC, []))
    barrier(switch, sink)
    assert [(e.xid, e.exp_type) for e in sink.errors()] == [(commit_unknown, OFPBFC_BAD_ID),
                                                            (discard_unknown, OFPBFC_BAD_ID)]
    assert sink.replies(discarded)[0].type == ofp.ONF_BCT_DISCARD_REPLY and xids["added"]
    assert switch.flow_count() == 0


def test_fail_next_commit_and_refuse(switch, sink):
    dp = switch.datapath
    switch.fail_next_commit()
    first = bundle(switch, 1, [flow_mod(dp, drop_flow("10.0.0.1"), "add")])
    switch.refuse(lambda m: isinstance(m, parser.OFPFlowMod) and m.priority == 77)
    refused, accepted = send(switch, flow_mod(dp, drop_flow("10.0.0.2", 77), "add"),
                             flow_mod(dp, drop_flow("10.0.0.2", 77), "add"))
    barrier(switch, sink)
    assert [(e.xid, e.type, e.exp_type if e.type == ofp.OFPET_EXPERIMENTER else e.code) for e in sink.errors()] == [
        (first["commit"], ofp.OFPET_EXPERIMENTER, OFPBFC_TIMEOUT),
        (refused, ofp.OFPET_FLOW_MOD_FAILED, ofp.OFPFMFC_UNKNOWN)]
    assert [e.priority for e in switch.flows()] == [77] and accepted


# --- ordering and faults ----------------------------------------------------------------------

def test_barrier_reply_comes_after_everything_sent_before_it(switch, sink):
    dp = switch.datapath
    switch.hold()
    flows = [drop_flow(f"10.0.1.{i}") for i in range(50)]
    missing_group = flow_mod(dp, Flow(0, 1, (), (("group", 5),), 1), "add")
    xids = send(switch, *[flow_mod(dp, f, "add") for f in flows], missing_group, parser.OFPBarrierRequest(dp))
    with pytest.raises(TimeoutError):
        wait_until(lambda: sink, 0.05)   # held: nothing is processed or answered
    seen_at_reply = []
    switch.sink = lambda m: (seen_at_reply.append(switch.flow_count()), sink.append(m))
    switch.release()
    wait_until(lambda: sink.replies(xids[-1]))
    assert [type(m) for m in sink] == [parser.OFPErrorMsg, parser.OFPBarrierReply]
    assert seen_at_reply[-1] == 50 and sink[0].xid == xids[-2]


def test_echo_is_answered(switch, sink):
    (xid,) = send(switch, parser.OFPEchoRequest(switch.datapath, data=b"ping"))
    wait_until(lambda: sink.replies(xid))
    assert isinstance(sink[0], parser.OFPEchoReply) and sink[0].data == b"ping"
    assert sink[0].datapath is switch.datapath


def test_a_failing_sink_stops_no_later_delivery(switch, sink):
    def fragile(message):
        if not switch.sink_errors:
            raise RuntimeError("handler bug")
        sink(message)

    switch.sink = fragile
    first, second = send(switch, parser.OFPEchoRequest(switch.datapath), parser.OFPEchoRequest(switch.datapath))
    wait_until(lambda: sink.replies(second))
    assert [m.xid for m in sink] == [second] and str(switch.sink_errors[0]) == "handler bug" and first


def test_disconnect_stops_everything_and_reconnect_keeps_the_flows(switch, sink):
    dp = switch.datapath
    send(switch, flow_mod(dp, drop_flow("10.0.0.1"), "add"))
    barrier(switch, sink)
    before = len(sink)
    switch.disconnect()
    assert not switch.connected and not dp.send_msg(parser.OFPBarrierRequest(dp))
    new = switch.reconnect()
    assert new is switch.datapath and new is not dp and switch.connected
    wait_until(lambda: len(sink) > before)
    assert isinstance(sink[-1], parser.OFPSwitchFeatures) and sink[-1].datapath_id == 1
    assert len(flow_stats(switch, sink)) == 1 and not dp.send_msg(parser.OFPBarrierRequest(dp))


def test_clear_flows_is_silent_and_ports_come_and_go(switch, sink):
    dp = switch.datapath
    send(switch, flow_mod(dp, drop_flow("10.0.0.1"), "add"))
    barrier(switch, sink)
    switch.clear_flows()
    assert switch.flow_count() == 0 and not sink.errors()
    switch.remove_port(3)
    switch.add_port(9)
    wait_until(lambda: len([m for m in sink if isinstance(m, parser.OFPPortStatus)]) == 2)
    statuses = [(m.reason, m.desc.port_no) for m in sink if isinstance(m, parser.OFPPortStatus)]
    assert statuses == [(ofp.OFPPR_DELETE, 3), (ofp.OFPPR_ADD, 9)]
    ports = request(switch, sink, parser.OFPPortDescStatsRequest(dp, 0))
    assert [p.port_no for p in ports] == [1, 2, 4, 9]


def test_unknown_messages_get_bad_type(switch, sink):
    (xid,) = send(switch, parser.OFPGetConfigRequest(switch.datapath))
    barrier(switch, sink)
    assert [(e.xid, e.type, e.code) for e in sink.errors()] == [(xid, ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_BAD_TYPE)]


# --- trace ------------------------------------------------------------------------------------

def test_trace_drops_filtered_traffic_and_passes_the_rest(switch, sink):
    install(switch, compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS))
    barrier(switch, sink)
    attack = switch.trace(CLIENT_PORT, count=True, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.66.3.4",
                          ipv4_dst="10.0.0.100")
    assert attack.verdict == "drop" and attack.path == [(0, 0, port_cookie(0)), (1, 3000, cookie_of(MAC))]
    telnet = switch.trace(CLIENT_PORT, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.1.1.1", ip_proto=6,
                          tcp_src=1500, tcp_dst=80)
    assert telnet.verdict == "drop"
    other = switch.trace(CLIENT_PORT, eth_dst="02:00:00:00:00:99", eth_type=0x0800, ipv4_src="10.66.3.4")
    assert other.verdict == "normal" and other.path == [(0, 0, port_cookie(0)), (1, 0, BASE_COOKIE)]
    counted = [s for s in flow_stats(switch, sink, cookie_of(MAC), 0xFFFFFFFFFFFFFFFF) if s.packet_count]
    assert [(s.priority, s.packet_count, s.byte_count) for s in counted] == [(3000, 1, 64)]


def test_trace_follows_a_redirect_through_conntrack_and_the_group(switch, sink):
    install(switch, compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS))
    barrier(switch, sink)
    fields = dict(eth_dst=MAC, eth_type=0x0800, ipv4_src="10.1.1.1", ipv4_dst="10.0.0.100", ip_proto=6, tcp_dst=8080)
    for bucket, backend in enumerate(("10.0.0.5", "10.0.0.6")):
        new = switch.trace(CLIENT_PORT, bucket=bucket, **fields)
        where = NEIGHBOURS.neighbours[backend]
        assert (new.verdict, new.ports) == ("output", [where.port])
        assert new.fields["ipv4_dst"] == backend and new.fields["eth_dst"] == where.mac
        assert new.fields["ct_mark"] == CLIENT_PORT and [t for t, _, _ in new.path] == [0, 1, 2, 3]
    backend = NEIGHBOURS.neighbours["10.0.0.5"]
    reply = switch.trace(backend.port, ct_state=0x2A, ct_mark=CLIENT_PORT, eth_type=0x0800, eth_src=backend.mac,
                         ipv4_src="10.0.0.5", ipv4_dst="10.1.1.1")
    assert (reply.verdict, reply.ports) == ("output", [CLIENT_PORT])


def test_an_arp_host_answers_probes_through_the_controller_flow(switch, sink):
    """The controller's backend resolver: a probe by packet-out, the reply by packet-in,
    but only while the ARP capture flow is there."""
    from os_ken.lib.packet import arp, ethernet, packet

    dp = switch.datapath
    switch.add_host("10.0.0.5", "02:00:00:00:00:05", 15)
    frame = packet.Packet()
    frame.add_protocol(ethernet.ethernet(dst="ff:ff:ff:ff:ff:ff", src="02:4d:42:00:00:01", ethertype=0x0806))
    frame.add_protocol(arp.arp(opcode=arp.ARP_REQUEST, src_mac="02:4d:42:00:00:01", src_ip="0.0.0.0",
                               dst_mac="00:00:00:00:00:00", dst_ip="10.0.0.5"))
    frame.serialize()
    probe = lambda: parser.OFPPacketOut(dp, ofp.OFP_NO_BUFFER, ofp.OFPP_CONTROLLER,  # noqa: E731
                                        [parser.OFPActionOutput(ofp.OFPP_FLOOD)], frame.data)
    send(switch, probe())
    barrier(switch, sink)
    assert not [m for m in sink if isinstance(m, parser.OFPPacketIn)]
    send(switch, *[flow_mod(dp, f, "add") for f in base_config(NEIGHBOURS).flows], probe())
    wait_until(lambda: [m for m in sink if isinstance(m, parser.OFPPacketIn)])
    (packet_in,) = [m for m in sink if isinstance(m, parser.OFPPacketIn)]
    answer = packet.Packet(packet_in.data).get_protocol(arp.arp)
    assert (answer.src_ip, answer.src_mac, packet_in.match["in_port"]) == ("10.0.0.5", "02:00:00:00:00:05", 15)
    assert (packet_in.reason, packet_in.cookie) == (ofp.OFPR_ACTION, BASE_COOKIE)


# --- the fake against a real ovs-vswitchd -----------------------------------------------------

class OVSConnection:
    """A raw OpenFlow 1.3 connection to a bridge's management socket: the same bytes the
    fake gets go to the real switch, and its answers are parsed by os-ken the same way."""

    def __init__(self, path: str):
        import socket
        from types import SimpleNamespace

        self.datapath = SimpleNamespace(ofproto=ofp, ofproto_parser=parser, id=1, xid=0)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.sock.sendall(bytes(self._serialised(parser.OFPHello(self.datapath))))

    def close(self) -> None:
        self.sock.close()

    def _serialised(self, message) -> bytearray:
        self.datapath.xid += 1
        message.set_xid(self.datapath.xid)
        message.serialize()
        return message.buf

    def exchange(self, messages) -> tuple[list[int], list]:
        """Send, then a barrier; the xids sent and every answer up to the barrier's reply."""
        xids = []
        for message in messages:
            self.sock.sendall(bytes(self._serialised(message)))
            xids.append(message.xid)
        self.sock.sendall(bytes(self._serialised(parser.OFPBarrierRequest(self.datapath))))
        answers = []
        while not answers or not isinstance(answers[-1], parser.OFPBarrierReply):
            answer = self._read()
            if not isinstance(answer, (parser.OFPHello, parser.OFPEchoRequest)):
                answers.append(answer)
        return xids, answers[:-1]

    def _read(self):
        from os_ken.ofproto import ofproto_parser

        head = self._exactly(ofp.OFP_HEADER_SIZE)
        version, msg_type, length, xid = ofproto_parser.header(head)
        data = head + self._exactly(length - ofp.OFP_HEADER_SIZE)
        return ofproto_parser.msg(self.datapath, version, msg_type, length, xid, data)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "ovs-vswitchd closed the connection"
            data += chunk
        return data


def fake_exchange(switch, sink, messages) -> tuple[list[int], list]:
    before = len(sink)
    xids = send(switch, *messages)
    barrier(switch, sink)
    return xids, sink[before:-1]


def in_bundle(datapath, bundle_id: int, messages) -> list:
    """Open, the messages (each takes its add message's xid when serialised), commit."""
    ctrl = lambda kind: parser.ONFBundleCtrlMsg(datapath, bundle_id, kind, ofp.ONF_BF_ATOMIC, [])  # noqa: E731
    adds = [parser.ONFBundleAddMsg(datapath, bundle_id, ofp.ONF_BF_ATOMIC, m, []) for m in messages]
    return [ctrl(ofp.ONF_BCT_OPEN_REQUEST), *adds, ctrl(ofp.ONF_BCT_COMMIT_REQUEST)]


def scenario(datapath) -> list[list]:
    """Steps that exercise what the fake models, each answered and then read back."""
    config = compile_switch(state_of(*COMMANDS), 1, NEIGHBOURS)
    group = min(config.groups)
    loose_delete = parser.OFPFlowMod(datapath, table_id=ofp.OFPTT_ALL, command=ofp.OFPFC_DELETE,
                                     out_port=3, out_group=ofp.OFPG_ANY, match=parser.OFPMatch(eth_type=0x0800))
    return [
        in_bundle(datapath, 1, [group_mod(datapath, g, "add") for g in sorted(config.groups)]
                  + [flow_mod(datapath, f, "add") for f in sorted(config.flows, key=repr)]),
        in_bundle(datapath, 2, [flow_mod(datapath, drop_flow("10.0.0.2"), "add"),
                                flow_mod(datapath, Flow(0, 10, (("eth_type", 0x0800),), (("group", 99),), 1), "add")]),
        [flow_mod(datapath, Flow(0, 10, (("eth_type", 0x0800),), (("group", 98),), 1), "add"),
         group_mod(datapath, group, "add"),
         group_mod(datapath, type(group)(group.group_id + 1, group.buckets), "modify"),
         flow_mod(datapath, Flow(0, 10, (("ipv4_src", "10.0.0.1"),), (), 1), "add"),
         flow_mod(datapath, Flow(0, 5, (("eth_type", 0x0800), ("ipv4_src", "10.0.0.3")), (("output", 3),), 2), "add"),
         flow_mod(datapath, Flow(0, 5, (("eth_type", 0x0800), ("ipv4_src", "10.0.0.4")), (("output", 4),), 2), "add")],
        [loose_delete, group_mod(datapath, group.group_id, "delete")],
    ]


def summary(answers) -> list:
    """Answers as comparable tuples: errors by xid, type and code; replies by class and xid."""
    def one(answer):
        if isinstance(answer, parser.OFPErrorMsg):
            code = answer.exp_type if answer.type == ofp.OFPET_EXPERIMENTER else answer.code
            return ("error", answer.xid, answer.type, code)
        return (type(answer).__name__, answer.xid, getattr(answer, "type", None))
    return [one(a) for a in answers]


def described(groups) -> list:
    """Group descriptions with their buckets as wire bytes (weights, watches and actions)."""
    return [(g.group_id, g.type, [serialized(b) for b in g.buckets]) for g in groups]


@pytest.mark.host
def test_the_fake_answers_and_holds_what_a_real_ovs_vswitchd_does():
    """The same messages to a private ovs-vswitchd (its management socket) and to the fake:
    the same errors in the same order, the same flows and groups read back, and
    ``ovs-ofctl dump-flows`` lists as many flows as the fake holds."""
    from mbvisor.topologies import netlab
    from mbvisor.topologies.private_switch import PrivateSwitch

    netlab.require_host_tools()
    sink = Sink()
    with PrivateSwitch() as private, netlab.Lab() as lab, FakeSwitch(1, sink=sink) as fake:
        bridge = lab.bridge()
        ovs = OVSConnection(str(private.directory / f"{bridge.name}.mgmt"))
        try:
            for ovs_step, fake_step in zip(scenario(ovs.datapath), scenario(fake.datapath)):
                ovs.datapath.xid = fake.datapath.xid   # the same xids, so the answers compare
                _, ovs_answers = ovs.exchange(ovs_step)
                _, fake_answers = fake_exchange(fake, sink, fake_step)
                assert summary(fake_answers) == summary(ovs_answers)
                read = [parser.OFPFlowStatsRequest(ovs.datapath, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY, 0, 0,
                                                   parser.OFPMatch()), parser.OFPGroupDescStatsRequest(ovs.datapath, 0)]
                _, (ovs_flows, ovs_groups) = ovs.exchange(read)
                assert reported(fake.datapath, flow_stats(fake, sink)) == reported(ovs.datapath, ovs_flows.body)
                fake_groups = request(fake, sink, parser.OFPGroupDescStatsRequest(fake.datapath, 0))
                assert described(fake_groups) == described(ovs_groups.body)
            assert len(bridge.dump_flows(no_stats=True)) == fake.flow_count() > 0
        finally:
            ovs.close()
