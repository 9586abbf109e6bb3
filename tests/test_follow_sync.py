"""The follower's arithmetic (guest/follow/sync.py): the filters a list stands for and which
of the host's are the follower's, the plan, the frames and the host's pages and answers.
Pure: no channel, no host."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.guest import answers
from mbvisor.guest import fields as kinds
from mbvisor.guest.commands import AddFilter, Filter, Layer
from mbvisor.guest.errors import InvalidValueError
from mbvisor.guest.follow import sync
from mbvisor.guest.follow.source import DESTINATION, SOURCE
from mbvisor.guest.grammar import MAX_TEXT_BYTES, format_command, parse_command, parse_frame
from mbvisor.guest.ring import Geometry

MAC = "52:34:56:00:12:22"

networks = st.one_of(
    st.builds(lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
              st.ip_addresses(v=4), st.integers(8, 31)),
    st.ip_addresses(v=4).map(str),
    st.builds(lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
              st.ip_addresses(v=6), st.integers(16, 127)),
    st.ip_addresses(v=6).map(str),
)
fields = st.sampled_from([SOURCE, DESTINATION])
entries = st.tuples(fields, networks)


# --- the filters a list stands for -----------------------------------------------------------


def test_a_source_set_is_mask_4_s_and_a_destination_set_mask_8_d():
    assert sync.filter_text(MAC, SOURCE, "10.0.0.0/24") == f"A {MAC} I 4 s 10.0.0.0/24"
    assert sync.filter_text(MAC, DESTINATION, "2001:db8::/32") == f"A {MAC} I 8 d 2001:db8::/32"
    assert sync.delete_text(MAC, SOURCE, "10.0.0.1") == f"D {MAC} I 4 s 10.0.0.1"
    assert parse_command(sync.filter_text(MAC, SOURCE, "10.0.0.1")) == AddFilter(MAC, Filter(Layer.IP, "10.0.0.1"))
    assert sync.entries({SOURCE, DESTINATION}, ["10.0.0.1"]) == {(SOURCE, "10.0.0.1"), (DESTINATION, "10.0.0.1")}


@settings(max_examples=200, deadline=None)
@given(entries)
def test_every_entry_is_a_canonical_filter_the_host_quotes_back_as_the_same_entry(entry):
    text = sync.filter_text(MAC, *entry)
    assert format_command(parse_command(text)) == text  # what the host's query answers, byte for byte
    assert sync.owned_entry(text, MAC) == entry


@pytest.mark.parametrize("spelled, canonical", [
    ("10.0.0.1/32", "10.0.0.1"), ("10.0.0.0/255.255.255.0", "10.0.0.0/24"), ("2001:DB8::/32", "2001:db8::/32"),
    ("2001:db8::1/128", "2001:db8::1"), ("10.0.0.7", "10.0.0.7"),
])
def test_elements_are_spelled_as_the_host_spells_them(spelled, canonical):
    assert sync.canonical_network(spelled) == canonical


quads = st.lists(st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "-1", "", " 1", "1 "])),
                 min_size=3, max_size=5).map(".".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(quads, st.ip_addresses(v=4).map(str)))
def test_the_plain_ipv4_shortcut_spells_as_the_grammar_does(text):
    """The shortcut takes only what the grammar spells the same way."""
    try:
        parsed = kinds.IP_ENDPOINT.parse(text)
    except InvalidValueError:
        assert not sync.PLAIN_IPV4.fullmatch(text)
        with pytest.raises(InvalidValueError):
            sync.canonical_network(text)
    else:
        assert sync.canonical_network(text) == parsed
        assert not sync.PLAIN_IPV4.fullmatch(text) or parsed == text


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "example.org", "", "10.0.0.0/33"])
def test_an_element_that_is_no_network_is_an_error(bad):
    with pytest.raises(InvalidValueError):
        sync.canonical_network(bad)


@pytest.mark.parametrize("line", [
    f"A {MAC} I 4 s 10.0.0.0/8 ",                   # not the host's spelling
    "A 52:34:56:00:12:33 I 4 s 10.0.0.0/8",         # another middlebox
    f"A {MAC} I 12 s 10.0.0.1 d 10.0.0.2",          # two address fields
    f"A {MAC} I 5 s 10.0.0.0/8 p 6",                # an address and a protocol
    f"A {MAC} I 1 p 6",
    f"A {MAC} T 4 s 22",                            # another layer
    f"A {MAC} M 4 s aa:bb:cc:dd:ee:ff",
    f"D {MAC} I 4 s 10.0.0.0/8",
    "(+3 line(s) not shown)",
    "",
])
def test_only_filters_of_the_followers_shape_are_its_own(line):
    assert sync.owned_entry(line, MAC) is None


# --- the plan ------------------------------------------------------------------------------


def test_the_plan_adds_what_is_missing_and_deletes_what_is_left_over_sorted():
    desired = {(SOURCE, "10.0.0.3"), (SOURCE, "10.0.0.1"), (DESTINATION, "10.0.0.2")}
    on_host = {(SOURCE, "10.0.0.1"), (SOURCE, "10.0.0.9"), (SOURCE, "10.0.0.8")}
    assert sync.plan(desired, on_host) == ([(DESTINATION, "10.0.0.2"), (SOURCE, "10.0.0.3")],
                                           [(SOURCE, "10.0.0.8"), (SOURCE, "10.0.0.9")])
    assert sync.plan(desired, desired) == ([], [])


@settings(max_examples=200, deadline=None)
@given(st.sets(entries, max_size=40), st.sets(entries, max_size=40))
def test_applying_the_plan_makes_the_host_equal_to_the_list(desired, on_host):
    adds, deletes = sync.plan(desired, on_host)
    assert (on_host | set(adds)) - set(deletes) == desired
    assert not set(adds) & on_host and set(deletes) <= on_host  # nothing sent that is not needed


# --- frames ----------------------------------------------------------------------------------


def test_frame_limits_follow_the_ring_and_the_hosts_answer_rule():
    assert sync.commands_per_frame(4064) == 106  # docs/protocol.md §6: 106 commands for 4 KiB slots
    assert sync.commands_per_frame(128 - 32) == 2
    assert sync.commands_per_frame(10) == 1      # one command is always taken
    assert sync.frame_limits(Geometry(64)) == (106, 4064)
    assert sync.frame_limits(Geometry(4, 8192, 8192)) == (sync.commands_per_frame(8160), MAX_TEXT_BYTES)
    for limit in (10, 96, 500, 4064, 65504):
        most = sync.commands_per_frame(limit)
        assert answers.fits(most, limit) and not answers.fits(most + 1, limit)


@settings(max_examples=150, deadline=None)
@given(st.sets(entries, max_size=300), st.sets(entries, max_size=300), st.integers(1, 120),
       st.integers(100, 4064))
def test_frames_fit_their_limits_keep_adds_before_deletes_and_say_exactly_the_plan(adds, deletes, commands, size):
    adds, deletes = sorted(adds), sorted(deletes - adds)
    made = sync.frames(MAC, adds, deletes, commands, size)
    steps = [step for frame in made for step in frame.steps]
    assert steps == [sync.Step(True, e) for e in adds] + [sync.Step(False, e) for e in deletes]
    for frame in made:
        assert 1 <= len(frame.steps) <= commands
        assert len(frame.text) <= size or len(frame.steps) == 1  # one command always goes
        assert parse_frame(frame.text) == [parse_command(step.text(MAC)) for step in frame.steps]
    # As few frames as the limits allow: every frame but the last was full by count or by size.
    for frame, after in zip(made, made[1:]):
        first = len(f"@{after.steps[0].text(MAC)}@")
        assert len(frame.steps) == commands or len(frame.text) + first > size


def test_a_thousand_networks_fill_eleven_command_slots_of_a_default_ring():
    """About 42 bytes a command: the 4064-byte command slot is the limit here, not the 106
    answers."""
    adds = [(SOURCE, f"10.{i // 256}.{i % 256}.0/24") for i in range(1000)]
    made = sync.frames(MAC, adds, [], *sync.frame_limits(Geometry(64)))
    assert len(made) == 11
    assert all(4064 - 42 < len(frame.text.encode()) <= 4064 for frame in made[:-1])


# --- pages -----------------------------------------------------------------------------------


def filter_lines(count: int) -> list[str]:
    return sorted(sync.filter_text(MAC, SOURCE, f"10.{i // 256}.{i % 256}.0/24") for i in range(count))


@pytest.mark.parametrize("limit", [96, 200, 1000, 4064])  # the text of 128-byte to 4 KiB response slots
def test_a_page_is_the_lines_that_fit_without_the_note_and_the_total(limit):
    lines = filter_lines(250)
    text = answers.render([answers.answer("OK", "ok", "\n".join(["250 filter(s)", *lines[7:]]), result=True)],
                          limit)
    page = sync.read_page(answers.parse(text)[0])
    assert page.total == 250
    assert list(page.lines) == lines[7:7 + len(page.lines)]  # from the skip on, in order, none made up
    assert len(text.encode()) <= limit


def test_a_slot_too_small_for_the_count_and_the_note_is_an_error_not_an_empty_page():
    """In the smallest response slot (64 bytes, 32 of text) the host keeps the note and
    drops the count: the follower cannot page there, and must not read it as no filters."""
    text = answers.render([answers.answer("OK", "ok", "\n".join(["250 filter(s)", *filter_lines(250)]),
                                          result=True)], 32)
    with pytest.raises(ValueError, match="too small"):
        sync.read_page(answers.parse(text)[0])


def test_a_page_past_the_end_has_the_total_and_no_lines():
    assert sync.read_page(answers.parse("OK ok 500 filter(s)")[0]) == sync.Page(500, ())


@pytest.mark.parametrize("text", ["REJECTED not-registered 52:34:56:00:12:22 is not registered",
                                  "OK ok added: A 52:34:56:00:12:22 I 4 s 10.0.0.1", "OK ok"])
def test_a_record_that_is_no_page_is_an_error(text):
    with pytest.raises(ValueError):
        sync.read_page(answers.parse(text)[0])


# --- what an answer means ----------------------------------------------------------------------

ADD = sync.Step(True, (SOURCE, "10.0.0.1"))
DELETE = sync.Step(False, (SOURCE, "10.0.0.1"))


@pytest.mark.parametrize("step, record, expected", [
    (ADD, "OK ok added: ...", sync.DONE),
    (ADD, "OK ok filter already present: ...", sync.DONE),
    (DELETE, "OK ok deleted: ...", sync.DONE),
    (DELETE, "REJECTED no-such-filter no such filter: ...", sync.DONE),  # gone already: what was wanted
    (ADD, "REJECTED limit 52:34:56:00:12:22 has 1000 filters, the limit is 1000", sync.FAILED),
    (ADD, "REJECTED not-registered 52:34:56:00:12:22 is not registered", sync.FAILED),
    (DELETE, "REJECTED not-registered 52:34:56:00:12:22 is not registered", sync.FAILED),
    (ADD, "REFUSED foreign-mac 52:34:56:00:12:22 is not this VM's MAC", sync.FAILED),
    (ADD, "INTERNAL internal internal error", sync.FAILED),
    (ADD, "RATE_LIMITED rate-limited more than 200 commands/s", sync.RETRY),
    (DELETE, "UNAVAILABLE unavailable controller or switch unavailable", sync.RETRY),
    (ADD, "UNAVAILABLE switch-down switch is not connected", sync.RETRY),
    (ADD, "REFUSED not-applied another command of the frame was refused; nothing was applied", sync.RETRY),
])
def test_each_answer_means_done_retry_soon_or_failed_until_the_next_resync(step, record, expected):
    assert sync.outcome(step, answers.parse(record)[0]) == expected


def test_a_large_lists_resync_is_spaced_by_its_cost():
    """A cheap re-sync keeps the configured period; one that costs 0.1 s of CPU (10,000
    filters read in pages) comes no more often than 0.05 % of a core allows."""
    assert sync.next_resync_after(60.0, 0.002) == 60.0
    assert sync.next_resync_after(60.0, 0.1) == pytest.approx(200.0)
    assert sync.next_resync_after(60.0, 0.1, share=0.01) == 60.0
    assert sync.next_resync_after(60.0, 0.0) == 60.0
