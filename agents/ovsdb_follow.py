"""Discovery that follows Open vSwitch's database instead of asking it every 2 s.

The agent needs the bridges, ports and annotated interfaces of this host.  Asking
``ovs-vsctl`` three times per discovery round cost a few per cent of a core on an idle
host (three processes every 2 s) and noticed a new VM only at the next round.  The
``ovs`` Python IDL (the library OVS ships, installed with os-ken) keeps a replica of the
columns the agent reads and is told of every change by ovsdb-server: an idle agent then
costs nothing for discovery, and a change wakes a round within milliseconds.

``tables`` turns the replica's rows into the JSON ``ovs-vsctl --format=json list`` prints,
so ``discovery.scan_ovsdb`` (pure) decides exactly as it did when it read that output.

Changes are coalesced: the first after a quiet second is taken at once, later ones at most
once per REBUILD_INTERVAL (turning 1,000 interfaces into a snapshot costs ~50 ms, and a
storm of changes must not cost a core).  A lost connection is logged and the last replica
kept (nothing can change the database while nobody serves it); the IDL reconnects every
second.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

import ovs.db.idl
import ovs.poller

from .discovery import Scan, scan_ovsdb, served

log = logging.getLogger("mbvisor.agent")

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
COLUMNS = {
    "Bridge": ["name", "datapath_id", "ports"],
    "Port": ["interfaces"],
    "Interface": ["name", "ofport", "external_ids", "mac_in_use"],
}
REBUILD_INTERVAL = 1.0  # seconds between two snapshots while changes keep coming
RECONNECT_MS = 1000  # the IDL's reconnection back-off (the library's default grows to 8 s)


def default_remote() -> str:
    """The local ovsdb-server, where ``ovs-vsctl`` would look (``OVS_RUNDIR``)."""
    return f"unix:{os.environ.get('OVS_RUNDIR', '/var/run/openvswitch')}/db.sock"


def _schema_helper(schema: str, remote: str) -> ovs.db.idl.SchemaHelper:
    """The Open_vSwitch schema: Debian's file, else asked of the server itself (source
    builds install it elsewhere; a container may see only the socket)."""
    if os.path.exists(schema):
        return ovs.db.idl.SchemaHelper(location=schema)
    done = subprocess.run(["ovsdb-client", "get-schema", remote, "Open_vSwitch"], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"no schema at {schema} and ovsdb-client get-schema failed: {done.stderr.strip()}")
    return ovs.db.idl.SchemaHelper(schema_json=json.loads(done.stdout))


def _optional(value: list):
    """An optional column as the IDL gives it (a list of 0 or 1 atoms), as ovs-vsctl prints it."""
    return value[0] if value else ["set", []]


def _references(rows) -> list:
    return ["set", [["uuid", str(row.uuid)] for row in rows]]


def tables(bridges, ports, interfaces) -> tuple[dict, dict, dict]:
    """(Bridge, Port, Interface) tables in ``ovs-vsctl --format=json`` form from IDL rows
    (anything with the columns as attributes and a ``uuid``)."""
    return (
        {"headings": ["name", "datapath_id", "ports"],
         "data": [[b.name, _optional(b.datapath_id), _references(b.ports)] for b in bridges]},
        {"headings": ["_uuid", "interfaces"],
         "data": [[["uuid", str(p.uuid)], _references(p.interfaces)] for p in ports]},
        {"headings": ["_uuid", "name", "ofport", "external_ids", "mac_in_use"],
         "data": [[["uuid", str(i.uuid)], i.name, _optional(i.ofport), ["map", sorted(i.external_ids.items())],
                   _optional(i.mac_in_use)] for i in interfaces]},
    )


class OvsdbFollower:
    """A replica of the columns discovery reads, kept by its own thread.  ``scan()`` is the
    latest state (RuntimeError until ovsdb-server was reached); ``changes`` is set at each
    change, for the agent's discovery thread to wake on."""

    def __init__(self, remote: str | None = None, bridges: frozenset[str] = frozenset(), schema: str = SCHEMA):
        self.remote = remote or default_remote()
        self.bridges = bridges
        helper = _schema_helper(schema, self.remote)
        for table, columns in COLUMNS.items():
            helper.register_columns(table, columns)
        self.idl = ovs.db.idl.Idl(self.remote, helper)
        session = getattr(self.idl, "_session", None)  # the library offers no public setter
        if session is not None and hasattr(session, "reconnect"):
            session.reconnect.set_backoff(RECONNECT_MS, RECONNECT_MS)
        self.connected: bool | None = None
        self.snapshots = 0  # replicas turned into tables so far
        self.changes = threading.Event()
        self.stop = threading.Event()
        self._stop_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # wakes the follower's poll for stop
        self._lock = threading.Lock()
        self._tables: tuple[dict, dict, dict] | None = None
        self.thread = threading.Thread(target=self._follow, name="ovsdb-follow", daemon=True)

    def start(self) -> "OvsdbFollower":
        self.thread.start()
        return self

    def close(self) -> None:
        """Idempotent: a second call writes and closes nothing (the number may be reused)."""
        if self.stop.is_set():
            return
        self.stop.set()
        os.eventfd_write(self._stop_bell, 1)
        self.thread.join(timeout=5)
        self.idl.close()
        if not self.thread.is_alive():
            os.close(self._stop_bell)

    def status(self) -> dict:
        """For ``agent-status``: where OVS is followed from and whether it is reached now."""
        return {"remote": self.remote, "connected": bool(self.connected), "snapshots": self.snapshots}

    def scan(self) -> Scan:
        with self._lock:
            snapshot = self._tables
        if snapshot is None:
            raise RuntimeError(f"ovsdb-server at {self.remote} not reached yet")
        found = scan_ovsdb(*snapshot)
        return found if not self.bridges else served(found, self.bridges)

    def _follow(self) -> None:
        """Sleeps until the database or the IDL's own timers (reconnection, probes) need
        it, a coalesced rebuild is due, or ``close``: an idle host costs no wake-ups (it
        looked every 250 ms before, a tenth of an idle agent's CPU)."""
        seen, built_at = None, float("-inf")
        while not self.stop.is_set():
            try:
                self.idl.run()
                self._note_connection()
                pending = self.idl.has_ever_connected() and self.idl.change_seqno != seen
                if pending and time.monotonic() - built_at >= REBUILD_INTERVAL:
                    seen, built_at, pending = self.idl.change_seqno, time.monotonic(), False
                    rows = [list(self.idl.tables[name].rows.values()) for name in COLUMNS]
                    with self._lock:
                        self._tables = tables(*rows)
                    self.snapshots += 1
                    self.changes.set()
                poller = ovs.poller.Poller()
                self.idl.wait(poller)
                poller.fd_wait(self._stop_bell, ovs.poller.POLLIN)
                if pending:  # a change waits for its rebuild
                    poller.timer_wait(max(0, int((built_at + REBUILD_INTERVAL - time.monotonic()) * 1000)))
                poller.block()
            except Exception:  # the replica must keep following whatever one round met
                log.exception("ovsdb follower: a round failed; going on")
                self.stop.wait(REBUILD_INTERVAL)

    def _note_connection(self) -> None:
        session = getattr(self.idl, "_session", None)
        connected = session.is_connected() if session is not None else True
        if connected and not self.connected:
            log.info("ovsdb %s: connected; following its changes", self.remote)
        elif not connected and self.connected:
            log.warning("ovsdb %s: connection lost; the last view of the VMs stands until it is back", self.remote)
        self.connected = connected
