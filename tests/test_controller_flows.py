"""Unit tests of the pure flow compiler (``mbvisor.controller.flows``).

Middleboxes are built by applying parsed commands to a ``State``, so the compiler sees
exactly what the controller would give it.  No switch is involved."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.controller import flows as F
from mbvisor.controller.filters import (GROUP, VLAN_PRESENT, _port_masks, compile_filters, filter_matches,
                                        fragment_zone)
from mbvisor.controller.flows import (BASE_COOKIE, ETH_IPV4, ETH_IPV6, FILTER,
                                      OFFLOAD_TABLE, REDIRECT, REDIRECT_FROM_SOURCE, REDIRECT_REPLY,
                                      REDIRECT_TABLE, Flow, Neighbour, SwitchConfig, Surroundings,
                                      base_config, compile_added_filters, compile_middlebox, compile_redirects,
                                      compile_switch, cookie_of, ct_state, group_id, owned_groups)
from mbvisor.controller.pipeline import (BACKEND_ANSWER, ENTERED, FRAGMENT_TABLE, INGRESS_TABLE, NEIGHBOUR_DISCOVERY,
                                         STRAY, port_cookie)
from mbvisor.controller.pipeline import COOKIE_TAG, COOKIE_TAG_MASK
from mbvisor.controller.model import Binding, Middlebox, State, apply
from mbvisor.controller.trust import TrustMode
from mbvisor.guest.commands import Layer
from mbvisor.guest.grammar import parse_command

FAST = settings(max_examples=60, deadline=None)

MAC = "52:34:56:00:12:22"
MAC2 = "52:34:56:00:12:33"
HERE = Binding(1, 5)

# Backend IP -> where the controller's ARP resolution found it (MAC and switch port).
NEIGHBOURS = {f"10.0.0.{i}": Neighbour(f"02:00:00:00:00:{i:02x}", 10 + i) for i in range(1, 40)}
NEIGHBOURS |= {f"2001:db8::{i:x}": Neighbour(f"02:00:00:00:01:{i:02x}", 60 + i) for i in range(1, 40)}
LAB = Surroundings(neighbours=NEIGHBOURS)  # an unannotated lab: backends located by ARP


def build(*texts: str, state: State | None = None, binding: Binding = HERE) -> State:
    state = state if state is not None else State()
    for text in texts:
        state = apply(state, binding, parse_command(text)).state
    return state


def middlebox(*texts: str, mac: str = MAC) -> Middlebox:
    return build(*texts).find(1, mac)


def matches_of(text: str) -> list[tuple]:
    """``filter_matches`` of a filter given as command text, normalised (None fields dropped)."""
    return sorted((tuple(sorted((k, v) for k, v in m.items() if v is not None))
                   for m in filter_matches(parse_command(text).filter)), key=repr)


def norm(*matches: dict) -> list[tuple]:
    return sorted((tuple(sorted(m.items())) for m in matches), key=repr)


def unfragmented(*matches: dict) -> list[tuple]:
    """A port filter's matches: only unfragmented packets carry ports (filters.py)."""
    return norm(*({**m, "ip_frag": 0} for m in matches))


def field(flow: Flow, name: str):
    return dict(flow.match).get(name)


# A middlebox with every kind of offload, used by several tests.
FULL = (
    f"R F {MAC} 10.0.0.100",
    f"A {MAC} I 4 s 10.1.0.0/16",
    f"A {MAC} I 1 p tcp",
    f"A {MAC} M 4 s aa:bb:cc:dd:ee:ff",
    f"A {MAC} M 2 t 5",
    f"A {MAC} T 12 s 1000-1999 d 80",
    f"R L {MAC} 10.0.0.100 0 * 10.0.0.5,10.0.0.6",
    f"R L {MAC} 10.0.0.100 1 10.9.0.0/16 10.0.0.7",
)


# --- small helpers --------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("+new+trk", (0x21, 0x21)),
    ("+est+trk-rpl", (0x22, 0x2A)),
    ("+trk+rpl", (0x28, 0x28)),
    ("+inv+trk", (0x30, 0x30)),
    ("-trk", (0x00, 0x20)),
    ("", (0, 0)),
])
def test_ct_state(spec, expected):
    assert ct_state(spec) == expected


def test_cookie_of_carries_the_tag_and_the_mac():
    cookie = cookie_of(MAC)
    assert cookie & COOKIE_TAG_MASK == COOKIE_TAG
    assert cookie & ~COOKIE_TAG_MASK == 0x523456001222
    assert cookie < 1 << 64


@FAST
@given(st.binary(min_size=6, max_size=6), st.binary(min_size=6, max_size=6))
def test_cookies_of_different_macs_differ(a, b):
    mac_a, mac_b = (":".join(f"{x:02x}" for x in raw) for raw in (a, b))
    assert (cookie_of(mac_a) == cookie_of(mac_b)) == (a == b)
    assert cookie_of(mac_a) & COOKIE_TAG_MASK == COOKIE_TAG


def test_base_config():
    config = base_config()
    assert config.groups == frozenset()
    assert all(flow.cookie in (BASE_COOKIE, port_cookie(0)) for flow in config.flows)
    misses = {(f.table, f.priority, f.match, f.actions) for f in config.flows if f.match == ()}
    assert misses == {(INGRESS_TABLE, 0, (), (("goto", OFFLOAD_TABLE),)), (OFFLOAD_TABLE, 0, (), (("normal",),)),
                      (REDIRECT_TABLE, 0, (), (("normal",),))}
    (arp,) = [f for f in config.flows if field(f, "arp_op") is not None]
    assert arp.table == OFFLOAD_TABLE and arp.actions == (("meter", F.CONTROLLER_METER), ("controller",))
    assert dict(arp.match) == {"eth_type": 0x0806, "eth_dst": F.RESOLVER_MAC, "arp_op": 2}
    assert arp.priority > FILTER
    # What entered a redirect and matched no decision is dropped, never flooded by NORMAL.
    (stray,) = [f for f in config.flows if field(f, "reg1") is not None]
    assert (stray.table, stray.priority, stray.actions) == (REDIRECT_TABLE, STRAY, ())
    assert base_config() == config
    unmetered = base_config(Surroundings(metered=False))
    (arp,) = [f for f in unmetered.flows if field(f, "arp_op") is not None]
    assert arp.actions == (("controller",),)


# --- port ranges --------------------------------------------------------------------------

@pytest.mark.parametrize("ports, expected", [
    (None, [None]),
    ((80, 80), [80]),
    ((0, 0), [0]),
    ((65535, 65535), [65535]),
    ((0, 65535), [(0, 0x0000)]),
    ((0, 1), [(0, 0xFFFE)]),
    ((1024, 2047), [(1024, 0xFC00)]),
    ((1, 3), [1, (2, 0xFFFE)]),
    ((1000, 1999), [(1000, 0xFFF8), (1008, 0xFFF0), (1024, 0xFE00), (1536, 0xFF00), (1792, 0xFF80),
                    (1920, 0xFFC0), (1984, 0xFFF0)]),
    ((65534, 65535), [(65534, 0xFFFE)]),
])
def test_port_masks_examples(ports, expected):
    assert _port_masks(ports) == expected


def _block(entry) -> tuple[int, int]:
    """The aligned block [first, last] a port match covers, checking it is a valid prefix match."""
    if isinstance(entry, int):
        return (entry, entry)
    value, mask = entry
    size = (~mask & 0xFFFF) + 1
    assert size & (size - 1) == 0, f"mask {mask:#06x} is not a prefix mask"
    assert 2 <= size <= 1 << 16, "a block of one port must be written as a plain value"
    assert value & ~mask & 0xFFFF == 0, f"value {value} has bits outside mask {mask:#06x}"
    return (value, value + size - 1)


def _covers(entry, port: int) -> bool:
    if isinstance(entry, int):
        return port == entry
    value, mask = entry
    return port & mask == value


def _fewest_prefixes(low: int, high: int, first: int = 0, bits: int = 16) -> int:
    """Reference: the minimum number of prefix (value/mask) matches that cover [low, high]."""
    last = first + (1 << bits) - 1
    if last < low or first > high:
        return 0
    if low <= first and last <= high:
        return 1
    half = 1 << (bits - 1)
    return _fewest_prefixes(low, high, first, bits - 1) + _fewest_prefixes(low, high, first + half, bits - 1)


port_ranges = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda p: tuple(sorted(p)))


@FAST
@given(port_ranges, st.lists(st.integers(0, 65535), max_size=20))
def test_port_masks_cover_exactly_the_range_with_the_fewest_matches(ports, probes):
    low, high = ports
    entries = _port_masks(ports)
    blocks = [_block(entry) for entry in entries]
    # Contiguous, disjoint, in order, starting at low and ending at high: exactly [low, high].
    assert blocks[0][0] == low and blocks[-1][1] == high
    for (_, end), (start, _) in zip(blocks, blocks[1:]):
        assert start == end + 1
    # The matches as a switch evaluates them agree, at the edges and elsewhere.
    for port in [low, high, low - 1, high + 1, *probes]:
        if 0 <= port <= 65535:
            assert any(_covers(e, port) for e in entries) == (low <= port <= high)
    assert len(entries) == _fewest_prefixes(low, high)


# --- filter matches -----------------------------------------------------------------------

V4, V6 = ETH_IPV4, ETH_IPV6
NET8 = ("10.0.0.0", "255.0.0.0")
DB8 = ("2001:db8::", "ffff:ffff::")


@pytest.mark.parametrize("text, expected", [
    # IP layer: the family follows the addresses; both families when there is none.
    (f"A {MAC} I 4 s 10.0.0.0/8", norm({"eth_type": V4, "ipv4_src": NET8})),
    (f"A {MAC} I 8 d 10.0.0.1", norm({"eth_type": V4, "ipv4_dst": "10.0.0.1"})),
    (f"A {MAC} I 12 s 10.0.0.0/8 d 10.1.2.3", norm({"eth_type": V4, "ipv4_src": NET8, "ipv4_dst": "10.1.2.3"})),
    (f"A {MAC} I 8 d 2001:db8::/32", norm({"eth_type": V6, "ipv6_dst": DB8})),
    (f"A {MAC} I 5 s 2001:db8::1 p 58", norm({"eth_type": V6, "ipv6_src": "2001:db8::1", "ip_proto": 58})),
    (f"A {MAC} I 1 p tcp", norm({"eth_type": V4, "ip_proto": 6}, {"eth_type": V6, "ip_proto": 6})),
    (f"A {MAC} I 2 t ef", norm({"eth_type": V4, "ip_dscp": 46}, {"eth_type": V6, "ip_dscp": 46})),
    (f"A {MAC} I 15 s 10.0.0.0/8 d 10.0.0.1 t 8 p udp",
     norm({"eth_type": V4, "ipv4_src": NET8, "ipv4_dst": "10.0.0.1", "ip_dscp": 8, "ip_proto": 17})),
    # MAC layer: eth_dst is the middlebox's own (added by compile_filters), never the filter's.
    (f"A {MAC} M 4 s AA:BB:CC:DD:EE:FF", norm({"eth_src": "aa:bb:cc:dd:ee:ff"})),
    (f"A {MAC} M 1 p arp", norm({"eth_type": 0x0806})),
    (f"A {MAC} M 8 d {MAC}", norm({})),
    (f"A {MAC} M 2 t 3", norm({"vlan_vid": (VLAN_PRESENT, VLAN_PRESENT), "vlan_pcp": 3})),
    (f"A {MAC} M 7 s aa:bb:cc:dd:ee:ff t 0 p ipv6",
     norm({"eth_src": "aa:bb:cc:dd:ee:ff", "eth_type": V6, "vlan_vid": (VLAN_PRESENT, VLAN_PRESENT), "vlan_pcp": 0})),
    # Transport layer: both families always; tcp, udp and sctp when no protocol is given.
    (f"A {MAC} T 9 d 80 p tcp", unfragmented({"eth_type": V4, "ip_proto": 6, "tcp_dst": 80},
                                     {"eth_type": V6, "ip_proto": 6, "tcp_dst": 80})),
    (f"A {MAC} T 13 s 1024-2047 d 53 p udp",
     unfragmented({"eth_type": V4, "ip_proto": 17, "udp_src": (1024, 0xFC00), "udp_dst": 53},
          {"eth_type": V6, "ip_proto": 17, "udp_src": (1024, 0xFC00), "udp_dst": 53})),
    (f"A {MAC} T 8 d 443", unfragmented(*({"eth_type": e, "ip_proto": p, f"{n}_dst": 443}
                                  for e in (V4, V6) for p, n in ((6, "tcp"), (17, "udp"), (132, "sctp"))))),
    (f"A {MAC} T 3 t 10 p sctp", unfragmented({"eth_type": V4, "ip_proto": 132, "ip_dscp": 10},
                                      {"eth_type": V6, "ip_proto": 132, "ip_dscp": 10})),
    (f"A {MAC} T 5 s 1-3 p 6", unfragmented(*({"eth_type": e, "ip_proto": 6, "tcp_src": s}
                                      for e in (V4, V6) for s in (1, (2, 0xFFFE))))),
])
def test_filter_matches(text, expected):
    assert matches_of(text) == expected


def test_transport_ranges_on_both_fields_give_the_cross_product():
    matches = matches_of(f"A {MAC} T 13 s 1-3 d 1-3 p 6")
    assert len(matches) == 2 * 2 * 2  # families x source pieces x destination pieces
    assert len(set(matches)) == len(matches)


def test_compile_filters_drop_traffic_to_the_middlebox_only():
    """Without own addresses (no group forms), every plain filter flow matches the
    middlebox's MAC; filters.py's own tests cover group frames, fragments and QinQ."""
    mb = middlebox(*FULL)
    flows = compile_filters(mb, frozenset())
    expected = {tuple(sorted({"eth_dst": MAC, **{k: v for k, v in m.items() if v is not None}}.items()))
                for f in mb.filters for m in filter_matches(f)}
    plain = {flow.match for flow in flows if flow.table == OFFLOAD_TABLE and flow.priority == FILTER}
    assert expected <= plain
    assert all(field(flow, "eth_dst") == MAC for flow in flows if flow.table == OFFLOAD_TABLE)
    assert {flow.cookie for flow in flows} == {cookie_of(MAC)}


def test_compile_filters_without_filters_is_empty():
    assert compile_filters(middlebox(f"R F {MAC} 10.0.0.1"), frozenset({"10.0.0.1"})) == set()


# --- redirects ----------------------------------------------------------------------------

def bucket_backend(bucket: tuple, flows: set[Flow]) -> str:
    """The backend one select-group bucket sends a new connection to: a NAT commit in the
    bucket itself, or in the flow(s) its register mark resubmits to."""
    commits = [a[2] for a in bucket if a[0] == "ct_commit_nat"]
    marks = {(a[1], a[2]) for a in bucket if a[0] == "set_field" and a[1].startswith("reg")}
    for flow in flows:
        if any((name, value) in marks for name, value in flow.match):
            commits += [a[2] for a in flow.actions if a[0] == "ct_commit_nat"]
    assert len(commits) == 1, (bucket, commits)
    return commits[0]


def entries(flows: set[Flow], mb: Middlebox) -> dict[int, Flow]:
    """Offload-table flows that send traffic for the balancer address into conntrack, by priority."""
    return {f.priority: f for f in flows if f.table == OFFLOAD_TABLE and field(f, "eth_dst") == mb.mac
            and f.priority != FILTER}


def new_connection_flows(flows: set[Flow]) -> dict[int, Flow]:
    return {f.priority: f for f in flows if field(f, "ct_state") == ct_state("+new+trk")}


def test_redirect_flows_and_select_group_for_a_type_0_pool():
    pool = ("10.0.0.5", "10.0.0.6", "10.0.0.7")
    mb = middlebox(f"R L {MAC} 10.0.0.100 0 * {','.join(pool)}")
    flows, groups, missing = compile_redirects(mb, LAB)
    assert missing == set()
    assert all(f.cookie == cookie_of(MAC) for f in flows)
    # Traffic for the balancer address goes through the middlebox's conntrack zone.
    (entry,) = entries(flows, mb).values()
    assert entry.priority == REDIRECT
    assert dict(entry.match) == {"eth_type": V4, "eth_dst": MAC, "ipv4_dst": "10.0.0.100"}
    assert entry.actions == (("set_field", "reg1", ENTERED), ("ct_nat", mb.zone, REDIRECT_TABLE))
    # A new connection goes to a select group with one bucket per backend, in pool order.
    (group,) = groups
    assert group.group_id == group_id(mb, 0)
    (new,) = new_connection_flows(flows).values()
    assert new.table == REDIRECT_TABLE
    assert dict(new.match)["ct_zone"] == mb.zone and dict(new.match)["ipv4_dst"] == "10.0.0.100"
    assert new.actions == (("group", group.group_id),)
    assert [bucket_backend(b, flows) for b in group.buckets] == list(pool)
    # Every later packet towards a backend (established, or still +new after NAT) gets
    # that backend's MAC and port.
    for backend in pool:
        (est,) = [f for f in flows if field(f, "ct_state") == ct_state("+trk-rpl-inv")
                  and field(f, "ipv4_dst") == backend]
        assert field(est, "ct_zone") == mb.zone and field(est, "reg1") == ENTERED
        assert ("set_field", "eth_dst", NEIGHBOURS[backend].mac) in est.actions
    # Replies from each backend go back through the zone, below every entry flow; nothing
    # in the zone is dropped (a backend's other traffic is new or invalid there).
    replies = {f for f in flows if f.table == OFFLOAD_TABLE and field(f, "eth_dst") is None}
    assert {field(f, "ipv4_src") for f in replies} == set(pool)
    for reply in replies:  # only from the backend's own port and MAC
        where = NEIGHBOURS[field(reply, "ipv4_src")]
        assert (field(reply, "in_port"), field(reply, "eth_src")) == (where.port, where.mac)
    assert {f.priority for f in replies} == {REDIRECT_REPLY}
    assert not [f for f in flows if f.actions == ()]


def test_type_1_redirect_matches_its_source_at_a_higher_priority():
    mb = middlebox(f"R L {MAC} 10.0.0.100 0 * 10.0.0.5", f"R L {MAC} 10.0.0.100 1 10.9.0.0/16 10.0.0.6")
    flows, groups, _ = compile_redirects(mb, LAB)
    entry = entries(flows, mb)
    assert set(entry) == {REDIRECT, REDIRECT_FROM_SOURCE}
    assert field(entry[REDIRECT_FROM_SOURCE], "ipv4_src") == ("10.9.0.0", "255.255.0.0")
    assert field(entry[REDIRECT], "ipv4_src") is None
    new = new_connection_flows(flows)
    assert set(new) == {REDIRECT, REDIRECT_FROM_SOURCE}
    assert field(new[REDIRECT_FROM_SOURCE], "ipv4_src") == ("10.9.0.0", "255.255.0.0")
    assert field(new[REDIRECT], "ipv4_src") is None
    # Each entry sends new connections to its own group, with its own backends.
    by_id = {g.group_id: g for g in groups}
    assert len(by_id) == 2
    for priority, backend in ((REDIRECT_FROM_SOURCE, "10.0.0.6"), (REDIRECT, "10.0.0.5")):
        ((kind, gid),) = new[priority].actions
        assert kind == "group"
        assert [bucket_backend(b, flows) for b in by_id[gid].buckets] == [backend]


def test_ipv6_redirect_uses_ipv6_fields():
    mb = middlebox(f"R L {MAC} 2001:db8::100 1 2001:db8:9::/48 2001:db8::5,2001:db8::6")
    flows, groups, missing = compile_redirects(mb, LAB)
    assert not missing and len(groups) == 1
    for flow in flows:
        names = {name for name, _ in flow.match}
        assert not any(name.startswith("ipv4") for name in names)
        if "eth_type" in names:
            assert field(flow, "eth_type") == V6
    (entry,) = [f for f in flows if field(f, "eth_dst") == MAC and f.priority == REDIRECT_FROM_SOURCE]
    assert field(entry, "ipv6_dst") == "2001:db8::100"
    assert field(entry, "ipv6_src") == ("2001:db8:9::", "ffff:ffff:ffff::")
    # Neighbour discovery for the balancer's address stays the middlebox's own (above the entries).
    discovery = [f for f in flows if field(f, "eth_dst") == MAC and f.priority == NEIGHBOUR_DISCOVERY]
    assert {field(f, "icmpv6_type") for f in discovery} == {135, 136}
    assert all(f.actions == (("normal",),) for f in discovery)
    # Health checks of IPv6 backends are neighbour adverts from their own port and MAC.
    answers = {field(f, "ipv6_nd_target"): f for f in flows if f.priority == BACKEND_ANSWER}
    assert set(answers) == {"2001:db8::5", "2001:db8::6"}
    assert field(answers["2001:db8::5"], "in_port") == NEIGHBOURS["2001:db8::5"].port


def test_unresolved_backend_gives_no_redirect_flows_and_is_reported():
    mb = middlebox(*FULL)
    neighbours = {k: v for k, v in NEIGHBOURS.items() if k != "10.0.0.6"}
    flows, groups, missing = compile_redirects(mb, Surroundings(neighbours=neighbours))
    assert (flows, groups, missing) == (set(), set(), {"10.0.0.6"})
    config = compile_middlebox(mb, Surroundings(neighbours=neighbours))
    assert config.unresolved == ("10.0.0.6",)
    assert config.groups == frozenset()
    assert config.flows == frozenset(compile_filters(mb, frozenset({"10.0.0.100"})))  # filters still go in
    nothing = compile_middlebox(mb, Surroundings())
    assert nothing.unresolved == ("10.0.0.5", "10.0.0.6", "10.0.0.7")


def test_no_redirects_without_a_balancer_registration():
    assert compile_redirects(middlebox(f"R F {MAC} 10.0.0.1", f"A {MAC} I 1 p 6"), LAB) == (set(), set(), set())


# --- whole middleboxes and switches -------------------------------------------------------

def _backends(mb: Middlebox) -> set[str]:
    return {b for r in mb.redirects for b in r.backends}


def assert_owned(mb: Middlebox, config: SwitchConfig) -> None:
    """Every flow of ``mb`` carries its cookie.  In the offload table (the only one packets
    enter) it matches the MB's own MAC as eth_dst, except the backend-reply flows, which match
    one of its own backends as source.  Later tables are reached only through the MB's own
    conntrack zone or the register marks its own group buckets set, and every flow there
    matches one of those."""
    marks = {(a[1], a[2]) for g in config.groups for b in g.buckets for a in b
             if a[0] == "set_field" and a[1].startswith("reg")}
    own = {mb.firewall_ip, mb.balancer_ip} - {None}
    for flow in config.flows:
        assert flow.cookie == cookie_of(mb.mac)
        if flow.table == OFFLOAD_TABLE:
            if field(flow, "conj_id") is not None:  # reached only through its own clauses
                assert field(flow, "conj_id") >> 16 == mb.zone
            elif field(flow, "eth_dst") is None:
                source = field(flow, "ipv4_src") or field(flow, "ipv6_src")
                assert source in _backends(mb), flow
                assert flow.actions == (("ct_nat", mb.zone, REDIRECT_TABLE),)
            elif field(flow, "eth_dst") == F.RESOLVER_MAC:  # a backend's own health answer, from its port
                target = field(flow, "arp_spa") or field(flow, "ipv6_nd_target")
                assert target in _backends(mb) and field(flow, "in_port") == NEIGHBOURS[target].port, flow
            elif field(flow, "eth_dst") == GROUP:  # a group frame for one of its own addresses
                assert (field(flow, "ipv4_dst") or field(flow, "ipv6_dst")) in own, flow
            else:
                assert field(flow, "eth_dst") == mb.mac
        elif flow.table == FRAGMENT_TABLE:
            assert field(flow, "ct_zone") == fragment_zone(mb), flow
        else:
            assert field(flow, "ct_zone") == mb.zone or set(flow.match) & marks, flow
    for group in config.groups:
        assert group.group_id in owned_groups(mb)


def test_every_flow_of_a_middlebox_is_its_own():
    mb = middlebox(*FULL)
    config = compile_middlebox(mb, LAB)
    assert config.unresolved == ()
    assert_owned(mb, config)
    assert len(config.groups) == 2
    assert {field(f, "ipv4_src") for f in config.flows
            if f.table == OFFLOAD_TABLE and field(f, "eth_dst") is None} == _backends(mb)


def test_owned_groups_are_disjoint_blocks_per_zone():
    a, b = Middlebox(1, 5, MAC, 1), Middlebox(1, 6, MAC2, 2)
    assert len(owned_groups(a)) == 256
    assert set(owned_groups(a)).isdisjoint(owned_groups(b))
    assert group_id(a, 0) in owned_groups(a) and group_id(a, 255) in owned_groups(a)


TWO = FULL + (
    f"R F {MAC2} 10.0.0.200",
    f"A {MAC2} I 4 s 10.1.0.0/16",  # the same filter as MAC's
    f"A {MAC2} T 12 s 1000-1999 d 80",
    f"R L {MAC2} 10.0.0.200 0 * 10.0.0.8",
)


def test_two_middleboxes_never_share_cookies_flows_or_groups():
    state = build(*TWO)
    first, second = (compile_middlebox(state.find(1, m), LAB) for m in (MAC, MAC2))
    assert_owned(state.find(1, MAC), first)
    assert_owned(state.find(1, MAC2), second)
    assert {f.cookie for f in first.flows}.isdisjoint({f.cookie for f in second.flows})
    assert first.flows and second.flows
    identity = lambda config: {(f.table, f.priority, f.match) for f in config.flows}  # noqa: E731
    assert identity(first).isdisjoint(identity(second))
    assert {g.group_id for g in first.groups}.isdisjoint({g.group_id for g in second.groups})


def test_compile_switch_is_base_config_plus_the_middleboxes_of_that_switch():
    state = build(*TWO)
    state = build(f"R F {MAC} 10.0.0.50", f"A {MAC} I 1 p 17", state=state, binding=Binding(2, 5))
    config = compile_switch(state, 1, LAB)
    parts = [compile_middlebox(mb, LAB) for mb in state.on(1)]
    assert base_config().flows <= config.flows
    assert config.flows == base_config().flows.union(*(p.flows for p in parts))
    assert config.groups == frozenset().union(*(p.groups for p in parts))
    assert config.unresolved == ()
    # Switch 2 only has its own middlebox.
    other = compile_switch(state, 2, LAB)
    assert other.flows == base_config().flows | compile_middlebox(state.find(2, MAC), LAB).flows
    assert compile_switch(state, 3, LAB) == base_config()


def test_compile_switch_lists_unresolved_backends_of_all_middleboxes_sorted_once():
    state = build(*TWO)
    config = compile_switch(state, 1, Surroundings(neighbours={"10.0.0.5": NEIGHBOURS["10.0.0.5"]}))
    assert config.unresolved == ("10.0.0.6", "10.0.0.7", "10.0.0.8")
    assert config.groups == frozenset()


def test_compile_is_deterministic():
    state = build(*TWO)
    assert compile_switch(state, 1, LAB) == compile_switch(state, 1, Surroundings(neighbours=dict(NEIGHBOURS)))
    # The same desired state reached by another order of commands compiles to the same flows.
    # (Registrations keep their order: zones are handed out in registration order.)
    second = TWO[len(FULL):]
    reordered = build(FULL[0], *reversed(FULL[1:]), second[0], *reversed(second[1:]))
    assert reordered == state
    assert compile_switch(reordered, 1, LAB) == compile_switch(state, 1, LAB)


FILTER_TEXTS = [
    "I 4 s 10.1.0.0/16", "I 1 p tcp", "I 8 d 2001:db8::/32", "I 2 t af11",
    "M 4 s aa:bb:cc:dd:ee:ff", "M 2 t 5", "M 1 p arp", f"M 8 d {MAC}",
    "T 12 s 1000-1999 d 80", "T 9 d 53 p udp", "T 4 s 0-1023", "T 3 t 46 p sctp",
]
REDIRECT_TEXTS = [  # one per source, so that their order does not matter
    "0 * 10.0.0.5,10.0.0.6", "1 10.9.0.0/16 10.0.0.7", "1 10.8.0.1 10.0.0.8,10.0.0.5", "1 10.7.0.0/16 10.0.0.9",
]


@FAST
@given(st.lists(st.sampled_from(FILTER_TEXTS), unique=True), st.lists(st.sampled_from(REDIRECT_TEXTS), unique=True),
       st.randoms(use_true_random=False))
def test_compile_is_deterministic_and_owned_for_any_offloads(filters, redirects, rnd):
    texts = [f"R F {MAC} 10.0.0.100"] + [f"A {MAC} {t}" for t in filters] + \
            [f"R L {MAC} 10.0.0.100 {t}" for t in redirects]
    shuffled = texts[:1] + rnd.sample(texts[1:], len(texts) - 1)
    a, b = build(*texts), build(*shuffled)
    config = compile_switch(a, 1, LAB)
    assert config == compile_switch(b, 1, LAB)
    mb = a.find(1, MAC)
    own = compile_middlebox(mb, LAB)
    assert_owned(mb, own)
    assert config.flows == base_config().flows | own.flows
    # One group per redirect entry, one bucket per backend, ids in the middlebox's block.
    assert sorted(len(g.buckets) for g in own.groups) == sorted(len(r.backends) for r in mb.redirects)
    referenced = {a[1] for f in own.flows for a in f.actions if a[0] == "group"}
    assert referenced == {g.group_id for g in own.groups}


@FAST
@given(st.integers(1, 0xFFFF), st.integers(1, 64))
def test_group_ids_stay_in_the_owned_block(zone, count):
    mb = Middlebox(1, 5, MAC, zone)
    ids = [group_id(mb, i) for i in range(count)]
    assert len(set(ids)) == count
    assert all(i in owned_groups(mb) for i in ids)
    neighbour = Middlebox(1, 6, MAC2, zone + 1)
    assert not set(ids) & set(owned_groups(neighbour))


@pytest.mark.parametrize("text, name, network", [
    (f"A {MAC} I 4 s 10.0.0.0/8", "ipv4_src", "10.0.0.0/8"),
    (f"A {MAC} I 4 s 0.0.0.0/0", "ipv4_src", "0.0.0.0/0"),
    (f"A {MAC} I 8 d 2001:db8::/32", "ipv6_dst", "2001:db8::/32"),
    (f"A {MAC} I 8 d 2001:db8:0:1::/64", "ipv6_dst", "2001:db8:0:1::/64"),
])
def test_ip_networks_become_address_and_netmask(text, name, network):
    (match,) = filter_matches(parse_command(text).filter)
    address, mask = match[name]
    expected = ipaddress.ip_network(network)
    assert ipaddress.ip_address(address) == expected.network_address
    assert ipaddress.ip_address(mask) == expected.netmask


@FAST
@given(st.lists(st.sampled_from(FILTER_TEXTS), unique=True), st.lists(st.sampled_from(FILTER_TEXTS), unique=True),
       st.lists(st.sampled_from(REDIRECT_TEXTS), unique=True), st.booleans())
def test_added_ip_and_mac_filters_compile_to_exactly_what_the_whole_middlebox_adds(earlier, later, redirects, both):
    """compile_added_filters: when it answers, its flows and the earlier ones are the
    whole middlebox's, whatever the filters (every layer), redirects and addresses; it
    answers for a strict superset of IP and MAC filters with nothing else changed (told
    which filters are new, it checks that they are as many as the sets differ by)."""
    register = f"R F {MAC} 10.0.0.100" if not both else f"R F {MAC} 2001:db8::100"  # + the balancer's
    redirect = [f"R L {MAC} 10.0.0.100 {t}" for t in redirects]
    before = build(register, *[f"A {MAC} {t}" for t in earlier], *redirect).find(1, MAC)
    after = build(register, *[f"A {MAC} {t}" for t in earlier + later], *redirect).find(1, MAC)
    added = compile_added_filters(before, after, after.filters - before.filters, LAB)
    layers = {parse_command(f"A {MAC} {t}").filter.layer for t in earlier + later}
    applies = before.filters < after.filters and Layer.TRANSPORT not in layers
    assert (added is not None) == applies
    if added is not None:
        assert compile_middlebox(before, LAB).flows | added == compile_middlebox(after, LAB).flows
        assert added <= compile_middlebox(after, LAB).flows


def test_added_filters_are_not_compiled_alone_after_any_other_change():
    before = build(f"R F {MAC} 10.0.0.100", f"A {MAC} I 4 s 10.9.0.1").find(1, MAC)
    grown = build(f"R F {MAC} 10.0.0.100", f"A {MAC} I 4 s 10.9.0.1", f"A {MAC} I 4 s 10.9.0.2").find(1, MAC)
    new = grown.filters - before.filters
    assert compile_added_filters(before, grown, new, LAB) is not None
    assert compile_added_filters(before, replace(grown, firewall_ip="10.0.0.101"), new, LAB) is None   # addresses
    assert compile_added_filters(before, replace(grown, port=9), new, LAB) is None                     # moved
    assert compile_added_filters(grown, before, new, LAB) is None                                      # removed
    assert compile_added_filters(before, before, frozenset(), LAB) is None                             # unchanged
    assert compile_added_filters(None, grown, new, LAB) is None and compile_added_filters(before, None, new, LAB) is None
    unannotated_refused = Surroundings(mode=TrustMode.ANNOTATIONS)  # nothing vouches for it: compiled whole
    assert compile_added_filters(before, grown, new, unannotated_refused) is None


def test_a_filter_set_found_plain_stays_known_and_one_with_port_filters_never_is():
    """compile_added_filters reads neither set's old filters: whether a set has port
    filters is remembered with the set (flows._plain), and a grown set is known plain."""
    plain = build(f"R F {MAC} 10.0.0.100", f"A {MAC} I 4 s 10.9.0.1").find(1, MAC)
    grown = build(f"R F {MAC} 10.0.0.100", f"A {MAC} I 4 s 10.9.0.1", f"A {MAC} I 4 s 10.9.0.2").find(1, MAC)
    assert compile_added_filters(plain, grown, grown.filters - plain.filters, LAB) is not None
    assert F._PLAIN[id(grown.filters)]() is grown.filters
    ported = build(f"R F {MAC} 10.0.0.100", f"A {MAC} T 8 d 80").find(1, MAC)
    assert not F._plain(ported.filters) and not F._plain(ported.filters)  # asked twice: not remembered
    assert id(ported.filters) not in F._PLAIN or F._PLAIN[id(ported.filters)]() is not ported.filters
    key = id(grown.filters)
    del grown
    assert key not in F._PLAIN or F._PLAIN[key]() is not None  # forgotten with its set


def test_address_pairs_are_shared_between_the_flows_of_a_middlebox():
    """Memory at 100k filters: a filter's address pair is one object in its unicast and
    group-frame drops, and the middlebox's own address one object in all its group drops
    (pipeline.shared_pair); equal matches stay equal however they were built."""
    mb = build(f"R F {MAC} 10.1.0.1", f"A {MAC} I 4 s 10.200.0.1", f"A {MAC} I 4 s 10.200.0.2").find(1, MAC)
    flows = compile_middlebox(mb, Surroundings()).flows
    pairs = {}
    for flow in flows:
        for pair in flow.match:
            if pair[0] in ("ipv4_src", "ipv4_dst"):
                pairs.setdefault(pair, set()).add(id(pair))
    assert {pair: len(ids) for pair, ids in pairs.items()} == {
        ("ipv4_src", "10.200.0.1"): 1, ("ipv4_src", "10.200.0.2"): 1, ("ipv4_dst", "10.1.0.1"): 1}
    assert sum(("ipv4_dst", "10.1.0.1") in flow.match for flow in flows) >= 2
