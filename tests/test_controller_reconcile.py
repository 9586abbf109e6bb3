"""Unit tests of the reconciler: the difference between desired and installed flows/groups."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.controller.flows import (Flow, Group, Neighbour, Surroundings, SwitchConfig, base_config, compile_switch,
                                      cookie_of)
from mbvisor.controller.pipeline import COOKIE_TAG
from mbvisor.controller.model import Binding, State, apply
from mbvisor.controller.reconcile import Changes, ours, reconcile, same_flow
from mbvisor.controller.filters import compile_filters
from mbvisor.controller.stepping import STEP
from mbvisor.guest.grammar import parse_command

FAST = settings(max_examples=60, deadline=None)

MAC = "52:34:56:00:12:22"
COOKIE = cookie_of(MAC)
FOREIGN = 0x1234  # another application's cookie
DROP = ()
NORMAL = (("normal",),)


def flow(priority: int, actions=DROP, cookie: int = COOKIE, table: int = 0, **match) -> Flow:
    return Flow(table, priority, tuple(sorted(match.items())), actions, cookie)


def config(flows=(), groups=()) -> SwitchConfig:
    return SwitchConfig(frozenset(flows), frozenset(groups))


A = flow(3000, eth_dst=MAC, ip_proto=6)
B = flow(3000, eth_dst=MAC, ip_proto=17)
C = flow(2000, eth_dst=MAC, ipv4_dst="10.0.0.1", actions=(("ct_nat", 1, 1),))
G1 = Group(256, ((("output", 1),), (("output", 2),)))
G2 = Group(257, ((("output", 3),),))


def test_nothing_to_do_when_the_switch_holds_the_desired_state():
    changes = reconcile(config([A, B, C], [G1, G2]), [C, B, A], [G2, G1])
    assert changes == Changes()
    assert changes.empty
    assert changes.summary() == "+0 ~0 -0 flows, +0 ~0 -0 groups"


def test_missing_flows_are_added_and_unwanted_ones_deleted():
    changes = reconcile(config([A, B]), [B, C], [])
    assert changes.add_flows == (A,)
    assert changes.delete_flows == (C,)
    assert changes.modify_flows == ()
    assert not changes.empty
    assert changes.summary() == "+1 ~0 -1 flows, +0 ~0 -0 groups"


def test_a_flow_with_other_actions_is_modified_not_replaced():
    installed = flow(3000, eth_dst=MAC, ip_proto=6, actions=NORMAL)
    changes = reconcile(config([A]), [installed], [])
    assert changes.modify_flows == (A,)  # the desired version is sent
    assert changes.add_flows == () and changes.delete_flows == ()


def test_a_flow_with_another_mbvisor_cookie_is_modified():
    installed = flow(3000, eth_dst=MAC, ip_proto=6, cookie=cookie_of("52:34:56:00:12:33"))
    changes = reconcile(config([A]), [installed], [])
    assert changes.modify_flows == (A,)
    assert changes.add_flows == () and changes.delete_flows == ()


def test_flows_of_other_applications_are_never_touched():
    theirs = flow(3000, eth_dst=MAC, ip_proto=6, cookie=FOREIGN, actions=NORMAL)  # same identity as A
    unrelated = flow(100, cookie=0, in_port=3, actions=NORMAL)
    changes = reconcile(config([A]), [theirs, unrelated], [])
    assert changes.delete_flows == ()
    assert changes.modify_flows == ()
    assert changes.add_flows == (A,)
    assert not ours(theirs) and not ours(unrelated) and ours(A)


def test_ours_looks_only_at_the_cookie_tag():
    assert ours(flow(0, cookie=COOKIE_TAG))
    assert ours(flow(0, cookie=COOKIE_TAG | 0xFFFFFFFFFFFF))
    assert not ours(flow(0, cookie=(COOKIE_TAG ^ (1 << 63)) | 0x1234))
    assert not ours(flow(0, cookie=0))


def test_flows_are_identified_by_table_priority_and_match():
    other_table = flow(3000, table=1, eth_dst=MAC, ip_proto=6)
    other_priority = flow(2999, eth_dst=MAC, ip_proto=6)
    changes = reconcile(config([A]), [other_table, other_priority], [])
    assert changes.add_flows == (A,)
    assert set(changes.delete_flows) == {other_table, other_priority}


def test_groups_add_modify_and_delete_when_no_managed_set_is_given():
    changed = Group(256, ((("output", 9),),))
    stale = Group(999, ())
    changes = reconcile(config([], [G1, G2]), [], [changed, stale])
    assert changes.add_groups == (G2,)
    assert changes.modify_groups == (G1,)
    assert changes.delete_groups == (999,)
    assert changes.summary() == "+0 ~0 -0 flows, +1 ~1 -1 groups"


def test_only_managed_groups_are_deleted():
    installed = [Group(i, ()) for i in (256, 300, 512, 700)]
    changes = reconcile(config([], [G1]), [], installed, managed_groups={256, 257, 300, 400})
    assert changes.delete_groups == (300,)  # 512 and 700 belong to somebody else; 400 is not there
    assert changes.modify_groups == (G1,)
    empty = reconcile(config(), [], installed, managed_groups=set())
    assert empty.delete_groups == ()


def test_custom_flow_comparator_is_used():
    installed = flow(3000, eth_dst=MAC, ip_proto=6, actions=(("wire", b"\x00\x01"),))
    calls = []

    def same(want, have):
        calls.append((want, have))
        return have.actions == (("wire", b"\x00\x01"),)

    assert reconcile(config([A]), [installed], [], same=same).empty
    assert calls == [(A, installed)]
    assert reconcile(config([A]), [installed], [], same=lambda want, have: False).modify_flows == (A,)
    assert reconcile(config([A]), [A], [], same=lambda want, have: False).modify_flows == (A,)
    # The default compares actions and cookie.
    assert same_flow(A, A) and not same_flow(A, installed)


def test_custom_group_comparator_is_used():
    placeholder = Group(256, ())  # the shell only knows ids, and compares wire encodings itself
    assert reconcile(config([], [G1]), [], [placeholder], same_group=lambda want, have: True).empty
    assert reconcile(config([], [G1]), [], [placeholder]).modify_groups == (G1,)
    calls = []
    reconcile(config([], [G1]), [], [placeholder], same_group=lambda w, h: calls.append((w, h)) or True)
    assert calls == [(G1, placeholder)]


def test_changes_name_each_flow_once_whatever_the_order_of_the_desired_set():
    many = [flow(3000, eth_dst=MAC, tcp_dst=port) for port in range(30)]
    mixed = [flow(3000, eth_dst=MAC, eth_type=0x800, ipv4_src=source) for source in
             ("10.0.0.1", ("10.0.0.0", "255.0.0.0"), "10.0.0.2", ("10.1.0.0", "255.255.0.0"), "9.9.9.9")]
    for order in (many + mixed, (many + mixed)[::-1]):
        changes = reconcile(config(order), [], [])
        assert sorted(map(str, changes.add_flows)) == sorted(map(str, many + mixed))
    groups = [Group(i, ()) for i in range(20, 0, -1)]
    assert reconcile(config([], groups), [], []).add_groups == tuple(sorted(groups))


# --- properties ---------------------------------------------------------------------------

def _apply(changes: Changes, flows: list[Flow], groups: list[Group]) -> tuple[dict, dict]:
    """What the switch holds after executing ``changes`` (flows by identity, groups by id)."""
    table = {(f.table, f.priority, f.match): f for f in flows}
    for f in changes.delete_flows:
        del table[(f.table, f.priority, f.match)]
    for f in changes.add_flows + changes.modify_flows:
        table[(f.table, f.priority, f.match)] = f
    held = {g.group_id: g for g in groups}
    for gid in changes.delete_groups:
        del held[gid]
    for g in changes.add_groups + changes.modify_groups:
        held[g.group_id] = g
    return table, held


cookies = st.sampled_from([COOKIE, cookie_of("52:34:56:00:12:33"), COOKIE_TAG])
flows_ = st.builds(lambda table, priority, port, actions, cookie: flow(priority, actions, cookie, table, tcp_dst=port),
                   st.integers(0, 2), st.sampled_from([2000, 3000]), st.integers(0, 6),
                   st.sampled_from([DROP, NORMAL, (("output", 2),)]), cookies)
foreign_flows = st.builds(lambda priority, port: flow(priority, NORMAL, FOREIGN, 0, udp_dst=port),
                          st.sampled_from([2000, 3000]), st.integers(0, 6))
groups_ = st.builds(Group, st.integers(1, 8), st.sampled_from([(), ((("output", 1),),), ((("output", 2),),)]))


def unique_by(key):
    return lambda items: list({key(i): i for i in items}.values())


flow_lists = st.lists(flows_, max_size=12).map(unique_by(lambda f: (f.table, f.priority, f.match)))
group_lists = st.lists(groups_, max_size=6).map(unique_by(lambda g: g.group_id))


@FAST
@given(flow_lists, group_lists)
def test_reconciling_with_the_desired_state_installed_changes_nothing(flows, groups):
    assert reconcile(config(flows, groups), flows, groups).empty


@FAST
@given(flow_lists, group_lists, flow_lists, group_lists,
       st.lists(foreign_flows, max_size=4).map(unique_by(lambda f: (f.table, f.priority, f.match))))
def test_applying_the_changes_yields_the_desired_state(desired_flows, desired_groups, flows, groups, foreign):
    desired = config(desired_flows, desired_groups)
    installed = flows + foreign
    changes = reconcile(desired, installed, groups)
    table, held = _apply(changes, installed, groups)
    assert {f for f in table.values() if ours(f)} == desired.flows
    assert {f for f in table.values() if not ours(f)} == set(foreign)
    assert set(held.values()) == desired.groups
    # Nothing is sent twice, and a second round has nothing left to do.
    sent = changes.add_flows + changes.modify_flows + changes.delete_flows
    assert len(sent) == len(set(sent))
    assert reconcile(desired, list(table.values()), list(held.values())).empty


@FAST
@given(group_lists, group_lists, st.sets(st.integers(1, 8)))
def test_groups_outside_the_managed_set_survive(desired_groups, groups, managed):
    changes = reconcile(config([], desired_groups), [], groups, managed_groups=managed)
    wanted = {g.group_id for g in desired_groups}
    assert set(changes.delete_groups) == {g.group_id for g in groups} & managed - wanted


def test_a_compiled_switch_reconciles_to_nothing_against_itself():
    state = State()
    for text in [f"R F {MAC} 10.0.0.100", f"A {MAC} I 4 s 10.1.0.0/16", f"A {MAC} T 12 s 1000-1999 d 80",
                 f"R L {MAC} 10.0.0.100 0 * 10.0.0.5,10.0.0.6"]:
        state = apply(state, Binding(1, 5), parse_command(text)).state
    neighbours = {"10.0.0.5": Neighbour("02:00:00:00:00:05", 7), "10.0.0.6": Neighbour("02:00:00:00:00:06", 8)}
    desired = compile_switch(state, 1, Surroundings(neighbours=neighbours))
    assert reconcile(desired, desired.flows, desired.groups).empty
    # From an empty switch everything is added; cancelling afterwards deletes all but the base.
    fresh = reconcile(desired, [], [])
    assert set(fresh.add_flows) == desired.flows and set(fresh.add_groups) == desired.groups
    gone = reconcile(base_config(), desired.flows, desired.groups)
    assert set(gone.delete_flows) == desired.flows - base_config().flows
    assert set(gone.delete_groups) == {g.group_id for g in desired.groups}


def test_reconcile_pauses_every_few_flows_read_and_answers_the_same():
    """The shell yields to other switches' work at each pause while it reconciles a
    reconnected switch; the answer is the one without pauses.  Between two pauses it reads
    at most STEP flows (1,024 held the loop 6 ms on a slow machine)."""
    desired = [flow(3000, eth_dst=MAC, ipv4_src=f"10.0.{i // 250}.{i % 250}") for i in range(2500)]
    installed = [flow(3000, eth_dst=MAC, ipv6_src=f"fd00::{i:x}") for i in range(700)]
    read = [0]

    def installed_flows():
        for each in installed:
            read[0] += 1
            yield each

    read_at_pauses = []
    changes = reconcile(config(desired), installed_flows(), [], pause=lambda: read_at_pauses.append(read[0]))
    assert changes == reconcile(config(desired), installed, [])
    assert len(changes.add_flows) == 2500 and len(changes.delete_flows) == 700 and read[0] == 700
    marks = sorted(set(read_at_pauses))
    assert marks[-1] == 700 and max(b - a for a, b in zip([0] + marks, marks)) <= STEP
    # Each side read, compared, then its identities freed a step at a time.
    assert len(read_at_pauses) == 3 * (-(-2500 // STEP) + -(-700 // STEP))


def test_compile_switch_pauses_every_few_filters_and_answers_the_same():
    """A middlebox has up to 1,000 filters: pausing only between middleboxes held the loop
    8 ms for one of 250.  The compiler of IP and MAC filters pauses every STEP filters;
    the one for a middlebox with port filters after every filter and every STEP flows."""
    state = State()
    for n in range(4):
        mac = f"52:34:56:00:13:{n:02x}"
        binding = Binding(0xA1, 10 + n)
        state = apply(state, binding, parse_command(f"R F {mac} 10.0.1.{n + 1}")).state
        texts = [f"A {mac} I 4 s 10.9.{n}.{k}" for k in range(100)]
        if n == 3:
            texts[0] = f"A {mac} T 12 s 1000-1999 d 80"
        for text in texts:
            state = apply(state, binding, parse_command(text)).state
    pauses = []
    surroundings = Surroundings()
    assert compile_switch(state, 0xA1, surroundings, lambda: pauses.append(1)) == compile_switch(state, 0xA1,
                                                                                               surroundings)
    ported = compile_filters(state.find(0xA1, "52:34:56:00:13:03"), frozenset(["10.0.1.4"]))
    assert len(pauses) == 3 * -(-100 // STEP) + 100 + -(-len(ported) // STEP) + 4  # and one after each middlebox


def test_port_ranges_are_compiled_with_a_pause_every_few_flows():
    """One port range makes tens of flows (250 of them 7,600, held 16-31 ms between two
    pauses of every 32 filters): compile_filters pauses after each filter, and every STEP
    flows it makes of them."""
    state = State()
    mac = "52:34:56:00:14:01"
    state = apply(state, Binding(0xA1, 10), parse_command(f"R F {mac} 10.0.1.1")).state
    for k in range(12):
        state = apply(state, Binding(0xA1, 10), parse_command(f"A {mac} T 12 s {1000 + k}-{1999 + k} d 80")).state
    middlebox = state.find(0xA1, mac)
    made = []
    flows = compile_filters(middlebox, frozenset(["10.0.1.1"]), lambda: made.append(1))
    assert flows == compile_filters(middlebox, frozenset(["10.0.1.1"]))
    assert len(flows) > 12 * STEP // 2 and len(made) == 12 + -(-len(flows) // STEP)
