"""The follower at its edges, against an in-process host (the real grammar, the agent's
vetting and answer rendering, the controller's model): a MAC in another spelling, and a
host's list that changes between the pages of a read."""

from __future__ import annotations

import pytest
from mbvisor.agents.vetting import combine, vet
from mbvisor.controller.model import ApplyError, Binding, State, apply
from mbvisor.guest import answers
from mbvisor.guest.commands import AddFilter
from mbvisor.guest.follow import sync
from mbvisor.guest.follow.follower import AlreadyFollowed, Follower, hold_lock
from mbvisor.guest.follow.source import SOURCE, Verdict
from mbvisor.guest.grammar import format_command, parse_command
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
