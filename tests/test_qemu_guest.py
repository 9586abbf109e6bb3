"""A real middlebox VM (QEMU, TCG) on a real OVS bridge, with the real controller and agent:
the guest's own ``mbctl`` writes a firewall filter through the ivshmem device, and the
attack traffic that used to interrupt the guest (virtio-net input interrupts, read from
the guest's /proc/interrupts) is dropped in the switch instead.

Needs root, Open vSwitch, and the Debian packages qemu-system-x86, linux-image-cloud-amd64
and busybox-static (plus python3.11): the test FAILS, never skips, when one is missing.
The guest image is built on first use and cached (topologies/qemu/build-initramfs.py).
See docs/qemu.md for the figures.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from mbvisor.topologies.agent_run import AgentProcess
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import wait_until
from mbvisor.topologies.qemu.vm import MiddleboxVM, build_image, requirements

pytestmark = pytest.mark.host

N = 2000                       # attack packets per phase
PACING = 0.001                 # s between attack packets: one packet per guest wake-up
GUEST_IP, GUEST_MAC = "10.0.0.5", "52:54:00:4d:42:05"
ATTACKER_IP = "10.0.0.66"
NOISE = N // 100               # interrupts allowed after the offload (see the test's docstring)


def interrupts_and_rx(vm: MiddleboxVM) -> tuple[int, int]:
    """(virtio-net input interrupts summed over CPUs, eth0 rx_packets) inside the guest."""
    code, out = vm.run("cat /proc/interrupts; echo RX=$(cat /sys/class/net/eth0/statistics/rx_packets)")
    assert code == 0, out
    total, seen = 0, False
    for line in out.splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"virtio\d+-input\.\d+", fields[-1]):
            total += sum(int(f) for f in fields[1:] if f.isdigit())
            seen = True
    assert seen, f"no virtio input interrupt line in the guest's /proc/interrupts:\n{out}"
    return total, int(re.search(r"RX=(\d+)", out).group(1))


def mbctl(vm: MiddleboxVM, arguments: str) -> tuple[int, dict]:
    """The real mbctl inside the guest, on the real ivshmem device (no --shm)."""
    code, out = vm.run(f"python3 -m mbvisor.guest.mbctl --json --timeout 20 {arguments}", timeout=90)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else {"output": out}


def drops(bridge) -> int:
    return sum(f.n_packets for f in bridge.flows() if f.actions == "drop")


@pytest.fixture
def middlebox(lab, tmp_path):
    missing = requirements()
    if missing:
        pytest.fail("the QEMU middlebox test needs: " + "; ".join(missing)
                    + " (apt-get install qemu-system-x86 linux-image-cloud-amd64 busybox-static)")
    started = time.monotonic()
    image = build_image()
    built = time.monotonic() - started
    controller = Controller(tmp_path).start()
    agent = vm = None
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        attacker = lab.host("attacker", ip=f"{ATTACKER_IP}/24")
        controller.wait_switch(bridge.dpid)
        agent = AgentProcess(controller, tmp_path, bridges=(bridge.name,)).start()
        name = f"{lab.prefix}-mb"                 # vm-id, and the region /dev/shm/<name>
        vm = MiddleboxVM(bridge.name, name, GUEST_MAC, image, tmp_path / "vm", tap=f"{lab.prefix}t",
                         append=f"mbv.ip={GUEST_IP}/24 mbv.arp={ATTACKER_IP},{attacker.mac}").start()
        vm.wait_ready(timeout=90)
        agent.wait_serving(f"{name}/{vm.tap}")
        attacker.set_arp(GUEST_IP, GUEST_MAC)     # no ARP traffic in the counts
        yield {"vm": vm, "bridge": bridge, "attacker": attacker, "controller": controller, "agent": agent,
               "image": image, "build_seconds": built}
    finally:
        leftovers = []
        if vm is not None:
            vm.stop()
            leftovers = vm.leftovers()
        if agent is not None:
            agent.stop()
        controller.stop()
        assert leftovers == [], f"the VM left {leftovers} behind"


def test_offloaded_filter_stops_the_guests_interrupts(middlebox, record_property):
    """Before the offload each attack packet wakes the guest (about one virtio-net input
    interrupt per packet at this pacing; NAPI batches a few).  After ``mbctl filter add``
    the switch drops the attack: the guest's input interrupts rise by at most 1% of N.
    The allowance is for frames that are not the attacker's (the tap carries no host IPv6
    and the guest's neighbours are static, so normally 0)."""
    vm, bridge, attacker = middlebox["vm"], middlebox["bridge"], middlebox["attacker"]

    irq0, rx0 = interrupts_and_rx(vm)
    assert attacker.send_udp(GUEST_IP, 9, count=N, interval=PACING) == N
    wait_until(lambda: interrupts_and_rx(vm)[1] - rx0 >= N, timeout=30, interval=0.2,
               what=f"{N} attack packets received by the guest")
    irq1, rx1 = interrupts_and_rx(vm)
    before = irq1 - irq0

    code, answer = mbctl(vm, f"register firewall --ip {GUEST_IP}")
    assert code == 0 and answer.get("status") == "OK", answer
    code, answer = mbctl(vm, f"filter add --layer ip --src {ATTACKER_IP}")
    assert code == 0 and answer.get("status") == "OK", answer
    assert any(f"nw_src={ATTACKER_IP}" in line and "drop" in line for line in bridge.dump_flows())

    irq2, rx2 = interrupts_and_rx(vm)
    dropped = drops(bridge)
    assert attacker.send_udp(GUEST_IP, 9, count=N, interval=PACING) == N
    wait_until(lambda: drops(bridge) - dropped >= N, timeout=30, interval=0.2,
               what=f"{N} attack packets dropped in the switch")
    irq3, rx3 = interrupts_and_rx(vm)
    after = irq3 - irq2

    figures = {"attack_packets": N, "pacing_s": PACING, "interrupts_before": before,
               "rx_before": rx1 - rx0, "interrupts_after": after, "rx_after": rx3 - rx2,
               "image_cached": middlebox["image"]["cached"], "image_seconds": round(middlebox["build_seconds"], 2)}
    record_property("qemu_interrupts", figures)
    print("qemu middlebox figures:", json.dumps(figures))
    assert before >= N // 4, f"the attack barely interrupted the guest before the offload: {figures}"
    assert rx3 - rx2 <= NOISE, f"attack packets still reach the guest: {figures}"
    assert after <= NOISE, f"the guest is still interrupted after the offload: {figures}"
