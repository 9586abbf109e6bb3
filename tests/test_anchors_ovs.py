"""A balancer whose VM moves to another hypervisor while its backends stay (anchors.py),
with real switches, real packets and a real TCP connection: two hypervisors of the
multi-host lab, backends and the balancer on hypervisor 0, clients on both.

The move is what live migration does to the switches, without QEMU (tests/
test_live_migration.py does it with QEMU): the destination's port is plugged and annotated
as the same VM (vm-id, tenant, MAC, address) on hypervisor 1, the guest there announces
itself, and the source's port goes."""

from __future__ import annotations

import ipaddress
import json
import select
import subprocess
import sys

import pytest

from mbvisor.controller.pipeline import cookie_of
from mbvisor.topologies.datacentre import DataCentre
from mbvisor.topologies.netlab import wait_until

pytestmark = pytest.mark.host

PORT = 7000
BALANCER_IP = "10.0.1.100"

# An echo server: each line comes back prefixed with the server's name.
ECHO = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
server = socket.create_server(("0.0.0.0", port), reuse_port=True)
def serve(connection):
    with connection, connection.makefile("rw") as stream:
        for line in stream:
            stream.write(f"{name} {line}")
            stream.flush()
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""

# One TCP connection kept busy until the file `stop` exists: a numbered line every
# `interval` s, each answer checked ("ok N" printed per answer), then a summary as JSON.
CHATTER = r"""
import json, os, socket, sys, time
dst, port, stop, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
connection = socket.create_connection((dst, port), timeout=5)
stream = connection.makefile("rw")
print("connected", flush=True)
sent = answered = 0
servers, errors = set(), []
deadline = time.monotonic() + 300
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        stream.write(f"{sent}\n")
        stream.flush()
        sent += 1
        line = stream.readline()
    except OSError as error:
        errors.append(repr(error))
        break
    if not line:
        errors.append("closed")
        break
    name, number = line.split()
    if int(number) != sent - 1:
        errors.append(f"answer {line.strip()!r} to line {sent - 1}")
    servers.add(name)
    answered += 1
    print(f"ok {answered}", flush=True)
    time.sleep(interval)
print(json.dumps({"sent": sent, "answered": answered, "servers": sorted(servers), "errors": errors}), flush=True)
"""


def answered_so_far(chatter) -> int:
    """The answers a CHATTER process has had so far."""
    counts = [int(line.split()[1]) for line in chatter.output().splitlines() if line.startswith("ok ")]
    return counts[-1] if counts else 0


def chatter_summary(chatter) -> dict:
    return json.loads(chatter.output().strip().splitlines()[-1])


# One TCP connection kept open: each line on stdin is sent, the answer printed (or why not).
SESSION = r"""
import socket, sys
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
stream = connection.makefile("rw")
for line in sys.stdin:
    try:
        stream.write(line)
        stream.flush()
        answer = stream.readline()
        print(answer.strip() if answer else "closed", flush=True)
    except OSError as error:
        print(f"error {error}", flush=True)
"""


class Session:
    """A client's one connection to the balancer, talked to line by line."""

    def __init__(self, vm, address: str):
        self.process = vm.popen([sys.executable, "-I", "-u", "-c", SESSION, address, str(PORT)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._line(15) == "connected"

    def _line(self, timeout: float) -> str:
        stream = self.process.popen.stdout
        ready, _, _ = select.select([stream], [], [], timeout)
        if not ready:
            return "timeout"
        return stream.readline().strip()

    def say(self, text: str, timeout: float = 10) -> str:
        """The answer to ``text``: "<backend> <text>", "closed", "error ..." or "timeout"."""
        self.process.popen.stdin.write(text + "\n")
        self.process.popen.stdin.flush()
        return self._line(timeout)


def announce(vm) -> None:
    """What QEMU does when a migrated guest resumes: a broadcast RARP frame from its MAC, so
    that switches learn where it is now."""
    vm.run([sys.executable, "-c", "import sys; from scapy.all import Ether, sendp; "
            "sendp(Ether(src=sys.argv[1], dst='ff:ff:ff:ff:ff:ff', type=0x8035) / bytes(28), iface='eth0', "
            "verbose=False)", vm.mac])


def own_flows(hypervisor, mac: str) -> list:
    return hypervisor.bridge.flows(f"cookie={cookie_of(mac):#x}/-1")


def entries(dc: DataCentre, mac: str) -> dict[str, dict]:
    """The controller's entries of ``mac``, by switch."""
    return {m["dpid"]: m for m in dc.controller.get("/v1/middleboxes")[1]["middleboxes"] if m["mac"] == mac}


@pytest.fixture(scope="module")
def dc():
    with DataCentre(hypervisors=2) as built:
        yield built


def test_a_redirected_connection_survives_its_balancer_moving_away_from_its_backends(dc):
    a, b = dc.hypervisors
    backends = [dc.add_vm(0, f"web{i}") for i in (1, 2)]
    for backend in backends:
        backend.popen([sys.executable, "-I", "-u", "-c", ECHO, backend.name, str(PORT)])
        backend.wait_listening(PORT)
    balancer = dc.add_vm(0, "lb", ip=f"{BALANCER_IP}/16")
    far, near = dc.add_vm(1, "far"), dc.add_vm(0, "near")
    dc.controller.ok(a.dpid, balancer.ofport,
                     f"R L {balancer.mac} {BALANCER_IP} 0 * {','.join(b.ip for b in backends)}")
    names = {backend.name for backend in backends}

    before = Session(far, BALANCER_IP)
    first = before.say("one")
    assert first.split()[0] in names and first.endswith(" one")
    server = first.split()[0]
    near_session = Session(near, BALANCER_IP)
    near_server = near_session.say("n1").split()[0]
    assert near_server in names

    # The destination: the same VM plugged on hypervisor 1 (QEMU's paused destination).
    moved = b.plug("lb-b", ipaddress.IPv4Interface(f"{BALANCER_IP}/16"), balancer.mac)
    dc.lab.hosts["lb-b"] = moved
    moved.annotate(balancer.tenant, vm_id=balancer.vm_id)
    dc._wait_published(moved)
    wait_until(lambda: f"{b.dpid:016x}" in entries(dc, balancer.mac), 20, "the twin on hypervisor 1")
    wait_until(lambda: any(f"output:{1000 + a.index}" in f.actions for f in own_flows(b, balancer.mac)), 20,
               "hypervisor 1 to steer the redirect to hypervisor 0")
    assert before.say("two") == f"{server} two"  # steered by hypervisor 1 once it holds the twin

    # The switchover: the guest announces itself on hypervisor 1, then the source's port goes.
    announce(moved)
    a.bridge.vsctl("del-port", a.bridge.name, balancer.port_name)
    wait_until(lambda: entries(dc, balancer.mac).get(f"{a.dpid:016x}", {}).get("anchor")
               == {"vm_id": balancer.vm_id, "tenant": balancer.tenant}, 20, "hypervisor 0's entry to stay as the anchor")
    anchor = entries(dc, balancer.mac)[f"{a.dpid:016x}"]
    assert anchor["filters"] == [] and len(anchor["redirects"]) == 1

    assert before.say("three") == f"{server} three"       # the connection open through the move goes on
    assert near_session.say("n2") == f"{near_server} n2"  # and one from hypervisor 0 itself
    after = Session(far, BALANCER_IP)                      # a new one is balanced on hypervisor 0 too
    assert after.say("four").split()[0] in names
    assert Session(near, BALANCER_IP).say("five").split()[0] in names

    # The guest withdraws its redirect: the anchor has nothing to run any more.
    dc.controller.ok(b.dpid, moved.ofport, f"X {balancer.mac}")
    wait_until(lambda: entries(dc, balancer.mac) == {}, 20, "the anchor to go with the twin")
    wait_until(lambda: own_flows(a, balancer.mac) == [] and own_flows(b, balancer.mac) == [], 20,
               "both switches to drop the balancer's flows")
    assert far.tcp_connect(BALANCER_IP, PORT) == "refused"  # the guest itself answers now (no listener)
