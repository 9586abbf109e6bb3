"""The data-path benchmarks' hypervisor: one OVS bridge (userspace datapath) run by the real
controller, the real agent serving the middlebox's channel, and four hosts in namespaces:

* ``client`` (10.0.0.1) talks to the middlebox's service address 10.0.0.5;
* ``mb`` (10.0.0.5): the middlebox, doing its work in its own kernel like a Linux
  middlebox VM would: a firewall of 51 iptables rules in ``raw PREROUTING`` (50 that do not
  match plus one dropping the attacker) and a load balancer that DNATs everything for its
  address to the backend (with SNAT, so replies come back through it);
* ``backend`` (10.0.0.11) runs the servers (iperf3, a request/response echo server);
* ``attacker`` (10.0.0.66) floods the middlebox's address with UDP (mausezahn).

The paths compared:

* ``through-mb``: no offload; client -> 10.0.0.5 -> middlebox kernel -> backend;
* ``through-vm`` (with ``Dataplane(vm=True)``: latency and throughput): the same work done by
  a real QEMU middlebox (``topologies/qemu``), 10.0.0.6 on a tap of the bridge: its guest
  kernel runs the same 51 raw rules and DNATs (with SNAT) its address to the backend; client
  -> 10.0.0.6 -> tap -> virtio -> guest kernel -> virtio -> tap -> backend.  KVM when the
  launcher finds a guest runs fast on it, else TCG (``Dataplane.vm_info["accel"]`` says which);
* ``offloaded``: the middlebox wrote ``filter add --src <attacker>`` and ``redirect --to
  <backend>`` through its channel (``mbctl`` in its namespace); the switch drops the attack
  and rewrites the client's connections to the backend (conntrack NAT), the middlebox sees
  nothing;
* ``direct``: the client addresses the backend itself, with the same offloads in place (so
  the only difference from ``offloaded`` is the redirect's NAT).

Used by ``wakeups``, ``latency``, ``throughput`` and ``scale``.  Everything created
(namespaces, bridge, processes, region, VM and its tap) is removed on exit, error or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mbvisor.bench.benchlib import BenchError, finish, measured
from mbvisor.controller.pipeline import cookie_of
from mbvisor.topologies.agent_run import AgentProcess, annotate, make_region
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import HostToolsMissing, Lab, NetlabError, require_host_tools, settle
from mbvisor.topologies.qemu.vm import MiddleboxVM, VMError, build_image, requirements
from mbvisor.topologies.traffic import Flood, flood

MB_MAC = "52:34:56:00:12:22"
MB_IP, CLIENT_IP, ATTACKER_IP, BACKEND_IP = "10.0.0.5", "10.0.0.1", "10.0.0.66", "10.0.0.11"
VM_IP, VM_MAC = "10.0.0.6", "52:54:00:4d:42:06"
PATHS = ("through-mb", "offloaded", "direct")
VM_PATH = "through-vm"
VM_READY_TIMEOUT = 150.0     # s: the launcher's probe (its first KVM instruction: up to 30 s) and a ~3 s boot
IPERF_PORT, ECHO_PORT = 5201, 7000
NON_MATCHING_RULES = 50      # the middlebox firewall's other rules (plus one for the attacker)
BENCH_TOOLS = {"iperf3": "iperf3", "mausezahn": "netsniff-ng", "iptables-restore": "iptables"}

# A request/response server (TCP_RR style): answers every byte with one byte.
ECHO_SERVER = r"""
import socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=16)
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(64):
            conn.sendall(data[-1:])
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# The request/response client: one connection, one byte each way, ``count`` transactions
# after ``warmup``; prints the latencies' percentiles in microseconds.
ECHO_CLIENT = r"""
import json, socket, sys, time
host, port, count, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((host, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
clock = time.perf_counter_ns
for i in range(warmup + count):
    started = clock()
    s.sendall(b"x")
    if s.recv(1) != b"x":
        raise SystemExit("short answer")
    if i >= warmup:
        samples.append((clock() - started) / 1000)
samples.sort()
pick = lambda f: samples[min(len(samples) - 1, int(round(f * (len(samples) - 1))))]
print(json.dumps({"count": len(samples), "p50_us": pick(0.5), "p99_us": pick(0.99),
                  "mean_us": sum(samples) / len(samples)}))
"""


def middlebox_rules(service_ip: str) -> str:
    """The middlebox's iptables-restore input: 51 raw rules (50 that match nothing, one
    dropping the attacker), DNAT of ``service_ip`` to the backend and SNAT back to it.  The
    same for the namespace and the VM, so the two middleboxes do the same work."""
    rules = [f"-A PREROUTING -s 192.0.2.{n} -j DROP" for n in range(1, NON_MATCHING_RULES + 1)]
    rules.append(f"-A PREROUTING -s {ATTACKER_IP} -j DROP")
    return "\n".join([
        "*raw", *rules, "COMMIT",
        "*nat",
        f"-A PREROUTING -d {service_ip} -p tcp -j DNAT --to-destination {BACKEND_IP}",
        f"-A PREROUTING -d {service_ip} -p udp -j DNAT --to-destination {BACKEND_IP}",
        f"-A POSTROUTING -d {BACKEND_IP} -j SNAT --to-source {service_ip}",
        "COMMIT", ""])


class Dataplane:
    """The lab described in the module docstring, as a context manager.  ``vm``: also the
    QEMU middlebox of the through-vm path."""

    def __init__(self, progress=print, vm: bool = False):
        self.progress = progress
        self.offloaded = False
        self.with_vm = vm
        self._work = tempfile.TemporaryDirectory(prefix="mbvisor-bench-")
        self.workdir = Path(self._work.name)
        self.lab = Lab()
        self.controller = Controller(self.workdir)
        self.agent: AgentProcess | None = None
        self.region: str | None = None
        self.vm: MiddleboxVM | None = None
        self.vm_info: dict | None = None

    # -- life cycle
    def __enter__(self) -> "Dataplane":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        require_host_tools()
        missing = [f"{tool} (Debian package {package})" for tool, package in BENCH_TOOLS.items()
                   if shutil.which(tool) is None]
        if missing:
            raise HostToolsMissing("the benchmarks need: " + ", ".join(missing) + " (make setup installs them)")
        self.progress("building the lab: bridge, controller, agent, client, middlebox, backend, attacker")
        self.controller.start()
        self.bridge = self.lab.bridge(controller=self.controller.target, fail_mode="secure")
        self.client = self.lab.host("client", ip=f"{CLIENT_IP}/24")
        self.mb = self.lab.host("mb", ip=f"{MB_IP}/24", mac=MB_MAC)
        self.backend = self.lab.host("backend", ip=f"{BACKEND_IP}/24")
        self.attacker = self.lab.host("attacker", ip=f"{ATTACKER_IP}/24")
        self.controller.wait_switch(self.bridge.dpid)
        self.lab.fill_arp()
        self._middlebox_kernel()
        self.iperf_server = self.backend.popen(["iperf3", "--server", "--port", str(IPERF_PORT)])
        self.echo_server = self.backend.popen([sys.executable, "-I", "-c", ECHO_SERVER, str(ECHO_PORT)])
        self.backend.wait_listening(IPERF_PORT, process=self.iperf_server)
        self.backend.wait_listening(ECHO_PORT, process=self.echo_server)
        self.region = make_region("mbvisor-bench")
        annotate(self.mb, self.region, "vm-mb", tenant="bench")
        self.backend.annotate("bench", vm_id="vm-backend")  # a backend is a VM of the middlebox's tenant
        self.agent = AgentProcess(self.controller, self.workdir, bridges=(self.bridge.name,)).start()
        self.agent.wait_serving(f"vm-mb/{self.mb.port_name}")
        if self.with_vm:
            try:
                self._start_vm()
            except VMError as error:
                raise VMError(f"the through-vm path's QEMU middlebox could not be built or started: {error}") from None

    def _middlebox_kernel(self) -> None:
        """The middlebox doing the work itself: forwarding, firewall rules, DNAT + SNAT."""
        self.mb.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.mb.run(["iptables-restore"], input=middlebox_rules(MB_IP))

    def _start_vm(self) -> None:
        """The through-vm middlebox: boot the guest (the launcher picks the accelerator), give
        its kernel the namespace middlebox's rules, and check one request goes through it, so
        that a guest that does not forward fails here, not as a row of nonsense figures."""
        missing = requirements()
        if missing:
            raise VMError("this machine lacks " + "; ".join(missing))
        self.progress("through-vm: building the guest image and booting the QEMU middlebox")
        started = time.monotonic()
        image = build_image()
        neighbours = f"{CLIENT_IP},{self.client.mac};{BACKEND_IP},{self.backend.mac}"
        self.vm = MiddleboxVM(self.bridge.name, f"{self.lab.prefix}-vm", VM_MAC, image, self.workdir / "vm",
                              tap=f"{self.lab.prefix}t", tenant="bench",
                              append=f"mbv.ip={VM_IP}/24 mbv.arp={neighbours}").start()
        self.vm.wait_ready(timeout=VM_READY_TIMEOUT)
        ready = time.monotonic() - started
        script = ("netfilter-up && sysctl -q -w net.ipv4.ip_forward=1 && iptables-restore <<'RULES'\n"
                  + middlebox_rules(VM_IP) + "RULES\n")
        code, output = self.vm.run(script)
        if code != 0:
            raise VMError(f"the guest's netfilter setup failed ({code}): {output}")
        for host in (self.client, self.backend, self.attacker):
            host.set_arp(VM_IP, VM_MAC)
        self.agent.wait_serving(f"{self.vm.name}/{self.vm.tap}")   # its port is published: port security in place
        self.vm_info = {"accel": self.vm.accel, "accel_reason": self.vm.accel_reason, "ready_seconds": round(ready, 1),
                        "image_cached": image["cached"], "ip": VM_IP, "mac": VM_MAC}
        try:
            self.request_response(VM_IP, 20, warmup=0)
        except NetlabError as error:
            raise VMError(f"a request to {VM_IP} did not come back through the guest: {error}") from None
        self.progress(f"through-vm: the QEMU middlebox runs under {self.vm.accel} ({self.vm.accel_reason}); "
                      f"ready {ready:.1f} s after its start")

    def close(self) -> None:
        try:
            leftovers = []
            if self.vm is not None:
                self.vm.stop()
                leftovers = self.vm.leftovers()
            if self.agent is not None:
                self.agent.stop()
            self.controller.stop()
            if leftovers:
                raise VMError(f"the through-vm middlebox left {leftovers} behind")
        finally:
            self.lab.close()
            if self.region and os.path.exists(self.region):
                os.unlink(self.region)
            self._work.cleanup()

    # -- the middlebox's commands (real mbctl, real channel, agent, controller)
    def mbctl(self, *arguments: str) -> dict:
        done = self.mb.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", self.region, "--json",
                            "--timeout", "20", *arguments], check=False)
        lines = done.stdout.strip().splitlines()
        answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"output": done.stdout}
        if done.returncode != 0:
            raise BenchError(f"mbctl {' '.join(arguments)} failed ({done.returncode}): {answer} {done.stderr}")
        return answer

    def offload(self) -> None:
        """Filter the attacker and redirect the service to the backend, in the switch."""
        if self.offloaded:
            return
        self.mbctl("register", "firewall", "--mac", MB_MAC, "--ip", MB_IP)
        self.mbctl("filter", "add", "--mac", MB_MAC, "--layer", "ip", "--src", ATTACKER_IP)
        self.mbctl("redirect", "--mac", MB_MAC, "--ip", MB_IP, "--to", BACKEND_IP)
        self.offloaded = True

    def withdraw(self) -> None:
        """Cancel the registration: every offload goes, the middlebox does the work again."""
        if not self.offloaded:
            return
        self.mbctl("cancel", "--mac", MB_MAC)
        self.offloaded = False
        mine = f"cookie={cookie_of(MB_MAC):#x},"  # its port's own port security stays: it is still a VM
        leftover = [line for line in self.bridge.dump_flows() if mine in line]
        if leftover:
            raise BenchError(f"flows of the middlebox left after cancel: {leftover[:2]}")

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths this lab can measure."""
        return PATHS + ((VM_PATH,) if self.with_vm else ())

    def use(self, path: str) -> str:
        """Put the lab in ``path``'s state; the address the client should talk to.  The
        through-vm path leaves the namespace middlebox's offloads as they are: they concern
        another address."""
        if path not in self.paths:
            raise ValueError(f"unknown path {path!r}; one of {self.paths}")
        if path == VM_PATH:
            return VM_IP
        if path == "through-mb":
            self.withdraw()
        else:
            self.offload()
        return BACKEND_IP if path == "direct" else MB_IP

    # -- counters
    def dropped_in_switch(self) -> int:
        return sum(flow.n_packets for flow in self.bridge.flows() if flow.actions == "drop")

    def mb_rx(self) -> int:
        return self.mb.rx_packets()

    def vm_rx(self) -> int:
        """Packets the host handed to the guest: its tap's tx counter (in the root namespace)."""
        return int(Path(f"/sys/class/net/{self.vm.tap}/statistics/tx_packets").read_text())

    def middlebox_rx(self, path: str) -> int:
        """What reached the middlebox of ``path``: the VM's for through-vm, else the namespace's."""
        return self.vm_rx() if path == VM_PATH else self.mb_rx()

    # -- measurements
    def attack(self, packets: int) -> dict:
        """Flood the middlebox with ``packets`` UDP frames as fast as mausezahn goes; what left
        the attacker, what reached the middlebox's interface, what the switch dropped."""
        rx, dropped = self.mb_rx(), self.dropped_in_switch()
        sent = flood(self.attacker, MB_IP, MB_MAC, packets)
        rx_after, dropped_after = settle(lambda: (self.mb_rx(), self.dropped_in_switch()))
        return {"sent": sent, "reached_mb": rx_after - rx, "dropped_in_switch": dropped_after - dropped}

    def request_response(self, target: str, count: int, warmup: int = 200) -> dict:
        done = self.client.python(ECHO_CLIENT, target, ECHO_PORT, count, warmup, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def iperf(self, target: str, seconds: float, udp: bool = False) -> dict:
        """One iperf3 run from the client; TCP: received Gb/s; UDP (64-byte frames, unlimited
        rate): packets/s the backend received."""
        argv = ["iperf3", "--client", target, "--port", str(IPERF_PORT), "--time", f"{seconds:g}", "--json"]
        if udp:
            argv += ["--udp", "--bitrate", "0", "--length", "18"]
        done = self.client.run(argv, check=False, timeout=seconds + 30)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            raise BenchError(f"iperf3 to {target} gave no report: {done.stderr.strip() or done.stdout[-300:]}")
        if "error" in report:
            raise BenchError(f"iperf3 to {target}: {report['error']}")
        end = report["end"]
        if udp:
            total = end["sum"]
            return {"pps": (total["packets"] - total["lost_packets"]) / total["seconds"],
                    "sent_pps": total["packets"] / total["seconds"], "lost_percent": total["lost_percent"]}
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": end["sum_sent"].get("retransmits", 0)}

    def under_flood(self, path: str = "through-mb") -> Flood:
        """A background flood, for the length of a ``with`` block, of the middlebox ``path``
        goes through: the VM on through-vm, else the namespace (offloaded: the switch drops it)."""
        return Flood(self.attacker, VM_IP, VM_MAC) if path == VM_PATH else Flood(self.attacker, MB_IP, MB_MAC)


def path_label(path: str, results: dict[str, list[dict]]) -> str:
    """A path's name in the tables: through-vm carries its accelerator ("through-vm tcg"),
    recorded in each of its results, so the page says what the VM ran on."""
    if path != VM_PATH:
        return path
    accelerators = sorted({result["accel"] for result in results[VM_PATH]})
    return f"{VM_PATH} {'/'.join(accelerators)}"


def schedule(rounds: int, paths: tuple[str, ...] = PATHS):
    """(round, path) pairs: every path once per round, in alternating order, so that a
    machine slowly warming up or cooling down does not favour one path."""
    for number in range(rounds):
        for path in (paths if number % 2 == 0 else tuple(reversed(paths))):
            yield number, path


def run_in_lab(benchmark: str, args, mode: str, when: str, progress, measure, make_rows, vm: bool = False,
               **extra) -> int:
    """The body of a data-path benchmark's main(): build the lab (with the through-vm
    middlebox when ``vm``), ``measure(dataplane)``, tear the lab down (also on Ctrl-C), print
    and write ``make_rows(results)`` (and the VM's accelerator, in the JSON's ``vm``)."""
    started = time.monotonic()

    def body():
        with Dataplane(progress, vm=vm) as dataplane:
            return measure(dataplane), dataplane.vm_info

    status, outcome = measured(progress, body, failures=(NetlabError, VMError))
    if status is not None:
        return status
    results, vm_info = outcome
    progress(f"done in {time.monotonic() - started:.0f} s")
    if vm_info is not None:
        extra["vm"] = vm_info
    return finish(benchmark, mode, when, args.rounds, make_rows(results), args.json, progress,
                  results=results, **extra)
