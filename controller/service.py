"""The controller's service: desired state, commands, switches' reconcilers, reads.

The order of a command's steps, in one place: the REST edge has validated the request
whole (``requests``); ``submit`` hands each switch's share of it to that switch's
reconciler as one job and waits; the reconciler asks ``plan`` what the commands do (a
replayed idempotency key answers from the store, a key reused for another command is
refused, the grammar parses, the pure ``decide`` decides), installs the flows of what
changed as one atomic bundle, and calls ``commit``, which makes the new state current,
persists it with the answers, and answers.  A refused or unconfirmed install changes
nothing: the answers say so and the state stays as it was.

Nothing here holds a lock: under eventlet, code between two yields runs alone, each switch
has one writer (its reconciler), and a switch's commit only replaces that switch's
middleboxes (``State.merged``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from mbvisor.guest.commands import AddFilter, Query, RegisterLoadBalancer, command_from_dict
from mbvisor.guest.errors import CommandError
from mbvisor.guest.grammar import parse_command
from mbvisor.guest.reader import FaultLog

from .anchors import Elsewhere, affected, kept_as_anchors, needless, steering_macs
from .compat import arp, ether, ethernet, hub, icmpv6, ipv6, ipv6_protocol, packet
from .flows import RESOLVER_MAC, Neighbour, Surroundings, counts_as_handled, filter_cost, filters_cost
from .health import BackendHealth
from .ingress import link_local
from .metrics import Metrics
from .migration import Copy, adopted, arrivals, copies_after, identity_of, named_only_now, shown
from .pacing import Pacer
from .model import (ApplyError, Binding, Draft, Limits, Middlebox, State, added_answer_text, adding_to, check_can_hold,
                    check_destination_mac, decide, present_answer_text, unique_zones)
from .pipeline import COOKIE_TAG, COOKIE_TAG_MASK, cookie_of
from .placement import Placement, placement_from
from .trust import Inventory, PortIdentity, TrustMode, build_inventory
from .ofmessages import normal_match
from .ovstext import actions_text, flow_text
from .reconciler import Failure, Job, SwitchReconciler
from .requests import Answer, CommandRequest, SwitchUnavailable, clip, ok_answer, read_token_file
from .store import Store, command_text
from .switchid import CERTIFICATE, SWITCH_ID_MODES, Refusal
from .switchlink import SwitchUnreachable

log = logging.getLogger("mbvisor.controller")
ARP_TIMEOUT = 2.0        # seconds a command waits for its new backends to answer ARP
ARP_REFRESH = 30.0       # seconds between re-probes of backends located by ARP in a lab (they may move)
JOB_DEADLINE = 3600.0    # a job always ends (every switch wait is bounded); this is a backstop
PRUNE_INTERVAL = 600.0   # seconds between removals of replay answers older than the store keeps


@dataclass(frozen=True)
class Settings:
    database: Path
    rest_host: str = "127.0.0.1"
    rest_port: int = 8181
    token: str | None = None
    limits: Limits = Limits()
    audit_interval: float = 10.0  # seconds between checks that the switches still hold our flows
    rest_max_connections: int = 256
    rest_idle_timeout: float = 30.0
    trust: TrustMode = TrustMode.ANNOTATIONS
    backend_check_interval: float = 1.0  # seconds between health checks of each backend in use
    backend_down_after: float = 3.0      # seconds without an answer before a backend is down
    controller_pps: int = 200            # packets per second each switch may send the controller
    placement: Placement = Placement()   # mbvisor's tables among the switch's (placement.py)
    tls_cert: str | None = None          # PEM certificate (chain) and key: REST over HTTPS ...
    tls_key: str | None = None           # ... (OpenFlow's TLS is the manager's: --ctl-cert/--ctl-privkey)
    switch_ids: str = CERTIFICATE        # with a switch CA: the ids a switch may announce (switchid.py)

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Settings":
        """Managers give apps no arguments of their own; ``mbvisor controller`` sets these.
        A token that is set but empty is an error: it must not silently open every write."""
        state_dir = Path(environ.get("MBVISOR_STATE_DIR", "/var/lib/mbvisor"))
        token = environ.get("MBVISOR_TOKEN")
        if token is not None and not token.strip():
            raise ValueError("MBVISOR_TOKEN is set but empty; give a secret or unset it")
        if environ.get("MBVISOR_TOKEN_FILE"):
            token = read_token_file(environ["MBVISOR_TOKEN_FILE"])
        tls_cert, tls_key = environ.get("MBVISOR_TLS_CERT") or None, environ.get("MBVISOR_TLS_KEY") or None
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("MBVISOR_TLS_CERT and MBVISOR_TLS_KEY go together: give both or neither")
        switch_ids = environ.get("MBVISOR_TLS_SWITCH_IDS") or CERTIFICATE
        if switch_ids not in SWITCH_ID_MODES:
            raise ValueError(f"MBVISOR_TLS_SWITCH_IDS must be 'certificate' or 'any', not {switch_ids!r}")
        trust = environ.get("MBVISOR_TRUST", TrustMode.ANNOTATIONS.value)
        if trust not in {mode.value for mode in TrustMode}:
            raise ValueError(f"MBVISOR_TRUST must be 'annotations' or 'lab', not {trust!r}")
        return cls(
            database=Path(environ.get("MBVISOR_DB", state_dir / "controller.sqlite")),
            rest_host=environ.get("MBVISOR_REST_HOST", "127.0.0.1"),
            rest_port=int(environ.get("MBVISOR_REST_PORT", "8181")),
            token=token.strip() if token else None,
            limits=Limits(filters=int(environ.get("MBVISOR_MAX_FILTERS", "1000")),
                          redirects=int(environ.get("MBVISOR_MAX_REDIRECTS", "64")),
                          flows=int(environ.get("MBVISOR_MAX_FLOWS", "10000")),
                          per_port=int(environ.get("MBVISOR_MAX_PER_PORT", "16"))),
            audit_interval=float(environ.get("MBVISOR_AUDIT_INTERVAL", "10")),
            rest_max_connections=int(environ.get("MBVISOR_REST_MAX_CONNECTIONS", "256")),
            rest_idle_timeout=float(environ.get("MBVISOR_REST_IDLE_TIMEOUT", "30")),
            trust=TrustMode(trust),
            backend_check_interval=float(environ.get("MBVISOR_BACKEND_CHECK_INTERVAL", "1")),
            backend_down_after=float(environ.get("MBVISOR_BACKEND_DOWN_AFTER", "3")),
            controller_pps=int(environ.get("MBVISOR_CONTROLLER_PPS", "200")),
            placement=placement_from(environ.get("MBVISOR_TABLE_OFFSET"), environ.get("MBVISOR_NEXT_TABLE")),
            tls_cert=tls_cert, tls_key=tls_key, switch_ids=switch_ids,
        )


@dataclass(frozen=True)
class Plan:
    """What a job's commands do, before the switch has its say.  ``pending`` are the
    indices whose answer holds only if the switch confirms the flows of ``touched``;
    ``independent`` the answers that hold whatever the switch says (grammar errors, replays
    of earlier jobs' answers); ``claimed`` the idempotency keys this job holds in flight,
    ``zones`` the conntrack zones it gave new middleboxes (reserved until it ends)."""

    requests: list
    answers: tuple[Answer, ...]
    before: State
    after: State
    touched: frozenset[str] = frozenset()
    pending: tuple[int, ...] = ()
    backends: frozenset[str] = frozenset()
    keep: tuple[int, ...] = ()  # answers to store for replay
    independent: frozenset[int] = frozenset()
    claimed: tuple = ()
    zones: tuple = ()
    costs: dict = field(default_factory=dict)  # the counts of the job's filter sets (PlanContext.costs)
    added: dict = field(default_factory=dict)  # key -> the filters added to it, if nothing else changed (Draft.added)
    inventory: Inventory | None = None  # the switch's annotations the job was decided with (whose VM its copies are)

    def failed(self, failure: Failure) -> "Plan":
        """The switch refused or did not confirm: nothing of the job changes.  Every answer
        from the first changing command on was decided against state that now never
        existed ("already present" after a failed add), so each is the failure too, unless
        it holds anyway.  A refusal is stored for replay; an UNAVAILABLE is not (a retry
        must be tried again)."""
        first = self.pending[0]
        answer = Answer(failure.status, failure.text, failure.code)
        answers = tuple(a if i < first or i in self.independent else answer for i, a in enumerate(self.answers))
        keep = tuple(i for i in self.keep if answers[i] is self.answers[i] or failure.stored)
        return replace(self, answers=answers, after=self.before, touched=frozenset(), pending=(), keep=keep, added={})


class Decided(NamedTuple):
    """One command planned: its answer, the MAC whose flows change (None if none; its
    change is in the job's draft), its new backends; ``fresh``: decided now (not a replay
    or a refusal of its key), ``store``: kept for replay, ``independent``: holds whatever
    the switch says.  A named tuple: a bulk request makes one per command, and a frozen
    dataclass costs three times as much to make."""

    answer: Answer
    changed: str | None = None
    backends: frozenset = frozenset()
    fresh: bool = False
    store: bool = False
    independent: bool = False


@dataclass
class PlanContext:
    """What every command of one job on one switch is decided against, found once per job:
    the switch's surroundings and the binding (mode and annotations) of each port."""

    surroundings: Surroundings
    binding: Binding
    ports: dict[int, Binding] = field(default_factory=dict)
    costs: dict = field(default_factory=dict)  # (dpid, mac) -> (filters, addresses, switch entries): this job's counts

    def at(self, port: int) -> Binding:
        binding = self.ports.get(port)
        if binding is None:
            binding = self.ports[port] = replace(self.binding, port=port)
        return binding


def parse(command: dict | str):
    return parse_command(command) if isinstance(command, str) else command_from_dict(command)


@dataclass
class Controller:
    settings: Settings
    state: State = field(init=False)
    store: Store = field(init=False)
    metrics: Metrics = field(init=False)
    reconcilers: dict[int, SwitchReconciler] = field(default_factory=dict)
    neighbours: dict[int, dict[str, Neighbour]] = field(default_factory=dict)  # labs: learnt by ARP
    inventories: dict[int, Inventory] = field(default_factory=dict)  # the operator's annotated ports
    health: dict[int, BackendHealth] = field(default_factory=dict)
    arp_timeout: float = ARP_TIMEOUT
    threads: list = field(default_factory=list)
    in_flight: set = field(default_factory=set)  # idempotency keys of jobs not yet committed
    zones_in_flight: set = field(default_factory=set)  # conntrack zones given by jobs not yet committed
    flow_costs: dict = field(default_factory=dict)  # (dpid, mac) -> (filters, addresses, switch entries they cost)
    refusals: FaultLog = field(default_factory=lambda: FaultLog(log))  # switches refused for their identity
    waiting_copies: dict = field(default_factory=dict)  # id -> migration.Copy queued and not made yet
    void_copies: set = field(default_factory=set)       # ids of queued copies made void (_void_copies_to)
    retiring: dict = field(default_factory=dict)        # dpid -> Counter of gone ports, retirements queued
    replugged: dict = field(default_factory=dict)       # dpid -> those of them the switch reported added again
    unplugged: dict = field(default_factory=dict)       # dpid -> ports gone whose arrivals no publication made since
    departed: dict = field(default_factory=dict)        # dpid -> {port: annotations it lost, entry not retired}

    def __post_init__(self) -> None:
        self.store = Store(self.settings.database)
        loaded = self.store.load(self.settings.limits)
        self.state = unique_zones(loaded)
        if self.state is not loaded:
            log.warning("conntrack zones repeated across switches; renumbered (they are unique per host now)")
            self.store.save(loaded, self.state, [])
        self.inventories = {dpid: build_inventory(entries) for dpid, entries in self.store.load_inventories().items()}
        self.metrics = Metrics()
        for copy_id, copy in self.store.load_copies():  # queued when the controller stopped
            self.adopt(copy, made=copy_id)
        for anchor in [mb for mb in self.state.middleboxes if mb.anchor is not None]:
            self.drop_anchors(anchor.dpid, {anchor.mac})  # one that became needless while it was stopped
        if not self.store.copies_were_stored:  # a database from before they were
            for dpid in sorted(self.inventories):
                for copy in arrivals(self.state, self.inventories, dpid):
                    self.adopt(copy)
        self.store.prune_old(time.time())
        log.info("loaded %d middlebox(es) and the annotated ports of %d switch(es) from %s (trust: %s)",
                 len(self.state.middleboxes), len(self.inventories), self.settings.database,
                 self.settings.trust.value)

    def start(self) -> None:
        """The periodic work: audits of every switch, health checks of backends, re-probes
        of backends a lab located by ARP."""
        if self.settings.audit_interval > 0:
            self.threads.append(hub.spawn(self._every, self.settings.audit_interval, self._audit_all))
        if self.settings.backend_check_interval > 0:
            self.threads.append(hub.spawn(self._every, self.settings.backend_check_interval, self._check_backends))
        self.threads.append(hub.spawn(self._every, ARP_REFRESH, self._probe_all))
        self.threads.append(hub.spawn(self._every, PRUNE_INTERVAL, self._prune_answers))

    def _prune_answers(self) -> None:
        self.store.prune_old(time.time())

    def close(self) -> None:
        """Stop every green thread of ours (tests run many controllers in one hub)."""
        for thread in self.threads:
            hub.kill(thread)
        for reconciler in self.reconcilers.values():
            reconciler.stop()
        self.store.db.close()

    @staticmethod
    def _every(interval: float, work) -> None:
        while True:
            hub.sleep(interval)
            try:
                work()
            except Exception:
                log.exception("periodic %s failed", work.__name__)

    def _audit_all(self) -> None:
        for reconciler in list(self.reconcilers.values()):
            if reconciler.connected and reconciler.synced and not reconciler.jobs:
                reconciler.submit(Job("audit"))

    def _probe_all(self) -> None:
        for reconciler in list(self.reconcilers.values()):
            reconciler.probe_backends()

    def reconciler(self, dpid: int) -> SwitchReconciler:
        if dpid not in self.reconcilers:
            self.reconcilers[dpid] = SwitchReconciler(dpid, self)
        return self.reconcilers[dpid]

    # --- commands -----------------------------------------------------------------------

    def submit(self, requests: list[CommandRequest]) -> list[Answer]:
        """Answers in request order.  Each switch's commands go to its reconciler as one
        job (one bundle); different switches work in parallel and never wait on each other.
        A switch that never connected gets no reconciler (any dpid can be named)."""
        by_switch: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_switch.setdefault(request.dpid, []).append(index)
        jobs = {dpid: self.reconcilers[dpid].submit(Job("commands", [requests[i] for i in indices]))
                for dpid, indices in by_switch.items() if dpid in self.reconcilers}
        answers: list[Answer | None] = [None] * len(requests)
        for dpid, indices in by_switch.items():
            job = jobs.get(dpid)
            if job is None:
                found = self.unreachable(dpid, [requests[i] for i in indices])
            elif job.done.wait(timeout=JOB_DEADLINE) and job.answers is not None:
                found = job.answers
            else:
                found = [Answer("UNAVAILABLE", f"switch {dpid:016x} did not finish in time; try again",
                                "switch-down")] * len(indices)
            for index, answer in zip(indices, found):
                answers[index] = answer
        return answers

    def unreachable(self, dpid: int, requests: list[CommandRequest]) -> list[Answer]:
        """Commands for a switch that never connected: reads are answered, changes are
        UNAVAILABLE and change nothing."""
        plan = self.plan(dpid, requests)
        try:
            if plan.pending:
                plan = plan.failed(Failure("UNAVAILABLE", f"switch {dpid:016x} is not connected; try again",
                                           "switch-down"))
            return self.commit(dpid, plan)
        finally:
            self.release(plan)

    def execute(self, request: CommandRequest) -> Answer:
        return self.submit([request])[0]

    def plan(self, dpid: int, requests: list[CommandRequest]) -> Plan:
        """Decide every command of a job in order against the current state (pure but for
        the store's look-ups of earlier answers and the claims on keys in flight).  The
        decisions land in one ``Draft``: one new state per job, not one per command."""
        before = self.state
        draft = Draft(before, elsewhere=lambda: self.state.zones | self.zones_in_flight, reserve=self.zones_in_flight.add)
        context = PlanContext(self.surroundings(dpid), Binding(dpid, 0, self.settings.trust, self.inventory_of(dpid)))
        answers, touched, pending, backends, keep, independent, claimed = [], set(), [], set(), [], set(), []
        seen: dict[tuple, tuple[str, Answer, int]] = {}
        parsed: dict[int, object] = {}  # index -> its command, parsed while looking for a run of adds
        alone_until = 0  # commands before this index are decided one at a time (their run was refused)
        pace = Pacer()  # a 100,000-command request must not stall the switches or REST
        index = 0
        try:
            while index < len(requests):
                pace()
                if index >= alone_until:
                    run = self._run_of_adds(requests, index, parsed, pace)
                    run, not_new = self._fresh_keys_only(run, requests, index, parsed)  # no pace() until claimed
                    alone_until = index + len(run) + not_new  # those replay, wait or are refused alone
                    decided_run = self._plan_adds(requests[index].port, run, draft, context) if run else None
                    if decided_run is not None:
                        run_answers, added = decided_run
                        answers.extend(run_answers)
                        pending.extend(index + offset for offset in added)
                        if added:
                            touched.add(run[0].mac)
                        for at in range(index, index + len(run)):
                            if (key := requests[at].key) is not None:  # each fresh and stored, as _plan_one's
                                seen[key] = (command_text(requests[at].command), answers[at], at)
                                self.in_flight.add(key)
                                claimed.append(key)
                                keep.append(at)
                        index += len(run)
                        continue
                    parsed.update(zip(range(index, index + len(run)), run))
                    alone_until = max(alone_until, index + len(run))
                request = requests[index]
                decided = self._plan_one(request, draft, context, seen, pending[0] if pending else None,
                                         parsed.pop(index, None))
                answers.append(decided.answer)
                if decided.changed:
                    touched.add(decided.changed)
                    pending.append(index)
                    backends |= decided.backends
                if decided.independent:
                    independent.add(index)
                if request.key is not None and decided.fresh:
                    seen[request.key] = (command_text(request.command), decided.answer, index)
                    self.in_flight.add(request.key)
                    claimed.append(request.key)
                    if decided.store:
                        keep.append(index)
                index += 1
        except Exception:  # a bug costs the job (INTERNAL), never its keys and zones for good
            self.in_flight.difference_update(claimed)
            self.zones_in_flight.difference_update(draft.new_zones)
            raise
        # Counts of the filter sets the job ends with, kept with them once they are frozen.
        final = {key: counted for key, counted in context.costs.items() if counted[0] is draft.filters_of(*key)}
        after = self._departed_balancers(dpid, requests, before, draft.state(), touched)
        costs = {key: (after.by_key[key].filters, addresses, total) for key, (_, addresses, total) in final.items()}
        return Plan(requests, tuple(answers), before, after, frozenset(touched), tuple(pending),
                    frozenset(backends), tuple(keep), frozenset(independent), tuple(claimed), tuple(draft.new_zones),
                    costs, draft.added, context.binding.inventory)

    def _departed_balancers(self, dpid: int, requests: list[CommandRequest], before: State, after: State,
                            touched) -> State:
        """``after`` with the anchors that balancers a job of deletes without a key (the
        source agent's removal of a VM that left, an operator's) leave behind (anchors.py):
        the agent's delete may come before or after the port-status that retires it."""
        if any(request.key is not None for request in requests):
            return after
        removed = [mb for mac in touched if (mb := before.find(dpid, mac)) is not None and mb.redirects
                   and after.find(dpid, mac) is None]
        if not removed:
            return after
        for anchor in kept_as_anchors(before, dpid, removed, self.inventories, self._identities(dpid, removed)):
            try:  # the job may have given its backends or addresses to another balancer meanwhile
                check_can_hold(after, anchor, self.inventory_of(dpid))
            except ApplyError:
                continue
            after = after.put(anchor)
        return after

    def _identities(self, dpid: int, middleboxes) -> dict[int, PortIdentity]:
        """By port, what each middlebox's port was annotated as: now, or when it went."""
        inventory, departed = self.inventory_of(dpid), self.departed.get(dpid, {})
        found = {}
        for mb in middleboxes:
            now = inventory.at(mb.port)
            identity = now if now is not None and now.mac == mb.mac else departed.get(mb.port)
            if identity is not None:
                found[mb.port] = identity
        return found

    @staticmethod
    def _run_of_adds(requests: list[CommandRequest], start: int, parsed: dict, pace) -> list[AddFilter]:
        """The adds from ``start`` on that ``_plan_adds`` may decide together: from one
        port, of filters to one MAC (``_fresh_keys_only`` then cuts it at the first key that
        is not new).  Each command looked at is parsed once: the one that ends the run is
        kept in ``parsed`` (for the next run, or ``_plan_one``); one the grammar refuses
        ends the run (``_plan_one`` answers it)."""
        run: list[AddFilter] = []
        port = requests[start].port
        for index in range(start, len(requests)):
            request = requests[index]
            if request.port != port:
                break
            if index > start:
                pace()
            command = parsed.pop(index, None)
            if command is None:
                try:
                    command = parse(request.command)
                except CommandError:
                    break
            if not isinstance(command, AddFilter) or (run and command.mac != run[0].mac):
                parsed[index] = command
                break
            run.append(command)
        return run

    def _fresh_keys_only(self, run: list[AddFilter], requests: list[CommandRequest], start: int,
                         parsed: dict) -> tuple[list[AddFilter], int]:
        """The part of ``run`` before its first idempotency key that is not new (one the
        store answered, one in flight, claimed by another job or earlier in this one, or one
        used earlier in this run: those are ``_plan_one``'s, a replay, a wait or a
        refusal), and how many commands from there on have keys that are not new either
        (decided alone without looking for a run at each: a replayed frame of 4,096 would
        otherwise cost 4,096 looks).  The store is asked once for the whole run, and its
        answer holds until the keys are claimed because nothing yields in between.  The
        commands cut off stay in ``parsed``."""
        keys = [requests[at].key for at in range(start, start + len(run))]
        wanted = [key for key in keys if key is not None]
        if not wanted:
            return run, 0
        stored = self.store.stored_keys(wanted)
        taken: set = set()
        cut, end = None, len(keys)
        for offset, key in enumerate(keys):
            not_new = key is not None and (key in stored or key in self.in_flight or key in taken)
            if cut is None and not_new:
                cut = offset
            elif cut is not None and not not_new:
                end = offset
                break
            taken.add(key)
        if cut is None:
            return run, 0
        parsed.update(zip(range(start + cut, start + len(run)), run[cut:]))
        return run[:cut], end - cut

    def _plan_adds(self, port: int, run: list[AddFilter], draft: Draft,
                   context: "PlanContext") -> tuple[list[Answer], list[int]] | None:
        """A run of adds to one middlebox decided as one: its checks once, its filters as a
        set, their cost summed (a bulk install is runs of 1,000).  The answers and the
        offsets of those that add; None if any of them would be refused, so the run is
        decided one command at a time, which says which and why.  Property-tested against
        deciding every command one at a time."""
        try:
            middlebox = adding_to(draft, context.at(port), run[0])
            for command in run:
                check_destination_mac(middlebox, command.filter)
        except ApplyError:
            return None
        filters = draft.filters_of(*middlebox.key)
        new: set = set()  # each filter the run adds
        answers, added = [], []
        for offset, command in enumerate(run):
            known = len(new)
            if command.filter not in filters:
                new.add(command.filter)
            if len(new) == known:  # the middlebox or the run has it already (hashing a filter is not cheap)
                answers.append(ok_answer(present_answer_text(command)))
                continue
            answers.append(ok_answer(added_answer_text(command.mac, command.filter)))
            added.append(offset)
        if len(filters) + len(new) > draft.limits.filters:
            return None
        addresses, spent = self._flows_spent(middlebox, filters, context)
        total = spent + filters_cost(new, addresses)
        if total > draft.limits.flows:
            return None
        if new:
            draft.grow(middlebox, new)
            context.costs[middlebox.key] = (draft.filters_of(*middlebox.key), addresses, total)
        return answers, added

    def _plan_one(self, request: CommandRequest, draft: Draft, context: "PlanContext", seen: dict,
                  first_pending: int | None, command=None) -> "Decided":
        """``command``: the request's, if it was parsed already."""
        key = request.key
        if key is not None:
            text = command_text(request.command)
            local = seen.get(key)
            earlier = (local[0], local[1]) if local else self.store.answer(key)
            if earlier is not None:
                if earlier[0] is not None and earlier[0] != text:
                    return Decided(Answer("REJECTED", f"idempotency key {key[0]}/{key[1]}/{key[2]} was already used "
                                                      "for another command; nothing was applied", "key-reused"),
                                   independent=True)
                previous = earlier[1]
                # A replay of this job's own earlier command holds only if that one does.
                holds = local is None or first_pending is None or local[2] < first_pending
                return Decided(Answer(previous.status, previous.text, previous.code, replayed=True), independent=holds)
            if key in self.in_flight:
                return Decided(Answer("UNAVAILABLE", f"a command with idempotency key {key[0]}/{key[1]}/{key[2]} is "
                                                     "being applied; try again for its answer", "key-in-flight"),
                               independent=True)
        try:
            command = parse(request.command) if command is None else command
        except CommandError as error:
            return Decided(Answer("SYNTAX", str(error), "syntax"), fresh=True, store=True, independent=True)
        try:
            outcome = decide(draft, context.at(request.port), command)
            if outcome.added is not None:
                counted = self._check_flow_budget(outcome.middlebox, draft.filters_of(*outcome.key), command, context,
                                                  draft.limits)
        except ApplyError as error:
            return Decided(Answer("REJECTED", str(error), error.code), fresh=True, store=True)
        answer = Answer("OK", outcome.text)
        if isinstance(command, Query):
            return Decided(answer, fresh=True)  # reads are cheap to repeat: not stored
        if outcome.key is None:
            return Decided(answer, fresh=True, store=True)
        draft.record(outcome)
        if outcome.added is not None:  # counted with the set that grew (it grows in place: the same object)
            context.costs[outcome.key] = (draft.filters_of(*outcome.key), *counted)
        backends = frozenset(command.backends) if isinstance(command, RegisterLoadBalancer) else frozenset()
        return Decided(answer, command.mac, backends, fresh=True, store=True)

    def _check_flow_budget(self, middlebox: Middlebox, filters, command: AddFilter, context: PlanContext,
                           limits: Limits) -> tuple[frozenset[str], int]:
        """Limits count switch entries, not filters: one port-range filter can cost many.
        Each middlebox's cost is kept with the filter set it was counted for, so a bulk of
        filters adds, not recounts: the job's own counts first, then those of committed
        filter sets (``commit`` keeps only the current ones).  ``filters``: the
        middlebox's so far; the addresses and the total they cost with the new one.
        A job's count of the set it still grows also holds its addresses: only adds
        touched the middlebox since (anything else freezes the set), in the job's
        surroundings."""
        addresses, spent = self._flows_spent(middlebox, filters, context)
        total = spent + filter_cost(command.filter, addresses)
        if total > limits.flows:
            raise ApplyError("limit", f"{command.mac}'s filters would need {total} switch entries, the limit is "
                                      f"{limits.flows}; use wider prefixes or fewer port ranges")
        return addresses, total

    def _flows_spent(self, middlebox: Middlebox, filters, context: PlanContext) -> tuple[frozenset[str], int]:
        """The addresses that ``middlebox``'s ``filters`` (so far) are compiled for, and the
        switch entries they cost: as counted by this job or at the last commit, if they
        were counted for this very set."""
        known = context.costs.get(middlebox.key)
        if known is not None and known[0] is filters:
            return known[1], known[2]
        addresses = context.surroundings.addresses(middlebox)  # group forms: one per own address
        known = self.flow_costs.get(middlebox.key)
        if known is not None and known[0] is filters and known[1] == addresses:
            return addresses, known[2]
        return addresses, filters_cost(filters, addresses)

    def release(self, plan: Plan) -> None:
        """The job's keys are answered (or abandoned): others may use them again; its new
        zones are in the state now (or were never used)."""
        self.in_flight.difference_update(plan.claimed)
        self.zones_in_flight.difference_update(plan.zones)

    def commit(self, dpid: int, plan: Plan) -> list[Answer]:
        """Make a planned (and installed) change current and durable; the answers."""
        changed = plan.before.changed_keys(plan.after, {(dpid, mac) for mac in plan.touched})
        stored = [(plan.requests[i].key, plan.answers[i], command_text(plan.requests[i].command))
                  for i in plan.keep]
        # whose VM the job's middleboxes were when it was decided: their port may have gone
        # (its annotations with it) while the switch applied it
        inventories = self.inventories if plan.inventory is None else {**self.inventories, dpid: plan.inventory}
        copies = copies_after(dpid, plan.before, plan.after, plan.touched,
                              all(request.key is not None for request in plan.requests), inventories)
        copy_ids = self.store.save(plan.before, plan.after, stored, changed, plan.added, copies)
        for key in changed:  # counts of filter sets that are current now; none of gone ones
            middlebox, counted = plan.after.by_key.get(key), plan.costs.get(key)
            if middlebox is not None and counted is not None and counted[0] is middlebox.filters:
                self.flow_costs[key] = counted
            else:
                self.flow_costs.pop(key, None)
        if changed:
            self.state = self.state.merged(plan.after, changed)
            reconciler = self.reconciler(dpid)
            reconciler.generation += 1
            reconciler.applied = reconciler.generation
            self._follow(dpid, {mac for _, mac in changed})
        self._log(dpid, plan)
        self._copy_soon(zip(copy_ids, copies))
        return list(plan.answers)

    def _log(self, dpid: int, plan: Plan) -> None:
        """One line per command, except in bulk: a batch gets one summary line at INFO
        (its commands' lines only at DEBUG, and only made when DEBUG is on)."""
        counts = Counter(answer.status for answer in plan.answers)
        for status, count in counts.items():
            self.metrics.command(status, count)
        single = len(plan.requests) == 1
        if single or log.isEnabledFor(logging.DEBUG):
            detail = log.info if single else log.debug
            for request, answer in zip(plan.requests, plan.answers):
                detail("command %s on %016x port %s key %s: %s %s", clip(command_text(request.command), 120), dpid,
                       request.port, request.key, answer.status,
                       clip(answer.text.splitlines()[0] if answer.text else ""))
        if not single:
            log.info("batch of %d commands on %016x: %s", len(plan.requests), dpid,
                     ", ".join(f"{status} {count}" for status, count in sorted(counts.items())))

    def internal_error(self, requests: list[CommandRequest], error: Exception) -> list[Answer]:
        answer = Answer("INTERNAL", f"internal error in the controller ({type(error).__name__}); nothing was "
                                    "applied; see the controller log", "internal")
        self.metrics.command(answer.status, len(requests))
        return [answer] * len(requests)

    def delete_middlebox(self, dpid: int, mac: str, anchor: bool = False) -> Answer:
        """The operator's (or the agent's) delete: like the guest's X, without a guest.  A
        balancer whose twin elsewhere still needs its backends here stays as their anchor
        (``_departed_balancers``); an anchor goes only when asked by name (``anchor``): the
        source agent's delete of the VM that left must not take it."""
        middlebox = self.state.find(dpid, mac)
        if middlebox is None:
            return Answer("REJECTED", f"no middlebox {mac} on {dpid:016x}", "not-found")
        if (middlebox.anchor is not None) != anchor:
            what = ("is the anchor of a migrated balancer's redirects; delete it as an anchor (?anchor=true)"
                    if middlebox.anchor is not None else "is no anchor")
            return Answer("REJECTED", f"{mac} on {dpid:016x} {what}", "not-found")
        if anchor:
            if dpid in self.reconcilers:
                job = self.reconcilers[dpid].submit(Job("drop_anchors", macs=frozenset({mac}), forced=True))
                if not job.done.wait(timeout=JOB_DEADLINE):
                    return Answer("UNAVAILABLE", f"switch {dpid:016x} did not take the delete; try again",
                                  "switch-down")
            else:  # never connected: its flows are compiled when it connects
                self.drop_anchors(dpid, {mac}, forced=True)
            if self.state.find(dpid, mac) is not None:
                return Answer("REJECTED", f"{mac} on {dpid:016x} is no anchor any more", "not-found")
            return ok_answer(f"anchor {mac} removed")
        return self.execute(CommandRequest(dpid, middlebox.port, f"X {mac}"))

    def retire(self, dpid: int, ports) -> None:
        """Middleboxes whose port is gone lose their offloads, durably: a reused port must
        never inherit them, even when the port went while the controller was away."""
        queued = self.retiring.get(dpid, Counter())
        queued.subtract(ports)
        for port in [port for port, count in queued.items() if count <= 0]:
            del queued[port]
            self.replugged.get(dpid, set()).discard(port)
        gone = [mb for mb in self.state.on(dpid) if mb.port in ports and mb.anchor is None]
        identities = self._identities(dpid, gone)
        for port in ports:
            self.departed.get(dpid, {}).pop(port, None)
        if not gone:
            return
        anchors = {a.mac: a for a in kept_as_anchors(self.state, dpid, gone, self.inventories, identities)}
        after = self.state
        for middlebox in gone:
            after = after.put(anchors[middlebox.mac]) if middlebox.mac in anchors else after.remove(dpid, middlebox.mac)
            self.flow_costs.pop(middlebox.key, None)
        self.store.save(self.state, after, [])
        self.state = after
        reconciler = self.reconciler(dpid)
        reconciler.generation += 1
        for middlebox in gone:
            if middlebox.mac in anchors:
                log.info("switch %016x: port %d is gone; %s stays as the anchor of its redirects' connections "
                         "(its VM and its backends' traffic are elsewhere)", dpid, middlebox.port, middlebox.mac)
            else:
                log.info("switch %016x: port %d is gone; offloads of %s removed", dpid, middlebox.port, middlebox.mac)
        self._follow(dpid, {mb.mac for mb in gone})

    def anchor_departed(self, dpid: int, ports) -> None:
        """The balancers on ``ports`` whose port lost its annotations (``departed``) made the
        anchors they will be, durably, if their VM's twin needs them; the others as they
        are (their annotations may return)."""
        departed = self.departed.get(dpid, {})
        waiting = [mb for mb in self.state.on(dpid) if mb.port in ports and mb.port in departed
                   and mb.anchor is None and identity_of(mb, self.inventory_of(dpid)) is None]
        anchors = kept_as_anchors(self.state, dpid, waiting, self.inventories, self._identities(dpid, waiting))
        if not anchors:
            return
        after = self.state
        for anchor in anchors:
            after = after.put(anchor)
            departed.pop(anchor.port, None)
            self.flow_costs.pop(anchor.key, None)
        self.store.save(self.state, after, [])
        self.state = after
        if dpid in self.reconcilers:
            self.reconcilers[dpid].generation += 1
        for anchor in anchors:
            log.info("switch %016x: port %d lost its annotations; %s stays as the anchor of its redirects' "
                     "connections (its VM %s is elsewhere)", dpid, anchor.port, anchor.mac, anchor.anchor[0])
        self._follow(dpid, {anchor.mac for anchor in anchors})

    def drop_anchors(self, dpid: int, macs, forced: bool = False) -> set[str]:
        """The anchors among ``macs`` that nothing needs any more (``anchors.needless``), or
        all of them when ``forced`` (the operator's delete), removed durably; their MACs."""
        dropped = {mac for mac in macs if (mb := self.state.find(dpid, mac)) is not None and mb.anchor is not None
                   and (forced or needless(self.state, self.inventories, mb))}
        if not dropped:
            return dropped
        after = self.state
        for mac in dropped:
            after = after.remove(dpid, mac)
        self.store.save(self.state, after, [])
        self.state = after
        if dpid in self.reconcilers:
            self.reconcilers[dpid].generation += 1
        for mac in sorted(dropped):
            log.info("switch %016x: anchor %s removed: %s", dpid, mac,
                     "the operator deleted it" if forced else "no twin's redirects need its backends any more")
        self._follow(dpid, dropped)
        return dropped

    def _follow(self, dpid: int, macs) -> None:
        """The other switches' entries of ``macs`` (changed on ``dpid``, or their annotations
        there) compiled again in their own queues: a twin steers to the switch holding the
        backends, an anchor runs its twin's redirects (anchors.py); and anchors that may be
        needless now looked at there."""
        if not macs or not any(other != dpid for other in self.reconcilers):
            return
        again, anchors = affected(self.state, dpid, macs, list(self.reconcilers))
        for other in sorted(set(again) | set(anchors)):
            self.reconcilers[other].follow_soon(again.get(other, set()) | anchors.get(other, set()))

    # --- a middlebox on two switches while its VM migrates (migration.py) --------------

    def _copy_soon(self, copies) -> None:
        """Each stored copy (id, ``Copy``) in its switch's queue, after any job in flight
        there; a switch that never connected has none, nothing in flight, and takes the copy
        at once (installed when it connects)."""
        for copy_id, copy in copies:
            self.waiting_copies[copy_id] = copy
            if copy.dpid in self.reconcilers:
                self.reconcilers[copy.dpid].submit(Job("adopt", copy=copy, copy_id=copy_id))
            else:
                self.adopt(copy, made=copy_id)

    def _void_copies_to(self, dpid: int) -> None:
        """The copies waiting in switch ``dpid``'s queue whose VM its annotations no longer
        show (``migration.shown``) are forgotten, and do nothing when their turn comes."""
        inventory = self.inventory_of(dpid)
        for copy_id, copy in list(self.waiting_copies.items()):
            if copy.dpid == dpid and not shown(copy, inventory):
                del self.waiting_copies[copy_id]
                self.void_copies.add(copy_id)
                self.store.forget_copy(copy_id)
                log.info("switch %016x: the copy of %s from %016x is void: its VM's port there lost its annotations",
                         dpid, copy.origin[1], copy.origin[0])

    def adopt(self, copy: Copy, made: int | None = None) -> bool:
        """The ``copy`` made (its switch's twin of its origin brought to it, or given its
        change), durably, and the stored copy it ``made`` forgotten; whether anything
        changed.  Only the shell of ``migration.adopted``."""
        if made in self.void_copies:  # its target stopped showing its VM while it waited
            self.void_copies.discard(made)
            return False
        self.waiting_copies.pop(made, None)
        dpid, origin = copy.dpid, copy.origin
        try:
            after = adopted(self.state, self.inventories, dpid, origin, self.state.zones | self.zones_in_flight,
                            copy.cancelled, copy.change, copy.vm)
        except (ValueError, ApplyError) as error:
            log.error("switch %016x: no copy of %s from %016x: %s", dpid, origin[1], origin[0], error)
            self.store.forget_copy(made)
            return False
        if after is self.state:
            self.store.forget_copy(made)
            return False
        key = (dpid, origin[1])
        self.store.save(self.state, after, [], {key}, made=made)
        self.flow_costs.pop(key, None)
        self.state = after
        if dpid in self.reconcilers:
            self.reconcilers[dpid].generation += 1
        self._follow(dpid, {origin[1]})
        log.info("switch %016x: %s %s, the twin of %016x's (its VM is annotated on both)", dpid,
                 "holds a copy of" if after.find(*key) else "dropped its copy of", origin[1], origin[0])
        return True

    # --- switches (called by the app shell) ---------------------------------------------

    def switch_connected(self, datapath) -> None:
        self.metrics.switch_connected(datapath.id, True)
        log.info("switch %016x connected", datapath.id)
        self.reconciler(datapath.id).connected_to(datapath)

    def refuse_switch(self, datapath, refusal: Refusal) -> None:
        """A switch that may not be the datapath it announces (``switchid.refusal``): its
        connection is closed before it is anyone's, and the switch holding that id, if
        connected, keeps it.  Logged at most once per 10 s per kind (each refusal costs the
        peer only a handshake)."""
        self.metrics.refused_switches.inc()
        self.refusals(refusal.kind, logging.ERROR, "switch connection from %s refused: it announces datapath id "
                      "%016x, but %s", getattr(datapath, "address", "?"), datapath.id, refusal.text)
        datapath.close()

    def switch_disconnected(self, datapath) -> None:
        reconciler = self.reconcilers.get(datapath.id)
        if reconciler is not None and reconciler.disconnected(datapath):
            self.metrics.switch_connected(datapath.id, False)
            self.metrics.switch_gone(datapath.id)
            log.info("switch %016x disconnected", datapath.id)

    def receive(self, message) -> None:
        reconciler = self.reconcilers.get(message.datapath.id)
        if reconciler is not None:
            reconciler.receive(message)

    def port_deleted(self, dpid: int, port: int) -> None:
        """Queued whatever the state says now: a registration for that port may be in
        flight, and the retirement runs after it.  The port's annotations go at once: a
        VM given the same number must not speak for the one that had it until the agent
        publishes again."""
        inventory = self.inventories.get(dpid)
        annotated = inventory is not None and any(entry.port == port for entry in inventory.entries)
        if annotated:  # a VM's port, or an underlay port: a reused number must lead nowhere
            self._remember_departed(dpid, inventory, inventory.without(port))
            remaining = [entry for entry in inventory.entries if entry.port != port]
            self.store.save_inventory(dpid, remaining)
            self.inventories[dpid] = inventory.without(port)
            log.info("switch %016x: port %d is gone; its annotations with it", dpid, port)
            self._void_copies_to(dpid)
            self._follow(dpid, steering_macs(self.state.on(dpid)))
        if dpid in self.reconcilers:
            self.retiring.setdefault(dpid, Counter())[port] += 1
            self.replugged.get(dpid, set()).discard(port)
            self.unplugged.setdefault(dpid, set()).add(port)
            self.reconcilers[dpid].submit(Job("retire", ports=frozenset({port})))
            if annotated:
                self.reconcilers[dpid].converge_soon()

    def port_added(self, dpid: int, port: int) -> None:
        """A port added.  While the retirement of a gone port with its number is still
        queued, it is the same interface plugged again (OVS gives a name its old number
        back, as when a failed migration is retried): the entry the gone port left counts
        as missing for the arrivals from now on (a publication from before the port went,
        arriving late, does not make it so).  Arrivals to this port are looked for again
        (its annotations may have come first, and the retirement run meanwhile); only to
        this port: another port's twin an operator deleted stays deleted.  Only for a port
        seen going whose arrivals no publication has made since: a port-added is not a
        publication that changes nothing (a twin an operator deleted, or one whose guest's
        cancel is queued, would come back)."""
        if self.retiring.get(dpid, Counter())[port] > 0:
            self.replugged.setdefault(dpid, set()).add(port)
        if port not in self.unplugged.get(dpid, set()):
            return
        self.unplugged[dpid].discard(port)
        here = self.inventory_of(dpid)
        copies = [copy for copy in arrivals(self.state, self.inventories, dpid, self._replugged(dpid))
                  if (shown_at := here.with_mac(copy.origin[1])) is not None and shown_at.port == port]
        if copies:
            self._copy_soon(zip(self.store.save_copies(copies), copies))

    def _remember_departed(self, dpid: int, before: Inventory, after: Inventory) -> set[int]:
        """What the balancers' ports that lost their annotations were (anchors.py: the entry
        there, until retired or made an anchor, is the anchor it may become), whichever of
        the agent's publication and the switch's port-status comes first.  Kept if the
        number is annotated again meanwhile (as another VM: the entry is still the departed
        one's); forgotten with the entry."""
        departed = self.departed.setdefault(dpid, {})
        balancers = {mb.port: mb for mb in self.state.on(dpid) if mb.anchor is None and mb.redirects}
        new = set()
        for port, identity in before.ports.items():
            now = after.ports.get(port)
            if now is not None and now.mac == identity.mac:
                departed.pop(port, None)  # the same VM (its vm-id or addresses edited): still there
            elif port in balancers and balancers[port].mac == identity.mac:
                departed[port] = identity
                new.add(port)
        for port in [port for port in departed if port not in balancers]:
            del departed[port]
        return new

    def _replugged(self, dpid: int) -> set[int]:
        """Ports of ``dpid`` gone and added again, the gone one's retirement still queued."""
        return {port for port in self.replugged.get(dpid, ()) if self.retiring.get(dpid, Counter())[port] > 0}

    # --- the operator's annotations (published by the host agent) -----------------------

    def inventory_of(self, dpid: int) -> Inventory:
        return self.inventories.get(dpid, Inventory())

    def set_inventory(self, dpid: int, entries: list[PortIdentity]) -> Inventory:
        """Replace a switch's annotated ports (the agent publishes them whole).  Stored
        first, so a restarted controller enforces them before the agent speaks again;
        the switch converges to them in its own queue (port security, which middleboxes
        and backends the annotations still vouch for)."""
        inventory = build_inventory(entries)
        previous = self.inventories.get(dpid)
        if previous is not None and previous.entries == inventory.entries and previous.refused == inventory.refused:
            return previous
        newly_departed = self._remember_departed(dpid, previous or Inventory(), inventory)
        seen = {**self.inventories, dpid: inventory}
        copies = arrivals(self.state, seen, dpid, self._replugged(dpid))
        newly = named_only_now(self.state.on(dpid), previous or Inventory(), inventory)
        for other in sorted(seen):
            if other != dpid and newly:
                copies += [c for c in arrivals(self.state, seen, other, self._replugged(other))
                           if c.origin[0] == dpid and c.origin[1] in newly]
        copy_ids = self.store.save_inventory(dpid, entries, copies)
        for copy in copies:  # their port's arrivals made: its port-added need not look again
            if copy.dpid == dpid and (shown_at := inventory.with_mac(copy.origin[1])) is not None:
                self.unplugged.get(dpid, set()).discard(shown_at.port)
        self.inventories[dpid] = inventory
        self._void_copies_to(dpid)
        for refused in inventory.refused:
            log.warning("switch %016x: annotations of %s (port %d) refused: %s", dpid, refused.interface or "?",
                        refused.port, refused.reason)
        log.info("switch %016x: %d annotated port(s), %d refused", dpid, len(inventory.ports), len(inventory.refused))
        self.metrics.annotated_ports(dpid, len(inventory.ports), len(inventory.refused))
        if dpid in self.reconcilers:
            self.reconcilers[dpid].converge_soon()
        self._copy_soon(zip(copy_ids, copies))
        self._follow(dpid, steering_macs(self.state.on(dpid)))
        anchors = {mb.mac for mb in self.state.on(dpid) if mb.anchor is not None}
        if anchors and dpid in self.reconcilers:  # their backends may have left, their MAC be another VM's
            self.reconcilers[dpid].follow_soon(anchors)
        if newly_departed and dpid in self.reconcilers:  # durably the anchors they will be (kill -9 would lose them)
            self.reconcilers[dpid].submit(Job("anchor", ports=frozenset(newly_departed)))
        return inventory

    def surroundings(self, dpid: int, metered: bool = True) -> Surroundings:
        health = self.health.get(dpid)
        return Surroundings(self.settings.trust, self.inventory_of(dpid), self.neighbours_of(dpid),
                            health.reported if health else frozenset(), metered,
                            Elsewhere(dpid, self.state, self.inventories, self.departed))

    # --- backends: health checks, and in a lab their location by ARP ---------------------

    def packet_in(self, message) -> None:
        """Only answers to the resolver's MAC come to the controller, through meters: a
        backend's to its health check (ARP, or a neighbour advert for IPv6), and in a lab
        any ARP reply (flows.base_config, flows.compile_redirects)."""
        frame = packet.Packet(message.data)
        source = frame.get_protocol(ethernet.ethernet)
        if source is None or source.dst != RESOLVER_MAC:
            return
        reply, advert = frame.get_protocol(arp.arp), frame.get_protocol(icmpv6.icmpv6)
        if reply is not None and reply.opcode == arp.ARP_REPLY:
            self.arp_reply(message.datapath.id, reply.src_ip, reply.src_mac, message.match["in_port"])
        elif advert is not None and advert.type_ == icmpv6.ND_NEIGHBOR_ADVERT:
            self.arp_reply(message.datapath.id, advert.data.dst, source.src, message.match["in_port"])

    def neighbours_of(self, dpid: int) -> dict[str, Neighbour]:
        return self.neighbours.setdefault(dpid, {})

    def arp_reply(self, dpid: int, address: str, mac: str, port: int) -> None:
        """An annotated address is answered for only by its own port and MAC (port
        security drops the rest before it gets here); it only proves the backend alive.
        Other addresses locate a lab's backends, which is why labs are not isolated."""
        owner = self.inventory_of(dpid).owner(address)
        if owner is not None:
            if (owner.port, owner.mac) == (port, mac):
                self._backend_answered(dpid, address)
            return
        if self.settings.trust is not TrustMode.LAB:
            return
        self._backend_answered(dpid, address)
        known = self.neighbours_of(dpid)
        previous, known[address] = known.get(address), Neighbour(mac, port)
        if previous is not None and previous != known[address]:
            log.info("switch %016x: backend %s moved from %s to %s", dpid, address, previous, known[address])
            self._refresh_users(dpid, {address})

    def _refresh_users(self, dpid: int, addresses) -> None:
        users = frozenset(mb.mac for mb in self.state.on(dpid)
                          if any(set(r.backends) & set(addresses) for r in mb.redirects))
        if users and dpid in self.reconcilers:
            self.reconcilers[dpid].submit(Job("refresh", macs=users))

    def _backend_answered(self, dpid: int, address: str) -> None:
        health = self.health.get(dpid)
        if health is None:
            return
        health.answered(address, time.monotonic())
        if address in health.reported:
            self._settle_health(dpid, health)

    def _check_backends(self) -> None:
        """Ask every backend in use; those silent for too long leave their redirects."""
        now = time.monotonic()
        for dpid, reconciler in list(self.reconcilers.items()):
            if not (reconciler.connected and reconciler.synced):
                continue
            surroundings = self.surroundings(dpid)
            located = {}
            for middlebox in self.state.on(dpid):
                for backend in {b for r in middlebox.redirects for b in r.backends}:
                    where = surroundings.locate(middlebox, backend)
                    if where is not None:
                        located[backend] = where
            health = self.health.setdefault(dpid, BackendHealth(self.settings.backend_down_after))
            health.checking(located, now)
            for backend, where in sorted(located.items()):
                reconciler.link.send_unconfirmed(self.arp_check(reconciler.link.datapath, backend, where))
            self.metrics.forget_backends(dpid, set(located))
            for backend in located:
                self.metrics.backend_up(dpid, backend, backend not in health.reported)
            self._settle_health(dpid, health)

    def _settle_health(self, dpid: int, health: BackendHealth) -> None:
        went, back = health.settle(time.monotonic())
        for backend in sorted(went):
            log.warning("switch %016x: backend %s did not answer for %.1f s; out of its redirects", dpid, backend,
                        health.down_after)
            self.metrics.backend_up(dpid, backend, False)
        for backend in sorted(back):
            log.info("switch %016x: backend %s answers again; back in its redirects", dpid, backend)
            self.metrics.backend_up(dpid, backend, True)
        if went or back:
            self._refresh_users(dpid, went | back)

    @staticmethod
    def _arp_request(datapath, address: str, destination: str, out_port: int):
        """An ARP probe (sender 0.0.0.0, RFC 5227): answered, but cached by nobody."""
        frame = packet.Packet()
        frame.add_protocol(ethernet.ethernet(dst=destination, src=RESOLVER_MAC, ethertype=ether.ETH_TYPE_ARP))
        frame.add_protocol(arp.arp(opcode=arp.ARP_REQUEST, src_mac=RESOLVER_MAC, src_ip="0.0.0.0",
                                   dst_mac="00:00:00:00:00:00", dst_ip=address))
        frame.serialize()
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        return parser.OFPPacketOut(datapath, ofp.OFP_NO_BUFFER, ofp.OFPP_CONTROLLER,
                                   [parser.OFPActionOutput(out_port)], frame.data)

    @classmethod
    def arp_probe(cls, datapath, address: str):
        """A lab's search for an unannotated backend: flooded to every port."""
        return cls._arp_request(datapath, address, "ff:ff:ff:ff:ff:ff", datapath.ofproto.OFPP_FLOOD)

    @classmethod
    def arp_check(cls, datapath, address: str, where: Neighbour):
        """A health check: straight to the backend's port and MAC, seen by nobody else; a
        neighbour solicitation for an IPv6 backend (from the resolver's link-local address,
        so the advert comes back to the resolver's MAC)."""
        if ":" not in address:
            return cls._arp_request(datapath, address, where.mac, where.port)
        frame = packet.Packet()
        frame.add_protocol(ethernet.ethernet(dst=where.mac, src=RESOLVER_MAC, ethertype=ether.ETH_TYPE_IPV6))
        frame.add_protocol(ipv6.ipv6(src=link_local(RESOLVER_MAC), dst=address, nxt=ipv6_protocol.IPPROTO_ICMPV6,
                                     hop_limit=255))
        frame.add_protocol(icmpv6.icmpv6(type_=icmpv6.ND_NEIGHBOR_SOLICIT, data=icmpv6.nd_neighbor(
            dst=address, option=icmpv6.nd_option_sla(hw_src=RESOLVER_MAC))))
        frame.serialize()
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        return parser.OFPPacketOut(datapath, ofp.OFP_NO_BUFFER, ofp.OFPP_CONTROLLER,
                                   [parser.OFPActionOutput(where.port)], frame.data)

    # --- reads (REST) ---------------------------------------------------------------------

    def switch_views(self) -> list[dict]:
        return [r.view() for _, r in sorted(self.reconcilers.items())]

    def _flow_stats(self, dpid: int, cookie: int, mask: int) -> list:
        reconciler = self.reconcilers.get(dpid)
        if reconciler is None or not reconciler.connected:
            raise SwitchUnavailable(f"switch {dpid:016x} is not connected")
        link = reconciler.link
        try:
            return link.flow_stats(cookie, mask)
        except SwitchUnreachable as error:
            raise SwitchUnavailable(str(error)) from None

    def flow_statistics(self, dpid: int, cookie: int) -> list[dict]:
        """The switch's own view of a middlebox's flows, with counters; actions and the
        whole flow also in ``ovs-ofctl``'s syntax (ovstext.py)."""
        return [{"table": s.table_id, "priority": s.priority, "match": _match_body(s.match),
                 "packets": s.packet_count, "bytes": s.byte_count, "cookie": f"{s.cookie:#018x}",
                 "actions": actions_text(s.instructions), "text": flow_text(s)}
                for s in self._flow_stats(dpid, cookie, 0xFFFFFFFFFFFFFFFF)]

    def handled_packets(self, dpid: int, mac: str) -> dict:
        """Packets (and bytes) the middlebox would otherwise have received: each counted
        once, where the flow that decided it counts it (see flows.counts_as_handled)."""
        stats = self._flow_stats(dpid, cookie_of(mac), 0xFFFFFFFFFFFFFFFF)
        logical = self.settings.placement.logical_table
        decided = [s for s in stats if counts_as_handled(logical(s.table_id), s.priority, not s.instructions)]
        return {"packets": sum(s.packet_count for s in decided), "bytes": sum(s.byte_count for s in decided)}

    def backend_states(self, dpid: int, mac: str) -> dict[str, str]:
        """Each backend of a middlebox: ``up``, ``down`` (silent past the health checks'
        limit: out of its redirects) or ``unlocated`` (no annotation of its tenant holds it,
        or in a lab nobody answered ARP: not used)."""
        middlebox = self.state.find(dpid, mac)
        surroundings = self.surroundings(dpid)
        backends = sorted({b for r in middlebox.redirects for b in r.backends}) if middlebox else []
        return {b: "unlocated" if surroundings.locate(middlebox, b) is None else
                "down" if b in surroundings.down else "up" for b in backends}

    def refresh_metrics(self) -> None:
        """Per-middlebox series for the middleboxes that exist, one request per switch."""
        rows = {}
        for dpid, reconciler in list(self.reconcilers.items()):
            if not reconciler.connected:
                continue
            try:
                stats = self._flow_stats(dpid, COOKIE_TAG, COOKIE_TAG_MASK)
            except SwitchUnavailable:
                continue
            handled: Counter = Counter()
            logical = self.settings.placement.logical_table
            for s in stats:
                if counts_as_handled(logical(s.table_id), s.priority, not s.instructions):
                    handled[s.cookie] += s.packet_count
            for middlebox in self.state.on(dpid):
                rows[(dpid, middlebox.mac)] = handled.get(cookie_of(middlebox.mac), 0)
        self.metrics.set_handled(rows)


def _match_body(match) -> dict:
    return {name: value if isinstance(value, (int, str)) else list(value)
            for name, value in normal_match(match.items())}
