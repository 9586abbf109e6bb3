"""Which VMs on this host have a channel, and who they are, as Open vSwitch records them.

The QEMU launch script annotates the VM's interface record:
``external_ids:mbvisor-channel=/dev/shm/NAME`` (the ivshmem region) and, as libvirt and
OpenStack do, ``external_ids:attached-mac`` (the guest's MAC) and ``external_ids:vm-id``.
The same records give the VM's OpenFlow port and its bridge's datapath id, so identity
comes from the hypervisor's own configuration, never from the guest.

``vm_channels`` is pure (ovsdb JSON in, records out); ``read_ovsdb`` is the shell part.
A static file in the same shape (``load_static``) replaces OVS where it is not wanted.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

CHANNEL_KEY = "mbvisor-channel"
MAX_CHANNEL_NAME = 200  # the controller accepts 256 (controller/requests.py)


@dataclass(frozen=True)
class VmChannel:
    """One VM's channel and the identity the agent vouches for."""

    interface: str
    region: str
    dpid: int
    port: int
    macs: tuple[str, ...]
    vm_id: str
    bridge: str = ""

    @property
    def name(self) -> str:
        """The channel's name in idempotency keys: stable across agent restarts, and short
        enough for the controller's bound on channel names whatever the operator wrote into
        ``vm-id`` (a long one is cut and made unique again with a digest of the whole)."""
        name = f"{self.vm_id}/{self.interface}"
        if len(name) <= MAX_CHANNEL_NAME:
            return name
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"{name[:MAX_CHANNEL_NAME - 17]}~{digest}"


def _mac(text: str) -> str:
    """The grammar's canonical MAC form (lower case, colons), which vetting compares with."""
    return text.strip().lower().replace("-", ":")


def _ovs_map(value) -> dict:
    """ovsdb's JSON encoding of a map column: ["map", [[k, v], ...]]."""
    return dict(value[1]) if isinstance(value, list) and value and value[0] == "map" else {}


def _ovs_set(value) -> list:
    """A set column: ["set", [...]] or a single atom."""
    if isinstance(value, list) and value and value[0] == "set":
        return value[1]
    return [value]


def _uuid(value) -> str:
    return value[1] if isinstance(value, list) and value and value[0] == "uuid" else str(value)


def _rows(table: dict) -> list[dict]:
    return [dict(zip(table["headings"], row)) for row in table["data"]]


def vm_channels(bridges: dict, ports: dict, interfaces: dict) -> list[VmChannel]:
    """VM channels from ``ovs-vsctl --format=json list Bridge/Port/Interface`` output."""
    bridge_of_port = {}
    for bridge in _rows(bridges):
        dpid = int(bridge["datapath_id"], 16) if isinstance(bridge["datapath_id"], str) else None
        for port in _ovs_set(bridge["ports"]):
            bridge_of_port[_uuid(port)] = (dpid, bridge["name"])
    bridge_of_interface = {}
    for port in _rows(ports):
        for interface in _ovs_set(port["interfaces"]):
            bridge_of_interface[_uuid(interface)] = bridge_of_port.get(_uuid(port["_uuid"]), (None, ""))
    channels = []
    for interface in _rows(interfaces):
        ids = _ovs_map(interface["external_ids"])
        region = ids.get(CHANNEL_KEY)
        dpid, bridge_name = bridge_of_interface.get(_uuid(interface["_uuid"]), (None, ""))
        ofport = interface["ofport"] if isinstance(interface["ofport"], int) else -1
        if not region or dpid is None or ofport <= 0:
            continue
        mac = ids.get("attached-mac") or (interface["mac_in_use"] if isinstance(interface["mac_in_use"], str) else "")
        channels.append(VmChannel(interface["name"], region, dpid, ofport,
                                  tuple(_mac(m) for m in [mac] if m), ids.get("vm-id", interface["name"]),
                                  bridge_name))
    return sorted(channels, key=lambda c: c.interface)


def read_ovsdb(bridges: frozenset[str] = frozenset(), timeout: float = 10.0) -> list[VmChannel]:
    """Ask the local ovsdb for the annotated interfaces (only on ``bridges``, if given)."""
    def table(name: str, columns: str) -> dict:
        done = subprocess.run(["ovs-vsctl", f"--timeout={int(timeout)}", "--format=json", f"--columns={columns}",
                               "list", name], capture_output=True, text=True, timeout=timeout + 5)
        if done.returncode != 0:
            raise RuntimeError(f"ovs-vsctl list {name} failed: {done.stderr.strip()}")
        return json.loads(done.stdout)

    found = vm_channels(table("Bridge", "name,datapath_id,ports"), table("Port", "_uuid,interfaces"),
                        table("Interface", "_uuid,name,ofport,external_ids,mac_in_use"))
    return [channel for channel in found if not bridges or channel.bridge in bridges]


def load_static(path: str | Path) -> list[VmChannel]:
    """Channels from a JSON file: ``[{"interface", "region", "dpid", "port", "macs", "vm_id"}]``."""
    entries = json.loads(Path(path).read_text())
    return sorted((VmChannel(e["interface"], e["region"], int(str(e["dpid"]), 16) if isinstance(e["dpid"], str)
                             else int(e["dpid"]), int(e["port"]), tuple(_mac(m) for m in e["macs"]),
                             e.get("vm_id", e["interface"])) for e in entries), key=lambda c: c.interface)
