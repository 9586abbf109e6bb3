"""Compile desired state into the flows and groups one switch should hold.

Pure and deterministic: the same state always yields the same set, so the reconciler
can compare it with what the switch reports and send only the difference.  Flows are
plain data (``pipeline.Flow``/``Group``); ``ofmessages`` turns them into OpenFlow messages.

Pipeline (docs/controller.md, "Pipeline"; numbers in ``pipeline``):

* table 0, ingress: port security for annotated VM ports (``ingress``).
* table 1, the offload table: firewall filters drop; traffic for a load-balancing
  middlebox's address (marked ``ENTERED``), and replies from its backends' ports, go
  through conntrack into table 2; everything else continues to ``NORMAL``.
* table 2, the redirect table: a new connection goes to a select group that picks a
  backend by hash (one bucket per live backend); every later packet of a redirected
  connection (``+new`` one-way UDP and retransmitted SYNs included) goes to its backend's
  MAC and port; replies (conntrack already restored the middlebox's address as their
  source) go straight to the client's port, remembered in the connection's ``ct_mark``.
  What entered through the middlebox's address and matches none of these is dropped.
* table 3, the backend table: the chosen backend's flow commits the connection with
  destination NAT (and the client's port) and sends it to the backend's MAC and port.

Redirected packets never pass ``NORMAL``: its MAC learning would not know the backend or
the client, and would flood them to every port, the middlebox's and other tenants'.

Only middleboxes the surroundings vouch for get flows (``Surroundings.vouches``), and only
backends their owner's annotations locate: a change of annotations takes effect at the
next compilation whatever commands were accepted before.  Every flow of a middlebox
matches its own MAC as destination, its own backends' ports, or its own conntrack zone.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from mbvisor.guest.commands import MAC_LAYER, TRANSPORT_LAYER, Filter, Layer

from .anchors import Elsewhere, Steer, own_addresses, taken
from .filters import _address_match, compile_filters, compile_plain_filters
from .ingress import compile_ingress
from .model import MAX_ZONE, Middlebox, State
from .pipeline import (ARP_CAPTURE, BACKEND_ANSWER, BACKEND_TABLE, BASE_COOKIE, CLAIMED, CONTROLLER_METER, ENTERED,
                       FILTER, FILTER_CONJUNCTION, FRAGMENT_TABLE, INGRESS_TABLE, MISS, NEIGHBOUR_DISCOVERY,
                       OFFLOAD_TABLE, REDIRECT, REDIRECT_FROM_SOURCE, REDIRECT_REPLY,
                       REDIRECT_TABLE, STRAY, Action, Flow, Group, cookie_of, match, port_meter)
from .stepping import Pause
from .trust import Inventory, TrustMode

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_ARP = 0x0806
ARP_REPLY = 2
ICMPV6, NEIGHBOUR_SOLICIT, NEIGHBOUR_ADVERT = 58, 135, 136
# The controller's own (locally administered) MAC for resolving and checking backends:
# replies to it come to the controller and to nobody else.
RESOLVER_MAC = "02:4d:42:00:00:01"
OFPP_IN_PORT = 0xFFFFFFF8  # output to the port a packet came in on (a plain output there is dropped)

_match = match


@dataclass(frozen=True)
class Neighbour:
    """Where a backend is: its MAC and its switch port."""

    mac: str
    port: int


@dataclass(frozen=True)
class Surroundings:
    """What the controller knows of one switch's hosts besides the desired state: the
    annotated ports (``inventory``), in a lab the backends' ARP answers (``neighbours``),
    and the backends that stopped answering health checks (``down``)."""

    mode: TrustMode = TrustMode.LAB
    inventory: Inventory = field(default_factory=Inventory)
    neighbours: Mapping[str, Neighbour] = field(default_factory=dict)
    down: frozenset[str] = frozenset()
    metered: bool = True  # the switch has the controller's meter (SwitchReconciler sets it up)
    elsewhere: Elsewhere | None = None  # the other switches, for balancers that migrated (anchors.py)

    def vouches(self, middlebox: Middlebox) -> bool:
        """The annotations of the middlebox's port still say it is this VM with these
        addresses (an unannotated port only in a lab)."""
        identity = self.inventory.at(middlebox.port)
        own = [ip for ip in (middlebox.firewall_ip, middlebox.balancer_ip) if ip is not None]
        if identity is None:
            return (self.mode is TrustMode.LAB and self.inventory.with_mac(middlebox.mac) is None
                    and not any(self.inventory.owner(ip) for ip in own))
        return identity.mac == middlebox.mac and all(
            identity.owns(ip) for ip in (middlebox.firewall_ip, middlebox.balancer_ip) if ip is not None)

    def addresses(self, middlebox: Middlebox) -> frozenset[str]:
        """The middlebox's own addresses: its port's annotations, else what it registered."""
        identity = self.inventory.at(middlebox.port)
        if identity is not None:
            return frozenset(identity.ips)
        return frozenset(ip for ip in (middlebox.firewall_ip, middlebox.balancer_ip) if ip is not None)

    def locate(self, middlebox: Middlebox, backend: str) -> Neighbour | None:
        """Where ``backend`` is, if the middlebox may use it: an annotated VM of the same
        tenant (its port and MAC), or in a lab, for an unannotated middlebox, whoever
        answered ARP for it.  An anchor's: a VM of its tenant (its own port is gone)."""
        owner = self.inventory.owner(backend)
        if middlebox.anchor is not None:
            if owner is None or owner.tenant != middlebox.anchor[1] or owner.mac == middlebox.mac:
                return None
            return Neighbour(owner.mac, owner.port)
        identity = self.inventory.at(middlebox.port)
        if owner is not None:
            if identity is None or owner.tenant != identity.tenant or owner.port == identity.port:
                return None
            return Neighbour(owner.mac, owner.port)
        if identity is None and self.mode is TrustMode.LAB:
            return self.neighbours.get(backend)
        return None


@dataclass(frozen=True)
class SwitchConfig:
    flows: frozenset[Flow]
    groups: frozenset[Group]
    unresolved: tuple[str, ...] = ()  # backends whose MAC is not known yet (labs: ARP)


CT_FLAGS = {"new": 0x01, "est": 0x02, "rel": 0x04, "rpl": 0x08, "inv": 0x10, "trk": 0x20}


def ct_state(spec: str) -> tuple[int, int]:
    """``"+est+trk-rpl"`` as the (value, mask) pair OpenFlow matches and reports."""
    value = mask = 0
    for sign, name in re.findall(r"([+-])([a-z]+)", spec):
        mask |= CT_FLAGS[name]
        value |= CT_FLAGS[name] if sign == "+" else 0
    return (value, mask)


def base_config(surroundings: Surroundings = Surroundings()) -> SwitchConfig:
    """What every switch holds without any middlebox: port security of the annotated
    ports, table misses that continue to NORMAL, what entered a redirect and matched no
    decision dropped.  Frames to the controller's resolver MAC reach the controller only
    as a backend's own answer (``compile_redirects``); in a lab, its ARP replies locate
    unannotated backends, through the controller's meter."""
    metered = (("meter", CONTROLLER_METER),) if surroundings.metered else ()
    resolver = (*metered, ("controller",)) if surroundings.mode is TrustMode.LAB else ()
    return SwitchConfig(frozenset({
        *compile_ingress(surroundings.inventory),
        Flow(OFFLOAD_TABLE, MISS, (), (("normal",),), BASE_COOKIE),
        Flow(REDIRECT_TABLE, MISS, (), (("normal",),), BASE_COOKIE),
        Flow(REDIRECT_TABLE, STRAY, _match(reg1=ENTERED), (), BASE_COOKIE),
        Flow(OFFLOAD_TABLE, ARP_CAPTURE, _match(eth_type=ETH_ARP, eth_dst=RESOLVER_MAC, arp_op=ARP_REPLY), resolver,
             BASE_COOKIE),
        Flow(OFFLOAD_TABLE, ARP_CAPTURE - 1, _match(eth_dst=RESOLVER_MAC), (), BASE_COOKIE),
    }), frozenset())


def compile_middlebox(middlebox: Middlebox, surroundings: Surroundings, pause: Pause | None = None) -> SwitchConfig:
    """The flows (all with the middlebox's cookie) and groups one middlebox needs: none
    for a middlebox its port's annotations no longer vouch for.  ``pause`` is called
    every few filters (stepping.py)."""
    if middlebox.anchor is not None:
        return compile_anchor(middlebox, surroundings, pause)
    if not surroundings.vouches(middlebox):
        pending = surroundings.elsewhere.pending_anchor(middlebox) if surroundings.elsewhere is not None else None
        return (compile_anchor(pending, surroundings, pause) if pending is not None
                else SwitchConfig(frozenset(), frozenset()))
    redirect_flows, groups, missing = compile_redirects(middlebox, surroundings)
    return SwitchConfig(frozenset(_filter_flows(middlebox, surroundings.addresses(middlebox), pause) | redirect_flows),
                        frozenset(groups),
                        tuple(sorted(missing)))


def compile_added_filters(before: Middlebox | None, after: Middlebox | None, added,
                          surroundings: Surroundings) -> frozenset[Flow] | None:
    """Only what changed, when that is cheap to know: ``after`` is ``before`` with the
    ``added`` filters more and nothing else (the caller knows which: ``Draft.added``),
    the flows that together with ``compile_middlebox(before)``'s make
    ``compile_middlebox(after)``'s, if they are all IP or MAC filters (each such filter's
    flows do not depend on the others; port filters share conjunctions and fragment
    paths, so a middlebox with any is compiled whole).  None when it does not apply.  A
    filter added to a middlebox of 10,000 then costs its own flows, and nothing here
    reads the 10,000 (whether ``before`` has port filters is remembered per filter set)."""
    if before is None or after is None or not added or not surroundings.vouches(after):
        return None
    if replace(before, filters=after.filters) != after or len(after.filters) != len(before.filters) + len(added):
        return None
    if not _plain(added) or not _plain(before.filters):
        return None
    _remember_plain(after.filters)
    return frozenset(compile_plain_filters(replace(after, filters=added), surroundings.addresses(after)))


def _filter_flows(middlebox: Middlebox, addresses: frozenset[str], pause: Pause | None) -> set[Flow]:
    """Port filters share conjunctions and fragment paths: only ``compile_filters`` builds
    those; a middlebox without any (a reconnection recompiles 100,000 such filters) takes
    the fast path."""
    if not _plain(middlebox.filters):
        return compile_filters(middlebox, addresses, pause)
    return compile_plain_filters(middlebox, addresses, pause)


# Filter sets known to hold no port filter, by identity (weakly: a set that goes is
# forgotten with it).  A middlebox's filters are one set until a job changes them, and a
# job that only adds IP and MAC filters to a plain set makes a plain one.
_PLAIN: dict[int, weakref.ref] = {}


def _plain(filters) -> bool:
    """No port filter among ``filters``, known without reading them again if this set
    was found (or made) plain before."""
    known = _PLAIN.get(id(filters))
    if known is not None and known() is filters:
        return True
    if any(f.layer is TRANSPORT_LAYER for f in filters):
        return False
    _remember_plain(filters)
    return True


def _remember_plain(filters) -> None:
    if not isinstance(filters, frozenset):  # only a set that cannot change may be remembered
        return
    key = id(filters)

    def forget(gone: weakref.ref) -> None:
        if _PLAIN.get(key) is gone:  # not a newer set that got the same id
            del _PLAIN[key]

    _PLAIN[key] = weakref.ref(filters, forget)


def compile_switch(state: State, dpid: int, surroundings: Surroundings,
                   pause: Callable[[], None] = lambda: None) -> SwitchConfig:
    """Everything switch ``dpid`` should hold.  ``pause`` is called every few filters
    (stepping.py): the shell passes a ``pacing.Pacer``, so that compiling a reconnected
    switch's 100 middleboxes (40 ms) does not hold every other switch's commands
    meanwhile; one middlebox's 250 filters between two looks at the clock held them 8 ms."""
    base = base_config(surroundings)
    flows, groups, unresolved = set(base.flows), set(base.groups), set(base.unresolved)
    for middlebox in state.on(dpid):
        part = compile_middlebox(middlebox, surroundings, pause)
        flows.update(part.flows)  # as it goes: one union of 25,000 flows at the end took 5 ms
        groups.update(part.groups)
        unresolved.update(part.unresolved)
        pause()
    return SwitchConfig(frozenset(flows), frozenset(groups), tuple(sorted(unresolved)))


def filter_cost(filter: Filter, addresses: frozenset[str]) -> int:
    """Switch entries one filter costs on its own (an upper bound within a middlebox,
    whose filters may share conjunctive clauses): what the per-middlebox limit counts.
    The count does not depend on the value of a MAC or IP source, only on its family, so
    10,000 filters of one shape are compiled once."""
    if filter.source is None or filter.layer is TRANSPORT_LAYER:
        return _cost(filter, addresses)
    family = "mac" if filter.layer is MAC_LAYER else "ipv6" if ":" in filter.source else "ipv4"
    if filter.destination is None:  # its group forms name every own address of the family: only their number counts
        addresses = _stand_ins(addresses)
    return _cost_of_shape(filter.layer, family, filter.destination, filter.tos, filter.protocol, addresses)


def filters_cost(filters, addresses: frozenset[str]) -> int:
    """``sum(filter_cost(f, addresses) for f in filters)``, each shape's cost asked for once
    (a bulk request's 100,000 filters have a handful of shapes)."""
    by_shape: dict[tuple, int] = {}
    total = 0
    for filter in filters:
        if filter.source is None or filter.layer is TRANSPORT_LAYER:
            total += _cost(filter, addresses)
            continue
        shape = (filter.layer, ":" in filter.source, filter.destination, filter.tos, filter.protocol)
        cost = by_shape.get(shape)
        if cost is None:
            cost = by_shape[shape] = filter_cost(filter, addresses)
        total += cost
    return total


@functools.lru_cache(maxsize=4096)
def _stand_ins(addresses: frozenset[str]) -> frozenset[str]:
    """As many addresses of each family as ``addresses`` holds distinct ones: a filter with
    no destination costs the same for both, and a bulk install's 1,000 middleboxes, each
    with an address of its own, then share one count (compiling it took 60 us each)."""
    own = {4: set(), 6: set()}
    for text in addresses:
        address = ipaddress.ip_address(text)
        own[address.version].add(address)
    return frozenset([str(ipaddress.IPv4Address(1 + n)) for n in range(len(own[4]))]
                     + [str(ipaddress.IPv6Address(1 + n)) for n in range(len(own[6]))])


@functools.lru_cache(maxsize=4096)
def _cost_of_shape(layer: Layer, family: str, destination, tos, protocol, addresses: frozenset[str]) -> int:
    source = {"mac": "00:00:00:00:00:00", "ipv6": "::/0", "ipv4": "0.0.0.0/0"}[family]
    return _cost(Filter(layer, source, destination, tos, protocol), addresses)


@functools.lru_cache(maxsize=4096)
def _cost(filter: Filter, addresses: frozenset[str]) -> int:
    return len(compile_filters(Middlebox(0, 0, "02:00:00:00:00:00", 1, filters=frozenset({filter})), addresses))


HANDLED_PRIORITIES = frozenset({FILTER, REDIRECT, REDIRECT_FROM_SOURCE})


def counts_as_handled(table: int, priority: int, drops: bool) -> bool:
    """A packet the middlebox would otherwise have received is decided once, by one flow:
    a filter's drop or a redirect's entry in the offload table, a conjunctive filter's
    drop (its clauses count nothing), or the drop of a fragment after reassembly.  Later
    redirect tables and replies from backends are not work taken from the middlebox."""
    if table == OFFLOAD_TABLE:
        return priority in HANDLED_PRIORITIES or (drops and priority == FILTER_CONJUNCTION)
    return drops and table == FRAGMENT_TABLE


# Every group id mbvisor may give: a block of 256 per conntrack zone (``group_id``).
GROUP_IDS = range(1 << 8, (MAX_ZONE + 1) << 8)


def owned_groups(middlebox: Middlebox) -> range:
    """Group ids that belong to a middlebox (its zone's block)."""
    return range(group_id(middlebox, 0), group_id(middlebox, 255) + 1)


# --- load-balancer redirects ------------------------------------------------------------

def group_id(middlebox: Middlebox, index: int) -> int:
    """Unique per switch: the middlebox's conntrack zone and the redirect's position
    (``Limits`` keeps redirects per middlebox within the 8 bits)."""
    return (middlebox.zone << 8) | index


def compile_anchor(anchor: Middlebox, surroundings: Surroundings, pause: Pause | None = None) -> SwitchConfig:
    """An anchor's flows: the offloads of the twin it serves (``Elsewhere.served``) for
    the traffic that enters this switch: its filters, and its redirects with the anchor's
    own zone to its tenant's backends here, entered by its MAC or as steered here; none
    without such a twin.  (Traffic for its MAC from this switch's hosts meets the anchor
    first: without the filters here, they would be bypassed.)"""
    twin = surroundings.elsewhere.served(anchor) if surroundings.elsewhere is not None else None
    if twin is None or taken(surroundings.inventory, anchor):
        return SwitchConfig(frozenset(), frozenset())
    stand_in = replace(twin, dpid=anchor.dpid, port=anchor.port, zone=anchor.zone, anchor=anchor.anchor)
    flows, groups, _ = compile_redirects(stand_in, surroundings)
    own = own_addresses(surroundings.inventory, twin)
    return SwitchConfig(frozenset(_filter_flows(stand_in, own, pause) | flows), frozenset(groups))


def compile_redirects(middlebox: Middlebox, surroundings: Surroundings) -> tuple[set[Flow], set[Group], set[str]]:
    """A redirect's flows use only the backends the surroundings locate and that answer
    health checks; a redirect with none of them left gets no flows at all, so its traffic
    goes to the middlebox itself (the offload steps aside), unless another switch holds
    its backends: then it is steered there (``anchors``).  In a lab, a backend nobody
    has answered ARP for yet makes the whole middlebox unresolved."""
    if middlebox.balancer_ip is None or not middlebox.redirects:
        return set(), set(), set()
    backends = sorted({b for r in middlebox.redirects for b in r.backends})
    located = {b: surroundings.locate(middlebox, b) for b in backends}
    if middlebox.anchor is None and surroundings.inventory.at(middlebox.port) is None:
        missing = {b for b, where in located.items() if where is None}
        if missing:
            return set(), set(), missing
    live = {b: where for b, where in located.items() if where is not None and b not in surroundings.down}
    # Traffic steered here by the switch the balancer went to comes to one of its backends'
    # MACs (``Steer``): accepted as the balancer's own while another switch holds it.
    steered_here = middlebox.anchor is not None or (
        surroundings.elsewhere is not None and surroundings.elsewhere.twinned(middlebox))
    steers = surroundings.elsewhere.steers(middlebox) if (
        surroundings.elsewhere is not None and middlebox.anchor is None) else ()
    cookie, zone, address = cookie_of(middlebox.mac), middlebox.zone, middlebox.balancer_ip
    ip, eth_type = _ip_prefix(address), _eth_type(address)
    enter = (("set_field", "reg1", ENTERED), ("ct_nat", zone, REDIRECT_TABLE))
    flows: set[Flow] = set()
    groups: set[Group] = set()
    used: set[str] = set()
    for index, redirect in enumerate(middlebox.redirects):
        pool = [b for b in redirect.backends if b in live]
        priority = REDIRECT_FROM_SOURCE if redirect.source else REDIRECT
        source = {f"{ip}_src": _address_match(redirect.source)}
        if not pool:
            flows |= _steering(middlebox, redirect.backends, steers, priority, source, cookie)
            continue
        used.update(pool)
        entries = [middlebox.mac] + ([located[b].mac for b in redirect.backends if located.get(b) is not None]
                                     if steered_here else [])
        for mac in dict.fromkeys(entries):
            flows.add(Flow(OFFLOAD_TABLE, priority,
                           _match(eth_type=eth_type, eth_dst=mac, **{f"{ip}_dst": address}, **source),
                           enter, cookie))
        group = Group(group_id(middlebox, index), tuple(
            (("set_field", "reg0", _bucket_mark(middlebox, index, i)), ("resubmit", BACKEND_TABLE))
            for i in range(len(pool))))
        groups.add(group)
        flows.add(Flow(REDIRECT_TABLE, priority,
                       _match(eth_type=eth_type, ct_state=ct_state("+new+trk"), ct_zone=zone, reg1=ENTERED,
                              **{f"{ip}_dst": address}, **source),
                       (("group", group.group_id),), cookie))
        for i, backend in enumerate(pool):
            flows.add(Flow(BACKEND_TABLE, REDIRECT,
                           _match(eth_type=eth_type, reg0=_bucket_mark(middlebox, index, i)),
                           (("ct_commit_nat", zone, backend), *_to(live[backend])), cookie))
    for backend in sorted({b for b, where in located.items() if where is not None}):
        flows.add(_health_answer(backend, located[backend], cookie, surroundings.metered))
    if ip == "ipv6" and middlebox.anchor is None:  # neighbour discovery for the balancer's address is its own
        for icmp_type in (NEIGHBOUR_SOLICIT, NEIGHBOUR_ADVERT):
            flows.add(Flow(OFFLOAD_TABLE, NEIGHBOUR_DISCOVERY,
                           _match(eth_type=ETH_IPV6, eth_dst=middlebox.mac, ipv6_dst=address, ip_proto=ICMPV6,
                                  icmpv6_type=icmp_type), (("normal",),), cookie))
    for backend in sorted(used):
        where = live[backend]
        # Only the backend's own port and MAC enter the zone as the backend (port security
        # keeps its address its own); what is not a reply of a redirected connection
        # continues to NORMAL in the redirect table unchanged.
        flows.add(Flow(OFFLOAD_TABLE, REDIRECT_REPLY,
                       _match(in_port=where.port, eth_src=where.mac, eth_type=eth_type, **{f"{ip}_src": backend}),
                       (("ct_nat", zone, REDIRECT_TABLE),), cookie))
        # Every later packet towards the backend, in any state but invalid: established,
        # and +new after NAT (one-way UDP, a SYN retransmitted to a slow backend).
        flows.add(Flow(REDIRECT_TABLE, REDIRECT,
                       _match(eth_type=eth_type, ct_state=ct_state("+trk-rpl-inv"), ct_zone=zone, reg1=ENTERED,
                              **{f"{ip}_dst": backend}),
                       _to(where), cookie))
    if used:
        flows.add(Flow(REDIRECT_TABLE, REDIRECT, _match(ct_state=ct_state("+trk+rpl"), ct_zone=zone, reg1=0),
                       (("output_ct_mark",),), cookie))
    return flows, groups, set()


def _steering(middlebox: Middlebox, backends, steers: tuple[Steer, ...], priority: int, source: dict,
              cookie: int) -> set[Flow]:
    """A redirect without backends here, towards the first switch that holds some of them:
    its packets get the first such backend's MAC and leave through the underlay port to
    that switch (never NORMAL: it would flood them until it learned that MAC); their
    replies, the balancer's address as their source, may come back through that port from
    those backends' MACs (port security would drop them as a claim of its address)."""
    steer = next((s for s in steers if any(b in s.backends for b in backends)), None)
    if steer is None:
        return set()
    address = middlebox.balancer_ip
    ip, eth_type = _ip_prefix(address), _eth_type(address)
    mac = next(steer.backends[b] for b in backends if b in steer.backends)
    entry = {"eth_type": eth_type, "eth_dst": middlebox.mac, f"{ip}_dst": address, **source}
    flows = {Flow(OFFLOAD_TABLE, priority, _match(**entry), (("set_field", "eth_dst", mac), ("output", steer.port)),
                  cookie),
             # from the underlay port itself (a client behind it): out again, through IN_PORT
             Flow(OFFLOAD_TABLE, priority + 1, _match(in_port=steer.port, **entry),
                  (("set_field", "eth_dst", mac), ("output", OFPP_IN_PORT)), cookie)}
    for backend_mac in sorted(set(steer.backends.values())):
        flows.add(Flow(INGRESS_TABLE, CLAIMED + 1, _match(in_port=steer.port, eth_src=backend_mac, eth_type=eth_type,
                                                          **{f"{ip}_src": address}),
                       (("goto", OFFLOAD_TABLE),), cookie))
    return flows


def _health_answer(backend: str, where: Neighbour, cookie: int, metered: bool) -> Flow:
    """A backend's answer to a health check (ARP, or neighbour discovery for IPv6), from
    its own port and MAC only, to the controller through that port's own meter."""
    if _eth_type(backend) == ETH_IPV4:
        fields = {"eth_type": ETH_ARP, "arp_op": ARP_REPLY, "arp_spa": backend}
    else:
        fields = {"eth_type": ETH_IPV6, "ip_proto": ICMPV6, "icmpv6_type": NEIGHBOUR_ADVERT, "ipv6_nd_target": backend}
    actions = ((("meter", port_meter(where.port)),) if metered else ()) + (("controller",),)
    return Flow(OFFLOAD_TABLE, BACKEND_ANSWER,
                _match(in_port=where.port, eth_src=where.mac, eth_dst=RESOLVER_MAC, **fields), actions, cookie)


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
