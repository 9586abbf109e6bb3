"""The follower at its edges, against an in-process host (the real grammar, the agent's
vetting and answer rendering, the controller's model): a MAC in another spelling, a
host's list that changes between the pages of a read, and frames in flight when one of
them fails."""

from __future__ import annotations

import ipaddress

import pytest
from mbvisor.agents.vetting import combine, vet
from mbvisor.controller.model import ApplyError, Binding, State, apply
from mbvisor.guest import answers, ring
from mbvisor.guest.answers import answer
from mbvisor.guest.channel_errors import AnswerLost, RingFull
from mbvisor.guest.commands import AddFilter
from mbvisor.guest.follow import sync
from mbvisor.guest.follow.follower import AlreadyFollowed, Follower, hold_lock
from mbvisor.guest.follow.source import SOURCE, Verdict
from mbvisor.guest.grammar import format_command, parse_command, split_frame
from mbvisor.guest.ring import Geometry, Response

MAC = "52:54:00:ab:cd:ef"
DPID, PORT = 0xA1, 3


# --- an in-process host: agent vetting + controller model + answer rendering ----------------


class FakeHost:
    """What the agent and controller do with a frame, in process: vetted, applied to the
    controller's model, answered in records that fit the response slot."""

    def __init__(self, geometry: Geometry = Geometry(8)):
        self.geometry = geometry
        self.state = State()
        self.binding = Binding(DPID, PORT)
        self.after_query = None  # called after each query is answered (a concurrent writer)
        self.sent: list[str] = []
        self.answers_kept: dict[int, object] = {}  # submitted, not yet waited for
        self.waited: list[int] = []
        self.execute(f"R F {MAC} 10.0.0.5")

    def execute(self, text: str) -> dict:
        try:
            applied = apply(self.state, self.binding, parse_command(text))
        except ApplyError as error:
            return {"status": "REJECTED", "code": error.code, "text": str(error)}
        self.state = applied.state
        return {"status": "OK", "code": "ok", "text": applied.text}

    def owned(self) -> set[tuple[str, str]]:
        """The host's filters of the follower's shape, from its canonical texts."""
        middlebox = self.state.find(DPID, MAC)
        texts = (format_command(AddFilter(MAC, f)) for f in middlebox.filters)
        return {entry for entry in map(lambda t: sync.owned_entry(t, MAC), texts) if entry}

    # the ChannelWriter interface the follower uses
    def header(self, timeout):
        return type("Header", (), {"geometry": self.geometry})()

    def submit(self, payload: bytes, timeout, collect_within=None):
        """Answered at once; the answer kept for ``wait``."""
        ticket = len(self.answers_kept) + len(self.waited)
        self.answers_kept[ticket] = self.request(payload, timeout)
        return ticket

    def wait(self, ticket, timeout):
        self.waited.append(ticket)
        return self.answers_kept.pop(ticket)

    def abandon(self, ticket):
        self.waited.append(ticket)
        del self.answers_kept[ticket]

    def request(self, payload: bytes, timeout):
        verdict = vet(payload, (MAC,))
        if verdict.answers:
            status, records = verdict.status, list(verdict.answers)
        else:
            replies = []
            for canonical in verdict.forward:
                self.sent.append(canonical)
                replies.append(self.execute(canonical))
            status, records = combine(replies, list(verdict.forward))
            if any(c[:2] in ("I ", "M ", "T ") for c in verdict.forward) and self.after_query is not None:
                hook, self.after_query = self.after_query, None
                hook(self)
        text = answers.render(records, self.geometry.max_response_length)
        return Response(1, 1, int(status), text, False)


class ListSource:
    """A blocklist without a tool: polled, never changing."""

    def __init__(self, networks, fields=frozenset({SOURCE})):
        self.elements = {network: None for network in networks}
        self.fields, self.description = fields, "test list"

    def verdict(self):
        return Verdict(self.fields)

    def snapshot(self):
        return dict(self.elements)

    def watch(self):
        return type("W", (), {"poll_interval": 3600.0, "fileno": lambda s: None, "changes": lambda s: [],
                              "close": lambda s: None})()


def _quiet(_line: str) -> None:
    pass


# --- a MAC in another spelling is the same middlebox ---------------------------------------


def test_a_follower_given_the_mac_in_capitals_deletes_what_the_list_no_longer_holds(tmp_path):
    """The grammar (and mbctl's other commands) accept a MAC in either case, and with dashes,
    and the host answers in canonical text: the follower reads its own filters back whatever
    the spelling, so a filter a previous follower added for an element deleted while it was
    down is deleted (else the switch would keep dropping an address the guest lets through)."""
    host = FakeHost()
    for network in ("10.1.0.0/16", "10.2.0.0/16"):  # the previous follower's filters
        assert host.execute(f"A {MAC} I 4 s {network}")["status"] == "OK"
    source = ListSource(["10.1.0.0/16"])  # 10.2.0.0/16 left the list while no follower ran
    with Follower(host, MAC.upper(), [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)
    assert host.owned() == {(SOURCE, "10.1.0.0/16")}


def test_the_one_follower_per_middlebox_lock_holds_whatever_the_mac_s_spelling(tmp_path):
    first = hold_lock(MAC, str(tmp_path))
    try:
        with pytest.raises(AlreadyFollowed):
            hold_lock(MAC.upper().replace(":", "-"), str(tmp_path)).close()
    finally:
        first.close()


# --- a list that changes between the pages of a read --------------------------------------


def test_a_paged_read_misses_no_filter_when_the_list_changes_but_keeps_its_count(tmp_path):
    """An operator deleting one IP filter and adding another between two pages keeps N but
    slides every line back by one: a read counting lines alone would start its second page
    one filter too far, never see one, and leave a filter of the follower's shape that the
    list does not hold (the switch dropping an address the guest lets through)."""
    host = FakeHost()
    for i in range(150):  # a previous follower's filters; the list now holds none of them
        host.execute(f"A {MAC} I 4 s 10.0.{i}.0/24")
    operator_first = f"A {MAC} I 12 s 1.0.0.0/8 d 10.0.0.5"  # not the follower's; sorts first
    host.execute(operator_first)

    def operator_edits(h):  # between page 1 and page 2: one filter gone, another added (N unchanged)
        h.execute("D" + operator_first[1:])
        h.execute(f"A {MAC} I 5 s 99.0.0.0/8 p 17")

    host.after_query = operator_edits
    with Follower(host, MAC, [ListSource([])], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)
    assert host.owned() == set()


# --- frames in flight when one of them fails ----------------------------------------------


class ScriptedHost(FakeHost):
    """The n-th frame submitted (page reads are requests, not counted) goes as ``plan[n]`` says: ``"declined"``
    (answered RATE_LIMITED for every command, none applied), ``"ring-full"`` (its submit
    raises RingFull: nothing published) or ``"lost"`` (applied, and waiting for its answer
    raises AnswerLost); a frame the plan does not name is applied and answered."""

    def __init__(self, plan: dict[int, str], geometry: Geometry = Geometry(16)):
        super().__init__(geometry)
        self.plan = plan
        self.frame_commands: list[list[str]] = []
        self.lost: set[int] = set()
        self.uncovered: list[int] = []  # frames after which a watched address was in no filter
        self.watched: str | None = None
        self.most_in_flight = {"A": 0, "D": 0}  # frames published and not yet waited for, by the first's kind

    def submit(self, payload: bytes, timeout, collect_within=None):
        commands = [body for _, body in split_frame(payload)]
        number = len(self.frame_commands) + 1
        self.frame_commands.append(commands)
        what = self.plan.get(number)
        if what == "ring-full":
            raise RingFull("ring full (test)")
        if what == "declined":
            ticket = len(self.answers_kept) + len(self.waited)
            records = [answer("RATE_LIMITED", "rate-limited", "declined (test)")] * len(commands)
            self.answers_kept[ticket] = Response(1, 1, int(ring.Status.RATE_LIMITED),
                                                 answers.render(records, self.geometry.max_response_length), False)
            return ticket
        ticket = super().submit(payload, timeout)
        kind = commands[0][0]
        self.most_in_flight[kind] = max(self.most_in_flight[kind], len(self.answers_kept))
        if what == "lost":
            self.lost.add(ticket)
        if self.watched and not any(ipaddress.ip_address(self.watched) in ipaddress.ip_network(network)
                                    for _, network in self.owned()):
            self.uncovered.append(number)
        return ticket

    def wait(self, ticket, timeout):
        response = super().wait(ticket, timeout)
        if ticket in self.lost:
            raise AnswerLost("lost (test)", ticket)
        return response


LIST = [f"10.{i // 250}.{i % 250}.0/24" for i in range(1000)]


def adds_sent(host: ScriptedHost) -> list[str]:
    return [command for commands in host.frame_commands for command in commands if command.startswith("A ")]


def test_a_rate_limited_frame_among_those_in_flight_is_sent_again_and_the_others_are_not(tmp_path):
    """Four frames in flight, the second declined: the others were applied and their
    answers are taken; only the declined frame's commands are sent again."""
    host = ScriptedHost({2: "declined"})
    source = ListSource(LIST)
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)
    assert host.owned() == {(SOURCE, network) for network in source.elements}
    sent = adds_sent(host)
    again = [command for command in set(sent) if sent.count(command) > 1]
    assert sorted(again) == sorted(host.frame_commands[1]) and len(sent) == 1000 + len(again)
    assert not host.answers_kept  # every frame's answer read


def test_a_lost_answer_among_frames_in_flight_abandons_the_rest_and_asks_the_host(tmp_path):
    """The second frame's answer is lost: what the frames after it did is unknown, so their
    answers are abandoned (``--once`` ends there) and the host's own list decides what the
    next run sends (only what no frame applied: none is sent twice)."""
    host = ScriptedHost({3: "lost"})
    source = ListSource(LIST)
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        with pytest.raises(AnswerLost):
            follower.run(once=True)
    # frames 1-4 in flight; 1 answered, 5 sent; 2 answered, 6 sent; 3 lost: 4, 5 and 6 abandoned, no more sent
    assert not host.answers_kept and len(host.frame_commands) == 6
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)
    assert host.owned() == {(SOURCE, network) for network in source.elements}
    assert sorted(adds_sent(host)) == sorted(set(adds_sent(host)))  # nothing sent twice


def test_a_ring_full_behind_frames_in_flight_reads_them_and_sends_the_rest_later(tmp_path):
    """Two frames declined, then the ring is full for the third: the frames in flight are
    still read (their elements are not believed on the host), so the next flush sends
    every element the host does not hold (a review found 189 of 400 never sent)."""
    host = ScriptedHost({1: "declined", 2: "declined", 3: "ring-full"})
    source = ListSource(LIST[:400])
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        with pytest.raises(RingFull):
            follower.run(once=True)
        assert not host.answers_kept
        follower.run(once=True)
    assert host.owned() == {(SOURCE, network) for network in source.elements}


def test_deletes_wait_until_every_add_before_them_is_applied(tmp_path):
    """An address replaced by its network: the delete of the address is published only
    after the add of the network was answered and applied, so a declined frame of adds
    never leaves the address uncovered (a review found it deleted while its network's add
    was declined)."""
    narrow, wide = "1.2.3.4", "1.0.0.0/8"  # sorted first: in the first frame of adds, the declined one
    host = ScriptedHost({1: "declined"})
    host.execute(f"A {MAC} I 4 s {narrow}")
    host.watched = narrow
    source = ListSource([wide, *LIST[:300]])
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)  # the declined frame is sent again after a back-off
    assert host.uncovered == [] and any(f"D {MAC} I 4 s {narrow}" in c for c in host.frame_commands)
    assert host.owned() == {(SOURCE, network) for network in source.elements}


def test_a_lost_answer_after_a_declined_frame_makes_the_follower_read_the_host(tmp_path):
    """A frame declined, the next one's answer lost: the channel error wins and the host's
    list is read, so the elements the lost frame applied are believed on the host (a
    review found them neither believed nor read again: a later delete of one from the
    list would never have been sent)."""
    host = ScriptedHost({1: "declined", 2: "lost"})
    source = ListSource(LIST[:400])
    reports = []
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=reports.append) as follower:
        follower.start()
        follower._flush(strict=False)
        assert follower._must_read_host and any("lost (test)" in line for line in reports), reports
        follower._channel_ready_at = 0.0
        follower._flush(strict=False)
        wanted = {(SOURCE, network) for network in source.elements}
        assert host.owned() == wanted and follower.on_host == wanted


def test_frames_of_deletes_go_in_flight_together_once_the_adds_are_applied(tmp_path):
    """Only adds must be applied before a delete: a list that empties is withdrawn with
    its delete frames in flight together, not one round trip each (a review found them
    sent one at a time)."""
    host = ScriptedHost({})
    source = ListSource(LIST[:800])
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)
        follower._replace(0, {})  # the list emptied (as a snapshot of its source says)
        follower._flush(strict=True)
    assert host.owned() == set()
    assert host.most_in_flight == {"A": 4, "D": 4}
