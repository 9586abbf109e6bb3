"""Host side of a QEMU middlebox VM: build the guest image, launch the VM through
``launch-middlebox.sh``, wait for it, run shell commands in it over its control serial port,
and clean up everything even when a test fails.

    from mbvisor.topologies.qemu.vm import MiddleboxVM, build_image

    image = build_image()                          # cached after the first build
    vm = MiddleboxVM(bridge.name, "mbq1234", "52:54:00:12:34:56", image, state_dir,
                     append="mbv.ip=10.0.0.5/24").start()
    try:
        vm.wait_ready(timeout=60)                  # "MBVISOR-READY" in the console log
        rc, out = vm.run("cat /proc/interrupts")   # through ttyS1 (control.sock)
    finally:
        vm.stop()                                  # VM, OVS port, tap and region gone

Standard library only.  See docs/qemu.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCH = HERE / "launch-middlebox.sh"
BUILD = HERE / "build-initramfs.py"


class VMError(RuntimeError):
    """The VM could not be built, started, reached, or did not answer in time."""


def requirements() -> list[str]:
    """What this machine lacks for a QEMU middlebox (empty: nothing)."""
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (Debian package qemu-system-x86)")
    if not any(Path("/boot").glob("vmlinuz-*-cloud-amd64")):
        missing.append("/boot/vmlinuz-*-cloud-amd64 (Debian package linux-image-cloud-amd64)")
    if not Path("/bin/busybox").exists():
        missing.append("/bin/busybox (Debian package busybox-static)")
    if not Path("/usr/bin/python3.11").exists():
        missing.append("/usr/bin/python3.11 (Debian package python3.11)")
    if not Path("/usr/sbin/xtables-legacy-multi").exists():
        missing.append("/usr/sbin/xtables-legacy-multi (Debian package iptables: the image's netfilter tools)")
    return missing


def build_image(cache_dir: Path | None = None) -> dict:
    """Run ``build-initramfs.py --json`` (cached); return its answer (kernel, initramfs, cached)."""
    argv = [sys.executable, str(BUILD), "--json"] + (["--cache-dir", str(cache_dir)] if cache_dir else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise VMError(f"building the guest image failed ({' '.join(argv)}):\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def connect_unix(path: Path, timeout: float, what: str) -> socket.socket:
    """A connection to QEMU's UNIX socket ``path``, which it creates a moment after it
    starts: tried again until ``timeout`` s have passed (VMError then, naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError as error:
            sock.close()
            if time.monotonic() >= deadline:
                raise VMError(f"cannot connect to {what} {path}: {error}") from None
            time.sleep(0.05)


class GuestConsole:
    """A client of the guest's control loop on ttyS1 (``control.sock``)."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self.sock = connect_unix(path, timeout, "the guest's control socket")
        self.buffer = b""
        self.counter = 0

    def close(self) -> None:
        self.sock.close()

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``command`` with the guest's ``sh``; return (exit code, stdout+stderr)."""
        self.counter += 1
        tag = f"c{self.counter}x{os.getpid()}"
        line = f"{tag} {base64.b64encode(command.encode()).decode()}\n".encode()
        self.sock.sendall(line)
        end = re.compile(rb"@@MBV-END " + tag.encode() + rb" (\d+)@@\r?\n")
        begin = f"@@MBV-BEGIN {tag}@@".encode()
        deadline = time.monotonic() + timeout
        while True:
            found = end.search(self.buffer)
            if found:
                chunk = self.buffer[:found.start()]
                self.buffer = self.buffer[found.end():]
                start = chunk.find(begin)
                output = chunk[start + len(begin):] if start >= 0 else chunk
                text = output.decode(errors="replace").replace("\r\n", "\n").strip("\n")
                return int(found.group(1)), text
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMError(f"no answer from the guest within {timeout:g}s to {command!r} "
                              f"(got so far: {self.buffer[-500:]!r})")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise VMError(f"the guest's control socket closed while running {command!r}")
            self.buffer += data


class MiddleboxVM:
    """One VM started by ``launch-middlebox.sh`` in its own process group."""

    def __init__(self, bridge: str, name: str, mac: str, image: dict, state_dir: Path, append: str = "",
                 tap: str | None = None, tenant: str | None = None, doorbell_dir: Path | None = None):
        """``tenant``: the VM's (the launch script's default: its name); its addresses are
        those of ``mbv.ip=`` in ``append``.  ``doorbell_dir``: an ivshmem-doorbell device,
        its server's socket in that directory (None: ivshmem-plain)."""
        self.bridge, self.name, self.mac, self.image, self.append = bridge, name, mac, image, append
        self.tenant = tenant
        self.state_dir = Path(state_dir)
        self.tap = tap or ("mbt" + name[-12:])
        self.region = f"/dev/shm/{name}"
        self.process: subprocess.Popen | None = None
        self.console_log = self.state_dir / "console.log"
        self.launch_log = self.state_dir / "launch.log"
        self._console: GuestConsole | None = None
        self.doorbell = None if doorbell_dir is None else Path(doorbell_dir) / f"{name}.sock"

    def start(self) -> "MiddleboxVM":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "MB_STATE_DIR": str(self.state_dir), "MB_TAP": self.tap,
                       "MB_MBVISOR": f"{sys.executable} -m mbvisor.agents.cli",
                       **({"MB_TENANT": self.tenant} if self.tenant else {}),
                       **({"MB_DOORBELL": "1", "MB_DOORBELL_DIR": str(self.doorbell.parent)} if self.doorbell else {})}
        with open(self.launch_log, "ab") as log:
            self.process = subprocess.Popen(
                [str(LAUNCH), self.bridge, self.name, self.mac, self.image["kernel"], self.image["initramfs"],
                 self.append], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=environment)
        return self

    def _tail(self) -> str:
        parts = []
        for path in (self.launch_log, self.state_dir / "qemu.log", self.console_log):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-25:]
                parts.append(f"--- {path} (last lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_for_console(self, pattern: str, timeout: float) -> str:
        """Wait until a console-log line matches ``pattern``; return that line."""
        wanted = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_log.read_text(errors="replace") if self.console_log.exists() else ""
            for line in text.splitlines():
                if wanted.search(line):
                    return line
                if "MBVISOR-FAILED" in line or "Kernel panic" in line:
                    raise VMError(f"the guest failed: {line}\n{self._tail()}")
            if self.process is not None and self.process.poll() is not None:
                raise VMError(f"launch-middlebox.sh exited with {self.process.returncode}\n{self._tail()}")
            if time.monotonic() >= deadline:
                raise VMError(f"no console line matching {pattern!r} within {timeout:g}s\n{self._tail()}")
            time.sleep(0.05)

    @property
    def accel(self) -> str | None:
        """The accelerator the launch script chose ("kvm" or "tcg"), once it has."""
        try:
            return (self.state_dir / "accel").read_text().strip()
        except FileNotFoundError:
            return None

    @property
    def accel_reason(self) -> str | None:
        """Why the launch script chose it: its probe's figures, or MB_ACCEL (docs/qemu.md)."""
        try:
            return (self.state_dir / "accel-reason").read_text().strip()
        except FileNotFoundError:
            return None

    def wait_ready(self, timeout: float = 90.0) -> None:
        self.wait_for_console(r"^MBVISOR-READY", timeout)

    @property
    def console(self) -> GuestConsole:
        if self._console is None:
            self._console = GuestConsole(self.state_dir / "control.sock")
        return self._console

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        return self.console.run(command, timeout)

    def stop(self) -> list[str]:
        """Stop the VM and remove its OVS port, tap and region; return what had to be removed
        by hand (empty when the launch script cleaned up itself).  Idempotent."""
        if self._console is not None:
            self._console.close()
            self._console = None
        if self.process is not None and self.process.poll() is None:
            # SIGTERM to the script alone (it stops QEMU and cleans up), then SIGKILL to all
            for kill, sig, wait in ((os.kill, signal.SIGTERM, 20.0), (os.killpg, signal.SIGKILL, 5.0)):
                try:
                    kill(self.process.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        by_hand = []
        pid_file = self.state_dir / "qemu.pid"
        if pid_file.exists():      # the script was killed before it could stop QEMU
            try:
                pid = int(pid_file.read_text().split()[0])
                if Path(f"/proc/{pid}/cmdline").read_bytes().find(self.region.encode()) >= 0:
                    os.kill(pid, signal.SIGKILL)
                    by_hand.append(f"qemu {pid}")
            except (OSError, ValueError, IndexError):
                pass
        ports = subprocess.run(["ovs-vsctl", "--timeout=10", "list-ports", self.bridge], capture_output=True,
                               text=True).stdout.split()
        if self.tap in ports:
            subprocess.run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-port", self.bridge, self.tap],
                           capture_output=True)
            by_hand.append(f"port {self.tap}")
        if os.path.exists(f"/sys/class/net/{self.tap}"):
            subprocess.run(["ip", "link", "del", self.tap], capture_output=True)
            by_hand.append(f"tap {self.tap}")
        if os.path.exists(self.region):
            os.unlink(self.region)
            by_hand.append(f"region {self.region}")
        if self.doorbell is not None:  # its server removes it when the script ends (or dies)
            deadline = time.monotonic() + 5
            while self.doorbell.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.doorbell.exists():
                self.doorbell.unlink()
                by_hand.append(f"ivshmem server socket {self.doorbell}")
        return by_hand

    def leftovers(self) -> list[str]:
        """What of this VM still exists (empty after :meth:`stop`)."""
        found = []
        if self.process is not None and self.process.poll() is None:
            found.append(f"launch script {self.process.pid}")
        if os.path.exists(f"/sys/class/net/{self.tap}"):
            found.append(f"tap {self.tap}")
        if os.path.exists(self.region):
            found.append(f"region {self.region}")
        if self.doorbell is not None and self.doorbell.exists():
            found.append(f"ivshmem server socket {self.doorbell}")
        return found
