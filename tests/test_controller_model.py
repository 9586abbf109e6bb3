"""Unit tests of the controller's pure transition ``apply(state, binding, command)``.

No OVS, no network, no OS-Ken: commands are parsed from text and applied to immutable
``State`` values (docs/architecture.md, docs/security.md)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.controller.model import (ApplyError, Applied, Binding, Draft, Limits, Middlebox, Redirect, State, apply,
                                      decide)
from mbvisor.guest.commands import Filter, Layer
from mbvisor.guest.grammar import parse_command

FAST = settings(max_examples=60, deadline=None)

MAC = "52:34:56:00:12:22"
MAC2 = "52:34:56:00:12:33"
MAC3 = "52:34:56:00:12:44"
HERE = Binding(dpid=1, port=5)
ELSEWHERE = Binding(dpid=2, port=5)


def run(state: State, text: str, binding: Binding = HERE) -> Applied:
    return apply(state, binding, parse_command(text))


def run_all(*texts: str, state: State | None = None, binding: Binding = HERE) -> State:
    state = state if state is not None else State()
    for text in texts:
        state = run(state, text, binding).state
    return state


def rejected(state: State, text: str, code: str, binding: Binding = HERE) -> ApplyError:
    """Assert ``text`` is refused with ``code`` and that the state is left exactly as it was."""
    snapshot = copy.deepcopy(state)
    with pytest.raises(ApplyError) as caught:
        run(state, text, binding)
    assert caught.value.code == code
    assert state == snapshot
    return caught.value


def filter_of(text: str) -> Filter:
    return parse_command(text).filter


FIREWALL = run_all(f"R F {MAC} 10.0.0.1")


# --- ApplyError ---------------------------------------------------------------------------

def test_apply_error_carries_code_and_message():
    error = ApplyError("limit", "too many")
    assert error.code == "limit"
    assert str(error) == "too many"
    assert isinstance(error, Exception)


# --- R F ----------------------------------------------------------------------------------

def test_register_firewall_creates_the_middlebox_on_the_binding():
    outcome = run(State(), f"R F {MAC} 10.0.0.1")
    assert outcome.text == f"registered {MAC} 10.0.0.1 for firewall offload"
    assert outcome.state.middleboxes == (Middlebox(1, 5, MAC, 1, firewall_ip="10.0.0.1"),)
    assert outcome.state.find(1, MAC).key == (1, MAC)
    assert outcome.state.find(2, MAC) is None


def test_register_firewall_twice_with_the_same_ip_is_idempotent():
    again = run(FIREWALL, f"R F {MAC} 10.0.0.1")
    assert again.state == FIREWALL
    assert "registered" in again.text


def test_register_firewall_with_another_ip_is_refused():
    error = rejected(FIREWALL, f"R F {MAC} 10.0.0.2", "already-registered")
    assert "10.0.0.1" in str(error)


def test_register_firewall_accepts_ipv6():
    state = run_all(f"R F {MAC} 2001:db8::1")
    assert state.find(1, MAC).firewall_ip == "2001:db8::1"


# --- A ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    f"A {MAC} I 4 s 10.0.0.0/8",
    f"A {MAC} M 4 s aa:bb:cc:dd:ee:ff",
    f"A {MAC} T 9 d 80 p tcp",
])
def test_add_before_register_firewall_is_not_registered(text):
    rejected(State(), text, "not-registered")


def test_add_on_a_load_balancer_only_middlebox_is_not_registered():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5")
    rejected(state, f"A {MAC} I 4 s 10.0.0.0/8", "not-registered")


@pytest.mark.parametrize("text, canonical", [
    (f"A {MAC} I 4 s 10.0.0.0/255.0.0.0", f"A {MAC} I 4 s 10.0.0.0/8"),
    (f"A {MAC} M 5 p ipv4 s AA-BB-CC-DD-EE-FF", f"A {MAC} M 5 s aa:bb:cc:dd:ee:ff p 0x0800"),
    (f"A {MAC} T 9 p tcp d 80-80", f"A {MAC} T 9 d 80 p 6"),
    (f"A {MAC} M 8 d {MAC}", f"A {MAC} M 8 d {MAC}"),
])
def test_add_filter_stores_it_and_answers_in_canonical_text(text, canonical):
    outcome = run(FIREWALL, text)
    assert outcome.state.find(1, MAC).filters == {filter_of(text)}
    assert outcome.text == f"added: {canonical}"


def test_add_duplicate_filter_is_idempotent_even_when_spelled_differently():
    state = run_all(f"A {MAC} T 9 d 80 p tcp", state=FIREWALL)
    again = run(state, f"A {MAC} T 9 p 6 d 80-80")
    assert again.state == state
    assert again.text.startswith("filter already present")


def test_add_filter_limit():
    state = State(limits=Limits(filters=2))
    state = run_all(f"R F {MAC} 10.0.0.1", f"A {MAC} I 4 s 10.0.0.0/8", f"A {MAC} I 4 s 10.1.0.0/16",
                    state=state)
    error = rejected(state, f"A {MAC} I 4 s 10.2.0.0/16", "limit")
    assert "2" in str(error)
    # Re-adding a filter already present is still fine at the limit (nothing grows).
    assert run(state, f"A {MAC} I 4 s 10.0.0.0/8").state == state
    # The limit is per middlebox: another middlebox still has room.
    other = run_all(f"R F {MAC2} 10.0.0.2", f"A {MAC2} I 4 s 10.0.0.0/8", state=state)
    assert len(other.find(1, MAC2).filters) == 1


@pytest.mark.parametrize("text, code", [
    (f"A {MAC} M 8 d {MAC2}", "foreign-destination"),
    (f"A {MAC} M 12 s aa:bb:cc:dd:ee:ff d ff:ff:ff:ff:ff:ff", "foreign-destination"),
])
def test_mac_filter_with_a_foreign_destination_is_refused(text, code):
    rejected(FIREWALL, text, code)


def test_mac_filter_with_its_own_destination_and_ip_filters_with_any_destination_are_accepted():
    state = run_all(f"A {MAC} M 8 d {MAC}", f"A {MAC} I 8 d 192.168.0.0/16", state=FIREWALL)
    assert len(state.find(1, MAC).filters) == 2


# --- D ------------------------------------------------------------------------------------

FILTERED = run_all(
    f"A {MAC} I 4 s 10.0.0.0/8",
    f"A {MAC} I 4 s 10.1.0.0/16",
    f"A {MAC} I 8 d 10.9.9.9",
    f"A {MAC} T 4 s 22",
    f"A {MAC} M 4 s aa:bb:cc:dd:ee:ff",
    state=FIREWALL,
)


def test_delete_exact_filter_removes_only_that_filter():
    outcome = run(FILTERED, f"D {MAC} I 4 s 10.0.0.0/255.0.0.0")
    assert outcome.text == f"deleted: D {MAC} I 4 s 10.0.0.0/8"
    before, after = FILTERED.find(1, MAC).filters, outcome.state.find(1, MAC).filters
    assert before - after == {filter_of(f"A {MAC} I 4 s 10.0.0.0/8")}
    assert len(after) == len(before) - 1


def test_delete_letters_only_removes_every_filter_of_that_layer_and_mask():
    outcome = run(FILTERED, f"D {MAC} I 4 s")
    assert outcome.text == "deleted 2 filter(s)"
    remaining = outcome.state.find(1, MAC).filters
    assert remaining == {filter_of(f"A {MAC} I 8 d 10.9.9.9"), filter_of(f"A {MAC} T 4 s 22"),
                         filter_of(f"A {MAC} M 4 s aa:bb:cc:dd:ee:ff")}


def test_delete_letters_only_with_no_match_changes_nothing():
    outcome = run(FILTERED, f"D {MAC} T 8 d")
    assert outcome.text == "deleted 0 filter(s)"
    assert outcome.state == FILTERED


@pytest.mark.parametrize("text", [
    f"D {MAC} I 4 s 10.3.0.0/16",
    f"D {MAC} T 4 s 23",
    f"D {MAC} I 8 d 10.0.0.0/8",  # same values, other field
    f"D {MAC} M 4 s aa:bb:cc:dd:ee:fe",
])
def test_delete_of_a_missing_filter_is_no_such_filter(text):
    rejected(FILTERED, text, "no-such-filter")


@pytest.mark.parametrize("text", [f"D {MAC} I 4 s 10.0.0.0/8", f"D {MAC} I 4 s"])
def test_delete_before_registration_is_not_registered(text):
    rejected(State(), text, "not-registered")


# --- X ------------------------------------------------------------------------------------

def test_cancel_removes_every_offload():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", f"R F {MAC2} 10.0.0.2", state=FILTERED)
    outcome = run(state, f"X {MAC}")
    assert outcome.text == f"cancelled {MAC}: every offload removed"
    assert outcome.state.find(1, MAC) is None
    assert [mb.mac for mb in outcome.state.middleboxes] == [MAC2]
    # Everything really went: registering again starts from nothing.
    fresh = run(outcome.state, f"R F {MAC} 10.0.0.7").state.find(1, MAC)
    assert fresh.filters == frozenset() and fresh.redirects == () and fresh.balancer_ip is None


def test_cancel_of_the_only_middlebox_gives_the_empty_state():
    limits = Limits(filters=3, redirects=4)
    state = run_all(f"R F {MAC} 10.0.0.1", state=State(limits=limits))
    assert run(state, f"X {MAC}").state == State(limits=limits)


def test_cancel_of_an_unknown_middlebox_is_not_registered():
    rejected(FIREWALL, f"X {MAC2}", "not-registered")
    rejected(FIREWALL, f"X {MAC}", "not-registered", ELSEWHERE)


def test_cancelling_one_redirect_keeps_the_others_and_the_firewall():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", f"R L {MAC} 10.0.0.1 1 10.9.0.0/16 10.0.0.6", state=FILTERED)
    outcome = run(state, f"X {MAC} L *")
    assert outcome.text == f"cancelled {MAC}'s redirect of 10.0.0.1 from any source"
    kept = outcome.state.find(1, MAC)
    assert kept.redirects == (Redirect("10.9.0.0/16", ("10.0.0.6",)),) and kept.balancer_ip == "10.0.0.1"
    assert kept.filters == state.find(1, MAC).filters and kept.firewall_ip == state.find(1, MAC).firewall_ip
    last = run(outcome.state, f"X {MAC} L 10.9.0.0/16").state.find(1, MAC)
    assert last.redirects == () and last.balancer_ip is None and last.filters == kept.filters


def test_cancelling_the_last_redirect_of_a_balancer_only_middlebox_removes_it():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", f"R F {MAC2} 10.0.0.2")
    outcome = run(state, f"X {MAC} L any")
    assert outcome.state.find(1, MAC) is None and outcome.state.find(1, MAC2) is not None
    assert "it was its last offload" in outcome.text


def test_cancelling_a_redirect_that_is_not_there_changes_nothing():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", state=FILTERED)
    rejected(state, f"X {MAC} L 10.9.0.0/16", "not-registered")
    rejected(FIREWALL, f"X {MAC} L *", "not-registered")
    rejected(state, f"X {MAC2} L *", "not-registered")
    rejected(state, f"X {MAC} L *", "not-registered", ELSEWHERE)
    rejected(state, f"X {MAC} L *", "port-conflict", Binding(dpid=1, port=6))


# --- queries ------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, expected", [
    ("I", [f"A {MAC} I 4 s 10.0.0.0/8", f"A {MAC} I 4 s 10.1.0.0/16", f"A {MAC} I 8 d 10.9.9.9"]),
    ("T", [f"A {MAC} T 4 s 22"]),
    ("M", [f"A {MAC} M 4 s aa:bb:cc:dd:ee:ff"]),
])
def test_query_answers_the_layer_in_canonical_sorted_text_and_changes_nothing(layer, expected):
    outcome = run(FILTERED, f"{layer} {MAC}")
    assert outcome.text.split("\n") == sorted(expected)
    assert outcome.state == FILTERED


def test_a_paged_query_counts_every_filter_and_answers_those_from_its_skip_on():
    whole = run(FILTERED, f"I {MAC}").text.split("\n")
    assert run(FILTERED, f"I {MAC} 1").text.split("\n") == ["3 filter(s)", *whole[1:]]
    assert run(FILTERED, f"I {MAC} 3").text == "3 filter(s)"
    assert run(FILTERED, f"I {MAC} 2147483647").text == "3 filter(s)"
    assert run(FIREWALL, f"T {MAC} 1").text == "0 filter(s)"
    assert run(FILTERED, f"I {MAC} 0").text.split("\n") == whole  # skip 0 is the query of before


def test_query_without_filters_answers_no_filters():
    for layer in "IMT":
        outcome = run(FIREWALL, f"{layer} {MAC}")
        assert outcome.text == "no filters"
        assert outcome.state == FIREWALL


def test_query_before_registration_is_not_registered():
    rejected(State(), f"I {MAC}", "not-registered")


# --- port conflicts -----------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    f"R F {MAC} 10.0.0.1",
    f"R L {MAC} 10.0.0.1 0 * 10.0.0.5",
    f"A {MAC} I 4 s 10.0.0.0/8",
    f"D {MAC} I 4 s",
    f"X {MAC}",
    f"T {MAC}",
])
def test_same_mac_on_another_port_of_the_same_switch_is_a_port_conflict(text):
    error = rejected(FILTERED, text, "port-conflict", Binding(dpid=1, port=6))
    assert "port 5" in str(error)


def test_same_mac_on_another_switch_is_a_separate_middlebox():
    state = run_all(f"R F {MAC} 10.0.0.9", state=FIREWALL, binding=Binding(dpid=2, port=6))
    assert state.find(1, MAC).firewall_ip == "10.0.0.1"
    assert state.find(2, MAC).firewall_ip == "10.0.0.9"
    assert state.find(2, MAC).port == 6


# --- R L ----------------------------------------------------------------------------------

def test_register_balancer_type_0_then_type_1_entries():
    first = run(State(), f"R L {MAC} 10.0.0.1 0 * 10.0.0.5,10.0.0.6")
    assert first.text == "redirecting 10.0.0.1 from any source to 10.0.0.5,10.0.0.6"
    middlebox = first.state.find(1, MAC)
    assert middlebox.balancer_ip == "10.0.0.1" and middlebox.firewall_ip is None
    assert middlebox.redirects == (Redirect(None, ("10.0.0.5", "10.0.0.6")),)

    second = run(first.state, f"R L {MAC} 10.0.0.1 1 10.9.0.0/16 10.0.0.7")
    assert second.text == "redirecting 10.0.0.1 from 10.9.0.0/16 to 10.0.0.7"
    third = run(second.state, f"R L {MAC} 10.0.0.1 1 10.8.0.1 10.0.0.8")
    redirects = third.state.find(1, MAC).redirects
    assert set(redirects) == {Redirect(None, ("10.0.0.5", "10.0.0.6")), Redirect("10.9.0.0/16", ("10.0.0.7",)),
                              Redirect("10.8.0.1", ("10.0.0.8",))}
    # Stored in a canonical order (per-source entries first, the default last).
    assert redirects[-1].source is None
    assert [r.source for r in redirects[:-1]] == sorted(r.source for r in redirects[:-1])


def test_register_balancer_order_of_commands_does_not_matter():
    a = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", f"R L {MAC} 10.0.0.1 1 10.9.0.0/16 10.0.0.7",
                f"R L {MAC} 10.0.0.1 1 10.8.0.0/16 10.0.0.8")
    b = run_all(f"R L {MAC} 10.0.0.1 1 10.8.0.0/16 10.0.0.8", f"R L {MAC} 10.0.0.1 1 10.9.0.0/16 10.0.0.7",
                f"R L {MAC} 10.0.0.1 0 * 10.0.0.5")
    assert a == b


@pytest.mark.parametrize("source, type_", [("*", 0), ("10.9.0.0/16", 1)])
def test_register_balancer_replaces_the_entry_of_the_same_source(source, type_):
    state = run_all(f"R L {MAC} 10.0.0.1 {type_} {source} 10.0.0.5",
                    f"R L {MAC} 10.0.0.1 1 10.7.0.0/16 10.0.0.9")
    again = run(state, f"R L {MAC} 10.0.0.1 {type_} {source} 10.0.0.6,10.0.0.7").state
    redirects = again.find(1, MAC).redirects
    assert len(redirects) == 2
    wanted_source = None if type_ == 0 else source
    assert Redirect(wanted_source, ("10.0.0.6", "10.0.0.7")) in redirects
    assert all(r.backends != ("10.0.0.5",) for r in redirects)


def test_register_balancer_same_command_twice_is_idempotent():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5")
    assert run(state, f"R L {MAC} 10.0.0.1 0 * 10.0.0.5").state == state


def test_register_balancer_with_another_ip_is_refused():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5")
    rejected(state, f"R L {MAC} 10.0.0.2 0 * 10.0.0.5", "already-registered")


def test_register_balancer_and_firewall_coexist_with_different_addresses():
    state = run_all(f"R L {MAC} 10.0.0.2 0 * 10.0.0.5", state=FIREWALL)
    middlebox = state.find(1, MAC)
    assert (middlebox.firewall_ip, middlebox.balancer_ip) == ("10.0.0.1", "10.0.0.2")


def test_backend_shared_with_another_middlebox_on_the_same_switch_is_refused():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5,10.0.0.6")
    error = rejected(state, f"R L {MAC2} 10.0.0.2 1 10.9.0.0/16 10.0.0.7,10.0.0.6", "backend-in-use")
    assert "10.0.0.6" in str(error)
    # The refused middlebox was not half-created.
    assert state.find(1, MAC2) is None


def test_backend_shared_with_a_middlebox_on_another_switch_is_allowed():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5")
    state = run(state, f"R L {MAC2} 10.0.0.2 0 * 10.0.0.5", ELSEWHERE).state
    assert state.find(2, MAC2).redirects == (Redirect(None, ("10.0.0.5",)),)


def test_backend_reused_by_the_same_middlebox_is_allowed():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", f"R L {MAC} 10.0.0.1 1 10.9.0.0/16 10.0.0.5")
    assert len(state.find(1, MAC).redirects) == 2


def test_backend_freed_by_cancel_can_be_used_by_another_middlebox():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", f"X {MAC}", f"R L {MAC2} 10.0.0.2 0 * 10.0.0.5")
    assert state.find(1, MAC2) is not None


def test_redirect_limit():
    state = run_all(f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", f"R L {MAC} 10.0.0.1 1 10.9.0.0/16 10.0.0.6",
                    state=State(limits=Limits(redirects=2)))
    rejected(state, f"R L {MAC} 10.0.0.1 1 10.8.0.0/16 10.0.0.7", "limit")
    # Replacing an existing entry at the limit does not grow the table.
    replaced = run(state, f"R L {MAC} 10.0.0.1 1 10.9.0.0/16 10.0.0.8").state
    assert len(replaced.find(1, MAC).redirects) == 2


# --- zones --------------------------------------------------------------------------------

def test_zones_are_unique_on_every_switch_and_reused_after_cancel():
    """Every userspace bridge of a host shares one conntrack table (issue: zone 1 held NAT
    entries of another bridge's middlebox), so zones never repeat across switches."""
    state = run_all(f"R F {MAC} 10.0.0.1", f"R F {MAC2} 10.0.0.2", f"R F {MAC3} 10.0.0.3")
    assert [state.find(1, m).zone for m in (MAC, MAC2, MAC3)] == [1, 2, 3]
    state = run(state, f"R F {MAC} 10.0.0.1", ELSEWHERE).state
    assert state.find(2, MAC).zone == 4
    state = run(state, f"X {MAC2}").state
    state = run(state, "R F 52:34:56:00:12:55 10.0.0.5").state
    assert state.find(1, "52:34:56:00:12:55").zone == 2
    zones = [mb.zone for mb in state.middleboxes]
    assert len(zones) == len(set(zones))


def test_zones_saved_per_switch_are_renumbered_once_and_unique_states_are_kept():
    from mbvisor.controller.model import Middlebox, unique_zones
    clashing = State.of([Middlebox(1, 1, MAC, 1), Middlebox(2, 1, MAC, 1), Middlebox(2, 2, MAC2, 2),
                         Middlebox(3, 1, MAC3, 0)])
    fixed = unique_zones(clashing)
    zones = [mb.zone for mb in fixed.middleboxes]
    assert len(set(zones)) == 4 and all(0 < z <= 0x7FFF for z in zones)
    assert fixed.find(1, MAC).zone == 1 and fixed.find(2, MAC2).zone == 2  # the first holder keeps its zone
    assert unique_zones(fixed) is fixed


def test_registering_more_services_keeps_the_zone():
    state = run_all(f"R F {MAC2} 10.0.0.2", f"R F {MAC} 10.0.0.1", f"R L {MAC} 10.0.0.1 0 * 10.0.0.5",
                    f"A {MAC} I 4 s 10.0.0.0/8")
    assert state.find(1, MAC).zone == 2


# --- properties over command sequences ----------------------------------------------------

SWITCH_MACS = [MAC, MAC2, MAC3]
BINDINGS = [Binding(1, 5), Binding(1, 6), Binding(2, 5)]


@st.composite
def commands(draw):
    mac = draw(st.sampled_from(SWITCH_MACS))
    return draw(st.sampled_from([
        f"R F {mac} 10.0.0.1",
        f"R F {mac} 10.0.0.2",
        f"R L {mac} 10.0.0.1 0 * 10.0.1.{draw(st.integers(1, 4))}",
        f"R L {mac} 10.0.0.1 1 10.{draw(st.integers(1, 3))}.0.0/16 10.0.1.{draw(st.integers(1, 4))}",
        f"R L {mac} 10.0.0.3 0 * 10.0.1.1,10.0.1.2",
        f"A {mac} I 4 s 10.{draw(st.integers(0, 3))}.0.0/16",
        f"A {mac} T 9 d {draw(st.integers(1, 3))} p tcp",
        f"A {mac} M 8 d {draw(st.sampled_from(SWITCH_MACS))}",
        f"D {mac} I 4 s 10.{draw(st.integers(0, 3))}.0.0/16",
        f"D {mac} I 4 s",
        f"X {mac}",
        f"X {mac} L *",
        f"X {mac} L 10.{draw(st.integers(1, 3))}.0.0/16",
        f"I {mac}",
        f"T {mac}",
        f"M {mac}",
    ]))


def check_invariants(state: State) -> None:
    keys = [mb.key for mb in state.middleboxes]
    assert keys == sorted(set(keys))
    for dpid in {mb.dpid for mb in state.middleboxes}:
        on = state.on(dpid)
        assert len({mb.zone for mb in on}) == len(on)
        for mb in on:
            assert len(mb.filters) <= state.limits.filters
            assert len(mb.redirects) <= state.limits.redirects
            assert not mb.filters or mb.firewall_ip is not None
            assert (mb.balancer_ip is None) == (not mb.redirects)  # the address goes with the last redirect
            assert mb.firewall_ip is not None or mb.redirects  # a middlebox offloads something
            assert len({r.source for r in mb.redirects}) == len(mb.redirects)
            for f in mb.filters:
                assert f.layer is not Layer.MAC or f.destination in (None, mb.mac)
            others = {b for o in on if o.mac != mb.mac for r in o.redirects for b in r.backends}
            assert not others & {b for r in mb.redirects for b in r.backends}


@FAST
@given(st.lists(st.tuples(st.sampled_from(BINDINGS), commands()), max_size=25),
       st.integers(1, 3), st.integers(1, 3))
def test_any_command_sequence_keeps_the_invariants(steps, max_filters, max_redirects):
    state = State(limits=Limits(filters=max_filters, redirects=max_redirects))
    for binding, text in steps:
        before = copy.deepcopy(state)
        command = parse_command(text)
        try:
            outcome = apply(state, binding, command)
        except ApplyError as error:
            assert error.code in {"already-registered", "not-registered", "no-such-filter", "limit", "address-in-use",
                                  "foreign-destination", "port-conflict", "backend-in-use"}
            assert state == before  # a rejected command leaves the state exactly as it was
            continue
        assert state == before  # apply never mutates its input
        if text[0] in "IMT":
            assert outcome.state == state
        if text[0] in "RA":
            # Registering and adding are idempotent.
            assert apply(outcome.state, binding, command).state == outcome.state
        state = outcome.state
        check_invariants(state)


@FAST
@given(st.lists(st.tuples(st.sampled_from(BINDINGS), commands()), max_size=25), st.integers(1, 3))
def test_a_job_folded_into_one_draft_ends_where_command_by_command_does(steps, max_filters):
    """The controller plans a job in one Draft and makes one state at the end: every
    answer, every refusal and the final state are those of applying each command to the
    state the previous one left (zones included: the draft's zone set is only read when a
    registration needs it, as in the controller)."""
    start = run_all(f"R F {MAC} 10.9.9.9", f"R F {MAC2} 10.9.9.8", state=State(limits=Limits(filters=max_filters)),
                    binding=Binding(dpid=1, port=5))
    state, draft = start, Draft(start)
    for binding, text in steps:
        command = parse_command(text)
        try:
            expected = apply(state, binding, command)
        except ApplyError as error:
            with pytest.raises(ApplyError) as raised:
                decide(draft, binding, command)
            assert raised.value.code == error.code
            continue
        outcome = decide(draft, binding, command)
        assert outcome.text == expected.text
        draft.record(outcome)
        state = expected.state
        assert draft.on(1) == state.on(1)
    assert draft.state() == state and draft.zones == set(state.zones)
    unchanged = [key for key in start.by_key if key in state.by_key and start.by_key[key] is state.by_key[key]]
    assert all(draft.state().by_key[key] is start.by_key[key] for key in unchanged)  # shared, not copied


@FAST
@given(st.lists(st.tuples(st.sampled_from(BINDINGS), commands()), max_size=25), st.integers(1, 3))
def test_what_a_draft_says_a_job_added_is_all_that_changed(steps, max_filters):
    """Draft.added: each middlebox it names is the base's with exactly those filters more
    (its flows and rows are made for them alone); a job that adds filters to a middlebox
    and changes it no other way names it."""
    start = run_all(f"R F {MAC} 10.9.9.9", f"R F {MAC2} 10.9.9.8", state=State(limits=Limits(filters=max_filters)),
                    binding=Binding(dpid=1, port=5))
    draft, letters = Draft(start), {}
    for binding, text in steps:
        try:
            outcome = decide(draft, binding, parse_command(text))
        except ApplyError:
            continue
        draft.record(outcome)
        if outcome.key is not None:
            letters.setdefault(outcome.key, set()).add(text[0])
    after = draft.state()
    for key, added in draft.added.items():
        before, now = start.by_key[key], after.by_key[key]
        assert added and not added & before.filters and now.filters == before.filters | added
        assert replace(before, filters=now.filters) == now
    assert {key for key, seen in letters.items() if seen == {"A"}} == set(draft.added)


def test_a_middlebox_cancelled_and_registered_again_in_one_draft_gets_the_zone_apply_gives():
    here = Binding(dpid=1, port=5)
    state = run_all(f"R F {MAC} 10.0.0.1", f"R F {MAC2} 10.0.0.2")
    texts = [f"X {MAC}", f"R F {MAC} 10.0.0.1"]
    draft = Draft(state)
    for text in texts:
        draft.record(decide(draft, here, parse_command(text)))
    assert draft.state() == run_all(*texts, state=state)


def folded_and_applied(state: State, steps) -> tuple[tuple, tuple]:
    """Each command's answer (or refusal code) and the state at the end: folded into one
    Draft with nothing read in between (its added filters grow in place), and applied
    command by command.  ``steps``: command texts from HERE, or (binding, text) pairs."""
    steps = [step if isinstance(step, tuple) else (HERE, step) for step in steps]
    draft, folded = Draft(state), []
    for binding, text in steps:
        try:
            outcome = decide(draft, binding, parse_command(text))
        except ApplyError as error:
            folded.append(error.code)
            continue
        draft.record(outcome)
        folded.append(outcome.text)
    applied = []
    for binding, text in steps:
        try:
            result = run(state, text, binding)
        except ApplyError as error:
            applied.append(error.code)
            continue
        state = result.state
        applied.append(result.text)
    return (folded, draft.state()), (applied, state)


@pytest.mark.parametrize("texts, answers, filters", [
    ([f"A {MAC} I 4 s 10.1.0.0/16", f"A {MAC} I 4 s 10.1.0.0/16"],
     [f"added: A {MAC} I 4 s 10.1.0.0/16", f"filter already present: A {MAC} I 4 s 10.1.0.0/16"], {"10.1.0.0/16"}),
    ([f"A {MAC} I 4 s 10.{n}.0.0/16" for n in range(1, 5)],
     [f"added: A {MAC} I 4 s 10.{n}.0.0/16" for n in range(1, 4)] + ["limit"], {"10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"}),
    ([f"A {MAC} I 4 s 10.1.0.0/16", f"A {MAC} I 4 s 10.2.0.0/16", f"D {MAC} I 4 s 10.1.0.0/16",
      f"A {MAC} I 4 s 10.3.0.0/16", f"D {MAC} I 4 s 10.1.0.0/16"],
     [f"added: A {MAC} I 4 s 10.1.0.0/16", f"added: A {MAC} I 4 s 10.2.0.0/16", f"deleted: D {MAC} I 4 s 10.1.0.0/16",
      f"added: A {MAC} I 4 s 10.3.0.0/16", "no-such-filter"], {"10.2.0.0/16", "10.3.0.0/16"}),
    ([f"A {MAC} I 4 s 10.1.0.0/16", f"X {MAC}", f"A {MAC} I 4 s 10.2.0.0/16", f"R F {MAC} 10.0.0.1",
      f"A {MAC} I 4 s 10.3.0.0/16"],
     [f"added: A {MAC} I 4 s 10.1.0.0/16", f"cancelled {MAC}: every offload removed", "not-registered",
      f"registered {MAC} 10.0.0.1 for firewall offload", f"added: A {MAC} I 4 s 10.3.0.0/16"], {"10.3.0.0/16"}),
    ([f"A {MAC} I 4 s 10.1.0.0/16", f"R F {MAC} 10.0.0.1", f"A {MAC} I 4 s 10.2.0.0/16", f"I {MAC}",
      f"A {MAC} I 4 s 10.1.0.0/16"],
     [f"added: A {MAC} I 4 s 10.1.0.0/16", f"registered {MAC} 10.0.0.1 for firewall offload",
      f"added: A {MAC} I 4 s 10.2.0.0/16", f"A {MAC} I 4 s 10.1.0.0/16\nA {MAC} I 4 s 10.2.0.0/16",
      f"filter already present: A {MAC} I 4 s 10.1.0.0/16"], {"10.1.0.0/16", "10.2.0.0/16"}),
], ids=["duplicate", "limit-mid-job", "add-then-delete", "add-to-a-cancelled-one", "register-and-query-between"])
def test_filters_a_job_adds_in_place_answer_and_end_as_one_by_one(texts, answers, filters):
    start = run_all(f"R F {MAC} 10.0.0.1", f"R F {MAC2} 10.0.0.2", state=State(limits=Limits(filters=3)))
    folded, applied = folded_and_applied(start, texts)
    assert folded == applied
    assert folded[0] == answers
    assert {f.source for f in folded[1].find(1, MAC).filters} == filters
    assert folded[1].by_key[(1, MAC2)] is start.by_key[(1, MAC2)]


def test_a_job_adding_to_two_middleboxes_in_turn_settles_each_once():
    """Reads between adds (a registration walks the switch's middleboxes) see every filter
    added so far; the growing sets are frozen, and the state holds only frozen sets."""
    start = run_all(f"R F {MAC} 10.0.0.1", f"R F {MAC2} 10.0.0.2")
    texts = [f"A {mac} I 4 s 10.{n}.0.0/16" for n in range(6) for mac in (MAC, MAC2)]
    texts[5:5] = [f"R F {MAC3} 10.0.0.3"]
    folded, applied = folded_and_applied(start, texts)
    assert folded == applied
    assert all(type(mb.filters) is frozenset and len(mb.filters) == 6 for mb in folded[1].middleboxes if mb.mac != MAC3)


@st.composite
def job_commands(draw):
    """Mostly adds, to two middleboxes of one port: runs of adds to one middlebox, and
    everything that reads or changes it in between."""
    mac, n = draw(st.sampled_from([MAC, MAC2])), draw(st.integers(0, 3))
    add = f"A {mac} I 4 s 10.{n}.0.0/16"
    return draw(st.sampled_from([add, add, add, f"A {mac} M 4 s 02:00:00:00:00:0{n}", f"D {mac} I 4 s 10.{n}.0.0/16",
                                 f"D {mac} I 4 s", f"X {mac}", f"R F {mac} 10.9.9.{n}", f"I {mac}"]))


@settings(max_examples=150, deadline=None)
@given(st.lists(job_commands(), max_size=30), st.integers(1, 4))
def test_a_job_read_only_by_its_commands_ends_where_command_by_command_does(texts, max_filters):
    """As above, without reading the draft between commands: added filters stay in their
    growing sets until a command other than an add reads the middlebox."""
    start = run_all(f"R F {MAC} 10.9.9.9", f"R F {MAC2} 10.9.9.8", state=State(limits=Limits(filters=max_filters)))
    folded, applied = folded_and_applied(start, texts)
    assert folded == applied
    assert all(type(mb.filters) is frozenset for mb in folded[1].middleboxes)


def test_a_draft_without_changes_is_the_state_it_started_from():
    state = run_all(f"R F {MAC} 10.0.0.5")
    draft = Draft(state)
    draft.record(decide(draft, HERE, parse_command(f"I {MAC}")))
    assert draft.state() is state


@pytest.mark.parametrize("mac", ["00:00:00:00:00:00", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff"])
def test_only_a_unicast_mac_can_be_a_middlebox(mac):
    with pytest.raises(ApplyError) as raised:
        run(State(), f"R F {mac} 10.0.0.5")
    assert raised.value.code == "bad-mac" and "not a unicast MAC" in str(raised.value)


@pytest.mark.parametrize("redirects, filters", [(0, 10), (257, 10), (10, 0)])
def test_limits_that_the_flow_layout_cannot_hold_are_refused(redirects, filters):
    with pytest.raises(ValueError):
        Limits(filters=filters, redirects=redirects)
