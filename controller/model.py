"""Desired state of the offloads and the pure transition ``apply(state, request)``.

The controller's one source of truth: which middleboxes are registered on which switch
port, with which filters and redirects.  ``apply`` never performs I/O; the OS-Ken shell
persists the new state, compiles it to flows and answers the guest only after the switch
confirmed them.  A rejected command leaves the state exactly as it was.

``decide`` is the transition itself: it reads a state (or a job's ``Draft``) and says
which middlebox becomes what.  A job of 100,000 commands folds its decisions into one
``Draft`` and makes one new ``State`` at the end, instead of copying the whole state
once per command.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Mapping, NamedTuple

from mbvisor.guest.commands import (AddFilter, Cancel, CancelRedirect, Command, DeleteFilter, DeleteFilters, Filter,
                                    Layer, MAC_LAYER, Query, RegisterFirewall, RegisterLoadBalancer)
from mbvisor.guest.grammar import filter_command_text, format_command

from .trust import Inventory, TrustMode, check_backends, check_registration


class ApplyError(Exception):
    """A command that is valid grammar but cannot be applied; ``code`` is stable for APIs."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


MAX_REDIRECTS = 256  # group ids hold a redirect's index in 8 bits (flows.group_id)
MAX_ZONE = 0x7FFF    # the top bit of a conntrack zone marks a middlebox's fragment zone
MAX_FILTERS = 0xFFFF  # a conjunctive filter's index fits 16 bits of its conj_id (filters.conjunction_id)


@dataclass(frozen=True)
class Limits:
    """Per-middlebox bounds that protect the switch's tables from one tenant."""

    filters: int = 1000
    redirects: int = 64
    flows: int = 10000  # switch entries one middlebox's filters may cost (a port range costs several)
    per_port: int = 16  # middleboxes one port may register (an annotated port has one MAC: one)

    def __post_init__(self) -> None:
        if self.flows <= 0:
            raise ValueError(f"flows per middlebox must be positive, not {self.flows}")
        if not 0 < self.redirects <= MAX_REDIRECTS:
            raise ValueError(f"redirects per middlebox must be 1..{MAX_REDIRECTS}, not {self.redirects}")
        if not 0 < self.filters <= MAX_FILTERS:
            raise ValueError(f"filters per middlebox must be 1..{MAX_FILTERS}, not {self.filters}")
        if self.per_port <= 0:
            raise ValueError(f"middleboxes per port must be positive, not {self.per_port}")


@dataclass(frozen=True)
class Binding:
    """Where the guest that sent a command lives, as the host agent vouches for it, and
    what the operator's annotations of that switch's ports allow (``trust``)."""

    dpid: int
    port: int
    mode: TrustMode = TrustMode.LAB
    inventory: Inventory = field(default_factory=Inventory)


@dataclass(frozen=True)
class Redirect:
    """Traffic for the middlebox (from ``source`` only, or from anyone when None) goes to
    ``backends`` (a pool when several)."""

    source: str | None
    backends: tuple[str, ...]


@dataclass(frozen=True)
class Middlebox:
    dpid: int
    port: int
    mac: str
    zone: int
    firewall_ip: str | None = None
    balancer_ip: str | None = None
    filters: frozenset[Filter] = frozenset()
    redirects: tuple[Redirect, ...] = ()
    # An *anchor*: what stays of a balancer whose port went while its twin (the same VM, on
    # the switch it migrated to) holds its redirects and its backends are here: the
    # connections conntrack tracks here in its zone.  (vm-id, tenant) of that VM.  No guest
    # speaks for it; it keeps its redirects' backends and runs its twin's (anchors.py).
    anchor: tuple[str, str] | None = None

    @property
    def key(self) -> tuple[int, str]:
        return (self.dpid, self.mac)


@dataclass(frozen=True)
class State:
    """Every middlebox, keyed by (datapath id, MAC).  Treated as immutable: ``put`` and
    ``remove`` return a new state sharing every unchanged middlebox, so "did this one
    change?" is an identity test (the store and the installer rely on it)."""

    by_key: Mapping[tuple[int, str], Middlebox] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def of(cls, middleboxes, limits: Limits = Limits()) -> "State":
        return cls({mb.key: mb for mb in middleboxes}, limits)

    @property
    def middleboxes(self) -> tuple[Middlebox, ...]:
        return tuple(self.by_key[key] for key in sorted(self.by_key))

    def find(self, dpid: int, mac: str) -> Middlebox | None:
        return self.by_key.get((dpid, mac))

    peek = find  # as a Draft's: a state holds no filters that are still to be settled

    def filters_of(self, dpid: int, mac: str) -> frozenset[Filter]:
        """As a Draft's (``decide`` reads either)."""
        middlebox = self.by_key.get((dpid, mac))
        return middlebox.filters if middlebox is not None else frozenset()

    def on(self, dpid: int) -> list[Middlebox]:
        return list(self._by_switch.get(dpid, ()))

    @cached_property
    def _by_switch(self) -> dict[int, tuple[Middlebox, ...]]:
        """Each switch's middleboxes by MAC, found once per state: health checks and
        registrations ask for them often, and a state never changes."""
        grouped: dict[int, list[Middlebox]] = {}
        for key in sorted(self.by_key):
            grouped.setdefault(key[0], []).append(self.by_key[key])
        return {dpid: tuple(middleboxes) for dpid, middleboxes in grouped.items()}

    def holders(self, mac: str) -> tuple[int, ...]:
        """The switches holding an entry of ``mac``, in order (a migrating VM's twins)."""
        return self._by_mac.get(mac, ())

    @cached_property
    def _by_mac(self) -> dict[str, tuple[int, ...]]:
        """Found once per state, and only for states asked (balancers' compilations): a
        look per switch per balancer made a switch of 1,000 balancers among 1,000 switches
        cost 0.27 s to compile."""
        found: dict[str, list[int]] = {}
        for dpid, mac in sorted(self.by_key):
            found.setdefault(mac, []).append(dpid)
        return {mac: tuple(dpids) for mac, dpids in found.items()}

    @cached_property
    def zones(self) -> frozenset[int]:
        return frozenset(mb.zone for mb in self.by_key.values())

    def zones_in_use(self) -> frozenset[int]:
        return self.zones

    def changed(self, outcome: "Outcome") -> "State":
        """This state with a decision's change made."""
        if outcome.key is None:
            return self
        if outcome.added is not None:
            return self.put(_with_filters(outcome.middlebox, outcome.middlebox.filters | {outcome.added}))
        if outcome.middlebox is None:
            return self.remove(*outcome.key)
        return self.put(outcome.middlebox)

    def put(self, middlebox: Middlebox) -> "State":
        return replace(self, by_key={**self.by_key, middlebox.key: middlebox})

    def remove(self, dpid: int, mac: str) -> "State":
        return replace(self, by_key={key: mb for key, mb in self.by_key.items() if key != (dpid, mac)})

    def merged(self, other: "State", keys) -> "State":
        """This state with the middleboxes at ``keys`` taken from ``other`` (or removed where
        ``other`` has none): how one switch's committed change joins the others' work."""
        by_key = dict(self.by_key)
        for key in keys:
            if key in other.by_key:
                by_key[key] = other.by_key[key]
            else:
                by_key.pop(key, None)
        return replace(self, by_key=by_key)

    def changed_keys(self, other: "State", among=None) -> set[tuple[int, str]]:
        """Middleboxes that differ between the two states (added, removed or replaced);
        only ``among`` these keys when the caller knows which may have changed (a job on
        one switch of a thousand middleboxes touches a few)."""
        keys = self.by_key.keys() | other.by_key.keys() if among is None else among
        return {key for key in keys if self.by_key.get(key) is not other.by_key.get(key)}


class Draft:
    """A job's working copy of a state: each decision's change is recorded in place, and
    ``state()`` makes the one new ``State`` (sharing every middlebox nobody changed).
    Reads see the changes so far, as the next command of the job must.

    Added filters go into a set of the middlebox's own that grows in place (``growing``):
    a new frozen set per added filter would copy the middlebox's filters each time, and
    a job adding 1,000 filters to a middlebox of 10,000 would copy ten million.  The set
    is frozen into the middlebox once, when anything but an add reads it (``find``,
    ``on``) or the job ends (``state``).

    ``added`` holds, for each middlebox the job changed by adding filters only, the
    filters it added: the base's middlebox with these more is the new one, so its flows
    and rows can be made for them alone, whatever it had before."""

    def __init__(self, base: State, elsewhere=frozenset, reserve=None):
        """``elsewhere()``: zones taken outside ``base`` meanwhile (other switches' jobs
        commit and plan while this one yields); ``reserve(zone)`` is told each zone this
        draft gives a new middlebox, so theirs see it."""
        self.base = base
        self.changes: dict[tuple[int, str], Middlebox | None] = {}  # key -> new value (None: removed)
        self.growing: dict[tuple[int, str], set[Filter]] = {}  # key -> its filters (changes[key]'s are older)
        self.added: dict[tuple[int, str], set[Filter]] = {}  # key -> the filters added to it, if nothing else changed
        self._zones: set[int] | None = None
        self.elsewhere = elsewhere
        self.reserve = reserve
        self.new_zones: list[int] = []

    @property
    def limits(self) -> Limits:
        return self.base.limits

    def find(self, dpid: int, mac: str) -> Middlebox | None:
        if (dpid, mac) in self.growing:
            self._settle((dpid, mac))
        return self.peek(dpid, mac)

    def peek(self, dpid: int, mac: str) -> Middlebox | None:
        """The middlebox without settling the filters this job added (``filters_of`` has
        them): what an add needs, its port and registration."""
        key = (dpid, mac)
        return self.changes[key] if key in self.changes else self.base.find(dpid, mac)

    def filters_of(self, dpid: int, mac: str) -> frozenset[Filter] | set[Filter]:
        """The middlebox's filters so far, growing or settled: not to be kept (it may grow)."""
        growing = self.growing.get((dpid, mac))
        if growing is not None:
            return growing
        middlebox = self.peek(dpid, mac)
        return middlebox.filters if middlebox is not None else frozenset()

    def _settle(self, key: tuple[int, str]) -> None:
        self.changes[key] = _with_filters(self.changes[key], frozenset(self.growing.pop(key)))

    def on(self, dpid: int) -> list[Middlebox]:
        for key in [key for key in self.growing if key[0] == dpid]:
            self._settle(key)
        if not any(key[0] == dpid for key in self.changes):
            return self.base.on(dpid)
        current = {mb.mac: mb for mb in self.base.on(dpid)}
        for (switch, mac), middlebox in self.changes.items():
            if switch == dpid:
                current[mac] = middlebox
        return [current[mac] for mac in sorted(current) if current[mac] is not None]

    @property
    def zones(self) -> set[int]:
        """The zones of the draft's middleboxes: found once (from the base and the changes
        so far), then kept up to date by ``record``."""
        if self._zones is None:
            self._zones = set(self.base.zones)
            for key, middlebox in self.changes.items():
                old = self.base.find(*key)
                if old is not None:
                    self._zones.discard(old.zone)
            self._zones.update(mb.zone for mb in self.changes.values() if mb is not None)
        return self._zones

    def zones_in_use(self) -> set[int]:
        return self.zones | self.elsewhere()

    def record(self, outcome: "Outcome") -> None:
        if outcome.key is None:
            return
        if outcome.added is not None:
            self.grow(outcome.middlebox, (outcome.added,))
            return
        self.added.pop(outcome.key, None)
        old = self.find(*outcome.key)
        if old is None and outcome.middlebox is not None:
            self.new_zones.append(outcome.middlebox.zone)
            if self.reserve is not None:
                self.reserve(outcome.middlebox.zone)
        if self._zones is not None and old is not None:
            self._zones.discard(old.zone)
        self.changes[outcome.key] = outcome.middlebox
        if self._zones is not None and outcome.middlebox is not None:
            self._zones.add(outcome.middlebox.zone)

    def grow(self, middlebox: Middlebox, filters) -> None:
        """``middlebox`` (as ``peek`` found it: zone and all) with ``filters`` more, none of
        which it has: recording their adds one by one, in one step."""
        key = middlebox.key
        growing = self.growing.get(key)
        if growing is None:  # the first this job adds: middlebox's filters are up to date
            if key not in self.changes:  # and the base's middlebox: its first change
                self.added[key] = set()
            growing = self.growing[key] = set(middlebox.filters)
            self.changes[key] = middlebox
        growing.update(filters)
        added = self.added.get(key)
        if added is not None:
            added.update(filters)

    def state(self) -> State:
        for key in list(self.growing):
            self._settle(key)
        if not self.changes:
            return self.base
        by_key = dict(self.base.by_key)
        for key, middlebox in self.changes.items():
            if middlebox is None:
                by_key.pop(key, None)
            else:
                by_key[key] = middlebox
        return replace(self.base, by_key=by_key)


class Outcome(NamedTuple):
    """A decision: the answer's text, and the middlebox at ``key`` becomes ``middlebox``
    (None: it is removed); no key when nothing changes.  With ``added``, the middlebox at
    ``key`` is ``middlebox`` with that filter more (a draft adds it to its growing set;
    ``middlebox``'s own filters may be older then).  A named tuple: one per command of a
    bulk request, and a frozen dataclass costs three times as much to make."""

    text: str
    key: tuple[int, str] | None = None
    middlebox: Middlebox | None = None
    added: Filter | None = None


@dataclass(frozen=True)
class Applied:
    state: State
    text: str


def apply(state: State, binding: Binding, command: Command) -> Applied:
    """The state after ``command`` from the guest at ``binding``, with the answer text."""
    outcome = decide(state, binding, command)
    return Applied(state.changed(outcome), outcome.text)


def decide(state: State | Draft, binding: Binding, command: Command) -> Outcome:
    """What ``command`` from the guest at ``binding`` does to ``state``; raises ApplyError
    (and changes nothing) when it cannot be applied."""
    handler = _HANDLERS[type(command)]
    return handler(state, binding, _current(state, binding, command), command)


def _current(state: State | Draft, binding: Binding, command: Command) -> Middlebox | None:
    """The middlebox ``command`` speaks for, after the checks every command makes first."""
    if int(command.mac.split(":")[0], 16) & 1 or command.mac == "00:00:00:00:00:00":
        raise ApplyError("bad-mac", f"{command.mac} is not a unicast MAC address; a middlebox has its own")
    _check_trust(binding, command)
    # An add reads the filters so far (``filters_of``) and leaves a draft's growing set as
    # it is: settling it for every added filter would copy it every time.
    current = (state.peek if isinstance(command, AddFilter) else state.find)(binding.dpid, command.mac)
    if current is not None and current.anchor is not None:
        current = None  # no guest's: a VM registering that MAC here replaces it
    if current is not None and current.port != binding.port:
        raise ApplyError("port-conflict", f"{command.mac} is registered on port {current.port} of this "
                                          f"switch, not on port {binding.port}; cancel it there first")
    return current


def adding_to(state: State | Draft, binding: Binding, command: AddFilter) -> Middlebox:
    """The firewall an add of ``command``'s MAC from ``binding`` goes to, after every check
    ``decide`` makes of such an add before it looks at the filter: the same for every add
    of a run to one MAC from one port, so a bulk of them is checked once (ApplyError)."""
    return _registered_firewall(_current(state, binding, command), command.mac)


def _check_trust(binding: Binding, command: Command) -> None:
    """Registrations and filter changes speak for a MAC and its addresses: only the port
    annotated with them may (``trust``).  A cancel or a query touches only what the
    middlebox on this port already has, so it needs no annotation."""
    if isinstance(command, (Cancel, CancelRedirect, Query)):
        return
    address = command.ip if isinstance(command, (RegisterFirewall, RegisterLoadBalancer)) else None
    problem = check_registration(binding.mode, binding.inventory, binding.port, command.mac, address)
    if problem is None and isinstance(command, RegisterLoadBalancer):
        problem = check_backends(binding.mode, binding.inventory, binding.port, command.backends)
    if problem is not None:
        raise ApplyError(*problem)


def _new_middlebox(state: State, binding: Binding, mac: str) -> Middlebox:
    """Conntrack zones are unique among all switches: every userspace bridge of a host
    shares one conntrack table, so a zone per switch would mix their connections."""
    on_port = sum(1 for mb in state.on(binding.dpid) if mb.port == binding.port and mb.anchor is None)
    if on_port >= state.limits.per_port:
        raise ApplyError("limit", f"port {binding.port} has {on_port} middleboxes, the limit is {state.limits.per_port}")
    used = state.zones_in_use()
    zone = next((zone for zone in range(1, MAX_ZONE + 1) if zone not in used), None)
    if zone is None:
        raise ApplyError("limit", f"every one of the {MAX_ZONE} conntrack zones is in use")
    return Middlebox(binding.dpid, binding.port, mac, zone)


def unique_zones(state: State) -> State:
    """A state whose zones may repeat across switches (saved before zones were unique)
    with the repeats renumbered; the same state when there are none."""
    seen: set[int] = set()
    clashing = []
    for key in sorted(state.by_key):
        middlebox = state.by_key[key]
        if middlebox.zone in seen or not 0 < middlebox.zone <= MAX_ZONE:
            clashing.append(middlebox)
        seen.add(middlebox.zone)
    free = (zone for zone in range(1, MAX_ZONE + 1) if zone not in seen)
    for middlebox in clashing:
        state = state.put(replace(middlebox, zone=next(free)))
    return state


def redirect_order(redirect: Redirect) -> tuple:
    """A middlebox's redirects are kept in this order, one per source: specific sources
    first (by text), the catch-all last."""
    return redirect.source is None, redirect.source or ""


def check_can_hold(state: State, middlebox: Middlebox, inventory: Inventory) -> None:
    """What registering ``middlebox`` on its switch would have to pass there, checked for
    a copy made without its commands (a migration's destination, migration.py): its
    addresses and backends not another middlebox's of that switch, and its port within
    the per-port limit.  Raises ApplyError."""
    for other in state.on(middlebox.dpid):
        if other.mac == middlebox.mac:
            continue
        for ip in filter(None, (middlebox.firewall_ip, middlebox.balancer_ip)):
            if ip in (other.firewall_ip, other.balancer_ip):
                raise ApplyError("address-in-use", f"{ip} is the address of another middlebox on this switch")
    _check_backends_unique(state, middlebox, tuple(b for r in middlebox.redirects for b in r.backends), inventory)
    on_port = sum(1 for mb in state.on(middlebox.dpid)
                  if mb.port == middlebox.port and mb.mac != middlebox.mac and mb.anchor is None)
    if on_port >= state.limits.per_port:
        raise ApplyError("limit", f"port {middlebox.port} has {on_port} middleboxes, the limit is {state.limits.per_port}")


def _check_address_free(state: State, binding: Binding, command) -> None:
    """A middlebox's address is its own on its switch: filters drop group frames that
    carry it, and two middleboxes compiling the same flow would take it from each other
    (annotated addresses are unique already; this holds a lab's unannotated ones too)."""
    for other in state.on(binding.dpid):
        if other.mac != command.mac and command.ip in (other.firewall_ip, other.balancer_ip):
            raise ApplyError("address-in-use", f"{command.ip} is the address of another middlebox on this switch")


def _register_firewall(state, binding, current, command: RegisterFirewall) -> Outcome:
    _check_address_free(state, binding, command)
    middlebox = current or _new_middlebox(state, binding, command.mac)
    if middlebox.firewall_ip not in (None, command.ip):
        raise ApplyError("already-registered", f"{command.mac} is registered for firewall offload with "
                                               f"{middlebox.firewall_ip}; cancel (X) before changing its address")
    return _becomes(replace(middlebox, firewall_ip=command.ip), f"registered {command.mac} {command.ip} for firewall offload")


def _register_balancer(state, binding, current, command: RegisterLoadBalancer) -> Outcome:
    _check_address_free(state, binding, command)
    middlebox = current or _new_middlebox(state, binding, command.mac)
    if middlebox.balancer_ip not in (None, command.ip):
        raise ApplyError("already-registered", f"{command.mac} balances {middlebox.balancer_ip}; "
                                               "cancel (X) before changing its address")
    _check_backends_unique(state, middlebox, command.backends, binding.inventory)
    redirect = Redirect(command.source, command.backends)
    kept = tuple(r for r in middlebox.redirects if r.source != command.source)
    if len(kept) >= state.limits.redirects:
        raise ApplyError("limit", f"{command.mac} has {len(kept)} redirects, the limit is {state.limits.redirects}")
    redirects = tuple(sorted(kept + (redirect,), key=redirect_order))
    scope = f"from {command.source}" if command.source else "from any source"
    return _becomes(replace(middlebox, balancer_ip=command.ip, redirects=redirects),
                    f"redirecting {command.ip} {scope} to {','.join(command.backends)}")


def _check_backends_unique(state: State, middlebox: Middlebox, backends: tuple[str, ...],
                           inventory: Inventory) -> None:
    """Replies are recognised by their backend's port and address, so a backend serves
    one middlebox per switch.  Another middlebox's redirect holds a backend only while the
    annotations would still let it use it (a dead redirect squats nobody's address)."""
    for other in state.on(middlebox.dpid):
        if other.mac == middlebox.mac:
            continue
        shared = {b for b in set(backends) & {b for r in other.redirects for b in r.backends}
                  if _may_use(inventory, other, b)}
        if shared:
            raise ApplyError("backend-in-use", f"backend {sorted(shared)[0]} already serves another "
                                               "middlebox on this switch")


def _may_use(inventory: Inventory, middlebox: Middlebox, backend: str) -> bool:
    owner, identity = inventory.owner(backend), inventory.at(middlebox.port)
    if middlebox.anchor is not None:  # its port is gone: the backends of its VM's tenant stay its own
        return owner is not None and owner.tenant == middlebox.anchor[1]
    if owner is None:
        return identity is None  # a lab's unannotated middlebox, located by ARP
    return identity is not None and owner.tenant == identity.tenant and owner.port != identity.port


def _registered_firewall(current: Middlebox | None, mac: str) -> Middlebox:
    if current is None or current.firewall_ip is None:
        raise ApplyError("not-registered", f"{mac} is not registered for firewall offload; send R F first")
    return current


def _add_filter(state, binding, current, command: AddFilter) -> Outcome:
    middlebox = _registered_firewall(current, command.mac)
    check_destination_mac(middlebox, command.filter)
    filters = state.filters_of(*middlebox.key)
    if command.filter in filters:
        return Outcome(present_answer_text(command))
    if len(filters) >= state.limits.filters:
        raise ApplyError("limit", f"{command.mac} has {len(filters)} filters, the limit is {state.limits.filters}")
    return Outcome(added_answer_text(command.mac, command.filter), middlebox.key, middlebox, command.filter)


def added_answer_text(mac: str, filter: Filter) -> str:
    """The answer to an add that added ``filter`` to ``mac``."""
    return f"added: {added_text(mac, filter)}"


def present_answer_text(command: AddFilter) -> str:
    """The answer to an add of a filter the middlebox has already."""
    return f"filter already present: {format_command(command)}"


@lru_cache(maxsize=8192)
def added_text(mac: str, filter: Filter) -> str:
    """The canonical text of adding ``filter`` to ``mac``: its answer quotes it and the
    store keeps it, so a job formats each filter once, not twice.  Keyed by the two, not
    by an ``AddFilter``: the store has no command, and making one cost it half the time."""
    return filter_command_text("A", mac, filter)


def _with_filters(middlebox: Middlebox, filters: frozenset[Filter]) -> Middlebox:
    """``replace(middlebox, filters=filters)``, built directly: ``replace`` costs five times
    more, and 100,000 filters applied one by one (``apply``) make as many middleboxes."""
    return Middlebox(middlebox.dpid, middlebox.port, middlebox.mac, middlebox.zone, middlebox.firewall_ip,
                     middlebox.balancer_ip, filters, middlebox.redirects)


def check_destination_mac(middlebox: Middlebox, filter: Filter) -> None:
    """Offloaded filters only see traffic addressed to the middlebox, so a MAC-layer
    destination other than its own could never match (and must never touch others)."""
    if filter.layer is MAC_LAYER and filter.destination not in (None, middlebox.mac):
        raise ApplyError("foreign-destination", f"a MAC filter's destination must be the middlebox's own "
                                                f"MAC {middlebox.mac}, not {filter.destination}")


def _delete_filter(state, binding, current, command: DeleteFilter) -> Outcome:
    middlebox = _registered_firewall(current, command.mac)
    if command.filter not in middlebox.filters:
        raise ApplyError("no-such-filter", f"no such filter: {format_command(command)}")
    return _becomes(replace(middlebox, filters=middlebox.filters - {command.filter}), f"deleted: {format_command(command)}")


def _delete_filters(state, binding, current, command: DeleteFilters) -> Outcome:
    middlebox = _registered_firewall(current, command.mac)
    gone = {f for f in middlebox.filters if f.layer == command.layer and f.mask == command.mask}
    text = f"deleted {len(gone)} filter(s)"
    return _becomes(replace(middlebox, filters=middlebox.filters - gone), text) if gone else Outcome(text)


def _cancel(state, binding, current, command: Cancel) -> Outcome:
    if current is None:
        raise ApplyError("not-registered", f"{command.mac} is not registered")
    return Outcome(f"cancelled {command.mac}: every offload removed", current.key, None)


def _cancel_redirect(state, binding, current, command: CancelRedirect) -> Outcome:
    """One redirect goes; the balancer address with the last of them, and the middlebox
    with it when it is no firewall (as ``X`` would)."""
    scope = f"from {command.source}" if command.source else "from any source"
    if current is None or not any(r.source == command.source for r in current.redirects):
        raise ApplyError("not-registered", f"{command.mac} has no redirect {scope}")
    redirects = tuple(r for r in current.redirects if r.source != command.source)
    if not redirects and current.firewall_ip is None:
        return Outcome(f"cancelled {command.mac}'s redirect {scope}: it was its last offload", current.key, None)
    return _becomes(replace(current, redirects=redirects, balancer_ip=current.balancer_ip if redirects else None),
                    f"cancelled {command.mac}'s redirect of {current.balancer_ip} {scope}")


def _query(state, binding, current, command: Query) -> Outcome:
    """The layer's filters, sorted.  A paged query (skip given) answers as the channel's
    record does (docs/protocol.md §6): the total first, ``N filter(s)``, then the filters
    from position skip on; so REST and the ring say the same, and the agent passes it on."""
    middlebox = _registered_firewall(current, command.mac)
    lines = _sorted_filter_texts(command.mac, command.layer, middlebox.filters)
    if command.skip:
        return Outcome("\n".join([f"{len(lines)} filter(s)", *lines[command.skip:]]))
    return Outcome("\n".join(lines) if lines else "no filters")


@lru_cache(maxsize=64)
def _sorted_filter_texts(mac: str, layer: Layer, filters: frozenset[Filter]) -> tuple[str, ...]:
    """A layer's filters as sorted texts, remembered while the middlebox's filters stay
    the same set: a follower reads a list of 10,000 page by page (a hundred queries), and
    sorting it again for each page cost 28 ms."""
    return tuple(sorted(format_command(AddFilter(mac, f)) for f in filters if f.layer == layer))


def _becomes(middlebox: Middlebox, text: str) -> Outcome:
    return Outcome(text, middlebox.key, middlebox)


_HANDLERS = {
    RegisterFirewall: _register_firewall,
    RegisterLoadBalancer: _register_balancer,
    AddFilter: _add_filter,
    DeleteFilter: _delete_filter,
    DeleteFilters: _delete_filters,
    Cancel: _cancel,
    CancelRedirect: _cancel_redirect,
    Query: _query,
}
