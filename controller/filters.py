"""Compile a middlebox's firewall filters into OpenFlow flows that leave no bypass.

Pure and deterministic, like the rest of the compilers: the same middlebox and addresses
always give the same set of flows (docs/controller.md, "Pipeline").  Why each part exists:

* **Broadcast and multicast.**  A filter matching only ``eth_dst=<MB MAC>`` misses an IP
  packet for the middlebox's own address sent in a group frame (``ff:ff:..``,
  ``01:00:5e:..``, ``33:33:..``): the middlebox's stack accepts it all the same.  Every
  IP-level filter therefore gets a second form matching the group bit of ``eth_dst`` *and*
  one of the middlebox's own addresses as IP destination.  Group traffic for any other
  address is never touched: it is other tenants' too.
* **Fragments.**  Non-first fragments carry no transport header, so OVS reports ports 0
  for them; a port filter would let a fragmented datagram through or drop a legitimate
  one.  Port filters in the offload table match only unfragmented packets
  (``ip_frag=no``); fragments for a middlebox with port filters go through conntrack in
  the middlebox's fragment zone (``0x8000 | zone``), whose reassembly (``ipf`` in the
  userspace datapath) refuses non-last fragments below its minimum size (1200 bytes IPv4,
  1280 IPv6 by default), overlaps and incomplete datagrams, and gives the first fragment
  the reassembled datagram's original-direction ports (``ct_tp_src``/``ct_tp_dst``;
  these exist only for committed connections, hence the commit).  The fragment table then
  drops what conntrack marked invalid and first fragments whose ports match a filter;
  everything else resumes in the offload table (no longer ``-trk``, so it never loops),
  where it meets the same redirects and drops a whole packet would.  OVS 3.1 gives later
  fragments ports 0 even after reassembly, so they are never judged by port: without
  its first fragment a datagram cannot be reassembled by the middlebox.  IPv6 fragments
  after the first carry no upper protocol at all (OVS reports the fragment header's, 44),
  so every one of them for the middlebox goes through reassembly.
* **QinQ.**  OVS parses one VLAN tag (``other_config:vlan-limit`` is global and left
  alone); a second tag hides the IP header, leaving a VLAN TPID as ``eth_type``.  Such
  frames for a middlebox with IP or port filters are dropped: the filters cannot see in.
  ``M .. p vlan`` means "tagged", which OVS reports as a present VLAN id, not as an
  ``eth_type``.
* **Products of port ranges** cost the product of their prefix pieces as plain flows;
  OVS conjunctive matches cost their sum, so a filter uses them when that is smaller.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from itertools import product

from mbvisor.guest.commands import IP_LAYER, MAC_LAYER, TRANSPORT_LAYER, Filter, Layer

from .model import Middlebox
from .pipeline import (FILTER, FILTER_CONJUNCTION, FRAGMENT_TABLE, MISS, OFFLOAD_TABLE, Action, Flow, Match,
                       cookie_of, match, match_of, shared_pair)
from .stepping import STEP, Pause, pausing

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)  # 802.1Q and 802.1ad: OVS parses both as a VLAN tag
VLAN_PRESENT = 0x1000
GROUP = ("01:00:00:00:00:00", "01:00:00:00:00:00")  # eth_dst's group bit: broadcast and multicast
TRANSPORT_FIELDS = {6: ("tcp_src", "tcp_dst"), 17: ("udp_src", "udp_dst"), 132: ("sctp_src", "sctp_dst")}
# ip_frag (Nicira): bit 0 "a fragment", bit 1 "not the first one".  A full mask is written
# as the plain value, which is how the switch reports it back (the reconciler compares).
NOT_FRAGMENT = 0
FRAGMENT = (1, 1)
FIRST_FRAGMENT = 1
LATER_FRAGMENT = 3
IPV6_FRAGMENT_HEADER = 44  # what OVS reports as the protocol of IPv6 fragments after the first
UNTRACKED = (0x00, 0x20)        # ct_state -trk
TRACKED_INVALID = (0x30, 0x30)  # ct_state +trk+inv
TRACKED_VALID = (0x20, 0x30)    # ct_state +trk-inv: what ct_nw_proto/ct_tp_* require
FRAGMENT_ZONE = 0x8000
CONJUNCTION_INDEX_BITS = 16     # conj_id = zone << 16 | index of the filter (model.Limits keeps < 2**16)


def fragment_zone(middlebox: Middlebox) -> int:
    """Zones are unique per controller and below 0x8000, so this one is the middlebox's own."""
    return FRAGMENT_ZONE | middlebox.zone


def conjunction_id(middlebox: Middlebox, index: int) -> int:
    """Unique on the switch (zones are unique per controller), stable while the middlebox's
    set of filters is: ``index`` is the filter's rank among its conjunctive filters in a
    canonical order, not their arrival order."""
    return (middlebox.zone << CONJUNCTION_INDEX_BITS) | index


def compile_filters(middlebox: Middlebox, addresses: frozenset[str], pause: Pause | None = None) -> set[Flow]:
    """Every flow the middlebox's filters need, all with its cookie.  ``addresses`` are the
    middlebox's own IP addresses: the only ones its group-frame forms may match.
    ``pause`` is called after each filter (a port range makes ~30 flows, 250 of them
    7,600) and every few flows made (stepping.py): a middlebox may have 1,000 filters."""
    own = _by_family(addresses)
    rules: dict[tuple, set[Action]] = defaultdict(set)  # (table, priority, match) -> actions
    conjunctive = sorted((f for f in middlebox.filters if _is_conjunctive(f)), key=repr)
    ids = {f: conjunction_id(middlebox, i) for i, f in enumerate(conjunctive)}
    protocols: set[int] = set()
    for filter in _in_steps(middlebox.filters, pause, 1):
        if filter.layer is Layer.TRANSPORT:
            protocols.update(_protocols(filter))
            _transport(rules, middlebox, filter, own, ids.get(filter))
        else:
            for fields in _receiving(middlebox.mac, own, filter):
                rules[(OFFLOAD_TABLE, FILTER, match_of(fields))]
    if any(f.layer in (Layer.IP, Layer.TRANSPORT) for f in middlebox.filters):
        for tpid in VLAN_TPIDS:  # a second tag hides what the filters look at
            rules[(OFFLOAD_TABLE, FILTER, match(eth_dst=middlebox.mac, eth_type=tpid))]
    if protocols:
        _fragment_path(rules, middlebox, own, protocols)
    cookie = cookie_of(middlebox.mac)
    return {Flow(table, priority, fields, tuple(sorted(actions)) if actions else (), cookie)
            for (table, priority, fields), actions in _in_steps(rules.items(), pause)}


def compile_plain_filters(middlebox: Middlebox, addresses: frozenset[str], pause: Pause | None = None) -> set[Flow]:
    """``compile_filters`` for a middlebox with IP and MAC filters only (property-tested
    equal), about twice as fast: a bulk install compiles 100,000 such filters.  Filters
    that differ only in their source have the same matches but for the source's pair, so
    each shape's matches are built once, as ``compile_filters`` builds them
    (``_receiving``), and each filter of that shape only puts its own source pair in.
    Every flow drops: no actions to merge.  ``pause`` is called every few filters
    (stepping.py): each makes two flows."""
    own = _by_family(addresses)
    cookie = cookie_of(middlebox.mac)
    stencils: dict[tuple, list[tuple[Match, Match]]] = {}
    flows: set[Flow] = set()
    for filter in _in_steps(middlebox.filters, pause):
        if filter.layer is TRANSPORT_LAYER:
            raise ValueError(f"a port filter needs compile_filters: {filter}")
        if filter.source is None:
            flows.update(Flow(OFFLOAD_TABLE, FILTER, match_of(fields), (), cookie)
                         for fields in _receiving(middlebox.mac, own, filter))
            continue
        mac_layer = filter.layer is MAC_LAYER
        name = "eth_src" if mac_layer else "ipv6_src" if ":" in filter.source else "ipv4_src"
        shape = (filter.layer, name, filter.destination, filter.tos, filter.protocol)
        around = stencils.get(shape)
        if around is None:
            around = stencils[shape] = _stencil(middlebox.mac, own, shape)
        source = shared_pair(name, filter.source if mac_layer else _address_match(filter.source))
        for before, after in around:  # Flow(...) without the named tuple's argument handling: 200,000 of them
            flows.add(_new_tuple(Flow, (OFFLOAD_TABLE, FILTER, (*before, source, *after), (), cookie)))
    if any(f.layer is IP_LAYER for f in middlebox.filters):
        flows.update(Flow(OFFLOAD_TABLE, FILTER, match(eth_dst=middlebox.mac, eth_type=tpid), (), cookie)
                     for tpid in VLAN_TPIDS)
    return flows


def _in_steps(items, pause: Pause | None, step: int = STEP):
    """The items, paused between steps if asked (a bulk install's are not: no pause)."""
    return items if pause is None else pausing(items, pause, step)


_new_tuple = tuple.__new__
_STAND_IN_SOURCES = {"eth_src": "00:00:00:00:00:00", "ipv4_src": "0.0.0.0/0", "ipv6_src": "::/0"}


def _stencil(mac: str, own: dict[int, list[str]], shape: tuple) -> list[tuple[Match, Match]]:
    """The matches of a filter of ``shape`` (layer, source field, destination, tos,
    protocol), each as the pairs before and after its source's pair.  Pairs are sorted
    by field name alone (a match names each field once), so where the source goes does
    not depend on its value."""
    layer, name, destination, tos, protocol = shape
    stand_in = Filter(layer, _STAND_IN_SOURCES[name], destination, tos, protocol)
    around = []
    for each in (match_of(fields) for fields in _receiving(mac, own, stand_in)):
        place = [pair[0] for pair in each].index(name)
        around.append((each[:place], each[place + 1:]))
    return around


# --- who receives: the middlebox's MAC, or a group frame for one of its addresses ----------

def _by_family(addresses: frozenset[str]) -> dict[int, list[str]]:
    own: dict[int, list[str]] = {ETH_IPV4: [], ETH_IPV6: []}
    for text in sorted(addresses):
        address = ipaddress.ip_address(text)
        own[ETH_IPV4 if address.version == 4 else ETH_IPV6].append(str(address))
    return own


def _ip_prefix(eth_type: int) -> str:
    return "ipv4" if eth_type == ETH_IPV4 else "ipv6"


def _group_forms(fields: dict, eth_type: int, own: dict[int, list[str]], within: str | None) -> list[dict]:
    """``fields`` for group frames carrying one of the middlebox's addresses (of the family,
    inside the filter's destination ``within`` when it has one)."""
    destination = f"{_ip_prefix(eth_type)}_dst"
    network = ipaddress.ip_network(within) if within else None
    return [{**fields, "eth_dst": GROUP, destination: address} for address in own[eth_type]
            if network is None or ipaddress.ip_address(address) in network]


def _receiving(mac: str, own: dict[int, list[str]], filter: Filter) -> list[dict]:
    """A MAC or IP filter's matches: to the middlebox's MAC, and their group forms."""
    forms = []
    for fields in filter_matches(filter):
        forms.append({**fields, "eth_dst": mac})
        eth_type = fields.get("eth_type")
        if filter.layer is Layer.IP:
            forms += _group_forms(fields, eth_type, own, filter.destination)
        elif filter.destination is None:  # a MAC filter naming the MB's MAC never sees group frames
            families = [eth_type] if eth_type in (ETH_IPV4, ETH_IPV6) else [] if eth_type else [ETH_IPV4, ETH_IPV6]
            for family in families:
                forms += _group_forms({**fields, "eth_type": family}, family, own, None)
    return forms


# --- single filters -------------------------------------------------------------------------

def filter_matches(filter: Filter) -> list[dict]:
    """The OpenFlow matches (besides who receives) that together cover one filter."""
    if filter.layer is Layer.MAC:
        tagged = filter.protocol in VLAN_TPIDS
        fields = {"eth_src": filter.source, "eth_type": None if tagged else filter.protocol}
        if tagged or filter.tos is not None:
            fields |= {"vlan_vid": (VLAN_PRESENT, VLAN_PRESENT), "vlan_pcp": filter.tos}
        return [fields]
    if filter.layer is Layer.IP:
        return [{"eth_type": eth_type, **_ip_fields(eth_type, filter.source, filter.destination),
                 "ip_proto": filter.protocol, "ip_dscp": filter.tos}
                for eth_type in _families(filter.source, filter.destination)]
    return [{**base, source_field: source, destination_field: destination}
            for base, (source_field, destination_field) in _transport_bases(filter)
            for source, destination in product(_port_masks(filter.source), _port_masks(filter.destination))]


def _protocols(filter: Filter) -> list[int]:
    return [filter.protocol] if filter.protocol is not None else sorted(TRANSPORT_FIELDS)


def _transport_bases(filter: Filter) -> list[tuple[dict, tuple[str, str]]]:
    """Per family and protocol: the fields every piece of a port filter shares, and the
    names of its port fields.  Unfragmented packets only: a fragment's ports are not there."""
    return [({"eth_type": eth_type, "ip_proto": protocol, "ip_dscp": filter.tos, "ip_frag": NOT_FRAGMENT},
             TRANSPORT_FIELDS[protocol])
            for eth_type, protocol in product((ETH_IPV4, ETH_IPV6), _protocols(filter))]


def _is_conjunctive(filter: Filter) -> bool:
    """Conjunction (a + b clause flows and one conj_id flow) only where it beats a x b."""
    if filter.layer is not Layer.TRANSPORT:
        return False
    a, b = len(_port_masks(filter.source)), len(_port_masks(filter.destination))
    return a * b > a + b + 1


def _transport(rules: dict, middlebox: Middlebox, filter: Filter, own: dict, conj: int | None) -> None:
    """A port filter in the offload table (unfragmented packets) and in the fragment table
    (first fragments, by the reassembled datagram's conntrack ports)."""
    zone = fragment_zone(middlebox)
    for base, (source_field, destination_field) in _transport_bases(filter):
        receivers = [{**base, "eth_dst": middlebox.mac}] + _group_forms(base, base["eth_type"], own, None)
        reassembled = {"eth_type": base["eth_type"], "ip_dscp": filter.tos, "ip_frag": FIRST_FRAGMENT,
                       "ct_state": TRACKED_VALID, "ct_zone": zone, "ct_nw_proto": base["ip_proto"]}
        for table, fields, names in [(OFFLOAD_TABLE, r, (source_field, destination_field)) for r in receivers] + [
                (FRAGMENT_TABLE, reassembled, ("ct_tp_src", "ct_tp_dst"))]:
            _ports(rules, table, fields, names, filter, conj)


def _ports(rules: dict, table: int, fields: dict, names: tuple[str, str], filter: Filter, conj: int | None) -> None:
    sources, destinations = _port_masks(filter.source), _port_masks(filter.destination)
    if conj is None:
        for source, destination in product(sources, destinations):
            rules[(table, FILTER, match(**fields, **{names[0]: source, names[1]: destination}))]
        return
    for clause, (name, pieces) in enumerate(zip(names, (sources, destinations)), start=1):
        for piece in pieces:
            rules[(table, FILTER_CONJUNCTION, match(**fields, **{name: piece}))].add(("conjunction", conj, clause, 2))
    rules[(table, FILTER_CONJUNCTION, match(conj_id=conj))]


def _fragment_path(rules: dict, middlebox: Middlebox, own: dict, protocols: set[int]) -> None:
    """Fragments of the filtered protocols go through conntrack into the fragment table;
    there, what conntrack could not reassemble is dropped and the rest resumes.  Fragments
    never meet a conjunctive clause at the same priority: those match ``ip_frag=no``."""
    zone = fragment_zone(middlebox)
    bases = [{"eth_type": eth_type, "ip_proto": protocol, "ip_frag": FRAGMENT, "ct_state": UNTRACKED}
             for eth_type, protocol in product((ETH_IPV4, ETH_IPV6), sorted(protocols))]
    # An IPv6 fragment after the first names no upper protocol (its header chain is in the
    # first): all of them go through reassembly, or a filtered datagram's first fragment
    # would wait there for the rest and a legitimate one would lose it.
    bases.append({"eth_type": ETH_IPV6, "ip_proto": IPV6_FRAGMENT_HEADER, "ip_frag": LATER_FRAGMENT,
                  "ct_state": UNTRACKED})
    for base in bases:
        for fields in [{**base, "eth_dst": middlebox.mac}] + _group_forms(base, base["eth_type"], own, None):
            rules[(OFFLOAD_TABLE, FILTER_CONJUNCTION, match(**fields))].add(("ct_commit", zone, FRAGMENT_TABLE))
    rules[(FRAGMENT_TABLE, FILTER, match(ct_state=TRACKED_INVALID, ct_zone=zone))]
    rules[(FRAGMENT_TABLE, MISS, match(ct_zone=zone))].add(("resubmit", OFFLOAD_TABLE))


# --- fields ----------------------------------------------------------------------------------

def _families(*addresses: str | None) -> list[int]:
    """Filters hold the grammar's canonical text, in which only IPv6 has colons."""
    given = [a for a in addresses if a is not None]
    if not given:
        return [ETH_IPV4, ETH_IPV6]
    return [ETH_IPV6 if ":" in given[0] else ETH_IPV4]


def _ip_fields(eth_type: int, source: str | None, destination: str | None) -> dict:
    prefix = _ip_prefix(eth_type)
    return {f"{prefix}_src": _address_match(source), f"{prefix}_dst": _address_match(destination)}


def _address_match(text: str | None):
    """An address, or (network, netmask) for a prefix, as OpenFlow matches want them.
    ``text`` is canonical (the grammar wrote it: ``10.0.0.0/8``, ``2001:db8::/32``), so
    its parts are taken as they are; parsing 100,000 of them again cost a bulk install
    more than encoding their flows."""
    if text is None:
        return None
    address, slash, length = text.partition("/")
    ipv6 = ":" in address
    if not slash or int(length) == (128 if ipv6 else 32):
        return address
    return (address, _netmask(ipv6, int(length)))


@functools.lru_cache(maxsize=None)
def _netmask(ipv6: bool, length: int) -> str:
    return str(ipaddress.ip_network(("::" if ipv6 else "0.0.0.0", length)).netmask)


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
