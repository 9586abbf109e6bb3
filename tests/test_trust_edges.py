"""The trust model's edges, found by an adversarial review: each test states a promise of
docs/security.md and tries to break it (lab guests and annotated identities, health checks'
meters, port security's probes and servers, dead redirects, IPv6 backends' health,
inventories, limits).  Pure or fake-switch only; tests/test_security_ovs.py does it on a
real switch."""

from __future__ import annotations

import pytest

from fakeswitch import FakeSwitch, decode, wait_until
from mbvisor.controller import flows as F
from mbvisor.controller.filters import conjunction_id
from mbvisor.controller.flows import Surroundings, compile_middlebox, compile_switch
from mbvisor.controller.ingress import link_local
from mbvisor.controller.model import ApplyError, Binding, Limits, Middlebox, State, apply
from mbvisor.controller.ofmessages import flow_mod, group_mod
from mbvisor.controller.requests import CommandRequest, inventory_from_body
from mbvisor.controller.pipeline import port_meter
from mbvisor.controller.trust import PortIdentity, TrustMode, build_inventory
from mbvisor.guest.grammar import parse_command
from test_trust import service  # noqa: F401 - the service on fake switches, shared

DPID = 0xA1
MB = PortIdentity(2, "02:00:00:00:00:02", "red", "mb", ("10.0.0.2", "fd00::2"), "mb-eth0")
BACKEND = PortIdentity(3, "02:00:00:00:00:03", "red", "web1", ("10.0.0.3",), "web1-eth0")
BACKEND2 = PortIdentity(4, "02:00:00:00:00:04", "red", "web2", ("10.0.0.4",), "web2-eth0")
VICTIM = PortIdentity(5, "02:00:00:00:00:05", "blue", "victim", ("10.0.0.5",), "victim-eth0")
BACKEND6 = PortIdentity(6, "02:00:00:00:00:06", "red", "web6", ("fd00::6",), "web6-eth0")
PORTS = [MB, BACKEND, BACKEND2, VICTIM]
INVENTORY = build_inventory(PORTS)
STRICT = Binding(DPID, MB.port, TrustMode.ANNOTATIONS, INVENTORY)
CLIENT_PORT, LAB_PORT = 1, 7


def run(binding: Binding, *texts: str, state: State | None = None) -> State:
    state = state or State()
    for text in texts:
        state = apply(state, binding, parse_command(text)).state
    return state


def _send(switch: FakeSwitch, message) -> None:
    switch.datapath.set_xid(message)
    message.serialize()
    return decode(switch.datapath, bytes(message.buf))


def installed(state: State, surroundings: Surroundings) -> FakeSwitch:
    """A fake switch holding exactly what the controller compiles for ``state``."""
    switch = FakeSwitch(DPID, ports=(1, 2, 3, 4, 5, 6, 7))
    config = compile_switch(state, DPID, surroundings)
    for group in config.groups:
        switch.tables.group_mod(_send(switch, group_mod(switch.datapath, group, "add")))
    for flow in config.flows:
        switch.tables.flow_mod(_send(switch, flow_mod(switch.datapath, flow, "add")))
    return switch


# --- a lab's unannotated guest cannot speak for an annotated VM's MAC -----------------------

def test_a_lab_guest_cannot_speak_for_an_annotated_vms_mac():
    """Annotated ports are checked in both modes: an unannotated lab guest registering an
    annotated VM's MAC could filter that VM's traffic, or squat its middlebox's key."""
    lab = Binding(DPID, LAB_PORT, TrustMode.LAB, INVENTORY)
    for text in (f"R F {VICTIM.mac} 10.9.9.9", f"R F {MB.mac} 10.9.9.9"):
        with pytest.raises(ApplyError) as refused:
            apply(State(), lab, parse_command(text))
        assert refused.value.code == "foreign-mac"
    lab_mb = Middlebox(DPID, LAB_PORT, VICTIM.mac, 1, firewall_ip="10.9.9.9")
    assert not Surroundings(TrustMode.LAB, INVENTORY).vouches(lab_mb)  # nor compiled, if stored before


# --- health answers: only a backend's own, through its own meter ---------------------------

def test_only_backends_in_use_reach_the_health_checks_meter():
    """A backend's health answer reaches the controller through its own port's meter; an
    unannotated port's or another tenant's ARP reply to the resolver MAC is dropped in the
    switch, so no flood can starve a backend's answers (its meter is its alone)."""
    state = run(STRICT, f"R L {MB.mac} 10.0.0.2 0 * 10.0.0.3")
    answers = [f for f in compile_switch(state, DPID, Surroundings(TrustMode.ANNOTATIONS, INVENTORY)).flows
               if ("controller",) in f.actions]
    assert [(dict(f.match)["in_port"], f.actions) for f in answers] == [
        (BACKEND.port, (("meter", port_meter(BACKEND.port)), ("controller",)))]
    switch = installed(state, Surroundings(TrustMode.ANNOTATIONS, INVENTORY, metered=False))
    try:
        reply = dict(eth_dst=F.RESOLVER_MAC, eth_type=0x0806, arp_op=2, arp_tha=F.RESOLVER_MAC)
        backend = switch.trace(BACKEND.port, eth_src=BACKEND.mac, arp_sha=BACKEND.mac, arp_spa="10.0.0.3", **reply)
        assert backend.verdict == "controller"
        stranger = switch.trace(CLIENT_PORT, eth_src="02:ee:00:00:00:01", arp_sha="02:ee:00:00:00:01",
                                arp_spa="10.7.7.7", **reply)
        victim = switch.trace(VICTIM.port, eth_src=VICTIM.mac, arp_sha=VICTIM.mac, arp_spa="10.0.0.5", **reply)
        assert (stranger.verdict, victim.verdict) == ("drop", "drop")
    finally:
        switch.close()


# --- port security: no probes for others' addresses, no rogue RA or DHCP server ------------------------

@pytest.fixture
def secured():
    switch = installed(State(), Surroundings(TrustMode.ANNOTATIONS, INVENTORY, metered=False))
    yield switch
    switch.close()


def test_a_vm_cannot_probe_for_another_vms_address(secured):
    """RFC 5227 / RFC 4862: a probe or DAD for an address from someone else is a conflict
    for a host configuring it: blue can keep red from (re)configuring its addresses."""
    probe = secured.trace(VICTIM.port, eth_src=VICTIM.mac, eth_dst="ff:ff:ff:ff:ff:ff", eth_type=0x0806, arp_op=1,
                          arp_sha=VICTIM.mac, arp_spa="0.0.0.0", arp_tpa="10.0.0.3")
    dad = secured.trace(VICTIM.port, eth_src=VICTIM.mac, eth_type=0x86DD, ip_proto=58, ipv6_src="::",
                        ipv6_dst="ff02::1:ff00:2", icmpv6_type=135, ipv6_nd_target="fd00::2",
                        ipv6_nd_sll="00:00:00:00:00:00")
    assert (probe.verdict, dad.verdict) == ("drop", "drop")


def test_a_vm_cannot_act_as_router_or_dhcp_server_for_other_tenants(secured):
    ra = secured.trace(VICTIM.port, eth_src=VICTIM.mac, eth_dst="33:33:00:00:00:01", eth_type=0x86DD, ip_proto=58,
                       ipv6_src=link_local(VICTIM.mac), ipv6_dst="ff02::1", icmpv6_type=134)
    offer = secured.trace(VICTIM.port, eth_src=VICTIM.mac, eth_dst="ff:ff:ff:ff:ff:ff", eth_type=0x0800,
                          ip_proto=17, ipv4_src="10.0.0.5", ipv4_dst="255.255.255.255", udp_src=67, udp_dst=68)
    assert (ra.verdict, offer.verdict) == ("drop", "drop"), "rogue RA / DHCP offers reach every tenant"


# --- a dead redirect squats no backend ---------------

def test_a_dead_redirect_does_not_squat_an_address_now_of_another_tenant():
    state = run(STRICT, f"R L {MB.mac} 10.0.0.2 0 * 10.0.0.3")
    # web1 is deleted; the operator gives 10.0.0.3 to a new blue VM.
    blue_web = PortIdentity(6, "02:00:00:00:00:66", "blue", "bweb", ("10.0.0.3",), "bweb-eth0")
    inventory = build_inventory([MB, BACKEND2, VICTIM, blue_web])
    assert not [f for f in compile_middlebox(state.find(DPID, MB.mac), Surroundings(TrustMode.ANNOTATIONS, inventory)
                                             ).flows if f.priority == F.REDIRECT_REPLY]  # red cannot use it
    blue = Binding(DPID, VICTIM.port, TrustMode.ANNOTATIONS, inventory)
    assert apply(state, blue, parse_command(f"R L {VICTIM.mac} 10.0.0.5 0 * 10.0.0.3")).state.find(DPID, VICTIM.mac)


# --- IPv6 backends are health-checked ------------------------------------------------

def test_a_silent_ipv6_backend_leaves_the_pool(service):
    service.connect()
    service.set_inventory(DPID, PORTS + [BACKEND6])
    answer = service.execute(CommandRequest(DPID, MB.port, f"R L {MB.mac} fd00::2 0 * fd00::6"))
    assert answer.status == "OK", answer
    # Nobody answers the neighbour solicitations for fd00::6: it goes down after down_after.
    wait_until(lambda: (service._check_backends(), "fd00::6" in service.health[DPID].reported)[1], timeout=5,
               what="the silent IPv6 backend down")
    assert service.backend_states(DPID, MB.mac) == {"fd00::6": "down"}


# --- addresses that can be nobody's are refused ---------------------------------

@pytest.mark.parametrize("address", ["0.0.0.0", "255.255.255.255", "224.0.0.1", "fd00::9%eth0"])
def test_an_inventory_cannot_annotate_the_unspecified_or_broadcast_address(address):
    """Such a port is refused (with the reason), never enforced: its claim drop would stop
    every unannotated port's DHCP discover (0.0.0.0) or broadcasts."""
    body = {"ports": [{"port": 5, "mac": VICTIM.mac, "tenant": "blue", "ips": ["10.0.0.5", address]}]}
    inventory = build_inventory(inventory_from_body(body))
    assert not inventory.ports and address in inventory.refused[0].reason
    switch = installed(State(), Surroundings(TrustMode.ANNOTATIONS, inventory, metered=False))
    try:
        discover = switch.trace(CLIENT_PORT, eth_src="02:ee:00:00:00:01", eth_dst="ff:ff:ff:ff:ff:ff",
                                eth_type=0x0800, ip_proto=17, ipv4_src="0.0.0.0", ipv4_dst="255.255.255.255",
                                udp_src=68, udp_dst=67)
        assert discover.verdict == "normal", "accepted, and every unannotated port's DHCP discover is dropped"
    finally:
        switch.close()


# --- a burst of inventory changes costs one convergence ----------------------------------

def test_inventory_churn_queues_one_convergence_not_one_per_put(service):
    service.connect()
    reconciler = service.reconcilers[DPID]
    for i in range(200):  # no yield in between: as a burst of PUTs handled before the reconciler runs
        service.set_inventory(DPID, PORTS if i % 2 else PORTS[:-1])
    queued = sum(1 for job in reconciler.jobs if job.kind == "converge")
    assert queued <= 1, f"{queued} full converge jobs queued ahead of every tenant's commands"


# --- conjunction ids stay within their zone --------------------------------------------

def test_limits_keep_conjunction_ids_within_one_zone():
    """filters.py: "conj_id = zone << 16 | index of the filter (model.Limits keeps < 2**16)"."""
    a, b = Middlebox(DPID, 2, MB.mac, zone=2), Middlebox(DPID, 3, BACKEND.mac, zone=3)
    assert conjunction_id(a, 1 << 16) == conjunction_id(b, 0)
    with pytest.raises(ValueError):
        Limits(filters=70000)


# --- the flow budget is counted with the current addresses ------

@pytest.mark.parametrize("service", [{"limits": Limits(flows=400)}], indirect=True)
def test_the_flow_budget_holds_after_the_addresses_change(service):
    service.connect()
    service.set_inventory(DPID, PORTS)
    assert service.execute(CommandRequest(DPID, MB.port, f"R F {MB.mac} 10.0.0.2")).status == "OK"
    assert service.execute(CommandRequest(DPID, MB.port, f"A {MB.mac} T 5 s 1025-65534 p tcp")).status == "OK"
    many = PortIdentity(MB.port, MB.mac, "red", "mb", tuple(f"10.0.0.{100 + i}" for i in range(60)) + ("10.0.0.2",),
                        "mb-eth0")
    service.set_inventory(DPID, [many, BACKEND, BACKEND2, VICTIM])
    late = service.execute(CommandRequest(DPID, MB.port, f"A {MB.mac} I 4 s 10.66.0.0/16"))
    # Counted again with the 61 addresses (a group form each): far past the budget now.
    assert (late.status, late.code) == ("REJECTED", "limit"), late


# --- one lab port cannot take every conntrack zone ------------------------------------

def test_one_unannotated_lab_port_cannot_take_every_zone_of_the_controller():
    lab = Binding(0xB2, LAB_PORT, TrustMode.LAB, build_inventory([]))
    state = run(lab, *(f"R F 02:aa:00:00:00:{i:02x} 10.8.0.{i}" for i in range(1, Limits().per_port + 1)))
    with pytest.raises(ApplyError) as refused:
        apply(state, lab, parse_command("R F 02:aa:00:00:01:00 10.8.1.0"))
    assert refused.value.code == "limit" and len(state.middleboxes) == Limits().per_port
