"""Which VMs on this host have a channel, and who they are, as Open vSwitch records them.

The QEMU launch script annotates the VM's interface record:
``external_ids:mbvisor-channel=/dev/shm/NAME`` (the ivshmem region), for a VM with an
``ivshmem-doorbell`` device ``external_ids:mbvisor-doorbell=SOCKET`` (its ivshmem
server, agents/ivshmem_server.py) and, as libvirt and
OpenStack do, ``external_ids:attached-mac`` (the guest's MAC) and ``external_ids:vm-id``.
The same records give the VM's OpenFlow port and its bridge's datapath id, so identity
comes from the hypervisor's own configuration, never from the guest.

The operator also says who owns each port (``mbvisor-tenant``) and which addresses are
the VM's own (``mbvisor-ips``): an interface with ``attached-mac`` and ``mbvisor-tenant``
is *annotated*, and each bridge's annotated ports are its inventory, which the agent
publishes to the controller (the controller's trust model, controller/trust.py, decides
from it).  An identity shared by two interfaces is the operator's mistake: neither gets a
channel (who arrived first must not decide who is the VM), and the refusal says why.

``scan_ovsdb`` is pure (ovsdb JSON in, records out); ``ovsdb_follow`` keeps the rows it
reads up to date.  A static file (``load_static``) replaces OVS where it is not wanted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mbvisor.controller.requests import BadRequest, clip, inventory_body, inventory_from_body, port_identity_body
from mbvisor.controller.trust import MAX_ADDRESSES, TENANT, PortIdentity, Underlay

CHANNEL_KEY = "mbvisor-channel"
DOORBELL_KEY = "mbvisor-doorbell"
MAC_KEY = "attached-mac"
VM_ID_KEY = "vm-id"
TENANT_KEY = "mbvisor-tenant"
IPS_KEY = "mbvisor-ips"
UNDERLAY_KEY = "mbvisor-underlay"  # a port to other hypervisors: "*" or the datapath ids it leads to
RATE_KEY, BURST_KEY = "mbvisor-rate", "mbvisor-burst"  # this VM's own rate limit (the agent's otherwise)
MAX_RATE = 1_000_000.0  # commands per second, or a burst: more is no limit at all, so a typo
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
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
    doorbell: str = ""  # the ivshmem server's socket of a VM whose guest rings; "" for a polled one
    rate: float | None = None   # the operator's rate limit for this VM (None: the agent's)
    burst: float | None = None

    @property
    def name(self) -> str:
        """The channel's name on this host (status, logs): stable across agent restarts."""
        return _bounded(f"{self.vm_id}/{self.interface}")

    @property
    def key(self) -> str:
        """The channel in idempotency keys: the VM and its NIC's MAC, not this host's
        interface name, so it is the same on every host the VM lives on: a command the
        source's agent forwarded just before a live migration, and the destination's agent
        forwards again from the migrated ring, is answered once (docs/datacentre.md).  The
        interface stands in for a port without a MAC."""
        return _bounded(f"{self.vm_id}/{self.macs[0] if self.macs else self.interface}")


def _bounded(name: str) -> str:
    """Short enough for the controller's bound on channel names whatever the operator
    wrote into ``vm-id``: a long one is cut and made unique again with a digest of the whole."""
    if len(name) <= MAX_CHANNEL_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{name[:MAX_CHANNEL_NAME - 17]}~{digest}"


@dataclass(frozen=True)
class Refusal:
    """An interface the agent will not vouch for, and why (logged, and in the status)."""

    bridge: str
    interface: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """What one look at OVS found: the channels to serve, each served bridge's inventory
    (datapath id -> entries by port; every bridge with a datapath id, even with no
    annotated port, so that one whose ports all left is told so), the bridges' names, and
    the interfaces refused.  ``inventories`` is None where no inventory is known (a static
    channel file): nothing is published then."""

    channels: list[VmChannel]
    inventories: dict[int, tuple[PortIdentity | Underlay, ...]] | None = None
    bridges: dict[int, str] = field(default_factory=dict)
    refused: tuple[Refusal, ...] = ()
    # Per bridge, the OVS rows of its inventory's interfaces: a port deleted and re-created
    # between two scans (same annotations, new row) lost its annotations at the controller
    # when it went, so it must be published again though the entries look the same.
    incarnations: dict[int, frozenset[str]] = field(default_factory=dict)


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


def parse_ips(text: str) -> tuple[str, ...]:
    """``mbvisor-ips``: addresses separated by commas and/or blanks, in canonical form and
    without repeats; ValueError naming the first that is not an address.  Counted before
    they are read: a huge annotation costs one split, not a scan's time."""
    words = [word for word in re.split(r"[\s,]+", text.strip()) if word]
    if len(set(words)) > MAX_ADDRESSES:
        raise ValueError(f"{len(set(words))} addresses; at most {MAX_ADDRESSES} per port")
    found: dict[str, None] = {}
    for word in words:
        try:
            found.setdefault(str(ipaddress.ip_address(word)))
        except ValueError:
            raise ValueError(f"{clip(word, 60)!r} is not an IP address") from None
    return tuple(found)


@dataclass(frozen=True)
class _Interface:
    """One interface with an OpenFlow port on a bridge with a datapath id."""

    name: str
    dpid: int
    bridge: str
    port: int
    ids: dict
    mac_in_use: str
    uuid: str = ""

    @property
    def mac(self) -> str:
        """The MAC the agent vouches for: ``attached-mac`` when the operator wrote one (even
        an unreadable one: it is refused, never replaced by a guess), else (for a channel
        without it) the interface's own ``mac_in_use``; "" when there is none."""
        if MAC_KEY in self.ids:
            return _mac(self.ids[MAC_KEY])
        return _mac(self.mac_in_use if self.ids.get(CHANNEL_KEY) else "")


def _interfaces(bridges: dict, ports: dict, interfaces: dict) -> tuple[list[_Interface], dict[int, str]]:
    """Every interface with an OpenFlow port on a bridge with a datapath id, and the names
    of those bridges by datapath id."""
    bridge_of_port, names = {}, {}
    for bridge in _rows(bridges):
        dpid = int(bridge["datapath_id"], 16) if isinstance(bridge["datapath_id"], str) else None
        if dpid is not None:
            names[dpid] = bridge["name"]
        for port in _ovs_set(bridge["ports"]):
            bridge_of_port[_uuid(port)] = (dpid, bridge["name"])
    bridge_of_interface = {}
    for port in _rows(ports):
        for interface in _ovs_set(port["interfaces"]):
            bridge_of_interface[_uuid(interface)] = bridge_of_port.get(_uuid(port["_uuid"]), (None, ""))
    found = []
    for interface in _rows(interfaces):
        dpid, bridge_name = bridge_of_interface.get(_uuid(interface["_uuid"]), (None, ""))
        ofport = interface["ofport"] if isinstance(interface["ofport"], int) else -1
        if dpid is None or ofport <= 0:
            continue
        mac_in_use = interface["mac_in_use"] if isinstance(interface["mac_in_use"], str) else ""
        found.append(_Interface(interface["name"], dpid, bridge_name, ofport, _ovs_map(interface["external_ids"]),
                                mac_in_use, _uuid(interface["_uuid"])))
    return sorted(found, key=lambda i: i.name), names


def _shared_macs(found: list[_Interface]) -> dict[str, str]:
    """Interface name -> why its MAC is not its own: the same MAC claimed (annotated, or a
    channel's) by another interface of the same bridge.  All of them are refused."""
    claims: dict[tuple[int, str], list[_Interface]] = {}
    for interface in found:
        if interface.mac and (MAC_KEY in interface.ids or interface.ids.get(CHANNEL_KEY)):
            claims.setdefault((interface.dpid, interface.mac), []).append(interface)
    shared = {}
    for (_, mac), holders in claims.items():
        if len(holders) == 1:
            continue
        for holder in holders:
            others = ", ".join(f"{o.name} (port {o.port})" for o in holders if o is not holder)
            shared[holder.name] = (f"attached-mac {mac} of {holder.name} (port {holder.port}) is also claimed by "
                                   f"{others}; neither is served until the operator fixes the annotation")
    return shared


def _entry(interface: _Interface) -> PortIdentity:
    """The inventory entry of an annotated interface, checked by the controller's own
    rules (one entry it would refuse would make it refuse the bridge's whole inventory);
    ValueError saying what is wrong."""
    ids = interface.ids
    _check_mac(interface)
    if not TENANT.fullmatch(ids[TENANT_KEY]):
        raise ValueError(f"{TENANT_KEY} {ids[TENANT_KEY]!r} is not a tenant name (letters, digits, '._:-', "
                         "at most 64)")
    try:
        ips = parse_ips(ids.get(IPS_KEY, ""))
    except ValueError as error:
        raise ValueError(f"{IPS_KEY} {clip(ids.get(IPS_KEY, ''), 80)!r}: {error}") from None
    entry = PortIdentity(interface.port, interface.mac, ids[TENANT_KEY], ids.get(VM_ID_KEY, interface.name), ips,
                         interface.name)
    try:
        inventory_from_body({"ports": [port_identity_body(entry)]})
    except BadRequest as error:
        raise ValueError(f"{error.field.removeprefix('ports[0].')}: {error.message}") from None
    return entry


def _underlay(interface: _Interface) -> Underlay:
    """The underlay entry of an interface annotated ``mbvisor-underlay`` (``*``, or the
    datapath ids of the switches it leads to, separated by commas and/or blanks), checked
    by the controller's own rules; ValueError saying what is wrong."""
    if MAC_KEY in interface.ids or interface.ids.get(CHANNEL_KEY):
        raise ValueError(f"{UNDERLAY_KEY} on a VM's interface (attached-mac or {CHANNEL_KEY}): an underlay port "
                         "leads to other hypervisors")
    text = interface.ids[UNDERLAY_KEY].strip()
    leads_to = [part for part in re.split(r"[,\s]+", text) if part] or ["*"]
    try:
        entries = inventory_from_body(inventory_body([]) | {"underlay": [
            {"port": interface.port, "interface": interface.name, "leads_to": leads_to}]})
    except BadRequest as error:
        raise ValueError(f"{UNDERLAY_KEY} {clip(text, 80)!r}: {error.message}") from None
    return entries[0]


def rate_limit(ids: dict) -> tuple[float | None, float | None]:
    """``mbvisor-rate`` and ``mbvisor-burst`` (commands per second, commands at once), each
    optional; ValueError naming the one that is not a number in (0, MAX_RATE], or a burst
    below 1 (a bucket that never holds one command refuses every frame)."""
    limits = []
    for key, least in ((RATE_KEY, 0.0), (BURST_KEY, 1.0)):
        text = ids.get(key)
        if text is None:
            limits.append(None)
            continue
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (0 < value <= MAX_RATE and value >= least):  # NaN and inf fail too
            floor = "at least 1" if least else "above 0"
            raise ValueError(f"{key} {clip(text, 40)!r} is not a number of commands {floor} and at most "
                             f"{MAX_RATE:,.0f}")
        limits.append(value)
    return limits[0], limits[1]


def _check_mac(interface: _Interface) -> None:
    if not MAC.fullmatch(interface.mac):
        raise ValueError(f"attached-mac {clip(str(interface.ids.get(MAC_KEY, '')), 60)!r} is not a MAC address")


def scan_ovsdb(bridges: dict, ports: dict, interfaces: dict) -> Scan:
    """Channels, inventories and refusals from ``ovs-vsctl --format=json list
    Bridge/Port/Interface`` output.  An interface whose MAC another one of its bridge
    claims, or whose annotation cannot be read, gets no channel; the inventory keeps every
    annotated port whose annotation can be read (the controller refuses duplicates itself,
    so one authority answers for them), and leaves out, with a refusal, those that cannot."""
    found, names = _interfaces(bridges, ports, interfaces)
    shared = _shared_macs(found)
    channels, refused = [], []
    inventories: dict[int, list[PortIdentity | Underlay]] = {dpid: [] for dpid in names}
    incarnations: dict[int, set[str]] = {}
    for interface in found:
        problems = [shared[interface.name]] if interface.name in shared else []
        if UNDERLAY_KEY in interface.ids:
            try:
                inventories[interface.dpid].append(_underlay(interface))
                incarnations.setdefault(interface.dpid, set()).add(interface.uuid)
            except ValueError as error:
                problems.append(f"underlay annotation of {interface.name} (port {interface.port}) refused: {error}")
        if MAC_KEY in interface.ids and TENANT_KEY in interface.ids:
            try:
                inventories[interface.dpid].append(_entry(interface))
                incarnations.setdefault(interface.dpid, set()).add(interface.uuid)
            except ValueError as error:
                problems.append(f"annotation of {interface.name} (port {interface.port}) refused: {error}")
        elif interface.ids.get(CHANNEL_KEY):
            try:
                _check_mac(interface)
            except ValueError as error:
                problems.append(f"channel of {interface.name} (port {interface.port}) refused: {error}")
        try:
            limits = rate_limit(interface.ids)
        except ValueError as error:
            problems.append(f"channel of {interface.name} (port {interface.port}) refused: {error}")
        if problems:
            refused.append(Refusal(interface.bridge, interface.name, "; ".join(problems)))
        elif interface.ids.get(CHANNEL_KEY):
            channels.append(VmChannel(interface.name, interface.ids[CHANNEL_KEY], interface.dpid, interface.port,
                                      tuple(m for m in [interface.mac] if m),
                                      interface.ids.get(VM_ID_KEY, interface.name), interface.bridge,
                                      interface.ids.get(DOORBELL_KEY, ""), *limits))
    return Scan(channels, {dpid: tuple(sorted(entries, key=lambda e: (e.port, e.interface)))
                           for dpid, entries in inventories.items()}, names, tuple(refused),
                {dpid: frozenset(uuids) for dpid, uuids in incarnations.items()})


def vm_channels(bridges: dict, ports: dict, interfaces: dict) -> list[VmChannel]:
    """The channels alone of :func:`scan_ovsdb`."""
    return scan_ovsdb(bridges, ports, interfaces).channels


def served(found: Scan, bridges: frozenset[str]) -> Scan:
    """Only what is on ``bridges`` (the agent's ``--bridge``)."""
    return Scan([c for c in found.channels if c.bridge in bridges],
                {dpid: entries for dpid, entries in found.inventories.items() if found.bridges[dpid] in bridges},
                {dpid: name for dpid, name in found.bridges.items() if name in bridges},
                tuple(r for r in found.refused if r.bridge in bridges),
                {dpid: rows for dpid, rows in found.incarnations.items() if found.bridges.get(dpid) in bridges})


def load_static(path: str | Path) -> list[VmChannel]:
    """Channels from a JSON file: ``[{"interface", "region", "dpid", "port", "macs", "vm_id",
    "doorbell"}]`` (``vm_id`` and ``doorbell`` optional)."""
    entries = json.loads(Path(path).read_text())
    return sorted((VmChannel(e["interface"], e["region"], int(str(e["dpid"]), 16) if isinstance(e["dpid"], str)
                             else int(e["dpid"]), int(e["port"]), tuple(_mac(m) for m in e["macs"]),
                             e.get("vm_id", e["interface"]), doorbell=e.get("doorbell", ""))
                   for e in entries), key=lambda c: c.interface)
