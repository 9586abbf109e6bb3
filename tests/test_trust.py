"""The trust model without a switch: annotations, duplicate identities, who may register
what, port security, backends located by annotations and their health; and the shell's
decisions about them on a fake switch that applies the real encoded messages."""

from __future__ import annotations

import pytest

from fakeswitch import FakeSwitch, wait_until
from mbvisor.controller import flows as F
from mbvisor.controller.flows import Neighbour, Surroundings, compile_middlebox, compile_switch
from mbvisor.controller.health import BackendHealth
from mbvisor.controller.ingress import compile_ingress, link_local
from mbvisor.controller.model import ApplyError, Binding, Limits, State, apply
from mbvisor.controller.pipeline import BACKEND_ANSWER, CLAIMED, INGRESS_TABLE, OFFLOAD_TABLE, port_cookie
from mbvisor.controller.requests import CommandRequest
from mbvisor.controller.service import Controller, Settings
from mbvisor.controller.store import Store
from mbvisor.controller.trust import (Inventory, PortIdentity, TrustMode, build_inventory, check_backends,
                                      check_registration, unusable_address)
from mbvisor.guest.grammar import parse_command

DPID = 0xA1
MB = PortIdentity(2, "02:00:00:00:00:02", "red", "mb", ("10.0.0.2", "fd00::2"), "mb-eth0")
BACKEND = PortIdentity(3, "02:00:00:00:00:03", "red", "web1", ("10.0.0.3",), "web1-eth0")
BACKEND2 = PortIdentity(4, "02:00:00:00:00:04", "red", "web2", ("10.0.0.4",), "web2-eth0")
VICTIM = PortIdentity(5, "02:00:00:00:00:05", "blue", "victim", ("10.0.0.5",), "victim-eth0")
CLIENT_PORT = 1
PORTS = [MB, BACKEND, BACKEND2, VICTIM]
INVENTORY = build_inventory(PORTS)
STRICT = Binding(DPID, MB.port, TrustMode.ANNOTATIONS, INVENTORY)


def run(binding: Binding, *texts: str, state: State | None = None) -> State:
    state = state or State()
    for text in texts:
        state = apply(state, binding, parse_command(text)).state
    return state


def refused(binding: Binding, text: str, state: State | None = None) -> str:
    with pytest.raises(ApplyError) as error:
        apply(state or State(), binding, parse_command(text))
    return error.value.code


# --- the inventory ------------------------------------------------------------------------

def test_duplicated_identities_refuse_every_port_involved_never_the_first_comer():
    twin = PortIdentity(9, MB.mac, "red", "impostor", ("10.0.0.9",), "imp-eth0")
    squatter = PortIdentity(10, "02:00:00:00:00:10", "blue", "squat", ("10.0.0.3",), "sq-eth0")
    inventory = build_inventory([*PORTS, twin, squatter])
    assert set(inventory.ports) == {BACKEND2.port, VICTIM.port}
    reasons = {r.port: r.reason for r in inventory.refused}
    assert set(reasons) == {MB.port, twin.port, BACKEND.port, squatter.port}
    assert f"MAC {MB.mac} is claimed by imp-eth0 (port 9), mb-eth0 (port 2)" in reasons[MB.port]
    assert "address 10.0.0.3" in reasons[squatter.port]
    assert inventory.owner("10.0.0.3") is None and inventory.owner("10.0.0.4") == BACKEND2
    same_port = build_inventory([MB, PortIdentity(MB.port, "02:00:00:00:00:22", "red", ips=("10.0.0.22",))])
    assert not same_port.ports and len(same_port.refused) == 2


def test_addresses_that_can_be_nobodys_are_refused_without_probing():
    for address in ("127.0.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1", "::", "::1", "ff02::1", "fe80::1",
                    "240.0.0.1", "not-an-ip"):
        assert unusable_address(address), address
    for address in ("10.0.0.3", "192.0.2.7", "2001:db8::3"):
        assert unusable_address(address) is None


def test_a_middlebox_speaks_only_for_its_own_port_mac_and_addresses():
    assert check_registration(TrustMode.ANNOTATIONS, INVENTORY, MB.port, MB.mac, "10.0.0.2") is None
    assert check_registration(TrustMode.ANNOTATIONS, INVENTORY, MB.port, MB.mac, "fd00::2") is None
    assert check_registration(TrustMode.ANNOTATIONS, INVENTORY, MB.port, MB.mac, "10.0.0.5")[0] == "foreign-address"
    assert check_registration(TrustMode.ANNOTATIONS, INVENTORY, MB.port, VICTIM.mac, None)[0] == "foreign-mac"
    assert check_registration(TrustMode.ANNOTATIONS, INVENTORY, 77, MB.mac, None)[0] == "unannotated-port"
    assert check_registration(TrustMode.LAB, INVENTORY, 77, "02:00:00:00:00:77", "10.9.9.9") is None  # the lab opt-in
    assert check_registration(TrustMode.LAB, INVENTORY, 77, MB.mac, "10.9.9.9")[0] == "foreign-mac"
    assert check_registration(TrustMode.LAB, INVENTORY, MB.port, MB.mac, "10.0.0.5")[0] == "foreign-address"
    assert check_registration(TrustMode.LAB, INVENTORY, 77, MB.mac, "127.0.0.1")[0] == "bad-address"
    # Annotated VMs are protected in a lab too: an unannotated guest cannot claim their addresses.
    assert check_registration(TrustMode.LAB, INVENTORY, 77, "02:00:00:00:00:77", "10.0.0.5")[0] == "foreign-address"


def test_backends_are_other_vms_of_the_same_tenant_on_this_switch():
    ok = lambda *b: check_backends(TrustMode.ANNOTATIONS, INVENTORY, MB.port, b)  # noqa: E731
    assert ok("10.0.0.3", "10.0.0.4") is None
    assert ok("10.0.0.5")[0] == "foreign-backend"
    assert ok("10.0.0.99")[0] == "unknown-backend"
    assert ok("10.0.0.2")[0] == "bad-backend"  # its own address
    assert ok("224.0.0.1")[0] == "bad-backend"
    assert check_backends(TrustMode.LAB, Inventory(), 77, ["10.9.9.9"]) is None
    assert check_backends(TrustMode.LAB, Inventory(), 77, ["0.0.0.0"])[0] == "bad-backend"
    assert check_backends(TrustMode.LAB, INVENTORY, 77, ["10.0.0.3"])[0] == "foreign-backend"


def test_the_model_refuses_the_hijacks_of_the_issue_and_changes_nothing():
    state = run(STRICT, f"R F {MB.mac} 10.0.0.2")
    assert refused(STRICT, f"R L {MB.mac} 10.0.0.5 0 * 10.0.0.3", state) == "foreign-address"
    assert refused(STRICT, f"R L {MB.mac} 10.0.0.2 1 203.0.113.9 10.0.0.5", state) == "foreign-backend"
    assert refused(STRICT, f"R F {VICTIM.mac} 10.0.0.5", state) == "foreign-mac"
    assert refused(STRICT, f"A {VICTIM.mac} I 4 s 10.66.0.0/16", state) == "foreign-mac"
    assert refused(Binding(DPID, 77, TrustMode.ANNOTATIONS, INVENTORY), f"R F {MB.mac} 10.0.0.2") == "unannotated-port"
    # Cancels and queries touch only the middlebox's own offloads: always allowed.
    assert apply(state, Binding(DPID, MB.port, TrustMode.ANNOTATIONS, Inventory()), parse_command(f"X {MB.mac}"))
    balanced = run(STRICT, f"R L {MB.mac} 10.0.0.2 0 * 10.0.0.3,10.0.0.4", state=state)
    assert balanced.find(DPID, MB.mac).redirects[0].backends == ("10.0.0.3", "10.0.0.4")


# --- port security --------------------------------------------------------------------------

def test_thousands_of_ports_claiming_one_identity_get_short_reasons():
    """A hostile inventory (4,096 ports, one MAC, the same 64 addresses) once made every
    refusal name all 4,096 ports 65 times: gigabytes, and the controller wedged."""
    crowd = [PortIdentity(port, "02:00:00:00:00:01", "red", f"vm{port}", tuple(f"10.0.0.{n}" for n in range(1, 65)),
                          f"eth{port}") for port in range(1, 4097)]
    inventory = build_inventory(crowd)
    assert not inventory.ports and len(inventory.refused) == 4096
    reason = next(r.reason for r in inventory.refused if r.port == 7)
    assert "MAC 02:00:00:00:00:01 is claimed by eth1 (port 1), eth10 (port 10), eth100 (port 100), " \
           "eth1000 (port 1000) and 4092 more" in reason
    assert reason.endswith("; and 61 more")  # the MAC and 64 addresses: 65 reasons, four of them spelled out
    assert max(len(r.reason) for r in inventory.refused) < 1_000


def test_port_security_flows_allow_own_identity_and_drop_claims_of_it_elsewhere():
    flows = compile_ingress(build_inventory([BACKEND]))
    assert all(f.table == INGRESS_TABLE for f in flows)
    assert {f.cookie for f in flows} == {port_cookie(0), port_cookie(BACKEND.port)}
    claimed = {tuple(sorted(dict(f.match).items())) for f in flows if f.priority == CLAIMED}
    assert (("eth_src", BACKEND.mac),) in claimed
    assert (("arp_spa", "10.0.0.3"), ("eth_type", 0x0806)) in claimed
    assert (("eth_type", 0x0800), ("ipv4_src", "10.0.0.3")) in claimed
    assert link_local("02:00:00:00:00:03") == "fe80::ff:fe00:3"


@pytest.fixture
def secured():
    """A fake switch holding the base flows of a switch with the four annotated ports."""
    with FakeSwitch(DPID, ports=(1, 2, 3, 4, 5, 6)) as switch:
        config = compile_switch(State(), DPID, Surroundings(TrustMode.ANNOTATIONS, INVENTORY, metered=False))
        from mbvisor.controller.ofmessages import flow_mod
        for flow in config.flows:
            switch.tables.flow_mod(_decoded(switch, flow_mod(switch.datapath, flow, "add")))
        yield switch


def _decoded(switch, message):
    from fakeswitch import decode
    switch.datapath.set_xid(message)
    message.serialize()
    return decode(switch.datapath, bytes(message.buf))


def test_spoofed_frames_from_an_annotated_port_go_nowhere(secured):
    own = dict(eth_src=VICTIM.mac, eth_type=0x0800, ipv4_src="10.0.0.5", ipv4_dst="10.0.0.3")
    assert secured.trace(VICTIM.port, **own).verdict == "normal"
    assert secured.trace(VICTIM.port, **{**own, "eth_src": BACKEND.mac}).verdict == "drop"  # another's MAC
    assert secured.trace(VICTIM.port, **{**own, "ipv4_src": "10.0.0.3"}).verdict == "drop"  # another's IP
    arp = dict(eth_src=VICTIM.mac, eth_type=0x0806, arp_sha=VICTIM.mac)
    assert secured.trace(VICTIM.port, **arp, arp_spa="10.0.0.5").verdict == "normal"
    assert secured.trace(VICTIM.port, **arp, arp_spa="10.0.0.3").verdict == "drop"  # poisoning a backend's address
    assert secured.trace(VICTIM.port, **own, vlan_vid=0x1000 | 7).verdict == "drop"  # tagged on an access port


def test_an_unannotated_port_cannot_claim_an_annotated_identity(secured):
    free = CLIENT_PORT
    assert secured.trace(free, eth_src="02:00:00:00:00:99", eth_type=0x0800, ipv4_src="10.7.7.7").verdict == "normal"
    assert secured.trace(free, eth_src=BACKEND.mac, eth_type=0x0800, ipv4_src="10.7.7.7").verdict == "drop"
    assert secured.trace(free, eth_src="02:00:00:00:00:99", eth_type=0x0800, ipv4_src="10.0.0.3").verdict == "drop"
    assert secured.trace(free, eth_src="02:00:00:00:00:99", eth_type=0x0806, arp_spa="10.0.0.3").verdict == "drop"
    # ... nor announce its MAC one layer up, in ARP or neighbour discovery.
    assert secured.trace(free, eth_src="02:00:00:00:00:99", eth_type=0x0806, arp_spa="10.7.7.7",
                         arp_sha=BACKEND.mac).verdict == "drop"
    nd = dict(eth_src="02:00:00:00:00:99", eth_type=0x86DD, ip_proto=58, ipv6_src="2001:db8::99")
    assert secured.trace(free, **nd, icmpv6_type=136, ipv6_nd_tll=BACKEND.mac).verdict == "drop"
    assert secured.trace(free, **nd, icmpv6_type=135, ipv6_nd_sll=BACKEND.mac).verdict == "drop"
    assert secured.trace(free, **nd, icmpv6_type=135, ipv6_nd_sll="02:00:00:00:00:99").verdict == "normal"
    # An annotated port announces only its own link address.
    own_nd = dict(eth_src=MB.mac, eth_type=0x86DD, ip_proto=58, ipv6_src="fd00::2", icmpv6_type=135)
    assert secured.trace(MB.port, **own_nd, ipv6_nd_sll=MB.mac).verdict == "normal"
    assert secured.trace(MB.port, **own_nd, ipv6_nd_sll="02:00:00:00:00:99").verdict == "drop"


# --- backends ---------------------------------------------------------------------------------

def test_annotations_locate_backends_and_ignore_arp_answers():
    state = run(STRICT, f"R L {MB.mac} 10.0.0.2 0 * 10.0.0.3,10.0.0.4")
    mb = state.find(DPID, MB.mac)
    lies = {"10.0.0.3": Neighbour(VICTIM.mac, VICTIM.port)}  # what a forged ARP reply would say
    config = compile_middlebox(mb, Surroundings(TrustMode.ANNOTATIONS, INVENTORY, lies))
    outputs = {a[1] for f in config.flows for a in f.actions if a[0] == "output"}
    assert outputs == {BACKEND.port, BACKEND2.port}
    replies = [dict(f.match) for f in config.flows if f.priority == F.REDIRECT_REPLY]
    assert {(m["in_port"], m["eth_src"], m["ipv4_src"]) for m in replies} == {
        (BACKEND.port, BACKEND.mac, "10.0.0.3"), (BACKEND2.port, BACKEND2.mac, "10.0.0.4")}


def test_a_middlebox_its_annotations_no_longer_vouch_for_gets_no_flows():
    state = run(STRICT, f"R F {MB.mac} 10.0.0.2", f"A {MB.mac} I 4 s 10.66.0.0/16")
    mb = state.find(DPID, MB.mac)
    assert compile_middlebox(mb, Surroundings(TrustMode.ANNOTATIONS, INVENTORY)).flows
    moved = build_inventory([PortIdentity(MB.port, MB.mac, "red", ips=("10.0.0.20",))])
    assert not compile_middlebox(mb, Surroundings(TrustMode.ANNOTATIONS, moved)).flows
    assert not compile_middlebox(mb, Surroundings(TrustMode.ANNOTATIONS, Inventory())).flows


def test_down_backends_leave_the_pool_and_a_redirect_with_none_steps_aside():
    state = run(STRICT, f"R L {MB.mac} 10.0.0.2 0 * 10.0.0.3,10.0.0.4")
    mb = state.find(DPID, MB.mac)
    one_down = compile_middlebox(mb, Surroundings(TrustMode.ANNOTATIONS, INVENTORY, down=frozenset({"10.0.0.3"})))
    (group,) = one_down.groups
    assert len(group.buckets) == 1
    assert {a[1] for f in one_down.flows for a in f.actions if a[0] == "output"} == {BACKEND2.port}
    all_down = compile_middlebox(mb, Surroundings(TrustMode.ANNOTATIONS, INVENTORY,
                                                  down=frozenset({"10.0.0.3", "10.0.0.4"})))
    # Only the backends' health answers stay (so they can come back); no traffic is redirected.
    assert {f.priority for f in all_down.flows} == {BACKEND_ANSWER} and all_down.groups == frozenset()


def test_health_bookkeeping_over_an_explicit_clock():
    health = BackendHealth(down_after=3.0)
    health.checking({"10.0.0.3", "10.0.0.4"}, now=0.0)
    assert health.down(2.9) == frozenset()  # up until checks prove otherwise
    health.answered("10.0.0.3", 0.1)
    assert health.down(3.5) == {"10.0.0.4"}  # its check of 0.0 is still unanswered
    health.checking({"10.0.0.3", "10.0.0.4"}, now=4.0)
    assert health.down(7.5) == {"10.0.0.3", "10.0.0.4"}  # 10.0.0.3's check of 4.0 unanswered
    health.answered("10.0.0.4", 7.6)
    assert health.settle(7.7) == ({"10.0.0.3"}, frozenset()) and health.reported == {"10.0.0.3"}
    health.answered("10.0.0.3", 7.8)
    assert health.settle(7.9) == (frozenset(), {"10.0.0.3"}) and health.settle(7.9) == (frozenset(), frozenset())
    health.checking({"10.0.0.4"}, now=8.0)  # 10.0.0.3 no longer in use: forgotten
    assert health.down(100.0) == {"10.0.0.4"}


def test_a_busy_controller_makes_no_backend_flap():
    """Checks the controller was too busy to send prove nothing: a backend that answered
    every check sent stays up, however long since its last answer."""
    health = BackendHealth(down_after=3.0)
    health.checking({"10.0.0.3"}, now=0.0)
    health.answered("10.0.0.3", 0.01)
    health.checking({"10.0.0.3"}, now=10.0)  # the next check, 10 s late
    assert health.settle(10.0) == (frozenset(), frozenset())
    health.answered("10.0.0.3", 10.01)
    assert health.down(20.0) == frozenset()


# --- the shell ----------------------------------------------------------------------------------

@pytest.fixture
def service(tmp_path, request):
    """The service on fake switches; ``indirect`` parametrisation may change its settings."""
    settings = {"audit_interval": 0, "backend_check_interval": 0, "backend_down_after": 0.3,
                **getattr(request, "param", {})}
    made = Controller(Settings(database=tmp_path / "controller.sqlite", **settings))
    fakes = []

    def connect():
        fake = FakeSwitch(DPID, ports=(1, 2, 3, 4, 5, 6, 7), sink=lambda m: _deliver(made, m))
        fakes.append(fake)
        made.switch_connected(fake.datapath)
        wait_until(lambda: made.reconcilers[DPID].synced, what="first reconciliation")
        return fake

    made.connect = connect
    yield made
    made.close()
    for fake in fakes:
        fake.close()


def _deliver(service: Controller, message) -> None:
    name = type(message).__name__
    if name == "OFPSwitchFeatures":
        service.switch_connected(message.datapath)
    elif name == "OFPPacketIn":
        service.packet_in(message)
    elif name == "OFPPortStatus" and message.reason == message.datapath.ofproto.OFPPR_DELETE:
        service.port_deleted(message.datapath.id, message.desc.port_no)
    else:
        service.receive(message)


def _command(service: Controller, text: str, port: int = MB.port):
    return service.execute(CommandRequest(DPID, port, text))


def test_published_annotations_secure_the_switch_and_survive_a_restart(service, tmp_path):
    fake = service.connect()
    assert _command(service, f"R F {MB.mac} 10.0.0.2").code == "unannotated-port"  # the product default
    service.set_inventory(DPID, PORTS)
    wait_until(lambda: fake.flows(INGRESS_TABLE) and any(f.cookie == port_cookie(VICTIM.port)
                                                       for f in fake.flows(INGRESS_TABLE)), what="port security")
    spoof = dict(eth_src=BACKEND.mac, eth_type=0x0800, ipv4_src="10.0.0.5")
    assert fake.trace(VICTIM.port, **spoof).verdict == "drop"
    assert _command(service, f"R F {MB.mac} 10.0.0.2").status == "OK"
    assert _command(service, f"R F {VICTIM.mac} 10.0.0.5").code == "foreign-mac"
    assert fake.tables.meters == {F.CONTROLLER_METER}
    # Stored: a restarted controller enforces the annotations before the agent speaks again.
    assert [e.port for e in Store(service.settings.database).load_inventories()[DPID]] == [p.port for p in PORTS]
    # An operator who removes the middlebox's annotations takes its offloads away.
    service.set_inventory(DPID, [BACKEND, BACKEND2, VICTIM])
    wait_until(lambda: not [f for f in fake.flows(OFFLOAD_TABLE) if f.cookie == F.cookie_of(MB.mac)],
               what="the unvouched middlebox's flows removed")


def test_a_silent_backend_leaves_the_pool_and_returns_when_it_answers(service):
    fake = service.connect()
    service.set_inventory(DPID, PORTS)
    assert _command(service, f"R L {MB.mac} 10.0.0.2 0 * 10.0.0.3,10.0.0.4").status == "OK"
    fake.add_host("10.0.0.4", BACKEND2.mac, BACKEND2.port)  # answers ARP checks; 10.0.0.3 does not

    def pool() -> set[int]:
        return {a.port for f in fake.flows(F.BACKEND_TABLE) for i in f.instructions for a in getattr(i, "actions", [])
                if type(a).__name__ == "OFPActionOutput"}

    assert pool() == {BACKEND.port, BACKEND2.port}
    wait_until(lambda: (service._check_backends(), pool() == {BACKEND2.port})[1], timeout=5,
               what="the silent backend out of the pool")
    assert service.metrics.backends.labels(f"{DPID:016x}", "10.0.0.3")._value.get() == 0
    assert service.backend_states(DPID, MB.mac) == {"10.0.0.3": "down", "10.0.0.4": "up"}
    fake.add_host("10.0.0.3", BACKEND.mac, BACKEND.port)
    wait_until(lambda: (service._check_backends(), pool() == {BACKEND.port, BACKEND2.port})[1], timeout=5,
               what="the backend back in the pool")


def test_an_arp_reply_for_an_annotated_address_from_another_port_is_ignored(service):
    service.connect()
    service.set_inventory(DPID, PORTS)
    service.health[DPID] = BackendHealth(0.3)
    service.health[DPID].checking({"10.0.0.3"}, now=0.0)
    service.arp_reply(DPID, "10.0.0.3", VICTIM.mac, VICTIM.port)  # forged: the victim's port claims it
    assert "10.0.0.3" in service.health[DPID].unanswered and not service.neighbours_of(DPID)
    service.arp_reply(DPID, "10.0.0.3", BACKEND.mac, BACKEND.port)
    assert "10.0.0.3" not in service.health[DPID].unanswered


@pytest.mark.parametrize("service", [{"limits": Limits(flows=400)}], indirect=True)
def test_a_filters_cost_in_switch_entries_is_bounded(service):
    """Limits count switch entries: a range x range filter is a conjunction (304 entries,
    not 1,740), and what would pass the middlebox's budget is refused, changing nothing."""
    fake = service.connect()
    service.set_inventory(DPID, PORTS)
    assert _command(service, f"R F {MB.mac} 10.0.0.2").status == "OK"
    assert _command(service, f"A {MB.mac} T 13 s 1025-65534 d 1-65534 p tcp").status == "OK"
    mine = lambda: [f for f in fake.flows() if f.cookie == F.cookie_of(MB.mac)]  # noqa: E731
    spent = len(mine())
    assert spent < 400
    refused = _command(service, f"A {MB.mac} T 13 s 1025-65534 d 1-65533 p udp")
    assert (refused.status, refused.code) == ("REJECTED", "limit") and "switch entries" in refused.text
    assert len(mine()) == spent
    assert _command(service, f"A {MB.mac} I 4 s 10.66.0.0/16").status == "OK"  # cheap ones still fit


def test_a_deleted_port_loses_its_annotations_so_a_reused_number_speaks_for_nobody(service):
    """security.md rule 4: a VM given a deleted port's number must not inherit its identity
    until the agent publishes again; its port security goes, and so does its middlebox."""
    fake = service.connect()
    service.set_inventory(DPID, PORTS)
    assert _command(service, f"R F {MB.mac} 10.0.0.2").status == "OK"
    fake.remove_port(MB.port)  # OFPPortStatus DELETE through the service
    wait_until(lambda: service.inventory_of(DPID).at(MB.port) is None and service.state.find(DPID, MB.mac) is None,
               what="the port's annotations and middlebox gone")
    assert [e.port for e in Store(service.settings.database).load_inventories()[DPID]] == [3, 4, 5]
    assert _command(service, f"R F {MB.mac} 10.0.0.2").code == "unannotated-port"
    wait_until(lambda: not any(f.cookie == port_cookie(MB.port) for f in fake.flows(INGRESS_TABLE)),
               what="its port security removed")
