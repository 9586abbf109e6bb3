"""Unit tests of the firewall-filter compiler (``mbvisor.controller.filters``): no bypass by
group frames, fragments or a second VLAN tag, and port-range products as conjunctions.
Pure: no switch.  The same flows on a real OVS: tests/test_filters_ovs.py."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.controller import filters as F
from mbvisor.controller import flows as flows_module
from mbvisor.controller.filters import (FRAGMENT, GROUP, NOT_FRAGMENT, compile_filters, conjunction_id,
                                        filter_matches, fragment_zone)
from mbvisor.controller.model import Middlebox
from mbvisor.controller.ofmessages import encode_action, flow_mod
from mbvisor.controller.pipeline import FILTER, FILTER_CONJUNCTION, FRAGMENT_TABLE, OFFLOAD_TABLE
from mbvisor.guest import fields as kinds
from mbvisor.guest.grammar import parse_command

MAC = "52:34:56:00:12:22"
V4, V6 = F.ETH_IPV4, F.ETH_IPV6
OWN = frozenset({"10.0.0.5", "fd00::5"})


def middlebox(*filters: str, zone: int = 5) -> Middlebox:
    return Middlebox(1, 3, MAC, zone, "10.0.0.5",
                     filters=frozenset(parse_command(f"A {MAC} {text}").filter for text in filters))


def fields(flow) -> dict:
    return dict(flow.match)


def offload(flows, priority=FILTER) -> list[dict]:
    return [fields(f) for f in flows if f.table == OFFLOAD_TABLE and f.priority == priority]


# --- broadcast and multicast (issue 11, item 4) -------------------------------------------------

def test_an_ip_filter_also_drops_group_frames_for_the_middlebox_own_address_only():
    flows = compile_filters(middlebox("I 4 s 10.66.0.0/16"), OWN)
    drops = offload(flows)
    assert {"eth_dst": MAC, "eth_type": V4, "ipv4_src": ("10.66.0.0", "255.255.0.0")} in drops
    group = [d for d in drops if d["eth_dst"] == GROUP and d.get("eth_type") == V4]
    assert group == [{"eth_dst": GROUP, "eth_type": V4, "ipv4_src": ("10.66.0.0", "255.255.0.0"),
                      "ipv4_dst": "10.0.0.5"}]
    # Every flow of the middlebox: its MAC, or a group frame carrying one of its addresses.
    for flow in flows:
        match = fields(flow)
        if flow.table == OFFLOAD_TABLE:
            assert match["eth_dst"] == MAC or match.get("ipv4_dst") in OWN or match.get("ipv6_dst") in OWN


def test_a_destination_prefix_is_intersected_with_the_own_addresses():
    inside = offload(compile_filters(middlebox("I 8 d 10.0.0.0/24"), OWN))
    assert [d["ipv4_dst"] for d in inside if d["eth_dst"] == GROUP] == ["10.0.0.5"]
    disjoint = offload(compile_filters(middlebox("I 8 d 10.9.0.0/16"), OWN))
    assert [d for d in disjoint if d["eth_dst"] == GROUP] == []


def test_without_own_addresses_there_is_no_group_form():
    assert all(fields(f)["eth_dst"] != GROUP for f in compile_filters(middlebox("I 1 p udp"), frozenset())
               if "eth_dst" in fields(f))


@pytest.mark.parametrize("text, families", [("M 4 s aa:bb:cc:dd:ee:ff", {V4, V6}), ("M 1 p ipv4", {V4}),
                                             ("M 1 p ipv6", {V6}), ("M 1 p arp", set()), (f"M 8 d {MAC}", set())])
def test_mac_filters_get_group_forms_only_for_ip(text, families):
    group = [d for d in offload(compile_filters(middlebox(text), OWN)) if d["eth_dst"] == GROUP]
    assert {d["eth_type"] for d in group} == families


# --- fragments (item 5) ------------------------------------------------------------------------

def test_port_filters_see_unfragmented_packets_only_and_fragments_go_through_conntrack():
    mb = middlebox("T 9 d 23 p tcp")
    flows = compile_filters(mb, OWN)
    for drop in offload(flows):
        if "tcp_dst" in drop:
            assert drop["ip_frag"] == NOT_FRAGMENT
    zone = fragment_zone(mb)
    assert zone == 0x8005
    to_conntrack = [f for f in flows if f.actions == (("ct_commit", zone, FRAGMENT_TABLE),)]
    assert {(fields(f)["eth_type"], fields(f)["eth_dst"], fields(f)["ip_proto"], fields(f)["ip_frag"])
            for f in to_conntrack} == {
        (V4, MAC, 6, FRAGMENT), (V6, MAC, 6, FRAGMENT), (V4, GROUP, 6, FRAGMENT), (V6, GROUP, 6, FRAGMENT),
        # IPv6 fragments after the first name no protocol (OVS reports the fragment header's, 44)
        (V6, MAC, 44, F.LATER_FRAGMENT), (V6, GROUP, 44, F.LATER_FRAGMENT)}
    for flow in to_conntrack:
        assert flow.priority == FILTER_CONJUNCTION
        assert fields(flow)["ct_state"] == (0, 0x20)  # untracked only: resumed fragments never loop
    table4 = {f.match: f.actions for f in flows if f.table == FRAGMENT_TABLE}
    assert table4[(("ct_state", (0x30, 0x30)), ("ct_zone", zone))] == ()
    assert table4[(("ct_zone", zone),)] == (("resubmit", OFFLOAD_TABLE),)
    firsts = [dict(m) for m, a in table4.items() if "ct_tp_dst" in dict(m)]
    assert sorted(m["eth_type"] for m in firsts) == [V4, V6]
    assert all(m["ct_tp_dst"] == 23 and m["ct_nw_proto"] == 6 and m["ip_frag"] == F.FIRST_FRAGMENT for m in firsts)


def test_no_fragment_path_without_port_filters():
    flows = compile_filters(middlebox("I 4 s 10.66.0.0/16"), OWN)
    assert not [f for f in flows if f.table == FRAGMENT_TABLE or f.priority == FILTER_CONJUNCTION]


def test_fragments_of_every_filtered_protocol_and_only_those():
    flows = compile_filters(middlebox("T 8 d 53"), OWN)
    later = F.IPV6_FRAGMENT_HEADER
    assert {fields(f)["ip_proto"] for f in flows if f.actions and f.actions[0][0] == "ct_commit"} == {6, 17, 132, later}
    flows = compile_filters(middlebox("T 9 d 53 p udp"), OWN)
    assert {fields(f)["ip_proto"] for f in flows if f.actions and f.actions[0][0] == "ct_commit"} == {17, later}


# --- QinQ and M p vlan (item 6) -----------------------------------------------------------------

@pytest.mark.parametrize("text", ["I 1 p tcp", "T 9 d 80 p tcp"])
def test_double_tagged_frames_are_dropped_for_a_middlebox_with_ip_or_port_filters(text):
    drops = offload(compile_filters(middlebox(text), OWN))
    assert {"eth_dst": MAC, "eth_type": 0x8100} in drops and {"eth_dst": MAC, "eth_type": 0x88A8} in drops


def test_mac_filters_alone_add_no_qinq_drop():
    assert not [d for d in offload(compile_filters(middlebox("M 1 p arp"), OWN)) if d.get("eth_type") == 0x8100]


@pytest.mark.parametrize("text", ["M 1 p vlan", "M 1 p 0x88a8"])
def test_m_p_vlan_means_tagged(text):
    (match,) = filter_matches(parse_command(f"A {MAC} {text}").filter)
    assert match["eth_type"] is None and match["vlan_vid"] == (0x1000, 0x1000)


# --- conjunctions (item 10) ---------------------------------------------------------------------

def test_a_range_product_costs_its_sum():
    flows = compile_filters(middlebox("T 13 s 1025-65534 d 1-65534 p tcp"), frozenset({"10.0.0.5"}))
    sources, destinations = len(F._port_masks((1025, 65534))), len(F._port_masks((1, 65534)))
    # Offload table: to the MAC (v4, v6) and the group form (v4); fragment table: v4, v6.
    bases = 5
    assert len(flows) < 400 < bases * sources * destinations
    conj = conjunction_id(middlebox(), 0)
    clauses = [f for f in flows if f.actions and f.actions[0][0] == "conjunction"]
    assert len(clauses) == bases * (sources + destinations)
    assert {a for f in clauses for a in f.actions} == {("conjunction", conj, 1, 2), ("conjunction", conj, 2, 2)}
    ends = [f for f in flows if "conj_id" in fields(f)]
    assert {(f.table, f.priority, f.actions) for f in ends} == {(OFFLOAD_TABLE, FILTER_CONJUNCTION, ()),
                                                                 (FRAGMENT_TABLE, FILTER_CONJUNCTION, ())}


def test_small_products_stay_plain():
    flows = compile_filters(middlebox("T 13 s 1-3 d 1-3 p tcp"), OWN)  # 2 x 2 < 2 + 2 + 1
    assert not [f for f in flows if "conj_id" in fields(f) or f.priority == FILTER_CONJUNCTION and f.table == 4]


def test_shared_clauses_are_one_flow_with_every_conjunction():
    mb = middlebox("T 13 s 1025-65534 d 1-65534 p tcp", "T 13 s 1025-65534 d 1-1000 p tcp")
    flows = compile_filters(mb, OWN)
    identities = [(f.table, f.priority, f.match) for f in flows]
    assert len(identities) == len(set(identities))
    shared = [f for f in flows if len(f.actions) == 2]
    assert shared and all({a[1] for a in f.actions} == {conjunction_id(mb, 0), conjunction_id(mb, 1)} for f in shared)


def test_conjunction_ids_follow_the_set_of_filters_not_their_order():
    texts = ["T 13 s 1025-65534 d 1-65534 p tcp", "T 13 s 2000-60000 d 3-50000 p udp"]
    a = compile_filters(middlebox(*texts), OWN)
    b = compile_filters(middlebox(*reversed(texts)), OWN)
    assert a == b
    other_zone = compile_filters(middlebox(*texts, zone=6), OWN)
    ids = {a_[1] for f in a for a_ in f.actions if a_[0] == "conjunction"}
    assert ids.isdisjoint({a_[1] for f in other_zone for a_ in f.actions if a_[0] == "conjunction"})
    assert all(i >> 16 == 5 for i in ids)


FAST = settings(max_examples=40, deadline=None)
ranges = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda p: tuple(sorted(p)))


@FAST
@given(ranges, ranges, st.integers(0, 65535), st.integers(0, 65535))
def test_offload_flows_drop_exactly_the_packets_in_both_ranges(source, destination, sport, dport):
    text = f"T 13 s {source[0]}-{source[1]} d {destination[0]}-{destination[1]} p tcp"
    flows = compile_filters(middlebox(text), frozenset())
    packet = {"eth_dst": MAC, "eth_type": V4, "ip_proto": 6, "ip_frag": 0, "tcp_src": sport, "tcp_dst": dport}
    assert _dropped(flows, packet) == (source[0] <= sport <= source[1] and destination[0] <= dport <= destination[1])


def _hits(match, packet) -> bool:
    for name, want in match:
        value, mask = want if isinstance(want, tuple) else (want, None)
        have = packet.get(name)
        if isinstance(value, int):
            if have is None or (have & mask if mask is not None else have) != value:
                return False
        elif have != value:
            return False
    return True


def _dropped(flows, packet) -> bool:
    """OpenFlow's table 1 as far as these flows go: plain drops, then conjunctions."""
    table = [f for f in flows if f.table == OFFLOAD_TABLE]
    if any(f.priority == FILTER and _hits(f.match, packet) for f in table):
        return True
    clauses: dict[int, set[int]] = {}
    for flow in table:
        if flow.priority == FILTER_CONJUNCTION and _hits(flow.match, packet):
            for kind, conj, clause, _ in (a for a in flow.actions if a[0] == "conjunction"):
                clauses.setdefault(conj, set()).add(clause)
    return any(c == {1, 2} for c in clauses.values())


# --- the fast path for IP and MAC filters (issue 12) --------------------------------------------

OWN_CHOICES = ["10.0.0.5", "10.0.0.6", "10.9.1.1", "fd00::5", "2001:db8::7"]
MAC_CHOICES = [MAC, "02:00:00:00:00:01"]


def ip_endpoints(version: int):
    """Canonical address or network text: a few that hold (or are) the own addresses, so
    group forms are narrowed by destinations, and any other."""
    known = {4: ["10.0.0.5", "10.0.0.0/24", "10.9.0.0/16", "0.0.0.0/0", "10.66.0.0/16"],
             6: ["fd00::5", "fd00::/64", "2001:db8::/32", "::/0", "2001:db8::1"]}[version]
    bits = 32 if version == 4 else 128
    drawn = st.tuples(st.ip_addresses(v=version), st.integers(0, bits)).map(
        lambda pair: kinds.IP_ENDPOINT.parse(str(ipaddress.ip_network(pair, strict=False))))
    return st.one_of(st.sampled_from(known), drawn)


@st.composite
def plain_filter_texts(draw, mac: str):
    """An IP or MAC filter as the grammar writes it: any subset of its fields."""
    if draw(st.booleans()):
        version = draw(st.sampled_from([4, 6]))
        choices = {"s": ip_endpoints(version), "d": ip_endpoints(version), "t": st.integers(0, 63).map(str),
                   "p": st.sampled_from(["tcp", "udp", "1", "58", "47"])}
        layer = "I"
    else:
        choices = {"s": st.sampled_from(["aa:bb:cc:dd:ee:ff", "aa:bb:cc:dd:ee:01", "02:00:00:00:00:02"]),
                   "d": st.just(mac), "t": st.integers(0, 7).map(str),
                   "p": st.sampled_from(["ipv4", "ipv6", "arp", "vlan", "0x88a8", "0x88cc"])}
        layer = "M"
    chosen = {letter: draw(values) for letter, values in choices.items() if draw(st.booleans())}
    if not chosen:
        chosen = {"s": draw(choices["s"])}
    mask = sum({"d": 8, "s": 4, "t": 2, "p": 1}[letter] for letter in chosen)
    return f"{layer} {mask} " + " ".join(f"{letter} {value}" for letter, value in chosen.items())


@st.composite
def plain_middleboxes(draw):
    mac = draw(st.sampled_from(MAC_CHOICES))
    texts = draw(st.lists(plain_filter_texts(mac), max_size=12))
    return Middlebox(1, 3, mac, draw(st.integers(1, 0x7FFF)), "10.0.0.5",
                     filters=frozenset(parse_command(f"A {mac} {text}").filter for text in texts))


@settings(max_examples=200, deadline=None)
@given(plain_middleboxes(), st.frozensets(st.sampled_from(OWN_CHOICES)))
def test_ip_and_mac_filters_compile_on_the_fast_path_to_exactly_the_general_flows(mb, own):
    assert F.compile_plain_filters(mb, own) == compile_filters(mb, own)


def test_the_fast_path_shares_one_pair_per_source_between_a_filters_flows():
    flows = F.compile_plain_filters(middlebox("I 4 s 10.66.0.0/16", "I 4 s 10.66.0.1"), OWN)
    sources = [pair for flow in flows for pair in flow.match if pair[0] == "ipv4_src"]
    assert len(sources) == 4 and len({id(pair) for pair in sources}) == 2


def test_the_fast_path_refuses_port_filters():
    with pytest.raises(ValueError, match="port filter"):
        F.compile_plain_filters(middlebox("I 4 s 10.66.0.0/16", "T 9 d 53 p udp"), OWN)


# --- encoding -----------------------------------------------------------------------------------

class _Datapath:
    from os_ken.ofproto import ofproto_v1_3 as ofproto, ofproto_v1_3_parser as ofproto_parser
    id = 1

    def set_xid(self, msg):
        msg.set_xid(1)


def test_every_compiled_flow_encodes():
    mb = middlebox("I 4 s 10.66.0.0/16", "M 1 p vlan", "T 13 s 1025-65534 d 1-65534 p tcp", "T 9 d 23 p tcp")
    for flow in compile_filters(mb, OWN):
        message = flow_mod(_Datapath(), flow, "add")
        message.serialize()


def test_conntrack_tuple_fields_use_ovs_numbers():
    """NXM_NX_CT_NW_PROTO (119) ... NXM_NX_CT_TP_DST (125) in NXM class 1 (ovs-fields(7)):
    the same headers ovs-ofctl 3.1 put on the wire for ``ct_nw_proto=6,ct_tp_dst=23``
    (``00 01 ee 01 06``, ``00 01 fa 02 00 17``, read from its own error dump)."""
    for name, number, value, wire in [("ct_nw_proto", 119, 6, "06"), ("ct_tp_src", 124, 1024, "0400"),
                                      ("ct_tp_dst", 125, 23, "0017")]:
        buf = bytearray()
        _Datapath.ofproto_parser.OFPMatch(**{name: value}).serialize(buf, 0)
        header = struct.pack("!HBB", 0x0001, number << 1, len(wire) // 2).hex()
        assert (header + wire) in buf.hex(), name


def test_conjunction_action_is_zero_based_on_the_wire():
    action = encode_action(_Datapath(), ("conjunction", 0x50000, 2, 2))
    buf = bytearray()
    action.serialize(buf, 0)
    assert struct.unpack_from("!BBI", buf, 10) == (1, 2, 0x50000)


@pytest.mark.parametrize("text", ["I 4 s 10.66.0.0/16", "I 4 s 10.1.2.3", "I 12 s 10.0.0.0/8 d 10.0.0.5",
                                  "I 4 s 2001:db8::/32", "I 5 s 2001:db8::1 p 58", "M 4 s aa:bb:cc:dd:ee:ff",
                                  "M 5 s 11:22:33:44:55:66 p ipv4", "T 12 s 1000-1999 d 80", "I 1 p tcp"])
def test_a_filters_cost_is_its_own_compiled_flows_whatever_its_source(text):
    """The budget counts a filter's shape (its source's family, not its value)."""
    filter = parse_command(f"A {MAC} {text}").filter
    alone = Middlebox(1, 5, MAC, 1, filters=frozenset({filter}))
    for addresses in (frozenset(), OWN):
        assert flows_module.filter_cost(filter, addresses) == len(compile_filters(alone, addresses))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["I 4 s 10.1.2.3", "I 4 s 2001:db8::/32", "I 5 s 10.0.0.0/8 p 6", "M 4 s aa:bb:cc:dd:ee:ff",
                        "M 5 s 11:22:33:44:55:66 p ipv6", "I 12 s 10.0.0.0/8 d 10.0.0.0/16", "I 8 d 10.0.0.5"]),
       st.frozensets(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), max_size=5))
def test_a_filters_cost_is_its_compiled_flows_whatever_the_middleboxs_addresses(text, addresses):
    """Without a destination only the number of own addresses of each family counts (the
    cost is shared between middleboxes); with one, which of them it holds."""
    filter = parse_command(f"A {MAC} {text}").filter
    alone = Middlebox(1, 5, MAC, 1, filters=frozenset({filter}))
    assert flows_module.filter_cost(filter, addresses) == len(compile_filters(alone, addresses))


COST_SHAPES = ["I 4 s 10.66.0.0/16", "I 4 s 10.1.2.3", "I 12 s 10.0.0.0/8 d 10.0.0.5", "I 4 s 2001:db8::/32",
               "I 5 s 2001:db8::1 p 58", "M 4 s aa:bb:cc:dd:ee:ff", "M 5 s 11:22:33:44:55:66 p ipv4",
               "T 12 s 1000-1999 d 80", "I 1 p tcp", "I 8 d 10.0.0.5", "M 12 s aa:bb:cc:dd:ee:01 d " + MAC]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(COST_SHAPES), max_size=12), st.sampled_from([frozenset(), OWN]))
def test_filters_cost_is_the_sum_of_their_costs(texts, addresses):
    filters = [parse_command(f"A {MAC} {text}").filter for text in texts]
    assert flows_module.filters_cost(filters, addresses) == sum(flows_module.filter_cost(f, addresses)
                                                                for f in filters)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), st.tuples(st.ip_addresses(v=6), st.integers(0, 128))))
def test_an_address_is_matched_as_ipaddress_reads_it(endpoint):
    """The compiler takes the grammar's canonical text apart without parsing it again:
    the match it gives is what ipaddress makes of the same network."""
    address, length = endpoint
    network = ipaddress.ip_network((address, length), strict=False)
    text = kinds.IP_ENDPOINT.parse(str(network))
    expected = (str(network.network_address) if network.prefixlen == network.max_prefixlen
                else (str(network.network_address), str(network.netmask)))
    assert F._address_match(text) == expected
    assert F._families(text) == [F.ETH_IPV4 if network.version == 4 else F.ETH_IPV6]
