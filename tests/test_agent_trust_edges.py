"""The agent's side of the trust model at its edges (found by an adversarial review),
without OVS: hostile or broken annotations, re-plugged ports, a mistyped MAC elsewhere.

Each test states the promise it checks (docs/agent.md, docs/security.md, the modules'
docstrings) and fails if the promise is broken.  ovsdb tables are built in the encoding
of ``ovs-vsctl --format=json`` (helpers shared with tests/test_agent_inventory.py); the
controller's side is its real pure code (``inventory_from_body``, ``build_inventory``,
``compile_ingress``, ``ofp_match``) or its service on fake switches (tests/test_trust.py).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from os_ken.ofproto import ofproto_v1_3_parser as PARSER

from mbvisor.agents.agent import Agent, AgentSettings
from mbvisor.agents.controller_client import refusal
from mbvisor.agents.discovery import scan_ovsdb
from mbvisor.agents.inventory import Publication
from mbvisor.controller.filters import compile_filters
from mbvisor.controller.flows import counts_as_handled
from mbvisor.controller.ingress import compile_ingress
from mbvisor.controller.model import Middlebox
from mbvisor.controller.ofmessages import ofp_match
from mbvisor.controller.pipeline import INGRESS_TABLE, OFFLOAD_TABLE, cookie_of, port_cookie
from mbvisor.controller.requests import BadRequest, CommandRequest, inventory_from_body, port_identity_body
from mbvisor.controller.trust import build_inventory
from mbvisor.guest.backoff import Backoff
from mbvisor.guest.grammar import parse_command
from test_agent_inventory import ids, ovsdb
from fakeswitch import wait_until as hub_wait_until
from test_agent_shell import wait_for
from test_trust import service  # noqa: F401 - the controller service on fake switches

DPID = 0xA1  # test_trust's switch
MB_MAC, WEB_MAC, OTHER_MAC = "02:00:00:00:00:02", "02:00:00:00:00:03", "02:00:00:00:00:09"


def _good_ports():
    return [("mb", 2, ids(MB_MAC, tenant="red", ips="10.0.0.2", vm_id="mb"), ""),
            ("web", 3, ids(WEB_MAC, tenant="red", ips="10.0.0.3", vm_id="web"), "")]


def _controller_takes(entries) -> list:
    """What the controller does with a PUT of these entries (rest.set_ports): BadRequest
    is its 400, which changes nothing on its side."""
    return inventory_from_body({"ports": [port_identity_body(e) for e in entries]})


# --- the agent publishes only inventories the controller can take ------------------------

BROKEN = {
    "vm-id of 300 characters": ids(OTHER_MAC, vm_id="v" * 300, ips="10.0.0.9"),
    "multicast attached-mac": ids("01:00:5e:00:00:09", ips="10.0.0.9"),
    "broadcast attached-mac": ids("FF-FF-FF-FF-FF-FF", ips="10.0.0.9"),
    "zero attached-mac": ids("00:00:00:00:00:00", ips="10.0.0.9"),
    "scoped IPv6 address": ids(OTHER_MAC, ips="10.0.0.9,fd00::9%eth0"),
}


@pytest.mark.parametrize("annotation", list(BROKEN.values()), ids=list(BROKEN))
def test_every_port_the_agent_publishes_is_one_the_controller_can_enforce(annotation):
    """agent.md: "An annotation the agent cannot read ... makes that port refused: it is
    left out of the inventory"; requests.inventory_from_body: "one bad entry refuses the
    request".  So any entry the agent puts in an inventory must be one the controller
    accepts and can compile into flows the switch takes; otherwise one operator typo
    freezes the whole bridge's trust state (see the next test)."""
    found = scan_ovsdb(*ovsdb(("br0", DPID, _good_ports() + [("vm9", 9, annotation, "")])))
    published = found.inventories[DPID]
    try:
        entries = _controller_takes(published)
    except BadRequest as error:
        pytest.fail(f"the agent published {[e.interface for e in published]}; the controller answers 400 "
                    f"for the whole bridge: {error.field}: {error.message}")
    for flow in compile_ingress(build_inventory(entries)):
        try:
            ofp_match(PARSER, flow.match).serialize(bytearray(), 0)
        except Exception as error:  # what the reconciler would hit encoding the switch's flows
            pytest.fail(f"accepted on both sides, but port security cannot be encoded: {error!r} ({flow.match})")


def test_the_control_case_a_good_annotation_passes_the_same_checks():
    """The harness of the test above is sound: a well-formed third port is published and
    its flows encode."""
    test_every_port_the_agent_publishes_is_one_the_controller_can_enforce(ids(OTHER_MAC, ips="10.0.0.9"))


class StrictController:
    """put_ports as the real controller answers it: validated whole (400 changes nothing),
    else the inventory is held.  ``forget(port)`` is the controller's port_deleted."""

    url = "fake://strict"

    def __init__(self):
        self.held: dict[int, list[dict]] = {}
        self.puts = 0
        self.lock = threading.Lock()

    def put_ports(self, dpid, ports, underlay=()):
        with self.lock:
            self.puts += 1
            try:
                inventory_from_body({"ports": ports, "underlay": list(underlay)})
            except BadRequest as error:
                raise refusal(400, {"error": {"code": "bad-request", "message": f"{error.field}: {error.message}"}})
            self.held[dpid] = ports
            return {"dpid": f"{dpid:016x}", "ports": ports, "refused": []}

    def forget(self, dpid, port):
        with self.lock:
            self.held[dpid] = [p for p in self.held[dpid] if p["port"] != port]

    def ports(self, dpid):
        with self.lock:
            return {p["interface"]: p for p in self.held.get(dpid, [])}

    def execute(self, requests):
        raise AssertionError("no command in these tests")

    def delete_middlebox(self, dpid, mac):
        return True


def _agent(scans: list, client, **settings) -> Agent:
    settings = {"discovery_interval": 0.01, "removal_ceiling": 0.05, **settings}
    return Agent(lambda: scan_ovsdb(*scans[-1]), client, AgentSettings(**settings))


def test_one_unpublishable_port_does_not_keep_the_controller_on_withdrawn_annotations(caplog):
    """security.md rule 5, "Annotations win over history", and inventory.py: "the
    controller must always hold the operator's current view".  The operator withdraws
    mb's tenant (it must lose its offloads) and, in the same minute, plugs a VM whose
    vm-id is long: the withdrawal must still reach the controller."""
    caplog.set_level(logging.INFO, "mbvisor")
    client = StrictController()
    scans = [ovsdb(("br0", DPID, _good_ports()))]
    agent = _agent(scans, client)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: set(client.ports(DPID)) == {"mb", "web"}, timeout=5, what="the first publication")
        withdrawn = [("mb", 2, {"attached-mac": MB_MAC, "mbvisor-ips": "10.0.0.2"}, ""), _good_ports()[1],
                     ("vm9", 9, ids(OTHER_MAC, vm_id="libvirt-" + "x" * 300, ips="10.0.0.9"), "")]
        scans.append(ovsdb(("br0", DPID, withdrawn)))
        wait_for(lambda: "mb" not in client.ports(DPID), timeout=3,
                 what="the controller to stop trusting mb's withdrawn annotation")
    finally:
        agent.stop.set()
        thread.join(timeout=10)


def test_a_permanent_refusal_is_retried_with_back_off_and_logged_once(caplog):
    """agent.md: after a failure "again with a pause doubling ... to 60 s; the log says it
    once per outage or change, not every try" -- a controller answering 400 must not make
    the agent hammer it or flood the log (checked on the bookkeeping, with a hand clock)."""
    publication = Publication(DPID, "br0", Backoff(floor=2.0, ceiling=60.0, spins=0))
    entries = scan_ovsdb(*ovsdb(("br0", DPID, _good_ports()))).inventories[DPID]
    publication.offer(entries, now=0.0)
    now, logged, pauses = 0.0, 0, []
    for _ in range(12):
        assert publication.wait(now) == 0
        logged += publication.failed("controller answered HTTP 400 bad-request: ports[2].vm_id", now)
        pauses.append(publication.wait(now))
        publication.offer(entries, now)  # a discovery round in between changes nothing
        now += pauses[-1]
    assert logged == 1 and pauses[:6] == [2, 4, 8, 16, 32, 60] and max(pauses) == 60


# --- a re-plugged port is published again at once ---------------------------------------------

def test_a_port_replugged_between_two_scans_is_published_again_at_once():
    """controller.port_deleted drops a deleted port's annotations "until the agent
    publishes again"; security.md rule 4: an annotated port sends only its own MAC and
    addresses and nobody else may send them.  A VM whose interface is deleted and re-created
    (a new Interface row, same name, ofport and annotations) between two scans must be
    published again well before the 60 s refresh, else it runs without port security."""
    client = StrictController()
    scans = [ovsdb(("br0", DPID, _good_ports()))]
    agent = _agent(scans, client, inventory_refresh=60.0)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: set(client.ports(DPID)) == {"mb", "web"}, timeout=5, what="the first publication")
        client.forget(DPID, 3)                      # OFPPortStatus delete of web's port
        scans.append(ovsdb(("br0", DPID, _good_ports())))  # the re-created rows: new uuids, same content
        wait_for(lambda: "web" in client.ports(DPID), timeout=3,
                 what="the re-plugged VM published again before the refresh")
    finally:
        agent.stop.set()
        thread.join(timeout=10)


# --- hostile or broken annotations --------------------------------------------------------

def test_a_huge_mbvisor_ips_is_refused_quickly_and_in_a_bounded_line():
    """agent.md: at most 64 addresses; a refusal is one log line, and the status file is
    rewritten every round.  An annotation of 20,000 addresses (230 KB) must be refused
    without stalling discovery (which also runs departures and removals), and the refusal
    must not carry the whole value into the log and the status file."""
    huge = ",".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(20000))
    tables = ovsdb(("br0", DPID, _good_ports() + [("vm9", 9, ids(OTHER_MAC, ips=huge), "")]))
    started = time.perf_counter()
    found = scan_ovsdb(*tables)
    took = time.perf_counter() - started
    reasons = {r.interface: r.reason for r in found.refused}
    assert "vm9" in reasons
    problems = []
    if took > 0.25:
        problems.append(f"one scan took {took:.2f} s (discovery runs every 2 s)")
    if len(reasons["vm9"]) > 2000:
        problems.append(f"the refusal is {len(reasons['vm9']):,} characters long")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("annotation", [
    {"mbvisor-channel": "/dev/shm/r9", "attached-mac": "not-a-mac"},
    {"mbvisor-channel": "/dev/shm/r9", "attached-mac": "", "mbvisor-tenant": "red"},
], ids=["unreadable attached-mac, no tenant", "empty attached-mac with a tenant"])
def test_a_channel_whose_attached_mac_is_none_is_refused_not_served(annotation):
    """agent.md: "a MAC that is none makes that port refused ... Nothing is dropped
    silently", and the MAC comes from the operator, never guessed: a channel whose
    attached-mac is unreadable or empty must be refused with a reason, not served with
    that text or with the tap's own mac_in_use as the VM's identity."""
    found = scan_ovsdb(*ovsdb(("br0", DPID, [("tap9", 9, annotation, "fe:54:00:00:00:09")])))
    served = [(c.interface, c.macs) for c in found.channels]
    published = [(e.interface, e.mac) for e in found.inventories[DPID]]
    assert not served and not published and [r.interface for r in found.refused] == ["tap9"], \
        f"served {served}, published {published}, refused {found.refused}"


def test_one_mac_in_upper_case_or_with_dashes_is_still_one_identity():
    """security.md rule 6: the same MAC on two ports of a switch is refused for both
    (however the operator spelled it), and the inventory carries the canonical form."""
    found = scan_ovsdb(*ovsdb(("br0", DPID, [
        ("vm1", 3, ids("02:00:00:00:00:0a", ips="10.0.0.3", channel="/dev/shm/r1"), ""),
        ("vm2", 4, ids(" 02-00-00-00-00-0A ", ips="10.0.0.4", channel="/dev/shm/r2"), "")])))
    assert found.channels == [] and {r.interface for r in found.refused} == {"vm1", "vm2"}
    assert {e.mac for e in found.inventories[DPID]} == {"02:00:00:00:00:0a"}
    refused = build_inventory(_controller_takes(found.inventories[DPID])).refused
    assert {r.interface for r in refused} == {"vm1", "vm2"}


@pytest.mark.parametrize("annotation, named", [
    (ids(OTHER_MAC, tenant="blue team"), "'blue team' is not a tenant name"),
    (ids(OTHER_MAC, tenant="bl\u00fce"), "is not a tenant name"),
    (ids(OTHER_MAC, tenant="blue\n"), "is not a tenant name"),
    (ids(OTHER_MAC, tenant="t" * 65), "is not a tenant name"),
    (ids(OTHER_MAC, ips="\uff11\uff10.0.0.1"), "is not an IP address"),
    (ids(OTHER_MAC, ips=",".join(f"10.0.1.{i}" for i in range(65))), "at most 64"),
], ids=["blank", "unicode letter", "trailing newline", "65 characters", "full-width digits", "65 addresses"])
def test_unreadable_tenants_and_addresses_refuse_the_port_and_name_the_text(annotation, named):
    """agent.md: a tenant is letters, digits, '._:-', at most 64; an annotation the agent
    cannot read refuses that port (out of the inventory, no channel) and says why."""
    found = scan_ovsdb(*ovsdb(("br0", DPID, _good_ports() + [("vm9", 9, {**annotation,
                                                                         "mbvisor-channel": "/dev/shm/r9"}, "")])))
    assert [e.interface for e in found.inventories[DPID]] == ["mb", "web"] and found.channels == []
    assert named in {r.interface: r.reason for r in found.refused}["vm9"]


def test_another_interfaces_typo_does_not_delete_a_vms_offloads():
    """security.md rule 6: a duplicated identity is refused for both ports, "never resolved
    by arrival order"; rule 5: a middlebox its annotations no longer vouch for "gets no
    flows" (the controller withholds them until the annotations are right again).  An
    operator who gives a backend mb's MAC by mistake must not make the agent delete mb's
    offloads for good: mb did nothing, and fixing the typo should restore it."""
    deleted = []

    class Client(StrictController):
        def delete_middlebox(self, dpid, mac):
            deleted.append((dpid, mac))
            return True

    mb = ("mb", 2, ids(MB_MAC, tenant="red", ips="10.0.0.2", channel="/dev/shm/mbvisor-review-absent"), "")
    scans = [ovsdb(("br0", DPID, [mb, _good_ports()[1]]))]
    agent = _agent(scans, Client())
    try:
        agent.round()
        assert list(agent.channels) == ["mb/mb"]  # known (its region is absent here, which does not matter)
        typo = ("web", 3, ids(MB_MAC.upper(), tenant="red", ips="10.0.0.3"), "")
        scans.append(ovsdb(("br0", DPID, [mb, typo])))
        agent.round()
        agent.round()
        assert not deleted, f"mb's offloads were deleted because another port was mis-annotated: {deleted}"
    finally:
        agent.shutdown(grace=1)


# --- handled_in_switch counts every filter decision ----------------------------------

def test_every_filter_drop_in_the_offload_table_counts_as_handled():
    """controller.md "Counters" / rest.md handled_in_switch: "each packet once, at the ...
    flow that decided it (a filter's drop or a redirect's entry)".  A range x range filter
    is decided by its conjunctive drop flow (conj_id), which must count too."""
    middlebox = Middlebox(DPID, 2, MB_MAC, 1, firewall_ip="10.0.0.2",
                          filters=frozenset({parse_command(f"A {MB_MAC} T 13 s 1025-65534 d 1-65534 p tcp").filter}))
    flows = compile_filters(middlebox, frozenset({"10.0.0.2"}))
    drops = [f for f in flows if f.table == OFFLOAD_TABLE and f.actions == () and f.cookie == cookie_of(MB_MAC)]
    assert any(dict(f.match).get("conj_id") for f in drops), "the harness expects a conjunctive drop"
    uncounted = sorted({(f.table, f.priority, tuple(k for k, _ in f.match)) for f in drops
                        if not counts_as_handled(f.table, f.priority, True)})
    assert not uncounted, f"filter drops that handled_in_switch never counts: {uncounted}"


# --- a scoped address stops nothing on the controller ----------------------------------

@pytest.mark.parametrize("ips", ["fd00::9%eth0", "fd00::9"], ids=["scoped", "control: unscoped"])
def test_a_scoped_address_the_agent_publishes_does_not_stop_the_switch_converging(service, ips):  # noqa: F811
    """The agent accepts ``mbvisor-ips=fd00::9%eth0`` and so does the controller's PUT; the
    other ports of that switch must still get their port security (security.md rule 4),
    and commands still be applied."""
    fake = service.connect()
    found = scan_ovsdb(*ovsdb(("br0", DPID, _good_ports() + [("vm9", 7, ids(OTHER_MAC, ips=ips), "")])))
    service.set_inventory(DPID, _controller_takes(found.inventories[DPID]))
    answer = service.execute(CommandRequest(DPID, 2, f"R F {MB_MAC} 10.0.0.2"))
    assert answer.status == "OK", answer
    # ... and the switch must converge to the new inventory: port security of the other ports.
    hub_wait_until(lambda: secured(fake), timeout=3, what="port security of the other ports on the switch")


def secured(fake) -> bool:
    cookies = {f.cookie for f in fake.flows(INGRESS_TABLE)}
    return port_cookie(2) in cookies and port_cookie(3) in cookies
