"""The pipeline's fixed numbers: tables, priorities, cookies, registers.

One place for them, because three compilers share them (``ingress`` for port security,
``filters`` for firewall filters, ``flows`` for redirects and the switch as a whole) and
every flow one writes must fit between the others' (docs/controller.md, "Pipeline").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

Match = tuple[tuple[str, object], ...]
Action = tuple


class Flow(NamedTuple):
    """One flow as compiled.  A named tuple: a bulk install makes and hashes two per
    filter, and a frozen dataclass costs two and a half times as much to make (its hash
    is the same tuple's, so sets of flows keep their order)."""

    table: int
    priority: int
    match: Match
    actions: tuple[Action, ...]
    cookie: int


@dataclass(frozen=True, order=True)
class Group:
    group_id: int
    buckets: tuple[tuple[Action, ...], ...]


def match(**fields) -> Match:
    """A match as sorted (field, value) pairs, None values left out: equal matches compare
    equal however they were built.  Pairs are shared between matches: the reconciler keeps
    200,000 matches, most of them the same MAC and ether type with one address each."""
    return match_of(fields)


def match_of(fields: dict) -> Match:
    """``match(**fields)`` for a dict the caller built (no copy of it into keywords)."""
    pairs = [shared_pair(name, value) for name, value in fields.items() if value is not None]
    pairs.sort()
    return tuple(pairs)


_ADDRESS_FIELDS = frozenset({"ipv4_src", "ipv4_dst", "ipv6_src", "ipv6_dst", "arp_spa", "ipv6_nd_target"})
_PAIRS: dict[tuple, tuple] = {}
MAX_SHARED_PAIRS = 1 << 16
_RECENT_ADDRESSES: dict[tuple, tuple] = {}
MAX_RECENT_ADDRESSES = 64


def shared_pair(name: str, value) -> tuple:
    """Fields with few values (MACs, ether types, ports) share one pair for as long as the
    table stays under its bound.  Addresses have too many values for that, but one filter's
    address appears in two flows compiled one after the other, and a middlebox's own address
    in each of its group-frame drops: a small table of the last few addresses shares those
    (about 110 bytes per filter at 100k filters)."""
    pair = (name, value)
    if name in _ADDRESS_FIELDS:
        table, bound = _RECENT_ADDRESSES, MAX_RECENT_ADDRESSES
    else:
        table, bound = _PAIRS, MAX_SHARED_PAIRS
    shared = table.get(pair)
    if shared is None:
        if len(table) >= bound:
            table.clear()
        shared = table[pair] = pair
    return shared

# --- tables ------------------------------------------------------------------------------
INGRESS_TABLE = 0    # port security: a VM port sends only its own MAC and addresses
OFFLOAD_TABLE = 1    # firewall filters and redirect entries; the rest continues to NORMAL
REDIRECT_TABLE = 2   # after conntrack: a new connection picks a backend, others follow theirs
BACKEND_TABLE = 3    # commit a new connection with destination NAT to its backend
FRAGMENT_TABLE = 4   # IP fragments for a filtered middlebox, after conntrack reassembled them

# --- priorities in the ingress table -----------------------------------------------------
PORT_TAGGED = 5200       # VLAN-tagged frames from a VM port: an access port sends none
PORT_CHECKED = 5150      # a finer drop above the allowances (e.g. neighbour adverts of others' addresses)
PORT_ALLOWED = 5100      # the port's own MAC with its own addresses
PORT_SPOOFED = 5050      # the port's own MAC with addresses that are not its own
PORT_OTHER = 5000        # the port's own MAC, neither IP nor ARP (LLDP, ...)
PORT_WRONG_MAC = 4950    # anything else from an annotated port
CLAIMED = 4900           # an annotated VM's MAC or address sent from any other port

# --- priorities in the offload table -----------------------------------------------------
BACKEND_ANSWER = 4010  # a backend's own answer to a health check: to the controller, through its port's meter
ARP_CAPTURE = 4000     # anything else to the resolver's MAC: dropped, or in a lab its ARP replies
NEIGHBOUR_DISCOVERY = 2200  # neighbour discovery for a balancer's IPv6 address stays out of its redirects
FILTER = 3000
FILTER_CONJUNCTION = 2990  # conjunctive filters, apart from plain ones (OVS leaves mixed ties undefined)
REDIRECT_FROM_SOURCE = 2100
REDIRECT = 2000
REDIRECT_REPLY = 1900  # below every entry flow: a backend talking to another MB's address enters that MB
STRAY = 1000           # a redirect's packets that match no decision: dropped, never NORMAL
MISS = 0

# --- cookies -----------------------------------------------------------------------------
COOKIE_TAG = 0x4D42 << 48
COOKIE_TAG_MASK = 0xFFFF << 48
BASE_COOKIE = COOKIE_TAG  # flows every switch gets; MAC 0 is no middlebox's (model refuses it)
PORT_COOKIE = COOKIE_TAG | (0x01 << 40)  # | port number: a multicast "MAC", so never a middlebox's


def cookie_of(mac: str) -> int:
    """A middlebox's flows carry its MAC (model.apply refuses multicast and zero MACs)."""
    return COOKIE_TAG | int(mac.replace(":", ""), 16)


def port_cookie(port: int) -> int:
    """The port-security flows of one annotated port."""
    return PORT_COOKIE | port


def is_port_cookie(cookie: int) -> bool:
    return cookie & ~0xFFFFFFFF == PORT_COOKIE

# --- meters ---------------------------------------------------------------------------------
CONTROLLER_METER = 1    # a lab's ARP replies to the resolver (MBVISOR_CONTROLLER_PPS)
PORT_METERS = 0x10000   # + port number: one backend's health answers (OVS numbers ports below 0xff00)


def port_meter(port: int) -> int:
    """Each backend port's answers pass their own meter: a flood from one port cannot
    starve another's health checks."""
    return PORT_METERS + port

# --- registers -----------------------------------------------------------------------------
# reg1 marks a packet that entered a redirect through its middlebox's address, so the
# redirect table can tell it from the backends' own traffic (registers survive conntrack's
# recirculation).  reg0 carries a select-group bucket's choice (flows._bucket_mark).
ENTERED = 1
