"""``mbctl follow nft`` in a real QEMU guest (TCG): the guest's own nftables set is kept
offloaded through its ivshmem device, the real agent and the real controller.

The guest drops a set's members in a prerouting chain; the follower runs in the guest as a
middlebox would run it.  An element added with the guest's ``nft`` becomes the switch's drop
(the attacker's packets then never reach the guest's tap), and deleting it lets the attacker
back.  Needs root, Open vSwitch and the QEMU packages (docs/qemu.md), plus nftables for the
image: fails, never skips, without them."""

from __future__ import annotations

import pytest
from mbvisor.topologies.netlab import settle, wait_until
from mbvisor.topologies.qemu.scenario import ATTACKER_IP, GUEST_IP, GUEST_MAC, RequirementsMissing, attacked_middlebox

pytestmark = pytest.mark.host

FOLLOW_LOG = "/tmp/follow-nft.log"
# The drop comes first in prerouting: the verdict nft.py lets through, whether the guest routes or not.
BLOCKLIST = ("nft add table inet filter",
             "nft add set inet filter blocklist4 '{ type ipv4_addr; flags interval; }'",
             "nft add chain inet filter prerouting '{ type filter hook prerouting priority -150; policy accept; }'",
             "nft add rule inet filter prerouting ip saddr @blocklist4 drop")


@pytest.fixture
def middlebox(lab, tmp_path):
    try:
        with attacked_middlebox(lab, tmp_path) as scenario:
            scenario.mbctl_ok(f"register firewall --ip {GUEST_IP}")
            scenario.guest("nftables-up", *BLOCKLIST)
            yield scenario
            scenario.vm.run("kill $(cat /tmp/follow.pid) 2>/dev/null; true")
    except RequirementsMissing as missing:
        pytest.fail(str(missing))


def host_filters(scenario) -> list[str]:
    status, view = scenario.controller.get(f"/v1/middleboxes/{scenario.bridge.dpid:016x}/{GUEST_MAC}")
    return view["filters"] if status == 200 else []


def follow_log(scenario) -> str:
    code, out = scenario.vm.run(f"cat {FOLLOW_LOG}")
    return out if code == 0 else ""


def test_the_guests_own_nft_set_is_followed_onto_the_switch(middlebox):
    scenario = middlebox
    scenario.guest(f"(mbctl follow nft --set inet filter blocklist4 > {FOLLOW_LOG} 2>&1 & echo $! > /tmp/follow.pid)")
    wait_until(lambda: "following nft set inet filter blocklist4" in follow_log(scenario), timeout=60, interval=0.5,
               what="the follower's start line")

    scenario.guest(f"nft add element inet filter blocklist4 {{ {ATTACKER_IP} }}")
    wanted = f"A {GUEST_MAC} I 4 s {ATTACKER_IP}"
    wait_until(lambda: host_filters(scenario) == [wanted], timeout=30, interval=0.2, what="the element offloaded")
    wait_until(scenario.filter_flows, timeout=10, interval=0.2, what="the drop flow on the bridge")

    tap_before, drops_before = scenario.tap_to_guest(), scenario.counters().switch_drops
    assert scenario.attacker.send_udp(GUEST_IP, 9, count=50) == 50
    wait_until(lambda: scenario.counters().switch_drops - drops_before >= 50, timeout=30, interval=0.2,
               what="the attack dropped in the switch")
    assert settle(scenario.tap_to_guest, quiet=1.0, what="the guest's tap") == tap_before

    scenario.guest(f"nft delete element inet filter blocklist4 {{ {ATTACKER_IP} }}")
    wait_until(lambda: host_filters(scenario) == [] and not scenario.filter_flows(), timeout=30, interval=0.2,
               what="the element withdrawn")
    assert scenario.attacker.send_udp(GUEST_IP, 9, count=20) == 20
    wait_until(lambda: scenario.tap_to_guest() - tap_before >= 20, timeout=30, interval=0.2,
               what="the attacker reaching the guest again")

    scenario.guest("kill $(cat /tmp/follow.pid)")
    wait_until(lambda: scenario.vm.run("kill -0 $(cat /tmp/follow.pid)")[0] != 0, timeout=30, interval=0.2,
               what="the follower to stop on SIGTERM")
    assert "Traceback" not in follow_log(scenario), follow_log(scenario)
