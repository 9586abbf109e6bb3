"""A real middlebox VM (QEMU, TCG) on a real OVS bridge, with the real controller and agent:
the guest's own ``mbctl`` writes a firewall filter through the ivshmem device (plain, or
doorbell: then only the guest's ring gets the agent to look), and the
attack traffic that used to interrupt the guest (virtio-net input interrupts, read from
the guest's /proc/interrupts) is dropped in the switch instead.

Needs root, Open vSwitch, and the Debian packages qemu-system-x86, linux-image-cloud-amd64
and busybox-static (plus python3.11): the test FAILS, never skips, when one is missing.
The guest image is built on first use and cached (topologies/qemu/build-initramfs.py).
The setup is ``mbvisor.topologies.qemu.scenario`` (shared with bench/qemu_interrupts.py).
See docs/qemu.md for the figures.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from mbvisor.topologies.netlab import wait_until
from mbvisor.topologies.qemu.scenario import GUEST_IP, RequirementsMissing, attacked_middlebox

pytestmark = pytest.mark.host

N = 2000                       # attack packets per phase
PACING = 0.001                 # s between attack packets: one packet per guest wake-up
NOISE = N // 100               # interrupts allowed after the offload (see the test's docstring)


@pytest.fixture(params=["ivshmem-plain", "ivshmem-doorbell"])
def middlebox(request, lab, tmp_path):
    """The VM with each kind of device: plain (the agent polls its channel) and doorbell
    (the agent looks only when the guest rings: its sweep is an hour)."""
    try:
        with attacked_middlebox(lab, tmp_path, doorbell=request.param == "ivshmem-doorbell") as scenario:
            yield scenario
    except RequirementsMissing as missing:
        pytest.fail(str(missing))


def test_offloaded_filter_stops_the_guests_interrupts(middlebox, record_property):
    """Before the offload each attack packet wakes the guest (about one virtio-net input
    interrupt per packet at this pacing; NAPI batches a few).  After ``mbctl filter add``
    (``offload()`` fails unless the host answers OK and the drop flow is on the bridge)
    the switch drops the attack: the guest's input interrupts rise by at most 1% of N.
    The allowance is for frames that are not the attacker's (the tap carries no host IPv6
    and the guest's neighbours are static, so normally 0)."""
    attacker = middlebox.attacker

    start = middlebox.counters()
    assert attacker.send_udp(GUEST_IP, 9, count=N, interval=PACING) == N
    wait_until(lambda: middlebox.counters().guest_rx - start.guest_rx >= N, timeout=30, interval=0.2,
               what=f"{N} attack packets received by the guest")
    before = middlebox.counters() - start

    middlebox.offload()

    start = middlebox.counters()
    assert attacker.send_udp(GUEST_IP, 9, count=N, interval=PACING) == N
    wait_until(lambda: middlebox.counters().switch_drops - start.switch_drops >= N, timeout=30, interval=0.2,
               what=f"{N} attack packets dropped in the switch")
    after = middlebox.counters() - start

    figures = {"accel": middlebox.vm.accel, "attack_packets": N, "pacing_s": PACING, "interrupts_before": before.interrupts,
               "rx_before": before.guest_rx, "interrupts_after": after.interrupts, "rx_after": after.guest_rx,
               "image_cached": middlebox.image["cached"], "image_seconds": round(middlebox.build_seconds, 2)}
    record_property("qemu_interrupts", figures)
    print("qemu middlebox figures:", json.dumps(figures))
    assert before.interrupts >= N // 4, f"the attack barely interrupted the guest before the offload: {figures}"
    assert after.guest_rx <= NOISE, f"attack packets still reach the guest: {figures}"
    assert after.interrupts <= NOISE, f"the guest is still interrupted after the offload: {figures}"
    assert middlebox.vm.accel in ("kvm", "tcg") and (middlebox.vm.accel == "tcg" or os.path.exists("/dev/kvm"))
    channel = middlebox.agent.channels()[0]
    assert channel["woken_by"] == ("doorbell" if middlebox.vm.doorbell else "polling"), channel
    assert channel["doorbell_problem"] is None


def test_the_launcher_refuses_an_unknown_accelerator():
    from mbvisor.topologies.qemu.vm import LAUNCH

    done = subprocess.run([str(LAUNCH), "nobridge", "probe", "52:54:00:00:00:01", "/nonexistent", "/nonexistent"],
                          env={**os.environ, "MB_ACCEL": "hvf"}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "MB_ACCEL must be auto, kvm or tcg, not 'hvf'" in done.stderr
