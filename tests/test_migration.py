"""A middlebox that follows its VM to another hypervisor (controller/migration.py): the
pure pairing of twins, and the shell on two fake switches that apply the real encoded
messages, one controller.  The sequence is QEMU's: the destination's port is plugged and
annotated while the source runs, commands keep coming from the side that runs the guest,
then the source's port goes.

Tried from the side that would abuse it: another tenant's or another VM's port with the
same MAC, an unannotated (lab) port, a copy that arrives after the VM left again."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakeswitch import FakeSwitch, wait_until
from mbvisor.controller.flows import cookie_of
from mbvisor.controller.migration import (Copy, adopted, arrivals, compact, copies_after, identity_of, twin_ports,
                                          with_change)
from mbvisor.controller.model import Middlebox, State
from mbvisor.controller.pipeline import OFFLOAD_TABLE
from mbvisor.controller.requests import CommandRequest
from mbvisor.controller.service import Controller, Settings
from mbvisor.controller.store import Store
from mbvisor.controller.trust import PortIdentity, build_inventory
from mbvisor.guest.grammar import parse_command

SOURCE, DESTINATION, ELSEWHERE = 0xA1, 0xB2, 0xC3
MAC = "02:00:00:00:00:02"
ON_SOURCE = PortIdentity(2, MAC, "red", "fw-1", ("10.0.0.2",), "tap-fw1-a")
ON_DESTINATION = PortIdentity(7, MAC, "red", "fw-1", ("10.0.0.2",), "tap-fw1-b")
ATTACKER = dict(eth_dst=MAC, eth_src="02:00:00:00:00:66", eth_type=0x0800, ipv4_src="10.66.0.1",
                ipv4_dst="10.0.0.2", ip_proto=17)


def firewall(dpid=SOURCE, port=2, zone=1, sources=("10.66.0.0/16",)) -> Middlebox:
    filters = frozenset(parse_command(f"A {MAC} I 4 s {s}").filter for s in sources)
    return Middlebox(dpid, port, MAC, zone, "10.0.0.2", None, filters)


# --- the pure pairing ------------------------------------------------------------------

def test_twins_are_the_same_vm_tenant_and_mac_annotated_on_two_switches():
    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([ON_DESTINATION])}
    assert identity_of(firewall(), seen[SOURCE]) == ON_SOURCE
    assert twin_ports(ON_SOURCE, SOURCE, seen) == [(DESTINATION, 7)]
    state = State.of([firewall()])
    assert arrivals(state, seen, DESTINATION) == [
        Copy(DESTINATION, (SOURCE, MAC), False, (None, state.find(SOURCE, MAC)), ("fw-1", "red"))]
    assert arrivals(state, seen, SOURCE) == []  # the source holds its own


@pytest.mark.parametrize("impostor", [
    PortIdentity(7, MAC, "blue", "fw-1", ("10.0.0.2",), "tap-x"),   # another tenant
    PortIdentity(7, MAC, "red", "fw-2", ("10.0.0.2",), "tap-x"),    # another VM of the tenant
    PortIdentity(7, MAC, "red", "", ("10.0.0.2",), "tap-x"),        # no VM named
    PortIdentity(7, "02:00:00:00:00:99", "red", "fw-1", (), "tap-x"),  # the VM's other NIC
])
def test_no_port_that_is_not_the_same_vm_gets_a_copy(impostor):
    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([impostor])}
    state = State.of([firewall()])
    assert twin_ports(ON_SOURCE, SOURCE, seen) == []
    assert arrivals(state, seen, DESTINATION) == []
    assert adopted(state, seen, DESTINATION, (SOURCE, MAC), set()) is state


def test_a_middlebox_whose_port_names_no_vm_has_no_twin():
    unnamed = PortIdentity(2, MAC, "red", "", ("10.0.0.2",), "tap-fw1-a")
    seen = {SOURCE: build_inventory([unnamed]), DESTINATION: build_inventory([ON_DESTINATION])}
    assert identity_of(firewall(), seen[SOURCE]) is None
    assert arrivals(State.of([firewall()]), seen, DESTINATION) == []
    lab = {SOURCE: build_inventory([]), DESTINATION: build_inventory([ON_DESTINATION])}
    assert arrivals(State.of([firewall()]), lab, DESTINATION) == []


def test_a_copy_has_the_destinations_port_and_a_zone_of_its_own_and_keeps_it():
    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([ON_DESTINATION])}
    state = State.of([firewall(zone=1), firewall(dpid=ELSEWHERE, port=3, zone=2)])
    after = adopted(state, seen, DESTINATION, (SOURCE, MAC), state.zones)
    copy = after.find(DESTINATION, MAC)
    assert (copy.port, copy.zone) == (7, 3) and copy.filters == firewall().filters
    grown = after.put(firewall(sources=("10.66.0.0/16", "10.77.0.0/16")))
    again = adopted(grown, seen, DESTINATION, (SOURCE, MAC), grown.zones)
    assert again.find(DESTINATION, MAC).zone == 3 and len(again.find(DESTINATION, MAC).filters) == 2
    assert adopted(again, seen, DESTINATION, (SOURCE, MAC), again.zones) is again  # nothing to do twice


def test_a_cancelled_origin_takes_the_copy_away_one_that_left_does_not():
    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([ON_DESTINATION])}
    state = adopted(State.of([firewall()]), seen, DESTINATION, (SOURCE, MAC), {1})
    gone = state.remove(SOURCE, MAC)
    assert adopted(gone, seen, DESTINATION, (SOURCE, MAC), set(), cancelled=True).find(DESTINATION, MAC) is None
    assert adopted(gone, seen, DESTINATION, (SOURCE, MAC), set()) is gone  # its port went: the copy stays
    left = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([])}  # the VM went meanwhile
    assert adopted(State.of([firewall()]), left, DESTINATION, (SOURCE, MAC), set()).find(DESTINATION, MAC) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["grow", "shrink", "cancel", "register"]), max_size=12))
def test_after_any_changes_at_the_origin_one_adoption_makes_the_copy_equal(changes):
    """Whatever happened at the source since the last copy, one adoption brings the
    destination to it (but for port and zone), or removes it if the source is gone."""
    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([ON_DESTINATION])}
    state = adopted(State.of([firewall()]), seen, DESTINATION, (SOURCE, MAC), {1})
    sources = ["10.66.0.0/16"]
    for change in changes:
        if change == "grow":
            sources.append(f"10.{70 + len(sources)}.0.0/16")
        elif change == "shrink" and sources:
            sources.pop()
        if change == "cancel":
            state = state.remove(SOURCE, MAC)
        else:
            state = state.put(firewall(sources=tuple(sources)))
        state = adopted(state, seen, DESTINATION, (SOURCE, MAC), state.zones, cancelled=change == "cancel")
        source, copy = state.find(SOURCE, MAC), state.find(DESTINATION, MAC)
        if source is None:
            assert copy is None
        else:
            assert copy is not None and copy.filters == source.filters and copy.port == 7
            assert copy.zone != source.zone


# --- the shell: one controller, two hypervisors ------------------------------------------

def two_hypervisors(database, ports=(1, 2, 7)):
    """A controller on ``database`` and the source's and destination's fake switches,
    connected and reconciled."""
    service = Controller(Settings(database=database, audit_interval=0, backend_check_interval=0))
    fakes = {}
    for dpid in (SOURCE, DESTINATION):
        fakes[dpid] = FakeSwitch(dpid, ports=ports, sink=lambda m, s=service: _deliver(s, m))
        service.switch_connected(fakes[dpid].datapath)
        wait_until(lambda d=dpid: service.reconcilers[d].synced, what=f"switch {dpid:x} reconciled")
    return service, fakes


@pytest.fixture
def hypervisors(tmp_path):
    service, fakes = two_hypervisors(tmp_path / "controller.sqlite")
    yield service, fakes
    service.close()
    for fake in fakes.values():
        fake.close()


def _deliver(service: Controller, message) -> None:
    name = type(message).__name__
    if name == "OFPSwitchFeatures":
        service.switch_connected(message.datapath)
    elif name == "OFPPortStatus" and message.reason == message.datapath.ofproto.OFPPR_DELETE:
        service.port_deleted(message.datapath.id, message.desc.port_no)
    elif name == "OFPPortStatus" and message.reason == message.datapath.ofproto.OFPPR_ADD:
        service.port_added(message.datapath.id, message.desc.port_no)
    else:
        service.receive(message)


def _ok(service, dpid, port, text):
    answer = service.execute(CommandRequest(dpid, port, text))
    assert answer.status == "OK", answer
    return answer


def _drops(fake) -> bool:
    return fake.trace(1, **ATTACKER).verdict == "drop"


def _offloads(fake) -> list:
    return [f for f in fake.flows(OFFLOAD_TABLE) if f.cookie == cookie_of(MAC)]


def test_the_offloads_follow_the_vm_and_are_in_place_before_it_resumes(hypervisors):
    service, fakes = hypervisors
    service.set_inventory(SOURCE, [ON_SOURCE])
    _ok(service, SOURCE, 2, f"R F {MAC} 10.0.0.2")
    _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.66.0.0/16")
    assert _drops(fakes[SOURCE]) and not _drops(fakes[DESTINATION])
    # QEMU's destination is plugged and annotated while the source runs: both hold it.
    service.set_inventory(DESTINATION, [ON_DESTINATION])
    wait_until(lambda: _drops(fakes[DESTINATION]), what="the copy's flows on the destination")
    assert _drops(fakes[SOURCE])
    copy = service.state.find(DESTINATION, MAC)
    assert copy.port == 7 and copy.zone != service.state.find(SOURCE, MAC).zone
    # A command from the running source reaches both.
    _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.77.0.0/16")
    wait_until(lambda: len(service.state.find(DESTINATION, MAC).filters) == 2, what="the copy to follow")
    wait_until(lambda: fakes[DESTINATION].trace(1, **{**ATTACKER, "ipv4_src": "10.77.0.1"}).verdict == "drop",
               what="the new filter on the destination")
    # The source's port goes (QEMU's source ends): its entry is retired, the copy stays.
    fakes[SOURCE].remove_port(2)
    wait_until(lambda: service.state.find(SOURCE, MAC) is None and not _offloads(fakes[SOURCE]),
               what="the source's offloads removed")
    assert _drops(fakes[DESTINATION])
    # The guest, now on the destination, goes on: its commands change the one it has.
    _ok(service, DESTINATION, 7, f"D {MAC} I 4 s 10.66.0.0/16")
    wait_until(lambda: not _drops(fakes[DESTINATION]), what="the deleted filter gone from the destination")
    assert service.state.find(SOURCE, MAC) is None  # no copy back to a port that is gone
    stored = Store(service.settings.database).load(service.state.limits)
    assert stored.find(DESTINATION, MAC) == service.state.find(DESTINATION, MAC)


def test_a_guests_cancel_on_either_side_removes_both(hypervisors):
    service, fakes = hypervisors
    service.set_inventory(SOURCE, [ON_SOURCE])
    service.set_inventory(DESTINATION, [ON_DESTINATION])
    _ok(service, SOURCE, 2, f"R F {MAC} 10.0.0.2")
    _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.66.0.0/16")
    wait_until(lambda: _drops(fakes[DESTINATION]), what="the copy")
    cancel = service.execute(CommandRequest(DESTINATION, 7, f"X {MAC}", f"fw-1/{MAC}", 1, 1024))
    assert cancel.status == "OK"
    wait_until(lambda: service.state.find(SOURCE, MAC) is None and not _offloads(fakes[SOURCE]),
               what="the cancel to reach the source")
    assert not _offloads(fakes[DESTINATION])


def test_the_source_agents_delete_of_the_departed_vm_leaves_the_destination_its_offloads(hypervisors):
    """The agent on the source deletes the offloads of a VM that left its host (a request
    without a guest's key); it may come before the port-status: only the source's go."""
    service, fakes = hypervisors
    service.set_inventory(SOURCE, [ON_SOURCE])
    service.set_inventory(DESTINATION, [ON_DESTINATION])
    _ok(service, SOURCE, 2, f"R F {MAC} 10.0.0.2")
    _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.66.0.0/16")
    wait_until(lambda: _drops(fakes[DESTINATION]), what="the copy")
    assert service.delete_middlebox(SOURCE, MAC).status == "OK"
    reconciler = service.reconcilers[DESTINATION]
    wait_until(lambda: not reconciler.jobs and not _offloads(fakes[SOURCE]), what="the source's removal")
    assert service.state.find(DESTINATION, MAC) is not None and _drops(fakes[DESTINATION])


def test_another_tenants_port_with_the_same_mac_gets_nothing(hypervisors):
    service, fakes = hypervisors
    service.set_inventory(SOURCE, [ON_SOURCE])
    _ok(service, SOURCE, 2, f"R F {MAC} 10.0.0.2")
    _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.66.0.0/16")
    service.set_inventory(DESTINATION, [PortIdentity(7, MAC, "blue", "fw-1", ("10.0.0.2",), "tap-evil")])
    _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.77.0.0/16")  # a job whose mirroring would find no twin
    reconciler = service.reconcilers[DESTINATION]
    wait_until(lambda: not reconciler.jobs, what="the destination's queue to drain")
    assert service.state.find(DESTINATION, MAC) is None and not _offloads(fakes[DESTINATION])


def test_a_destination_that_never_connected_gets_the_copy_when_it_connects(tmp_path):
    service = Controller(Settings(database=tmp_path / "controller.sqlite", audit_interval=0,
                                  backend_check_interval=0))
    source = FakeSwitch(SOURCE, ports=(1, 2), sink=lambda m: _deliver(service, m))
    try:
        service.switch_connected(source.datapath)
        wait_until(lambda: service.reconcilers[SOURCE].synced, what="source reconciled")
        service.set_inventory(SOURCE, [ON_SOURCE])
        _ok(service, SOURCE, 2, f"R F {MAC} 10.0.0.2")
        _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.66.0.0/16")
        service.set_inventory(DESTINATION, [ON_DESTINATION])  # its agent speaks before its switch connects
        assert service.state.find(DESTINATION, MAC) is not None and DESTINATION not in service.reconcilers
        with FakeSwitch(DESTINATION, ports=(1, 7), sink=lambda m: _deliver(service, m)) as destination:
            service.switch_connected(destination.datapath)
            wait_until(lambda: _drops(destination), what="the copy installed by the first reconciliation")
    finally:
        service.close()
        source.close()


@settings(max_examples=80, deadline=None)
@given(st.sets(st.integers(0, 20), max_size=8), st.sets(st.integers(0, 20), max_size=8),
       st.sets(st.integers(0, 20), max_size=8), st.sets(st.integers(0, 20), max_size=8))
def test_changes_confirmed_on_both_sides_each_reach_the_other_and_neither_is_lost(base, mine, theirs, gone):
    """Around a switchover each side may confirm a job before the other's copy arrives:
    each side then applies the other's change (with_change), and both end equal, holding
    what either job added (an add of a filter present already changed nothing) and
    neither removed."""
    def mb(numbers, dpid=SOURCE, port=2, zone=1):
        return firewall(dpid, port, zone, tuple(f"10.{n}.0.0/16" for n in sorted(numbers)))

    start = base | gone
    source_before, source_after = mb(start), mb((start - gone) | mine)  # the source's job
    twin_before, twin_after = mb(start, DESTINATION, 7, 2), mb(start | theirs, DESTINATION, 7, 2)  # the destination's
    source_final = with_change(source_after, twin_before, twin_after)
    twin_final = with_change(twin_after, source_before, source_after)
    assert source_final.filters == twin_final.filters
    expected = mb((start - gone) | mine | (theirs - start)).filters
    assert source_final.filters == expected
    assert (twin_final.port, twin_final.zone) == (7, 2)


@settings(max_examples=80, deadline=None)
@given(st.sets(st.integers(0, 20), max_size=8), st.sets(st.integers(0, 20), max_size=8),
       st.sets(st.integers(0, 20), max_size=8), st.sampled_from(["change", "new", "cancel"]), st.booleans())
def test_a_compact_change_adopts_exactly_as_the_whole_one(current, before, after, kind, origin_gone):
    """A stored copy keeps only what ``adopted`` reads of its change (``compact``): the
    filters the job removed and added, a new middlebox whole, or that it was cancelled.
    Adopting it gives the state the whole change gives, whatever the twin holds meanwhile,
    the origin still there or gone since."""
    def mb(numbers, dpid=SOURCE, port=2, zone=1):
        return firewall(dpid, port, zone, tuple(f"10.{n}.0.0/16" for n in sorted(numbers)))

    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([ON_DESTINATION])}
    origin = None if kind == "cancel" else mb(after)
    change = (None if kind == "new" else mb(before), origin)
    state = State.of([mb(current, DESTINATION, 7, 2)] + ([origin] if origin and not origin_gone else []))
    vm = ("fw-1", "red")
    whole = adopted(state, seen, DESTINATION, (SOURCE, MAC), {1, 2}, kind == "cancel", change, vm)
    stored = adopted(state, seen, DESTINATION, (SOURCE, MAC), {1, 2}, kind == "cancel", compact(change), vm)
    assert stored == whole
    if kind == "change":
        removed, added = compact(change)
        assert removed.filters == mb(before).filters - mb(after).filters
        assert added.filters == mb(after).filters - mb(before).filters


def test_a_confirmed_job_asks_for_a_copy_on_every_twin_and_nowhere_else():
    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([ON_DESTINATION]),
            ELSEWHERE: build_inventory([PortIdentity(3, MAC, "red", "fw-2", ("10.0.0.2",), "tap-other")])}
    before, after = State.of([firewall()]), State.of([firewall(sources=("10.66.0.0/16", "10.77.0.0/16"))])
    copies = copies_after(SOURCE, before, after, {MAC}, False, seen)
    assert copies == [Copy(DESTINATION, (SOURCE, MAC), False,
                           compact((before.find(SOURCE, MAC), after.find(SOURCE, MAC))), ("fw-1", "red"))]
    assert copies[0].change[1].filters == {parse_command(f"A {MAC} I 4 s 10.77.0.0/16").filter}
    # a removal is copied only when guests' commands made it
    assert copies_after(SOURCE, after, State(), {MAC}, False, seen) == []
    assert copies_after(SOURCE, after, State(), {MAC}, True, seen) == [
        Copy(DESTINATION, (SOURCE, MAC), True, compact((after.find(SOURCE, MAC), None)), ("fw-1", "red"))]
    # an unannotated source has no twin
    assert copies_after(SOURCE, before, after, {MAC}, True, {SOURCE: build_inventory([]), **{
        DESTINATION: seen[DESTINATION]}}) == []


@pytest.mark.parametrize("kind", ["change", "new"])
def test_a_change_whose_origin_went_before_its_copy_still_reaches_the_twin(kind):
    """The guest's last command on the source, confirmed there, its copy waiting while the
    source's port goes (the switchover): the twin still gets it (a review found it dropped),
    but only on a port still annotated as the VM the copy was asked for."""
    seen = {DESTINATION: build_inventory([ON_DESTINATION])}
    before, after = firewall(), firewall(sources=("10.66.0.0/16", "10.77.0.0/16"))
    change = compact((None, after) if kind == "new" else (before, after))
    twin_now = [firewall(DESTINATION, 7, 2)] if kind == "change" else []
    state = State.of(twin_now)  # the origin is gone
    copied = adopted(state, seen, DESTINATION, (SOURCE, MAC), {1, 2}, False, change, ("fw-1", "red")).find(DESTINATION, MAC)
    assert copied is not None and copied.filters == after.filters and copied.port == 7
    for vm in (("fw-2", "red"), ("fw-1", "blue"), None):   # another VM, another tenant, asked for none
        assert adopted(state, seen, DESTINATION, (SOURCE, MAC), {1, 2}, False, change, vm) is state
    assert adopted(state, {}, DESTINATION, (SOURCE, MAC), {1, 2}, False, change, ("fw-1", "red")) is state
    assert adopted(state, seen, DESTINATION, (SOURCE, MAC), {1, 2}) is state   # an arrival: nothing to copy


def test_a_late_cancel_copy_does_not_remove_the_middlebox_of_a_port_now_annotated_as_another_vm():
    """A review found fw-1/red's cancel, copied late, removing the middlebox of the port
    re-annotated meanwhile as blue's VM with the same MAC."""
    blue = PortIdentity(7, MAC, "blue", "fw-9", ("10.0.0.2",), "tap-fw9")
    state = State.of([firewall(DESTINATION, 7, 2)])   # the origin is gone (cancelled there)
    cancel = compact((firewall(), None))
    assert adopted(state, {DESTINATION: build_inventory([blue])}, DESTINATION, (SOURCE, MAC), {2}, True, cancel,
                   ("fw-1", "red")) is state
    removed = adopted(state, {DESTINATION: build_inventory([ON_DESTINATION])}, DESTINATION, (SOURCE, MAC), {2}, True,
                      cancel, ("fw-1", "red"))
    assert removed.find(DESTINATION, MAC) is None


def test_an_arrival_whose_origins_annotations_went_before_its_retirement_is_still_made():
    """The source's port went: its annotations at once, its entry's retirement queued on a
    busy source switch; the arrival copy, made meanwhile, finds the origin still in the
    state, unannotated: as gone (a review found the arrival dropped)."""
    state = State.of([firewall()])
    seen = {SOURCE: build_inventory([ON_SOURCE]), DESTINATION: build_inventory([ON_DESTINATION])}
    (copy,) = arrivals(state, seen, DESTINATION)
    port_went = {SOURCE: build_inventory([]), DESTINATION: build_inventory([ON_DESTINATION])}
    made = adopted(state, port_went, DESTINATION, copy.origin, state.zones, copy.cancelled, copy.change, copy.vm)
    assert made.find(DESTINATION, MAC).filters == firewall().filters
