"""A balancer's redirects run where its backends are (controller/anchors.py): the pure
parts (underlay annotations, where a twin steers, which entries stay as anchors and when
they go, the flows both switches compile), then the shell on two fake switches that apply
the real encoded messages (tests/test_anchors_ovs.py has real switches and packets)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fakeswitch import FakeSwitch, wait_until
from mbvisor.agents.discovery import scan_ovsdb
from mbvisor.controller.anchors import Elsewhere, Steer, affected, kept_as_anchors, needless
from mbvisor.controller.flows import Surroundings, compile_middlebox, cookie_of
from mbvisor.controller.migration import adopted, arrivals
from mbvisor.controller.model import ApplyError, Binding, Middlebox, Redirect, State, TrustMode, apply
from mbvisor.controller.pipeline import CLAIMED, INGRESS_TABLE, OFFLOAD_TABLE, REDIRECT
from mbvisor.controller.requests import BadRequest, inventory_body, inventory_from_body
from mbvisor.controller.service import Controller, Settings
from mbvisor.controller.store import Store
from mbvisor.controller.trust import PortIdentity, Underlay, build_inventory
from mbvisor.guest.grammar import parse_command

from test_migration import _deliver, _ok, two_hypervisors

A, B, C = 0xA1, 0xB2, 0xC3
LB = "02:00:00:00:00:64"
LB_IP = "10.0.0.100"
WEB1 = PortIdentity(1, "02:00:00:00:00:11", "red", "web-1", ("10.0.0.11",), "tap-web1")
WEB2 = PortIdentity(3, "02:00:00:00:00:12", "red", "web-2", ("10.0.0.12",), "tap-web2")
LB_ON_A = PortIdentity(2, LB, "red", "lb-1", (LB_IP,), "tap-lb-a")
LB_ON_B = PortIdentity(7, LB, "red", "lb-1", (LB_IP,), "tap-lb-b")
UNDERLAY_PORT = 9
TO_EVERYONE = Underlay(UNDERLAY_PORT, "ul", None)
CLIENT = dict(eth_src="02:00:00:00:00:99", eth_type=0x0800, ipv4_src="10.0.0.99", ipv4_dst=LB_IP, ip_proto=6,
              tcp_src=40000, tcp_dst=80)
REPLY = dict(eth_src=WEB1.mac, eth_dst=CLIENT["eth_src"], eth_type=0x0800, ipv4_src=LB_IP, ipv4_dst="10.0.0.99",
             ip_proto=6, tcp_src=80, tcp_dst=40000)


def balancer(dpid=A, port=2, zone=1, backends=("10.0.0.11", "10.0.0.12")) -> Middlebox:
    return Middlebox(dpid, port, LB, zone, None, LB_IP, redirects=(Redirect(None, tuple(backends)),))


def anchor_of(zone=5, backends=("10.0.0.11", "10.0.0.12")) -> Middlebox:
    """What stays on A of the balancer ``lb-1`` (tenant red) once its port went."""
    return Middlebox(A, 2, LB, zone, None, LB_IP, redirects=(Redirect(None, tuple(backends)),),
                     anchor=("lb-1", "red"))


def inventories(a=(LB_ON_A, WEB1, WEB2, TO_EVERYONE), b=(LB_ON_B, TO_EVERYONE)):
    return {A: build_inventory(a), B: build_inventory(b)}


# --- underlay annotations ----------------------------------------------------------------

def test_an_underlay_port_leads_to_the_switches_it_names_or_to_every_one():
    inventory = build_inventory([Underlay(20, "ul-all", None), Underlay(12, "ul-c", frozenset({C})),
                                 Underlay(11, "ul-b", frozenset({B, C}))])
    assert inventory.toward(C) == 11  # one naming it (the lowest) before one leading everywhere
    assert inventory.toward(B) == 11
    assert inventory.toward(A) == 20
    assert build_inventory([Underlay(12, "ul-c", frozenset({C}))]).toward(B) is None


def test_an_underlay_port_that_shares_its_number_is_refused_with_the_vm_port():
    inventory = build_inventory([WEB1, Underlay(WEB1.port, "ul", None), Underlay(5, "a"), Underlay(5, "b")])
    assert inventory.underlay == () and inventory.at(WEB1.port) is None
    assert {(r.port, r.interface) for r in inventory.refused} == {(1, "tap-web1"), (1, "ul"), (5, "a"), (5, "b")}
    assert "also an underlay port" in next(r.reason for r in inventory.refused if r.interface == "tap-web1")


def test_underlay_ports_round_trip_through_the_api_and_bad_ones_are_refused_whole():
    entries = [WEB1, Underlay(9, "ul0", None), Underlay(10, "ul1", frozenset({B, C}))]
    assert inventory_from_body(inventory_body(entries)) == entries
    assert inventory_from_body({"ports": [], "underlay": [{"port": 9}]}) == [Underlay(9, "", None)]
    for bad, field in (([{"port": 9, "leads_to": [str(B), "*"]}], "leads_to"),
                       ([{"port": 9, "leads_to": [B]}], "leads_to"),          # ids as the API prints them
                       ([{"port": 9, "leads_to": []}], "leads_to"),
                       ([{"port": 9, "leads_to": ["0"] * 1025}], "leads_to"),
                       ([{"port": 0}], "port"), ([{"leads_to": ["*"]}], "port"),
                       ([{"port": 9, "peer": "x"}], "peer"), ("ul0", "underlay")):
        with pytest.raises(BadRequest) as refused:
            inventory_from_body({"ports": [], "underlay": bad})
        assert field in refused.value.field, (bad, refused.value.field)


def _ovsdb(*interfaces):
    """``ovs-vsctl --format=json list Bridge/Port/Interface`` of one bridge."""
    bridges = {"headings": ["_uuid", "name", "datapath_id", "ports"],
               "data": [[["uuid", "br"], "br0", f"{A:016x}", ["set", [["uuid", f"p{i}"] for i in
                                                                       range(len(interfaces))]]]]}
    ports = {"headings": ["_uuid", "name", "interfaces"],
             "data": [[["uuid", f"p{i}"], name, ["uuid", f"i{i}"]] for i, (name, _, _) in enumerate(interfaces)]}
    rows = {"headings": ["_uuid", "name", "ofport", "external_ids", "mac_in_use"],
            "data": [[["uuid", f"i{i}"], name, number, ["map", list(ids.items())], "02:00:00:00:ff:01"]
                     for i, (name, number, ids) in enumerate(interfaces)]}
    return bridges, ports, rows


def test_the_agent_publishes_an_underlay_annotation_and_refuses_a_bad_or_misplaced_one():
    scan = scan_ovsdb(*_ovsdb(("ul0", 9, {"mbvisor-underlay": f"{B:016x}, {C:x}"}),
                              ("ul1", 10, {"mbvisor-underlay": ""}),
                              ("ul2", 11, {"mbvisor-underlay": "*, 00a1"}),
                              ("vm", 12, {"mbvisor-underlay": "*", "attached-mac": "02:00:00:00:00:05",
                                          "mbvisor-tenant": "red"})))
    underlay = [e for e in scan.inventories[A] if isinstance(e, Underlay)]
    assert underlay == [Underlay(9, "ul0", frozenset({B, C})), Underlay(10, "ul1", None)]
    reasons = {r.interface: r.reason for r in scan.refused}
    assert set(reasons) == {"ul2", "vm"}
    assert "leads_to" not in reasons["ul2"] and "mbvisor-underlay" in reasons["ul2"]
    assert "VM's interface" in reasons["vm"]


def test_underlay_ports_and_anchors_are_stored(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    entries = [LB_ON_A, Underlay(9, "ul0", None), Underlay(10, "ul1", frozenset({B}))]
    store.save_inventory(A, entries)
    anchor = anchor_of()
    store.save(State(), State.of([anchor]), [])
    assert store.load_inventories() == {A: entries}
    assert store.load(State().limits).find(A, LB) == anchor


# --- where a twin steers, what stays as an anchor, when it goes --------------------------

def test_a_twin_without_its_backends_steers_to_the_switch_holding_them():
    state = State.of([balancer(), balancer(B, 7, zone=2)])
    seen = inventories()
    steers = Elsewhere(B, state, seen).steers(state.find(B, LB))
    assert steers == (Steer(A, UNDERLAY_PORT, {"10.0.0.11": WEB1.mac, "10.0.0.12": WEB2.mac}),)
    assert Elsewhere(A, state, seen).steers(state.find(A, LB)) == ()  # no backend of it on B


def test_the_twin_keeps_steering_while_the_sources_entry_waits_for_its_retirement():
    """The source's port lost its annotations (the agent's publication or the port-status,
    whichever came first), its entry not retired yet: it runs as the anchor it will be, and
    the twin keeps steering to it (the first version stopped for that moment: a
    connection's packet then reached the guest, which resets it).  An entry whose port was
    never seen annotated accepts nothing and gets nothing (a review found B steering into
    such an entry: a black hole)."""
    state = State.of([balancer(), balancer(B, 7, zone=2)])
    port_gone = inventories(a=(WEB1, WEB2, TO_EVERYONE))
    steering = Elsewhere(B, state, inventories()).steers(state.find(B, LB))
    departed = {A: {2: LB_ON_A}}
    assert Elsewhere(B, state, port_gone, departed).steers(state.find(B, LB)) == steering
    pending = compile_middlebox(state.find(A, LB), Surroundings(
        TrustMode.ANNOTATIONS, port_gone[A], elsewhere=Elsewhere(A, state, port_gone, departed))).flows
    assert pending == compile_middlebox(anchor_of(zone=1), Surroundings(
        TrustMode.ANNOTATIONS, port_gone[A], elsewhere=Elsewhere(A, state.put(anchor_of(zone=1)), port_gone))).flows
    assert pending
    assert Elsewhere(B, state, port_gone).steers(state.find(B, LB)) == ()
    assert compile_middlebox(state.find(A, LB), Surroundings(
        TrustMode.ANNOTATIONS, port_gone[A], elsewhere=Elsewhere(A, state, port_gone))).flows == frozenset()
    other_vm = {A: {2: PortIdentity(2, LB, "red", "lb-9", (LB_IP,))}}
    assert Elsewhere(B, state, port_gone, other_vm).steers(state.find(B, LB)) == ()


@pytest.mark.parametrize("case", ["no underlay", "other tenant", "other vm", "backends elsewhere", "unannotated"])
def test_no_steering_unless_annotations_pair_the_twins_and_an_underlay_port_leads_there(case):
    state = State.of([balancer(), balancer(B, 7, zone=2)])
    on_b = {"no underlay": (LB_ON_B,),
            "other tenant": (PortIdentity(7, LB, "blue", "lb-1", (LB_IP,)), TO_EVERYONE),
            "other vm": (PortIdentity(7, LB, "red", "lb-2", (LB_IP,)), TO_EVERYONE),
            "backends elsewhere": (LB_ON_B, TO_EVERYONE),
            "unannotated": (TO_EVERYONE,)}[case]
    on_a = (LB_ON_A, TO_EVERYONE) if case == "backends elsewhere" else (LB_ON_A, WEB1, WEB2)
    assert Elsewhere(B, state, inventories(on_a, on_b)).steers(state.find(B, LB)) == ()


def test_a_balancer_whose_port_goes_stays_as_an_anchor_only_while_its_twin_needs_its_backends():
    state = State.of([balancer(), balancer(B, 7, zone=2)])
    gone_from_a = inventories(a=(WEB1, WEB2, TO_EVERYONE))  # its port's annotations went with it
    was = {2: LB_ON_A}
    assert kept_as_anchors(state, A, [state.find(A, LB)], gone_from_a, was) == [anchor_of(zone=1)]
    assert kept_as_anchors(state, A, [state.find(A, LB)], gone_from_a, {}) == []  # its VM unknown
    assert kept_as_anchors(State.of([balancer()]), A, [balancer()], gone_from_a, was) == []  # no twin
    assert kept_as_anchors(state, A, [state.find(A, LB)], inventories(a=(TO_EVERYONE,)), was) == []  # no backends
    firewall = Middlebox(A, 2, LB, 1, "10.0.0.100")
    assert kept_as_anchors(State.of([firewall, balancer(B, 7)]), A, [firewall], gone_from_a, was) == []
    anchor = anchor_of(zone=1)
    with_anchor = state.put(anchor)
    assert not needless(with_anchor, gone_from_a, anchor)
    assert needless(with_anchor.remove(B, LB), gone_from_a, anchor)                      # the twin went
    assert needless(with_anchor.put(balancer(B, 7, 2, ("10.0.0.50",))), gone_from_a, anchor)  # other backends
    assert needless(with_anchor, inventories(a=(TO_EVERYONE,)), anchor)                  # the backends left
    assert needless(with_anchor, inventories(a=(WEB1, WEB2), b=()), anchor)              # the twin's VM left


def test_a_change_on_one_switch_recompiles_the_balancers_of_those_macs_elsewhere_not_firewalls():
    firewall = "02:00:00:00:00:01"
    state = State.of([balancer(), replace(anchor_of(), dpid=B), balancer(C, 3, 3),
                      Middlebox(C, 1, firewall, 4, "10.0.0.1"), Middlebox(B, 1, firewall, 6, "10.0.0.1")])
    again, anchors = affected(state, A, {LB, firewall}, [A, B, C])
    assert again == {C: {LB}} and anchors == {B: {LB}}  # a firewall's twin reads nothing of the other side
    again, anchors = affected(state, B, {LB}, [A, B, C])
    assert again == {A: {LB}, C: {LB}} and anchors == {}


def test_a_guest_registering_the_anchors_mac_replaces_it():
    anchor = anchor_of()
    binding = Binding(A, 2, TrustMode.ANNOTATIONS, build_inventory([LB_ON_A, WEB1, WEB2]))
    after = apply(State.of([anchor]), binding, parse_command(f"R L {LB} {LB_IP} 0 * 10.0.0.11")).state
    assert after.find(A, LB).anchor is None and after.find(A, LB).redirects
    with pytest.raises(Exception, match="not registered|no middlebox|unknown"):
        apply(State.of([anchor]), binding, parse_command(f"A {LB} I 4 s 10.66.0.0/16"))


def test_the_vm_coming_back_replaces_its_anchor_with_a_twin_in_the_anchors_zone():
    anchor = anchor_of()
    state = State.of([anchor, balancer(B, 7, zone=2)])
    seen = inventories(a=(LB_ON_A, WEB1, WEB2, TO_EVERYONE))
    [copy] = arrivals(state, seen, A)
    after = adopted(state, seen, A, copy.origin, state.zones, change=copy.change, vm=copy.vm)
    back = after.find(A, LB)
    assert back.anchor is None and back.zone == 5 and back.redirects == balancer().redirects
    change = (balancer(B, 7, 2), balancer(B, 7, 2, ("10.0.0.11",)))
    assert adopted(state, seen, A, (B, LB), state.zones, change=change, vm=copy.vm) is state  # only arrivals


# --- the flows -------------------------------------------------------------------------------

def _flows(middlebox: Middlebox, state: State, seen, dpid: int):
    surroundings = Surroundings(TrustMode.ANNOTATIONS, seen[dpid], elsewhere=Elsewhere(dpid, state, seen))
    return compile_middlebox(middlebox, surroundings).flows


def test_the_twin_steers_the_redirect_out_of_its_underlay_port_and_lets_its_replies_in():
    state = State.of([balancer(), balancer(B, 7, zone=2)])
    flows = _flows(state.find(B, LB), state, inventories(), B)
    redirect = {f for f in flows if f.table == OFFLOAD_TABLE and f.priority == REDIRECT}
    assert [(dict(f.match), f.actions) for f in redirect] == [
        ({"eth_type": 0x0800, "eth_dst": LB, "ipv4_dst": LB_IP},
         (("set_field", "eth_dst", WEB1.mac), ("output", UNDERLAY_PORT)))]
    allowed = {dict(f.match)["eth_src"] for f in flows if f.table == INGRESS_TABLE}
    assert allowed == {WEB1.mac, WEB2.mac}
    assert all(f.priority == CLAIMED + 1 and dict(f.match)["in_port"] == UNDERLAY_PORT
               and dict(f.match)["ipv4_src"] == LB_IP for f in flows if f.table == INGRESS_TABLE)


def test_an_anchor_runs_its_twins_redirects_in_its_own_zone_entered_as_steered():
    anchor = anchor_of()
    state = State.of([anchor, balancer(B, 7, zone=2, backends=("10.0.0.12",))])
    seen = inventories(a=(WEB1, WEB2, TO_EVERYONE))
    flows = _flows(anchor, state, seen, A)
    entries = {dict(f.match)["eth_dst"] for f in flows if f.table == OFFLOAD_TABLE and f.priority == REDIRECT}
    assert entries == {LB, WEB2.mac}  # the twin's redirect now names web-2 only
    assert {a[1] for f in flows for a in f.actions if a[0] in ("ct_nat", "ct_commit_nat")} == {5}
    assert not any(f.table == INGRESS_TABLE for f in flows)
    assert _flows(anchor, state.remove(B, LB), seen, A) == frozenset()  # nothing to run


def test_an_anchor_filters_what_enters_its_switch_as_its_twin_does():
    """A host on the anchor's switch sending to the balancer's MAC meets the anchor first:
    without the twin's filters there, an attacker beside the backends would bypass them
    (the real QEMU migration found it: its attacker on A reached the backends)."""
    attack = parse_command(f"A {LB} I 4 s 10.66.0.0/16").filter
    twin = replace(balancer(B, 7, zone=2), firewall_ip=LB_IP, filters=frozenset({attack}))
    state = State.of([anchor_of(), twin])
    seen = inventories(a=(WEB1, WEB2, TO_EVERYONE))
    flows = _flows(anchor_of(), state, seen, A)
    drops = [f for f in flows if f.table == OFFLOAD_TABLE and f.actions == () and dict(f.match).get("eth_dst") == LB]
    assert drops and all(f.priority > REDIRECT for f in drops)
    assert set(drops) == {f for f in _flows(twin, state, seen, B)
                          if f.table == OFFLOAD_TABLE and f.actions == () and dict(f.match).get("eth_dst") == LB}
    assert any(dict(f.match).get("ipv4_src") == ("10.66.0.0", "255.255.0.0") for f in drops)


def test_a_balancer_with_a_twin_accepts_steered_traffic_one_without_does_not():
    seen = inventories()
    alone = _flows(balancer(), State.of([balancer()]), seen, A)
    twinned = _flows(balancer(), State.of([balancer(), balancer(B, 7, 2)]), seen, A)
    assert twinned - alone == {f for f in twinned if f.table == OFFLOAD_TABLE and f.priority == REDIRECT
                               and dict(f.match)["eth_dst"] != LB}
    assert len(twinned - alone) == 2 and alone < twinned


# --- the shell, on fake switches ----------------------------------------------------------------

@pytest.fixture
def hosts(tmp_path):
    """A (0xA1: backends on 1 and 3, the balancer on 2) and B (0xB2: its twin on 7, a
    client on 4), each with its underlay port 9."""
    from test_migration import DESTINATION, SOURCE
    assert (SOURCE, DESTINATION) == (A, B)
    service, fakes = two_hypervisors(tmp_path / "controller.sqlite", ports=(1, 2, 3, 4, 7, UNDERLAY_PORT))
    service.set_inventory(A, [LB_ON_A, WEB1, WEB2, TO_EVERYONE])
    _ok(service, A, 2, f"R L {LB} {LB_IP} 0 * 10.0.0.11,10.0.0.12")
    service.set_inventory(B, [LB_ON_B, Underlay(UNDERLAY_PORT, "ul", frozenset({A}))])
    wait_until(lambda: steered(fakes[B]), what="the twin on B to steer to A")
    wait_until(lambda: served_on_a(fakes[A]), what="A to take what B steers")
    yield service, fakes
    service.close()
    for fake in fakes.values():
        fake.close()


def steered(fake) -> bool:
    trace = fake.trace(4, eth_dst=LB, **CLIENT)
    return trace.ports == [UNDERLAY_PORT] and trace.fields["eth_dst"] == WEB1.mac


def served_on_a(fake) -> bool:
    """A packet steered from B reaches web-1 through the balancer's zone on A."""
    trace = fake.trace(UNDERLAY_PORT, eth_dst=WEB1.mac, bucket=0, **CLIENT)
    return trace.ports == [WEB1.port] and trace.fields["ipv4_dst"] == "10.0.0.11"


def own(fake) -> list:
    return [f for f in fake.flows() if f.cookie == cookie_of(LB)]


def test_the_source_port_going_leaves_an_anchor_and_the_twins_cancel_takes_it(hosts):
    service, fakes = hosts
    assert served_on_a(fakes[A])
    assert fakes[B].trace(UNDERLAY_PORT, **REPLY).verdict == "normal"  # not dropped as a claim of LB_IP
    zone = service.state.find(A, LB).zone
    fakes[A].remove_port(2)
    wait_until(lambda: (service.state.find(A, LB) or Middlebox(0, 0, "", 0)).anchor == ("lb-1", "red"),
               what="the anchor on A")
    assert service.state.find(A, LB) == anchor_of(zone=zone)
    wait_until(lambda: served_on_a(fakes[A]) and steered(fakes[B]), what="the anchor's flows on A, B steering")
    restarted = Controller(Settings(database=service.settings.database))
    assert restarted.state.find(A, LB) == service.state.find(A, LB)  # durably
    restarted.close()
    _ok(service, B, 7, f"X {LB}")
    wait_until(lambda: service.state.find(A, LB) is None, what="the anchor to go with its twin")
    wait_until(lambda: own(fakes[A]) == [] and own(fakes[B]) == [], what="both switches without its flows")


def test_the_backends_leaving_the_anchors_switch_take_the_anchor(hosts):
    service, fakes = hosts
    fakes[A].remove_port(2)
    wait_until(lambda: service.state.find(A, LB) is not None and service.state.find(A, LB).anchor, what="anchor")
    service.set_inventory(A, [TO_EVERYONE])
    wait_until(lambda: service.state.find(A, LB) is None, what="the anchor to go with the backends")
    wait_until(lambda: not steered(fakes[B]), what="B to stop steering")
    assert own(fakes[A]) == []


def test_an_operators_delete_of_an_anchor_removes_it_and_the_twin_stops_steering(hosts):
    service, fakes = hosts
    fakes[A].remove_port(2)
    wait_until(lambda: service.state.find(A, LB) is not None and service.state.find(A, LB).anchor, what="anchor")
    refused = service.delete_middlebox(A, LB)  # as the source agent cleans up: not the anchor
    assert refused.code == "not-found" and "anchor=true" in refused.text and service.state.find(A, LB)
    answer = service.delete_middlebox(A, LB, anchor=True)
    assert answer.status == "OK" and service.state.find(A, LB) is None
    assert service.delete_middlebox(B, LB, anchor=True).code == "not-found"  # the twin is no anchor
    wait_until(lambda: own(fakes[A]) == [] and not steered(fakes[B]), what="A without it, B not steering")
    assert service.state.find(B, LB) is not None  # the twin keeps the redirect (its guest balances it)


# --- found by a review of the first version (each failed there) ---------------------------------

def test_the_source_agents_delete_of_the_vm_that_left_keeps_the_anchor_before_or_after_the_port_status(hosts):
    """agents/agent.py deletes a VM's middlebox once its channel closed, before or after the
    switch reports its port gone (tests/test_migration.py)."""
    service, fakes = hosts
    assert service.delete_middlebox(A, LB).status == "OK"      # before: the delete leaves the anchor
    assert service.state.find(A, LB) == anchor_of(zone=service.state.find(A, LB).zone)
    fakes[A].remove_port(2)
    _idle(service, A, B)
    assert service.state.find(A, LB).anchor == ("lb-1", "red")
    assert service.delete_middlebox(A, LB).code == "not-found"  # after: the anchor is not the VM's
    assert service.state.find(A, LB) is not None
    wait_until(lambda: served_on_a(fakes[A]) and steered(fakes[B]), what="the connections still served")


def test_a_frame_from_the_underlay_is_steered_back_out_through_in_port(hosts):
    """A client behind the same underlay port (a third hypervisor on a shared uplink):
    output to the port a frame came in on is dropped by OpenFlow; IN_PORT sends it."""
    service, fakes = hosts
    trace = fakes[B].trace(UNDERLAY_PORT, eth_dst=LB, **CLIENT)
    assert trace.ports == [UNDERLAY_PORT] and trace.fields["eth_dst"] == WEB1.mac


def test_a_departing_balancer_is_no_anchor_for_another_vm_with_its_mac():
    """MACs are unique per switch only: another tenant's VM with the same MAC on B, with
    backends of its own on A, must not take over red's zone on A."""
    blue_web = PortIdentity(4, "02:00:00:00:00:13", "blue", "blue-web", ("10.0.0.13",), "tap-bw")
    state = State.of([balancer(), balancer(B, 7, zone=2, backends=("10.0.0.13",))])
    seen = {A: build_inventory([WEB1, WEB2, blue_web, TO_EVERYONE]),
            B: build_inventory([PortIdentity(7, LB, "blue", "other-vm", (LB_IP,)), TO_EVERYONE])}
    assert kept_as_anchors(state, A, [state.find(A, LB)], seen, {2: LB_ON_A}) == []
    same_tenant_other_vm = {**seen, B: build_inventory([PortIdentity(7, LB, "red", "lb-2", (LB_IP,)), TO_EVERYONE])}
    assert kept_as_anchors(state, A, [state.find(A, LB)], same_tenant_other_vm, {2: LB_ON_A}) == []


def test_a_new_balancer_cannot_name_an_anchors_backends():
    """Replies are recognised by their backend: a second balancer naming the anchor's
    backend would compile the same reply flow with another zone (OVS keeps one)."""
    state = State.of([anchor_of(), balancer(B, 7, zone=2)])
    lb3 = PortIdentity(4, "02:00:00:00:00:65", "red", "lb-3", ("10.0.0.101",), "tap-lb3")
    binding = Binding(A, 4, TrustMode.ANNOTATIONS, build_inventory([WEB1, WEB2, lb3, TO_EVERYONE]))
    with pytest.raises(ApplyError) as refused:
        apply(state, binding, parse_command(f"R L {lb3.mac} 10.0.0.101 0 * 10.0.0.11"))
    assert refused.value.code == "backend-in-use"


def test_a_firewalls_twin_does_not_make_the_source_recompile_its_filters_whole(tmp_path):
    """The copy to the twin asks nothing of the source: a firewall's entries depend on no
    other switch, and a refresh would make its next adds compile the whole set."""
    from test_migration import MAC, ON_DESTINATION, ON_SOURCE, SOURCE, DESTINATION
    service, fakes = two_hypervisors(tmp_path / "controller.sqlite")
    try:
        service.set_inventory(SOURCE, [ON_SOURCE])
        service.set_inventory(DESTINATION, [ON_DESTINATION])
        _ok(service, SOURCE, 2, f"R F {MAC} 10.0.0.2")
        _ok(service, SOURCE, 2, f"A {MAC} I 4 s 10.66.0.0/16")
        wait_until(lambda: (copy := service.state.find(DESTINATION, MAC)) is not None and len(copy.filters) == 1,
                   what="the copy made")
        _idle(service, DESTINATION, SOURCE)
        assert MAC in service.reconcilers[SOURCE].exact
    finally:
        service.close()
        for fake in fakes.values():
            fake.close()


def test_an_anchor_needless_while_the_controller_was_stopped_goes_at_its_start(tmp_path):
    database = tmp_path / "db.sqlite"
    store = Store(database)
    store.save(State(), State.of([anchor_of()]), [])
    store.save_inventory(A, [WEB1, WEB2, TO_EVERYONE])  # its twin's cancel was stored before the kill
    store.db.close()
    service = Controller(Settings(database=database, audit_interval=0, backend_check_interval=0))
    try:
        assert service.state.find(A, LB) is None
        assert Store(database).load(State().limits).find(A, LB) is None  # durably
    finally:
        service.close()


def _idle(service, *dpids) -> None:
    """Every job queued on these switches so far has run (jobs run in order)."""
    from mbvisor.controller.reconciler import Job
    for dpid in dpids:
        assert service.reconcilers[dpid].submit(Job("refresh")).done.wait(10)


# --- found by a second review (each failed on the version before its fix) ------------------------

DROP_ALL = parse_command(f"A {LB} I 4 s 0.0.0.0/0").filter


def _flows_departed(middlebox, state, seen, dpid, departed=None):
    return compile_middlebox(middlebox, Surroundings(TrustMode.ANNOTATIONS, seen[dpid],
                                                     elsewhere=Elsewhere(dpid, state, seen, departed or {}))).flows


def _twin_with_filter():
    return replace(balancer(B, 7, zone=2), firewall_ip=LB_IP, filters=frozenset({DROP_ALL}))


def test_an_anchor_leaves_another_tenants_vm_with_its_mac_alone():
    """Red's balancer left A; blue's VM on A is annotated with the MAC it had (MACs are
    unique per switch only, and red's port is gone) and the address.  Red's anchor must
    not drop (red's guest's filters) nor redirect (to red's backends) what is sent to it."""
    blue = PortIdentity(4, LB, "blue", "blue-vm", (LB_IP,), "tap-blue")
    seen = {A: build_inventory([WEB1, WEB2, blue, TO_EVERYONE]), B: build_inventory([LB_ON_B, TO_EVERYONE])}
    state = State.of([anchor_of(), _twin_with_filter()])
    flows = _flows_departed(anchor_of(), state, seen, A)
    hits = [f for f in flows if f.table == OFFLOAD_TABLE and dict(f.match).get("eth_dst") == LB]
    assert hits == [], sorted((f.priority, f.actions) for f in hits)[:3]


def test_a_pending_anchor_leaves_another_tenants_vm_with_its_mac_alone():
    blue = PortIdentity(4, LB, "blue", "blue-vm", (LB_IP,), "tap-blue")
    seen = {A: build_inventory([WEB1, WEB2, blue, TO_EVERYONE]), B: build_inventory([LB_ON_B, TO_EVERYONE])}
    state = State.of([balancer(), _twin_with_filter()])
    departed = {A: {2: PortIdentity(2, LB, "red", "lb-1", (LB_IP,), "tap-lb-a")}}
    flows = _flows_departed(balancer(), state, seen, A, departed)
    assert not any(dict(f.match).get("eth_dst") == LB for f in flows if f.table == OFFLOAD_TABLE)


def test_an_anchors_group_frame_filters_do_not_match_an_address_another_tenant_holds_on_its_switch():
    """filters.py: "Group traffic for any other address is never touched: it is other
    tenants' too"; model._check_address_free: "two middleboxes compiling the same flow
    would take it from each other".  The anchor's group forms use its twin's addresses,
    unchecked on A; its firewall address is not reserved there (anchor.firewall_ip None)."""
    fw_ip = "10.0.0.200"
    on_b = PortIdentity(7, LB, "red", "lb-1", (LB_IP, fw_ip), "tap-lb-b")
    twin = replace(balancer(B, 7, zone=2), firewall_ip=fw_ip, filters=frozenset({DROP_ALL}))
    blue = PortIdentity(4, "02:00:00:00:00:77", "blue", "blue-fw", (fw_ip,), "tap-blue")
    seen = {A: build_inventory([WEB1, WEB2, blue, TO_EVERYONE]), B: build_inventory([on_b, TO_EVERYONE])}
    state = State.of([anchor_of(), twin])
    binding = Binding(A, 4, TrustMode.ANNOTATIONS, seen[A])
    for text in (f"R F {blue.mac} {fw_ip}", f"A {blue.mac} I 4 s 0.0.0.0/0"):  # blue's own firewall: accepted
        state = apply(state, binding, parse_command(text)).state
    anchor = _flows_departed(anchor_of(), state, seen, A)
    blue_flows = _flows_departed(state.find(A, blue.mac), state, seen, A)
    group = [f for f in anchor if dict(f.match).get("ipv4_dst") == fw_ip]
    shared = {(f.table, f.priority, f.match) for f in anchor} & {(f.table, f.priority, f.match) for f in blue_flows}
    assert group == [] and not shared, f"{len(group)} drops of blue's address, {len(shared)} of blue's identities"


def test_the_pending_anchor_survives_a_restart(hosts, tmp_path):
    """A's agent publishes the inventory without the balancer's port (the VM left), the
    controller is killed before the port-status; after the restart, the source agent's
    delete must still leave the anchor (nothing lost across kill -9)."""
    service, fakes = hosts
    service.set_inventory(A, [WEB1, WEB2, TO_EVERYONE])
    _idle(service, A, B)
    assert served_on_a(fakes[A]) and steered(fakes[B])  # the pending anchor
    database = service.settings.database
    service.close()
    for fake in fakes.values():
        fake.close()
    restarted = Controller(Settings(database=database, audit_interval=0, backend_check_interval=0))
    new = {}
    try:
        for dpid in (A, B):
            new[dpid] = FakeSwitch(dpid, ports=(1, 2, 3, 4, 7, 9), sink=lambda m, s=restarted: _deliver(s, m))
            restarted.switch_connected(new[dpid].datapath)
            wait_until(lambda d=dpid: restarted.reconcilers[d].synced, what="reconciled")
        _idle(restarted, A, B)
        assert steered(new[B]) and served_on_a(new[A])  # reconnected: B steers, A's anchor takes it
        assert restarted.delete_middlebox(A, LB).code == "not-found"  # the source agent's cleanup: an anchor
        kept = restarted.state.find(A, LB)
        assert kept is not None and kept.anchor == ("lb-1", "red"), kept
    finally:
        restarted.close()
        for fake in new.values():
            fake.close()


def test_a_port_number_reannotated_before_the_retirement_runs_keeps_the_anchor(tmp_path):
    """Port-status first (departed remembered, retirement queued), then the agent publishes
    the number reused by another VM before the retirement job runs: the departed VM's
    annotations are forgotten, and the retirement removes the balancer instead of
    anchoring it (its connections on A are lost)."""
    service = Controller(Settings(database=tmp_path / "db.sqlite", audit_interval=0, backend_check_interval=0))
    try:
        service.set_inventory(A, [PortIdentity(2, LB, "red", "lb-1", (LB_IP,), "tap-lb-a"), WEB1, WEB2, TO_EVERYONE])
        service.set_inventory(B, [LB_ON_B, TO_EVERYONE])
        service.state = State.of([balancer(), balancer(B, 7, zone=2)])
        service.port_deleted(A, 2)           # the switch's port-status (retirement queued behind A's jobs)
        other = PortIdentity(2, "02:00:00:00:00:55", "blue", "blue-vm", ("10.0.0.55",), "tap-new")
        service.set_inventory(A, [other, WEB1, WEB2, TO_EVERYONE])  # the agent, quicker than A's queue
        service.retire(A, {2})               # the retirement job runs
        kept = service.state.find(A, LB)
        assert kept is not None and kept.anchor == ("lb-1", "red"), kept
    finally:
        service.close()


def test_an_anchors_backends_are_reported_as_it_uses_them(hosts):
    """GET /v1/middleboxes/{dpid}/{mac}: ``unlocated`` means "not used"."""
    service, fakes = hosts
    fakes[A].remove_port(2)
    wait_until(lambda: service.state.find(A, LB) is not None and service.state.find(A, LB).anchor, what="anchor")
    wait_until(lambda: served_on_a(fakes[A]), what="the anchor serving web-1")
    assert service.backend_states(A, LB) == {"10.0.0.11": "up", "10.0.0.12": "up"}


def test_a_keyless_batch_cannot_leave_two_balancers_on_one_backend(hosts):
    """An operator's keyless batch deletes the balancer and registers another one of its
    tenant on the freed backend: the anchor put back after the job's decisions names the
    same backend (model._check_backends_unique: "a backend serves one middlebox per
    switch"; two reply flows of one identity, two zones)."""
    from mbvisor.controller.requests import CommandRequest
    service, fakes = hosts
    lb3 = PortIdentity(4, "02:00:00:00:00:65", "red", "lb-3", ("10.0.0.101",), "tap-lb3")
    service.set_inventory(A, [PortIdentity(2, LB, "red", "lb-1", (LB_IP,), "tap-lb-a"), WEB1, WEB2, lb3,
                              TO_EVERYONE])
    answers = service.submit([CommandRequest(A, 2, f"X {LB}"),
                              CommandRequest(A, 4, f"R L {lb3.mac} 10.0.0.101 0 * 10.0.0.11")])
    assert [a.status for a in answers] == ["OK", "OK"], answers
    holders = [mb.mac for mb in service.state.on(A) if any("10.0.0.11" in r.backends for r in mb.redirects)]
    assert len(holders) == 1, service.state.on(A)




def test_changes_on_the_twin_while_the_anchors_switch_is_busy_are_followed_once(hosts, monkeypatch):
    """Each change of the twin asks the anchor's switch to compile it again; asked while
    that switch is busy, the asks merge into one (a guest adding filters one by one on B
    costs A one recompilation per turn of its queue, not one per command)."""
    import mbvisor.controller.flows as flows
    from test_migration_races import _stuck_in
    from mbvisor.controller.requests import CommandRequest
    service, fakes = hosts
    fakes[A].remove_port(2)
    wait_until(lambda: service.state.find(A, LB) is not None and service.state.find(A, LB).anchor, what="anchor")
    _ok(service, B, 7, f"R F {LB} {LB_IP}")
    service.set_inventory(A, [WEB1, WEB2, TO_EVERYONE, PortIdentity(4, "02:00:00:00:00:44", "blue", "fw", ("10.0.0.44",))])
    _idle(service, A, B)
    _ok(service, A, 4, "R F 02:00:00:00:00:44 10.0.0.44")
    compiled = []
    real = flows.compile_anchor
    monkeypatch.setattr(flows, "compile_anchor", lambda a, s, p=None: compiled.append(a.mac) or real(a, s, p))
    fakes[A].hold()
    busy = _stuck_in(fakes[A], lambda: service.execute(CommandRequest(A, 4, "A 02:00:00:00:00:44 I 4 s 10.9.0.0/16")))
    for i in range(20):
        _ok(service, B, 7, f"A {LB} I 4 s 10.{i}.0.0/16")
    assert sum(1 for job in service.reconcilers[A].jobs if job.kind == "follow") == 1
    fakes[A].release()
    assert busy.wait().status == "OK"
    _idle(service, A, B)
    assert compiled.count(LB) == 1, compiled
    attack = {**CLIENT, "ipv4_src": "10.19.0.1"}
    assert fakes[A].trace(UNDERLAY_PORT, eth_dst=LB, **attack).verdict == "drop"  # the last of them, at A too


# --- found by a third review (each failed on the version before its fix) ------------------------

def test_an_underlay_port_that_goes_stops_leading_anywhere(tmp_path):
    """port_deleted drops a VM port's annotations at once ("a reused number must not speak
    for the VM that had it"); an underlay port's stay: B keeps steering clients' traffic out
    of that number, and keeps letting in frames from it as the balancer's replies."""
    service = Controller(Settings(database=tmp_path / "db.sqlite", audit_interval=0, backend_check_interval=0))
    try:
        service.set_inventory(B, [LB_ON_B, TO_EVERYONE])
        service.port_deleted(B, UNDERLAY_PORT)
        assert service.inventory_of(B).toward(A) is None
    finally:
        service.close()


def test_a_change_on_a_switch_without_a_reconciler_is_followed_by_the_only_connected_one(tmp_path):
    """_follow returns when len(reconcilers) < 2 even if ``dpid`` is not among them."""
    database = tmp_path / "db.sqlite"
    store = Store(database)
    store.save(State(), State.of([anchor_of(), balancer(B, 7, zone=2)]), [])
    store.save_inventory(A, [WEB1, WEB2, TO_EVERYONE])
    store.save_inventory(B, [LB_ON_B, TO_EVERYONE])
    store.db.close()
    service = Controller(Settings(database=database, audit_interval=0, backend_check_interval=0))
    fake = FakeSwitch(B, ports=(1, 2, 3, 4, 7, UNDERLAY_PORT), sink=lambda m: _deliver(service, m))
    try:
        service.switch_connected(fake.datapath)  # A's switch has not reconnected since the restart
        wait_until(lambda: service.reconcilers[B].synced, what="B reconciled")
        assert steered(fake)
        assert service.delete_middlebox(A, LB, anchor=True).status == "OK"
        _idle(service, B)
        assert not steered(fake), "B still steers the redirect into A, whose anchor is gone"
    finally:
        service.close()
        fake.close()


def test_an_anchors_backends_are_health_checked(hosts, monkeypatch):
    service, fakes = hosts
    fakes[A].remove_port(2)
    wait_until(lambda: (mb := service.state.find(A, LB)) is not None and mb.anchor, what="anchor")
    checked = []
    monkeypatch.setattr(Controller, "arp_check", classmethod(lambda cls, dp, address, where: checked.append(address)))
    monkeypatch.setattr(service.reconcilers[A].link, "send_unconfirmed", lambda message: None)
    service._check_backends()
    assert sorted(checked) == ["10.0.0.11", "10.0.0.12"]  # as the redirects it keeps name them


def test_an_address_edit_on_a_balancers_port_is_remembered_as_a_departure(tmp_path):
    """_remember_departed records any change of the identity (here: one more address), and
    never forgets it while the balancer lives: every later inventory change of that switch
    queues an anchor job that recompiles the balancer whole (its exact record dropped)."""
    service = Controller(Settings(database=tmp_path / "db.sqlite", audit_interval=0, backend_check_interval=0))
    try:
        service.set_inventory(A, [LB_ON_A, WEB1, WEB2])
        service.state = State.of([balancer()])
        more = PortIdentity(2, LB, "red", "lb-1", (LB_IP, "10.0.0.101"), "tap-lb-a")
        service.set_inventory(A, [more, WEB1, WEB2])
        assert service.departed.get(A, {}) == {}, service.departed
    finally:
        service.close()


def test_a_vm_id_given_later_leaves_a_stale_departure_that_costs_the_anchor(tmp_path):
    """The operator gives the balancer's port its vm-id after it registered (the agent used
    the interface name until then), then migrates it: the source agent's delete, before the
    port-status, reads the stale departed identity first (_identities) and leaves no anchor."""
    from test_migration import _ok, two_hypervisors
    service, fakes = two_hypervisors(tmp_path / "c.sqlite", ports=(1, 2, 3, 4, 7, UNDERLAY_PORT))
    try:
        unnamed = PortIdentity(2, LB, "red", "tap-lb-a", (LB_IP,), "tap-lb-a")   # vm-id defaulted
        service.set_inventory(A, [unnamed, WEB1, WEB2, TO_EVERYONE])
        _ok(service, A, 2, f"R L {LB} {LB_IP} 0 * 10.0.0.11,10.0.0.12")
        service.set_inventory(A, [LB_ON_A, WEB1, WEB2, TO_EVERYONE])              # vm-id=lb-1 set
        service.set_inventory(B, [LB_ON_B, TO_EVERYONE])                          # destination plugged
        wait_until(lambda: steered(fakes[B]), what="the twin on B steering to A")
        assert service.delete_middlebox(A, LB).status == "OK"                     # the source agent's delete
        kept = service.state.find(A, LB)
        assert kept is not None and kept.anchor == ("lb-1", "red"), (kept, service.departed)
    finally:
        service.close()
        for fake in fakes.values():
            fake.close()
