"""guest/follow/balancer.py, the IPVS follower's loop, and ``mbctl follow ipvs``: an in-test
IPVS source (its snapshots set by the test) and an in-test host that answers the commands as
the controller does (controller/model.py: ``R L`` replaces the catch-all pool, ``X <mac> L *``
withdraws it and keeps the firewall, ``X`` cancels everything).  Every wait
is on a condition with a deadline."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading

import pytest
from mbvisor.guest import mbctl, ring
from mbvisor.guest.channel_errors import ResponseTimeout, RingFull
from mbvisor.guest.follow.balancer import BalancerFollower
from mbvisor.guest.follow.follower import AlreadyFollowed
from mbvisor.guest.follow.ipset import PolledWatch
from mbvisor.guest.follow.ipvs import Balancing, Refusal
from mbvisor.guest.follow.source import SourceError
from mbvisor.guest.grammar import format_frame, parse_frame
from mbvisor.topologies.netlab import wait_until

MAC = "52:34:56:00:12:22"
VIP = "10.0.0.5"
POOL = ("10.0.0.11", "10.0.0.12")
PERSISTENT = Refusal(f"TCP {VIP}:80", "is persistent (-p): IPVS keeps a client on one real server")




class Source:
    """IPVS as the test sets it: ``pool`` (None: no redirect), ``refusals``, or ``broken``."""

    description = f"IPVS services on {VIP}"
    middlebox_ip = VIP

    def __init__(self, pool=POOL, refusals=(), poll_interval: float = 0.01):
        self.pool, self.refusals, self.broken, self.poll_interval = pool, tuple(refusals), None, poll_interval
        self.snapshots = 0

    def snapshot(self) -> Balancing:
        self.snapshots += 1
        if self.broken:
            raise SourceError(self.broken)
        return Balancing({VIP: self.pool} if self.pool else {}, self.refusals)

    def watch(self) -> PolledWatch:
        return PolledWatch(self.poll_interval)


class Host:
    """The host's side of one middlebox, answering one command per frame.  ``faults`` are
    used up first, one per frame: a ChannelError to raise, or a (status, code) to answer."""

    def __init__(self, firewall: bool = False, pool=None):
        self.firewall, self.pool = firewall, pool
        self.sent: list[str] = []
        self.faults: list = []
        self.lock = threading.Lock()

    def request(self, payload: bytes, timeout: float = 5.0) -> ring.Response:
        (command,) = parse_frame(payload)
        text = format_frame([command]).strip("@")
        with self.lock:
            self.sent.append(text)
            fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, Exception):
            raise fault
        status, code, message = fault + ("declined (test)",) if fault else self._apply(text)
        return ring.Response(len(self.sent), 1, ring.Status[status], f"{status} {code} {message}", False)

    def _apply(self, text: str) -> tuple[str, str, str]:
        words = text.split()
        registered = self.firewall or self.pool is not None
        if words[0] == "R":
            self.pool = tuple(words[6].split(","))
            return "OK", "ok", text
        if words[0] == "X" and words[2:] == ["L", "*"]:
            if self.pool is None:
                return "REJECTED", "not-registered", f"{MAC} has no redirect from any source"
            self.pool = None
            return "OK", "ok", f"cancelled {MAC}'s redirect of {VIP} from any source"
        if words[0] == "X":
            if not registered:
                return "REJECTED", "not-registered", f"{MAC} is not registered"
            self.firewall, self.pool = False, None
            return "OK", "ok", f"cancelled {MAC}: every offload removed"
        if words[0] == "I" and self.firewall:
            return "OK", "ok", "no filters"
        return "REJECTED", "not-registered", f"{MAC} is not registered for firewall offload; send R F first"

    def commands(self, letter: str) -> list[str]:
        with self.lock:
            return [text for text in self.sent if text.startswith(letter + " ")]


@pytest.fixture
def reports():
    return []


@pytest.fixture
def make(tmp_path, reports):
    """A follower of ``source`` through ``host`` (its lock in tmp_path), closed afterwards."""
    made = []

    def build(source, host, **options):
        follower = BalancerFollower(host, MAC, source, lock_dir=str(tmp_path), report=reports.append, **options)
        made.append(follower)
        return follower

    yield build
    for follower in made:
        follower.close()


@contextlib.contextmanager
def running(follower):
    """``follower.run()`` in a thread until the block ends; its errors fail the test."""
    errors = []

    def target():
        try:
            follower.run()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield
    finally:
        follower.stop()
        thread.join(5)
        assert not thread.is_alive(), "the follower did not stop"
    assert not errors, errors


def said(reports, text: str) -> list[str]:
    return [line for line in reports if text in line]


def announced(reports) -> list[str]:
    """The status lines of registrations (the start line names the redirect too)."""
    return [line for line in reports if line.startswith(f"redirecting {VIP} to")]


# --- registering ------------------------------------------------------------------------


def test_once_registers_the_pool_as_one_type_0_redirect_and_says_so(make, reports):
    host = Host()
    assert make(Source(), host).run(once=True) == 0
    assert host.sent == [f"R L {MAC} {VIP} 0 * 10.0.0.11,10.0.0.12"]
    assert host.pool == POOL
    assert said(reports, f"redirecting {VIP} to 10.0.0.11,10.0.0.12")
    assert said(reports, f"following IPVS services on {VIP} for {MAC}: redirecting {VIP} to 10.0.0.11,10.0.0.12; "
                         "0 service(s) not offloaded")


def test_only_a_changed_pool_is_sent_again(make, reports):
    source, host = Source(), Host()
    follower = make(source, host)
    with running(follower):
        wait_until(lambda: host.pool == POOL, what="the first registration")
        polls = source.snapshots
        wait_until(lambda: source.snapshots >= polls + 5, what="five more polls")
        assert len(host.commands("R")) == 1, host.sent       # unchanged: nothing sent
        source.pool = ("10.0.0.11", "10.0.0.13")
        wait_until(lambda: host.pool == source.pool, what="the new pool on the host")
    assert host.commands("R") == [f"R L {MAC} {VIP} 0 * 10.0.0.11,10.0.0.12", f"R L {MAC} {VIP} 0 * 10.0.0.11,10.0.0.13"]
    assert len(announced(reports)) == 2


def test_the_pool_is_registered_again_every_resend_interval_to_repair_a_host_that_lost_it(make, reports):
    host = Host()
    follower = make(Source(), host, resend_every=0.05)
    with running(follower):
        wait_until(lambda: host.pool == POOL, what="the first registration")
        host.pool = None                                       # a restarted host, an operator's X
        wait_until(lambda: host.pool == POOL, what="the registration repaired")
    assert len(announced(reports)) == 1                     # a repair is no news


# --- refusals ------------------------------------------------------------------------------


def test_each_refusal_is_reported_once_and_again_only_after_it_went_away(make, reports):
    source, host = Source(pool=None, refusals=[PERSISTENT]), Host()
    follower = make(source, host)
    with running(follower):
        wait_until(lambda: said(reports, "following"), what="the start line")
        polls = source.snapshots
        wait_until(lambda: source.snapshots >= polls + 5, what="five more polls")
        assert said(reports, "not offloaded:") == [f"not offloaded: {PERSISTENT}"]
        assert follower.problems() == 1
        source.refusals = ()
        wait_until(lambda: follower.problems() == 0, what="the refusal gone")
        source.refusals = (PERSISTENT,)
        wait_until(lambda: len(said(reports, "not offloaded:")) == 2, what="the refusal reported again")
    assert host.sent == [f"X {MAC} L *"]  # at start, whatever an earlier follower left; then nothing


def test_a_redirect_the_host_refuses_is_reported_once_and_tried_again_at_the_resend(make, reports):
    host = Host()
    host.faults = [("REJECTED", "backend-in-use")] * 2
    follower = make(Source(), host, resend_every=0.3)
    with running(follower):
        wait_until(lambda: host.pool == POOL, timeout=5, what="the registration after two refusals")
    assert len(host.commands("R")) == 3
    refused = said(reports, "not offloaded: the redirect of")
    assert len(refused) == 1 and "REJECTED backend-in-use" in refused[0]


def test_once_exits_with_problems_when_the_host_refuses(make):
    host = Host()
    host.faults = [("REJECTED", "foreign-backend")]
    assert make(Source(), host).run(once=True) == 1
    assert len(host.commands("R")) == 1


# --- withdrawing ---------------------------------------------------------------------------


def test_a_gone_service_withdraws_the_redirect_alone_and_an_offloadable_one_registers_it_again(make, reports):
    source, host = Source(), Host(firewall=True)
    follower = make(source, host)
    with running(follower):
        wait_until(lambda: host.pool == POOL, what="the registration")
        source.pool, source.refusals = None, (PERSISTENT,)
        wait_until(lambda: host.pool is None, what="the redirect withdrawn")
        assert follower.problems() == 1  # the refusal; the redirect is not left behind
        source.pool, source.refusals = POOL, ()
        wait_until(lambda: host.pool == POOL, what="the redirect registered again")
    assert [text.split()[0] for text in host.sent] == ["R", "X", "R"]
    assert host.commands("X") == [f"X {MAC} L *"] and host.firewall  # the firewall registration stays
    assert said(reports, f"withdrew the redirect of {VIP} (X {MAC} L *)")


def test_a_redirect_the_host_will_not_withdraw_is_reported_and_asked_again_at_the_resend(make, reports):
    source, host = Source(pool=None), Host(pool=POOL)
    host.faults = [("REJECTED", "port-conflict")]
    assert make(source, host).run(once=True) == 1
    assert said(reports, f"cannot withdraw the redirect of {VIP}: X {MAC} L * answered REJECTED port-conflict")


def test_at_start_what_an_earlier_follower_left_is_withdrawn(make):
    host = Host(pool=POOL)
    first = make(Source(pool=None), host)
    assert first.run(once=True) == 0
    first.close()
    assert host.pool is None and host.sent == [f"X {MAC} L *"]
    assert make(Source(pool=None), host).run(once=True) == 0  # nothing there: answered not-registered, done


# --- trouble -------------------------------------------------------------------------------


def test_channel_errors_and_a_busy_host_are_retried_with_a_back_off(make, reports):
    host = Host()
    host.faults = [RingFull("ring full (test)"), ResponseTimeout("no answer (test)", 1), ("RATE_LIMITED", "rate"),
                   RingFull("ring full (test)")]
    follower = make(Source(), host)
    with running(follower):
        wait_until(lambda: host.pool == POOL, what="the registration after the trouble")
    assert len(host.commands("R")) == 5
    assert said(reports, "channel: ring full (test); trying again")
    assert said(reports, "channel: no answer (test); trying again")


def test_once_gives_up_on_channel_trouble(make):
    host = Host()
    host.faults = [RingFull("ring full (test)")]
    with pytest.raises(RingFull):
        make(Source(), host).run(once=True)


def test_a_broken_source_keeps_its_last_pool_and_is_read_again(make, reports):
    source, host = Source(), Host()
    follower = make(source, host)
    with running(follower):
        wait_until(lambda: host.pool == POOL, what="the registration")
        source.broken = "'ipvsadm -Sn' failed with exit status 2 (test)"
        wait_until(lambda: said(reports, "reading it again in 1 s"), what="the source's failure reported")
        source.broken = None
        source.pool = ("10.0.0.13",)
        wait_until(lambda: host.pool == ("10.0.0.13",), what="the source followed again")
    assert host.commands("X") == []                            # a failed read withdraws nothing


def test_a_source_that_fails_at_start_sends_nothing(make):
    source, host = Source(), Host()
    source.broken = "ipvsadm is not installed"
    with pytest.raises(SourceError):
        make(source, host).run(once=True)
    assert host.sent == []


def test_one_follower_per_middlebox(make):
    first = make(Source(), Host())
    first.start()
    with pytest.raises(AlreadyFollowed, match=str(os.getpid())):
        make(Source(), Host()).start()


# --- mbctl follow ipvs ---------------------------------------------------------------------


@pytest.fixture
def mbctl_host(monkeypatch):
    """mbctl with the in-test host as its channel and the in-test source as IPVS."""
    host, source = Host(), Source()
    monkeypatch.setattr(mbctl, "open_region", lambda **_: contextlib.nullcontext(None))
    monkeypatch.setattr(mbctl, "ChannelWriter", lambda region: host)

    def ipvs_source(ip, **_):
        source.middlebox_ip = ip
        return source

    monkeypatch.setattr("mbvisor.guest.follow.ipvs.IpvsSource", ipvs_source)
    return host, source


def test_mbctl_follow_ipvs_once_exit_codes(mbctl_host, tmp_path):
    host, source = mbctl_host
    arguments = ["follow", "ipvs", "--mac", MAC, "--ip", VIP, "--once", "--lock-dir", str(tmp_path)]
    assert mbctl.main([*arguments, "--ip", "10.0.0.300"]) == mbctl.EXIT_USAGE
    assert mbctl.main([*arguments, "--poll-interval", "0"]) == mbctl.EXIT_USAGE
    assert host.sent == []
    assert mbctl.main(arguments) == mbctl.EXIT_OK and host.pool == POOL
    source.refusals = (PERSISTENT,)
    assert mbctl.main(arguments) == mbctl.EXIT_HOST_ERROR
    source.broken = "ipvsadm is not installed"
    assert mbctl.main(arguments) == mbctl.EXIT_NOT_FOLLOWED


def test_mbctl_follow_ipvs_stops_cleanly_on_sigterm(mbctl_host, tmp_path, capsys):
    host, _ = mbctl_host
    killer = threading.Thread(target=lambda: (wait_until(lambda: host.pool == POOL, what="the registration"),
                                              os.kill(os.getpid(), signal.SIGTERM)), daemon=True)
    killer.start()
    previous = signal.getsignal(signal.SIGTERM)
    assert mbctl.main(["follow", "ipvs", "--mac", MAC, "--ip", VIP, "--lock-dir", str(tmp_path)]) == mbctl.EXIT_OK
    killer.join(5)
    assert signal.getsignal(signal.SIGTERM) is previous         # the handler is put back
    assert "following IPVS services on 10.0.0.5" in capsys.readouterr().err
    assert host.pool == POOL                                     # the redirect stays on the host
    with open(tmp_path / f"follow-{MAC.replace(':', '-')}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)         # released
