"""Pre-packed flow mods (``controller/wire.py``) are byte for byte os-ken's own
(``ofmessages.flow_mod``), for every shape the compilers emit: port security, filters of
every layer (group forms, fragments, QinQ, conjunctions), redirects of both families,
health answers and the base flows; added, modified and deleted.  So are the bundle
frames around them (os-ken's ``ONFBundleAddMsg``)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakeswitch import FakeSwitch
from mbvisor.controller import wire
from mbvisor.controller.flows import Neighbour, Surroundings, compile_switch
from mbvisor.controller.model import Binding, State, apply
from mbvisor.controller.ofmessages import encoded_actions, flow_mod, instructions
from mbvisor.controller.trust import PortIdentity, TrustMode, build_inventory
from mbvisor.guest.grammar import parse_command

DPID = 0xA1
MB, MB6 = "02:00:00:00:00:02", "02:00:00:00:00:12"
PORTS = [PortIdentity(2, MB, "red", ips=("10.0.0.2", "fd00::2")), PortIdentity(12, MB6, "red", ips=("fd00::12",)),
         PortIdentity(3, "02:00:00:00:00:03", "red", ips=("10.0.0.3",)),
         PortIdentity(4, "02:00:00:00:00:04", "red", ips=("fd00::4",))]
COMMANDS = [(2, f"R F {MB} 10.0.0.2"), (2, f"A {MB} I 4 s 10.66.0.0/16"), (2, f"A {MB} I 1 p udp"),
            (2, f"A {MB} M 4 s aa:bb:cc:dd:ee:ff"), (2, f"A {MB} M 1 p vlan"), (2, f"A {MB} M 2 t 5"),
            (2, f"A {MB} T 12 s 1000-1999 d 80"), (2, f"A {MB} T 13 s 1025-65534 d 1-65534 p tcp"),
            (2, f"A {MB} I 8 d 2001:db8::/32"), (2, f"A {MB} T 3 t 46 p sctp"),
            (2, f"R L {MB} 10.0.0.2 0 * 10.0.0.3"), (12, f"R L {MB6} fd00::12 1 2001:db8:9::/48 fd00::4")]


def state(mode: TrustMode) -> tuple[State, Surroundings]:
    inventory = build_inventory(PORTS)
    result = State()
    for port, text in COMMANDS:
        result = apply(result, Binding(DPID, port, mode, inventory), parse_command(text)).state
    return result, Surroundings(mode, inventory, {"10.0.0.9": Neighbour("02:00:00:00:00:09", 9)})


FLAGS = 3  # ONF_BF_ATOMIC | ONF_BF_ORDERED
FRAME = wire.BundleFrame(0x01020304, FLAGS, 4242)


def _theirs(datapath, message) -> bytes:
    """``message`` in a bundle as os-ken frames it."""
    framed = datapath.ofproto_parser.ONFBundleAddMsg(datapath, FRAME.bundle_id, FRAME.flags, message, [])
    framed.set_xid(FRAME.xid)
    framed.serialize()
    return bytes(framed.buf)


@pytest.mark.parametrize("mode", list(TrustMode))
def test_every_compiled_flow_packs_to_os_kens_bytes(mode):
    """Framed for a bundle, added, modified and deleted, one at a time and many packed
    together."""
    config = compile_switch(*((lambda s, r: (s, DPID, r))(*state(mode))))
    shapes = {tuple(name for name, _ in flow.match) for flow in config.flows}
    assert len(shapes) > 40  # the test covers many shapes, not a few
    with FakeSwitch(DPID) as switch:
        datapath = switch.datapath
        flows = sorted(config.flows, key=repr)
        wired = lambda actions: encoded_actions(datapath, instructions(datapath, actions))
        for command in ("add", "modify", "delete"):
            theirs = [_theirs(datapath, flow_mod(datapath, flow, command)) for flow in flows]
            for flow, expected in zip(flows, theirs):
                assert FRAME.flow_mods(datapath.ofproto_parser, [flow], command, wired) == expected
            assert FRAME.flow_mods(datapath.ofproto_parser, flows, command, wired) == b"".join(theirs)


def test_a_bundle_frame_is_os_kens_own():
    """Any message (here a group mod) framed for a bundle (ONF experimenter header, bundle
    id, flags, the inner message with the frame's xid) is byte for byte what os-ken's
    ONFBundleAddMsg writes, as an os-ken message and as pre-packed bytes."""
    with FakeSwitch(DPID) as switch:
        datapath = switch.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        group = lambda: parser.OFPGroupMod(datapath, ofp.OFPGC_ADD, ofp.OFPGT_SELECT, 7,
                                           [parser.OFPBucket(actions=[parser.OFPActionOutput(3)])])
        theirs = _theirs(datapath, group())
        packed = group()
        packed.set_xid(9)
        packed.serialize()
        assert FRAME.wrap(group()) == theirs
        assert FRAME.wrap(bytes(packed.buf)) == theirs


def _networks(version: int):
    bits = 32 if version == 4 else 128
    return st.builds(lambda address, length: ipaddress.ip_network((address, length), strict=False),
                     st.ip_addresses(v=version), st.integers(0, bits))


def _value(network):
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return (str(network.network_address), str(network.netmask))


MACS = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.tuples(st.sampled_from(["ipv4_src", "ipv4_dst"]), _networks(4).map(_value)),
    st.tuples(st.sampled_from(["ipv6_src", "ipv6_dst"]), _networks(6).map(_value)),
    st.tuples(st.sampled_from(["eth_src", "eth_dst"]), st.one_of(MACS, st.tuples(MACS, MACS)))))
def test_fields_packed_without_os_ken_are_os_kens_bytes(field):
    """Addresses differ in every flow of a bulk, so they are packed here, not by os-ken
    (once per distinct value, that cost more than the rest of the flow): same bytes,
    same place in the match."""
    name, value = field
    with FakeSwitch(DPID) as switch:
        parser = switch.datapath.ofproto_parser
        assert wire._field(parser, name, value) == wire._encoded_field(parser, name, value)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ipv4_src", "ipv4_dst"]), _networks(4).map(_value)),
                min_size=1, max_size=3, unique_by=lambda pair: pair[0]))
def test_a_match_encodes_the_same_from_the_field_cache_and_after_it_is_cleared(fields):
    """match_bytes keeps each pair's TLV, and the joined TLVs of a match's shape, in
    bounded tables: hits, misses, and misses right after a full table was cleared give
    os-ken's own bytes."""
    match = tuple(sorted([("eth_type", 2048), *fields]))
    with FakeSwitch(DPID) as switch:
        parser = switch.datapath.ofproto_parser
        expected = bytearray()
        parser.OFPMatch(**dict(match)).serialize(expected, 0)
        wire._TLVS.clear()
        assert wire.match_bytes(parser, match) == bytes(expected)  # misses
        assert wire.match_bytes(parser, match) == bytes(expected)  # hits
        for table, size in ((wire._TLVS, wire.MAX_CACHED_TLVS), (wire._SHAPES, wire.MAX_CACHED_SHAPES)):
            table[parser] = {("filler", n): None for n in range(size)}
            assert wire.match_bytes(parser, match) == bytes(expected)  # a full table is cleared first
            assert ("filler", 0) not in table[parser] and 0 < len(table[parser]) <= len(match)


def test_match_bytes_keeps_every_field_when_two_share_os_ken_s_order():
    """Every experimenter OXM field (tcp_flags and pbb_uca in OpenFlow 1.3) has the
    experimenter id as its os-ken order key: ``_around`` keeps only the fields strictly
    before or after the last one's place, so a field tied with it vanishes from the match
    (and its length), and the tie is broken by TLV bytes rather than os-ken's stable order."""
    from os_ken.ofproto import ofproto_v1_3_parser as parser
    from mbvisor.controller.ofmessages import ofp_match

    for match in ((("pbb_uca", 1), ("tcp_flags", 2)), (("eth_type", 2048), ("tcp_flags", 2), ("pbb_uca", 1))):
        expected = bytearray()
        ofp_match(parser, match).serialize(expected, 0)
        assert wire.match_bytes(parser, match) == bytes(expected), match
