"""The reconciler's record of installed flows (``Installed``) holds what the switch holds,
so audits can trust its count: one flow per identity whatever cookie had it before, on a
fake switch that applies the real encoded messages."""
from __future__ import annotations


from mbvisor.controller.pipeline import port_cookie
from mbvisor.controller.reconciler import Job
from mbvisor.controller.trust import PortIdentity

from test_controller_shell import BACKEND_PORT, DPID, MAC, MAC2, OTHER, audit, host  # noqa: F401  (fixture)

VM_MAC, VM_IP = "02:00:00:00:00:33", "10.0.0.33"


def settle(host) -> None:
    assert host.service.reconcilers[DPID].submit(Job("refresh")).done.wait(timeout=5)
    host.switches[DPID].settle()


def claimed(fake):
    """Table-0 flows that drop the VM's MAC from any other port, with their cookies."""
    return sorted((f.cookie, f.priority) for f in fake.flows(0) if ("eth_src", VM_MAC) in
                  [(n, v) for n, v in f.ofp_match().items()] and not any(n == "in_port" for n, _ in f.ofp_match().items()))


def test_a_vm_that_moves_to_another_port_leaves_the_record_and_the_switch_in_step(host):
    fake = host.switch()
    host.service.set_inventory(DPID, [PortIdentity(3, VM_MAC, "red", "vm", (VM_IP,), "vm-eth0")])
    settle(host)
    assert audit(host) == 0
    # The operator moves the VM to port 4 (same MAC and address).
    host.service.set_inventory(DPID, [PortIdentity(4, VM_MAC, "red", "vm", (VM_IP,), "vm-eth0")])
    settle(host)
    reconciler = host.service.reconcilers[DPID]
    assert {cookie for cookie, _ in claimed(fake)} == {port_cookie(4)}  # the claim moved with the VM
    assert reconciler.installed.flow_count() == fake.flow_count(), "the record counts a flow the switch does not hold"
    assert audit(host) == 0, "every audit lists the whole switch from now on"


def test_a_vm_that_moved_and_then_left_leaves_no_drop_flow_for_its_address(host):
    fake = host.switch()
    host.service.set_inventory(DPID, [PortIdentity(3, VM_MAC, "red", "vm", (VM_IP,), "vm-eth0")])
    settle(host)
    host.service.set_inventory(DPID, [PortIdentity(4, VM_MAC, "red", "vm", (VM_IP,), "vm-eth0")])
    settle(host)
    host.service.set_inventory(DPID, [])  # the VM is gone; its MAC and address are nobody's
    settle(host)
    audit(host)  # the periodic audit: its counts agree, so it looks no further
    left = claimed(fake)
    assert left == [], f"a drop flow for a MAC nobody owns is still on the switch: {left}"
    # Any port may now use that MAC: its frames are dropped until a full audit (10 min or more).
    assert fake.trace(1, eth_src=VM_MAC, eth_dst="02:00:00:00:00:99").verdict != "drop"


def test_an_unchanged_switch_with_a_balancer_is_audited_by_counting_alone(host):
    fake = host.switch()
    fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
    fake.add_host("10.0.0.12", "02:00:00:00:00:12", 4)
    host.ok(f"R L {MAC} 10.0.0.5 0 * 10.0.0.11,10.0.0.12", f"R L {MAC} 10.0.0.5 1 10.9.9.9 10.0.0.12")
    assert fake.groups
    assert audit(host) == 0
    assert audit(host) == 0


def test_a_second_middlebox_cannot_take_an_address_of_another_on_its_switch(host):
    """Two middleboxes with one address would compile the same group-frame flows under two
    cookies (one flow on the switch): cancelling one would remove the other's drop, and the
    count-only audit would not see it.  So an address is one middlebox's per switch."""
    host.switch().add_host("10.0.0.9", "02:00:00:00:00:09", BACKEND_PORT)
    host.switch(OTHER)
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    for text in (f"R F {MAC2} 10.0.0.5", f"R L {MAC2} 10.0.0.5 0 * 10.0.0.9"):
        refused = host.run(text, port=4)[0]
        assert (refused.status, refused.code) == ("REJECTED", "address-in-use")
    assert host.service.state.find(DPID, MAC2) is None
    host.ok(f"R F {MAC2} 10.0.0.5", dpid=OTHER)  # another switch: its own group frames
    host.ok(f"R F {MAC} 10.0.0.5", f"R L {MAC} 10.0.0.5 0 * 10.0.0.9")  # its own address, again
