"""The host side of the trust model: annotated ports read from OVS, duplicated identities
refused, and each bridge's inventory published to the controller (and again when it
changed, failed, or after a controller restart).

Pure parts first (ovsdb JSON in the encoding of ``ovs-vsctl --format=json``, see
tests/test_agent_units.py; the publishing bookkeeping with a hand-held clock), then the
agent in a thread against a fake client and against a real HTTP stub of the controller,
then the real agent process on a real bridge against the real controller (``host``)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
import time
import uuid

import pytest

from mbvisor.agents.agent import Agent, AgentSettings
from mbvisor.agents.controller_client import ControllerClient, ControllerFailed, ControllerUnavailable
from mbvisor.controller.requests import port_identity_body
from mbvisor.controller.trust import PortIdentity
from mbvisor.agents.discovery import Scan, VmChannel, parse_ips, scan_ovsdb, served, vm_channels
from mbvisor.agents.inventory import Publication
from mbvisor.guest.backoff import Backoff
from test_agent_shell import JsonHandler, wait_for

DPID, OTHER_DPID = 0xA1, 0xB2


def ovsdb(*bridges):
    """(Bridge, Port, Interface) tables as ``ovs-vsctl --format=json list`` gives them, for
    bridges ``(name, dpid or None, [(interface, ofport, {external_ids}, mac_in_use), ...])``."""
    bridge_rows, port_rows, interface_rows = [], [], []
    for name, dpid, interfaces in bridges:
        port_ids = []
        for interface, ofport, ids, mac_in_use in interfaces:
            port_id, interface_id = str(uuid.uuid4()), str(uuid.uuid4())
            port_ids.append(["uuid", port_id])
            port_rows.append([["uuid", port_id], ["uuid", interface_id]])
            interface_rows.append([["uuid", interface_id], interface, ofport, ["map", sorted(ids.items())],
                                   mac_in_use])
        bridge_rows.append([name, f"{dpid:016x}" if dpid is not None else ["set", []], ["set", port_ids]])
    return ({"headings": ["name", "datapath_id", "ports"], "data": bridge_rows},
            {"headings": ["_uuid", "interfaces"], "data": port_rows},
            {"headings": ["_uuid", "name", "ofport", "external_ids", "mac_in_use"], "data": interface_rows})


def ids(mac: str, tenant: str | None = "blue", ips: str | None = None, vm_id: str | None = None,
        channel: str | None = None) -> dict:
    found = {"attached-mac": mac, "mbvisor-tenant": tenant, "mbvisor-ips": ips, "vm-id": vm_id,
             "mbvisor-channel": channel}
    return {key: value for key, value in found.items() if value is not None}


MAC1, MAC2, MAC3 = "02:00:00:00:00:03", "02:00:00:00:00:04", "02:00:00:00:00:05"


# ---- discovery of annotations ----------------------------------------------------------------


def test_annotated_ports_become_the_bridges_inventory_in_canonical_form():
    found = scan_ovsdb(*ovsdb(
        ("br0", DPID, [("vm1", 3, ids("02:00:00:00:00:0A", ips="10.0.0.3, FD00:0::3  10.0.0.3", vm_id="vm1"), ""),
                       ("vm2", 4, ids(MAC2, tenant="red"), ""),  # no addresses: may be empty
                       ("plain", 5, {}, "02:aa:00:00:00:01"),  # not annotated
                       ("tenantless", 6, {"attached-mac": MAC3}, ""),  # attached-mac alone: not annotated
                       ("down", -1, ids("02:00:00:00:00:07"), "")]),  # no OpenFlow port
        ("br1", OTHER_DPID, []),
        ("young", None, [("vm9", 1, ids("02:00:00:00:00:09"), "")])))  # no datapath id yet
    assert found.inventories == {
        DPID: (PortIdentity(3, "02:00:00:00:00:0a", "blue", "vm1", ("10.0.0.3", "fd00::3"), "vm1"),
               PortIdentity(4, MAC2, "red", "vm2", (), "vm2")),
        OTHER_DPID: ()}  # served, with nothing annotated: published as empty
    assert found.bridges == {DPID: "br0", OTHER_DPID: "br1"}
    assert found.channels == [] and found.refused == ()
    assert port_identity_body(found.inventories[DPID][0]) == {
        "port": 3, "interface": "vm1", "mac": "02:00:00:00:00:0a", "vm_id": "vm1", "tenant": "blue",
        "ips": ["10.0.0.3", "fd00::3"]}


@pytest.mark.parametrize("text, expected", [
    ("", ()), ("  ", ()), ("10.0.0.3", ("10.0.0.3",)), ("10.0.0.3,fd00::3", ("10.0.0.3", "fd00::3")),
    ("10.0.0.3 ,\tFD00::0003,,", ("10.0.0.3", "fd00::3")), ("10.0.0.3 10.0.0.3", ("10.0.0.3",))])
def test_mbvisor_ips_are_split_on_commas_and_blanks_and_canonicalised(text, expected):
    assert parse_ips(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.300", "10.0.0.0/24", "fd00::3::4", "vm1", "10.0.0.3;10.0.0.4"])
def test_an_unparsable_address_is_named(text):
    with pytest.raises(ValueError, match="is not an IP address"):
        parse_ips(f"10.0.0.1,{text}")


def test_an_unparsable_annotation_refuses_that_port_loudly_and_no_other():
    found = scan_ovsdb(*ovsdb(("br0", DPID, [
        ("vm1", 3, ids(MAC1, ips="10.0.0.3,10.0.0.999", channel="/dev/shm/r1"), ""),
        ("vm2", 4, ids(MAC2, tenant="no spaces allowed"), ""),
        ("vm3", 5, ids("not-a-mac"), ""),
        ("vm4", 6, ids(MAC3, ips="10.0.0.6", channel="/dev/shm/r4"), "")])))
    assert [e.interface for e in found.inventories[DPID]] == ["vm4"]
    assert [c.interface for c in found.channels] == ["vm4"]  # vm1's channel is refused with its port
    reasons = {r.interface: r.reason for r in found.refused}
    assert reasons.keys() == {"vm1", "vm2", "vm3"}
    assert "vm1 (port 3)" in reasons["vm1"] and "'10.0.0.3,10.0.0.999'" in reasons["vm1"] \
        and "'10.0.0.999' is not an IP address" in reasons["vm1"]
    assert "'no spaces allowed' is not a tenant name" in reasons["vm2"]
    assert "'not-a-mac' is not a MAC address" in reasons["vm3"]
    assert {r.bridge for r in found.refused} == {"br0"}


def test_a_vms_own_rate_limit_is_read_and_a_bad_one_refuses_its_channel_only():
    found = scan_ovsdb(*ovsdb(("br0", DPID, [
        ("vm1", 3, {**ids(MAC1, channel="/dev/shm/r1"), "mbvisor-rate": "1000", "mbvisor-burst": "12000"}, ""),
        ("vm2", 4, {**ids(MAC2, channel="/dev/shm/r2"), "mbvisor-burst": "2.5e3"}, ""),
        ("vm3", 5, {**ids(MAC3, channel="/dev/shm/r3"), "mbvisor-rate": "fast"}, ""),
        ("vm4", 6, {**ids("02:00:00:00:00:06", channel="/dev/shm/r4"), "mbvisor-burst": "inf"}, ""),
        ("vm5", 7, {**ids("02:00:00:00:00:07", channel="/dev/shm/r5"), "mbvisor-rate": "0"}, ""),
        ("vm6", 8, {**ids("02:00:00:00:00:08", channel="/dev/shm/r6"), "mbvisor-burst": "0.5"}, "")])))
    assert [(c.interface, c.rate, c.burst) for c in found.channels] == [("vm1", 1000.0, 12000.0),
                                                                         ("vm2", None, 2500.0)]
    reasons = {r.interface: r.reason for r in found.refused}
    assert reasons.keys() == {"vm3", "vm4", "vm5", "vm6"}
    assert "mbvisor-rate 'fast' is not a number of commands above 0 and at most 1,000,000" in reasons["vm3"]
    assert "mbvisor-burst 'inf'" in reasons["vm4"] and "mbvisor-rate '0'" in reasons["vm5"]
    assert "mbvisor-burst '0.5' is not a number of commands at least 1" in reasons["vm6"]  # it would refuse all
    assert len(found.inventories[DPID]) == 6  # who owns the ports is still published


def test_a_channel_without_trust_annotations_is_still_served():
    """Labs (the controller's explicit ``lab`` trust mode) have channels on unannotated ports."""
    found = scan_ovsdb(*ovsdb(("br0", DPID, [("tap0", 2, {"mbvisor-channel": "/dev/shm/x"}, "52:54:00:AB:CD:EF")])))
    assert found.channels == [VmChannel("tap0", "/dev/shm/x", DPID, 2, ("52:54:00:ab:cd:ef",), "tap0", "br0")]
    assert found.inventories == {DPID: ()}


def test_two_interfaces_with_one_attached_mac_are_both_refused_as_channels_but_both_published():
    tables = ovsdb(("br0", DPID, [
        ("vm1", 3, ids(MAC1, ips="10.0.0.3", channel="/dev/shm/r1", vm_id="vm1"), ""),
        ("vm2", 4, ids(MAC1.upper(), ips="10.0.0.4", channel="/dev/shm/r2", vm_id="vm2"), ""),
        ("vm3", 5, ids(MAC3, ips="10.0.0.5", channel="/dev/shm/r3"), "")]))
    found = scan_ovsdb(*tables)
    assert [c.interface for c in found.channels] == ["vm3"]
    assert vm_channels(*tables) == found.channels
    assert [e.interface for e in found.inventories[DPID]] == ["vm1", "vm2", "vm3"]  # the controller decides
    reasons = {r.interface: r.reason for r in found.refused}
    assert reasons == {
        "vm1": f"attached-mac {MAC1} of vm1 (port 3) is also claimed by vm2 (port 4); neither is served until "
               "the operator fixes the annotation",
        "vm2": f"attached-mac {MAC1} of vm2 (port 4) is also claimed by vm1 (port 3); neither is served until "
               "the operator fixes the annotation"}


def test_a_channel_whose_mac_another_annotated_port_claims_is_refused():
    """The other port has no channel (a backend, say): the channel would speak for it."""
    found = scan_ovsdb(*ovsdb(("br0", DPID, [
        ("mb", 3, {"mbvisor-channel": "/dev/shm/r1", "attached-mac": MAC1}, ""),
        ("backend", 4, ids(MAC1, ips="10.0.0.4"), "")])))
    assert found.channels == [] and {r.interface for r in found.refused} == {"mb", "backend"}


def test_the_same_mac_on_two_bridges_is_no_conflict():
    found = scan_ovsdb(*ovsdb(("br0", DPID, [("vm1", 3, ids(MAC1, channel="/dev/shm/r1"), "")]),
                              ("br1", OTHER_DPID, [("vm2", 3, ids(MAC1, channel="/dev/shm/r2"), "")])))
    assert [c.interface for c in found.channels] == ["vm1", "vm2"] and found.refused == ()


def test_only_the_served_bridges_are_kept():
    found = scan_ovsdb(*ovsdb(("br0", DPID, [("vm1", 3, ids(MAC1, channel="/dev/shm/r1"), "")]),
                              ("br1", OTHER_DPID, [("vm2", 3, ids("bad", channel="/dev/shm/r2"), "")])))
    mine = served(found, frozenset({"br0"}))
    assert mine.bridges == {DPID: "br0"} and list(mine.inventories) == [DPID]
    assert [c.interface for c in mine.channels] == ["vm1"] and mine.refused == ()
    assert [r.interface for r in served(found, frozenset({"br1"})).refused] == ["vm2"]


# ---- publishing decisions ----------------------------------------------------------------------

ENTRY1 = PortIdentity(3, MAC1, "blue", "vm1", ("10.0.0.3",), "vm1")
ENTRY2 = PortIdentity(4, MAC2, "blue", "vm2", ("10.0.0.4",), "vm2")
ENTRY3 = PortIdentity(7, MAC3, "red", "vm3", ("10.0.1.7",), "vm3")


def publication(refresh: float = 60.0) -> Publication:
    return Publication(DPID, "br0", Backoff(floor=1.0, ceiling=8.0, spins=0), refresh=refresh)


def accepted(*entries: PortIdentity, refused=()) -> dict:
    return {"dpid": f"{DPID:016x}", "ports": [port_identity_body(e) for e in entries], "refused": list(refused)}


def test_a_new_bridge_is_published_at_once_even_when_empty_then_every_refresh():
    state = publication(refresh=60)
    assert state.offer((), now=100) and state.wait(100) == 0
    assert state.succeeded((), accepted(), now=100) == ["0 port(s) published"]
    assert state.status()["state"] == "published"
    assert not state.offer((), now=101)  # the same again: nothing to do until the refresh
    assert state.wait(101) == 59
    assert state.wait(160) == 0
    assert state.succeeded((), accepted(), now=160) == []  # a plain refresh is silent
    assert state.wait(160) == 60


def test_a_change_is_due_at_once():
    state = publication()
    state.offer((ENTRY1,), now=0)
    state.succeeded((ENTRY1,), accepted(ENTRY1), now=0)
    assert state.offer((ENTRY1, ENTRY2), now=5) and state.wait(5) == 0
    assert state.succeeded((ENTRY1, ENTRY2), accepted(ENTRY1, ENTRY2), now=5) == ["2 port(s) published"]


def test_failures_back_off_log_once_and_a_change_is_still_sent_at_once():
    state = publication()
    state.offer((ENTRY1,), now=0)
    assert state.failed("controller down", now=0) is True
    assert state.wait(0) == 1.0
    assert not state.offer((ENTRY1,), now=0.5)  # the same scan again keeps the back-off
    assert state.failed("controller down", now=1) is False  # not logged again
    assert state.wait(1) == 2.0
    assert state.offer((ENTRY2,), now=2) and state.wait(2) == 0  # a change is due at once
    assert state.failed("HTTP 400: ports[0].tenant", now=2) is True  # and its failure is logged
    assert state.wait(2) == 1.0  # the back-off starts again
    assert [state.failed("HTTP 400: ports[0].tenant", now=t) for t in (3, 5, 9, 17)] == [False] * 4
    assert state.wait(17) == 8.0  # the ceiling
    assert state.status() == {"dpid": f"{DPID:016x}", "bridge": "br0", "ports": 1, "underlay": 0, "state": "failing",
                              "published_at": None, "attempts": 7, "error": "HTTP 400: ports[0].tenant",
                              "refused": []}
    assert state.offer((ENTRY1, ENTRY2), now=24) and state.wait(24) == 0  # the operator fixed something
    assert state.succeeded((ENTRY1, ENTRY2), accepted(ENTRY1, ENTRY2), now=24) == [
        "2 port(s) published after 7 failed attempt(s)"]
    assert state.attempts == 0 and state.error is None


def test_a_failed_refresh_is_retried_with_back_off_not_in_a_loop():
    state = publication(refresh=10)
    state.offer((ENTRY1,), now=0)
    state.succeeded((ENTRY1,), accepted(ENTRY1), now=0)
    assert state.wait(10) == 0
    state.failed("connection refused", now=10)
    assert state.wait(10) == 1.0
    assert state.succeeded((ENTRY1,), accepted(ENTRY1), now=11) == ["1 port(s) published after 1 failed attempt(s)"]
    assert state.wait(11) == 10


def test_refused_entries_are_logged_when_they_change_only():
    state = publication()
    refused = [{"port": 3, "interface": "vm1", "reason": "MAC 02:00:00:00:00:03 is claimed by vm1, vm2"},
               {"port": 4, "interface": "vm2", "reason": "MAC 02:00:00:00:00:03 is claimed by vm1, vm2"}]
    state.offer((ENTRY1, ENTRY2), now=0)
    lines = state.succeeded((ENTRY1, ENTRY2), accepted(refused=refused), now=0)
    assert lines == ["2 port(s) published",
                     "the controller refuses port 3 (vm1): MAC 02:00:00:00:00:03 is claimed by vm1, vm2",
                     "the controller refuses port 4 (vm2): MAC 02:00:00:00:00:03 is claimed by vm1, vm2"]
    assert state.status()["refused"] == refused
    assert state.succeeded((ENTRY1, ENTRY2), accepted(refused=refused), now=60) == []  # the refresh: silent
    state.offer((ENTRY1,), now=61)
    assert state.succeeded((ENTRY1,), accepted(ENTRY1), now=61) == [
        "1 port(s) published", "the controller refuses none of its ports any more"]


def test_a_bridge_no_longer_served_gets_an_empty_inventory_once_then_is_done():
    state = publication()
    state.offer((ENTRY1,), now=0)
    state.succeeded((ENTRY1,), accepted(ENTRY1), now=0)
    assert state.retire(now=1) and state.wanted == () and not state.done
    state.failed("down", now=1)
    assert not state.done
    state.succeeded((), accepted(), now=2)
    assert state.done
    state.offer((ENTRY1,), now=3)  # back before its publisher ended: served again
    assert not state.done and state.wait(3) == 0


def test_an_answer_for_an_older_scan_leaves_the_newer_one_due():
    state = publication()
    state.offer((ENTRY1,), now=0)
    state.offer((ENTRY1, ENTRY2), now=0.1)  # while (ENTRY1,) was on its way
    state.succeeded((ENTRY1,), accepted(ENTRY1), now=0.2)
    assert state.status()["state"] == "pending" and state.wait(0.2) == 0


# ---- the agent, in a thread, with a fake client ----------------------------------------------------


class FakeController:
    """ControllerClient's put_ports, scripted by the test."""

    url = "fake://controller"

    def __init__(self, on_put=None):
        self.on_put = on_put or (lambda dpid, ports: {"dpid": f"{dpid:016x}", "ports": ports, "refused": []})
        self.puts: list[tuple[int, list[dict]]] = []
        self.underlays: list[tuple[int, list[dict]]] = []
        self.lock = threading.Lock()

    def put_ports(self, dpid: int, ports: list[dict], underlay: list[dict] = ()) -> dict:
        with self.lock:
            self.puts.append((dpid, ports))
            self.underlays.append((dpid, list(underlay)))
        return self.on_put(dpid, ports)

    def execute(self, requests):
        raise AssertionError("no command in these tests")

    def delete_middlebox(self, dpid, mac):
        return True

    def puts_for(self, dpid: int) -> list[list[dict]]:
        with self.lock:
            return [ports for d, ports in self.puts if d == dpid]


def scan_of(*entries: PortIdentity, other: tuple[PortIdentity, ...] | None = (), refused=()) -> Scan:
    inventories = {DPID: tuple(entries)}
    if other is not None:
        inventories[OTHER_DPID] = other
    return Scan([], inventories, {DPID: "br0", OTHER_DPID: "br1"}, refused)


def agent_over(scans: list, client, **settings) -> Agent:
    """An agent whose every discovery gives the last scan of ``scans`` (the test appends)."""
    return Agent(lambda: scans[-1], client, AgentSettings(discovery_interval=0.01, **settings))


def inventories(agent: Agent) -> dict[str, dict]:
    return {i["bridge"]: i for i in agent.status()["inventories"]}


def test_the_agent_publishes_each_bridge_changes_and_retires(caplog):
    caplog.set_level(logging.INFO, "mbvisor")
    client = FakeController()
    scans = [scan_of(ENTRY1, other=(ENTRY3,))]
    agent = agent_over(scans, client)
    try:
        agent.round()
        wait_for(lambda: client.puts_for(DPID) and client.puts_for(OTHER_DPID), what="both bridges published")
        assert client.puts_for(DPID) == [[port_identity_body(ENTRY1)]]
        assert client.puts_for(OTHER_DPID) == [[port_identity_body(ENTRY3)]]
        wait_for(lambda: inventories(agent)["br0"]["state"] == "published")
        for _ in range(5):
            agent.round()  # nothing changed: nothing sent
        scans.append(scan_of(ENTRY1, ENTRY2, other=None))  # br1 is no longer served
        agent.round()
        wait_for(lambda: len(client.puts_for(DPID)) == 2 and len(client.puts_for(OTHER_DPID)) == 2,
                 what="the change and the retirement published")
        assert client.puts_for(DPID)[1] == [port_identity_body(ENTRY1), port_identity_body(ENTRY2)]
        assert client.puts_for(OTHER_DPID)[1] == []
        wait_for(lambda: agent.round() or set(inventories(agent)) == {"br0"}, what="br1's publisher ended")
        assert len(client.puts_for(DPID)) == 2 and len(client.puts_for(OTHER_DPID)) == 2
    finally:
        agent.shutdown()
    published = [r.getMessage() for r in caplog.records if "published" in r.getMessage()]
    assert len(published) == 4, published


def test_a_hanging_controller_for_one_bridge_holds_up_neither_the_other_bridge_nor_discovery():
    release = threading.Event()

    def hang_on_br1(dpid, ports):
        if dpid == OTHER_DPID:
            release.wait(30)
        return {"dpid": f"{dpid:016x}", "ports": ports, "refused": []}

    client = FakeController(hang_on_br1)
    scans = [scan_of(ENTRY1)]
    agent = agent_over(scans, client)
    try:
        agent.round()
        wait_for(lambda: client.puts_for(DPID), what="br0 published")
        scans.append(scan_of(ENTRY1, ENTRY2))
        started = time.monotonic()
        agent.round()
        assert time.monotonic() - started < 1  # the round does not wait for any PUT
        wait_for(lambda: len(client.puts_for(DPID)) == 2, what="br0's change published while br1 hangs")
        assert inventories(agent)["br1"]["state"] == "pending"
    finally:
        release.set()
        agent.shutdown()


def test_refusals_are_logged_once_per_change_and_shown_in_the_status(tmp_path, caplog, capsys):
    from mbvisor.agents.cli import main
    from mbvisor.agents.discovery import Refusal

    duplicate = (Refusal("br0", "vm1", "attached-mac 02:00:00:00:00:03 of vm1 (port 3) is also claimed by vm2 "
                                       "(port 4); neither is served until the operator fixes the annotation"),
                 Refusal("br0", "vm2", "attached-mac 02:00:00:00:00:03 of vm2 (port 4) is also claimed by vm1 "
                                       "(port 3); neither is served until the operator fixes the annotation"))
    refused = [{"port": 3, "interface": "vm1", "reason": "MAC 02:00:00:00:00:03 is claimed by vm1 (port 3), "
                                                        "vm2 (port 4)"}]
    client = FakeController(lambda dpid, ports: {"dpid": f"{dpid:016x}", "ports": [],
                                                 "refused": refused if dpid == DPID else []})
    scans = [scan_of(ENTRY1, refused=duplicate)]
    status_file = tmp_path / "status.json"
    agent = agent_over(scans, client, status_file=status_file)
    caplog.set_level(logging.INFO, "mbvisor")
    try:
        for _ in range(5):
            agent.round()
        wait_for(lambda: inventories(agent)["br0"]["refused"] == refused, what="the controller's refusal")
        for _ in range(3):
            agent.round()
        agent.write_status()
        assert main(["agent-status", "--status-file", str(status_file)]) == 0
        scans.append(scan_of(ENTRY1))  # the operator fixed the annotation
        agent.round()
    finally:
        agent.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "not trusted" in m] == [f"interface vm1 on br0 not trusted: {duplicate[0].reason}",
                                                            f"interface vm2 on br0 not trusted: {duplicate[1].reason}"]
    assert len([m for m in messages if "the controller refuses port 3" in m]) == 1
    assert sum("no longer refused" in m for m in messages) == 2
    out = capsys.readouterr().out
    assert f"interface vm1 on br0 not trusted: {duplicate[0].reason}" in out
    assert "inventory of br0 (00000000000000a1): 1 port(s), published" in out
    assert f"  the controller refuses port 3 (vm1): {refused[0]['reason']}" in out


def test_a_static_channel_file_publishes_nothing():
    client = FakeController()
    agent = Agent(lambda: [], client, AgentSettings())
    try:
        agent.round()
        assert agent.publishers == {} and agent.status()["inventories"] == []
    finally:
        agent.shutdown()


# ---- the real client against an HTTP stub of the controller ------------------------------------------


class StubController:
    """``PUT /v1/switches/{dpid}/ports`` as the contract describes it, in memory: a restart
    (``restart()``) is a controller that lost the inventories (an older database)."""

    def __init__(self, token: str = "secret"):
        self.inventories: dict[str, list] = {}
        self.puts_since_start = 0  # inventories accepted since the last (re)start
        self.token = token
        self.status: int | None = None  # answer this instead, when set
        self.lock = threading.Lock()
        self.server = None
        self.start(0)

    def start(self, port: int) -> None:
        stub = self

        class Handler(JsonHandler):
            def do_PUT(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                parts = self.path.split("/")
                if stub.status is not None:
                    return self._send(stub.status, {"error": "overloaded"})
                if self.headers.get("Authorization") != f"Bearer {stub.token}":
                    return self._send(401, {"error": {"code": "unauthorized", "message": "token"}})
                if parts[1:4] != ["v1", "switches", parts[3]] or parts[4:] != ["ports"]:
                    return self._send(404, {"error": {"code": "not-found", "message": self.path}})
                with stub.lock:
                    stub.inventories[parts[3]] = body["ports"]
                    stub.puts_since_start += 1
                self._send(200, {"dpid": parts[3], "ports": body["ports"], "refused": []})


        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def restart(self) -> None:
        self.stop()
        with self.lock:
            self.inventories.clear()
            self.puts_since_start = 0
        self.start(self.server.server_port)

    def held(self, dpid: int):
        with self.lock:
            return self.inventories.get(f"{dpid:016x}")


@pytest.fixture
def stub():
    server = StubController()
    yield server
    server.stop()


def test_client_put_ports_sorts_failures_like_the_other_calls(stub):
    client = ControllerClient(stub.url, "secret", timeout=5)
    assert client.put_ports(DPID, [port_identity_body(ENTRY1)]) == {"dpid": f"{DPID:016x}", "ports": [port_identity_body(ENTRY1)],
                                                          "refused": []}
    with pytest.raises(ControllerFailed, match="token"):
        ControllerClient(stub.url, "wrong", timeout=5).put_ports(DPID, [])
    stub.status = 400
    with pytest.raises(ControllerFailed, match="HTTP 400: overloaded"):
        client.put_ports(DPID, [])
    stub.status = 503
    with pytest.raises(ControllerUnavailable, match="503"):
        client.put_ports(DPID, [])
    stub.stop()
    with pytest.raises(ControllerUnavailable, match="unreachable"):
        ControllerClient(stub.url, timeout=2).put_ports(DPID, [])
    stub.start(0)  # the fixture stops it again


def test_the_agent_republishes_after_a_controller_restart_and_retries_while_it_is_down(stub, caplog):
    caplog.set_level(logging.INFO, "mbvisor")
    scans = [scan_of(ENTRY1, other=None)]
    agent = agent_over(scans, ControllerClient(stub.url, "secret", timeout=5), inventory_refresh=0.5,
                       removal_ceiling=0.2)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: stub.held(DPID) == [port_identity_body(ENTRY1)], what="the first publication")
        stub.restart()  # an older database: the controller knows nothing of br0
        wait_for(lambda: stub.puts_since_start >= 1 and stub.held(DPID) == [port_identity_body(ENTRY1)],
                 what="the refresh after the restart")
        stub.stop()
        outage = len(caplog.records)
        scans.append(scan_of(ENTRY1, ENTRY2, other=None))  # changed while the controller is down
        wait_for(lambda: inventories(agent)["br0"]["attempts"] >= 4, what="retries while it is down")
        logged = [r.getMessage() for r in caplog.records[outage:] if "not published" in r.getMessage()]
        assert 1 <= len(logged) <= 2, logged  # the outage (and the change, if it came after), not every retry
        stub.start(stub.server.server_port)
        wait_for(lambda: stub.held(DPID) == [port_identity_body(ENTRY1), port_identity_body(ENTRY2)], what="the change once it is back")
        wait_for(lambda: inventories(agent)["br0"]["state"] == "published")
    finally:
        agent.stop.set()
        thread.join(timeout=15)
    assert any("2 port(s) published after" in r.getMessage() for r in caplog.records)


# ---- the real agent on a real bridge, against the real controller ----------------------------------------


@pytest.mark.host
def test_real_agent_publishes_annotations_and_duplicates_are_refused_on_both_sides(lab, tmp_path):
    """Needs the controller's ``PUT/GET /v1/switches/{dpid}/ports`` (controller/rest.py)."""
    from mbvisor.topologies.agent_run import AgentProcess, make_region
    from mbvisor.topologies.controller_run import Controller
    from mbvisor.topologies.netlab import wait_until

    controller = Controller(tmp_path).start()
    regions = [make_region(), make_region()]
    agent = None
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        mb = lab.host("mb", ip="10.0.0.5/24")
        backend = lab.host("backend", ip="10.0.0.11/24")
        twin = lab.host("twin", ip="10.0.0.12/24")
        mb.annotate("blue", ips=["10.0.0.5", "FD00::5"], vm_id="vm-mb", channel=regions[0])
        backend.annotate("blue")
        agent = AgentProcess(controller, tmp_path, bridges=(bridge.name,), inventory_refresh=1).start()
        agent.wait_serving(f"vm-mb/{mb.port_name}")
        path = f"/v1/switches/{bridge.dpid:016x}/ports"

        def held():
            status, body = controller.get(path)
            return {p["interface"]: p for p in body["ports"]} if status == 200 else {}

        wait_until(lambda: held().keys() == {mb.port_name, backend.port_name}, timeout=15,
                   what=f"the inventory at the controller (agent log {agent.log})")
        assert held()[mb.port_name] == {"port": mb.ofport, "interface": mb.port_name, "mac": mb.mac,
                                        "vm_id": "vm-mb", "tenant": "blue", "ips": ["10.0.0.5", "fd00::5"]}

        # an operator's mistake: twin claims mb's MAC; neither is served, both are refused
        twin.annotate("red", vm_id="vm-twin", channel=regions[1])
        bridge.vsctl("set", "Interface", twin.port_name, f"external_ids:attached-mac={mb.mac}")
        wait_until(lambda: not agent.channels(), timeout=15, what="both channels refused")
        refused = wait_until(lambda: controller.get(path)[1].get("refused"), timeout=15,
                             what="the controller's refusal")
        assert {r["interface"] for r in refused} == {mb.port_name, twin.port_name}
        assert {r["interface"] for r in agent.status()["refused_interfaces"]} == {mb.port_name, twin.port_name}
        log = agent.log.read_text()
        assert f"interface {mb.port_name} on {bridge.name} not trusted" in log and twin.port_name in log

        # fixed: mb is served again, and a restarted controller with an empty database learns it again
        bridge.vsctl("remove", "Interface", twin.port_name, "external_ids", "attached-mac")
        agent.wait_serving(f"vm-mb/{mb.port_name}")
        controller.stop()
        for database in tmp_path.glob("controller.sqlite*"):
            database.unlink()
        controller.start()
        wait_until(lambda: held().keys() == {mb.port_name, backend.port_name}, timeout=15,
                   what="the inventory re-published to the restarted controller")
        wait_until(lambda: agent.inventories()[bridge.name]["state"] == "published", timeout=15,
                   what="the agent's status")
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()
        for region in regions:
            if os.path.exists(region):
                os.unlink(region)


def test_underlay_ports_are_published_with_the_inventory_and_counted_apart():
    from mbvisor.controller.trust import Underlay
    state = publication()
    uplink = Underlay(1000, "ul0", None)
    assert state.offer((ENTRY1, uplink), now=0)
    assert state.succeeded((ENTRY1, uplink), accepted(ENTRY1), now=0)[0] == "1 port(s) and 1 underlay port(s) published"
    assert (state.status()["ports"], state.status()["underlay"]) == (1, 1)
