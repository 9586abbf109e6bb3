"""Namespace lab: Open vSwitch bridges and network-namespace hosts for integration tests.

A thin shell around ``ip``, ``ovs-vsctl``, ``ovs-ofctl``, ``ethtool`` and ``sysctl`` (run
through :mod:`subprocess`; no other dependencies).  Every failing command raises
:class:`CommandError`, whose message holds the command line, its exit code and stderr.

    from mbvisor.topologies.netlab import Lab, require_host_tools

    require_host_tools()                    # raises HostToolsMissing listing what is missing
    with Lab() as lab:                      # unique prefix such as "mbx3f2a"
        s1 = lab.bridge(fail_mode="standalone")          # or controller="tcp:127.0.0.1:6653"
        h1 = lab.host("h1", ip="10.0.0.1/24")            # one bridge in the lab: used by default
        h2 = lab.host("h2", ip="10.0.0.2/24")
        assert h1.ping(h2, count=3) == 3
        s1.add_flow("priority=100,ip,nw_src=10.0.0.1,actions=drop")
    # everything the lab created (processes, bridges, veths, namespaces) is gone here

Host machine facts built in (measured on Debian 12 with OVS 3.1 and no OVS kernel module):

* bridges use ``datapath_type=netdev`` (userspace datapath; ports are read with AF_PACKET);
* TX checksum offload is off on both ends of every veth (else OVS forwards frames with
  unfinished checksums that the receiver drops) and GRO is off on the OVS end (breaks TCP);
* IPv6 is disabled in the namespaces and on the veths so that no router solicitations, MLD
  reports or DAD probes reach the hosts: a host's ``rx_packets()`` counts only test traffic;
* AF_PACKET drops do not appear in OVS port statistics: :meth:`Host.rx_packets` (the
  namespace's own ``eth0`` counter) is the truth about what reached a host.

Names: a lab's prefix is ``mbx`` + 4 hex digits (7 characters).  Root-namespace names
(bridges, host ends of veths) are ``<prefix><suffix>`` with at most 15 characters in all;
namespaces are ``<prefix>-<host name>``.  A lab only ever removes what it created itself.
Datapath ids are fixed and known before the bridge exists: ``0x4d42_<prefix hex>_<index>``
(see :func:`datapath_id_for`); host ports get ``ofport_request`` 1, 2, 3... per bridge.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence, TypeVar

__all__ = [
    "Bridge", "CommandError", "Datagram", "Flow", "Host", "HostToolsMissing", "HttpResponse",
    "Lab", "NetlabError", "Process", "UdpListener", "WaitTimeout", "cleanup_stale", "datapath_id_for",
    "leftovers", "require_host_tools", "run", "wait_until",
]

PREFIX_STEM = "mbx"
IFNAMSIZ = 15                      # longest Linux interface name
RESERVATIONS = "/run/mbvisor-netlab"
DPID_MARK = 0x4D42                 # "MB": top of every lab datapath id
COMMAND_TIMEOUT = 30.0
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# errors, commands, waiting


class NetlabError(RuntimeError):
    """Anything the lab could not do."""


class CommandError(NetlabError):
    """A command failed or timed out; the message names the command and shows its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 where: str = "", timeout: float | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timeout is not None
        command = shlex.join(self.argv)
        if timeout is not None:
            head = f"command timed out after {timeout:g}s{where}: {command}"
        else:
            head = f"command failed with exit code {returncode}{where}: {command}"
        detail = stderr.strip() or stdout.strip() or "(no output)"
        super().__init__(f"{head}\n  stderr: {detail}")


class WaitTimeout(NetlabError):
    """:func:`wait_until` ran out of time."""


class HostToolsMissing(NetlabError):
    """The machine lacks something the lab needs (see :func:`require_host_tools`)."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float | None = COMMAND_TIMEOUT,
        input: str | None = None, where: str = "") -> subprocess.CompletedProcess:
    """Run ``argv`` (no shell), capture text output; raise :class:`CommandError` on failure."""
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise CommandError(argv, None, "", f"{argv[0]}: not found ({exc})", where) from None
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise CommandError(argv, None, out, err, where, timeout=timeout) from None
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stdout, done.stderr, where)
    return done


def die_with_parent() -> None:
    """``preexec_fn`` for lab processes: the kernel sends SIGTERM when the process that
    started them dies, so a test runner killed from outside leaves no controller or agent."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def accepting(path) -> bool:
    """Whether a UNIX socket accepts connections: a daemon's socket file exists a moment
    before it listens (bind, then listen), and a client is refused meanwhile."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start_daemon(name: str, argv: list, directory: Path, ready: Path, environment: dict | None = None) -> subprocess.Popen:
    """A daemon in the foreground, in its own session (a terminal's Ctrl-C is ours to
    handle), SIGTERMed if we die; returned once its socket ``ready`` accepts connections,
    stopped if it never does (nobody else holds it to stop it)."""
    output = directory / f"{name}.out"
    with open(output, "ab") as log:
        process = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
                                   env={**os.environ, **(environment or {})})
    try:
        wait_until(lambda: accepting(ready) or process.poll() is not None, timeout=10, what=f"{name} to start")
        if process.poll() is not None:
            raise NetlabError(f"{name} exited with {process.returncode}: {output.read_text()[-500:]}")
    except BaseException:
        stop_daemon(process)
        raise
    return process


def stop_daemon(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Raises :class:`WaitTimeout` naming ``what`` (and the last value seen) after ``timeout``
    seconds.  Exceptions from the predicate propagate at once: a predicate that may fail
    transiently must catch its own errors.  The predicate is always tried at least once,
    and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    pause = min(interval, 0.005)
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, interval)


def settle(read: Callable[[], T], quiet: float = 0.5, timeout: float = 30.0, what: str = "counters") -> T:
    """Poll ``read()`` until its value has not changed for ``quiet`` seconds and return it:
    the userspace datapath works through its queues for a while after a sender stops.
    Raises :class:`WaitTimeout` if it still changes after ``timeout`` seconds."""
    last, since, deadline = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
    raise WaitTimeout(f"{what} still changing after {timeout:g}s (last value: {last!r})")


def datapath_id_for(prefix: str, index: int) -> int:
    """The datapath id a lab with ``prefix`` gives its ``index``-th bridge (0-based)."""
    digits = prefix[len(PREFIX_STEM):]
    return (DPID_MARK << 32) | (int(digits, 16) << 16) | index


def _ovs_quote(value: str) -> str:
    return json.dumps(value)     # an OVSDB string literal


# ---------------------------------------------------------------------------------------
# host checks and leftovers


def require_host_tools() -> None:
    """Raise :class:`HostToolsMissing` listing everything this machine lacks for a lab.

    Checks: root, the ``ip``, ``ss``, ``ovs-vsctl``, ``ovs-ofctl``, ``ovs-appctl``, ``ethtool``
    and ``sysctl`` commands, a reachable ovsdb-server, a running ovs-vswitchd and
    that network namespaces can be listed.  Never skips anything: tests call it to fail loudly.
    """
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()}): namespaces and OVS need root")
    tools = {"ip": "iproute2", "ss": "iproute2", "ovs-vsctl": "openvswitch-switch", "ovs-ofctl": "openvswitch-switch",
             "ovs-appctl": "openvswitch-switch", "ethtool": "ethtool", "sysctl": "procps"}
    missing = [f"{tool} (Debian package {package})" for tool, package in tools.items()
               if shutil.which(tool) is None]
    if missing:
        problems.append("missing commands: " + ", ".join(missing))
    if shutil.which("ovs-vsctl"):
        try:
            run(["ovs-vsctl", "--timeout=5", "show"], timeout=10)
        except CommandError as exc:
            problems.append("ovsdb-server is not reachable (start Open vSwitch: "
                            "/usr/share/openvswitch/scripts/ovs-ctl start --system-id=random "
                            f"or `make setup`): {exc}")
    if shutil.which("ovs-appctl"):
        try:
            run(["ovs-appctl", "--timeout=5", "-t", "ovs-vswitchd", "version"], timeout=10)
        except CommandError as exc:
            problems.append(f"ovs-vswitchd is not running: {exc}")
    if shutil.which("ip"):
        try:
            run(["ip", "netns", "list"], timeout=10)
        except CommandError as exc:
            problems.append(f"network namespaces unavailable: {exc}")
    if problems:
        raise HostToolsMissing("the namespace lab cannot run on this machine:\n  - "
                               + "\n  - ".join(problems))


def leftovers(prefix: str) -> dict[str, list[str]]:
    """Namespaces, OVS bridges and links whose names start with ``prefix`` (empty lists: none).

    Reads ``ip netns list``, ``ovs-vsctl list-br`` and ``ip -o link``.
    """
    namespaces = [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines()
                  if line.strip()]
    bridges = run(["ovs-vsctl", "--timeout=10", "list-br"]).stdout.split()
    links = []
    for line in run(["ip", "-o", "link"]).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            links.append(parts[1].strip().split("@")[0])
    return {"netns": [n for n in namespaces if n.startswith(prefix)],
            "bridges": [b for b in bridges if b.startswith(prefix)],
            "links": [link for link in links if link.startswith(prefix)]}


# ---------------------------------------------------------------------------------------
# OVS objects


@dataclass
class Flow:
    """One line of ``ovs-ofctl dump-flows``, parsed."""

    raw: str
    table: int = 0
    priority: int = 32768
    cookie: int = 0
    n_packets: int = 0
    n_bytes: int = 0
    match: str = ""
    actions: str = ""
    stats: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, line: str) -> "Flow":
        line = line.strip()
        head, sep, actions = line.rpartition(" actions=")
        if not sep:
            head, actions = line, ""
        stats: dict[str, str] = {}
        match_parts: list[str] = []
        for item in (p.strip() for p in head.split(", ")):
            key, _, value = item.partition("=")
            if "," not in item and key in _FLOW_STATS:
                stats[key] = value
            elif item:
                match_parts.append(item)
        fields = ",".join(match_parts).split(",") if match_parts else []
        priority = 32768
        kept = []
        for f in fields:
            if f.startswith("priority="):
                priority = int(f.split("=", 1)[1])
            elif f:
                kept.append(f)
        return cls(raw=line, table=int(stats.get("table", 0)), priority=priority,
                   cookie=int(stats.get("cookie", "0"), 0), n_packets=int(stats.get("n_packets", 0)),
                   n_bytes=int(stats.get("n_bytes", 0)), match=",".join(kept), actions=actions,
                   stats=stats)


_FLOW_STATS = {"cookie", "duration", "table", "n_packets", "n_bytes", "idle_timeout", "hard_timeout",
               "idle_age", "hard_age", "importance", "send_flow_rem", "reset_counts",
               "no_packet_counts", "no_byte_counts", "check_overlap"}


class Bridge:
    """An OVS bridge (``datapath_type=netdev``).  ``owned`` bridges are deleted at lab close.

    ``db`` and ``ofctl_target`` point the commands at a switch other than the one
    ``OVS_RUNDIR`` names (a data centre's hypervisors each have their own): ``ovs-vsctl
    --db=<db>`` and ``ovs-ofctl ... <ofctl_target>`` (``unix:<rundir>/<bridge>.mgmt``).
    """

    def __init__(self, lab: "Lab", name: str, dpid: int | None, protocols: str, owned: bool,
                 db: str | None = None, ofctl_target: str | None = None):
        self.lab = lab
        self.name = name
        self.db = db
        self.ofctl_target = ofctl_target or name
        self.dpid = dpid
        self.protocols = protocols
        self.owned = owned
        self.controller: str | None = None
        self.hosts: list[Host] = []
        self._next_ofport = 1

    def __repr__(self) -> str:
        dpid = f"{self.dpid:#018x}" if self.dpid is not None else "?"
        return f"<Bridge {self.name} dpid={dpid}>"

    # -- ovs-vsctl
    def vsctl(self, *args: str, check: bool = True) -> str:
        database = [f"--db={self.db}"] if self.db else []
        return run(["ovs-vsctl", *database, "--timeout=10", *args], check=check,
                   where=f" (bridge {self.name})").stdout.strip()

    def read_dpid(self) -> int | None:
        value = self.vsctl("get", "bridge", self.name, "datapath_id").strip('"')
        return int(value, 16) if value not in ("", "[]") else None

    def set_controller(self, target: str | None) -> None:
        """Point the bridge at ``target`` (``tcp:127.0.0.1:6653``), or at none with ``None``.

        The controller record is out-of-band (no hidden in-band flows).  Re-setting the same
        target re-creates the record, which makes OVS try to connect at once.
        """
        args = ["--", "del-controller", self.name]
        if target:
            args += ["--", "--id=@c", "create", "controller", f"target={_ovs_quote(target)}",
                     "connection_mode=out-of-band", "--", "set", "bridge", self.name, "controller=@c"]
        self.vsctl(*args)
        self.controller = target

    def _controllers(self) -> list[dict[str, str]]:
        out = self.vsctl("--format=json", "--columns=_uuid,target,is_connected,status", "list", "controller")
        rows = []
        table = json.loads(out)
        mine = set(self.vsctl("get", "bridge", self.name, "controller").strip("[]").replace(" ", "").split(","))
        for uuid, target, connected, status in table["data"]:
            if uuid[1] in mine:
                state = dict(status[1]).get("state", "") if status[0] == "map" else ""
                rows.append({"target": target, "is_connected": connected, "state": state})
        return rows

    def _sessions(self) -> int | None:
        """Established TCP connections from ovs-vswitchd to this bridge's ``tcp:`` controller
        target (``None`` for other kinds of target)."""
        found = re.fullmatch(r"tcp:(\[?[0-9A-Fa-f.:]+\]?):(\d+)", self.controller or "")
        if not found:
            return None
        address, port = found.group(1).strip("[]"), found.group(2)
        out = run(["ss", "-Htnp", "state", "established", "dst", address, "dport", "=", f":{port}"]).stdout
        return sum('"ovs-vswitchd"' in line for line in out.splitlines())

    def controller_connected(self) -> bool:
        """True when the bridge's controller has a session.

        OVS writes ``is_connected`` to its database only every ~5 s, so for ``tcp:`` targets an
        established connection from ovs-vswitchd counts too (for every lab bridge using the
        same target; assumes no other program points OVS at that target meanwhile).
        """
        rows = self._controllers()
        if rows and all(r["is_connected"] is True for r in rows):
            return True
        sessions = self._sessions()
        if not rows or sessions is None:
            return False
        sharing = sum(1 for b in self.lab.bridges if b.controller == self.controller)
        return sessions >= max(sharing, 1)

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until the controller has a session.  While it has none the controller record is
        re-created every second, so a controller started late is found within ~1 s instead of
        after OVS's back-off (1, 2, 4, 8 s; ``max_backoff`` is not honoured by OVS 3.1)."""
        if not self.controller:
            raise NetlabError(f"bridge {self.name} has no controller set through the lab")
        last_kick = time.monotonic()

        def connected() -> bool:
            nonlocal last_kick
            if self.controller_connected():
                return True
            if time.monotonic() - last_kick >= 1.0:
                self.set_controller(self.controller)
                last_kick = time.monotonic()
            return False
        wait_until(connected, timeout, f"bridge {self.name} to connect to controller {self.controller}",
                   interval=0.05)

    def ofport(self, port_name: str, timeout: float = 10.0) -> int:
        """The OpenFlow port number of interface ``port_name``, waiting until it is assigned."""
        def assigned() -> int | None:
            value = self.vsctl("get", "interface", port_name, "ofport")
            if value in ("[]", ""):
                return None
            number = int(value)
            if number == -1:
                error = self.vsctl("get", "interface", port_name, "error")
                if error not in ("[]", ""):
                    raise NetlabError(f"OVS could not open port {port_name} on {self.name}: {error}")
                return None
            return number
        return wait_until(assigned, timeout, f"an ofport for {port_name} on {self.name}")

    def _ofport_request(self, port: str, ofport: int | None = None) -> list[str]:
        """ovs-vsctl arguments asking for ``ofport`` (default: the bridge's next number)."""
        request = ofport if ofport is not None else self._next_ofport
        return ["--", "set", "interface", port, f"ofport_request={request}"] if request else []

    def _claim_ofport(self, port: str, ofport: int | None = None) -> int:
        """Wait for ``port``'s number, check it is the one requested, advance the counter."""
        request = ofport if ofport is not None else self._next_ofport
        number = self.ofport(port)
        if request and number != request:
            raise NetlabError(f"{port} on {self.name} got ofport {number}, not the requested {request}")
        if self._next_ofport and number >= self._next_ofport:
            self._next_ofport = number + 1
        return number

    def ports(self) -> list[str]:
        return self.vsctl("list-ports", self.name).split()

    # -- ovs-ofctl
    def ofctl(self, command: str, *args: str, check: bool = True, input: str | None = None) -> str:
        """Run ``ovs-ofctl -O <protocols> <command> <bridge> <args...>``; return stdout."""
        return run(["ovs-ofctl", "-O", self.protocols, command, self.ofctl_target, *args], check=check,
                   input=input, where=f" (bridge {self.name})").stdout

    def dump_flows(self, match: str | None = None, no_stats: bool = False) -> list[str]:
        """The flow table as ``ovs-ofctl dump-flows`` lines (header line removed)."""
        options = ["--no-names"] + (["--no-stats"] if no_stats else [])
        argv = ["ovs-ofctl", "-O", self.protocols, *options, "dump-flows", self.ofctl_target]
        if match:
            argv.append(match)
        out = run(argv, where=f" (bridge {self.name})").stdout
        return [line.strip() for line in out.splitlines()
                if line.strip() and not line.startswith(("OFPST_FLOW", "NXST_FLOW"))]

    def flows(self, match: str | None = None) -> list[Flow]:
        """:meth:`dump_flows` parsed into :class:`Flow` records."""
        return [Flow.parse(line) for line in self.dump_flows(match)]

    def flow_packets(self, contains: str) -> int:
        """Sum of ``n_packets`` over flows whose line contains ``contains``."""
        return sum(f.n_packets for f in self.flows() if contains in f.raw)

    def add_flow(self, flow: str) -> None:
        """``ovs-ofctl add-flow``, e.g. ``"priority=100,ip,nw_src=10.0.0.3,actions=drop"``."""
        self.ofctl("add-flow", flow)

    def add_flows(self, flows: Iterable[str]) -> None:
        self.ofctl("add-flows", "-", input="\n".join(flows) + "\n")

    def del_flows(self, match: str | None = None, strict: bool = False) -> None:
        """Delete every flow, or those matching ``match`` (``--strict``: exactly that match+priority)."""
        argv = ["ovs-ofctl", "-O", self.protocols] + (["--strict"] if strict else [])
        argv += ["del-flows", self.ofctl_target] + ([match] if match else [])
        run(argv, where=f" (bridge {self.name})")

    def port_stats(self, ofport: int | None = None) -> str:
        return self.ofctl("dump-ports", *([str(ofport)] if ofport is not None else []))


# ---------------------------------------------------------------------------------------
# processes and traffic results


class Process:
    """A background process started by a lab (killed, with its process group, at close)."""

    def __init__(self, popen: subprocess.Popen, argv: Sequence[str], log_path: str | None, where: str):
        self.popen = popen
        self.argv = list(argv)
        self.log_path = log_path
        self.where = where

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What the process wrote to its log (stdout and stderr) so far."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def check_alive(self) -> None:
        if not self.alive():
            raise NetlabError(f"process exited with code {self.popen.returncode}{self.where}: "
                              f"{shlex.join(self.argv)}\n  output: {self.output().strip() or '(none)'}")

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL after ``timeout``; idempotent."""
        if self.popen.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:   # the leader is gone; children of its group may remain
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for stream in (self.popen.stdout, self.popen.stderr, self.popen.stdin):
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass

    def __repr__(self) -> str:
        return f"<Process {self.pid} {'running' if self.alive() else 'exited'}: {shlex.join(self.argv)[:60]}>"


class Datagram(NamedTuple):
    src_ip: str
    src_port: int
    payload: bytes


class HttpResponse(NamedTuple):
    """``(status, body, peer)``; ``peer`` is the ``(ip, port)`` the client's socket was connected to."""

    status: int
    body: str
    peer: tuple[str, int]


class UdpListener:
    """UDP socket bound inside a namespace; records every datagram it receives."""

    def __init__(self, process: Process, port: int, where: str):
        self.process = process
        self.port = port
        self.where = where
        self._datagrams: list[Datagram] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"udp-listener-{port}")
        self._reader.start()

    def _read(self) -> None:
        stream = self.process.popen.stdout
        try:
            for line in stream:
                line = line.strip()
                if line == "READY":
                    self._ready.set()
                elif line.startswith("["):
                    ip, port, payload = json.loads(line)
                    with self._lock:
                        self._datagrams.append(Datagram(ip, port, bytes.fromhex(payload)))
        except (OSError, ValueError):
            pass

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            self.process.check_alive()
            return self._ready.is_set()
        wait_until(ready, timeout, f"UDP listener on port {self.port} to bind{self.where}")

    @property
    def datagrams(self) -> list[Datagram]:
        with self._lock:
            return list(self._datagrams)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._datagrams)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Datagram]:
        """Wait until at least ``n`` datagrams have arrived; return them all."""
        wait_until(lambda: self.count >= n, timeout,
                   f"{n} datagram(s) on UDP port {self.port}{self.where} (have {self.count})")
        return self.datagrams

    def stop(self) -> None:
        self.process.stop()


# Scripts run inside namespaces with `python -I -c` (standard library only).

_PING = r"""
import json, os, select, socket, struct, sys, time
dst, count, interval, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
ident = os.getpid() & 0xFFFF
payload = b"netlab-ping".ljust(56, b".")

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF

s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sent, errors, got = 0, [], set()
next_send = time.monotonic()
deadline = None
while True:
    now = time.monotonic()
    if sent < count and now >= next_send:
        header = struct.pack("!BBHHH", 8, 0, 0, ident, sent)
        packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, sent) + payload
        try:
            s.sendto(packet, (dst, 0))
        except OSError as e:
            errors.append(str(e))
        sent += 1
        next_send = now + interval
        if sent == count:
            deadline = time.monotonic() + timeout
        continue
    if sent == count and (len(got) >= count - len(errors) or now >= deadline):
        break
    wait = next_send - now if sent < count else deadline - now
    readable, _, _ = select.select([s], [], [], max(0.0, wait))
    if readable:
        data, (source, _) = s.recvfrom(65535)
        start = (data[0] & 0x0F) * 4
        kind, _, _, rid, seq = struct.unpack("!BBHHH", data[start:start + 8])
        if kind == 0 and rid == ident and source == dst and seq < count:
            got.add(seq)
print(json.dumps({"sent": sent, "received": len(got), "errors": errors[:3]}))
"""

_UDP_SEND = r"""
import socket, sys, time
dst, dport, count, sport, interval, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), bytes.fromhex(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sport:
    s.bind(("0.0.0.0", sport))
sent = 0
for i in range(count):
    if i and interval:
        time.sleep(interval)
    try:
        s.sendto(payload, (dst, dport))
        sent += 1
    except OSError as e:
        print("send failed:", e, file=sys.stderr)
print(sent)
"""

_UDP_LISTEN = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    data, (ip, port) = s.recvfrom(65535)
    print(json.dumps([ip, port, data.hex()]), flush=True)
"""

_TCP_PROBE = r"""
import errno, json, select, socket, struct, sys, time
dst, dport, count, sport, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
linger = struct.pack("ii", 1, 0)          # close with RST: no TIME_WAIT, the port can be reused

def batch(n):
    socks, out = [], {}
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        if sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", sport))
        s.setblocking(False)
        code = s.connect_ex((dst, dport))
        if code not in (0, errno.EINPROGRESS):
            out[s] = "error:" + errno.errorcode.get(code, str(code))
        socks.append(s)
    deadline = time.monotonic() + timeout
    pending = [s for s in socks if s not in out]
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, writable, _ = select.select([], pending, [], left)
        for s in writable:
            code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            out[s] = "open" if code == 0 else "refused" if code == errno.ECONNREFUSED else "error:" + errno.errorcode.get(code, str(code))
            pending.remove(s)
    result = [out.get(s, "timeout") for s in socks]
    for s in socks:
        s.close()
    return result

results = []
if sport:
    for _ in range(count):
        results += batch(1)
else:
    results = batch(count)
print(json.dumps(results))
"""

_HTTP_SERVE = r"""
import functools, http.server, os, sys
bind, port, name, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        if directory:
            return super().do_GET()
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", name)
        self.send_header("X-Client", "%s:%d" % self.client_address[:2])
        self.end_headers()
        self.wfile.write(body)

http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer((bind, port), functools.partial(Handler, directory=directory or os.getcwd()))
print("serving", name, bind, port, flush=True)
server.serve_forever()
"""

_HTTP_GET = r"""
import http.client, json, sys, urllib.parse
url, timeout = sys.argv[1], float(sys.argv[2])
u = urllib.parse.urlsplit(url)
conn = (http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection)(u.hostname, u.port, timeout=timeout)
try:
    conn.connect()
    peer = conn.sock.getpeername()[:2]
    conn.request("GET", (u.path or "/") + ("?" + u.query if u.query else ""))
    r = conn.getresponse()
    body = r.read().decode("utf-8", "replace")
    print(json.dumps({"status": r.status, "body": body, "peer": list(peer)}))
except Exception as e:
    print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}))
    sys.exit(1)
"""


# ---------------------------------------------------------------------------------------
# hosts


class Host:
    """A network namespace with one interface ``eth0``, the far end of a veth on a bridge."""

    def __init__(self, lab: "Lab", name: str, namespace: str, port_name: str, mac: str,
                 interface: ipaddress.IPv4Interface, bridge: Bridge):
        self.lab = lab
        self.name = name
        self.namespace = namespace
        self.port_name = port_name          # the veth end in the root namespace (an OVS port)
        self.mac = mac
        self.interface = interface
        self.ip = str(interface.ip)         # address only; ``cidr`` has the prefix length
        self.cidr = str(interface)
        self.bridge = bridge
        self.ofport: int = -1
        self._where = f" (in namespace {namespace})"

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.cidr} {self.mac} port={self.port_name} ofport={self.ofport}>"

    # -- running things inside the namespace
    def _argv(self, cmd: str | Sequence[str]) -> list[str]:
        inner = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        return ["ip", "netns", "exec", self.namespace, *inner]

    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float | None = COMMAND_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the namespace (a string goes through ``sh -c``); text output captured."""
        return run(self._argv(cmd), check=check, timeout=timeout, input=input, where=self._where)

    def popen(self, cmd: str | Sequence[str], stdout=None, stderr=None, **kwargs) -> Process:
        """Start ``cmd`` in the background inside the namespace; the lab kills it at close.

        Output goes to a log file in the lab's work directory (see :meth:`Process.output`)
        unless ``stdout``/``stderr`` are given.
        """
        return self.lab._spawn(self._argv(cmd), stdout=stdout, stderr=stderr, where=self._where, **kwargs)

    def python(self, script: str, *args: object, timeout: float | None = COMMAND_TIMEOUT,
               check: bool = True) -> subprocess.CompletedProcess:
        """Run a Python script (standard library only) inside the namespace."""
        return self.run([sys.executable, "-I", "-c", script, *map(str, args)], check=check, timeout=timeout)

    # -- configuration
    def add_ip(self, cidr: str) -> None:
        self.run(["ip", "addr", "add", cidr, "dev", "eth0"])

    def add_route(self, destination: str, via: str | None = None, dev: str = "eth0") -> None:
        """``ip route replace <destination> [via <via>] dev <dev>`` (``destination`` may be ``default``)."""
        self.run(["ip", "route", "replace", destination, *(["via", via] if via else []), "dev", dev])

    def set_arp(self, ip: "str | Host", mac: str | None = None) -> None:
        """A permanent neighbour entry: ``ip`` (or a Host: its ip and mac) is at ``mac``."""
        if isinstance(ip, Host):
            ip, mac = ip.ip, mac or ip.mac
        if not mac:
            raise ValueError("set_arp needs a MAC address")
        self.run(["ip", "neigh", "replace", ip, "lladdr", mac, "dev", "eth0", "nud", "permanent"])

    def del_arp(self, ip: str) -> None:
        self.run(["ip", "neigh", "del", ip, "dev", "eth0"], check=False)

    def annotate(self, tenant: str, ips: "str | Iterable[str] | None" = None, vm_id: str | None = None,
                 channel: str | None = None) -> None:
        """What the operator does for a VM's port: its OVS interface says whose it is
        (``mbvisor-tenant``), its MAC (``attached-mac``: this host's) and its own addresses
        (``mbvisor-ips``: this host's address unless given; a string is written as it
        is, so a test can give a bad one), and optionally its ``vm-id`` and channel region
        (``mbvisor-channel``)."""
        ips = self.ip if ips is None else ips if isinstance(ips, str) else ",".join(ips)
        ids = {"attached-mac": self.mac, "mbvisor-tenant": tenant, "mbvisor-ips": ips, "vm-id": vm_id,
               "mbvisor-channel": channel}
        self.bridge.vsctl("set", "Interface", self.port_name,
                          *[f"external_ids:{key}={_ovs_quote(value)}" for key, value in ids.items() if value is not None])

    # -- counters
    def counter(self, name: str, interface: str = "eth0") -> int:
        """``/sys/class/net/<interface>/statistics/<name>`` read inside the namespace."""
        return int(self.run(["cat", f"/sys/class/net/{interface}/statistics/{name}"]).stdout)

    def rx_packets(self) -> int:
        """Packets that reached this host's ``eth0`` (the truth; OVS port stats miss AF_PACKET drops)."""
        return self.counter("rx_packets")

    def tx_packets(self) -> int:
        return self.counter("tx_packets")

    # -- traffic
    def ping(self, dst: "str | Host", count: int = 3, interval: float = 0.01, timeout: float = 5.0) -> int:
        """Send exactly ``count`` ICMP echo requests, ``interval`` s apart; return how many
        distinct replies came back.

        ``timeout`` is how long to wait for missing replies after the last request; the
        wait ends as soon as every reply is in, so a generous value costs nothing when
        traffic flows (the userspace datapath can stall on a busy host), and a short one
        suits requests you expect to be dropped.  (A raw-socket pinger rather than
        iputils ``ping``, which waits only two round trips once some reply has come.)
        Raises :class:`NetlabError` if a request could not even be sent (no route).
        """
        done = self.python(_PING, _address(dst), count, interval, timeout,
                           timeout=count * interval + timeout + 30)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["errors"]:      # e.g. no route: 0 replies must not pass for a drop
            raise NetlabError(f"ping {_address(dst)} from {self.name}{self._where} could not send: "
                              + "; ".join(result["errors"]))
        return result["received"]

    def send_udp(self, dst: "str | Host", dst_port: int, count: int = 1, src_port: int | None = None,
                 payload: bytes = b"netlab", interval: float = 0.0) -> int:
        """Send ``count`` UDP datagrams from a plain socket; return how many ``sendto`` accepted.

        Without a neighbour entry for ``dst`` the kernel queues only a few datagrams while
        it resolves the MAC (use :meth:`set_arp` or :meth:`Lab.fill_arp` for exact counts).
        """
        done = self.python(_UDP_SEND, _address(dst), dst_port, count, src_port or 0, interval,
                           payload.hex(), timeout=count * interval + 30)
        return int(done.stdout.split()[-1])

    def udp_listener(self, port: int, bind: str = "0.0.0.0", timeout: float = 10.0) -> UdpListener:
        """Start a UDP receiver on ``port`` in this namespace (ready when returned)."""
        process = self.lab._spawn(self._argv([sys.executable, "-I", "-u", "-c", _UDP_LISTEN, bind, str(port)]),
                                  stdout=subprocess.PIPE, stderr=None, where=self._where, text=True)
        listener = UdpListener(process, port, self._where)
        listener.wait_ready(timeout)
        return listener

    def tcp_probe(self, dst: "str | Host", dst_port: int, count: int = 1, src_port: int | None = None,
                  timeout: float = 3.0) -> list[str]:
        """Make ``count`` TCP connection attempts (each sends a SYN); one outcome per attempt:

        ``"open"`` (SYN-ACK), ``"refused"`` (RST), ``"timeout"`` (no answer in ``timeout``
        seconds: dropped) or ``"error:<errno>"``.  Attempts run in parallel unless
        ``src_port`` is fixed; answers end the wait early.  Connections are closed with RST.
        A ``timeout`` above ~1 s lets the kernel retransmit an unanswered SYN once (pass a
        short one when you expect a drop).
        """
        rounds = count if src_port else 1
        done = self.python(_TCP_PROBE, _address(dst), dst_port, count, src_port or 0, timeout,
                           timeout=rounds * timeout + 30)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def send_tcp_syn(self, dst: "str | Host", dst_port: int, count: int = 1, src_port: int | None = None,
                     timeout: float = 3.0) -> int:
        """Send ``count`` SYNs (connection attempts); return how many were answered (open or refused)."""
        return sum(r in ("open", "refused") for r in self.tcp_probe(dst, dst_port, count, src_port, timeout))

    def tcp_connect(self, dst: "str | Host", dst_port: int, timeout: float = 3.0,
                    src_port: int | None = None) -> str:
        """One connection attempt: ``"open"``, ``"refused"``, ``"timeout"`` or ``"error:..."``."""
        return self.tcp_probe(dst, dst_port, 1, src_port, timeout)[0]

    def listening(self, port: int) -> bool:
        """True when a TCP socket listens on ``port`` in this namespace (reads /proc/net/tcp*)."""
        out = self.run("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", check=False).stdout
        wanted = f":{port:04X}"
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[1].endswith(wanted) and parts[3] == "0A":
                return True
        return False

    def wait_listening(self, port: int, timeout: float = 10.0, process: Process | None = None) -> None:
        def ready() -> bool:
            if process is not None:
                process.check_alive()
            return self.listening(port)
        wait_until(ready, timeout, f"a TCP listener on port {port}{self._where}")

    def serve_http(self, port: int = 8000, directory: str | None = None, bind: str = "0.0.0.0",
                   timeout: float = 10.0) -> Process:
        """An HTTP server (``http.server``) on ``port``, listening when this returns.

        Without ``directory`` every GET answers 200 with the body ``"<host name>\\n"`` (and
        headers ``X-Served-By``, ``X-Client: ip:port``), which tells which host served it.
        """
        process = self.popen([sys.executable, "-I", "-u", "-c", _HTTP_SERVE, bind, str(port), self.name,
                              directory or ""])
        self.wait_listening(port, timeout, process)
        return process

    def http_get(self, url: str, timeout: float = 10.0) -> HttpResponse:
        """GET ``url`` from this namespace (no proxies): ``(status, body, peer)``.

        Raises :class:`NetlabError` when no response arrives (refused, timeout, reset).
        """
        done = self.python(_HTTP_GET, url, timeout, check=False, timeout=timeout + 30)
        lines = done.stdout.strip().splitlines()
        answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        if "status" not in answer:
            reason = answer.get("error") or done.stderr.strip() or "no output"
            raise NetlabError(f"GET {url} from {self.name}{self._where} failed: {reason}")
        return HttpResponse(answer["status"], answer["body"], tuple(answer["peer"]))


def _address(dst: "str | Host") -> str:
    return dst.ip if isinstance(dst, Host) else str(dst)


# ---------------------------------------------------------------------------------------
# the lab


_open_labs: "weakref.WeakSet[Lab]" = weakref.WeakSet()


@atexit.register
def _close_forgotten_labs() -> None:
    for lab in list(_open_labs):
        try:
            lab.close()
        except Exception as exc:          # pragma: no cover - last resort at interpreter exit
            print(f"netlab: {exc}", file=sys.stderr)


class Lab:
    """Owns bridges, namespaces, veths and processes under one unique prefix.

    Use as a context manager or call :meth:`close` (idempotent; also run at interpreter
    exit for labs left open).  ``close`` removes exactly what this lab created, in order:
    processes, ports on foreign bridges, own bridges, veths, namespaces, work directory.
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = self._reserve(prefix)
        self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.bridges: list[Bridge] = []
        self.hosts: dict[str, Host] = {}
        self._processes: list[Process] = []
        self._links: list[str] = []                 # root-namespace veth ends
        self._namespaces: list[str] = []
        self._foreign_ports: list[tuple[str, str]] = []   # (bridge, port) on bridges we do not own
        self._names: set[str] = set()               # root-namespace names handed out
        self._counter = 0
        _open_labs.add(self)

    def __repr__(self) -> str:
        return f"<Lab {self.prefix}: {len(self.bridges)} bridge(s), {len(self.hosts)} host(s)>"

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as cleanup:          # do not hide the error that ended the block
            exc.add_note(f"netlab: cleanup after this error also failed: {cleanup}")

    # -- names
    @staticmethod
    def _reserve(prefix: str | None) -> str:
        os.makedirs(RESERVATIONS, exist_ok=True)
        if prefix is not None and not re.fullmatch(PREFIX_STEM + r"[0-9a-f]{4}", prefix):
            raise ValueError(f"lab prefix must look like {PREFIX_STEM}1a2b, not {prefix!r}")
        for _ in range(50):
            candidate = prefix or f"{PREFIX_STEM}{secrets.token_hex(2)}"
            try:
                fd = os.open(os.path.join(RESERVATIONS, candidate), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if prefix:
                    raise NetlabError(f"lab prefix {prefix} is reserved ({RESERVATIONS}/{prefix})") from None
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            if any(leftovers(candidate).values()):   # names we did not create: never touch them
                if prefix:
                    os.unlink(os.path.join(RESERVATIONS, candidate))
                    raise NetlabError(f"resources named {prefix}* already exist: {leftovers(prefix)}")
                with open(os.path.join(RESERVATIONS, candidate), "w") as f:
                    f.write("foreign\n")               # keep it so nobody picks it; cleanup_stale skips it
                continue
            return candidate
        raise NetlabError("could not find a free lab prefix")

    def _root_name(self, suffix: str | None, letter: str) -> str:
        """A root-namespace interface name ``<prefix><suffix>`` (≤ 15 chars, unique in the lab)."""
        if suffix and not _NAME.match(suffix):
            raise ValueError(f"names may use letters, digits, '_' and '-' only, not {suffix!r}")
        if suffix and len(self.prefix + suffix) <= IFNAMSIZ and self.prefix + suffix not in self._names:
            name = self.prefix + suffix
        else:
            while True:
                name = f"{self.prefix}{letter}{self._counter}"
                self._counter += 1
                if name not in self._names:
                    break
        self._names.add(name)
        return name

    def _check_open(self) -> None:
        if self not in _open_labs:
            raise NetlabError(f"lab {self.prefix} is closed")

    # -- building
    def bridge(self, name: str | None = None, controller: str | None = None, fail_mode: str = "secure",
               protocols: str = "OpenFlow13", dpid: int | None = None) -> Bridge:
        """A new OVS bridge ``<prefix><name>`` (default ``<prefix>s<n>``) on the netdev datapath.

        ``dpid`` defaults to :func:`datapath_id_for` (prefix, index); it is set through
        ``other-config:datapath-id`` and read back from ``datapath_id`` into ``Bridge.dpid``.
        ``fail_mode`` ``"standalone"`` makes a controller-less bridge a learning switch;
        ``"secure"`` drops everything until flows are installed.
        """
        self._check_open()
        if fail_mode not in ("secure", "standalone"):
            raise ValueError(f"fail_mode must be 'secure' or 'standalone', not {fail_mode!r}")
        index = len(self.bridges)
        full = self._root_name(name, "s") if name else self._root_name(f"s{index}", "s")
        wanted = datapath_id_for(self.prefix, index) if dpid is None else dpid
        if not 0 <= wanted < 1 << 64:
            raise ValueError(f"datapath id out of range: {wanted}")
        args = ["add-br", full, "--", "set", "bridge", full, "datapath_type=netdev", f"fail_mode={fail_mode}",
                f"protocols={protocols}", f"other-config:datapath-id={wanted:016x}",
                "other-config:disable-in-band=true"]
        run(["ovs-vsctl", "--timeout=10", *args], where=f" (lab {self.prefix})")
        bridge = Bridge(self, full, None, protocols, owned=True)
        self.bridges.append(bridge)
        wait_until(lambda: bridge.read_dpid() == wanted, 10.0, f"bridge {full} to take datapath id {wanted:#018x}")
        bridge.dpid = wanted
        if controller:
            bridge.set_controller(controller)
        return bridge

    def existing_bridge(self, name: str, protocols: str = "OpenFlow13") -> Bridge:
        """Wrap a bridge this lab did not create (never deleted; only our ports are removed)."""
        self._check_open()
        bridge = Bridge(self, name, None, protocols, owned=False)
        bridge.dpid = bridge.read_dpid()
        bridge._next_ofport = 0       # let OVS choose port numbers on foreign bridges
        return bridge

    def host(self, name: str, ip: str | None = None, mac: str | None = None, bridge: Bridge | None = None,
             ofport: int | None = None, gateway: str | None = None) -> Host:
        """A namespace ``<prefix>-<name>`` whose ``eth0`` is a veth to a port on ``bridge``.

        ``ip`` is ``"10.0.0.1/24"`` style (default ``10.0.0.<n>/24``, n = 1, 2, ...), ``mac``
        defaults to a unique locally administered address, ``bridge`` to the lab's only
        bridge, ``ofport`` to the next free number on that bridge (requested, then verified).
        """
        self._check_open()
        if not _NAME.match(name):
            raise ValueError(f"host names may use letters, digits, '_' and '-' only, not {name!r}")
        if name in self.hosts:
            raise ValueError(f"lab {self.prefix} already has a host {name!r}")
        if bridge is None:
            if len(self.bridges) != 1:
                raise ValueError(f"lab {self.prefix} has {len(self.bridges)} bridges; say which one")
            bridge = self.bridges[0]
        number = len(self.hosts) + 1
        interface = ipaddress.IPv4Interface(ip or f"10.0.0.{number}/24")
        digits = self.prefix[len(PREFIX_STEM):]
        mac = (mac or f"02:{digits[:2]}:{digits[2:]}:00:{number >> 8:02x}:{number & 0xFF:02x}").lower()
        namespace = f"{self.prefix}-{name}"
        port = self._root_name(name, "v")
        where = f" (lab {self.prefix}, host {name})"

        def cmd(*argv: str) -> None:
            run(argv, where=where)

        def in_ns(*argv: str) -> None:
            run(["ip", "netns", "exec", namespace, *argv], where=where)

        cmd("ip", "netns", "add", namespace)
        self._namespaces.append(namespace)
        host = Host(self, name, namespace, port, mac, interface, bridge)
        self.hosts[name] = host
        # No IPv6 chatter (RS, MLD, DAD) on the test network: set before eth0 exists.
        in_ns("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        cmd("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._links.append(port)
        _disable_ipv6_on(port)
        cmd("ethtool", "-K", port, "tx", "off", "gro", "off")
        cmd("ip", "link", "set", port, "up")
        cmd("ip", "-n", namespace, "link", "set", "lo", "up")
        cmd("ip", "-n", namespace, "link", "set", "eth0", "address", mac)
        cmd("ip", "-n", namespace, "addr", "add", str(interface), "dev", "eth0")
        in_ns("ethtool", "-K", "eth0", "tx", "off")
        cmd("ip", "-n", namespace, "link", "set", "eth0", "up")
        if gateway:
            cmd("ip", "-n", namespace, "route", "add", "default", "via", gateway, "dev", "eth0")

        run(["ovs-vsctl", "--timeout=10", "add-port", bridge.name, port, *bridge._ofport_request(port, ofport)],
            where=where)
        if not bridge.owned:
            self._foreign_ports.append((bridge.name, port))
        host.ofport = bridge._claim_ofport(port, ofport)
        bridge.hosts.append(host)
        return host

    def patch(self, a: Bridge, b: Bridge) -> tuple[int, int]:
        """Connect two bridges with a pair of OVS patch ports; return their ofports (on a, on b)."""
        self._check_open()
        pa, pb = self._root_name(None, "p"), self._root_name(None, "p")
        run(["ovs-vsctl", "--timeout=10",
             "add-port", a.name, pa, "--", "set", "interface", pa, "type=patch", f"options:peer={pb}",
             *a._ofport_request(pa),
             "--", "add-port", b.name, pb, "--", "set", "interface", pb, "type=patch", f"options:peer={pa}",
             *b._ofport_request(pb)],
            where=f" (lab {self.prefix})")
        for bridge, port in ((a, pa), (b, pb)):
            if not bridge.owned:
                self._foreign_ports.append((bridge.name, port))
        return a._claim_ofport(pa), b._claim_ofport(pb)

    def fill_arp(self, hosts: Iterable[Host] | None = None) -> None:
        """Permanent neighbour entries between every pair of ``hosts`` (default: all), so that
        traffic between them needs no ARP and counters move only for the packets a test sends."""
        chosen = list(self.hosts.values() if hosts is None else hosts)
        for host in chosen:
            batch = "".join(f"neigh replace {o.ip} lladdr {o.mac} dev eth0 nud permanent\n"
                            for o in chosen if o is not host)
            if batch:
                host.run(["ip", "-batch", "-"], input=batch)

    def _spawn(self, argv: list[str], stdout=None, stderr=None, where: str = "", **kwargs) -> Process:
        self._check_open()
        log_path = None
        if stdout is None:
            log_path = os.path.join(self.workdir, f"process-{len(self._processes)}.log")
            stdout = open(log_path, "w")
            if stderr is None:
                stderr = subprocess.STDOUT
        elif stderr is None:
            log_path = os.path.join(self.workdir, f"process-{len(self._processes)}.err")
            stderr = open(log_path, "w")
        try:
            popen = subprocess.Popen(argv, stdout=stdout, stderr=stderr, start_new_session=True,
                                     **{"stdin": subprocess.DEVNULL, **kwargs})
        finally:
            for stream in (stdout, stderr):
                if hasattr(stream, "close") and getattr(stream, "name", None) == log_path:
                    stream.close()
        process = Process(popen, argv, log_path, where)
        self._processes.append(process)
        return process

    def popen(self, argv: Sequence[str], **kwargs) -> Process:
        """A background process in the root namespace (e.g. a controller), killed at close."""
        return self._spawn([str(a) for a in argv], **kwargs)

    def adopt(self, namespaces: Iterable[str] = (), links: Iterable[str] = ()) -> None:
        """Namespaces and root-namespace links made under this lab's prefix by someone else
        (a data centre's hypervisors): :meth:`close` kills what runs in them and removes
        them with the lab's own, so they go even when their maker fails halfway."""
        self._check_open()
        self._namespaces.extend(namespaces)
        self._links.extend(links)

    # -- inspection and teardown
    def leftovers(self) -> dict[str, list[str]]:
        """What still exists under this lab's prefix (see :func:`leftovers`)."""
        return leftovers(self.prefix)

    def close(self) -> None:
        """Remove everything this lab created; idempotent.  Raises :class:`NetlabError`
        listing what could not be removed (after trying everything)."""
        errors: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> bool:
            try:
                action()
                return True
            except Exception as exc:
                errors.append(f"{what}: {exc}")
                return False

        _open_labs.discard(self)
        for process in list(self._processes):
            if attempt(f"stop process {process.pid}", process.stop):
                self._processes.remove(process)
        for namespace in self._namespaces:          # anything else running in our namespaces
            attempt(f"kill processes in {namespace}", lambda: _kill_namespace_pids(namespace))
        for bridge_name, port in list(self._foreign_ports):
            if attempt(f"remove port {port} from {bridge_name}",
                       lambda: run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-port", bridge_name, port])):
                self._foreign_ports.remove((bridge_name, port))
        for bridge in [b for b in self.bridges if b.owned]:
            if attempt(f"delete bridge {bridge.name}",
                       lambda: run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", bridge.name])):
                self.bridges.remove(bridge)
        for link in list(self._links):
            if not os.path.exists(f"/sys/class/net/{link}") or attempt(
                    f"delete link {link}", lambda: run(["ip", "link", "del", link])):
                self._links.remove(link)
        for namespace in list(self._namespaces):
            if not os.path.exists(f"/run/netns/{namespace}") or attempt(
                    f"delete namespace {namespace}", lambda: run(["ip", "netns", "del", namespace])):
                self._namespaces.remove(namespace)
        if os.path.isdir(self.workdir):
            attempt(f"remove {self.workdir}", lambda: shutil.rmtree(self.workdir))
        if errors:
            _open_labs.add(self)                    # a later close() retries what is left
            raise NetlabError(f"lab {self.prefix}: cleanup incomplete:\n  - " + "\n  - ".join(errors))
        try:
            os.unlink(os.path.join(RESERVATIONS, self.prefix))
        except FileNotFoundError:
            pass


def cleanup_stale() -> list[str]:
    """Remove what labs of processes that no longer exist left behind (a run killed with
    SIGKILL, or SIGTERM which skips ``atexit``); return the prefixes cleaned.

    Acts only on prefixes with a reservation file in ``/run/mbvisor-netlab`` naming a dead
    pid; never on anything else.  Not called automatically.
    """
    cleaned = []
    if not os.path.isdir(RESERVATIONS):
        return cleaned
    for prefix in sorted(os.listdir(RESERVATIONS)):
        path = os.path.join(RESERVATIONS, prefix)
        try:
            with open(path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not re.fullmatch(PREFIX_STEM + r"[0-9a-f]{4}", prefix) or not _gone(pid):
            continue
        found = leftovers(prefix)
        for namespace in found["netns"]:
            _kill_namespace_pids(namespace)
        for bridge in found["bridges"]:
            run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", bridge])
        for link in leftovers(prefix)["links"]:
            run(["ip", "link", "del", link], check=False)
        for namespace in found["netns"]:
            run(["ip", "netns", "del", namespace], check=False)
        for workdir in Path(tempfile.gettempdir()).glob(f"{prefix}-*"):
            shutil.rmtree(workdir, ignore_errors=True)
        if not any(leftovers(prefix).values()):
            os.unlink(path)
        cleaned.append(prefix)
    return cleaned


def _disable_ipv6_on(link: str) -> None:
    path = f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6"
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1\n")


def _kill_namespace_pids(namespace: str) -> None:
    if not os.path.exists(f"/run/netns/{namespace}"):
        return
    pids = [int(p) for p in run(["ip", "netns", "pids", namespace]).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline and not _gone(pid):
            try:                          # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.01)


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (missing, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
