"""Long work shares the event loop: it yields after every SLICE seconds of running.

Under eventlet a green thread runs until it yields.  A 100,000-command request parsed,
planned, compiled and recorded in one go would hold every other switch's commands, the
REST API and the echo replies (a switch drops a controller silent for 5 s).  Yielding
every N items gives slices as long as N items happen to take; a clock gives the same
slice whatever the items cost.  A yield costs about 20 us, so 1 ms slices cost ~2 %; against
2 ms they cut what another switch's command waits during a 100k-filter install by a third
(p50 23 -> 15 ms, p99 49-67 -> 41-43 ms).

Background work (a reconnected switch's reconciliation: nobody waits on it for an answer)
also steps aside while a command is being carried out.  A command passes through several
green threads (its reconciler, the switch connection's sender and receiver, the REST
server), and each hand-off waited behind one slice of the background work: a restarted
switch's 25,000 flows put 8 ms on every other switch's commands for as long as they took.
A command counts from the moment it reaches its reconciler (queued behind nothing but
other commands) until it is answered; its answer goes out before the background work
resumes.  It stops counting while it waits for an ARP reply, or on a switch that has not
answered within ANSWER_GRACE (a hung switch's 5 s would slow every reconciliation
sevenfold).  Up to then it counts: a switch on the same host needs the CPU to apply the
command, and a reconciliation that went on meanwhile put 4 ms on the others' p50 while a
restarted switch reconverged (bench datacentre: 2.6-3.0 -> 6.7-8.9 ms).  Waiting up to
2 ms (not 0.6) at a time for commands: p50 5.2-5.9 -> 3.4-5.2 ms in the same benchmark.  What it cannot skip is the background slice under way when its request
arrived: background slices are shorter (0.3 ms: p50 of the others' commands while a
restarted switch reconverged 4.3-4.9 -> 2.7-3.3 ms; the reconciliation took 0.45 -> 0.65 s
with a command always on its way, as in the data-centre benchmark).  Nor a collection
of the young generation that it set off: background work collects at its own rests while
no command is on its way (bench datacentre's crash phase: 37 of 77 collections fell while
a command was on its way, none with it).

A bulk request's reading (its JSON decoded and its commands checked, about 3 ms for 1,000
commands: pure work, no switch needed) waits while commands are carried out on the CPU,
and is done while they wait for their switches' answers or on the network
(``preparing``).  A bulk loader keeps two requests in flight: the next one used to be read
in slices between those of the job before it, which made that job longer, and the
controller then sat idle while the switch committed the job's bundle (3.5 ms of 1,000
filters; 0.37 s of a 100k-filter install's 0.37-0.42 s idle, the event loop's polls
timed).  Read during that wait, it leaves about 0.10 s idle: in four 100k installs of each,
alternating, the install's wall time went from 0.47-0.56 s above the controller's CPU time
to 0.18-0.25 s.  It waits PREPARE_DEFERRAL at most after it was read off the connection,
so a steady stream of other commands delays it by no more.
"""

from __future__ import annotations

import contextlib
import gc
import time

from .compat import hub

SLICE = 0.001  # seconds of work between two yields
BACKGROUND_SLICE = 0.0003  # ... of background work: what a command that arrives meanwhile waits
STEP_ASIDE = 2  # background work waits up to this many SLICEs for commands (keeps >= 13 % of the loop)
PREPARE_DEFERRAL = 0.1  # seconds a bulk request's reading waits, in all, for commands to leave the CPU
ANSWER_GRACE = 0.05  # a command still counts while its switch takes this long to answer (see below)


class Commands:
    """How many commands are on their way through their reconcilers: from reaching one
    that is not reconciling (not queued behind a reconciliation, which must not step
    aside for what waits on it) until answered."""

    def __init__(self):
        self.running = 0
        self.idle = hub.Event()
        self.idle.set()

    def begin(self) -> None:
        self.running += 1
        self.idle.clear()

    def end(self) -> None:
        self.running -= 1
        if not self.running:
            self.idle.set()


COMMANDS = Commands()
_background: set = set()  # green threads doing background work now
_carrying: set = set()    # green threads carrying out a counted command now
_on_switch: set = set()   # ... of those, waiting for their switch's answer now
_preparing: dict = {}     # green threads reading a bulk request now: their Preparation
CPU_FREE = hub.Event()    # set while no command is carried out on the CPU (each waits on its switch)
CPU_FREE.set()


@contextlib.contextmanager
def _marked(threads: set):
    me = hub.getcurrent()
    threads.add(me)
    try:
        yield
    finally:
        threads.discard(me)


def background():
    """The calling green thread's pacers step aside for running commands meanwhile."""
    return _marked(_background)


@contextlib.contextmanager
def carrying():
    """The calling green thread carries out a command counted in COMMANDS meanwhile."""
    me = hub.getcurrent()
    _carrying.add(me)
    _cpu_changed()
    try:
        yield
    finally:
        _carrying.discard(me)
        _cpu_changed()


@contextlib.contextmanager
def on_switch():
    """The calling green thread waits for its switch's answer (or, in ``elsewhere``, on
    the network): the command it carries out (if any) leaves the CPU to bulk requests'
    reading meanwhile."""
    me = hub.getcurrent()
    if me not in _carrying or me in _on_switch:
        yield
        return
    _on_switch.add(me)
    _cpu_changed()
    try:
        yield
    finally:
        _on_switch.discard(me)
        _cpu_changed()


def _cpu_changed() -> None:
    if _carrying <= _on_switch:
        if not CPU_FREE.is_set():
            CPU_FREE.set()
    else:
        CPU_FREE.clear()


class Preparation:
    """A bulk request's reading: it waits for CPU_FREE before it starts and at each rest
    of its pacers, PREPARE_DEFERRAL seconds in all."""

    def __init__(self):
        self.deadline = time.monotonic() + PREPARE_DEFERRAL

    def wait_for_cpu(self) -> None:
        left = self.deadline - time.monotonic()
        if left > 0 and not CPU_FREE.is_set():
            CPU_FREE.wait(left)


@contextlib.contextmanager
def preparing(bulk: bool = True):
    """The calling green thread reads a request; if ``bulk``, only while the CPU is free of
    commands (``Preparation``).  Not bulk: at once, as any other work."""
    me = hub.getcurrent()
    if not bulk or me in _preparing:
        yield
        return
    preparation = _preparing[me] = Preparation()
    try:
        preparation.wait_for_cpu()
        yield
    finally:
        del _preparing[me]


@contextlib.contextmanager
def elsewhere():
    """The calling green thread waits on a switch or the network: the command it carries
    out (if any) does not hold background work back meanwhile (a hung switch's 5 s would
    slow every reconciliation sevenfold), nor bulk requests' reading."""
    if hub.getcurrent() not in _carrying:
        yield
        return
    COMMANDS.end()
    try:
        with on_switch():
            yield
    finally:
        COMMANDS.begin()


def collect_ahead() -> None:
    """The collection the collector would make soon, made now: background work makes most
    of its work (a restarted switch's 25,000 flows), and a collection it sets off in a
    command's slice stops that command for its length; made at a background rest, while no
    command is on its way, it does not.  Once the young generation is half way to its
    threshold (at three quarters, a command's allocations still set off 13 of 94 collections
    of a crash phase), the generation the collector itself would choose under
    app.quiet_collector: the middle one when it is past its own threshold (never the oldest,
    which freezing keeps empty), so what survives is frozen after as many collections as
    before, made twice as often.  Nothing when automatic collection is off."""
    young, middle, _ = gc.get_count()
    threshold = gc.get_threshold()
    if gc.isenabled() and threshold[0] and young * 2 >= threshold[0]:
        gc.collect(1 if middle > threshold[1] else 0)


class Pacer:
    """``pace()`` in a loop; or ``due()`` then ``rest()`` when something must be done
    before yielding (a partial write flushed)."""

    def __init__(self, slice_seconds: float | None = None):
        self.slice = SLICE if slice_seconds is None else slice_seconds
        self.deadline = time.monotonic() + self.slice

    def due(self) -> bool:
        return time.monotonic() >= self.deadline

    def rest(self) -> None:
        hub.sleep(0)
        me = hub.getcurrent()
        if me in _preparing:
            _preparing[me].wait_for_cpu()
        if me not in _background:
            self.deadline = time.monotonic() + self.slice
            return
        if COMMANDS.running:
            COMMANDS.idle.wait(self.slice * STEP_ASIDE)
        if not COMMANDS.running:
            collect_ahead()
        self.deadline = time.monotonic() + min(self.slice, BACKGROUND_SLICE)

    def __call__(self) -> None:
        if time.monotonic() >= self.deadline:
            self.rest()
