"""A QEMU middlebox VM that can live-migrate between the hypervisors of a
:class:`~mbvisor.topologies.datacentre.DataCentre` (tests/test_live_migration.py).

    from mbvisor.topologies.qemu.migration import MigratableVM, migrate

    source = MigratableVM(dc.hypervisors[0], "mbq", mac, image, state / "a", region=..., append=...).start()
    source.wait_ready()
    destination = MigratableVM(dc.hypervisors[1], "mbq", mac, image, state / "b", region=..., append=...,
                               incoming=True).start()       # paused, waiting for the migration stream
    outcome = migrate(source, destination, state / "migration.sock")
    source.stop()                                            # the switchover: the source's port goes

Why not ``launch-middlebox.sh``: it talks to the machine's own ``ovs-vsctl`` database, names
the region ``/dev/shm/NAME`` after the VM (source and destination of one VM, running at once
on one machine, need two regions), has no QMP socket and no ``-incoming``, and its
ivshmem-plain device has QEMU's default ``master=off``, which blocks migration ("Migration is
disabled when using feature 'peer mode' in device 'ivshmem'").  This module starts QEMU with
the launcher's machine, devices and kernel command line (TCG), plus ``master=on`` on the
ivshmem-plain device (the one peer that owns the memory: QEMU then migrates the region with
the guest's RAM) and a QMP socket, inside the hypervisor's network namespace (``ip netns
exec``), so its tap is that hypervisor's bridge port, annotated for the agent as the
launcher annotates it.

Standard library only (plus the netlab helpers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..netlab import run, wait_until
from .vm import GuestConsole, VMError, connect_unix

REGION_SIZE = 1 << 20
MEMORY_MIB = 256


class QMPError(VMError):
    """QEMU answered a QMP command with an error, or its monitor could not be reached."""


class QMP:
    """A minimal QMP client on a UNIX socket.  Events are kept in :attr:`events` in the order
    they came, each QEMU's own dict (its ``timestamp`` is QEMU's wall clock, the same clock
    as :func:`time.time`), with ``received`` (our :func:`time.time`) added."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self.sock = connect_unix(path, timeout, "the QMP socket")
        self.buffer = b""
        self.events: list[dict] = []
        greeting = self._read(timeout)
        if "QMP" not in greeting:
            raise QMPError(f"no QMP greeting on {path}: {greeting}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self.sock.close()

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"no message from QMP within {timeout:g}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise QMPError("QMP connection closed")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, timeout: float = 10.0, **arguments) -> object:
        """Run ``command``; return its ``return``; raise :class:`QMPError` on an ``error``.
        Events read meanwhile go to :attr:`events`."""
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(max(deadline - time.monotonic(), 0.001))
            if "event" in reply:
                reply["received"] = time.time()
                self.events.append(reply)
            elif "error" in reply:
                raise QMPError(f"QMP {command} {arguments}: {reply['error']}")
            elif "return" in reply:
                return reply["return"]

    def poll_events(self) -> list[dict]:
        """Read whatever events QEMU has sent (without waiting); return :attr:`events`."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.buffer += data
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            reply = json.loads(line)
            if "event" in reply:
                reply["received"] = time.time()
                self.events.append(reply)
        return self.events

    def event(self, name: str) -> dict | None:
        """The first event ``name`` seen so far (None: not yet)."""
        return next((e for e in self.poll_events() if e["event"] == name), None)


def event_time(event: dict) -> float:
    """An event's QEMU timestamp as Unix time."""
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


class MigratableVM:
    """One QEMU process of a middlebox VM on one hypervisor of a data centre: a tap in the
    hypervisor's namespace added to its bridge with the operator's annotations
    (``attached-mac``, ``vm-id``, ``mbvisor-tenant``, ``mbvisor-ips``, ``mbvisor-channel``) in
    one OVS transaction, its own channel region file (``region``, created here, zeroed), and
    QEMU (TCG) in that namespace.  ``incoming=True``: QEMU starts paused with ``-incoming
    defer`` (:func:`migrate` gives it its address), the destination of a migration."""

    def __init__(self, hypervisor, vm_id: str, mac: str, image: dict, state_dir: Path, region: str,
                 append: str, tenant: str, ips: str, tap: str, incoming: bool = False):
        self.hypervisor, self.vm_id, self.mac, self.image = hypervisor, vm_id, mac.lower(), image
        self.state_dir, self.region, self.append = Path(state_dir), region, append
        self.tenant, self.ips, self.tap, self.incoming = tenant, ips, tap, incoming
        self.process: subprocess.Popen | None = None
        self.console_log = self.state_dir / "console.log"
        self.qmp_path = self.state_dir / "qmp.sock"
        self.ofport: int | None = None
        self._qmp: QMP | None = None
        self._console: GuestConsole | None = None
        self._made: list[str] = []   # what stop() removes: "region", "tap", "port"

    @property
    def bridge(self):
        return self.hypervisor.bridge

    def argv(self) -> list[str]:
        """QEMU's command line: the launcher's (docs/qemu.md section 2), TCG, plus QMP and
        ``master=on``; the same on both sides of a migration but for files and tap."""
        s = self.state_dir
        return ["qemu-system-x86_64", "-name", self.vm_id, "-machine", "pc,accel=tcg", "-cpu", "qemu64",
                "-smp", "1", "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-kernel", self.image["kernel"], "-initrd", self.image["initramfs"],
                "-append", f"console=ttyS0 loglevel=4 panic=-1 ipv6.disable=1 mbv.name={self.vm_id} {self.append}",
                "-chardev", f"file,id=console,path={s / 'console.log'}", "-serial", "chardev:console",
                "-chardev", f"socket,id=control,path={s / 'control.sock'},server=on,wait=off",
                "-serial", "chardev:control",
                "-object", f"memory-backend-file,id=mb,share=on,mem-path={self.region},size={REGION_SIZE}",
                "-device", "ivshmem-plain,memdev=mb,master=on",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={self.mac},csum=off,guest_csum=off",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                *(["-incoming", "defer"] if self.incoming else [])]

    def start(self) -> "MigratableVM":
        """Region, tap, annotated port, QEMU; returns once QMP answers (the destination
        paused in ``inmigrate``).  On failure everything made so far is removed."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.region):
            raise VMError(f"region {self.region} exists already")
        with open(self.region, "xb") as region:
            self._made.append("region")
            region.truncate(REGION_SIZE)
        os.chmod(self.region, 0o600)
        ns = self.hypervisor.namespace
        run(["ip", "-n", ns, "tuntap", "add", "dev", self.tap, "mode", "tap"])
        self._made.append("tap")
        run(["ip", "netns", "exec", ns, "ethtool", "-K", self.tap, "tx", "off"])   # docs/qemu.md section 4
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{self.tap}.disable_ipv6=1"])
        run(["ip", "-n", ns, "link", "set", self.tap, "up"])
        self._made.append("port")
        self.bridge.vsctl("add-port", self.bridge.name, self.tap, "--", "set", "Interface", self.tap,
                          f"external_ids:mbvisor-channel={self.region}", f"external_ids:attached-mac={self.mac}",
                          f"external_ids:vm-id={self.vm_id}", f"external_ids:mbvisor-tenant={self.tenant}",
                          f'external_ids:mbvisor-ips="{self.ips}"')
        self.ofport = self.bridge.ofport(self.tap)
        for name in ("console.log", "qmp.sock", "control.sock"):
            (self.state_dir / name).unlink(missing_ok=True)
        self.console_log.touch()
        with open(self.state_dir / "qemu.log", "ab") as log:
            self.process = subprocess.Popen(["ip", "netns", "exec", ns, *self.argv()], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.qmp_path.exists() or self.process.poll() is not None, 20,
                   f"QEMU of {self.vm_id} on hypervisor {self.hypervisor.index} to open its QMP socket")
        if self.process.poll() is not None:
            raise VMError(f"QEMU exited with {self.process.returncode}: {self.tail()}")
        self._qmp = QMP(self.qmp_path)

    @property
    def qmp(self) -> QMP:
        if self._qmp is None:
            raise VMError("QEMU is not running")
        return self._qmp

    def status(self) -> str:
        return self.qmp.execute("query-status")["status"]

    def tail(self) -> str:
        parts = []
        for path in (self.state_dir / "qemu.log", self.console_log):
            if path.exists():
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            text = self.console_log.read_text(errors="replace")
            if "MBVISOR-FAILED" in text or "Kernel panic" in text or self.process.poll() is not None:
                raise VMError(f"the guest failed:\n{self.tail()}")
            return "MBVISOR-READY" in text
        wait_until(ready, timeout, f"{self.vm_id} to print MBVISOR-READY", interval=0.05)

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """A shell command in the guest over its control serial port (ttyS1) on this QEMU."""
        if self._console is None:
            self._console = GuestConsole(self.state_dir / "control.sock")
        return self._console.run(command, timeout)

    def mbctl(self, arguments: str, timeout: float = 20.0) -> tuple[int, dict]:
        """The real mbctl in the guest, on the real ivshmem device (no --shm)."""
        code, out = self.run(f"python3 -m mbvisor.guest.mbctl --json --timeout {timeout:g} {arguments}",
                             timeout=timeout + 60)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return code, json.loads(lines[-1]) if lines else {"output": out}

    def quit(self, timeout: float = 10.0) -> None:
        """QEMU ends (QMP ``quit``), as a source does once its guest runs elsewhere."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.qmp.execute("quit")
        except (QMPError, OSError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def remove_port(self) -> None:
        """The switchover on the host: the source's port and tap go."""
        if "port" in self._made:
            self.bridge.vsctl("--if-exists", "del-port", self.bridge.name, self.tap)
            self._made.remove("port")
        if "tap" in self._made:
            run(["ip", "-n", self.hypervisor.namespace, "link", "del", self.tap], check=False)
            self._made.remove("tap")

    def stop(self) -> None:
        """QEMU, port, tap, region, sockets: all gone; idempotent, tries everything."""
        errors = []
        for closing in (self._console, self._qmp):
            if closing is not None:
                try:
                    closing.close()
                except OSError:
                    pass
        self._console = self._qmp = None
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass
        try:
            self.remove_port()
        except Exception as error:  # the hypervisor's ovsdb may be gone already: the lab removes it
            errors.append(f"port {self.tap}: {error}")
        if "region" in self._made:
            Path(self.region).unlink(missing_ok=True)
            self._made.remove("region")
        for name in ("qmp.sock", "control.sock"):
            (self.state_dir / name).unlink(missing_ok=True)
        if errors:
            raise VMError("; ".join(errors))

    def leftovers(self) -> list[str]:
        found = []
        if self.process is not None and self.process.poll() is None:
            found.append(f"qemu {self.process.pid}")
        if os.path.exists(self.region):
            found.append(f"region {self.region}")
        links = run(["ip", "-n", self.hypervisor.namespace, "-o", "link", "show", self.tap], check=False)
        if links.returncode == 0 and links.stdout.strip():
            found.append(f"tap {self.tap}")
        return found


def migrate(source: MigratableVM, destination: MigratableVM, address: Path, timeout: float = 120.0) -> dict:
    """Live-migrate (pre-copy) ``source`` into the paused ``destination`` over a UNIX socket
    ``address``: ``migrate-incoming`` on the destination, ``migrate`` on the source, then
    ``query-migrate`` polled until ``completed`` (raise on ``failed``/``cancelled`` or the
    deadline).  ``x-ignore-shared`` must stay off (it would skip the ivshmem region, a
    shared memory backend): checked on both sides.  Returns the source's final
    ``query-migrate`` with ``started`` and ``completed`` (Unix times)."""
    for side in (source, destination):
        capabilities = {c["capability"]: c["state"] for c in side.qmp.execute("query-migrate-capabilities")}
        if capabilities.get("x-ignore-shared"):
            raise VMError(f"x-ignore-shared is on in {side.vm_id}'s QEMU: the region would not be migrated")
    destination.qmp.execute("migrate-incoming", uri=f"unix:{address}")
    wait_until(lambda: address.exists(), 10, "the destination to listen for the migration stream")
    started = time.time()
    source.qmp.execute("migrate", uri=f"unix:{address}")

    def finished() -> dict | None:
        info = source.qmp.execute("query-migrate")
        if info.get("status") in ("failed", "cancelled"):
            raise VMError(f"migration {info['status']}: {info}")
        return info if info.get("status") == "completed" else None
    info = wait_until(finished, timeout, "the migration to complete", interval=0.05)
    info["started"], info["completed"] = started, time.time()
    return info
