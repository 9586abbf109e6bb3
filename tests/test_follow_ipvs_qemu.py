"""IPVS offload end to end: a real QEMU guest (TCG) is an IPVS load balancer in NAT mode, and
its own ``mbctl follow ipvs`` hands the balancing to the switch through the ivshmem channel,
the real agent and the real controller.

The guest balances TCP port 7000 of its address over two real servers (namespaces on the
bridge, each answering every connection with its own name).  IPVS masquerades (``-m``); the
guest also rewrites the source to its own address (SNAT, ``net.ipv4.vs.conntrack=1``, as
kube-proxy's IPVS mode does), so the servers answer through it while it balances, and straight
to the client once the switch does.  The test checks that the redirect is registered, that the
client's connections are answered by both servers and that none of the client's packets reach
the guest any more (the guest's own count of them, and its tap's), then makes the service
persistent: the follower reports it refused and withdraws the redirect (``X <mac> L *``),
and the guest balances again, keeping the client on one server.

Needs root, Open vSwitch and the QEMU packages (docs/qemu.md), plus ipvsadm and nftables for
the image: fails, never skips, without them."""

from __future__ import annotations

import json
import sys

import pytest
from mbvisor.topologies.netlab import settle, wait_until
from mbvisor.topologies.qemu.scenario import (
    GUEST_IP,
    GUEST_MAC,
    RequirementsMissing,
    attacked_middlebox,
)

pytestmark = pytest.mark.host

PORT = 7000
SERVERS = {"rs1": "10.0.0.11", "rs2": "10.0.0.12"}
CONNECTIONS = 24
FOLLOW_LOG = "/tmp/follow-ipvs.log"

# Each real server: every connection gets the server's name, then the connection closes.
SERVE = r"""
import socket, sys
name, port = sys.argv[1].encode(), int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", port))
listener.listen(64)
while True:
    connection, _ = listener.accept()
    with connection:
        connection.sendall(name + b"\n")
"""

# The client: COUNT connections one after the other, each from a new port; the names heard.
ASK = r"""
import json, socket, sys
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
heard = []
for _ in range(count):
    try:
        with socket.create_connection((address, port), timeout=5) as connection:
            heard.append(connection.makefile().readline().strip() or "empty")
    except OSError as error:
        heard.append(f"error: {error}")
print(json.dumps(heard))
"""


@pytest.fixture
def balancer(lab, tmp_path):
    """The attacked-middlebox scenario (its attacker is the client here), two real servers of
    the guest's tenant, and IPVS set up in the guest; everything is removed afterwards (the
    scenario stops VM, agent and controller, the lab removes the namespaces)."""
    try:
        with attacked_middlebox(lab, tmp_path) as scenario:
            tenant = scenario.vm.name                         # the launcher's default tenant: the VM's name
            servers = {}
            for number, (name, address) in enumerate(SERVERS.items(), start=11):
                server = lab.host(name, ip=f"{address}/24", ofport=number)   # the VM's tap took the next free one
                server.annotate(tenant, vm_id=f"vm-{name}")
                server.set_arp(scenario.attacker)             # no ARP broadcast reaches the guest later
                server.set_arp(GUEST_IP, GUEST_MAC)
                process = server.popen([sys.executable, "-I", "-c", SERVE, name, str(PORT)])
                server.wait_listening(PORT, process=process)
                servers[name] = server
            # nft works in the image too (tests/test_follow_nft_qemu.py follows a set there)
            assert "table inet probe" in scenario.guest("nftables-up && nft add table inet probe && nft list tables")
            scenario.guest("ipvs-up && netfilter-up && sysctl -w net.ipv4.ip_forward=1 net.ipv4.vs.conntrack=1",
                  *(f"arp -i eth0 -s {address} {servers[name].mac}" for name, address in SERVERS.items()),
                  f"iptables -t raw -A PREROUTING -s {scenario.attacker.ip}",   # counts the client's packets
                  *(f"iptables -t nat -A POSTROUTING -d {address} -j SNAT --to-source {GUEST_IP}"
                    for address in SERVERS.values()),
                  f"ipvsadm -A -t {GUEST_IP}:{PORT} -s rr",
                  *(f"ipvsadm -a -t {GUEST_IP}:{PORT} -r {address}:{PORT} -m" for address in SERVERS.values()))
            yield scenario
            scenario.guest("kill $(cat /tmp/follow.pid) 2>/dev/null; true")
    except RequirementsMissing as missing:
        pytest.fail(str(missing))


def client_packets_in_guest(scenario) -> int:
    """Packets from the client that reached the guest's IP stack (its raw PREROUTING rule)."""
    out = scenario.guest("iptables -t raw -L PREROUTING -v -n -x")
    return sum(int(line.split()[0]) for line in out.splitlines() if scenario.attacker.ip in line.split())


def ask(scenario) -> list[str]:
    done = scenario.attacker.python(ASK, GUEST_IP, PORT, CONNECTIONS, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def follow_log(scenario) -> str:
    code, out = scenario.vm.run(f"cat {FOLLOW_LOG}")
    return out if code == 0 else ""


def redirects(scenario) -> list[str]:
    status, view = scenario.controller.get(f"/v1/middleboxes/{scenario.bridge.dpid:016x}/{GUEST_MAC}")
    return view["redirects"] if status == 200 else []


def redirect_flows(scenario) -> list[str]:
    return [line for line in scenario.bridge.dump_flows() if f"nw_dst={GUEST_IP}" in line and "ct(" in line]


def test_the_guests_ipvs_is_offloaded_and_withdrawn_when_it_may_not_be(balancer, record_property):
    scenario = balancer
    before_offload = client_packets_in_guest(scenario)
    assert set(ask(scenario)) == set(SERVERS), "the guest's own IPVS does not balance over both servers"
    assert client_packets_in_guest(scenario) - before_offload >= CONNECTIONS * 3

    scenario.guest(f"(mbctl follow ipvs --ip {GUEST_IP} --poll-interval 1 > {FOLLOW_LOG} 2>&1"
                    " & echo $! > /tmp/follow.pid)")
    pool = ",".join(SERVERS.values())
    wait_until(lambda: redirects(scenario) == [f"R L {GUEST_MAC} {GUEST_IP} 0 * {pool}"], timeout=60, interval=0.5,
               what="the redirect registered on the host")
    wait_until(lambda: redirect_flows(scenario), timeout=30, interval=0.2, what="the redirect's flows on the bridge")
    assert f"redirecting {GUEST_IP} to {pool}" in follow_log(scenario)

    guest_before, tap_before = client_packets_in_guest(scenario), scenario.tap_to_guest()
    offloaded = ask(scenario)
    tap_after = settle(scenario.tap_to_guest, quiet=1.0, what="the guest's tap")
    guest_after = client_packets_in_guest(scenario)
    assert offloaded.count("rs1") + offloaded.count("rs2") == CONNECTIONS, offloaded
    assert min(offloaded.count("rs1"), offloaded.count("rs2")) >= 1, f"the switch did not spread: {offloaded}"
    assert guest_after == guest_before, "client packets still reach the guest after the offload"
    assert tap_after == tap_before, f"{tap_after - tap_before} packets reached the guest's tap after the offload"

    scenario.guest(f"ipvsadm -E -t {GUEST_IP}:{PORT} -s rr -p 60")
    wait_until(lambda: not redirects(scenario) and not redirect_flows(scenario), timeout=60, interval=0.5,
               what="the redirect withdrawn from the host")
    log = follow_log(scenario)
    assert f"not offloaded: TCP {GUEST_IP}:{PORT} is persistent (-p)" in log, log
    assert f"withdrew the redirect of {GUEST_IP} (X {GUEST_MAC} L *)" in log, log

    guest_before = client_packets_in_guest(scenario)
    persistent = ask(scenario)
    assert len(set(persistent)) == 1 and persistent[0] in SERVERS, f"IPVS persistence not in force: {persistent}"
    assert client_packets_in_guest(scenario) - guest_before >= CONNECTIONS * 3, "the guest does not balance again"

    scenario.guest("kill $(cat /tmp/follow.pid)")
    wait_until(lambda: scenario.vm.run("kill -0 $(cat /tmp/follow.pid)")[0] != 0, timeout=30, interval=0.2,
               what="the follower to stop on SIGTERM")
    assert "Traceback" not in follow_log(scenario)
    figures = {"offloaded": {name: offloaded.count(name) for name in SERVERS}, "persistent": persistent[0],
               "tap_packets_after_offload": tap_after - tap_before, "accel": scenario.vm.accel,
               "image_cached": scenario.image["cached"], "image_size": scenario.image.get("size")}
    record_property("ipvs_offload", figures)
    print("ipvs offload figures:", json.dumps(figures))
