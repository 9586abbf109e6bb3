"""Who may say what: the operator's annotations of VM ports, and the checks they allow.

The operator (whoever starts a VM and plugs its port) annotates the port's OVS interface:
``attached-mac``, ``vm-id``, ``mbvisor-tenant`` and ``mbvisor-ips`` (the VM's own
addresses, like a cloud port's fixed IPs).  The host agent reads them and publishes one
switch's annotated ports to the controller as its *inventory*.  From then on:

* a middlebox may register only its own port's MAC and addresses;
* a backend must be an address of a VM of the same tenant on the same switch, and is
  located by its port's annotations (MAC and port), never by whoever answers ARP;
* port security (``ingress``) lets each annotated port send only its own MAC and
  addresses, and no other port send them.

Duplicated identities are the operator's mistake and are never resolved by arrival order:
every port sharing a MAC, an address or a port number with another is refused, loudly.

``TrustMode.LAB`` is the explicit opt-in for unannotated labs: commands from ports without
annotations are accepted as before (any address, backends located by ARP), with none of
these guarantees.  Annotated ports are checked in both modes.  Everything here is pure.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_ADDRESSES = 64  # per port


class TrustMode(enum.Enum):
    ANNOTATIONS = "annotations"
    LAB = "lab"


@dataclass(frozen=True)
class PortIdentity:
    """One annotated VM port, as the operator configured it."""

    port: int
    mac: str
    tenant: str
    vm_id: str = ""
    ips: tuple[str, ...] = ()
    interface: str = ""

    def owns(self, address: str) -> bool:
        return canonical(address) in self.ips


@dataclass(frozen=True)
class Underlay:
    """A port of the hypervisor's bridge that leads to other hypervisors (an uplink, a
    tunnel), as the operator annotated it (``mbvisor-underlay``): the datapath ids of the
    switches it leads to, or None for every other one.  A balancer that migrated away from
    its backends sends their traffic back to them through it (anchors.py)."""

    port: int
    interface: str = ""
    leads_to: frozenset[int] | None = None

    def reaches(self, dpid: int) -> bool:
        return self.leads_to is None or dpid in self.leads_to


@dataclass(frozen=True)
class Refused:
    port: int
    interface: str
    reason: str


@dataclass(frozen=True)
class Inventory:
    """One switch's annotated ports (duplicates already refused), indexed for look-ups."""

    ports: Mapping[int, PortIdentity] = field(default_factory=dict)
    refused: tuple[Refused, ...] = ()
    by_address: Mapping[str, PortIdentity] = field(default_factory=dict)
    by_mac: Mapping[str, PortIdentity] = field(default_factory=dict)
    underlay: tuple[Underlay, ...] = ()

    def at(self, port: int) -> PortIdentity | None:
        return self.ports.get(port)

    def with_mac(self, mac: str) -> PortIdentity | None:
        return self.by_mac.get(mac)

    def without(self, port: int) -> "Inventory":
        """The inventory once ``port`` is gone from the switch: a reused number must not
        speak for the VM that had it until the agent publishes again."""
        return build_inventory([entry for entry in self.entries if entry.port != port])

    def toward(self, dpid: int) -> int | None:
        """The underlay port that leads to switch ``dpid``: one that names it, else one that
        leads everywhere (the lowest number of either); None if none does."""
        named = [u.port for u in self.underlay if u.leads_to is not None and dpid in u.leads_to]
        anywhere = [u.port for u in self.underlay if u.leads_to is None]
        return min(named or anywhere, default=None)

    def owner(self, address: str) -> PortIdentity | None:
        return self.by_address.get(canonical(address))

    @property
    def identities(self) -> tuple[PortIdentity, ...]:
        return tuple(self.ports[port] for port in sorted(self.ports))

    @property
    def entries(self) -> tuple[PortIdentity | Underlay, ...]:
        """Everything accepted, as published (``build_inventory`` makes it again)."""
        return self.identities + self.underlay


def canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


def build_inventory(entries: Iterable[PortIdentity | Underlay]) -> Inventory:
    """The accepted ports: every port that shares its number, its MAC or one of its
    addresses with another is refused, all of them, with the reason.  An underlay port
    shares nothing but its number (with a VM port or another underlay port: all refused)."""
    entries = list(entries)
    underlay = [e for e in entries if isinstance(e, Underlay)]
    entries = [e for e in entries if not isinstance(e, Underlay)]
    numbers = Counter([e.port for e in entries] + [u.port for u in underlay])
    claims: dict[tuple[str, str], list[PortIdentity]] = {}
    for entry in entries:
        claims.setdefault(("port", str(entry.port)), []).append(entry)
        claims.setdefault(("MAC", entry.mac), []).append(entry)
        for address in entry.ips:
            claims.setdefault(("address", address), []).append(entry)
    reasons: dict[int, list[str]] = {}
    for entry in entries:
        for address in entry.ips:
            if problem := unusable_address(address):  # e.g. 0.0.0.0: its claim drop would stop everyone's DHCP
                reasons.setdefault(id(entry), []).append(f"{problem}, no VM's own")
    for (kind, value), holders in claims.items():
        if len(holders) > 1:
            reason = f"{kind} {value} is claimed by {_claimants(holders)}"
            for holder in holders:
                reasons.setdefault(id(holder), []).append(reason)
    for entry in entries:
        if numbers[entry.port] > 1 and not any(r.startswith("port ") for r in reasons.get(id(entry), ())):
            reasons.setdefault(id(entry), []).append(f"port {entry.port} is also an underlay port")
    accepted = {e.port: e for e in entries if id(e) not in reasons}
    refused = [Refused(e.port, e.interface, _first_reasons(reasons[id(e)])) for e in entries if id(e) in reasons]
    refused += [Refused(u.port, u.interface, f"underlay port {u.port} shares its number with another port")
                for u in underlay if numbers[u.port] > 1]
    return Inventory(accepted, tuple(sorted(refused, key=lambda r: (r.port, r.interface))),
                     {address: e for e in accepted.values() for address in e.ips},
                     {e.mac: e for e in accepted.values()},
                     tuple(sorted((u for u in underlay if numbers[u.port] == 1), key=lambda u: u.port)))


NAMED_CLAIMANTS = 4  # a refusal names this many of the ports sharing a value, then counts the rest


def _claimants(holders: list[PortIdentity]) -> str:
    """The first few ports (in order) and how many more: every holder's refusal carries
    this text, so naming all of 4,096 ports would make each reason 4,096 names long and the
    whole answer gigabytes (a hostile inventory wedged the controller that way)."""
    names = sorted(f"{h.interface or '?'} (port {h.port})" for h in holders)
    more = len(names) - NAMED_CLAIMANTS
    return ", ".join(names[:NAMED_CLAIMANTS]) + (f" and {more} more" if more > 0 else "")


def _first_reasons(reasons: list[str]) -> str:
    """A port's reasons, the first few and how many more: a port of 64 addresses that all
    others claim too would otherwise carry 65 of them (a 30 MB answer for 4,096 ports)."""
    ordered = sorted(reasons)
    more = len(ordered) - NAMED_CLAIMANTS
    return "; ".join(ordered[:NAMED_CLAIMANTS]) + (f"; and {more} more" if more > 0 else "")


def unusable_address(text: str) -> str | None:
    """Why an address can be no middlebox's and no backend's, or None.  Refused at once,
    never probed: the switch would flood probes for an address nobody may answer for."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return f"{text} is not an IP address"
    if getattr(address, "scope_id", None):
        return f"{text} is a scoped address; give the address alone"
    if address.is_unspecified:
        return f"{text} is the unspecified address"
    if address.is_loopback:
        return f"{text} is a loopback address"
    if address.is_multicast:
        return f"{text} is a multicast address"
    if address.version == 4 and (address == ipaddress.IPv4Address("255.255.255.255") or address.is_reserved):
        return f"{text} is a broadcast or reserved address"
    if address.version == 6 and address.is_link_local:
        return f"{text} is a link-local address; give the VM's global address"
    return None


Problem = tuple[str, str]  # (code, message) as model.ApplyError carries them


def check_registration(mode: TrustMode, inventory: Inventory, port: int, mac: str,
                       address: str | None) -> Problem | None:
    """May the guest on ``port`` speak for ``mac`` (and register ``address``)?"""
    if address is not None and (reason := unusable_address(address)):
        return ("bad-address", f"{reason}; a middlebox registers one of its own unicast addresses")
    identity = inventory.at(port)
    if identity is None:
        if mode is TrustMode.LAB:  # a lab's guest must not claim an annotated VM's identity either
            if (holder := inventory.with_mac(mac)) is not None:
                return ("foreign-mac", f"{mac} is the MAC of port {holder.port}")
            owner = inventory.owner(address) if address is not None else None
            if owner is not None:
                return ("foreign-address", f"{address} is the address of port {owner.port}")
            return None
        return ("unannotated-port", f"port {port} has no mbvisor annotations (attached-mac, mbvisor-tenant, "
                                    "mbvisor-ips); the operator must annotate it before it can offload")
    if identity.mac != mac:
        return ("foreign-mac", f"{mac} is not the MAC of port {port} ({identity.mac})")
    if address is not None and not identity.owns(address):
        owned = ", ".join(identity.ips) or "none"
        return ("foreign-address", f"{address} is not an address of port {port} (its addresses: {owned})")
    return None


def check_backends(mode: TrustMode, inventory: Inventory, port: int, backends: Iterable[str]) -> Problem | None:
    """Each backend must be usable and, for an annotated middlebox (always, outside a
    lab), an address of another VM of its own tenant on this switch."""
    identity = inventory.at(port)
    for backend in backends:
        if reason := unusable_address(backend):
            return ("bad-backend", f"{reason}; a backend is a VM's unicast address")
        owner = inventory.owner(backend)
        if identity is None:
            if mode is not TrustMode.LAB:
                return ("unannotated-port", f"port {port} has no mbvisor annotations")
            if owner is not None:  # annotated VMs serve their own tenant, in a lab too
                return ("foreign-backend", f"backend {backend} is an annotated VM's address")
            continue
        if owner is None:
            return ("unknown-backend", f"backend {backend} is no annotated VM's address on this switch")
        if owner.tenant != identity.tenant:
            return ("foreign-backend", f"backend {backend} belongs to another tenant")
        if owner.port == identity.port:
            return ("bad-backend", f"backend {backend} is the middlebox's own address")
    return None
