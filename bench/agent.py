#!/usr/bin/env python3
"""End-to-end benchmark of the host agent: guest region -> agent -> controller -> switch.

Real parts only: the real ``mbvisor controller`` process on a netlab bridge (netdev
datapath, unique name), the real ``mbvisor agent`` process discovering its channels from
Open vSwitch, and guests' commands written into real regions in /dev/shm with
``ChannelWriter``.  Each VM is an OVS internal port (unique name, created and removed
here) annotated like QEMU's launch script does (``external_ids:mbvisor-channel``,
``attached-mac``, ``vm-id``), with its own region and its own firewall middlebox.

* latency: ``ChannelWriter.request()`` of a command that changes a flow (alternating add
  and delete of an IP filter), one at a time, until its answer is in the region; baseline
  in the same run: the same commands posted to the controller's REST API directly
  (``Controller.ok``), interleaved in blocks so both see the same machine.
* throughput: 1 channel, then 32 channels at once (one writer process per channel, each
  pipelining, distinct filters added then deleted); baseline: the same commands posted
  directly from as many client processes.
* idle CPU: the agent with 64 idle channels (initialised regions, nothing sent) against
  the same agent with no channel, over the same time; all its threads (schedstat of every
  task), and separately with its reaped children (the ``ovs-vsctl`` runs of discovery).
  Then a fresh agent with the same 64 channels behind doorbells (one ``mbvisor
  ivshmem-server`` process serving the 64 regions, the ports annotated with
  ``mbvisor-doorbell``), against the same baseline.
* command after silence: 10 channels, each sent one command (A/D of an IP filter) every
  ``silence`` seconds, the channels staggered evenly, so the agent hears a command every
  silence/10 s; the round trip until the answer (the flow confirmed).  Doorbell channels
  (the writers ring through the server, as a guest's device does; with only doorbell
  channels the agent sleeps in epoll between rings) against a command straight to the
  controller's REST API at each step; the same with polled channels is in the JSON.

    python bench/agent.py            # about a minute on 2 cores
    python bench/agent.py --quick    # about 25 s
    python bench/agent.py --json out.json

The table on stdout has the same rows every run; progress goes to stderr.  ``ratio`` is
agent / baseline.  Needs root and a running Open vSwitch (``make setup``).  Everything it
creates (bridge, ports, regions, processes, a state directory) is removed on exit,
including on Ctrl-C.  Another mbvisor agent on the machine would serve this run's
channels (and this run's agent would serve its): the benchmark waits until there is none,
and stops, removing what it made, if one appears while it runs.
"""

from __future__ import annotations

import collections
import json
import math
import multiprocessing
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from mbvisor.bench.benchlib import BenchError, after_silence, judge, publish, release_together, start
try:
    from mbvisor.agents.discovery import CHANNEL_KEY, DOORBELL_KEY
    from mbvisor.guest.channel_errors import ChannelError
    from mbvisor.guest.region import DEFAULT_REGION_SIZE, open_file, open_region
    from mbvisor.guest.writer import ChannelWriter
    from mbvisor.topologies.controller_run import Controller, ControllerError
    from mbvisor.topologies.netlab import Lab, NetlabError, require_host_tools, run as sh
except ImportError as error:  # pragma: no cover - environment problem, not a benchmark result
    sys.exit(f"bench/agent.py: cannot import mbvisor ({error}); install the project first (make setup)")

CTX = multiprocessing.get_context("fork")

VMS = 64                  # internal ports (VM interfaces) created; the idle row uses all of them
PARALLEL_CHANNELS = 32
WINDOW = 16               # commands each writer keeps outstanding (the ring has 64 slots)
FILTER_BLOCK = 100        # distinct filters added before they are deleted again (limit: 1000)
LATENCY_BLOCK = 50        # latency: commands per block (even), channel and direct blocks alternate
WARMUP = 40               # latency: commands per path before measuring (even)
AGENT_RATE = 1_000_000.0  # --rate / --burst: the token bucket never limits the measurement
DISCOVERY_INTERVAL = 2.0  # the agent's default
TARGET_P99_MS = 15.0
TARGET_IDLE_CPU = 1.0
TARGET_IDLE_CPU_DOORBELL = 0.2
TARGET_SILENCE_P99_MS = 5.0
SILENT_CHANNELS = 10      # command after silence: channels, staggered

PROFILES = {
    "default": dict(latency_commands=1000, one_channel_commands=2000, per_channel_commands=100,
                    idle_seconds=5.0, silence=10.0, silent_rounds=3),
    "quick": dict(latency_commands=200, one_channel_commands=400, per_channel_commands=30,
                  idle_seconds=3.0, silence=2.0, silent_rounds=2),
}

# id, label, value format, target (operator, value) or None
ROWS = [
    ("latency_p50", "command -> answer p50 (ms)", "{:.2f}", None),
    ("latency_p99", "command -> answer p99 (ms)", "{:.2f}", ("<=", TARGET_P99_MS)),
    ("latency_max", "command -> answer max (ms)", "{:.2f}", None),
    ("throughput_1", "throughput 1 channel (cmd/s)", "{:.0f}", None),
    ("throughput_32", f"throughput {PARALLEL_CHANNELS} channels (cmd/s)", "{:.0f}", None),
    ("idle_cpu", f"idle CPU {VMS} channels (% of a core)", "{:.2f}", ("<=", TARGET_IDLE_CPU)),
    ("idle_cpu_children", "  + ovs-vsctl children (% of a core)", "{:.2f}", None),
    ("idle_cpu_doorbell", f"idle CPU {VMS} doorbell channels (% of a core)", "{:.3f}",
     ("<=", TARGET_IDLE_CPU_DOORBELL)),
    ("silence_p50", "command after silence, doorbell p50 (ms)", "{:.2f}", None),
    ("silence_p99", "command after silence, doorbell p99 (ms)", "{:.2f}", ("<=", TARGET_SILENCE_P99_MS)),
]

_T0 = time.perf_counter()
_LABEL = "bench/agent"  # whose progress this is: bench/control runs these phases too


def progress(message: str) -> None:
    print(f"[{_LABEL} {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def label_progress(label: str) -> None:
    """Progress lines (this module's phases included) from now on as ``[label ...s]``,
    the seconds counted from now."""
    global _LABEL, _T0
    _LABEL, _T0 = label, time.perf_counter()


# --------------------------------------------------------------------------- bookkeeping

class Created:
    """Everything this run made, removed by ``cleanup`` in reverse dependency order."""

    def __init__(self):
        self.children: list = []            # forked writer / client processes
        self.agents: list[AgentProcess] = []
        self.servers: list[subprocess.Popen] = []  # mbvisor ivshmem-server processes
        self.controller: Controller | None = None
        self.lab: Lab | None = None
        self.bridge = None
        self.ports: list[str] = []           # internal ports on our bridge
        self.regions: list[str] = []         # /dev/shm files
        self.workdir: Path | None = None
        self.watch: Watch | None = None

    def cleanup(self) -> list[str]:
        problems = []

        def attempt(what, action):
            try:
                action()
            except Exception as error:  # keep removing whatever else is left
                problems.append(f"{what}: {error}")

        if self.watch is not None:
            self.watch.halt.set()
            self.watch.join(5.0)
        for process in list(self.children):
            attempt(f"writer process {process.pid}", lambda: _stop_child(process, self))
        for agent in list(self.agents):
            attempt(f"agent {agent.pid}", agent.stop)
        for server in list(self.servers):
            attempt(f"ivshmem server {server.pid}", lambda: _stop_server(server, self))
        if self.controller is not None:
            attempt("controller", self.controller.stop)
        if self.bridge is not None and self.ports:
            args = []
            for port in self.ports:
                args += ["--", "--if-exists", "del-port", self.bridge.name, port]
            attempt("internal ports", lambda: sh(["ovs-vsctl", "--timeout=10", *args]))
        if self.lab is not None:
            attempt("lab", self.lab.close)
        for path in self.regions:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                problems.append(f"{path}: {error}")
        if self.workdir is not None:
            attempt(str(self.workdir), lambda: shutil.rmtree(self.workdir, ignore_errors=False))
        return problems


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}


def _spawn(created: Created, target, *args):
    """Fork a child with Ctrl-C/SIGTERM blocked until it has set its own handlers, and
    registered before the parent can be interrupted, so cleanup always finds it."""
    sys.stdout.flush()
    sys.stderr.flush()
    process = CTX.Process(target=target, args=args, daemon=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        process.start()
        created.children.append(process)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return process


def _stop_child(process, created: Created, timeout: float = 5.0) -> None:
    if process.is_alive():
        process.terminate()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(2.0)
    if process in created.children:
        created.children.remove(process)


def _stop_server(server: subprocess.Popen, created: Created) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
    created.servers.remove(server)


def start_ivshmem_server(created: Created, vms: list["Vm"]) -> Path:
    """One ``mbvisor ivshmem-server`` serving every VM's region on its own socket (in a
    private directory of the run's, as the agent's ``--doorbell-dir``); that directory."""
    sockets = created.workdir / "ivshmem"
    sockets.mkdir(mode=0o700)
    for vm in vms:
        vm.doorbell = str(sockets / f"vm{vm.index}.sock")
    argv = [sys.executable, "-m", "mbvisor.agents.cli", "ivshmem-server", *[f"{vm.region}={vm.doorbell}" for vm in vms]]
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        with open(created.workdir / "ivshmem-server.log", "ab") as log:
            server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=_unblock_stop_signals)
        created.servers.append(server)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    deadline = time.monotonic() + 20
    while not all(os.path.exists(vm.doorbell) for vm in vms):
        if server.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"the ivshmem server did not start (log {created.workdir / 'ivshmem-server.log'})")
        time.sleep(0.05)
    return sockets


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _child_signals() -> None:
    """In a child: Ctrl-C is the parent's business (it stops us); SIGTERM ends us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)



# --------------------------------------------------------------------------- the agent

class AgentProcess:
    """``mbvisor agent`` in its own session, discovering channels from Open vSwitch."""

    def __init__(self, controller: Controller, workdir: Path, name: str, options: tuple[str, ...] = ()):
        self.status_file = workdir / f"{name}-status.json"
        self.log = workdir / f"{name}.log"
        argv = [sys.executable, "-m", "mbvisor.agents.cli", "agent",
                "--controller", f"http://127.0.0.1:{controller.rest_port}",
                "--token-file", str(controller.state_dir / "token"), "--status-file", str(self.status_file),
                "--rate", f"{AGENT_RATE:g}", "--burst", f"{AGENT_RATE:g}",
                "--discovery-interval", f"{DISCOVERY_INTERVAL:g}", *options]
        with open(self.log, "ab") as log:  # started with Ctrl-C blocked (start_agent): unblock in the child
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_unblock_stop_signals)
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def channels(self) -> list[dict] | None:
        try:
            return json.loads(self.status_file.read_text())["channels"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def wait_serving(self, names: set[str], timeout: float = 30.0) -> None:
        """Until the agent's status lists exactly ``names`` (the status is written after
        each discovery, so it is current once the set matches)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"agent exited with {self.process.returncode} (log {self.log})")
            channels = self.channels()
            if channels is not None and {c["channel"] for c in channels} == names:
                return
            time.sleep(0.05)
        raise BenchError(f"agent not serving exactly {len(names)} channel(s) within {timeout:g} s (log {self.log})")


def start_agent(created: Created, name: str, options: tuple[str, ...] = ()) -> AgentProcess:
    """Started and registered with Ctrl-C blocked, so cleanup always finds it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        agent = AgentProcess(created.controller, created.workdir, name, options)
        created.agents.append(agent)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return agent


# --------------------------------------------------------------------------- CPU accounting

def _task_ns(pid: int) -> dict[int, int]:
    """Run time (ns) of every thread of ``pid`` from /proc/PID/task/TID/schedstat."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                times[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return times


def _stat_ticks(pid: int) -> tuple[int, int]:
    """(utime+stime of all threads, cutime+cstime of reaped children) in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def measure_cpu(pid: int, seconds: float) -> dict:
    """% of one core used by ``pid`` over ``seconds``: all its threads (schedstat, ns; a
    thread that ended inside the window loses its share), its utime+stime (ticks, every
    thread, the cross-check), and its reaped children (ticks)."""
    hz = os.sysconf("SC_CLK_TCK")
    ns0, (own0, kids0), wall0 = _task_ns(pid), _stat_ticks(pid), time.perf_counter()
    time.sleep(seconds)
    ns1, (own1, kids1), wall1 = _task_ns(pid), _stat_ticks(pid), time.perf_counter()
    wall = wall1 - wall0
    threads_ns = sum(value - ns0.get(tid, 0) for tid, value in ns1.items())
    return {"seconds": wall, "threads": len(ns1),
            "cpu_percent": 100 * threads_ns / 1e9 / wall,
            "stat_percent": 100 * (own1 - own0) / hz / wall,
            "children_percent": 100 * (kids1 - kids0) / hz / wall}


# --------------------------------------------------------------------------- OVS helpers

def ovs_rows(table: str, columns: str) -> list[dict]:
    done = sh(["ovs-vsctl", "--timeout=10", "--format=json", f"--columns={columns}", "list", table])
    data = json.loads(done.stdout)
    return [dict(zip(data["headings"], row)) for row in data["data"]]


def _ovs_map(value) -> dict:
    return dict(value[1]) if isinstance(value, list) and value and value[0] == "map" else {}


def foreign_mbvisor(prefix: str, own_pids: set[int]) -> list[str]:
    """Annotated interfaces and running agents that are not this run's: an agent serves
    every annotated interface on the host, so either would mix two setups' channels."""
    found = []
    for row in ovs_rows("Interface", "name,external_ids"):
        if CHANNEL_KEY in _ovs_map(row["external_ids"]) and not str(row["name"]).startswith(prefix):
            found.append(f"interface {row['name']} has external_ids:{CHANNEL_KEY}")
    return found + foreign_agents(own_pids)


def foreign_agents(own_pids: set[int]) -> list[str]:
    """``mbvisor agent`` processes other than ours (read from /proc/*/cmdline); ours are
    our children, also while one is being started and not yet in ``own_pids``."""
    found, me = [], os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in own_pids:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == me:
            continue
        for i, arg in enumerate(argv[:-1]):
            if (arg == "mbvisor.agents.cli" or os.path.basename(arg) == "mbvisor") and argv[i + 1] == "agent":
                found.append(f"mbvisor agent pid {entry}")
                break
    return found


class Interference(BenchError):
    """Another mbvisor setup showed up: its agent and ours serve each other's channels."""


class Watch(threading.Thread):
    """During the run: another mbvisor agent running, an annotated interface that is not
    ours, or our agent serving a channel that is not ours.  Any of them stops the run at
    once (SIGUSR1 to the main thread): the figures would be wrong, and our agent would be
    answering another setup's guests.  Interface changes arrive from ``ovsdb-client
    monitor`` as they happen; processes are looked at once a second."""

    def __init__(self, created: Created):
        super().__init__(name="watch", daemon=True)
        self.created = created
        self.phase = "set-up"
        self.problem: str | None = None
        self.halt = threading.Event()
        self.main = threading.main_thread().ident

    def run(self) -> None:
        try:
            monitor = subprocess.Popen(["ovsdb-client", "monitor", "Open_vSwitch", "Interface", "name,external_ids",
                                        "--format=json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
        except OSError:
            monitor = None
        selector = selectors.DefaultSelector()
        if monitor is not None:
            selector.register(monitor.stdout, selectors.EVENT_READ)
        try:
            last_ovs = 0.0
            while not self.halt.is_set():
                changed = False
                for key, _ in selector.select(timeout=1.0):
                    changed = True
                    if not os.read(key.fd, 65536):  # the monitor ended: look at OVS every second
                        selector.unregister(key.fileobj)
                look_at_ovs = changed or (not selector.get_map() and time.monotonic() - last_ovs >= 1.0)
                try:
                    found = self.check(ovs=look_at_ovs)
                except Exception as error:  # ovsdb briefly busy: look again next time
                    progress(f"watch: {error}")
                    continue
                last_ovs = time.monotonic() if look_at_ovs else last_ovs
                if found and not self.halt.is_set():
                    self.problem = f"during {self.phase}: " + "; ".join(found)
                    signal.pthread_kill(self.main, signal.SIGUSR1)
                    return
        finally:
            if monitor is not None:
                monitor.terminate()
                try:
                    monitor.wait(5)
                except subprocess.TimeoutExpired:
                    monitor.kill()
                    monitor.wait()
                monitor.stdout.close()

    def check(self, ovs: bool = True) -> list[str]:
        agents = list(self.created.agents)
        own = {agent.pid for agent in agents}
        prefix = self.created.lab.prefix
        found = foreign_mbvisor(prefix, own) if ovs else foreign_agents(own)
        for agent in agents:
            found += [f"our agent served {c['channel']}" for c in agent.channels() or []
                      if not c["interface"].startswith(prefix)]
        return found


def wait_alone(created: Created, timeout: float = 300.0) -> None:
    own = {agent.pid for agent in created.agents}
    deadline, told = time.monotonic() + timeout, False
    while found := foreign_mbvisor(created.lab.prefix, own):
        if time.monotonic() >= deadline:
            raise BenchError("another mbvisor setup stays on this machine: " + "; ".join(found))
        if not told:
            progress("waiting for another mbvisor setup to go (" + "; ".join(found) + ") ...")
            told = True
        time.sleep(1.0)


class Vm:
    """One VM: an internal port on our bridge, its region, MAC and firewall middlebox."""

    def __init__(self, lab: Lab, index: int, region: str):
        self.index = index
        self.interface = f"{lab.prefix}a{index}"
        self.region = region
        self.mac = f"52:54:00:be:{index >> 8:02x}:{index & 0xFF:02x}"
        self.vm_id = f"bench-{lab.prefix}-vm{index}"
        self.firewall_ip = f"10.254.{index >> 8}.{(index & 0xFF) + 1}"
        self.ofport = -1
        self.doorbell = ""  # its ivshmem server's socket, once it has one

    @property
    def channel(self) -> str:
        return f"{self.vm_id}/{self.interface}"


def annotate(vms: list[Vm]) -> None:
    args = []
    for vm in vms:
        args += ["--", "set", "Interface", vm.interface, f"external_ids:{CHANNEL_KEY}={vm.region}",
                 f"external_ids:attached-mac={vm.mac}", f"external_ids:vm-id={vm.vm_id}",
                 *([f"external_ids:{DOORBELL_KEY}={vm.doorbell}"] if vm.doorbell else [])]
    sh(["ovs-vsctl", "--timeout=10", *args])


def unannotate(vms: list[Vm]) -> None:
    args = []
    for vm in vms:
        args += ["--", "remove", "Interface", vm.interface, "external_ids", CHANNEL_KEY, "attached-mac", "vm-id",
                 DOORBELL_KEY]
    sh(["ovs-vsctl", "--timeout=10", *args])


def make_vms(created: Created, count: int) -> list[Vm]:
    lab, bridge = created.lab, created.bridge
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    vms = []
    for index in range(count):
        path = f"/dev/shm/mbvisor-bench-agent-{tag}-{index}"
        created.regions.append(path)
        open_file(path, create_size=DEFAULT_REGION_SIZE).close()
        vms.append(Vm(lab, index, path))
    args = []
    for vm in vms:
        created.ports.append(vm.interface)
        args += ["--", "add-port", bridge.name, vm.interface, "--", "set", "Interface", vm.interface,
                 "type=internal", f"ofport_request={vm.index + 1}"]
    sh(["ovs-vsctl", "--timeout=10", *args])
    deadline = time.monotonic() + 20
    while True:
        ports = {row["name"]: row["ofport"] for row in ovs_rows("Interface", "name,ofport")}
        if all(isinstance(ports.get(vm.interface), int) and ports[vm.interface] > 0 for vm in vms):
            break
        if time.monotonic() > deadline:
            raise BenchError("internal ports got no OpenFlow port number")
        time.sleep(0.1)
    for vm in vms:
        vm.ofport = ports[vm.interface]
    return vms


# --------------------------------------------------------------------------- commands

def _address(n: int) -> str:
    return f"10.{100 + n // 62500}.{(n // 250) % 250}.{n % 250 + 1}"


def filter_sequence(mac: str, count: int) -> list[str]:
    """``count`` commands that each change a flow: FILTER_BLOCK distinct IP filters added,
    then deleted, again with new addresses; the middlebox ends as it started."""
    if count % 2:
        raise ValueError(f"an even number of commands is needed, not {count}")
    texts, n = [], 0
    while len(texts) < count:
        size = max(1, min(FILTER_BLOCK, (count - len(texts)) // 2))
        block = [f"I 4 s {_address(n + j)}" for j in range(size)]
        n += size
        texts += [f"A {mac} {f}" for f in block] + [f"D {mac} {f}" for f in block]
    return texts[:count]


def latency_sequence(mac: str, count: int, net: int = 99) -> list[str]:
    """Alternating add and delete of one IP filter (a new address every pair, in 10.net/16)."""
    return [f"{'A' if i % 2 == 0 else 'D'} {mac} I 4 s 10.{net}.{(i // 2) % 250}.{(i // 500) + 1}"
            for i in range(count)]


def frame(text: str) -> bytes:
    return f"@{text}@".encode()


def channel_request(writer: ChannelWriter, text: str) -> None:
    response = writer.request(frame(text), timeout=30)
    if not response.ok:
        raise BenchError(f"{text!r} through the agent: {response.status_name} {response.text!r}")


# --------------------------------------------------------------------------- children

def _writer_main(path: str, texts: list[str], window: int, go, conn) -> None:
    """A guest pipelining ``texts`` into its region; reports (start, end, wrong answers)."""
    _child_signals()
    try:
        region = open_file(path)  # its own descriptor, as a guest process has
        writer = ChannelWriter(region)
        conn.send("ready")
        go.wait()
        start, bad, first_bad = time.monotonic(), 0, None
        tickets: collections.deque = collections.deque()

        def collect():
            nonlocal bad, first_bad
            response = writer.wait(tickets.popleft(), timeout=60)
            if not response.ok:
                bad += 1
                first_bad = first_bad or f"{response.status_name} {response.text!r}"
        for text in texts:
            if len(tickets) >= window:
                collect()
            tickets.append(writer.submit(frame(text), timeout=60))
        while tickets:
            collect()
        conn.send((start, time.monotonic(), bad, first_bad))
        region.close()
    except Exception as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))


def _client_main(controller: Controller, dpid: int, port: int, texts: list[str], go, conn) -> None:
    """A direct REST client posting ``texts`` one at a time (the baseline)."""
    _child_signals()
    try:
        conn.send("ready")
        go.wait()
        start, bad, first_bad = time.monotonic(), 0, None
        for text in texts:
            status, answer = controller.command(dpid, port, text)
            if status != 200 or answer.get("status") != "OK":
                bad += 1
                first_bad = first_bad or f"HTTP {status} {answer}"
        conn.send((start, time.monotonic(), bad, first_bad))
    except Exception as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))


def parallel(created: Created, target, per_child: list[tuple], what: str) -> float:
    """One child per argument tuple, released together; seconds from the first start to
    the last finish.  Any wrong answer fails the run."""
    results = release_together(CTX, lambda *args: _spawn(created, *args),
                               lambda process: _stop_child(process, created), target, per_child, what,
                               ready_timeout=60.0, finish_timeout=600.0)
    bad = sum(r[2] for r in results)
    if bad:
        raise BenchError(f"{bad} commands not answered OK by the {what}s, e.g. "
                         f"{next(r[3] for r in results if r[3])}")
    return max(r[1] for r in results) - min(r[0] for r in results)


# --------------------------------------------------------------------------- phases

def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def measure_latency(controller: Controller, agent: AgentProcess, dpid: int, vm: Vm, count: int) -> dict:
    """Latency samples (ms) of both paths, and which agent samples overlapped a discovery:
    the agent rewrites its status file when a discovery ends."""
    writer = ChannelWriter(open_file(vm.region))
    try:
        channel_request(writer, f"R F {vm.mac} {vm.firewall_ip}")
        warm = latency_sequence(vm.mac, WARMUP)  # even: each path leaves the filter as it found it
        for text in warm:
            channel_request(writer, text)
        for text in warm:
            controller.ok(dpid, vm.ofport, text)
        texts = latency_sequence(vm.mac, count)
        via_agent, direct, overlapped = [], [], []
        progress(f"latency: {count} commands one at a time through channel+agent, {count} directly "
                 f"(blocks of {LATENCY_BLOCK}, alternating) ...")
        for first in range(0, count, LATENCY_BLOCK):
            block = texts[first:first + LATENCY_BLOCK]
            for text in block:
                wall0, t0 = time.time_ns(), time.perf_counter()
                channel_request(writer, text)
                via_agent.append((time.perf_counter() - t0) * 1000)
                overlapped.append(wall0 <= _mtime_ns(agent.status_file) <= time.time_ns())
            for text in block:
                t0 = time.perf_counter()
                controller.ok(dpid, vm.ofport, text)
                direct.append((time.perf_counter() - t0) * 1000)
    finally:
        writer.region.close()
    progress(f"  channel+agent p50 {percentile(via_agent, .5):.2f} p99 {percentile(via_agent, .99):.2f} "
             f"max {max(via_agent):.2f} ms; direct p50 {percentile(direct, .5):.2f} "
             f"p99 {percentile(direct, .99):.2f} max {max(direct):.2f} ms")
    return {"agent": via_agent, "direct": direct, "overlapped_discovery": overlapped}


def measure_after_silence(controller: Controller, dpid: int, vms: list[Vm], silence: float,
                          rounds: int) -> tuple[list[float], list[float]]:
    """Round trips (ms) of commands each sent after ``silence`` s of its channel's silence,
    the channels staggered evenly over the silence, ``rounds`` per channel: through the
    channel and agent (the writers ring the VMs' doorbells when they have one,
    ``Vm.doorbell``), and at each step also one straight to the controller's REST API
    (another filter of the same middlebox), the two in alternating order."""
    writers = [ChannelWriter(open_region(shm=vm.region, doorbell=vm.doorbell or None)) for vm in vms]
    try:
        for vm, writer in zip(vms, writers):
            channel_request(writer, f"R F {vm.mac} {vm.firewall_ip}")
        texts = [latency_sequence(vm.mac, rounds + rounds % 2) for vm in vms]
        direct_texts = [latency_sequence(vm.mac, rounds + rounds % 2, net=98) for vm in vms]
        via_agent, direct = [], []
        for step, (index, number) in enumerate(after_silence(len(vms), silence, rounds)):
            for way in (("agent", "direct") if step % 2 == 0 else ("direct", "agent")):
                t0 = time.perf_counter()
                if way == "agent":
                    channel_request(writers[index], texts[index][number])
                    via_agent.append((time.perf_counter() - t0) * 1000)
                else:
                    controller.ok(dpid, vms[index].ofport, direct_texts[index][number])
                    direct.append((time.perf_counter() - t0) * 1000)
        return via_agent, direct
    finally:
        for writer in writers:
            writer.region.close()


def wait_woken_by_doorbell(agent: AgentProcess, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        channels = agent.channels() or []
        rung = [c for c in channels if c.get("woken_by") == "doorbell"]
        if len(rung) == count:
            return
        if time.monotonic() > deadline:
            problems = sorted({str(c.get("doorbell_problem")) for c in channels if c.get("woken_by") != "doorbell"})
            raise BenchError(f"only {len(rung)} of {count} channels woken by their doorbell: {problems[:3]}")
        time.sleep(0.05)


def register(vms: list[Vm]) -> None:
    for vm in vms:
        writer = ChannelWriter(open_file(vm.region))
        try:
            channel_request(writer, f"R F {vm.mac} {vm.firewall_ip}")
        finally:
            writer.region.close()


def measure_throughput(created: Created, controller: Controller, dpid: int, vms: list[Vm],
                       per_channel: int) -> tuple[float, float]:
    plans = [(vm, filter_sequence(vm.mac, per_channel)) for vm in vms]
    total = per_channel * len(vms)
    progress(f"throughput, {len(vms)} channel(s) x {per_channel} commands, window {WINDOW}: through the agent ...")
    seconds = parallel(created, _writer_main, [(vm.region, texts, WINDOW) for vm, texts in plans], "writer")
    agent_rate = total / seconds
    progress(f"  agent {agent_rate:.0f} cmd/s ({seconds:.2f} s); {len(vms)} direct client(s) ...")
    seconds = parallel(created, _client_main, [(controller, dpid, vm.ofport, texts) for vm, texts in plans],
                       "client")
    direct_rate = total / seconds
    progress(f"  direct {direct_rate:.0f} cmd/s ({seconds:.2f} s)")
    return agent_rate, direct_rate


def check_agent(agent: AgentProcess, vms: list[Vm], answered: dict[str, int]) -> None:
    """Every command answered by this agent, none rate-limited or refused (the status file
    is rewritten at the discovery round after a change, so it may take one interval to catch up)."""
    deadline = time.monotonic() + 3 * DISCOVERY_INTERVAL
    while True:
        channels = {c["channel"]: c for c in agent.channels() or []}
        wrong = []
        for vm in vms:
            state = channels.get(vm.channel)
            if state is None:
                wrong.append(f"{vm.channel} not served")
            elif state["rate_limited"] or state["refused"] or state["answered"] != answered[vm.channel]:
                wrong.append(f"{vm.channel}: answered {state['answered']} (expected {answered[vm.channel]}), "
                             f"rate-limited {state['rate_limited']}, refused {state['refused']}")
        if not wrong:
            return
        if time.monotonic() >= deadline:
            raise BenchError("agent's counters: " + "; ".join(wrong[:3]))
        time.sleep(0.1)


def run(profile: dict, created: Created) -> dict:
    require_host_tools()
    created.workdir = Path(tempfile.mkdtemp(prefix="mbvisor-bench-agent-"))
    created.lab = Lab()
    lab = created.lab
    wait_alone(created)
    controller = Controller(created.workdir)
    created.controller = controller
    controller.start()
    created.bridge = bridge = lab.bridge(controller=controller.target, fail_mode="secure")
    controller.wait_switch(bridge.dpid)
    vms = make_vms(created, VMS)
    progress(f"controller pid {controller.process.pid} on bridge {bridge.name}; {VMS} internal ports "
             f"{vms[0].interface}..{vms[-1].interface}")
    dpid, figures, baseline, notes = bridge.dpid, {}, {}, {}

    # one agent for latency and throughput
    wait_alone(created)
    watch = created.watch = Watch(created)
    watch.start()
    agent = start_agent(created, "agent")
    answered: dict[str, int] = collections.Counter()

    # 1. latency: one channel
    first = vms[0]
    annotate([first])
    agent.wait_serving({first.channel})
    watch.phase = "latency"
    latency = measure_latency(controller, agent, dpid, first, profile["latency_commands"])
    answered[first.channel] += 1 + WARMUP + profile["latency_commands"]
    for stat, fraction in (("p50", .5), ("p99", .99)):
        figures[f"latency_{stat}"] = percentile(latency["agent"], fraction)
        baseline[f"latency_{stat}"] = percentile(latency["direct"], fraction)
    figures["latency_max"], baseline["latency_max"] = max(latency["agent"]), max(latency["direct"])
    notes["agent"] = sum(1 for v in latency["agent"] if v > TARGET_P99_MS)
    notes["agent_during_discovery"] = sum(1 for v, during in zip(latency["agent"], latency["overlapped_discovery"])
                                          if v > TARGET_P99_MS and during)
    notes["discoveries"] = sum(latency["overlapped_discovery"])
    notes["direct"] = sum(1 for v in latency["direct"] if v > TARGET_P99_MS)

    # 2a. throughput: one channel (the same VM, its middlebox already registered)
    watch.phase = "throughput 1 channel"
    one = profile["one_channel_commands"]
    figures["throughput_1"], baseline["throughput_1"] = measure_throughput(created, controller, dpid, [first], one)
    answered[first.channel] += one
    check_agent(agent, [first], answered)

    # 2b. throughput: 32 channels at once, each its own VM
    watch.phase = f"set-up of {PARALLEL_CHANNELS} channels"
    group = vms[1:1 + PARALLEL_CHANNELS]
    unannotate([first])
    annotate(group)
    agent.wait_serving({vm.channel for vm in group})
    register(group)
    watch.phase = f"throughput {PARALLEL_CHANNELS} channels"
    per = profile["per_channel_commands"]
    figures["throughput_32"], baseline["throughput_32"] = measure_throughput(created, controller, dpid, group, per)
    for vm in group:
        answered[vm.channel] += 1 + per
    check_agent(agent, group, answered)
    leftover = [mb for mb in controller.get("/v1/middleboxes")[1]["middleboxes"] if mb["filters"]]
    if leftover:
        raise BenchError(f"{len(leftover)} middleboxes kept filters after the throughput runs")
    agent.stop()
    created.agents.remove(agent)
    unannotate(group)

    # 3. idle CPU: a fresh agent with no channel, then with 64 idle ones (each window holds
    #    one or two discovery rounds: they run every 2 s and write the status only on a change)
    watch.phase = "set-up of the idle agent"
    seconds = profile["idle_seconds"]
    idle_agent = start_agent(created, "idle-agent")
    idle_agent.wait_serving(set())
    time.sleep(1.0)
    watch.phase = "idle CPU"
    progress(f"idle CPU: agent pid {idle_agent.pid} with 0 channels, {seconds:g} s ...")
    empty = measure_cpu(idle_agent.pid, seconds)
    watch.phase = f"set-up of {VMS} idle channels"
    for vm in vms:
        writer = ChannelWriter(open_file(vm.region))
        writer.header()  # initialises a blank region, as a guest's first command would
        writer.region.close()
    annotate(vms)
    idle_agent.wait_serving({vm.channel for vm in vms})
    time.sleep(1.0)  # the poller's back-off reaches its ceiling within ~50 ms
    watch.phase = "idle CPU"
    progress(f"idle CPU: the same agent with {VMS} channels, {seconds:g} s ...")
    busy = measure_cpu(idle_agent.pid, seconds)
    watch.phase = "tear-down"
    figures["idle_cpu"], baseline["idle_cpu"] = busy["cpu_percent"], empty["cpu_percent"]
    figures["idle_cpu_children"] = busy["cpu_percent"] + busy["children_percent"]
    baseline["idle_cpu_children"] = empty["cpu_percent"] + empty["children_percent"]
    progress(f"  {VMS} channels {busy['cpu_percent']:.2f} % (+{busy['children_percent']:.2f} % ovs-vsctl, "
             f"{busy['threads']} threads); 0 channels {empty['cpu_percent']:.2f} % "
             f"(+{empty['children_percent']:.2f} %)")
    silent, silence, rounds = vms[:SILENT_CHANNELS], profile["silence"], profile["silent_rounds"]
    watch.phase = "command after silence, polled"
    progress(f"command after silence, polled: {len(silent)} channels x {rounds}, {silence:g} s apart each ...")
    polled_silence, _ = measure_after_silence(controller, dpid, silent, silence, rounds)
    idle_agent.stop()
    created.agents.remove(idle_agent)
    unannotate(vms)

    # 4. the same channels behind doorbells: a fresh agent that sleeps until a guest rings
    watch.phase = f"set-up of {VMS} doorbell channels"
    sockets = start_ivshmem_server(created, vms)
    bell_agent = start_agent(created, "doorbell-agent", ("--doorbell-dir", str(sockets)))
    annotate(vms)
    bell_agent.wait_serving({vm.channel for vm in vms})
    wait_woken_by_doorbell(bell_agent, len(vms))
    time.sleep(1.0)
    watch.phase = "idle CPU"
    progress(f"idle CPU: an agent with {VMS} doorbell channels, {seconds:g} s ...")
    belled = measure_cpu(bell_agent.pid, seconds)
    figures["idle_cpu_doorbell"], baseline["idle_cpu_doorbell"] = belled["cpu_percent"], empty["cpu_percent"]
    progress(f"  {VMS} doorbell channels {belled['cpu_percent']:.3f} % ({belled['threads']} threads); "
             f"0 channels {empty['cpu_percent']:.3f} %")
    watch.phase = "command after silence, doorbell"
    progress(f"command after silence, doorbell: {len(silent)} channels x {rounds}, {silence:g} s apart each ...")
    rung_silence, direct_silence = measure_after_silence(controller, dpid, silent, silence, rounds)
    for stat, fraction in (("p50", .5), ("p99", .99)):
        figures[f"silence_{stat}"] = percentile(rung_silence, fraction)
        baseline[f"silence_{stat}"] = percentile(direct_silence, fraction)
    progress(f"  doorbell p50 {figures['silence_p50']:.2f} p99 {figures['silence_p99']:.2f} ms; REST direct "
             f"p50 {baseline['silence_p50']:.2f} p99 {baseline['silence_p99']:.2f} ms; polled channels p50 "
             f"{percentile(polled_silence, .5):.2f} p99 {percentile(polled_silence, .99):.2f} ms")
    watch.phase = "tear-down"
    bell_agent.stop()
    created.agents.remove(bell_agent)
    unannotate(vms)
    if found := watch.check():
        raise Interference("at the end: " + "; ".join(found))

    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = "n/a"
    return {"agent": figures, "baseline": baseline, "load": load,
            "idle": {"0_channels": empty, f"{VMS}_channels": busy, f"{VMS}_doorbell_channels": belled},
            "silence_ms": {"doorbell": rung_silence, "direct": direct_silence, "polled": polled_silence},
            "latency_samples_over_target": notes,
            "params": {**profile, "window": WINDOW, "filter_block": FILTER_BLOCK, "latency_block": LATENCY_BLOCK,
                       "parallel_channels": PARALLEL_CHANNELS, "idle_channels": VMS, "silent_channels": SILENT_CHANNELS,
                       "agent_rate": AGENT_RATE,
                       "agent_burst": AGENT_RATE, "discovery_interval": DISCOVERY_INTERVAL}}


# --------------------------------------------------------------------------- report


def report(result: dict, mode: str, when: str) -> tuple[str, dict]:
    p = result["params"]
    lines = [
        f"mbvisor agent benchmark  {when}  python {platform.python_version()}  "
        f"cpus {len(os.sched_getaffinity(0))}  mode {mode}  load {result['load']}",
        f"{'metric':<40}{'agent':>10}{'baseline':>10}{'ratio':>8}  {'target':<10}result",
    ]
    rows = []
    for key, label, fmt, target in ROWS:
        value, base = result["agent"][key], result["baseline"][key]
        ratio = value / base if base > 0 else None
        verdict = judge(value, target)
        target_text = f"{target[0]} {target[1]:g}" if target else "-"
        ratio_text = f"{ratio:.2f}" if ratio is not None else "n/a"
        lines.append(f"{label:<40}{fmt.format(value):>10}{fmt.format(base):>10}{ratio_text:>8}  "
                     f"{target_text:<10}{verdict or '-'}")
        rows.append({"id": key, "metric": label, "agent": value, "baseline": base, "ratio": ratio,
                     "target": {"op": target[0], "value": target[1]} if target else None, "result": verdict})
    over = result["latency_samples_over_target"]
    lines += [
        "notes: ratio = agent / baseline (above 1 is slower for latency and CPU, below 1 is slower for "
        "throughput).",
        f"       latency: {p['latency_commands']} commands one at a time (A/D of one IP filter), ChannelWriter."
        f"request() until the answer is in",
        "       the region; baseline: the same commands by Controller.ok (REST, no channel, no idempotency key),",
        f"       blocks of {p['latency_block']} alternating.  Above {TARGET_P99_MS:g} ms: {over['agent']} agent "
        f"samples, {over['agent_during_discovery']} of them overlapping a discovery",
        f"       (discovery runs in its own thread; {over['discoveries']} agent samples overlapped one), "
        f"{over['direct']} direct samples.",
        f"       throughput: 1 channel x {p['one_channel_commands']}, {p['parallel_channels']} channels x "
        f"{p['per_channel_commands']} commands, one writer process per channel",
        f"       pipelining {p['window']}, {p['filter_block']} distinct filters added then deleted; baseline: "
        f"the same commands from as many REST clients.",
        f"       agent: --rate {p['agent_rate']:g} --burst {p['agent_burst']:g} (rate limiting never caps "
        f"the figures; 0 rate-limited checked),",
        f"       --discovery-interval {p['discovery_interval']:g} (default), channels discovered from OVS "
        f"internal ports; netdev datapath.",
        f"       idle CPU: {p['idle_seconds']:g} s, all agent threads (/proc/PID/task/*/schedstat); "
        f"baseline: the same agent with 0 channels;",
        "       the '+ ovs-vsctl' row adds the agent's reaped children (/proc/PID/stat cutime+cstime, "
        "10 ms ticks).",
        f"       doorbell rows: one mbvisor ivshmem-server for the {p['idle_channels']} regions, a fresh agent "
        f"(--doorbell-dir); idle CPU baseline: the 0-channel agent above.",
        f"       command after silence: {p['silent_channels']} channels x {p['silent_rounds']} commands, each "
        f"{p['silence']:g} s after its channel's last, channels staggered;",
        "       writers ring the server's eventfd (as a guest's device does); baseline: REST straight to the "
        "controller at the same steps (alternating order); polled channels in the JSON.",
    ]
    document = {"benchmark": "mbvisor agent", "timestamp": when, "mode": mode,
                "python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)), "load": result["load"],
                "ratio": "agent / baseline", "params": p, "idle": result["idle"],
                "latency_samples_over_target": over, "rows": rows}
    return "\n".join(lines), document


def guarded(script: str, created: Created, body, failures: tuple = ()) -> tuple[int | None, object]:
    """``body()`` with everything ``created`` holds removed afterwards, whatever happens
    (Ctrl-C, SIGTERM, a failure, another mbvisor setup appearing: SIGUSR1 from ``Watch``).
    Returns (None, its result), or (exit status, None) after saying what went wrong;
    ``failures`` are exception types reported as a failed run besides the usual ones."""
    def interfered(signum, frame):
        raise Interference(f"another mbvisor setup appeared {created.watch.problem}")
    signal.signal(signal.SIGUSR1, interfered)

    try:
        return None, body()
    except KeyboardInterrupt:
        print(f"{script}: interrupted; removing everything it created", file=sys.stderr)
        return 130, None
    except (BenchError, ChannelError, ControllerError, NetlabError, *failures) as error:
        print(f"{script}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        if isinstance(error, Interference):
            print(f"{script}: an agent serves every annotated interface on the host, so two mbvisor "
                  "setups (e.g. tests/test_agent_e2e.py) cannot run side by side; run on a quiet machine",
                  file=sys.stderr)
        for agent in created.agents:  # its log goes with the state directory: show its end
            try:
                tail = agent.log.read_text().splitlines()[-15:]
            except OSError:
                continue
            print(f"{script}: last lines of {agent.log.name}:\n  " + "\n  ".join(tail), file=sys.stderr)
        return 1, None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        problems = created.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for problem in problems:
            print(f"{script}: cleanup: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args, mode, when = start("End-to-end benchmark of the mbvisor host agent "
                       "(real controller, real agent, OVS bridge).",
                       "fewer commands, 3 s idle CPU", argv)
    created = Created()
    status, result = guarded("bench/agent.py", created, lambda: run(PROFILES[mode], created))
    if status is not None:
        return status
    publish(*report(result, mode, when), args.json, progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
