"""The follower at its edges, against an in-process host (the real grammar, the agent's
vetting and answer rendering, the controller's model): a MAC in another spelling, a
host's list that changes between the pages of a read, and frames in flight when one of
them fails."""

from __future__ import annotations

import pytest
from mbvisor.agents.vetting import combine, vet
from mbvisor.controller.model import ApplyError, Binding, State, apply
from mbvisor.guest import answers, ring
from mbvisor.guest.answers import answer
from mbvisor.guest.channel_errors import AnswerLost
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


class ShakyHost(FakeHost):
    """Answers the frame numbered ``declined`` (1: the first page) with ``status`` for
    every command, applying none of them; or, with ``status=None``, raises ``error`` when
    it is waited for (its commands applied: the answer is what went missing)."""

    def __init__(self, declined: int, status: str | None = "RATE_LIMITED", error: Exception | None = None):
        super().__init__(Geometry(16))
        self.declined, self.status, self.error = declined, status, error
        self.frames = 0
        self.frame_commands: list[list[str]] = []
        self.lost: set[int] = set()

    def submit(self, payload: bytes, timeout, collect_within=None):
        self.frames += 1
        commands = [body for _, body in split_frame(payload)]
        self.frame_commands.append(commands)
        if self.frames == self.declined and self.status is not None:
            ticket = len(self.answers_kept) + len(self.waited)
            records = [answer(self.status, self.status.lower().replace("_", "-"), "declined (test)")] * len(commands)
            self.answers_kept[ticket] = Response(1, 1, int(ring.Status[self.status]),
                                                 answers.render(records, self.geometry.max_response_length), False)
            return ticket
        ticket = super().submit(payload, timeout)
        if self.frames == self.declined:
            self.lost.add(ticket)
        return ticket

    def wait(self, ticket, timeout):
        response = super().wait(ticket, timeout)
        if ticket in self.lost:
            raise self.error
        return response


def adds_sent(host: ShakyHost) -> list[str]:
    return [command for commands in host.frame_commands for command in commands if command.startswith("A ")]


def test_a_rate_limited_frame_among_those_in_flight_is_sent_again_and_the_others_are_not(tmp_path):
    """Four frames in flight, the second declined: the others were applied and their
    answers are taken; only the declined frame's commands are sent again."""
    host = ShakyHost(declined=3)  # 1: the page read, 2..: the adds
    source = ListSource([f"10.{i // 250}.{i % 250}.0/24" for i in range(1000)])
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)
    assert host.owned() == {(SOURCE, network) for network in source.elements}
    sent = adds_sent(host)
    again = [command for command in set(sent) if sent.count(command) > 1]
    assert sorted(again) == sorted(host.frame_commands[2]) and len(sent) == 1000 + len(again)
    assert not host.answers_kept  # every frame's answer read


def test_a_lost_answer_among_frames_in_flight_abandons_the_rest_and_asks_the_host(tmp_path):
    """The second frame's answer is lost: what the frames after it did is unknown, so their
    answers are abandoned (``--once`` ends there) and the host's own list decides what the
    next run sends (only what no frame applied: none is sent twice)."""
    host = ShakyHost(declined=3, status=None, error=AnswerLost("lost (test)", 2))
    source = ListSource([f"10.{i // 250}.{i % 250}.0/24" for i in range(1000)])
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        with pytest.raises(AnswerLost):
            follower.run(once=True)
    # the page, then frames 2-5 in flight; 2 answered, 6 sent; 3 lost: 4, 5 and 6 abandoned, no more sent
    assert not host.answers_kept and len(host.frame_commands) == 6
    with Follower(host, MAC, [source], lock_dir=str(tmp_path), report=_quiet) as follower:
        follower.run(once=True)
    assert host.owned() == {(SOURCE, network) for network in source.elements}
    assert sorted(adds_sent(host)) == sorted(set(adds_sent(host)))  # nothing sent twice
