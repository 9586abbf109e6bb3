"""The multi-host lab (topologies/datacentre.py) with real packets: three hypervisors, each
its own ovs-vswitchd in its own namespace, its own ovsdb-server and agent, one controller
over TCP, VMs in namespaces, an underlay chaining the bridges (hv0 - hv1 - hv2)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from mbvisor.controller.pipeline import COOKIE_TAG, COOKIE_TAG_MASK, cookie_of
from mbvisor.topologies import datacentre
from mbvisor.topologies.datacentre import DataCentre, Hypervisor
from mbvisor.topologies.netlab import leftovers, run, wait_until

pytestmark = pytest.mark.host

MBVISOR_FLOWS = f"cookie={COOKIE_TAG:#x}/{COOKIE_TAG_MASK:#x}"


@pytest.fixture(scope="module")
def dc():
    with DataCentre(hypervisors=3) as built:
        yield built


def mbctl(vm, *arguments: str) -> tuple[int, dict]:
    """The real mbctl, run by the middlebox in its own namespace, through its channel."""
    done = vm.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", vm.region, "--json", "--timeout", "10",
                   *arguments], check=False, timeout=60)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def own_flows(bridge, mac: str) -> list:
    return bridge.flows(f"cookie={cookie_of(mac):#x}/-1")


def dropped(bridge, mac: str) -> int:
    return sum(f.n_packets for f in own_flows(bridge, mac) if f.actions == "drop")


def test_a_vm_reaches_vms_on_other_hypervisors_only_through_the_underlay(dc):
    client, near, far = dc.add_vm(0, "client"), dc.add_vm(1, "near"), dc.add_vm(2, "far")
    assert client.ping(near, count=3) == 3
    assert client.ping(far, count=3) == 3  # across hypervisor 1's bridge
    middle = dc.hypervisors[1]
    middle.in_namespace("ip", "link", "set", "ul2", "down")
    try:
        assert client.ping(far, count=3, timeout=1) == 0  # no other way between the hypervisors
        assert client.ping(near, count=3) == 3
    finally:
        middle.in_namespace("ip", "link", "set", "ul2", "up")
    wait_until(lambda: client.ping(far, count=1, timeout=0.5) == 1, 15, "the underlay back")


def test_the_controller_lists_every_hypervisors_switch_and_each_has_its_own_parts(dc):
    switches = {s["dpid"]: s for s in dc.controller.get("/v1/switches")[1]["switches"]}
    assert set(switches) == {f"{h.dpid:016x}" for h in dc.hypervisors} and len(switches) == 3
    assert all(s["connected"] and s["synced"] for s in switches.values())
    for hypervisor in dc.hypervisors:
        # its switch runs in its own namespace and talks to the one controller over TCP
        assert run(["ip", "netns", "identify", str(hypervisor.vswitchd_pid)]).stdout.strip() == hypervisor.namespace
        assert hypervisor.bridge.vsctl("get-controller", hypervisor.bridge.name) == dc.openflow_target
        # its agent follows its own ovsdb-server, not the machine's
        ovsdb = hypervisor.agent.status()["ovsdb"]
        assert ovsdb["remote"] == hypervisor.db and ovsdb["connected"] is True
        assert set(hypervisor.agent.inventories()) == {hypervisor.bridge.name}


def test_a_filter_on_one_hypervisor_drops_there_and_nowhere_else(dc):
    mb, target, attacker = dc.add_vm(0, "fw", channel=True), dc.add_vm(1, "target"), dc.add_vm(2, "attacker")
    dc.lab.fill_arp([mb, target, attacker])
    for vm in (mb, target):  # every bridge learns both MACs: nothing is flooded to the wrong VM below
        assert attacker.ping(vm, count=1) == 1
    before = mb.rx_packets()
    attacker.send_udp(mb, 9, count=10)
    wait_until(lambda: mb.rx_packets() - before >= 10, 10, "the attack reaching the middlebox before the filter")

    assert mbctl(mb, "register", "firewall", "--mac", mb.mac, "--ip", mb.ip)[0] == 0
    code, answer = mbctl(mb, "filter", "add", "--mac", mb.mac, "--layer", "ip", "--src", attacker.ip)
    assert code == 0 and answer["status"] == "OK"
    reached, drops = mb.rx_packets(), dropped(dc.bridge(0), mb.mac)
    attacker.send_udp(mb, 9, count=20)
    wait_until(lambda: dropped(dc.bridge(0), mb.mac) - drops >= 20, 10, "the attack dropped on hypervisor 0")
    assert mb.rx_packets() == reached

    arrived = target.rx_packets()
    attacker.send_udp(target, 9, count=20)
    wait_until(lambda: target.rx_packets() - arrived >= 20, 10, "the same traffic reaching hypervisor 1's VM")
    assert mb.rx_packets() == reached
    assert own_flows(dc.bridge(0), mb.mac)
    assert own_flows(dc.bridge(1), mb.mac) == own_flows(dc.bridge(2), mb.mac) == []


def mbvisor_flows(hypervisor: Hypervisor) -> list[str]:
    return sorted(hypervisor.bridge.dump_flows(MBVISOR_FLOWS, no_stats=True))


def test_a_crashed_hypervisor_delays_no_other_and_converges_to_its_desired_state(dc):
    fw_a, fw_b, client, far = dc.add_vm(0, "fwa"), dc.add_vm(1, "fwb"), dc.add_vm(0, "c2"), dc.add_vm(2, "f2")
    a, b = dc.hypervisors[0], dc.hypervisors[1]
    dc.controller.ok(a.dpid, fw_a.ofport, f"R F {fw_a.mac} {fw_a.ip}")
    dc.controller.ok(b.dpid, fw_b.ofport, f"R F {fw_b.mac} {fw_b.ip}")
    for n in range(3):
        dc.controller.ok(b.dpid, fw_b.ofport, f"A {fw_b.mac} I 4 s 10.77.0.{n + 1}")
    desired = mbvisor_flows(b)
    assert any(f"cookie={cookie_of(fw_b.mac):#x}" in line for line in desired)

    b.kill_vswitchd()
    wait_until(lambda: not dc.switch_view(1)["connected"], 10, "the controller to see hypervisor 1 go")
    answers, slowest = [], 0.0
    for n in range(20):
        started = time.monotonic()
        status, answer = dc.controller.command(a.dpid, fw_a.ofport, f"A {fw_a.mac} I 4 s 10.66.0.{n + 1}")
        slowest = max(slowest, time.monotonic() - started)
        answers.append((status, answer["status"]))
    status, answer = dc.controller.command(b.dpid, fw_b.ofport, f"A {fw_b.mac} I 4 s 10.77.0.99")
    assert answer["status"] == "UNAVAILABLE"  # hypervisor 1 was still down after the last command on 0
    assert answers == [(200, "OK")] * 20
    assert slowest < 5.0  # a command that waited on hypervisor 1 would take the switch link's deadline, 5 s
    view = dc.controller.get(f"/v1/middleboxes/{a.dpid:016x}/{fw_a.mac}")[1]
    assert len(view["filters"]) == 20

    restarted = time.time()
    b.start_vswitchd()
    dc.wait_synced(1, after=restarted)
    wait_until(lambda: mbvisor_flows(b) == desired, 20, "hypervisor 1's flows to be what they were")
    ages = [float(f.stats["duration"].rstrip("s")) for f in b.bridge.flows(MBVISOR_FLOWS)]
    assert max(ages) <= time.time() - restarted  # installed again by the controller, not left over
    assert client.ping(far, count=3) == 3  # the restarted bridge forwards the underlay again


def traces(dc: DataCentre) -> dict[str, list]:
    """What of the lab the machine still shows: namespaces, links, processes naming the
    lab (daemons, agents, controller: their arguments hold its directory), regions, the
    directory."""
    processes = [line for line in run(["ps", "-eww", "-o", "pid=,args="]).stdout.splitlines() if dc.prefix in line]
    return {**leftovers(dc.prefix), "processes": processes,
            "regions": [name for name in os.listdir("/dev/shm") if name.startswith(dc.prefix)],
            "directory": [dc.lab.workdir] if os.path.exists(dc.lab.workdir) else []}


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def namespace_pids(dc: DataCentre) -> list[int]:
    return [int(pid) for name in leftovers(dc.prefix)["netns"]
            for pid in run(["ip", "netns", "pids", name]).stdout.split()]


def test_closing_after_an_error_leaves_nothing_of_the_lab():
    with pytest.raises(RuntimeError, match="the test's own"), \
            DataCentre(hypervisors=2, hosts_per_hypervisor=1, channels=True) as lab:
        lab.vms["vm0-1"].popen(["sleep", "600"])
        seen, pids = traces(lab), lab.pids() + namespace_pids(lab)
        were_running = [pid for pid in pids if running(pid)]
        raise RuntimeError("the test's own")
    assert len(seen["netns"]) == 4 and len(seen["links"]) == 3 and len(seen["regions"]) == 2
    assert len(seen["processes"]) >= 7 and seen["directory"] and seen["bridges"] == []
    assert len(pids) >= 8 and were_running == pids  # controller, 2x3 daemons and agents, sleep
    assert traces(lab) == {key: [] for key in seen}
    assert [pid for pid in pids if running(pid)] == []
    assert not os.path.exists(f"/run/mbvisor-netlab/{lab.prefix}")


def test_a_build_that_fails_halfway_leaves_nothing(monkeypatch):
    seen = {}

    def broken_underlay(self, other, *beyond):
        seen.update(traces(built), pids=built.pids())
        raise RuntimeError("no underlay today")

    built = DataCentre(hypervisors=2)
    monkeypatch.setattr(Hypervisor, "link_to", broken_underlay)
    with pytest.raises(RuntimeError, match="no underlay today") as failure, built:
        pass
    assert len(seen["netns"]) == 2 and len(seen["pids"]) == 7  # the controller, both hypervisors, their agents
    notes = "\n".join(failure.value.__notes__)  # the logs that went with the lab's directory
    assert "controller.log:" in notes and "hv1/agent.log:" in notes and "agent: controller http" in notes
    assert traces(built) == {key: [] for key in seen if key != "pids"}
    assert [pid for pid in seen["pids"] if running(pid)] == []


def test_a_machine_without_root_or_tools_is_told_what_is_missing(monkeypatch):
    monkeypatch.setattr(datacentre.shutil, "which", lambda tool: None if tool == "ovs-vswitchd" else "/bin/x")
    monkeypatch.setattr(datacentre.os, "geteuid", lambda: 1000)
    with pytest.raises(datacentre.HostToolsMissing) as missing, DataCentre():
        pass
    assert "not root" in str(missing.value) and "ovs-vswitchd (Debian package openvswitch-switch)" in str(missing.value)
