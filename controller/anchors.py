"""A balancer's redirects run where its backends are, wherever the balancer itself is.

Conntrack is per host: a redirected connection lives in the zone of the switch that
redirected it, beside its backend.  When a load balancer's VM migrates to another host
and its backends stay, the connections open through it must go on there.  So:

* The switch a balancer went to *steers* its redirect traffic to the switch that holds its
  backends (a twin that still has them, or an anchor): the destination MAC becomes one
  backend's there, out of the underlay port that leads to it (``Inventory.toward``); the
  redirect's replies coming back through that port may carry the balancer's address.
* The balancer's entry on the backends' switch accepts traffic so steered besides its own
  MAC, and when its port there goes (or the source agent deletes the VM that left) it
  stays as an *anchor* (``Middlebox.anchor``: the VM and tenant its port was annotated
  with): it keeps its conntrack zone and its redirects (their backends stay its own on
  that switch) and runs its twin's, until no twin of that VM with redirects for backends
  there is left (``needless``).

Only annotations pair anything: the twin is the same VM (``vm-id``, tenant, MAC) annotated
on another switch, and backends are located by its tenant's own annotations on the
anchor's switch.  Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, NamedTuple

from .migration import identity_of, same_vm
from .model import Middlebox, State
from .trust import Inventory, PortIdentity


class Steer(NamedTuple):
    """Where a balancer's redirect traffic goes from this switch: switch ``dpid``, through
    this switch's ``port``; ``backends`` (address -> MAC) are the balancer's there."""

    dpid: int
    port: int
    backends: Mapping[str, str]


def backends_of(middlebox: Middlebox) -> tuple[str, ...]:
    return tuple(dict.fromkeys(b for r in middlebox.redirects for b in r.backends))


def located(inventory: Inventory, tenant: str, addresses, mac: str) -> dict[str, PortIdentity]:
    """Of ``addresses``, those annotated VMs of ``tenant`` own on this switch (not the
    balancer's own port, ``mac``)."""
    found = {}
    for address in addresses:
        owner = inventory.owner(address)
        if owner is not None and owner.tenant == tenant and owner.mac != mac:
            found[address] = owner
    return found


@dataclass(frozen=True)
class Elsewhere:
    """The other switches, as far as switch ``dpid``'s redirects need them; ``departed``:
    by switch, the annotations of ports that lost them (the port went, or the agent
    published its inventory without it) whose entries are not retired yet."""

    dpid: int
    state: State
    inventories: Mapping[int, Inventory]
    departed: Mapping[int, Mapping[int, PortIdentity]] = field(default_factory=dict)

    def _identity(self, dpid: int, entry: Middlebox) -> PortIdentity | None:
        """The VM an entry's port is annotated as, or was until it lost its annotations."""
        identity = identity_of(entry, self.inventories.get(dpid, Inventory()))
        if identity is None:
            was = self.departed.get(dpid, {}).get(entry.port)
            if was is not None and was.mac == entry.mac and was.vm_id:
                return was
        return identity

    def pending_anchor(self, middlebox: Middlebox) -> Middlebox | None:
        """A balancer of this switch whose port lost its annotations, not retired yet: the
        anchor its retirement will leave, if any (its VM's twin still needs it), run as one
        meanwhile, so that nothing steered here is lost in between."""
        if middlebox.anchor is not None or not middlebox.redirects:
            return None
        was = self.departed.get(self.dpid, {}).get(middlebox.port)
        if was is None or was.mac != middlebox.mac or not was.vm_id:
            return None
        anchor = replace(middlebox, filters=frozenset(), anchor=(was.vm_id, was.tenant))
        return None if needless(self.state, self.inventories, anchor) else anchor

    def _others(self, mac: str):
        for dpid in self.state.holders(mac):
            if dpid != self.dpid:
                yield dpid, self.state.find(dpid, mac)

    def twinned(self, middlebox: Middlebox) -> bool:
        """Another switch holds an entry of this MAC (a twin, or an anchor)."""
        return any(True for _ in self._others(middlebox.mac))

    def served(self, anchor: Middlebox) -> Middlebox | None:
        """The twin an anchor runs the redirects of: of its MAC, on another switch,
        annotated there as the anchor's VM (the first such, by switch)."""
        for dpid, entry in self._others(anchor.mac):
            identity = identity_of(entry, self.inventories.get(dpid, Inventory())) if entry.anchor is None else None
            if identity is not None and (identity.vm_id, identity.tenant) == anchor.anchor:
                return entry
        return None

    def steers(self, middlebox: Middlebox) -> tuple[Steer, ...]:
        """Where this switch's ``middlebox`` may send redirect traffic: each other switch
        holding its anchor, or its twin (the same VM), with backends of its tenant there,
        that an underlay port of this switch leads to.  An entry whose port lost its
        annotations, not retired yet, counts as what it was (``pending_anchor``: it runs as
        the anchor it will be): steering must not stop for that moment; an entry whose port
        is unannotated and was never seen annotated accepts nothing, and gets nothing."""
        here = identity_of(middlebox, self.inventories.get(self.dpid, Inventory()))
        if here is None:
            return ()
        found = []
        for dpid, entry in self._others(middlebox.mac):
            if entry.anchor is not None:
                if entry.anchor != (here.vm_id, here.tenant):
                    continue
                tenant = here.tenant
            else:
                there = self._identity(dpid, entry)
                if there is None or not same_vm(there, here):
                    continue
                tenant = there.tenant
            port = self.inventories.get(self.dpid, Inventory()).toward(dpid)
            if tenant != here.tenant or port is None:
                continue
            backends = located(self.inventories.get(dpid, Inventory()), tenant, backends_of(middlebox), middlebox.mac)
            if backends:
                found.append(Steer(dpid, port, {address: owner.mac for address, owner in backends.items()}))
        return tuple(found)


def kept_as_anchors(state: State, dpid: int, gone, inventories: Mapping[int, Inventory],
                    identities: Mapping[int, PortIdentity]) -> list[Middlebox]:
    """Of the balancers on ``dpid`` that ``gone`` (their port went, or the source agent
    deleted the VM that left), the anchors they leave: those whose port was annotated
    (``identities``, by port) as a VM whose twin elsewhere has redirects with backends of
    its tenant here.  An anchor keeps its zone, addresses and redirects (they stay its own
    on that switch), no filters."""
    anchors = []
    for middlebox in gone:
        identity = identities.get(middlebox.port)
        if (middlebox.anchor is not None or not middlebox.redirects or identity is None
                or identity.mac != middlebox.mac or not identity.vm_id):
            continue
        anchor = replace(middlebox, filters=frozenset(), anchor=(identity.vm_id, identity.tenant))
        if not needless(state, inventories, anchor):
            anchors.append(anchor)
    return anchors


def needless(state: State, inventories: Mapping[int, Inventory], anchor: Middlebox) -> bool:
    """Whether nothing needs ``anchor`` any more: no twin of its VM elsewhere, none whose
    redirects have backends of its tenant on its switch, or its MAC annotated there as
    another VM now (``taken``)."""
    serving = Elsewhere(anchor.dpid, state, inventories).served(anchor)
    here = inventories.get(anchor.dpid, Inventory())
    return (serving is None or taken(here, anchor)
            or not located(here, anchor.anchor[1], backends_of(serving), anchor.mac))


def taken(inventory: Inventory, anchor: Middlebox) -> bool:
    """Its switch's annotations give its MAC to another VM (MACs are unique per switch
    only): what is sent to that MAC there is that VM's, never the anchor's to filter or
    redirect."""
    shown = inventory.with_mac(anchor.mac)
    return shown is not None and (shown.vm_id, shown.tenant) != anchor.anchor


def own_addresses(inventory: Inventory, twin: Middlebox) -> frozenset[str]:
    """The addresses an anchor's filters treat as its own (their group-frame forms): its
    twin's, but none that a VM of the anchor's switch holds (that group traffic is its)."""
    return frozenset(ip for ip in (twin.firewall_ip, twin.balancer_ip)
                     if ip is not None and inventory.owner(ip) is None)


def affected(state: State, dpid: int, macs, dpids) -> tuple[dict[int, set[str]], dict[int, set[str]]]:
    """After a change of ``macs`` on switch ``dpid`` (its entries, or its annotations): by
    other switch among ``dpids``, the balancers of those MACs to compile again (they may
    steer to it, or be steered from it), and the anchors to look at (they may be needless
    now).  A firewall's twin compiles nothing from the other side: it is left alone."""
    again: dict[int, set[str]] = {}
    anchors: dict[int, set[str]] = {}
    wanted = set(dpids)
    for mac in macs:
        for other in state.holders(mac):
            if other == dpid or other not in wanted:
                continue
            entry = state.find(other, mac)
            if entry.anchor is not None:
                anchors.setdefault(other, set()).add(mac)
            elif entry.redirects:
                again.setdefault(other, set()).add(mac)
    return again, anchors


def steering_macs(middleboxes) -> set[str]:
    """The MACs of a switch's entries whose annotations other switches' flows read: its
    balancers and anchors."""
    return {mb.mac for mb in middleboxes if mb.redirects or mb.anchor is not None}
