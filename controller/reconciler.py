"""One reconciler per switch: the only writer of that switch's flows and groups.

Work reaches a switch as jobs in one queue: the full reconciliation when it (re)connects
(always first, never behind commands), the guests' commands, ports that went away, a
backend that moved, and the periodic audit.  The reconciler runs them one at a time in its
own green thread; each job's flow changes go to the switch as one atomic bundle followed by
a barrier (``SwitchLink.commit``), so a refused job leaves the switch exactly as it was and
nothing needs rolling back by hand.  Switches never wait on each other: each has its own
queue and thread, and no lock is held while a switch thinks.

The decisions (which commands apply, what the desired flows are, what differs) are the
pure core's (``model``, ``flows``, ``reconcile``) and the service's ``plan``; this module
only moves their results to the switch and records what it then holds.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import logging
import time
from dataclasses import dataclass, field

from .compat import hub
from .flows import GROUP_IDS, SwitchConfig, base_config, compile_added_filters, compile_middlebox, compile_switch, owned_groups
from . import wire
from . import pacing
from .pacing import Pacer
from .ofmessages import encode_action, encoded_actions, group_mod, instructions, normal_match
from .pipeline import CONTROLLER_METER, COOKIE_TAG, COOKIE_TAG_MASK, PORT_METERS, Flow, Group, cookie_of
from .reconcile import Changes, reconcile
from .stepping import let_go, pausing
from .switchlink import SwitchLink, SwitchUnreachable
from .trust import TrustMode


@dataclass(frozen=True)
class Failure:
    """Why a job's flows are not on the switch: its answer and whether a retry replays it
    (a refusal is permanent; an UNAVAILABLE must be tried again)."""

    status: str
    text: str
    code: str

    @property
    def stored(self) -> bool:
        return self.status != "UNAVAILABLE"


def _by_channel(requests: list) -> dict:
    """Request indices by the channel of their idempotency key, in order (None: no key)."""
    channels: dict = {}
    for index, request in enumerate(requests):
        channels.setdefault(request.key[0] if request.key else None, []).append(index)
    return channels


class Abandoned(Exception):
    """A streamed bundle stopped before its commit (a backend not resolved, a meter the
    switch refused): the switch discards it and holds what it held."""

    def __init__(self, failure: Failure):
        super().__init__(failure.text)
        self.failure = failure

log = logging.getLogger("mbvisor.controller")
RESYNC_FLOOR, RESYNC_CEILING = 0.5, 30.0  # back-off between failed reconciliations (s)
BACKEND_PPS = 20    # a backend's answers per second: health checks ask once a second
FULL_AUDIT_COST = 100     # a full audit (listing every flow) at most once per this many times its cost ...
FULL_AUDIT_FLOOR = 600.0  # ... and never sooner than this many seconds after the last listing
MAX_SHARED = 1 << 16      # (cookie, actions) pairs the record of installed flows shares
FLOWS_PER_WRITE = 64     # flow mods packed together while a bundle streams: the switch starts on the first


def _in_slices(frame: wire.BundleFrame, parser, flows, command: str, actions_wire):
    """``flows`` as flow mods of ``frame``'s bundle, FLOWS_PER_WRITE at a time: packed
    together, but not a whole switch's before the first is written."""
    for start in range(0, len(flows), FLOWS_PER_WRITE):
        yield frame.flow_mods(parser, flows[start:start + FLOWS_PER_WRITE], command, actions_wire)


def _pacing_of(job: "Job"):
    """How the job's green thread shares the loop (pacing.py): reconciliations step aside
    for the commands being carried out."""
    if job.kind == "commands":
        return pacing.carrying()
    return pacing.background() if job.background else contextlib.nullcontext()


def _meters(flows, pace) -> set[int]:
    """The meters ``flows`` use, looked up once per distinct action list (a reconnected
    switch's 25,000 flows have a handful), with ``pace()`` between slices of them."""
    seen, meters = set(), set()
    for flow in pausing(flows, pace):
        if flow.actions not in seen:
            seen.add(flow.actions)
            meters.update(a[1] for a in flow.actions if a[0] == "meter")
    return meters


def _wire_buckets(buckets) -> bytes:
    """Groups carry no cookie and come back as objects: compare their encoded buckets."""
    out = bytearray()
    for bucket in buckets:
        for action in bucket:
            buf = bytearray()
            action.serialize(buf, 0)
            out += buf
        out += b"|"
    return bytes(out)


def _our_groups(descriptions) -> dict[int, bytes]:
    """mbvisor's groups among the switch's (group descriptions), by id: groups carry no
    cookie, so the ids mbvisor gives are its mark (``flows.GROUP_IDS``).  Another app's
    groups are never compared, changed or deleted (OVS would delete their flows too)."""
    return {d.group_id: _wire_buckets([b.actions for b in d.buckets]) for d in descriptions if d.group_id in GROUP_IDS}


@dataclass
class Installed:
    """What the switch holds as far as we know.  Like the switch, one flow per identity
    (table, priority, match), with the cookie and actions it has; actions are wire bytes
    when read from the switch and as compiled when recorded after an install.  An index
    by cookie finds one middlebox's flows without scanning the switch.  Groups as the
    wire bytes of their buckets.  Re-read at every reconnection and at audits that find a
    difference.  Only (cookie, actions) is kept per flow, not ``Flow`` objects."""

    flows: dict = field(default_factory=dict)      # (table, priority) -> match -> (cookie, actions)
    by_cookie: dict = field(default_factory=dict)  # cookie -> (table, priority) -> matches
    groups: dict = field(default_factory=dict)
    count: int = 0
    shared: dict = field(default_factory=dict)  # (cookie, actions) -> itself

    def all_flows(self) -> collections.abc.Iterator[Flow]:
        """Made as they are read (an audit's 25,000 took 5 ms in one piece): nothing may
        change the record until the iterator is done."""
        return (Flow(table, priority, match, actions, cookie) for (table, priority), by_match in self.flows.items()
                for match, (cookie, actions) in by_match.items())

    def flows_of(self, cookie: int) -> list[Flow]:
        return [Flow(place[0], place[1], match, self.flows[place][match][1], cookie)
                for place, matches in self.by_cookie.get(cookie, {}).items() for match in matches]

    def flow_count(self) -> int:
        return self.count

    def let_go(self, pause) -> None:
        """Empty the record a step at a time (stepping.let_go), ``pause()`` between steps:
        a restarted switch's old record of 25,000 flows dropped at once held the loop for
        milliseconds.  The index goes first (what it holds, the flows' dictionaries hold
        too), then each place's flows."""
        let_go(self.by_cookie, pause)
        for by_match in self.flows.values():
            let_go(by_match, pause)
        self.flows.clear()
        self.shared.clear()
        self.groups.clear()
        self.count = 0

    def held_at(self, flow: Flow) -> tuple | None:
        """(cookie, actions) of the flow the switch holds with ``flow``'s identity, if any
        (whoever's cookie)."""
        return self.flows.get((flow.table, flow.priority), {}).get(flow.match)

    def cookie_at(self, flow: Flow) -> int | None:
        """The cookie of the flow the switch holds with ``flow``'s identity, if any."""
        held = self.held_at(flow)
        return None if held is None else held[0]

    def holds(self, flow: Flow) -> None:
        """The switch holds ``flow`` (an add replaced whatever had its identity)."""
        self.holds_all((flow,))

    def holds_all(self, flows: collections.abc.Iterable[Flow], undo: list | None = None) -> None:
        """The switch holds each of ``flows``, in turn.  A job installs a middlebox at a time,
        most of its flows at one place (table, priority) and with one action list: a run
        of flows with the same place and cookie finds its dictionaries once, and a run of
        the same actions its shared (cookie, actions) pair once.  ``undo`` gathers what
        ``undo`` needs to put back what each flow replaced."""
        table = priority = cookie = by_match = matches = actions = held_as = None
        for flow in flows:
            if flow.table != table or flow.priority != priority or flow.cookie != cookie:
                table, priority, cookie, place = flow.table, flow.priority, flow.cookie, (flow.table, flow.priority)
                by_match = self.flows.setdefault(place, {})
                matches = self.by_cookie.setdefault(cookie, {}).setdefault(place, set())
                actions = None
            if flow.actions is not actions:
                actions = flow.actions
                held_as = (cookie, actions)
                if len(self.shared) >= MAX_SHARED:
                    self.shared.clear()  # pairs of middleboxes long gone
                held_as = self.shared.setdefault(held_as, held_as)  # a middlebox's drops share one
            match = flow.match
            held = by_match.get(match)
            if undo is not None:
                undo.append((place, match, held))
            if held is None:
                self.count += 1
            elif held[0] != cookie:
                self._unindex(held[0], place, match)  # another cookie's: never this run's own index
            by_match[match] = held_as
            matches.add(match)

    def lost(self, flow: Flow, undo: list | None = None) -> None:
        """``flow`` was deleted (a strict delete with its cookie: one that another cookie's
        flow replaced was not there to delete)."""
        place = (flow.table, flow.priority)
        held = self.flows.get(place, {}).get(flow.match)
        if held is None or held[0] != flow.cookie:
            return
        if undo is not None:
            undo.append((place, flow.match, held))
        self._forget(place, flow.match, held)

    def holds_group(self, group_id: int, wire: bytes | None, undo: list | None = None) -> None:
        """The switch holds group ``group_id`` with buckets ``wire`` (None: no such group)."""
        if undo is not None:
            undo.append((None, group_id, self.groups.get(group_id)))
        if wire is None:
            self.groups.pop(group_id, None)
        else:
            self.groups[group_id] = wire

    def undo(self, undo: list) -> None:
        """Put back what the changes that filled ``undo`` replaced, newest first: they were
        recorded while the switch applied their bundle, and it refused it."""
        for place, key, previous in reversed(undo):
            if place is None:
                self.holds_group(key, previous)
                continue
            held = self.flows.get(place, {}).get(key)
            if held is not None:
                self._forget(place, key, held)
            if previous is not None:
                self.flows.setdefault(place, {})[key] = previous
                self.by_cookie.setdefault(previous[0], {}).setdefault(place, set()).add(key)
                self.count += 1
        undo.clear()

    def _forget(self, place: tuple, match, held: tuple) -> None:
        by_match = self.flows[place]
        del by_match[match]
        if not by_match:
            del self.flows[place]
        self._unindex(held[0], place, match)
        self.count -= 1

    def _unindex(self, cookie: int, place: tuple, match) -> None:
        by_place = self.by_cookie[cookie]
        by_place[place].discard(match)
        if not by_place[place]:
            del by_place[place]
        if not by_place:
            del self.by_cookie[cookie]


@dataclass
class Job:
    """``kind``: sync (full reconciliation), audit, commands, retire (ports gone),
    adopt (hold a copy of another switch's middlebox: its VM is migrating here),
    drop_anchors (the operator's delete of an anchor), anchor (balancers whose port lost its
    annotations made the anchors they will be), follow (another switch changed what this
    one's balancers and anchors compile from: needless anchors dropped, the rest compiled
    again; anchors.py),
    refresh (re-install the flows of some middleboxes, e.g. a backend went down),
    converge (the annotated ports changed: everything compiled again, sent as a difference
    from what the switch is known to hold, without reading it)."""

    kind: str
    requests: list = field(default_factory=list)
    ports: frozenset = frozenset()
    macs: frozenset = frozenset()
    copy: object = None          # adopt: the migration.Copy to make here ...
    copy_id: int | None = None   # ... stored under this id (Store.load_copies)
    forced: bool = False         # drop_anchors: the operator's delete, needed or not
    done: object = field(default_factory=hub.Event)
    answers: list | None = None
    counted: bool = False  # among pacing.COMMANDS

    @property
    def background(self) -> bool:
        """Reconciliations: nobody waits on them for an answer, so they step aside for
        commands on their way (pacing.py)."""
        return self.kind in ("sync", "audit", "converge", "follow")


class SwitchReconciler:
    def __init__(self, dpid: int, service):
        self.dpid = dpid
        self.service = service  # state, plan/commit of commands and retirements, surroundings
        self.metered = False  # the switch has meters (the controller's is set up at each connection)
        self.meters: set[int] = set()  # meters set up on this connection
        self.link: SwitchLink | None = None
        self.installed = Installed()
        # Middleboxes whose whole compiled flows the switch is known to hold, each as the
        # value they were compiled from: set when a job that installed them committed,
        # dropped before anything else installs them and whenever the record is re-read.
        # Only these may be changed by compiling just their added filters.
        self.exact: dict[str, object] = {}
        self.synced = False
        self.connected_at: float | None = None
        self.connected_clock = 0.0
        self.generation = 0  # desired-state changes that concern this switch
        self.applied = 0     # ... of which the switch confirmed the flows
        self.last_error: str | None = None
        self.wire_cache: dict[tuple, bytes] = {}
        self.jobs: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self.wake = hub.Event()
        self.resync_pause = RESYNC_FLOOR
        self.listed_at = 0.0       # monotonic time of the last listing of every flow (a sync or full audit)
        self.listing_cost = 0.0    # its seconds per flow listed
        self.stopped = False
        self.thread = hub.spawn(self._run)

    # --- life cycle ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.link is not None and not self.link.closed

    def connected_to(self, datapath) -> None:
        """A (re)connection: its full reconciliation goes before anything queued."""
        if self.link is not None:
            self.link.close("switch reconnected")
        self.link = SwitchLink(datapath)
        self.meters = set()
        self.wire_cache: dict[tuple, bytes] = {}
        self.connected_at = time.time()
        self.connected_clock = time.monotonic()
        self.synced = False
        self.resync_pause = RESYNC_FLOOR
        self._push(Job("sync"), first=True)

    def disconnected(self, datapath) -> bool:
        """The connection ended (only if it is the current one); waiters learn it now."""
        if self.link is None or self.link.datapath is not datapath:
            return False
        self.link.close(f"switch {self.dpid:016x} disconnected")
        self.link = None
        self.synced = False
        return True

    def stop(self) -> None:
        self.stopped = True
        if self.link is not None:
            self.link.close("controller stopping")
        hub.kill(self.thread)
        for job in self.jobs:  # never carried out: no reconciliation may wait for them, nobody for their answer
            self._uncount(job)
            job.done.set()
        self.jobs.clear()

    def submit(self, job: Job) -> Job:
        self._push(job)
        return job

    def follow_soon(self, macs) -> None:
        """A follow job for ``macs``, merged into one still queued: a guest adding filters
        one by one on its twin's switch costs this switch one recompilation per turn of its
        queue, not one per command."""
        queued = next((job for job in self.jobs if job.kind == "follow"), None)
        if queued is not None:
            queued.macs = queued.macs | frozenset(macs)
        else:
            self.submit(Job("follow", macs=frozenset(macs)))

    def converge_soon(self) -> None:
        """One convergence pending at most: it compiles whatever the annotations are when
        it runs, so a burst of inventory changes costs one, not one each."""
        if not any(job.kind == "converge" for job in self.jobs):
            self._push(Job("converge"))

    def _push(self, job: Job, first: bool = False) -> None:
        if self.stopped:  # nothing will carry it out: its submitter is told at once (no answer)
            job.done.set()
            return
        if first:
            self.jobs.appendleft(job)
            if job.background:  # the commands queued now wait on it: they no longer count
                for queued in self.jobs:
                    self._uncount(queued)
        else:
            self.jobs.append(job)
            if job.kind == "commands" and not self._reconciling():
                self._count(job)
        self.wake.set()

    def _reconciling(self) -> bool:
        """Running or having queued a reconciliation (which a command pushed now waits for)."""
        return (self.current is not None and self.current.background) or any(j.background for j in self.jobs)

    @staticmethod
    def _count(job: Job) -> None:
        if not job.counted:
            job.counted = True
            pacing.COMMANDS.begin()

    @staticmethod
    def _uncount(job: Job) -> None:
        if job.counted:
            job.counted = False
            pacing.COMMANDS.end()

    def receive(self, message) -> None:
        if self.link is not None and message.datapath is self.link.datapath:
            self.link.receive(message)

    def _run(self) -> None:
        while True:
            while not self.jobs:
                self.wake.wait()
                self.wake.clear()
            job = self.current = self.jobs.popleft()
            if job.kind == "commands":
                self._count(job)
            try:
                with _pacing_of(job):
                    getattr(self, f"_{job.kind}")(job)
            except Exception as error:  # a bug costs this job, never the switch's reconciler
                log.exception("switch %016x: %s job failed", self.dpid, job.kind)
                if job.kind == "commands" and job.answers is None:
                    job.answers = self.service.internal_error(job.requests, error)
            finally:
                self.current = None
                job.done.set()  # its waiter runs before the background work it held back
                self._uncount(job)

    # --- jobs ---------------------------------------------------------------------------

    def _sync(self, job: Job, audit: bool = False) -> None:
        """Read what the switch holds and send only the difference to the desired state."""
        if not self.connected:
            return
        refused: list[str] = []
        try:
            if not audit:
                self._set_up_meter()
            started = time.monotonic()
            before = self._read_switch()
            self.listed_at = time.monotonic()
            self.listing_cost = (self.listed_at - started) / max(1, self.installed.flow_count())
            before.let_go(Pacer())
            self._resolve_backends(self.service.state.on(self.dpid))
            state = self.service.state
            errors, changes = self._send_whole()
            if errors:
                log.warning("switch %016x: the reconciliation was refused (%s); again middlebox by middlebox",
                            self.dpid, "; ".join(errors))
                errors, refused = self._sync_in_parts(state)
        except SwitchUnreachable as error:
            self._sync_failed(str(error))
            return
        if errors:
            self._sync_failed("; ".join(errors))
            return
        self.synced = True
        self.applied = self.generation
        self.last_error = f"the switch refused the flows of {', '.join(refused)}" if refused else None
        self.resync_pause = RESYNC_FLOOR
        if audit and changes:
            log.warning("switch %016x: flows changed by someone else; repaired: %s", self.dpid, changes)
        elif not audit:
            log.info("switch %016x reconciled %.3f s after connecting: %s", self.dpid,
                     time.monotonic() - self.connected_clock, changes or Changes().summary())

    def _send_whole(self) -> tuple[list[str], str | None]:
        """The switch's whole desired state compiled and the difference to what it holds
        sent as one bundle: (the switch's errors, a summary of the changes, None if none).
        The compiled flows are then freed a step at a time (stepping.let_go): all of a
        reconnected switch's 25,000 at the end of the job held the loop 6 ms."""
        pace = Pacer()
        desired = compile_switch(self.service.state, self.dpid, self._surroundings(), pace)
        changes = self._diff(desired, self.installed.all_flows(), set(self.installed.groups), pace)
        errors = self._send(changes)
        summary = None if changes.empty else changes.summary()
        compiled = list(desired.flows)  # their last holder once these two go
        del desired, changes
        let_go(compiled, pace)
        return errors, summary

    def _sync_in_parts(self, state) -> tuple[list[str], list[str]]:
        """One middlebox the switch refuses must not keep every other tenant (and the base
        flows a fail-mode=secure bridge needs to forward anything) off the switch: the base
        flows first, then one bundle per middlebox.  (errors of the base, refused MACs)."""
        middleboxes = state.on(self.dpid)
        known = {cookie_of(mb.mac) for mb in middleboxes}
        others = [f for f in self.installed.all_flows() if f.cookie not in known]
        errors = self._send(self._diff(base_config(self._surroundings()), others, set()))
        if errors:
            return errors, []
        refused = []
        for middlebox in middleboxes:
            try:
                if self._send(self._middlebox_changes(state, state, middlebox.mac)):
                    refused.append(middlebox.mac)
            except Abandoned:
                refused.append(middlebox.mac)
        if refused:
            log.warning("switch %016x: the flows of %s were refused; every other middlebox is in place",
                        self.dpid, ", ".join(refused))
        return [], refused

    def _converge(self, job: Job) -> None:
        self.exact.clear()
        if not (self.connected and self.synced):
            return  # the reconciliation still to come compiles the new annotations
        try:
            errors, _ = self._send_whole()
        except SwitchUnreachable as error:
            errors = [str(error)]
        if errors:
            self.synced = False  # read the switch again and retry with back-off
            self._sync_failed("; ".join(errors))

    def _surroundings(self):
        return self.service.surroundings(self.dpid, self.metered)

    def _set_up_meter(self) -> None:
        """Packets to the controller pass meters, so no VM can flood it: the controller's
        own is set up at each connection (a switch without meters gets flows without
        them, and a warning); each backend port's is set up when a flow first uses it."""
        errors = self._ensure_meter(CONTROLLER_METER)
        if errors:
            log.warning("switch %016x has no meters (%s); packets to the controller are not rate-limited", self.dpid,
                        "; ".join(errors))
        self.metered = not errors

    def _ensure_meter(self, meter_id: int) -> list[str]:
        """Added, or changed if the switch kept it from an earlier connection."""
        if meter_id in self.meters:
            return []
        datapath = self.link.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        rate = BACKEND_PPS if meter_id >= PORT_METERS else max(1, self.service.settings.controller_pps)
        bands = [parser.OFPMeterBandDrop(rate=rate, burst_size=rate)]
        errors = []
        for command in (ofp.OFPMC_ADD, ofp.OFPMC_MODIFY):
            errors = self.link.confirm(parser.OFPMeterMod(datapath, command, ofp.OFPMF_PKTPS | ofp.OFPMF_BURST,
                                                          meter_id, bands))
            if not errors:
                self.meters.add(meter_id)
                break
        return errors

    def _audit(self, job: Job) -> None:
        """Listing 200,000 flows costs the controller seconds, so an audit first asks the
        switch how many of our flows it holds (and reads its few groups): when both are
        what we installed, nothing was removed or added behind our back.  Flows another
        application changed in place are found by a full audit, which runs when the counts
        differ, or when the last listing is older than FULL_AUDIT_FLOOR and FULL_AUDIT_COST
        times what listing today's flows would cost (at most about 1 % of the controller)."""
        if not (self.connected and self.synced):
            return
        listing = self.listing_cost * self.installed.flow_count()
        if time.monotonic() < self.listed_at + max(FULL_AUDIT_FLOOR, FULL_AUDIT_COST * listing):
            try:
                if self._counts_agree():
                    return
            except SwitchUnreachable as error:
                self._sync_failed(str(error))
                return
        self._sync(job, audit=True)

    def _counts_agree(self) -> bool:
        if self.link.flow_count(COOKIE_TAG, COOKIE_TAG_MASK) != self.installed.flow_count():
            return False
        descriptions = self.link.request(self.link.datapath.ofproto_parser.OFPGroupDescStatsRequest(self.link.datapath, 0))
        return _our_groups(descriptions) == self.installed.groups

    def _sync_failed(self, reason: str) -> None:
        """Not synced until a later attempt succeeds; commands meanwhile answer UNAVAILABLE."""
        self.synced = False
        self.last_error = reason
        log.warning("switch %016x: reconciliation failed (%s); again in %.1f s", self.dpid, reason,
                    self.resync_pause)
        link = self.link
        hub.spawn_after(self.resync_pause, self._retry_sync, link)
        self.resync_pause = min(self.resync_pause * 2, RESYNC_CEILING)

    def _retry_sync(self, link) -> None:
        if self.link is link and link is not None and not link.closed and not self.synced and not self.stopped:
            self._push(Job("sync"), first=True)

    def _commands(self, job: Job) -> None:
        answers = self._apply(job.requests)
        if answers is None:
            answers = [None] * len(job.requests)
            for indices in _by_channel(job.requests).values():
                part = [job.requests[i] for i in indices]
                try:
                    decided = self._apply(part)
                except Exception as error:  # a bug costs this channel, not the answers others committed
                    log.exception("switch %016x: commands of one channel failed", self.dpid)
                    decided = self.service.internal_error(part, error)
                for index, answer in zip(indices, decided):
                    answers[index] = answer
        job.answers = answers

    def _apply(self, requests: list) -> list | None:
        """Plan, install as one bundle, commit; the answers, or None when they are to be
        split by channel: the agent puts several guests' commands in one request, and if
        the switch refuses that bundle each channel's commands are tried again on their
        own, so only the guest whose flows the switch refuses is answered (and stores) the
        refusal."""
        plan = self.service.plan(self.dpid, requests)
        try:
            failure = None
            if plan.touched:
                exact = self._take_exact(plan.before, plan.touched)
                added = {mac: plan.added[(self.dpid, mac)] for mac in exact if (self.dpid, mac) in plan.added}
                failure = self._install(plan.before, plan.after, plan.touched, plan.backends, added)
                if failure is not None:
                    if failure.code == "switch-error" and len(_by_channel(requests)) > 1:
                        return None  # after the release below: each channel alone
                    plan = plan.failed(failure)
            answers = self.service.commit(self.dpid, plan)
            if failure is None:
                for mac in plan.touched:
                    if (middlebox := plan.after.find(self.dpid, mac)) is not None:
                        self.exact[mac] = middlebox
            return answers
        finally:
            self.service.release(plan)

    def _take_exact(self, before, macs) -> set[str]:
        """The ``macs`` the switch is known to hold whole as they are in ``before``; none
        of them stays known while it is being changed."""
        known = {mac: self.exact.pop(mac, None) for mac in macs}
        return {mac for mac, middlebox in known.items()
                if middlebox is not None and middlebox is before.find(self.dpid, mac)}

    def _forget_exact(self, macs) -> None:
        for mac in macs:
            self.exact.pop(mac, None)

    def _retire(self, job: Job) -> None:
        """Checked when it runs, after any job that was in flight when the port went."""
        before = self.service.state
        self.service.retire(self.dpid, job.ports)
        self._settle(before, {mb.mac for mb in before.on(self.dpid) if mb.port in job.ports})

    def _drop_anchors(self, job: Job) -> None:
        before = self.service.state
        self._settle(before, self.service.drop_anchors(self.dpid, job.macs, job.forced))

    def _anchor(self, job: Job) -> None:
        before = self.service.state
        self.service.anchor_departed(self.dpid, job.ports)
        self._settle(before, {mb.mac for mb in before.on(self.dpid) if mb.port in job.ports})

    def _follow(self, job: Job) -> None:
        """Checked when it runs: the twin may have come back meanwhile."""
        before = self.service.state
        self.service.drop_anchors(self.dpid, job.macs)
        self._settle(before, job.macs)

    def _settle(self, before, macs) -> None:
        """The flows of ``macs`` from ``before`` to the current state, or a reconciliation."""
        if not macs:
            return
        self._forget_exact(macs)
        if self._install(before, self.service.state, macs, set()) is None:
            self.applied = self.generation
        else:
            self.synced = False  # the next reconciliation does it
            self._retry_sync(self.link)

    def _adopt(self, job: Job) -> None:
        """This switch's copy of ``job.copy``'s origin made equal to it, as it is when the
        job runs (or removed if it is gone); checked then, after any job in flight here."""
        before = self.service.state
        if not self.service.adopt(job.copy, job.copy_id):
            return
        mac = job.copy.origin[1]
        self._forget_exact({mac})
        wanted = self.service.state.find(self.dpid, mac)
        backends = {b for r in wanted.redirects for b in r.backends} if wanted else set()
        if self._install(before, self.service.state, {mac}, backends) is None:
            self.applied = self.generation
        else:  # stored: the next reconciliation installs it
            self.synced = False
            self._retry_sync(self.link)

    def _refresh(self, job: Job) -> None:
        state = self.service.state
        self._forget_exact(job.macs)
        self._install(state, state, set(job.macs), set())

    def _install(self, before, after, macs, backends, added=None) -> Failure | None:
        """Flows of the ``macs`` middleboxes from ``before`` to ``after`` as one bundle,
        compiled one middlebox at a time while the earlier ones are already on their way.
        ``added``: by MAC, the filters ``after`` adds to a middlebox it changes no other
        way and whose whole compiled ``before`` the switch holds.  None when the switch
        confirmed; else why not."""
        if not self.connected:
            return Failure("UNAVAILABLE", f"switch {self.dpid:016x} is not connected; try again", "switch-down")
        if not self.synced:
            return Failure("UNAVAILABLE", f"switch {self.dpid:016x} is being reconciled; try again", "switch-down")
        added = added or {}
        try:
            self._resolve(backends)
            errors = self._stream(self._middlebox_changes(before, after, mac, added.get(mac)) for mac in sorted(macs))
        except Abandoned as abandoned:
            return abandoned.failure
        except SwitchUnreachable as error:
            self.synced = False  # what the switch holds is unknown now: read it again
            self._retry_sync(self.link)
            return Failure("UNAVAILABLE", f"{error}; nothing was applied, try again", "switch-down")
        if errors:
            return Failure("REJECTED", "switch refused: " + "; ".join(errors), "switch-error")
        return None

    def _middlebox_changes(self, before, after, mac: str, added=None) -> Changes:
        """Raises Abandoned if a backend the flows need is not located yet (labs: ARP).
        The groups of both zones are managed: a middlebox cancelled and registered again
        in one job may get another zone, and its old groups must go.  Only added filters
        are compiled (``added``, given only when the switch is known to hold the whole of
        ``before``): anything it lacks (refused at a reconnection, a redirect whose backend
        was not located then, a change confirmed but not committed) is repaired by
        compiling the middlebox whole."""
        if self.link is None or self.link.closed:  # disconnected while the bundle before this part was sent
            raise SwitchUnreachable(f"switch {self.dpid:016x} disconnected while its bundle was sent")
        wanted = after.find(self.dpid, mac)
        surroundings = self._surroundings()
        flows = compile_added_filters(before.find(self.dpid, mac), wanted, added, surroundings)
        if flows is not None:  # compared with what the switch holds at those identities only
            return self._added_changes(flows, cookie_of(mac))
        desired = (compile_middlebox(wanted, surroundings) if wanted
                   else SwitchConfig(frozenset(), frozenset()))
        if desired.unresolved:
            raise Abandoned(Failure("UNAVAILABLE", f"backend {', '.join(desired.unresolved)} did not answer ARP; "
                                                   "nothing was applied, try again", "backend-unresolved"))
        groups = {g for mb in (before.find(self.dpid, mac), wanted) if mb is not None for g in owned_groups(mb)}
        return self._diff(desired, self.installed.flows_of(cookie_of(mac)), groups)

    # --- talking to the switch ----------------------------------------------------------

    def _read_switch(self) -> Installed:
        """Record the switch's flows and groups; the record it replaces (for the caller to
        let go of, once the listing is timed).  (Its ports are not compared with the
        middleboxes' here: a restarting ovs-vswitchd may connect before it has re-added
        them.  Departures come as port-status messages and as the agent's deletes.)"""
        datapath = self.link.datapath
        stats = self.link.flow_stats(COOKIE_TAG, COOKIE_TAG_MASK)
        installed = Installed()
        pace = Pacer()
        for stat in stats:
            installed.holds(Flow(stat.table_id, stat.priority, normal_match(stat.match.items()),
                                 (("wire", encoded_actions(datapath, stat.instructions)),), stat.cookie))
            pace()
        descriptions = self.link.request(datapath.ofproto_parser.OFPGroupDescStatsRequest(datapath, 0))
        installed.groups = _our_groups(descriptions)
        before, self.installed = self.installed, installed
        self.exact.clear()
        return before

    def _added_changes(self, added, cookie: int) -> Changes:
        """``_diff`` of flows that only add to what the middlebox has (no groups, nothing
        of it deleted), in one pass over them: ``reconcile``'s dictionaries of identities
        cost a bulk install more than compiling the flows.  Each is added unless the
        middlebox holds its identity already; then modified if its actions differ."""
        add, modify = [], []
        held_by_place, place, held_here = self.installed.flows, None, {}
        placement = self.service.settings.placement
        if not placement.is_default:
            added = map(placement.flow, added)
        for flow in added:  # Installed.held_at, each place's dictionary found once per run of flows there
            if place != (flow.table, flow.priority):
                place = (flow.table, flow.priority)
                held_here = held_by_place.get(place, {})
            held = held_here.get(flow.match)
            if held is None or held[0] != cookie:
                add.append(flow)
            elif self._wire(flow.actions) != self._actions_wire(held[1]):
                modify.append(flow)
        return Changes(add_flows=tuple(add), modify_flows=tuple(modify))

    def _diff(self, desired: SwitchConfig, installed, managed_groups: set[int],
              pause: collections.abc.Callable[[], None] = lambda: None) -> Changes:
        """What turns ``installed`` into ``desired`` (as compiled: placed here among the
        switch's tables, see placement.py); ``pause`` as ``reconcile``'s."""
        placement = self.service.settings.placement
        if not placement.is_default:
            desired = SwitchConfig(frozenset(map(placement.flow, desired.flows)),
                                   frozenset(map(placement.group, desired.groups)), desired.unresolved)
        link = self.link  # a disconnection handled during the comparison's pauses drops self.link
        if link is None:
            raise SwitchUnreachable(f"switch {self.dpid:016x} disconnected")
        datapath = link.datapath

        def same_flow(want: Flow, have: Flow) -> bool:
            return (want.cookie == have.cookie
                    and self._wire(want.actions, datapath) == self._actions_wire(have.actions, datapath))

        def same_group(want: Group, have: Group) -> bool:
            return self._group_wire(want, datapath) == self.installed.groups.get(have.group_id)

        present_groups = [Group(i, ()) for i in self.installed.groups if i in managed_groups]
        return reconcile(desired, installed, present_groups, managed_groups, same_flow, same_group, pause)

    def _actions_wire(self, actions: tuple, datapath=None) -> bytes:
        """An installed flow's actions as wire bytes: read from the switch they are
        already; recorded after an install they are the flow as compiled."""
        if actions and actions[0][0] == "wire":
            return actions[0][1]
        return self._wire(actions, datapath)

    def _wire(self, actions: tuple, datapath=None) -> bytes:
        """Actions as the switch reports them (its wire bytes).  Few distinct action lists
        exist (every filter drops), so they are encoded once per connection.  ``datapath``:
        the connection a bundle is streamed on (the reconciler's may be gone meanwhile)."""
        wire = self.wire_cache.get(actions)
        if wire is None:
            datapath = datapath or self.link.datapath
            wire = self.wire_cache[actions] = encoded_actions(datapath, instructions(datapath, actions))
        return wire

    def _group_wire(self, group: Group, datapath) -> bytes:
        return _wire_buckets([[encode_action(datapath, a) for a in bucket] for bucket in group.buckets])

    def _send(self, changes: Changes) -> list[str]:
        """One bundle of ``changes``; the switch's errors (a meter it refused among them)."""
        try:
            return self._stream([changes])
        except Abandoned as abandoned:
            return [abandoned.failure.text]

    def _stream(self, parts) -> list[str]:
        """The parts' changes as one bundle, each part in a safe order (groups before the
        flows that use them, flows before the groups they used; a part is one middlebox,
        or the whole switch, and no part uses another's groups).  ``parts`` may be a
        generator that compiles as it goes: each part is encoded and written while the
        next is compiled.  The switch's errors; what it confirmed is recorded.  Raises
        Abandoned (the bundle discarded) if a part cannot be sent: a meter refused, or a
        middlebox that cannot be compiled."""
        sent: list[Changes] = []
        link = self.link  # this bundle's connection: a disconnection handled meanwhile drops self.link
        if link is None:
            raise SwitchUnreachable(f"switch {self.dpid:016x} disconnected")
        datapath = link.datapath

        def messages(frame: wire.BundleFrame):
            parser = datapath.ofproto_parser
            pace = Pacer()
            actions_wire = lambda actions: self._wire(actions, datapath)
            for part in parts:
                if part.empty:
                    continue
                meters = sorted(_meters(part.add_flows + part.modify_flows, pace))
                if self.link is not link:  # also while the meters were looked for
                    raise SwitchUnreachable(f"switch {self.dpid:016x} disconnected while its bundle was sent")
                for meter_id in meters:
                    errors = self._ensure_meter(meter_id)
                    if errors:
                        raise Abandoned(Failure("REJECTED", f"switch refused meter {meter_id}: " + "; ".join(errors),
                                                "switch-error"))
                sent.append(part)
                yield from (frame.wrap(group_mod(datapath, g, "add")) for g in part.add_groups)
                yield from (frame.wrap(group_mod(datapath, g, "modify")) for g in part.modify_groups)
                yield from _in_slices(frame, parser, part.add_flows, "add", actions_wire)
                # A modify keeps the flow's cookie; one that another cookie held is replaced whole.
                cookie_at = self.installed.cookie_at
                modified = [f for f in part.modify_flows if cookie_at(f) == f.cookie]
                yield from _in_slices(frame, parser, modified, "modify", actions_wire)
                yield from _in_slices(frame, parser, [f for f in part.modify_flows if cookie_at(f) != f.cookie], "add",
                                      actions_wire)
                yield from _in_slices(frame, parser, part.delete_flows, "delete", actions_wire)
                yield from (frame.wrap(group_mod(datapath, i, "delete")) for i in part.delete_groups)

        undo: list = []

        def record() -> None:  # while the switch applies the bundle: idle time here
            for part in sent:
                self._record(part, undo, datapath)

        try:
            errors = link.commit(messages, meanwhile=record)
        except BaseException:
            self.installed.undo(undo)
            raise
        if errors:
            self.installed.undo(undo)
        let_go(undo, Pacer())  # a reconnected switch's: 25,000 entries
        self.service.metrics.openflow_errors(len(errors))
        self.service.metrics.flows_installed(self.dpid, self.installed.flow_count())
        return errors

    def _record(self, changes: Changes, undo: list, datapath) -> None:
        """The sent flows, kept as compiled (their wire bytes are cached by action list),
        with what ``Installed.undo`` needs if the switch refuses them."""
        self.installed.holds_all(pausing(changes.add_flows + changes.modify_flows, Pacer()), undo)
        for flow in changes.delete_flows:
            self.installed.lost(flow, undo)
        for group in changes.add_groups + changes.modify_groups:
            self.installed.holds_group(group.group_id, self._group_wire(group, datapath), undo)
        for group_id in changes.delete_groups:
            self.installed.holds_group(group_id, None, undo)

    # --- backend addresses --------------------------------------------------------------

    def _resolve_backends(self, middleboxes) -> None:
        self._resolve({b for mb in middleboxes for r in mb.redirects for b in r.backends})

    def _resolve(self, addresses) -> None:
        """In a lab, learn the MACs of unannotated ``addresses`` by ARP from this switch
        (bounded wait).  Annotated backends are located by their annotations."""
        if self.service.settings.trust is not TrustMode.LAB:
            return
        known, inventory = self.service.neighbours_of(self.dpid), self.service.inventory_of(self.dpid)
        missing = {a for a in addresses if a not in known and ":" not in a and inventory.owner(a) is None}
        deadline = time.monotonic() + self.service.arp_timeout
        while missing and time.monotonic() < deadline and self.connected:
            for address in sorted(missing):
                self.link.send_unconfirmed(self.service.arp_probe(self.link.datapath, address))
            for _ in range(20):
                with pacing.elsewhere():
                    hub.sleep(0.025)
                missing = {a for a in missing if a not in known}
                if not missing:
                    return

    def probe_backends(self) -> None:
        """A lab's backends located by ARP may move (a VM migrates, a NIC is replaced):
        ask again now and then."""
        if not self.connected or self.service.settings.trust is not TrustMode.LAB:
            return
        inventory = self.service.inventory_of(self.dpid)
        for address in sorted({b for mb in self.service.state.on(self.dpid) for r in mb.redirects
                               for b in r.backends if inventory.owner(b) is None and ":" not in b}):
            self.link.send_unconfirmed(self.service.arp_probe(self.link.datapath, address))

    def view(self) -> dict:
        return {"dpid": self.dpid, "connected": self.connected, "connected_at": self.connected_at,
                "synced": self.synced, "generation": self.generation, "applied_generation": self.applied,
                "flows": self.installed.flow_count() if self.connected else None,
                "groups": len(self.installed.groups) if self.connected else None,
                "last_error": self.last_error}
