"""The IPVS follower: keeps the host's redirect of the middlebox's address equal to what the
guest's IPVS asks of the switch (guest/follow/ipvs.py decides what may be offloaded).

IPVS has no change notification, so the follower polls its source every ``poll_interval`` and
sends only a change.  A pool that is new or differs is registered with ``R L <mac> <ip> 0 *
<pool>``: the host keeps one redirect per source (controller/model.py), so registering again
*replaces* the pool, and that is also how a pool changes.

When IPVS may no longer be offloaded (or has no service left on the address), the redirect
is withdrawn with ``X <mac> L *``, which removes that one redirect and keeps the middlebox's
firewall registration, its filters and any redirect made for a particular source.  At start
what the host holds is unknown, so a follower that finds nothing to offload withdraws once
(a host without the redirect answers not-registered), clearing what an earlier one left.

The host cannot list redirects, so the follower cannot compare with it; instead it registers
the pool again every ``resend_every`` seconds (the host answers OK and changes nothing), which
repairs a host that lost it (a restart, an operator's cancel).  Channel trouble and a host that
asks to wait are retried with a back-off, as by the filter follower (follower.py), whose
one-follower-per-middlebox lock this follower shares.  Standard library only.
"""

from __future__ import annotations

import select
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Protocol

from .. import answers
from .. import fields as kinds
from ..backoff import Backoff
from ..channel_errors import ChannelError, CommandTooLong
from ..commands import CancelRedirect, RegisterLoadBalancer, check_load_balancer
from ..grammar import format_command, format_frame
from .follower import DEFAULT_LOCK_DIR, Stopper, hold_lock
from .source import SourceError, Watch
from .sync import passing

if TYPE_CHECKING:  # ipvs.py imports subprocess: mbctl loads it only for follow ipvs
    from .ipvs import Balancing, Refusal

DEFAULT_RESEND_EVERY = 60.0
REGISTER, WITHDRAW = "register", "withdraw"


class BalancerSource(Protocol):
    """What `IpvsSource` offers (and an in-memory source in tests)."""

    description: str
    middlebox_ip: str

    def snapshot(self) -> Balancing: ...

    def watch(self) -> Watch: ...


class _Unknown:
    """What the host holds is not known (at start, and at each re-send): the next step
    sends whatever IPVS asks for."""

    def __repr__(self) -> str:
        return "unknown"


UNKNOWN = _Unknown()


class _Retry(Exception):
    """The host declined for a passing reason (rate limit, controller away): send again later."""


def _pool(backends: tuple[str, ...] | None) -> str:
    return ",".join(backends) if backends else "nothing"


def _to_stderr(line: str) -> None:
    print(f"mbctl follow: {line}", file=sys.stderr, flush=True)


class BalancerFollower:
    """Follows ``source`` (IPVS on the middlebox's address) for the middlebox ``mac``.

    ``run()`` starts and follows until ``stop()`` (safe from a signal handler);
    ``run(once=True)`` returns after the first complete sync.  ``close()`` releases the lock;
    the redirect stays on the host.  Use as a context manager to close in any case."""

    def __init__(self, writer, mac: str, source: BalancerSource, *, resend_every: float = DEFAULT_RESEND_EVERY,
                 timeout: float = 5.0, verbose: bool = False, lock_dir: str = DEFAULT_LOCK_DIR, report: Callable[[str], None] = _to_stderr):
        self.writer, self.mac, self.source = writer, kinds.MAC_ADDRESS.parse(mac), source
        self.address = kinds.IP_ADDRESS.parse(source.middlebox_ip)
        self.resend_every, self.timeout, self.verbose = resend_every, timeout, verbose
        self.lock_dir, self.report = lock_dir, report
        self.wanted: tuple[str, ...] | None = None   # the pool IPVS asks for; None: no redirect
        self.on_host: tuple[str, ...] | None | _Unknown = UNKNOWN  # what the host holds: a pool, None, or unknown
        self.refusals: tuple[Refusal, ...] = ()
        self._held: tuple[str, tuple[str, ...] | None] | None = None  # (step, wanted) refused until the re-send
        self._reported_held: tuple | None = None
        self._announced: tuple[str, ...] | None = None  # the pool the last status line named
        self._watch: Watch | None = None
        self._next_poll = self._resend_at = 0.0
        self._channel_ready_at = 0.0
        self._channel_retries = Backoff(floor=0.1, ceiling=5.0, spins=0)
        self._source_retries = Backoff(floor=1.0, ceiling=30.0, spins=0)
        self._last_problem: str | None = None
        self._lock: IO[str] | None = None
        self._synced = False
        self._started_at = 0.0
        self._stopper = Stopper()

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> BalancerFollower:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Lock, watch and read IPVS; SourceError or AlreadyFollowed end it here, before
        anything is sent."""
        self._started_at = time.monotonic()
        self._lock = hold_lock(self.mac, self.lock_dir)
        try:
            self._watch = self.source.watch()
            self._take(self.source.snapshot())
        except BaseException:
            self.close()
            raise
        self._next_poll = self._started_at + self._watch.poll_interval
        self._resend_at = self._started_at + self.resend_every

    def run(self, once: bool = False) -> int:
        """Follow until ``stop()``, or with ``once`` until the first complete sync.  Returns
        how many things the switch does not do as IPVS would (`problems`)."""
        if self._lock is None:
            self.start()
        while True:
            self._flush(strict=once)
            if not self._synced and self._step() is None:
                self._synced = True
                self._say_started()
            if once and self._synced:
                return self.problems()
            if not self._wait():
                return self.problems()
            self._do_what_is_due(time.monotonic())

    def stop(self) -> None:
        """End ``run`` at its next wake-up (at once: it wakes for this)."""
        self._stopper.stop()

    def close(self) -> None:
        """Stop the watch and release the lock (the redirect stays on the host).  Idempotent."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._stopper.close()

    def problems(self) -> int:
        """Services IPVS keeps for itself (refused), plus one if the host refused the redirect
        or a redirect that should go could not be withdrawn."""
        held = self._needed() is not None and self._held == (self._needed(), self.wanted)
        return len({refusal.service for refusal in self.refusals}) + held

    # --- IPVS ----------------------------------------------------------------------------

    def _take(self, balancing: Balancing) -> None:
        """A new snapshot: the pool wanted now, and each new refusal reported once."""
        self.wanted = balancing.redirects.get(self.address)
        for refusal in balancing.refusals:
            if refusal not in self.refusals:
                self.report(f"not offloaded: {refusal}")
        self.refusals = balancing.refusals

    def _poll(self, now: float) -> None:
        """Read IPVS again; a source that fails keeps its last reading and is read again
        after a back-off (1 s doubling to 30 s)."""
        try:
            self._watch.changes()  # a polled watch: the snapshot below reads everything anyway
            balancing = self.source.snapshot()
        except SourceError as error:
            pause = self._source_retries.next_pause()
            self.report(f"{self.source.description}: {error}; reading it again in {pause:g} s")
            self._next_poll = now + pause
            return
        self._source_retries.reset()
        self._take(balancing)
        self._next_poll = now + self._watch.poll_interval

    # --- the host ------------------------------------------------------------------------

    def _needed(self) -> str | None:
        """What the host needs to hold what IPVS asks: REGISTER, WITHDRAW or None."""
        if self.wanted is not None and self.wanted != self.on_host:
            return REGISTER
        if self.wanted is None and self.on_host is not None:
            return WITHDRAW
        return None

    def _step(self) -> str | None:
        """The step to send now: what is needed, unless it is held (refused until the re-send)."""
        step = self._needed()
        return None if self._held == (step, self.wanted) else step

    def _flush(self, strict: bool) -> None:
        """Send the step due, as far as the channel lets us now.  ``strict``: channel
        trouble ends the follower (``--once``); otherwise it is retried with a back-off."""
        step = self._step()
        if step is None or time.monotonic() < self._channel_ready_at:
            return
        try:
            self._register() if step == REGISTER else self._withdraw()
        except _Retry:
            self._channel_ready_at = time.monotonic() + self._channel_retries.next_pause()
        except CommandTooLong:
            raise  # one R L of at most 64 backends fits every slot: this is a bug, not weather
        except ChannelError as error:  # a command that may have been applied is sent again: both steps are idempotent
            if strict:
                raise
            pause = self._channel_retries.next_pause()
            self._channel_ready_at = time.monotonic() + pause
            if str(error) != self._last_problem:
                self.report(f"channel: {error}; trying again (every {self._channel_retries.ceiling:g} s at most)")
            self._last_problem = str(error)
        else:
            self._channel_retries.reset()
            self._last_problem = None

    def _request(self, command) -> answers.Answer:
        response = self.writer.request(format_frame([command]).encode(), self.timeout)
        try:
            return answers.parse(response.text)[0]
        except (answers.AnswerFormatError, IndexError):  # a host that does not answer in records
            return answers.answer(response.status_name, "-", response.text or "no answer text")

    def _register(self) -> None:
        pool = self.wanted
        command = RegisterLoadBalancer(self.mac, self.address, 0, None, pool)
        check_load_balancer(command)
        record = self._request(command)
        if record.ok:
            self.on_host, self._held = pool, None
            if pool != self._announced or self.verbose:
                self._announced = pool
                self.report(f"redirecting {self.address} to {_pool(pool)} ({format_command(command)})")
        elif passing(record):
            raise _Retry()
        else:
            self._hold(REGISTER, f"not offloaded: the redirect of {self.address} to {_pool(pool)}: {record.status} "
                                 f"{record.code}: {record.message}; trying again in {self.resend_every:g} s")

    def _withdraw(self) -> None:
        """``X <mac> L *``: the any-source redirect goes, the middlebox's firewall and
        filters (and any redirect an operator made for a source) stay.  A host that holds
        none answers not-registered: nothing left to withdraw."""
        command = CancelRedirect(self.mac, None)
        record = self._request(command)
        if record.ok or record.code == "not-registered":
            self.on_host = self._held = None
            if self._announced is not None or record.ok or self.verbose:
                self._announced = None
                self.report(f"withdrew the redirect of {self.address} ({format_command(command)}): the middlebox "
                            "handles its traffic again")
        elif passing(record):
            raise _Retry()
        else:
            self._hold(WITHDRAW, f"cannot withdraw the redirect of {self.address}: {format_command(command)} "
                                 f"answered {record.status} {record.code}: {record.message}; trying again in "
                                 f"{self.resend_every:g} s")

    def _hold(self, step: str, message: str) -> None:
        """Leave ``step`` until IPVS asks for something else or the next re-send; say why, once."""
        self._held = (step, self.wanted)
        if self._reported_held != (self._held, message):
            self.report(message)
        self._reported_held = (self._held, message)

    # --- waking up -------------------------------------------------------------------------

    def _wait(self) -> bool:
        """Sleep until something is due; False once stopped."""
        due = min(self._next_poll, self._resend_at)
        if self._step() is not None:
            due = min(due, self._channel_ready_at)
        timeout = max(0.0, due - time.monotonic())
        ready, _, _ = select.select([self._stopper.fileno()], [], [], min(timeout, 3600.0))
        return not ready

    def _do_what_is_due(self, now: float) -> None:
        if self._next_poll <= now:
            self._poll(now)
        if self._resend_at <= now:
            self._resend_at = now + self.resend_every
            self._held = None
            if self.wanted is not None:
                self.on_host = UNKNOWN  # register it again: the host may have lost it

    def _say_started(self) -> None:
        offloaded = (f"redirecting {self.address} to {_pool(self.wanted)}" if self.wanted is not None
                     and self.on_host == self.wanted else f"no redirect of {self.address}")
        self.report(f"following {self.source.description} for {self.mac}: {offloaded}; "
                    f"{len({r.service for r in self.refusals})} service(s) not offloaded; "
                    f"{time.monotonic() - self._started_at:.2f} s")
