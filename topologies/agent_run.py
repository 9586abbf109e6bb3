"""Running the real host agent (``mbvisor agent``) as a process, and giving it VMs to serve:
for integration tests, benchmarks and the lab demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

from mbvisor.guest.region import open_file

from .controller_run import Controller
from .netlab import die_with_parent, wait_until


class AgentProcess:
    """``mbvisor agent`` in its own process group, pointed at a :class:`Controller`."""

    def __init__(self, controller: Controller, state_dir, bridges: tuple[str, ...] = (),
                 inventory_refresh: float | None = None, options: tuple[str, ...] = ()):
        """``options``: more of ``mbvisor agent``'s own (e.g. ``--doorbell-dir``,
        ``--ovsdb``)."""
        self.controller = controller
        self.bridges = bridges
        self.inventory_refresh = inventory_refresh
        self.options = options
        self.status_file = state_dir / "agent-status.json"
        self.log = state_dir / "agent.log"
        self.process = None

    def start(self) -> "AgentProcess":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mbvisor.agents.cli", "agent", "--controller", self.controller.url,
                 "--token-file",
                 str(self.controller.state_dir / "token"), "--status-file", str(self.status_file),
                 "--discovery-interval", "0.3", *[f"--bridge={name}" for name in self.bridges],
                 *([f"--inventory-refresh={self.inventory_refresh}"] if self.inventory_refresh else []),
                 *self.options],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)
        return self

    def stop(self, sig=signal.SIGTERM) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        os.killpg(self.process.pid, sig)
        return self.process.wait(timeout=15)

    def alive(self) -> bool:
        return self.process.poll() is None

    def status(self) -> dict:
        """The agent's status file ({} until it wrote one)."""
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def channels(self) -> list[dict]:
        return self.status().get("channels", [])

    def inventories(self) -> dict[str, dict]:
        """The last publication of each bridge's inventory, by bridge name."""
        return {i["bridge"]: i for i in self.status().get("inventories", [])}

    def wait_serving(self, *names: str) -> None:
        wait_until(lambda: set(names) <= {c["channel"] for c in self.channels()}, timeout=30,
                   what=f"agent serving {names} (log {self.log})")


def kill_9_and_restart(part: "AgentProcess | Controller") -> None:
    """SIGKILL the agent or the controller (its whole process group) and start it again
    with the same settings, ports and state: a crash in the middle of whatever it did."""
    part.stop(signal.SIGKILL)
    part.start()


def make_region(prefix: str = "mbvisor-test") -> str:
    """A fresh 1 MiB region in /dev/shm with a unique name (the caller removes it)."""
    path = f"/dev/shm/{prefix}-{uuid.uuid4().hex[:12]}"
    open_file(path, create_size=1 << 20).close()
    return path


def annotate(host, region: str, vm_id: str, tenant: str | None = None, ips=None) -> None:
    """What a QEMU launch script does: tell the agent which interface is the VM's, whose it
    is (``tenant``, by default its own: a VM alone in its tenant) and its addresses (by
    default the host's)."""
    host.annotate(tenant or vm_id, ips, vm_id=vm_id, channel=region)
