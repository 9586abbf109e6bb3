"""A middlebox that follows its VM from one hypervisor to another (live migration).

The desired state is kept per switch, (dpid, MAC), as the switch's flows are.  What makes
two entries on two switches the same middlebox is the operator's word: both ports are
annotated with the same VM (``vm-id``), tenant and MAC.  Such entries are *twins*, and
mbvisor keeps them equal:

* When a switch's annotations show a VM whose middlebox lives on another switch (QEMU's
  paused destination is plugged in while the source still runs), the middlebox is copied
  there: the destination's flows are in place before the guest resumes on it.
* While both exist, a command from either side changes both (the other by a copy, made
  as soon as the first side confirmed).
* When the source's port goes (QEMU's source ends), the source's entry is retired as any
  departed VM's is; the destination's stays, and with it the offloads.

A copy to make is a :class:`Copy`; the shell stores it in the transaction that stores the
change asking for it (or the annotations that show the arrival) and forgets it in the one
that stores the copy, so a controller stopped in between makes it at its next start.

Nothing here trusts a guest: only annotations on both switches pair two entries, a copy
has the destination's port and a zone of its own, and an unannotated (lab) port never
has a twin.  Everything here is pure.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from .model import MAX_ZONE, Middlebox, State, check_can_hold, redirect_order
from .trust import Inventory, PortIdentity


def identity_of(middlebox: Middlebox, inventory: Inventory) -> PortIdentity | None:
    """The annotated VM behind a middlebox's port, if its annotations name its MAC and a
    VM (``vm-id``): only such a middlebox can have a twin."""
    identity = inventory.at(middlebox.port)
    if identity is None or identity.mac != middlebox.mac or not identity.vm_id:
        return None
    return identity


def same_vm(one: PortIdentity, other: PortIdentity) -> bool:
    return (one.vm_id, one.tenant, one.mac) == (other.vm_id, other.tenant, other.mac)


def twin_ports(identity: PortIdentity, home: int, inventories: dict[int, Inventory]) -> list[tuple[int, int]]:
    """(dpid, port) of every other switch whose annotations show the same VM."""
    homes = []
    for dpid in sorted(inventories):
        if dpid == home:
            continue
        there = inventories[dpid].with_mac(identity.mac)
        if there is not None and same_vm(there, identity):
            homes.append((dpid, there.port))
    return homes


def arrivals(state: State, inventories: dict[int, Inventory], dpid: int, retiring=frozenset()) -> list["Copy"]:
    """The copies to switch ``dpid`` of the middleboxes on other switches whose VM its
    annotations now show and that it does not hold yet on that port: an entry of that MAC on
    another port, or on one of the ports ``retiring`` (gone, their retirement queued; a port
    added again often gets its old number back), is a gone port's, and the copy replaces it.  Each carries its origin whole, as
    a change that made it, and its VM: if the origin is gone by the time the copy is made
    (the source's port went while the destination was busy), the copy is still made from
    it (``left_behind``)."""
    here = inventories.get(dpid, Inventory())
    found = []
    for middlebox in state.middleboxes:
        if middlebox.dpid == dpid:
            continue
        identity = identity_of(middlebox, inventories.get(middlebox.dpid, Inventory()))
        there = here.with_mac(middlebox.mac)
        held = state.find(dpid, middlebox.mac)
        if held is not None and held.anchor is None and held.port not in retiring and (there is None or held.port == there.port):
            continue  # held there already
        if identity is not None and there is not None and same_vm(there, identity):
            found.append(Copy(dpid, middlebox.key, False, (None, middlebox), (identity.vm_id, identity.tenant)))
    return found


def named_only_now(middleboxes, before: Inventory, after: Inventory) -> set[str]:
    """The MACs of a switch's ``middleboxes`` whose port the annotations ``after`` name as a
    VM where ``before`` annotated the same MAC without a VM (``vm-id`` given later): their
    twins elsewhere are arrivals to make now.  Not a port whose annotations were missing or
    refused before: the twin there may be one a guest's cancel, made meanwhile, removed."""
    found = set()
    for middlebox in middleboxes:
        was = before.at(middlebox.port)
        if (identity_of(middlebox, after) is not None and was is not None and was.mac == middlebox.mac
                and not was.vm_id):
            found.add(middlebox.mac)
    return found


class Copy(NamedTuple):
    """Switch ``dpid``'s twin of ``origin`` (dpid, MAC) to be made equal to it: given only
    ``change`` (the (before, after) of the origin's job, ``compact``), or whole (None); a
    copy whose origin is gone removes the twin only if the guest ``cancelled`` it there,
    and otherwise still brings the change to it if ``dpid``'s annotations show the ``vm``
    (vm-id, tenant) the copy was asked for (``adopted``)."""

    dpid: int
    origin: tuple[int, str]
    cancelled: bool = False
    change: tuple[Middlebox | None, Middlebox | None] | None = None
    vm: tuple[str, str] | None = None


def copies_after(dpid: int, before: State, after: State, touched, by_guests: bool,
                 inventories: dict[int, Inventory]) -> list[Copy]:
    """The copies a confirmed job on ``dpid`` asks for: each middlebox it ``touched`` whose VM
    another switch's annotations show, to that switch, with the job's change.  A removal is
    copied only when guests' commands made it (``by_guests``: every request carried a
    channel's key): the source agent's delete of a VM that left (no key) must not take the
    offloads away from the host the VM went to."""
    inventory = inventories.get(dpid, Inventory())
    copies = []
    for mac in sorted(touched):
        now, was = after.find(dpid, mac), before.find(dpid, mac)
        if now is not None and now.anchor is not None:
            continue  # what stays of a departed balancer (anchors.py): nothing for its twin
        cancelled = now is None
        if cancelled and not by_guests:
            continue
        middlebox = now or was
        identity = identity_of(middlebox, inventory) if middlebox is not None else None
        if identity is None:
            continue
        twins = twin_ports(identity, dpid, inventories)
        if twins:
            change = compact((was, now))
            copies += [Copy(other, (dpid, mac), cancelled, change, (identity.vm_id, identity.tenant))
                       for other, _ in twins]
    return copies


def compact(change: tuple[Middlebox | None, Middlebox | None]) -> tuple[Middlebox | None, Middlebox | None]:
    """``change`` with only what ``adopted`` reads of it: when both sides exist, the filters
    the job removed (before's) and added (after's), its redirects and addresses whole; a
    middlebox the job made (before None) whole, all of it that job's doing (the copy if the
    origin is gone by then); a cancel (after None) only that it is one.  So a stored copy of
    a job that added one filter to a thousand is one filter long."""
    before, after = change
    if before is None:
        return change
    if after is None:
        return replace(before, filters=frozenset()), None
    return replace(before, filters=before.filters - after.filters), replace(after, filters=after.filters - before.filters)


def twin(source: Middlebox, dpid: int, port: int, current: Middlebox | None, zones_taken) -> Middlebox:
    """``source`` on switch ``dpid``'s ``port``: the same offloads, with the zone the twin
    already has, or a free one (a conntrack zone is one switch's; connections tracked on
    the source's host do not move with the VM)."""
    zone = current.zone if current is not None else next(
        (zone for zone in range(1, MAX_ZONE + 1) if zone not in zones_taken), None)
    if zone is None:
        raise ValueError(f"every one of the {MAX_ZONE} conntrack zones is in use")
    return replace(source, dpid=dpid, port=port, zone=zone)


def with_change(current: Middlebox, before: Middlebox, after: Middlebox) -> Middlebox:
    """``current`` (a twin) with the change from ``before`` to ``after`` (one job on the
    other side) applied, not overwritten by ``after``: the filters and redirects that job
    added and removed, and its addresses if it changed them.  Around a switchover both sides
    may each confirm a command before seeing the other's copy; each side's change then
    reaches the other, and neither is lost."""
    filters = (current.filters - (before.filters - after.filters)) | (after.filters - before.filters)
    gone = set(before.redirects) - set(after.redirects)
    redirects = [r for r in current.redirects if r not in gone]
    for redirect in after.redirects:
        if redirect not in before.redirects:  # added there: it replaces any of its source here
            redirects = [r for r in redirects if r.source != redirect.source] + [redirect]
    changed = {name: getattr(after, name) for name in ("firewall_ip", "balancer_ip")
               if getattr(after, name) != getattr(before, name)}
    if redirects:  # a balancer address lasts while a redirect does: one side's last withdrawn, the other's added
        changed["balancer_ip"] = changed.get("balancer_ip") or current.balancer_ip or before.balancer_ip
    else:
        changed["balancer_ip"] = None
    return replace(current, filters=frozenset(filters), redirects=tuple(sorted(redirects, key=redirect_order)),
                   **changed)


def adopted(state: State, inventories: dict[int, Inventory], dpid: int, origin: tuple[int, str],
            zones_taken, cancelled: bool = False, change: tuple[Middlebox, Middlebox] | None = None,
            vm: tuple[str, str] | None = None) -> State:
    """The state once switch ``dpid`` holds what its twin ``origin`` holds now: a copy,
    refused (ApplyError) where a registration there would be (an address or a backend
    another middlebox of that switch has, the port's limit).  ``change``: the (before,
    after) of the job at the origin that asked for it; a twin that exists gets only that
    change (``with_change``), a new one the whole origin.
    If the origin is gone, the copy goes only when the guest ``cancelled`` it there (and
    ``dpid``'s annotations still show the same VM): an origin gone because its port went
    or its agent deleted the VM that left is exactly a migration's source, and the copy
    is what stays, with the change that job made there (``left_behind``).  Unchanged when
    the annotations no longer pair the two (the VM left, or the ports were re-annotated
    meanwhile), so a late copy never lands on another VM's port."""
    source = state.find(*origin)
    mac = origin[1]
    inventory = inventories.get(dpid, Inventory())
    here = inventory.with_mac(mac)
    current = state.find(dpid, mac)
    anchor = None
    if current is not None and current.anchor is not None:  # no twin: replaced by one, which keeps its zone
        anchor, current = current, None
    if (source is not None and not cancelled and vm is not None
            and identity_of(source, inventories.get(origin[0], Inventory())) is None):
        source = None  # its port's annotations went (the VM left), its retirement still queued: as gone
    if source is None and cancelled:
        if current is None or here is None or identity_of(current, inventory) is None or not _shows(here, vm):
            return state
        return state.remove(dpid, mac)
    if source is None:
        source = left_behind(current, here, change, vm)
        if source is None:
            return state
    else:
        identity = identity_of(source, inventories.get(origin[0], Inventory()))
        if identity is None or here is None or not same_vm(here, identity):
            return state
        if change is not None and None not in change:
            if current is None:  # removed here (a guest's cancel, an operator's delete): not brought back by a change
                return state
            source = with_change(current, *change)  # only what that job changed (else: the origin as it is)
    if source.firewall_ip is None and not source.redirects:  # each side withdrew what the other kept
        return state if current is None else state.remove(dpid, mac)  # nothing left to offload: as after X
    copy = twin(source, dpid, here.port, current if current is not None else anchor, zones_taken)
    if current == copy:
        return state
    check_can_hold(state, copy, inventory)  # as a registration there would be
    return state.put(copy)


def left_behind(current: Middlebox | None, here: PortIdentity | None, change, vm: tuple[str, str] | None
                ) -> Middlebox | None:
    """What the twin gets of a job whose origin is gone since it was confirmed (the source's
    port went while the copy waited: the guest's last commands before the switchover), if
    ``dpid``'s annotations (``here``) still show the VM the copy was asked for: that job's
    change, or the middlebox it made whole; None if there is nothing to bring."""
    if change is None or change[1] is None or vm is None or here is None or not _shows(here, vm):
        return None
    before, after = change
    if before is None:
        return after
    return None if current is None else with_change(current, before, after)


def shown(copy: Copy, inventory: Inventory) -> bool:
    """Whether a copy that can make a twin (an arrival, a middlebox a job made) may still be
    made: a switch's annotations still show the VM it was asked for.  One waiting in that
    switch's queue when they stop showing it is void: made later, on a port annotated as the
    VM again, it would bring back what the guest has cancelled meanwhile.  A copy of a change
    only changes a twin that exists (``adopted``), so it waits for the annotations to
    return, as do copies that name no VM."""
    if copy.vm is None or copy.change is None or copy.change[0] is not None:
        return True
    here = inventory.with_mac(copy.origin[1])
    return here is not None and _shows(here, copy.vm)


def _shows(here: PortIdentity, vm: tuple[str, str] | None) -> bool:
    """Whether a port's annotations show the VM (vm-id, tenant) a copy was asked for (any,
    for a copy that names none: asked before copies named their VM)."""
    return vm is None or (here.vm_id, here.tenant) == vm
