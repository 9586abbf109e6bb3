"""Compile desired state into the flows and groups one switch should hold.

Pure and deterministic: the same state always yields the same set, so the reconciler
can compare it with what the switch reports and send only the difference.  Flows are
plain data (``Flow``/``Group``); ``ofmessages`` turns them into OpenFlow 1.3 messages.

Pipeline (docs/controller.md, "Pipeline"):

* table 0, the offload table: firewall filters drop (priority ``FILTER``); traffic for a
  load-balancing middlebox's address, and replies from its backends, go through
  conntrack into table 1; everything else continues to ``NORMAL``.
* table 1, the redirect table: a new connection goes to a select group that picks a
  backend by hash (one bucket per backend); established packets go to their backend's
  MAC and port; replies (conntrack already restored the middlebox's IP as their source)
  go straight to the client's port, remembered in the connection's ``ct_mark``.
* table 2, the backend table: the chosen backend's flow commits the connection with
  destination NAT (and the client's port) and sends it to the backend's MAC and port.

Redirected packets never pass ``NORMAL``: its MAC learning would not know the backend
(its ARP replies go to the controller) or the client (its packets are redirected), and
would flood them to every port, the middlebox's included.

Every flow of a middlebox matches ``eth_dst`` = its MAC or a backend it owns as source,
so no command can touch another tenant's traffic; its cookie carries its MAC.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from itertools import product

from mbvisor.guest.commands import Filter, Layer

from .model import Middlebox, State

COOKIE_TAG = 0x4D42 << 48
COOKIE_TAG_MASK = 0xFFFF << 48
BASE_COOKIE = COOKIE_TAG  # flows every switch gets; MAC 0 is no middlebox's (model refuses it)

OFFLOAD_TABLE = 0
REDIRECT_TABLE = 1
BACKEND_TABLE = 2

ARP_CAPTURE = 4000
FILTER = 3000
REDIRECT_FROM_SOURCE = 2100
REDIRECT = 2000
REDIRECT_REPLY = 1900  # below every entry flow: a backend talking to another MB's address enters that MB
MISS = 0

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
TRANSPORT_FIELDS = {6: ("tcp_src", "tcp_dst"), 17: ("udp_src", "udp_dst"), 132: ("sctp_src", "sctp_dst")}
VLAN_PRESENT = 0x1000
ETH_ARP = 0x0806
ARP_REPLY = 2
# The controller's own (locally administered) MAC for resolving backends: replies to it
# come to the controller and to nobody else.
RESOLVER_MAC = "02:4d:42:00:00:01"

Match = tuple[tuple[str, object], ...]
Action = tuple


@dataclass(frozen=True)
class Flow:
    table: int
    priority: int
    match: Match
    actions: tuple[Action, ...]
    cookie: int


@dataclass(frozen=True, order=True)
class Group:
    group_id: int
    buckets: tuple[tuple[Action, ...], ...]


@dataclass(frozen=True)
class Neighbour:
    """Where a backend is: its MAC and its switch port, as its ARP reply showed."""

    mac: str
    port: int


@dataclass(frozen=True)
class SwitchConfig:
    flows: frozenset[Flow]
    groups: frozenset[Group]
    unresolved: tuple[str, ...] = ()  # backends whose MAC is not known yet


CT_FLAGS = {"new": 0x01, "est": 0x02, "rel": 0x04, "rpl": 0x08, "inv": 0x10, "trk": 0x20}


def ct_state(spec: str) -> tuple[int, int]:
    """``"+est+trk-rpl"`` as the (value, mask) pair OpenFlow matches and reports."""
    value = mask = 0
    for sign, name in re.findall(r"([+-])([a-z]+)", spec):
        mask |= CT_FLAGS[name]
        value |= CT_FLAGS[name] if sign == "+" else 0
    return (value, mask)


def cookie_of(mac: str) -> int:
    return COOKIE_TAG | int(mac.replace(":", ""), 16)


def _match(**fields) -> Match:
    return tuple(sorted((name, value) for name, value in fields.items() if value is not None))


def base_config() -> SwitchConfig:
    """What every switch holds without any middlebox: table misses continue to NORMAL, and
    ARP replies to the controller's resolver go to the controller."""
    return SwitchConfig(frozenset({
        Flow(OFFLOAD_TABLE, MISS, (), (("normal",),), BASE_COOKIE),
        Flow(REDIRECT_TABLE, MISS, (), (("normal",),), BASE_COOKIE),
        Flow(OFFLOAD_TABLE, ARP_CAPTURE, _match(eth_type=ETH_ARP, eth_dst=RESOLVER_MAC, arp_op=ARP_REPLY),
             (("controller",),), BASE_COOKIE),
    }), frozenset())


def compile_middlebox(middlebox: Middlebox, neighbours: dict[str, Neighbour]) -> SwitchConfig:
    """The flows (all with the middlebox's cookie) and groups one middlebox needs."""
    redirect_flows, groups, missing = compile_redirects(middlebox, neighbours)
    return SwitchConfig(frozenset(compile_filters(middlebox) | redirect_flows), frozenset(groups),
                        tuple(sorted(missing)))


def compile_switch(state: State, dpid: int, neighbours: dict[str, Neighbour]) -> SwitchConfig:
    """Everything switch ``dpid`` should hold; ``neighbours`` locates backends by IP."""
    parts = [base_config()] + [compile_middlebox(mb, neighbours) for mb in state.on(dpid)]
    return SwitchConfig(frozenset().union(*(p.flows for p in parts)),
                        frozenset().union(*(p.groups for p in parts)),
                        tuple(sorted({b for p in parts for b in p.unresolved})))


HANDLED_PRIORITIES = frozenset({FILTER, REDIRECT, REDIRECT_FROM_SOURCE})


def counts_as_handled(table: int, priority: int) -> bool:
    """A packet the middlebox would otherwise have received is decided once, by one
    table-0 flow (a filter's drop or a redirect's entry); later tables and replies from
    backends are not work taken from the middlebox, so they do not count."""
    return table == OFFLOAD_TABLE and priority in HANDLED_PRIORITIES


def owned_groups(middlebox: Middlebox) -> range:
    """Group ids that belong to a middlebox (its zone's block)."""
    return range(group_id(middlebox, 0), group_id(middlebox, 255) + 1)


# --- firewall filters -------------------------------------------------------------------

def compile_filters(middlebox: Middlebox) -> set[Flow]:
    cookie = cookie_of(middlebox.mac)
    return {Flow(OFFLOAD_TABLE, FILTER, _match(eth_dst=middlebox.mac, **fields), (), cookie)
            for filter in middlebox.filters for fields in filter_matches(filter)}


def filter_matches(filter: Filter) -> list[dict]:
    """The OpenFlow matches (besides eth_dst) that together cover one filter."""
    if filter.layer is Layer.MAC:
        fields = {"eth_src": filter.source, "eth_type": filter.protocol}
        if filter.tos is not None:
            fields |= {"vlan_vid": (VLAN_PRESENT, VLAN_PRESENT), "vlan_pcp": filter.tos}
        return [fields]
    if filter.layer is Layer.IP:
        return [{"eth_type": eth_type, **_ip_fields(eth_type, filter.source, filter.destination),
                 "ip_proto": filter.protocol, "ip_dscp": filter.tos}
                for eth_type in _families(filter.source, filter.destination)]
    protocols = [filter.protocol] if filter.protocol is not None else sorted(TRANSPORT_FIELDS)
    matches = []
    for eth_type, protocol in product((ETH_IPV4, ETH_IPV6), protocols):
        source_field, destination_field = TRANSPORT_FIELDS[protocol]
        for source, destination in product(_port_masks(filter.source), _port_masks(filter.destination)):
            matches.append({"eth_type": eth_type, "ip_proto": protocol, "ip_dscp": filter.tos,
                            source_field: source, destination_field: destination})
    return matches


def _families(*addresses: str | None) -> list[int]:
    given = [a for a in addresses if a is not None]
    if not given:
        return [ETH_IPV4, ETH_IPV6]
    return [ETH_IPV4 if ipaddress.ip_network(given[0]).version == 4 else ETH_IPV6]


def _ip_fields(eth_type: int, source: str | None, destination: str | None) -> dict:
    prefix = "ipv4" if eth_type == ETH_IPV4 else "ipv6"
    return {f"{prefix}_src": _address_match(source), f"{prefix}_dst": _address_match(destination)}


def _address_match(text: str | None):
    """An address, or (network, netmask) for a prefix, as OpenFlow matches want them."""
    if text is None:
        return None
    network = ipaddress.ip_network(text)
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return (str(network.network_address), str(network.netmask))


def _port_masks(ports: tuple[int, int] | None) -> list:
    """A port range as the fewest (value, mask) pairs; a single port stays a plain value."""
    if ports is None:
        return [None]
    low, high = ports
    if low == high:
        return [low]
    pairs = []
    while low <= high:
        size = low & -low if low else 1 << 16
        while size > high - low + 1:
            size //= 2
        pairs.append(low if size == 1 else (low, 0xFFFF & ~(size - 1)))
        low += size
    return pairs


# --- load-balancer redirects ------------------------------------------------------------

def group_id(middlebox: Middlebox, index: int) -> int:
    """Unique per switch: the middlebox's conntrack zone and the redirect's position
    (``Limits`` keeps redirects per middlebox within the 8 bits)."""
    return (middlebox.zone << 8) | index


def compile_redirects(middlebox: Middlebox, neighbours: dict[str, Neighbour]) -> tuple[set[Flow], set[Group], set[str]]:
    if middlebox.balancer_ip is None or not middlebox.redirects:
        return set(), set(), set()
    backends = sorted({b for r in middlebox.redirects for b in r.backends})
    missing = {b for b in backends if b not in neighbours}
    if missing:
        return set(), set(), missing
    cookie, zone, address = cookie_of(middlebox.mac), middlebox.zone, middlebox.balancer_ip
    ip = _ip_prefix(address)
    to_conntrack = (("ct_nat", zone, REDIRECT_TABLE),)
    flows: set[Flow] = set()
    groups: set[Group] = set()
    for index, redirect in enumerate(middlebox.redirects):
        priority = REDIRECT_FROM_SOURCE if redirect.source else REDIRECT
        source = {f"{ip}_src": _address_match(redirect.source)}
        flows.add(Flow(OFFLOAD_TABLE, priority,
                       _match(eth_type=_eth_type(address), eth_dst=middlebox.mac, **{f"{ip}_dst": address}, **source),
                       to_conntrack, cookie))
        group = Group(group_id(middlebox, index), tuple(
            (("set_field", "reg0", _bucket_mark(middlebox, index, i)), ("resubmit", BACKEND_TABLE))
            for i in range(len(redirect.backends))))
        groups.add(group)
        flows.add(Flow(REDIRECT_TABLE, priority,
                       _match(eth_type=_eth_type(address), ct_state=ct_state("+new+trk"), ct_zone=zone,
                              **{f"{ip}_dst": address}, **source),
                       (("group", group.group_id),), cookie))
        for i, backend in enumerate(redirect.backends):
            flows.add(Flow(BACKEND_TABLE, REDIRECT,
                           _match(eth_type=_eth_type(backend), reg0=_bucket_mark(middlebox, index, i)),
                           (("ct_commit_nat", zone, backend), *_to(neighbours[backend])), cookie))
    for backend in backends:
        # Everything the backend sends is looked up in the zone; what is not a reply of a
        # redirected connection (new or invalid there) falls to NORMAL in table 1 unchanged.
        flows.add(Flow(OFFLOAD_TABLE, REDIRECT_REPLY,
                       _match(eth_type=_eth_type(backend), **{f"{ip}_src": backend}), to_conntrack, cookie))
        flows.add(Flow(REDIRECT_TABLE, REDIRECT,
                       _match(eth_type=_eth_type(backend), ct_state=ct_state("+est+trk-rpl"), ct_zone=zone,
                              **{f"{ip}_dst": backend}),
                       _to(neighbours[backend]), cookie))
    flows.add(Flow(REDIRECT_TABLE, REDIRECT, _match(ct_state=ct_state("+trk+rpl"), ct_zone=zone),
                   (("output_ct_mark",),), cookie))
    return flows, groups, set()


def _to(neighbour: Neighbour) -> tuple[Action, ...]:
    """Straight to the backend's port: NORMAL would flood (and wake the middlebox) until it
    learned the backend's MAC."""
    return (("set_field", "eth_dst", neighbour.mac), ("output", neighbour.port))


def _bucket_mark(middlebox: Middlebox, redirect_index: int, backend_index: int) -> int:
    """The register value a select-group bucket leaves for the backend table.  OVS does not
    run conntrack actions inside group buckets, so a bucket only marks its choice and
    resubmits; the commit with NAT happens in the backend table."""
    return (group_id(middlebox, redirect_index) << 8) | backend_index


def _eth_type(address: str) -> int:
    return ETH_IPV4 if ipaddress.ip_address(address).version == 4 else ETH_IPV6


def _ip_prefix(address: str) -> str:
    return "ipv4" if ipaddress.ip_address(address).version == 4 else "ipv6"
