"""The follower's loop (guest/follow/follower.py) and ``mbctl follow`` against the real host
side: an OVS bridge in a lab, the real controller and the real agent processes, the guest's
commands in a real shared-memory region.  The followed list is a small in-memory source
(its watch a pipe): what an adapter is, without nft or ipset.  The host's state is read
from the controller's REST view, never from the follower's own belief; every wait is on
that state with a deadline.

Also here, because it needs the same host: paged queries (``I <mac> <skip>``) read through
the real agent give every filter exactly once."""

from __future__ import annotations

import io
import os
import random
import re
import signal
import threading
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass

import pytest

from mbvisor.guest import answers, mbctl
from mbvisor.guest.channel_errors import AnswerLost, ResponseTimeout
from mbvisor.guest.follow import sync
from mbvisor.guest.follow.follower import AlreadyFollowed, Follower
from mbvisor.guest.follow.source import DESTINATION, SOURCE, Change, NotOffloadable, Resync, SourceError, Verdict
from mbvisor.guest.grammar import split_frame
from mbvisor.guest.region import open_file
from mbvisor.guest.writer import ChannelWriter
from mbvisor.topologies import netlab
from mbvisor.topologies.agent_run import AgentProcess, annotate, kill_9_and_restart, make_region
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import wait_until

pytestmark = pytest.mark.host

MAC = "52:34:56:00:12:22"
FILTER_LIMIT = 1100  # the controller's per-middlebox limit in this lab (MBVISOR_MAX_FILTERS)
OTHERS = (f"A {MAC} I 5 s 10.200.0.0/16 p 17", f"A {MAC} T 8 d 23")  # not the follower's shape


# --- a source without a tool ------------------------------------------------------------------


class PipeWatch:
    """Changes handed over through a list, a byte in a pipe saying there are some."""

    poll_interval = None

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._queued: list = []
        self._lock = threading.Lock()
        self.closed = False

    def push(self, change) -> None:
        """A Change, a Resync, or a SourceError for the next ``changes()`` to raise."""
        with self._lock:
            if self.closed:
                return
            self._queued.append(change)
            os.write(self._write, b".")

    def fileno(self) -> int:
        return self._read

    def changes(self) -> list:
        with self._lock:
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass
            taken, self._queued = self._queued, []
        for item in taken:
            if isinstance(item, SourceError):
                raise item
        return taken

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self._read)
                os.close(self._write)


class PolledWatch:
    """The watch of a tool without events: the follower takes a snapshot every interval."""

    def __init__(self, interval: float):
        self.poll_interval = interval
        self.closed = False

    def fileno(self) -> None:
        return None

    def changes(self) -> list:
        return []

    def close(self) -> None:
        self.closed = True


class ListSource:
    """A blocklist held in memory: ``add``/``delete`` change it and tell its watches
    (``quietly``: they are not told, as when events are lost); with ``poll`` its watches
    are polled instead."""

    def __init__(self, networks=(), fields=frozenset({SOURCE}), description="test list", poll: float | None = None):
        self.elements: dict[str, float | None] = {network: None for network in networks}
        self.fields, self.description = fields, description
        self.not_offloadable: str | None = None
        self.poll = poll
        self.watches: list = []
        self._lock = threading.Lock()

    def verdict(self) -> Verdict:
        if self.not_offloadable:
            raise NotOffloadable(self.not_offloadable)
        return Verdict(self.fields)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.elements)

    def watch(self):
        self.watches.append(PipeWatch() if self.poll is None else PolledWatch(self.poll))
        return self.watches[-1]

    def tell(self, item) -> None:
        for watch in self.watches:
            if isinstance(watch, PipeWatch):
                watch.push(item)

    def add(self, network: str, expires_at: float | None = None, quietly: bool = False) -> None:
        with self._lock:
            self.elements[network] = expires_at
        if not quietly:
            self.tell(Change(True, network, expires_at))

    def delete(self, network: str, quietly: bool = False) -> None:
        with self._lock:
            del self.elements[network]
        if not quietly:
            self.tell(Change(False, network))


def networks(count: int, second: int = 0) -> list[str]:
    return [f"10.{second + i // 256}.{i % 256}.0/24" for i in range(count)]


# --- the host -------------------------------------------------------------------------------


@dataclass
class Host:
    controller: Controller
    dpid: int
    port: int
    region: str

    def filters(self) -> set[str]:
        status, body = self.controller.get(f"/v1/middleboxes/{self.dpid:016x}/{MAC}")
        return set(body["filters"]) if status == 200 else set()

    def put(self, texts: list[str]) -> None:
        """Commands from someone other than the follower (an operator, through REST)."""
        answers_ = self.controller.batch(self.dpid, self.port, texts) if texts else []
        assert all(answer["status"] == "OK" for answer in answers_), answers_

    def wait_for(self, expected: set[str], timeout: float = 60.0, what: str = "the host's filters") -> None:
        wait_until(lambda: self.filters() == expected, timeout=timeout, what=what)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """One lab for the module: a bridge with the middlebox's port, the controller, the agent
    serving the middlebox's region (the product's default rate limit: 200 commands/s)."""
    netlab.require_host_tools()
    state = tmp_path_factory.mktemp("follow")
    region = make_region()
    with netlab.Lab() as lab:
        controller = Controller(state, environment={"MBVISOR_MAX_FILTERS": str(FILTER_LIMIT)}).start()
        agent = None
        try:
            bridge = lab.bridge(controller=controller.target, fail_mode="secure")
            middlebox = lab.host("mb", ip="10.0.0.5/24", mac=MAC)
            controller.wait_switch(bridge.dpid)
            annotate(middlebox, region, "vm-mb")
            agent = AgentProcess(controller, state, bridges=(bridge.name,)).start()
            agent.wait_serving(f"vm-mb/{middlebox.port_name}")
            yield Host(controller, bridge.dpid, middlebox.ofport, region)
        finally:
            if agent is not None:
                agent.stop()
            controller.stop()
            os.unlink(region)


@pytest.fixture
def writer(host):
    """The guest's writer, its middlebox registered afresh (no filters) through REST, so the
    tests' own commands do not spend the channel's rate limit."""
    host.controller.batch(host.dpid, host.port, [f"X {MAC}"])
    host.put([f"R F {MAC} 10.0.0.5"])
    with open_file(host.region) as region:
        yield ChannelWriter(region)


def request(writer: ChannelWriter, *commands: str) -> list[answers.Answer]:
    response = writer.request("".join(f"@{c}@" for c in commands).encode(), timeout=30)
    return answers.parse(response.text)


def expected(source: ListSource) -> set[str]:
    return {sync.filter_text(MAC, field, network) for field in source.fields for network in source.elements}


class Reports(list):
    """The follower's status lines."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def having(self, words: str) -> list[str]:
        return [line for line in self if words in line]


@contextmanager
def following(writer, sources, tmp_path, **options):
    """A follower running in a thread, stopped and joined afterwards."""
    reports = Reports()
    follower = Follower(writer, MAC, sources, lock_dir=str(tmp_path), report=reports, **options)
    done = []
    thread = threading.Thread(target=lambda: done.append(follower.run()), daemon=True)
    thread.start()
    try:
        yield follower, reports
    finally:
        follower.stop()
        thread.join(timeout=30)
        assert not thread.is_alive() and done, reports
        follower.close()


class CountingWriter(ChannelWriter):
    """Keeps every command the host answered, but for those it did not apply and wants
    again (rate limited: ``sync.passing``); ``lose`` loses the answer of the frame with that
    number: ``"answered"`` (the host applied it, then the answer went: AnswerLost) or
    ``"pending"`` (not answered when the wait ended: ResponseTimeout), whose commands go to
    ``unanswered``."""

    def __init__(self, region, lose: dict[int, str] | None = None):
        super().__init__(region)
        self.answered: list[str] = []
        self.unanswered: list[str] = []
        self.frames = 0
        self.lose = lose or {}
        self.sent: dict = {}  # ticket -> (frame number, its commands), until waited for or abandoned

    def submit(self, payload: bytes, timeout: float = 5.0, **promise):
        self.frames += 1
        ticket = super().submit(payload, timeout, **promise)
        self.sent[ticket] = (self.frames, [body for _, body in split_frame(payload)])
        return ticket

    def wait(self, ticket, timeout: float = 5.0):
        number, commands = self.sent.pop(ticket)
        if self.lose.get(number) == "pending":
            self.unanswered += commands
            raise ResponseTimeout(f"no answer to command {ticket.seq} (test)", ticket.seq)
        response = super().wait(ticket, timeout)
        self._count(commands, response)
        if self.lose.get(number) == "answered":
            raise AnswerLost(f"the answer to command {response.seq} was lost (test)", response.seq)
        return response

    def _count(self, commands: list[str], response) -> None:
        records = answers.parse(response.text)
        records = records if len(records) == len(commands) else records[:1] * len(commands)
        self.answered += [command for command, record in zip(commands, records) if not sync.passing(record)]

    def abandon(self, ticket) -> None:
        """The follower gave up on a frame in flight (an earlier one failed).  The test
        still reads its answer, to know which of its commands the host applied."""
        _, commands = self.sent.pop(ticket)
        self._count(commands, super().wait(ticket, 5.0))

    def adds(self) -> list[str]:
        return [command for command in self.answered if command.startswith("A ")]


# --- 1. paged queries through the real agent --------------------------------------------------


def test_a_paged_read_of_500_filters_gives_each_exactly_once(host, writer, capsys):
    texts = [sync.filter_text(MAC, SOURCE, network) for network in networks(500)]
    host.put(texts)
    lines, skip, pages = [], 0, 0
    while True:
        record = request(writer, f"I {MAC} {skip}" if skip else f"I {MAC}")[0]
        page = sync.read_page(record)
        assert page.total == 500
        pages += 1
        lines += page.lines
        skip += len(page.lines)
        if skip >= page.total:
            break
    assert len(lines) == 500 and set(lines) == set(texts) and lines == sorted(lines)
    assert pages >= 5  # about 100 lines fit a 4 KiB answer
    # Past the end: the total and no lines; and mbctl asks the same way.
    assert request(writer, f"I {MAC} 500")[0].lines == ("500 filter(s)",)
    assert request(writer, f"I {MAC} 2147483647")[0].lines == ("500 filter(s)",)
    capsys.readouterr()
    assert mbctl.main(["--shm", host.region, "show", "ip", "--mac", MAC, "--skip", "490"]) == mbctl.EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["500 filter(s)", *sorted(texts)[490:]]


# --- 2. the loop --------------------------------------------------------------------------------


def test_the_first_sync_of_1000_elements_leaves_the_host_equal_to_the_set(host, writer, tmp_path):
    host.put([*OTHERS, sync.filter_text(MAC, SOURCE, "192.168.9.0/24"), sync.filter_text(MAC, SOURCE, "10.0.3.0/24")])
    source = ListSource(networks(1000))
    reports = Reports()
    counting = CountingWriter(writer.region)
    with Follower(counting, MAC, [source], lock_dir=str(tmp_path), report=reports) as follower:
        assert follower.run(once=True) == 0
    assert host.filters() == expected(source) | set(OTHERS)  # the hand-made one of its shape went; others stay
    adds = counting.adds()
    assert len(adds) == len(set(adds))  # no element applied twice...
    assert set(adds) == expected(source) - {sync.filter_text(MAC, SOURCE, "10.0.3.0/24")}  # ...nor one it had
    assert [c for c in counting.answered if c.startswith("D ")] == [f"D {MAC} I 4 s 192.168.9.0/24"]
    started = reports.having("following test list (source)")
    assert len(started) == 1 and "1000 element(s)" in started[0] and "0 not offloaded" in started[0], reports


def test_a_restarted_follower_sends_no_adds_twice_and_removes_what_left_meanwhile(host, writer, tmp_path):
    source = ListSource(networks(300))
    with Follower(writer, MAC, [source], lock_dir=str(tmp_path), report=Reports()) as first:
        assert first.run(once=True) == 0
    host.wait_for(expected(source))
    for network in networks(300)[:50]:      # while no follower ran
        source.delete(network)
    for network in networks(20, second=50):
        source.add(network)
    counting = CountingWriter(writer.region)
    with Follower(counting, MAC, [source], lock_dir=str(tmp_path), report=Reports()) as second:
        assert second.run(once=True) == 0
    assert host.filters() == expected(source)
    sent = [c for c in counting.answered if not c.startswith("I ")]
    assert sorted(sent) == sorted([sync.filter_text(MAC, SOURCE, n) for n in networks(20, second=50)]
                                  + [sync.delete_text(MAC, SOURCE, n) for n in networks(300)[:50]])


def test_a_thousand_random_changes_through_the_watch_leave_the_host_equal_to_the_set(host, writer, tmp_path):
    randomness = random.Random(16)
    source = ListSource(networks(200), fields=frozenset({SOURCE, DESTINATION}))
    pool = networks(600, second=100)
    with following(writer, [source], tmp_path) as (follower, reports):
        host.wait_for(expected(source), what="the first sync")
        for _ in range(1000):
            present = list(source.elements)
            if present and randomness.random() < 0.45:
                source.delete(randomness.choice(present))
            else:
                candidates = [n for n in pool if n not in source.elements]
                source.add(randomness.choice(candidates))
        host.wait_for(expected(source), what="the host to follow 1000 changes")
        assert follower.stats.frames < 500, follower.stats  # changes close together share frames
    assert source.watches[-1].closed  # stopped cleanly: its watch closed...
    assert host.filters() == expected(source)  # ...and the filters stay on the host


def test_an_element_that_times_out_leaves_the_switch_within_a_second(host, writer, tmp_path):
    source = ListSource(["10.1.0.0/24"])
    with following(writer, [source], tmp_path) as (follower, reports):
        host.wait_for(expected(source))
        expires_at = time.monotonic() + 1.5
        source.add("10.2.0.0/24", expires_at)
        source.add("10.3.0.0/24")
        wait_until(lambda: sync.filter_text(MAC, SOURCE, "10.2.0.0/24") in host.filters(), timeout=10,
                   what="the element with a timeout offloaded")
        wait_until(lambda: sync.filter_text(MAC, SOURCE, "10.2.0.0/24") not in host.filters(),
                   timeout=expires_at - time.monotonic() + 5, what="the element gone after its timeout")
        gone = time.monotonic()
        assert gone - expires_at < 1.0, gone - expires_at
        assert host.filters() == {sync.filter_text(MAC, SOURCE, n) for n in ("10.1.0.0/24", "10.3.0.0/24")}


def refusals(reports: Reports) -> tuple[list[str], int]:
    """The elements named as not offloaded, and how many more were counted."""
    named = reports.having("not offloaded: 10.")
    more = sum(int(m[1]) for line in reports if (m := re.search(r"not offloaded: ([0-9]+) more element", line)))
    return named, more


def test_a_refused_element_is_reported_once_and_the_rest_is_offloaded(host, writer, tmp_path, monkeypatch, capsys):
    source = ListSource(networks(FILTER_LIMIT + 50))
    monkeypatch.setattr(mbctl, "follow_sources", lambda args: [source])
    code = mbctl.main(["--shm", host.region, "follow", "ipset", "--set", "blocklist", "--mac", MAC, "--once",
                       "--lock-dir", str(tmp_path)])
    assert code == mbctl.EXIT_HOST_ERROR  # --once: some elements are not offloaded
    reports = Reports(capsys.readouterr().err.splitlines())
    assert reports.having("50 not offloaded")
    on_host = host.filters()
    assert len(on_host) == FILTER_LIMIT and on_host < expected(source)
    named, more = refusals(reports)
    assert len(named) + more == 50 and len(set(named)) == len(named) >= 10
    assert all("REJECTED limit" in line and "the limit is 1100" in line for line in named)


def test_refused_elements_are_tried_again_at_each_resync_and_not_reported_again(host, writer, tmp_path):
    source = ListSource(networks(FILTER_LIMIT + 5))
    counting = CountingWriter(writer.region)
    # resync_cpu_share=1: every 0.5 s as asked, not spaced by the re-sync's CPU cost
    with following(counting, [source], tmp_path, resync_every=0.5, resync_cpu_share=1.0) as (follower, reports):
        wait_until(lambda: reports.having("following test list"), timeout=60, what="the first sync")
        reads = follower.stats.host_reads
        wait_until(lambda: follower.stats.host_reads >= reads + 3, timeout=60, what="three re-syncs")
        assert follower.not_offloaded() == 5
    named, more = refusals(reports)
    assert (len(named), more) == (5, 0), reports
    refused = expected(source) - host.filters()
    assert len(refused) == 5 and len(host.filters()) == FILTER_LIMIT
    tries = [counting.adds().count(text) for text in refused]
    assert all(2 <= count <= follower.stats.host_reads + 1 for count in tries), (tries, follower.stats)  # no busy loop


@pytest.mark.parametrize("lost", ["answered", "pending"])
def test_a_lost_answer_is_retried_from_the_hosts_own_list(host, writer, tmp_path, lost):
    source = ListSource(networks(300))
    counting = CountingWriter(writer.region, lose={2: lost})  # frame 1 is the first page; 2 the first adds
    with following(counting, [source], tmp_path) as (follower, reports):
        host.wait_for(expected(source))
        wait_until(lambda: reports.having("following test list"), timeout=10, what="the first sync's report")
    assert reports.having("channel: "), reports
    assert follower.stats.host_reads >= 2  # read again: what became of the lost frame is the host's to say
    adds = counting.adds() + [c for c in counting.unanswered if c.startswith("A ")]
    assert len(adds) == len(set(adds)) and set(adds) == expected(source)  # the lost frame was not sent again


def test_a_second_follower_of_the_same_middlebox_is_refused(host, writer, tmp_path, capsys, monkeypatch):
    with Follower(writer, MAC, [ListSource()], lock_dir=str(tmp_path), report=Reports()) as first:
        first.start()
        with Follower(writer, MAC, [ListSource(["10.9.0.0/24"])], lock_dir=str(tmp_path), report=Reports()) as second:
            with pytest.raises(AlreadyFollowed, match=f"already followed by process {os.getpid()}"):
                second.start()
        monkeypatch.setattr(mbctl, "follow_sources", lambda args: [ListSource(["10.9.0.0/24"])])
        code = mbctl.main(["--shm", host.region, "follow", "ipset", "--set", "x", "--mac", MAC, "--once",
                           "--lock-dir", str(tmp_path)])
        assert code == mbctl.EXIT_NOT_FOLLOWED
        assert "one follower per middlebox" in capsys.readouterr().err
    assert host.filters() == set()  # the refused ones sent nothing


def test_a_broken_source_is_reported_started_again_and_read_afresh(host, writer, tmp_path):
    source = ListSource(networks(10))
    with following(writer, [source], tmp_path) as (follower, reports):
        host.wait_for(expected(source))
        for network in networks(5, second=20):
            source.add(network, quietly=True)  # while its watch is broken: only a fresh snapshot sees them
        source.delete(networks(10)[0], quietly=True)
        source.tell(SourceError("the monitor ended"))
        host.wait_for(expected(source), timeout=30, what="the host after the source was started again")
        assert reports.having("test list: the monitor ended; starting it again in 1 s"), reports
        assert reports.having("test list: followed again"), reports
    assert len(source.watches) == 2 and all(watch.closed for watch in source.watches)


def test_a_list_that_may_no_longer_be_offloaded_is_withdrawn_until_it_may_again(host, writer, tmp_path):
    kept, judged = ListSource(["10.9.0.0/24"], description="kept list"), ListSource(networks(20))
    with following(writer, [kept, judged], tmp_path) as (follower, reports):
        host.wait_for(expected(kept) | expected(judged))
        judged.not_offloadable = "an accept rule comes first now"
        judged.tell(Resync("a rule was added"))
        host.wait_for(expected(kept), what="the judged list withdrawn")
        assert reports.having("test list: an accept rule comes first now: may not be offloaded any more")
        judged.not_offloadable = None
        judged.tell(Resync("the rule was deleted"))
        host.wait_for(expected(kept) | expected(judged), what="the judged list offloaded again")


def test_a_polled_source_and_an_element_in_two_lists(host, writer, tmp_path):
    """Several lists are followed as their union: an element leaves the switch only when no
    list holds it any more."""
    polled, other = ListSource(["10.1.0.0/24", "10.2.0.0/24"], poll=0.2), ListSource(["10.2.0.0/24"])
    with following(writer, [polled, other], tmp_path) as (follower, reports):
        host.wait_for(expected(polled))
        polled.add("10.3.0.0/24")
        polled.delete("10.2.0.0/24")
        host.wait_for(expected(polled) | expected(other), what="the polled change")
        assert sync.filter_text(MAC, SOURCE, "10.2.0.0/24") in host.filters()  # the other list holds it
        other.delete("10.2.0.0/24")
        host.wait_for(expected(polled), what="the element gone from both lists")


# --- 3. mbctl follow ------------------------------------------------------------------------------


def terminate_when(condition) -> None:
    """SIGTERM this process once ``condition`` holds (or after 30 s, so a test never hangs)."""
    def wait_then_terminate():
        try:
            wait_until(condition, timeout=30, what="the condition to terminate at")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=wait_then_terminate, daemon=True).start()


def test_mbctl_follow_stops_on_sigterm_and_leaves_the_filters(host, writer, tmp_path, monkeypatch):
    source = ListSource(networks(30))
    monkeypatch.setattr(mbctl, "follow_sources", lambda args: [source])
    terminate_when(lambda: host.filters() == expected(source))
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        code = mbctl.main(["--shm", host.region, "follow", "nft", "--set", "inet", "filter", "blocklist", "--mac", MAC,
                           "--lock-dir", str(tmp_path)])
    assert code == mbctl.EXIT_OK, stderr.getvalue()
    assert source.watches and all(watch.closed for watch in source.watches)
    assert host.filters() == expected(source)
    assert "following test list (source)" in stderr.getvalue()


def test_mbctl_follow_remove_on_exit_takes_its_filters_and_only_those(host, writer, tmp_path, monkeypatch):
    host.put(list(OTHERS))
    source = ListSource(networks(30))
    monkeypatch.setattr(mbctl, "follow_sources", lambda args: [source])
    code = mbctl.main(["--shm", host.region, "follow", "ipset", "--set", "blocklist", "--mac", MAC, "--once",
                       "--remove-on-exit", "--lock-dir", str(tmp_path)])
    assert code == mbctl.EXIT_OK
    assert host.filters() == set(OTHERS)


def test_a_middlebox_that_is_not_registered_ends_the_follower_with_the_hosts_reason(host, writer, tmp_path,
                                                                                    monkeypatch, capsys):
    host.put([f"X {MAC}"])
    monkeypatch.setattr(mbctl, "follow_sources", lambda args: [ListSource(networks(3))])
    code = mbctl.main(["--shm", host.region, "follow", "ipset", "--set", "blocklist", "--mac", MAC,
                       "--lock-dir", str(tmp_path)])
    assert code == mbctl.EXIT_HOST_ERROR
    assert f"the host would not list {MAC}'s filters: REJECTED not-registered" in capsys.readouterr().err


def test_a_list_that_may_not_be_offloaded_sends_nothing(host, writer, tmp_path, monkeypatch, capsys):
    source = ListSource(networks(30))
    source.not_offloadable = "the set is matched by an accept rule"
    monkeypatch.setattr(mbctl, "follow_sources", lambda args: [source])
    published = writer.header().publish
    code = mbctl.main(["--shm", host.region, "follow", "ipset", "--set", "blocklist", "--mac", MAC, "--once",
                       "--lock-dir", str(tmp_path)])
    assert code == mbctl.EXIT_NOT_FOLLOWED
    assert "the set is matched by an accept rule" in capsys.readouterr().err
    assert writer.header().publish == published and host.filters() == set()


# --- 6. a process killed in the middle of the first sync -----------------------------------


@pytest.mark.parametrize("victim", ["agent", "controller"])
def test_a_first_sync_survives_kill_9_of_the_agent_or_controller_and_sends_nothing_twice(tmp_path, victim):
    """3,000 elements, four frames in flight, and the agent (or the controller) SIGKILLed
    after the sixth frame and started again: the new agent resumes the ring from its
    counters and forwards with the same idempotency keys, the restarted controller
    replays what it stored: the follower's frames are all answered (none lost, none sent
    again) and the host ends equal to the list."""
    netlab.require_host_tools()
    state = tmp_path / "state"
    state.mkdir()
    region = make_region()
    with netlab.Lab() as lab:
        controller = Controller(state, environment={"MBVISOR_MAX_FILTERS": "5000", "MBVISOR_MAX_FLOWS": "25000"})
        agent = None
        try:
            controller.start()
            bridge = lab.bridge(controller=controller.target, fail_mode="secure")
            middlebox = lab.host("mb", ip="10.0.0.5/24", mac=MAC)
            controller.wait_switch(bridge.dpid)
            annotate(middlebox, region, "vm-crash")
            agent = AgentProcess(controller, state, bridges=(bridge.name,), options=("--rate", "5000", "--burst", "10000"))
            agent.start().wait_serving(f"vm-crash/{middlebox.port_name}")
            host = Host(controller, bridge.dpid, middlebox.ofport, region)
            host.put([f"R F {MAC} 10.0.0.5"])
            source = ListSource(networks(3000))
            with open_file(region) as channel:
                counting = CountingWriter(channel)
                with following(counting, [source], tmp_path, timeout=30.0) as (follower, reports):
                    wait_until(lambda: counting.frames >= 6, timeout=60, interval=0.001, what="six frames sent")
                    assert not reports.having("following test list")  # mid-stream: the first sync goes on
                    kill_9_and_restart(agent if victim == "agent" else controller)
                    wait_until(lambda: reports.having("following test list"), timeout=120, what="the first sync")
                    host.wait_for(expected(source), timeout=60)
                    assert not reports.having("not offloaded: "), reports
            adds = counting.adds()
            assert len(adds) == len(set(adds)) and set(adds) == expected(source), (len(adds), len(set(adds)))
            assert counting.frames > 6 and not counting.unanswered
        finally:
            if agent is not None:
                agent.stop()
            controller.stop()
            os.unlink(region)
