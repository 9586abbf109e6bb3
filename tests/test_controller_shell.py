"""Unit tests of the controller shell (service + one reconciler per switch + switch link) on
the fake switch (tests/fakeswitch.py), which applies the real encoded OpenFlow messages.

Each test is one of the failures seen on real switches (issue 10), reproduced fast and
without OVS: reconnects, hung and refusing switches, another application wiping the
tables, ports that go, very large requests, reused idempotency keys, lying counters."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakeswitch import FakeSwitch, wait_until
from mbvisor.controller import reconciler as reconciler_module
from mbvisor.controller import pacing, stepping, switchlink, wire
from mbvisor.controller.compat import hub
from mbvisor.controller.filters import compile_filters
from mbvisor.controller import flows as flows_module
from mbvisor.controller.flows import FILTER, SwitchConfig, cookie_of, filter_cost
from mbvisor.guest.grammar import parse_command
from mbvisor.controller.pipeline import OFFLOAD_TABLE, PORT_METERS, REDIRECT_TABLE
from mbvisor.controller.trust import PortIdentity, TrustMode
from mbvisor.controller.model import Limits
from mbvisor.controller.pipeline import Flow
from mbvisor.controller.reconciler import Installed, Job
from mbvisor.controller import store as store_module
from mbvisor.controller.model import State
from mbvisor.controller.requests import Answer, CommandRequest, SwitchUnavailable
from mbvisor.controller.service import Controller, Settings
from mbvisor.controller.store import Store

DPID, OTHER = 0xA1, 0xB2
MAC, MAC2 = "52:34:56:00:12:22", "52:34:56:00:12:33"
MB_PORT, CLIENT_PORT, BACKEND_PORT = 2, 1, 3


class Host:
    """A service wired to fake switches the way the OS-Ken app wires it to real ones."""

    def __init__(self, tmp_path, **settings):
        self.database = tmp_path / "controller.sqlite"
        # A lab's trust mode: these tests are about the shell's decisions; the trust
        # model's are in test_trust.py (settings may say otherwise).
        settings = {"trust": TrustMode.LAB, "backend_check_interval": 0, **settings}
        self.service = Controller(Settings(database=self.database, audit_interval=0, **settings))
        self.service.arp_timeout = 0.5
        self.switches: dict[int, FakeSwitch] = {}

    def deliver(self, message) -> None:
        name = type(message).__name__
        if name == "OFPSwitchFeatures":
            self.service.switch_connected(message.datapath)
        elif name == "OFPPacketIn":
            self.service.packet_in(message)
        elif name == "OFPPortStatus":
            if message.reason == message.datapath.ofproto.OFPPR_DELETE:
                self.service.port_deleted(message.datapath.id, message.desc.port_no)
        else:
            self.service.receive(message)

    def switch(self, dpid: int = DPID) -> FakeSwitch:
        fake = FakeSwitch(dpid, sink=self.deliver)
        self.switches[dpid] = fake
        self.service.switch_connected(fake.datapath)
        wait_until(lambda: self.service.reconcilers[dpid].synced, what="first reconciliation")
        return fake

    def run(self, *texts: str, dpid: int = DPID, port: int = MB_PORT, key: tuple | None = None):
        requests = [CommandRequest(dpid, port, text, *(key or (None, None, None))) for text in texts]
        return self.service.submit(requests)

    def ok(self, *texts: str, **where) -> None:
        answers = self.run(*texts, **where)
        assert all(a.status == "OK" for a in answers), answers

    def close(self) -> None:
        self.service.close()
        for fake in self.switches.values():
            fake.close()


@pytest.fixture
def host(tmp_path):
    made = Host(tmp_path)
    yield made
    made.close()
    assert pacing.COMMANDS.running == 0, "a command still counted: every reconciliation would step aside"


@pytest.fixture
def fast_timeouts(monkeypatch):
    """A hung switch costs a test 0.2 s, not the production 5 s."""
    monkeypatch.setattr(switchlink, "BASE_TIMEOUT", 0.2)
    monkeypatch.setattr(reconciler_module, "RESYNC_FLOOR", 0.05)


def filter_flows(fake: FakeSwitch) -> list:
    return [f for f in fake.flows(OFFLOAD_TABLE) if f.priority == FILTER]


def sent(fake: FakeSwitch, kind: str) -> list:
    return [m for m in fake.received if type(m).__name__ == kind]


# --- the command path ------------------------------------------------------------------

def test_a_command_is_answered_once_its_flows_are_on_the_switch(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    # To its MAC, in a group frame for its address, and the two double-tagged forms.
    assert len(filter_flows(fake)) == 4
    assert fake.trace(CLIENT_PORT, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.66.1.1").verdict == "drop"
    assert fake.trace(CLIENT_PORT, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.67.1.1").verdict == "normal"
    assert sent(fake, "ONFBundleCtrlMsg"), "changes go as a bundle"
    view = host.service.switch_views()[0]
    assert view["connected"] and view["synced"] and view["generation"] == view["applied_generation"] == 1


def test_a_refused_bundle_changes_nothing_anywhere(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    before = sorted(f.identity for f in fake.flows())
    fake.refuse(lambda m: type(m).__name__ == "OFPFlowMod" and "10.66.0.0" in str(m.match))
    answers = host.run(f"A {MAC} I 4 s 10.0.0.0/8", f"A {MAC} I 4 s 10.66.0.0/16")
    assert [a.status for a in answers] == ["REJECTED", "REJECTED"]
    assert all(a.code == "switch-error" for a in answers)
    assert sorted(f.identity for f in fake.flows()) == before  # atomic: the first filter is not there
    assert host.service.state.find(DPID, MAC).filters == frozenset()
    assert Store(host.database).load(Limits()).find(DPID, MAC).filters == frozenset()
    host.ok(f"A {MAC} I 4 s 10.0.0.0/8")  # the reconciler goes on


def test_a_failed_commit_names_the_bundle_error(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    installed = host.service.reconcilers[DPID].installed
    known = _record_contents(installed)
    fake.fail_next_commit()
    answer = host.run(f"A {MAC} I 4 s 10.0.0.0/8")[0]
    assert answer.status == "REJECTED" and "bundle error" in answer.text and "None" not in answer.text
    assert filter_flows(fake) == []
    # Its flows were recorded while the switch applied the bundle, and taken back.
    assert host.service.reconcilers[DPID].installed is installed and _record_contents(installed) == known
    assert installed.flow_count() == len(fake.flows())


def test_commands_for_a_switch_that_is_not_connected_are_unavailable_and_change_nothing(host):
    answers = host.run(f"R F {MAC} 10.0.0.5", dpid=OTHER)
    assert answers[0].status == "UNAVAILABLE" and answers[0].code == "switch-down"
    assert host.service.state.middleboxes == ()
    assert host.run(f"I {MAC}", dpid=OTHER)[0].status == "REJECTED"  # reads need no switch


def test_a_bug_while_installing_costs_the_job_not_the_reconciler(host, monkeypatch):
    host.switch()
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("boom")

    monkeypatch.setattr(reconciler_module, "compile_middlebox", broken)
    answers = host.run(f"R F {MAC} 10.0.0.5")
    assert answers[0].status == "INTERNAL" and "boom" not in answers[0].text
    monkeypatch.undo()
    host.ok(f"R F {MAC} 10.0.0.5")
    assert calls


# --- idempotency ------------------------------------------------------------------------

def test_a_retried_command_replays_and_a_reused_key_is_refused(host):
    fake = host.switch()
    first = host.run(f"R F {MAC} 10.0.0.5", key=("vm/eth0", 1, 7))[0]
    again = host.run(f"R F {MAC} 10.0.0.5", key=("vm/eth0", 1, 7))[0]
    assert first.status == again.status == "OK" and again.replayed and not first.replayed
    reused = host.run(f"X {MAC}", key=("vm/eth0", 1, 7))[0]
    assert reused.status == "REJECTED" and reused.code == "key-reused"
    assert host.service.state.find(DPID, MAC) is not None and fake.flows(OFFLOAD_TABLE)
    largest = host.run(f"A {MAC} I 4 s 10.1.0.0/16", key=("vm/eth0", 2**32 - 1, 2**63 - 1))[0]
    assert largest.status == "OK"


def test_queries_are_not_stored(host):
    host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    for seq in range(50):
        host.run(f"I {MAC}", key=("vm/eth0", 1, seq))
    assert Store(host.database).answer_count() == 0


# --- reconnects, hung switches, audits ----------------------------------------------------

def test_reconnect_reconciles_first_and_loses_no_flow(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", *[f"A {MAC} I 4 s 10.{n}.0.0/16" for n in range(20)])
    flows = sorted(f.identity for f in fake.flows())
    fake.received.clear()
    host.service.switch_disconnected(fake.datapath)
    datapath = fake.reconnect()
    # A command queued behind the reconnection: the reconciliation must not wait for it.
    answers = []
    hub.spawn(lambda: answers.extend(host.run(f"A {MAC} I 4 s 10.99.0.0/16")))
    wait_until(lambda: answers, what="the queued command's answer")
    reconciler = host.service.reconcilers[DPID]
    assert reconciler.link.datapath is datapath and reconciler.synced
    assert answers[0].status == "OK"
    deletes = [m for m in sent(fake, "OFPFlowMod") if m.command in (3, 4)]
    assert deletes == []
    assert set(flows) <= {f.identity for f in fake.flows()}
    kinds = [type(m).__name__ for m in fake.received]
    assert kinds.index("OFPFlowStatsRequest") < kinds.index("ONFBundleAddMsg")


def test_a_reconnection_frees_what_it_compiled_a_step_at_a_time(host, monkeypatch):
    """A reconnected switch's whole compiled state (25,000 flows in the data-centre
    benchmark) freed at the end of its job held the loop 6 ms: the compiled flows, the
    record of what they replaced and the record of what the switch held before are let go
    of in steps, the loop's pacer between them, each time as their last holder."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", *[f"A {MAC} I 4 s 10.{n}.0.0/16" for n in range(20)])
    compiled = len(fake.flows())
    let_go, released = stepping.let_go, []

    def watched(items, pause, step=stepping.STEP):
        first = items[0] if type(items) is list and items else None
        released.append((type(items), len(items), first is not None and sys.getrefcount(first) - 1, type(pause)))
        let_go(items, pause, step)

    monkeypatch.setattr(reconciler_module, "let_go", watched)
    fake.tables.flows.clear()
    host.service.switch_disconnected(fake.datapath)
    fake.reconnect()
    wait_until(lambda: host.service.reconcilers[DPID].synced, what="the reconciliation")
    lists = [r for r in released if r[0] is list]
    assert sorted(len_ for _, len_, _, _ in lists) == [compiled, compiled], released
    # Only the list holds each item (besides ``first`` and getrefcount's argument): freed as let go of.
    assert {(kind, refs, pause) for kind, _, refs, pause in lists} == {(list, 2, pacing.Pacer)}
    # The record of what the switch held before its restart: its index, then its flows.
    old_record = [(len_, pause) for kind, len_, _, pause in released if kind is dict]
    assert sum(len_ for len_, _ in old_record[1:]) == compiled and {p for _, p in old_record} == {pacing.Pacer}


def test_a_switch_that_stops_answering_is_not_marked_synced(host, fast_timeouts):
    """A failed reconciliation keeps the switch unsynced: commands answer UNAVAILABLE (and
    change nothing) until a later reconciliation succeeds."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    fake.hold()
    host.service.switch_connected(fake.datapath)  # a reconnection whose reading hangs
    wait_until(lambda: host.service.reconcilers[DPID].last_error is not None, what="the failed reconciliation")
    reconciler = host.service.reconcilers[DPID]
    assert not reconciler.synced and "did not answer" in reconciler.last_error
    answer = host.run(f"X {MAC}")[0]
    assert answer.status == "UNAVAILABLE" and host.service.state.find(DPID, MAC) is not None
    fake.release()
    wait_until(lambda: reconciler.synced, timeout=5, what="the retried reconciliation")
    host.ok(f"X {MAC}")
    assert filter_flows(fake) == [] and host.service.state.find(DPID, MAC) is None


def test_a_hung_switch_never_delays_another(host, monkeypatch):
    monkeypatch.setattr(switchlink, "BASE_TIMEOUT", 3.0)  # the other switch's whole job fits well within it
    slow, quick = host.switch(DPID), host.switch(OTHER)
    host.ok(f"R F {MAC} 10.0.0.5", dpid=DPID)
    host.ok(f"R F {MAC2} 10.0.0.6", dpid=OTHER)
    slow.hold()
    stuck = []
    hub.spawn(lambda: stuck.extend(host.run(f"A {MAC} I 4 s 10.66.0.0/16", dpid=DPID)))
    host.ok(f"A {MAC2} I 4 s 10.66.0.0/16", dpid=OTHER)
    assert not stuck  # the other switch's command finished while this one still waits
    assert filter_flows(quick)
    wait_until(lambda: stuck, timeout=5, what="the hung switch's answer")
    assert stuck[0].status == "UNAVAILABLE" and host.service.state.find(DPID, MAC).filters == frozenset()


def test_a_disconnect_wakes_a_waiting_command_at_once(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    fake.hold()
    answers = []
    hub.spawn(lambda: answers.extend(host.run(f"A {MAC} I 4 s 10.66.0.0/16")))
    reconciler = host.service.reconcilers[DPID]
    wait_until(lambda: reconciler.link.waiters, what="the command waiting for the switch")
    fake.disconnect()
    host.service.switch_disconnected(fake.datapath)
    wait_until(lambda: answers, timeout=1, what="the answer after the disconnect")
    assert answers[0].status == "UNAVAILABLE" and "disconnected" in answers[0].text


def test_the_audit_repairs_flows_another_application_removed(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    expected = sorted(f.identity for f in fake.flows())
    fake.clear_flows()
    host.service.reconcilers[DPID].submit(Job("audit")).done.wait(timeout=5)
    assert sorted(f.identity for f in fake.flows()) == expected


def audit(host) -> int:
    """Run one audit; how many times it listed the switch's flows."""
    fake = host.switches[DPID]
    fake.settle()
    listed = len(sent(fake, "OFPFlowStatsRequest"))
    assert host.service.reconcilers[DPID].submit(Job("audit")).done.wait(timeout=5)
    fake.settle()
    return len(sent(fake, "OFPFlowStatsRequest")) - listed


def test_an_audit_of_an_unchanged_switch_counts_its_flows_without_listing_them(host):
    """Listing 200,000 flows costs seconds: while the switch holds as many of our flows
    as we installed, and the same groups, an audit only counts."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    assert audit(host) == 0  # the listing at the connection is recent
    assert sent(fake, "OFPAggregateStatsRequest")
    victim = next(f for f in fake.flows() if f.priority == FILTER)
    fake.tables.flows.pop(victim.identity)  # another application deletes one flow: the count says so
    assert audit(host) == 1
    assert victim.identity in {f.identity for f in fake.flows()}


def test_a_full_audit_warns_of_repairs_only_when_it_made_some(host, monkeypatch, caplog):
    """An operator reads "repaired" as someone else changing the switch: an audit that
    found it as installed says nothing; one that put back removed flows says how many."""
    monkeypatch.setattr(reconciler_module, "FULL_AUDIT_FLOOR", 0)
    monkeypatch.setattr(reconciler_module, "FULL_AUDIT_COST", 0)
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    ours = len(fake.flows())
    with caplog.at_level(logging.WARNING, logger="mbvisor.controller"):
        assert audit(host) == 1
        assert not [r for r in caplog.records if "repaired" in r.getMessage()]
        fake.clear_flows()
        assert audit(host) == 1
    repaired = [r.getMessage() for r in caplog.records if "repaired" in r.getMessage()]
    assert len(repaired) == 1 and f"repaired: +{ours} ~0 -0 flows" in repaired[0], repaired


def test_a_flow_changed_in_place_is_repaired_by_the_next_full_audit(host, monkeypatch):
    monkeypatch.setattr(reconciler_module, "FULL_AUDIT_FLOOR", 0)  # a full audit is due at every audit
    monkeypatch.setattr(reconciler_module, "FULL_AUDIT_COST", 0)
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    victim = next(f for f in fake.flows() if f.priority == FILTER)
    good = victim.instructions
    other = next(f for f in fake.flows() if f.priority != FILTER and f.instructions).instructions
    fake.tables.flows[victim.identity] = dataclasses.replace(victim, instructions=other)  # same count
    assert audit(host) == 1
    assert next(f for f in fake.flows() if f.identity == victim.identity).instructions == good


# --- ports that go --------------------------------------------------------------------------

def test_a_deleted_port_retires_its_middleboxes_durably(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    host.ok(f"R F {MAC2} 10.0.0.6", f"A {MAC2} I 4 s 10.66.0.0/16", port=4)
    fake.remove_port(MB_PORT)
    wait_until(lambda: host.service.state.find(DPID, MAC) is None, what="the retirement")
    wait_until(lambda: not [f for f in fake.flows() if f.cookie == cookie_of(MAC)], what="its flows removed")
    assert [f for f in fake.flows() if f.cookie == cookie_of(MAC2)]  # the other port's stay
    assert Store(host.database).load(Limits()).find(DPID, MAC) is None


def test_a_port_that_goes_while_the_switch_is_away_is_retired_when_it_returns(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    host.service.switch_disconnected(fake.datapath)
    host.service.port_deleted(DPID, MB_PORT)  # e.g. seen through OVSDB by the agent
    wait_until(lambda: host.service.state.find(DPID, MAC) is None, what="the durable retirement")
    fake.reconnect()
    wait_until(lambda: host.service.reconcilers[DPID].synced, what="the reconciliation")
    assert not [f for f in fake.flows() if f.cookie == cookie_of(MAC)]


# --- large work -----------------------------------------------------------------------------

def test_a_large_request_yields_to_others_while_it_is_worked_on(host):
    """Parsing, deciding and encoding 20,000 commands must let other green threads (echo
    replies, other switches, REST clients) run meanwhile."""
    fake = host.switch()
    texts, ports = [], []
    for m in range(20):
        mac = f"52:34:56:01:00:{m:02x}"
        texts += [f"R F {mac} 10.9.0.{m}"] + [f"A {mac} I 4 s 10.{n // 256}.{n % 256}.0/24" for n in range(999)]
        ports += [10 + m] * 1000
    ticks = []
    done = []

    def other_work():
        while not done:
            ticks.append(1)
            hub.sleep(0)

    hub.spawn(other_work)
    answers = host.service.submit([CommandRequest(DPID, port, t) for port, t in zip(ports, texts)])
    done.append(True)
    assert {a.status for a in answers} == {"OK"}
    assert len(filter_flows(fake)) == sum(len(compile_filters(mb, frozenset({mb.firewall_ip})))
                                          for mb in host.service.state.middleboxes) >= 20 * 999 * 2
    assert len(ticks) > 100


def _middleboxes_of_250_filters(host, count: int) -> None:
    """``count`` firewall middleboxes of 250 IP filters each (500 flows) on DPID."""
    for m in range(count):
        mac = f"52:34:56:01:00:{m:02x}"
        host.ok(f"R F {mac} 10.9.0.{m + 1}", *[f"A {mac} I 4 s 10.{m}.{n // 250}.{n % 250 + 1}" for n in range(250)],
                port=10 + m)


def _watch_background(monkeypatch, at_first_step=lambda: None) -> tuple[list, list]:
    """Lists of the commands running as each slice of background work starts, and of its
    waits for them; ``at_first_step`` is called at its first yield."""
    steps, waits = [], []
    rest, wait = pacing.Pacer.rest, pacing.COMMANDS.idle.wait

    def watched(pacer):
        background = pacing.hub.getcurrent() in pacing._background
        if background and not steps:
            at_first_step()
        rest(pacer)
        if background:
            steps.append(pacing.COMMANDS.running)

    def waiting(timeout=None):
        waits.append(timeout)
        return wait(timeout)

    monkeypatch.setattr(pacing.Pacer, "rest", watched)
    monkeypatch.setattr(pacing.COMMANDS.idle, "wait", waiting)
    return steps, waits


def test_a_reconnected_switch_steps_aside_for_another_switchs_command(host, monkeypatch):
    """A restarted switch's reconciliation (thousands of flows) yields every slice; each of
    another switch's commands passes between green threads several times and waited
    behind one slice each time.  While a command is carried out the reconciliation waits
    (here: as long as it takes), and the command is answered before it ends."""
    monkeypatch.setattr(pacing, "STEP_ASIDE", 10_000)  # no cap: any slice taken meanwhile is seen
    fake, other = host.switch(), host.switch(OTHER)
    _middleboxes_of_250_filters(host, 16)
    host.ok(f"R F {MAC2} 10.8.0.1", dpid=OTHER)
    held = sorted(f.identity for f in fake.flows())
    reconciler = host.service.reconcilers[DPID]
    answers, synced_before, steps_when_answered = [], [], []

    def command():
        answers.extend(host.run(f"A {MAC2} I 4 s 10.77.0.1", dpid=OTHER))
        synced_before.append(reconciler.synced)
        steps_when_answered.append(len(steps))

    steps, waits = _watch_background(monkeypatch, at_first_step=lambda: hub.spawn(command))
    fake.tables.flows.clear()  # ovs-vswitchd restarted: it holds nothing
    host.service.switch_disconnected(fake.datapath)
    fake.reconnect()
    wait_until(lambda: answers, what="the other switch's command")
    assert answers[0].status == "OK"
    assert synced_before == [False], "the reconciliation ended before the command: too little work to test"
    assert waits, "the reconciliation never met the command"
    assert steps and not any(steps), "a background slice started during the command"
    assert steps_when_answered == [0], "the reconciliation went on before the answer went out"
    wait_until(lambda: reconciler.synced, timeout=30, what="the reconciliation")
    assert sorted(f.identity for f in fake.flows()) == held and len(held) > 8000


def test_a_command_queued_behind_its_own_switchs_reconciliation_does_not_slow_it(host, monkeypatch):
    """Only commands being carried out count: one waiting for the reconciliation of its
    own switch must not make that reconciliation step aside for it."""
    monkeypatch.setattr(pacing, "STEP_ASIDE", 50)  # a wait would be seen; a bug must not take minutes
    fake = host.switch()
    _middleboxes_of_250_filters(host, 8)
    steps, waits = _watch_background(monkeypatch)
    fake.tables.flows.clear()
    host.service.switch_disconnected(fake.datapath)
    fake.reconnect()
    wait_until(lambda: steps, what="the reconciliation under way")
    answers = host.run(f"A 52:34:56:01:00:00 I 4 s 10.77.0.1", port=10)
    assert answers[0].status == "OK" and host.service.reconcilers[DPID].synced
    assert steps and not waits


@pytest.mark.parametrize("grace", [0.0, 30.0], ids=["past-the-grace", "within-the-grace"])
def test_a_command_waiting_on_a_hung_switch_holds_no_reconciliation_back(host, monkeypatch, grace):
    """A command whose switch has not answered within ANSWER_GRACE (a hung one takes 5 s)
    no longer counts: another switch's reconciliation does not step aside for it.  Within
    the grace it does (the switch may need the CPU to apply the command)."""
    monkeypatch.setattr(pacing, "STEP_ASIDE", 2)
    monkeypatch.setattr(pacing, "ANSWER_GRACE", grace)
    fake, hung = host.switch(), host.switch(OTHER)
    _middleboxes_of_250_filters(host, 8)
    host.ok(f"R F {MAC2} 10.8.0.1", dpid=OTHER)
    hung.hold()
    stuck = []
    hub.spawn(lambda: stuck.extend(host.run(f"A {MAC2} I 4 s 10.77.0.1", dpid=OTHER)))
    wait_until(lambda: host.service.reconcilers[OTHER].current is not None, what="the command under way")
    steps, waits = _watch_background(monkeypatch)
    fake.tables.flows.clear()
    host.service.switch_disconnected(fake.datapath)
    fake.reconnect()
    wait_until(lambda: host.service.reconcilers[DPID].synced, timeout=10, what="the reconciliation")
    assert not stuck, "the command was to wait on its switch all along"
    assert steps and bool(waits) == (grace > 0)
    hung.release()
    wait_until(lambda: stuck, timeout=10, what="the held switch's answer")


def test_a_disconnection_during_the_comparison_of_a_sync_is_not_a_crash(host, monkeypatch, caplog):
    """A sync compares in paced steps: a disconnection handled in a pause ends it as the
    switch's going (retried at the next connection), not as a crash of the job."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.9.0.1", *[f"A {MAC} I 4 s 10.0.{n // 250}.{n % 250 + 1}" for n in range(50)])
    real, armed = reconciler_module.reconcile, {"on": False}

    def reconcile(desired, flows, groups, managed, same, same_group, pause):
        def disconnecting():
            if armed["on"]:
                armed["on"] = False
                host.service.switch_disconnected(fake.datapath)
            pause()
        return real(desired, flows, groups, managed, same, same_group, disconnecting)

    monkeypatch.setattr(reconciler_module, "reconcile", reconcile)
    host.service.switch_disconnected(fake.datapath)
    armed["on"] = True
    reconciler = host.service.reconcilers[DPID]
    with caplog.at_level(logging.ERROR, logger="mbvisor.controller"):
        fake.reconnect()
        wait_until(lambda: not armed["on"], what="the disconnection during the comparison")
        wait_until(lambda: reconciler.current is None and not reconciler.jobs, what="the sync over")
    assert not [r for r in caplog.records if "job failed" in r.getMessage()], caplog.text[-600:]
    assert not reconciler.synced
    fake.reconnect()
    wait_until(lambda: reconciler.synced, what="the next connection's sync")


def test_a_command_for_a_stopped_controller_is_answered_at_once_and_not_counted(tmp_path):
    made = Host(tmp_path)
    made.switch()
    made.close()
    answers = []
    hub.spawn(lambda: answers.extend(made.run(f"R F {MAC} 10.0.0.5")))
    wait_until(lambda: answers, what="the answer (not after the hour a job may take)")
    assert answers[0].status == "UNAVAILABLE"
    assert pacing.COMMANDS.running == 0


# --- counters and views ---------------------------------------------------------------------

def test_handled_packets_count_each_packet_once_at_the_table_0_decision(host):
    fake = host.switch()
    fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16", f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
    for _ in range(3):
        fake.trace(CLIENT_PORT, count=True, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.66.1.1", ipv4_dst="10.0.0.5")
    for _ in range(2):  # redirected: passes tables 0, 1 and 2, counted once
        fake.trace(CLIENT_PORT, count=True, ct_state=0x21, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.0.0.1",
                   ipv4_dst="10.0.0.5")
    fake.trace(BACKEND_PORT, count=True, ct_state=0x2A, eth_type=0x0800, ipv4_src="10.0.0.11",
               ipv4_dst="10.0.0.1")  # a reply: not work taken from the middlebox
    assert host.service.handled_packets(DPID, MAC)["packets"] == 5
    host.service.refresh_metrics()
    assert f'mbvisor_packets_handled_in_switch{{dpid="{DPID:016x}",mac="{MAC}"}} 5.0' in \
        host.service.metrics.exposition().decode()


def test_series_and_views_follow_middleboxes_and_switches(host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    host.service.refresh_metrics()
    assert MAC in host.service.metrics.exposition().decode()
    host.ok(f"X {MAC}")
    host.service.refresh_metrics()
    exposition = host.service.metrics.exposition().decode()
    assert MAC not in exposition and "mbvisor_flows_installed{" in exposition
    host.service.switch_disconnected(fake.datapath)
    view = host.service.switch_views()[0]
    assert view["connected"] is False and view["flows"] is None
    assert "mbvisor_flows_installed{" not in host.service.metrics.exposition().decode()
    with pytest.raises(SwitchUnavailable):
        host.service.flow_statistics(DPID, cookie_of(MAC))
    with pytest.raises(SwitchUnavailable):
        host.service.handled_packets(DPID, MAC)


def test_a_moved_backend_is_followed(host):
    fake = host.switch()
    fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
    host.ok(f"R F {MAC} 10.0.0.5", f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
    host.service.arp_reply(DPID, "10.0.0.11", "02:00:00:00:00:11", 4)
    wait_until(lambda: any(("output", 4) == a for f in fake.flows(REDIRECT_TABLE) for a in [("output", p) for p in
                                                                                _outputs(f)]),
               what="the redirect towards the new port")


def _outputs(entry) -> list[int]:
    return [a.port for a in entry.actions() if type(a).__name__ == "OFPActionOutput"]


# --- found by an adversarial review: each a promise of docs/architecture.md ------------------

def keyed(seq: int, text: str, dpid: int = DPID) -> CommandRequest:
    return CommandRequest(dpid, MB_PORT, text, "vm/eth0", 1, seq)


# 1. Idempotency inside one batch across a failed install ------------------------------

def test_a_duplicate_key_in_a_failed_batch_is_not_answered_ok(host):
    """Failure contract: applied and OK, or not applied and said why.  The second copy of
    a key mirrors the first copy's final answer, not its planned one."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    fake.fail_next_commit()
    command = f"A {MAC} I 4 s 10.66.0.0/16"
    answers = host.service.submit([keyed(1, command), keyed(1, command)])
    assert filter_flows(fake) == [] and host.service.state.find(DPID, MAC).filters == frozenset()
    assert answers[0].status == "REJECTED"
    assert answers[1].status != "OK", f"nothing was applied, yet the duplicate says {answers[1]}"


def test_an_answer_that_depends_on_a_failed_change_is_not_ok_and_not_stored(host):
    """'filter already present' decided against the batch's own failed add is not an OK,
    and it is not stored for replay."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    fake.fail_next_commit()
    command = f"A {MAC} I 4 s 10.66.0.0/16"
    answers = host.service.submit([keyed(1, command), keyed(2, command)])
    assert filter_flows(fake) == []
    stored = Store(host.database).answer(("vm/eth0", 1, 2))
    retried = host.service.submit([keyed(2, command)])[0]
    assert (answers[1].status, stored and stored[1].status, retried.status, len(filter_flows(fake))) != \
        ("OK", "OK", "OK", 0), f"answered {answers[1]}, stored {stored}, retry {retried}; no filter on the switch"


# 2. Idempotency across switches ----------------------------------------------------------

def test_a_key_is_applied_once_even_when_two_switches_see_it(host):
    """'a duplicate is answered with the first answer and applied once': a key in flight
    on one switch is not applied on another meanwhile (the store is written only after
    the switch confirmed)."""
    slow = host.switch(DPID)
    host.switch(OTHER)
    host.ok(f"R F {MAC} 10.0.0.5", dpid=DPID)
    host.ok(f"R F {MAC} 10.0.0.7", dpid=OTHER)
    slow.hold()  # a switch that takes its time to confirm (a big bundle, a busy vswitchd)
    answers = []
    hub.spawn(lambda: answers.extend(host.service.submit([keyed(9, f"A {MAC} I 4 s 10.66.0.0/16", DPID)])))
    wait_until(lambda: host.service.reconcilers[DPID].link.waiters, what="the first switch's install")
    answers.extend(host.service.submit([keyed(9, f"A {MAC} I 4 s 10.77.0.0/16", OTHER)]))
    slow.release()
    wait_until(lambda: len(answers) == 2, what="both answers")
    applied = [a for a in answers if a.status == "OK" and not a.replayed]
    assert len(applied) <= 1, f"one key, two different commands, both applied: {answers}"


# 3. An OpenFlow error for a message outside a bundle --------------------------------------

def test_an_error_reply_to_a_stats_request_is_reported_at_once(host):
    """A refused request is answered by its error alone: the caller hears 'refused' at
    once, not 'did not answer' after the deadline."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    fake.refuse(lambda m: type(m).__name__ == "OFPFlowStatsRequest")
    started = time.monotonic()
    with pytest.raises(SwitchUnavailable) as raised:
        host.service.flow_statistics(DPID, cookie_of(MAC))
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 and "refused" in str(raised.value), f"{elapsed:.2f} s: {raised.value}"


# 4. One refused flow of one tenant takes the whole switch, with no way out ----------------

def test_one_refused_middlebox_keeps_no_other_traffic_off_a_reconnected_switch(host, fast_timeouts):
    """If the switch refuses one flow of one middlebox after a restart (table full, a flow
    a newer OVS rejects ...), the reconciliation goes on in parts: the base flows (without
    which a fail-mode=secure bridge drops everything) and every other middlebox are
    installed, and the operator can still remove the offending middlebox."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    fake.clear_flows()  # ovs-vswitchd restarted: bridges back, flows gone
    fake.refuse(lambda m: type(m).__name__ == "OFPFlowMod" and "10.66.0.0" in str(m.match), times=None)
    host.service.switch_disconnected(fake.datapath)
    fake.reconnect()
    reconciler = host.service.reconcilers[DPID]
    wait_until(lambda: reconciler.last_error is not None, what="the refused reconciliation")
    unrelated = fake.trace(CLIENT_PORT, eth_dst="52:34:56:00:99:99", eth_type=0x0800, ipv4_src="10.1.1.1")
    removal = host.service.delete_middlebox(DPID, MAC)
    assert unrelated.verdict == "normal" and removal.status == "OK", \
        f"unrelated traffic: {unrelated.verdict}; operator DELETE: {removal.status} {removal.text}"


# 5. Generation bookkeeping ------------------------------------------------------------------

def after_retirement(host) -> None:
    """Wait until every job queued so far has ended: a job queued now runs after them."""
    assert host.service.reconcilers[DPID].submit(Job("refresh")).done.wait(timeout=5)


def test_a_retired_port_confirmed_by_the_switch_is_an_applied_generation(host):
    """rest.md: applied_generation is the last generation the switch confirmed, also after
    a port's retirement."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    fake.remove_port(MB_PORT)
    wait_until(lambda: not [f for f in fake.flows() if f.cookie == cookie_of(MAC)], what="flows removed")
    after_retirement(host)
    view = host.service.switch_views()[0]
    assert view["generation"] == view["applied_generation"], view


# 6. Bounded resources: reconcilers for switches that never existed -------------------------

def test_commands_for_unknown_switches_do_not_grow_reconcilers_without_bound(host):
    """Any dpid can be named in a request: only switches that connected get a reconciler
    (a green thread kept for good)."""
    host.service.submit([CommandRequest(0x1000 + n, MB_PORT, f"R F {MAC} 10.0.0.5") for n in range(300)])
    assert len(host.service.reconcilers) < 300, f"{len(host.service.reconcilers)} reconcilers (and threads)"


# 7. Bounded answers: 'none older than a day' -------------------------------------------------

def test_a_quiet_channels_answers_do_not_outlive_a_day(tmp_path, monkeypatch):
    """architecture.md: 'none older than a day', also for a channel that went quiet (its
    own pruning never comes): the controller removes every old answer at start and every
    PRUNE_INTERVAL."""
    store = Store(tmp_path / "controller.sqlite")
    monkeypatch.setattr(store_module.time, "time", lambda: 1_000_000.0)  # stored long ago
    store.save(State(), State(), [(("gone-vm", 1, n), Answer("OK", "x"), f"R F {MAC} 10.0.0.5") for n in range(100)])
    monkeypatch.undo()
    assert store.answer_count("gone-vm") == 100
    service = Controller(Settings(database=tmp_path / "controller.sqlite", audit_interval=0))
    try:
        assert service.store.answer_count("gone-vm") == 0
        service.store.save(State(), State(), [(("vm", 1, 1), Answer("OK", "x"), "X")])
        service._prune_answers()  # the periodic run keeps what is young
        assert service.store.answer_count("vm") == 1
    finally:
        service.close()


def test_a_port_deleted_while_its_registration_is_in_flight_is_still_retired(host):
    """A registration being installed when its port goes is retired after it: a VM that
    later gets that port never inherits its offloads."""
    fake = host.switch()
    fake.hold()
    answers = []
    hub.spawn(lambda: answers.extend(host.run(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")))
    wait_until(lambda: host.service.reconcilers[DPID].link.waiters, what="the registration's install")
    fake.release()
    fake.remove_port(MB_PORT)  # the port-status is delivered before the bundle is confirmed
    wait_until(lambda: answers, what="the registration's answer")
    fake.settle()
    after_retirement(host)
    assert host.service.state.find(DPID, MAC) is None, f"{answers[0].status}: middlebox kept on deleted port {MB_PORT}"


def test_errors_nobody_waits_for_are_logged_at_a_bounded_rate(host, caplog):
    """A switch answering errors to unconfirmed messages (ARP probes) must not flood the log."""
    fake = host.switch()
    fake.refuse(lambda m: type(m).__name__ == "OFPPacketOut", times=None)
    link = host.service.reconcilers[DPID].link
    with caplog.at_level(logging.WARNING, logger="mbvisor.controller"):
        for _ in range(50):
            link.send_unconfirmed(host.service.arp_probe(link.datapath, "10.0.0.9"))
        fake.settle()
    lines = [r for r in caplog.records if "nobody waiting" in r.getMessage()]
    assert len(lines) == 1


def test_a_bundle_abandoned_halfway_is_discarded_and_changes_nothing(host, monkeypatch):
    """Middleboxes are compiled and written one after the other; when a later one cannot
    be installed (a backend nobody answers ARP for), what was already written of the
    bundle is discarded at once: the switch holds exactly what it held."""
    monkeypatch.setattr(switchlink, "CHUNK_BYTES", 1)  # every message is written as soon as it is made
    fake = host.switch()
    before = sorted(f.identity for f in fake.flows())
    answers = host.run(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16",
                       f"R F {MAC2} 10.0.0.6", f"R L {MAC2} 10.0.0.6 0 * 10.0.0.77")
    assert [a.code for a in answers] == ["backend-unresolved"] * 4
    opened = [m for m in sent(fake, "ONFBundleAddMsg")]
    assert any(MAC in str(m.message) for m in opened), "the first middlebox's flows were on their way"
    assert any(m.type == fake.datapath.ofproto.ONF_BCT_DISCARD_REQUEST for m in sent(fake, "ONFBundleCtrlMsg"))
    fake.settle()
    assert sorted(f.identity for f in fake.flows()) == before
    assert host.service.state.find(DPID, MAC) is None
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")  # the reconciler goes on
    assert len(filter_flows(fake)) == 4


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 2), st.integers(0, 3), st.booleans(),
                          st.booleans()), max_size=40))
def test_the_record_of_installed_flows_is_a_set_of_identities_with_their_actions(steps):
    """It holds what the switch holds: one flow per identity (an add replaces whatever had
    it, whatever its cookie), and a strict delete with another cookie removes nothing.
    Audits compare its count with the switch's.  Flows held in a row are held one by one
    or as one batch (``holds_all``), which may replace its own earlier flows."""
    installed, reference, batch = Installed(), {}, []
    for holding, cookie, table, value, drops, batched in steps:
        flow = Flow(table, 1000, (("ipv4_src", f"10.0.0.{value}"),), () if drops else (("normal",),), cookie)
        identity = (table, flow.match)
        if holding:
            batch.append(flow)
            reference[identity] = flow
            if not batched:
                if len(batch) == 1:
                    installed.holds(flow)
                else:
                    installed.holds_all(batch)
                batch = []
        else:
            installed.holds_all(batch)
            batch = []
            installed.lost(flow)
            if identity in reference and reference[identity].cookie == cookie:
                del reference[identity]
    installed.holds_all(batch)
    assert installed.flow_count() == len(reference)
    assert sorted(installed.all_flows(), key=repr) == sorted(reference.values(), key=repr)
    for cookie in range(3):
        assert sorted(installed.flows_of(cookie), key=repr) == sorted(
            (f for f in reference.values() if f.cookie == cookie), key=repr)


def test_a_record_let_go_of_is_empty_and_paused_every_step():
    """A restarted switch's old record (25,000 flows) is emptied in steps, with a pause
    between them (none freed all at once), and holds nothing afterwards."""
    installed = Installed()
    installed.holds_all([Flow(table, 1000, (("ipv4_src", f"{cookie}.{table}.{n // 250}.{n % 250}"),), (), cookie)
                         for table in (1, 2) for cookie in (7, 8) for n in range(5 * stepping.STEP)])
    installed.holds_group(3, b"bucket")
    assert installed.flow_count() == 20 * stepping.STEP
    pauses = []
    installed.let_go(lambda: pauses.append(sum(len(by_match) for by_match in installed.flows.values())))
    assert installed.flow_count() == 0 and list(installed.all_flows()) == [] and installed.flows_of(7) == []
    assert not installed.groups and not installed.by_cookie and not installed.shared
    held = [count for count in pauses if count]
    assert len(pauses) >= 20 and all(a - b <= stepping.STEP for a, b in zip([20 * stepping.STEP] + held, held))


def _record_contents(installed: Installed):
    return (installed.flow_count(), sorted(installed.all_flows(), key=repr), dict(installed.groups),
            {cookie: {place: set(matches) for place, matches in by_place.items()}
             for cookie, by_place in installed.by_cookie.items()})


_recorded_change = st.tuples(st.sampled_from(["hold", "lose", "group", "ungroup"]), st.integers(0, 2),
                             st.integers(0, 2), st.integers(0, 3), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(_recorded_change, max_size=20), st.lists(_recorded_change, max_size=30))
def test_changes_recorded_while_a_bundle_is_applied_are_taken_back_whole_when_it_is_refused(earlier, tentative):
    """The reconciler records a bundle's flows while the switch applies it; if the switch
    refuses the bundle, ``undo`` puts back exactly what was known before (flows, whose
    cookie holds them, groups, the count), whatever the changes replaced or deleted."""
    def apply(installed, changes, undo=None):
        for kind, cookie, table, value, drops in changes:
            flow = Flow(table, 1000, (("ipv4_src", f"10.0.0.{value}"),), () if drops else (("normal",),), cookie)
            if kind == "hold":
                installed.holds_all([flow], undo)
            elif kind == "lose":
                installed.lost(flow, undo)
            else:
                installed.holds_group(value, b"buckets%d" % cookie if kind == "group" else None, undo)

    installed = Installed()
    apply(installed, earlier)
    before = _record_contents(installed)
    undo: list = []
    apply(installed, tentative, undo)
    installed.undo(undo)
    assert _record_contents(installed) == before
    assert undo == []


def test_a_batch_is_held_to_the_flow_budget_command_by_command(tmp_path):
    """The budget of switch entries is counted as a job adds filters, without recounting
    them, and it holds across jobs, refusals included."""
    one = filter_cost(parse_command(f"A {MAC} I 4 s 10.0.0.1").filter, frozenset({"10.0.0.5"}))
    made = Host(tmp_path, limits=Limits(flows=10 * one))
    try:
        made.switch()
        made.ok(f"R F {MAC} 10.0.0.5")
        answers = made.run(*(f"A {MAC} I 4 s 10.1.0.{n}" for n in range(15)))
        assert [a.code for a in answers] == ["ok"] * 10 + ["limit"] * 5
        assert made.run(f"A {MAC} I 4 s 10.2.0.1")[0].code == "limit"
        made.ok(f"D {MAC} I 4 s 10.1.0.3", f"A {MAC} I 4 s 10.2.0.1")
        assert made.run(f"A {MAC} I 4 s 10.2.0.2")[0].code == "limit"
    finally:
        made.close()


def test_a_job_counts_its_filters_again_when_it_gives_the_middlebox_another_address(tmp_path):
    """A balancer address registered between two adds of one job is one more group form
    for each filter: the second add is counted with it, not with the first add's count."""
    one_address = filter_cost(parse_command(f"A {MAC} I 4 s 10.0.0.1").filter, frozenset({"10.0.0.5"}))
    made = Host(tmp_path, limits=Limits(flows=2 * one_address))
    try:
        fake = made.switch()
        fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
        made.ok(f"R F {MAC} 10.0.0.5")
        answers = made.run(f"A {MAC} I 4 s 10.1.0.1", f"R L {MAC} 10.0.0.6 0 * 10.0.0.11", f"A {MAC} I 4 s 10.1.0.2")
        assert [a.code for a in answers] == ["ok", "ok", "limit"]
    finally:
        made.close()


def test_jobs_of_two_switches_planned_at_once_never_give_the_same_zone(host):
    """Planning yields to the event loop, so another switch's job can plan (and commit)
    meanwhile; every userspace bridge shares one conntrack table, so the zones they give
    new middleboxes must still differ, and a job that ends gives its unused zones back."""
    service = host.service
    first = service.plan(DPID, [CommandRequest(DPID, MB_PORT, f"R F {MAC} 10.0.0.5")])
    second = service.plan(OTHER, [CommandRequest(OTHER, MB_PORT, f"R F {MAC2} 10.0.0.6")])
    zone_of = lambda plan, dpid, mac: plan.after.find(dpid, mac).zone  # noqa: E731
    assert zone_of(first, DPID, MAC) != zone_of(second, OTHER, MAC2)
    service.release(first)  # abandoned: its zone is free again, the other's is not
    third = service.plan(DPID, [CommandRequest(DPID, MB_PORT, f"R F {MAC} 10.0.0.5")])
    assert zone_of(third, DPID, MAC) == zone_of(first, DPID, MAC)
    service.commit(OTHER, second)
    service.release(second)
    fourth = service.plan(DPID, [CommandRequest(DPID, MB_PORT, f"R F {MAC2} 10.0.0.7")])
    assert zone_of(fourth, DPID, MAC2) not in {zone_of(second, OTHER, MAC2), zone_of(third, DPID, MAC)}
    for plan in (third, fourth):
        service.release(plan)


def test_a_balancer_cancelled_and_registered_again_in_one_job_leaves_no_group_behind(host):
    """Its new registration may get another conntrack zone; the groups of the old one go."""
    fake = host.switch()
    fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
    fake.add_host("10.0.0.12", "02:00:00:00:00:12", 4)
    host.ok(f"R F {MAC2} 10.0.0.6", port=4)
    host.ok(f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
    host.ok(f"X {MAC2}", port=4)  # a lower zone is free now
    host.ok(f"X {MAC}", f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
    middlebox = host.service.state.find(DPID, MAC)
    fake.settle()
    assert set(fake.groups) == set(flows_module.owned_groups(middlebox)) & set(fake.groups) and fake.groups


def _port_meter(message) -> bool:
    return type(message).__name__ == "MeterMod" and message.meter_id >= PORT_METERS


def test_a_port_meter_refused_at_reconnection_keeps_no_other_tenant_off_the_switch(host, fast_timeouts):
    """The reconciliation's bundle is given up when a meter is refused; it is then sent
    middlebox by middlebox, and only the one needing that meter stays out."""
    fake = host.switch()
    fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
    host.ok(f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
    host.ok(f"R F {MAC2} 10.0.0.6", f"A {MAC2} I 4 s 10.66.0.0/16", port=4)
    fake.tables.meters.clear()
    fake.clear_flows()  # ovs-vswitchd restarted ...
    fake.refuse(_port_meter, times=None)  # ... and its meter table is full now
    host.service.switch_disconnected(fake.datapath)
    fake.reconnect()
    reconciler = host.service.reconcilers[DPID]
    wait_until(lambda: reconciler.synced, timeout=3, what="a reconciliation that ends")
    assert MAC in reconciler.last_error and [f for f in fake.flows() if f.cookie == cookie_of(MAC2)]
    assert host.run(f"A {MAC2} I 4 s 10.67.0.0/16", port=4)[0].status == "OK"


def test_a_port_meter_refused_during_a_convergence_still_removes_what_annotations_no_longer_vouch_for(
        tmp_path, fast_timeouts):
    """Annotations win over history (security.md): the convergence that takes a removed
    VM's flows away also needs a meter the switch refuses; it is retried middlebox by
    middlebox, and the removed VM's flows go."""
    made = Host(tmp_path, trust=TrustMode.ANNOTATIONS)
    try:
        fake = made.switch()
        mb = PortIdentity(2, MAC, "red", "mb", ("10.0.0.5",), "mb-eth0")
        lb = PortIdentity(4, MAC2, "blue", "lb", ("10.0.0.6",), "lb-eth0")
        web = PortIdentity(3, "02:00:00:00:00:12", "blue", "web", ("10.0.0.12",), "web-eth0")
        made.service.set_inventory(DPID, [mb, lb, web])
        made.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
        made.ok(f"R L {MAC2} 10.0.0.6 0 * 10.0.0.12", port=4)
        fake.refuse(_port_meter, times=None)
        moved = PortIdentity(1, web.mac, "blue", "web", web.ips, web.interface)
        made.service.set_inventory(DPID, [lb, moved])  # the middlebox's VM is gone; the backend moved
        wait_until(lambda: not [f for f in fake.flows() if f.cookie == cookie_of(MAC)], timeout=5,
                   what="the flows of a middlebox no annotation vouches for removed")
        wait_until(lambda: made.service.reconcilers[DPID].synced, timeout=5, what="the retried reconciliation")
    finally:
        made.close()


def test_a_bug_while_planning_gives_the_jobs_keys_and_zones_back(host, monkeypatch):
    host.switch()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Controller, "_flows_spent", broken)  # both ways an add is decided count flows
    answers = host.service.submit([CommandRequest(DPID, MB_PORT, f"R F {MAC} 10.0.0.5", "vm", 1, 1),
                                   CommandRequest(DPID, MB_PORT, f"A {MAC} I 4 s 10.66.0.0/16", "vm", 1, 2)])
    assert {a.status for a in answers} == {"INTERNAL"}
    assert not host.service.in_flight and not host.service.zones_in_flight
    monkeypatch.undo()
    host.ok(f"R F {MAC} 10.0.0.5", key=("vm", 1, 1))  # the key is usable again


def test_the_flow_budget_keeps_no_filter_set_of_a_middlebox_that_is_gone(host):
    """The running counts hold a reference to the filter set they counted: a cancelled or
    retired middlebox's must not stay alive with them."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", *(f"A {MAC} I 4 s 10.{n // 256}.{n % 256}.0/24" for n in range(50)))
    assert host.service.flow_costs[(DPID, MAC)][0] is host.service.state.find(DPID, MAC).filters
    host.ok(f"X {MAC}")
    assert (DPID, MAC) not in host.service.flow_costs
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    fake.remove_port(MB_PORT)
    wait_until(lambda: host.service.state.find(DPID, MAC) is None, what="the retirement")
    assert (DPID, MAC) not in host.service.flow_costs


def test_two_switches_registering_while_one_waits_for_its_switch_get_different_zones(host):
    slow = host.switch(DPID)
    host.switch(OTHER)
    slow.hold()  # the first switch takes its time to confirm its bundle
    answers = []
    hub.spawn(lambda: answers.extend(host.run(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16", dpid=DPID)))
    wait_until(lambda: host.service.reconcilers[DPID].link.waiters, what="the first install")
    host.ok(f"R F {MAC2} 10.0.0.6", dpid=OTHER)
    slow.release()
    wait_until(lambda: answers, what="the first answer")
    assert [a.status for a in answers] == ["OK", "OK"]
    assert len({mb.zone for mb in host.service.state.middleboxes}) == 2
    assert len({mb.zone for mb in Store(host.database).load(Limits()).middleboxes}) == 2


def test_a_switch_that_disconnects_halfway_through_a_streamed_bundle_holds_none_of_it(host, monkeypatch):
    """The bundle was being written while compiled; the commands are UNAVAILABLE, nothing
    changed in the state or on the switch, and no waiter is left behind."""
    monkeypatch.setattr(switchlink, "CHUNK_BYTES", 1)
    monkeypatch.setattr(pacing, "SLICE", 0.0)  # yield after every message
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    before = sorted(f.identity for f in fake.flows())
    answers = []
    hub.spawn(lambda: answers.extend(host.run(*(f"A {MAC} I 4 s 10.{n}.0.0/16" for n in range(200)))))
    wait_until(lambda: len(sent(fake, "ONFBundleAddMsg")) > 50, what="the bundle on its way")
    fake.disconnect()
    host.service.switch_disconnected(fake.datapath)
    wait_until(lambda: answers, timeout=3, what="the answers")
    assert {a.status for a in answers} == {"UNAVAILABLE"}
    assert host.service.state.find(DPID, MAC).filters == frozenset()
    fake.settle()
    assert sorted(f.identity for f in fake.flows()) == before
    fake.reconnect()
    wait_until(lambda: host.service.reconcilers[DPID].synced, what="the reconciliation")
    host.ok(f"A {MAC} I 4 s 10.66.0.0/16")
    assert len(filter_flows(fake)) == 4
    assert not host.service.reconcilers[DPID].link.waiters


def test_a_bundle_refused_for_one_guest_of_a_batch_is_only_that_guests_answer(host):
    """The agent batches several channels' commands in one request: when the switch
    refuses the bundle, each channel is tried alone, so only the guest whose flows the
    switch refuses gets (and stores) the refusal."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    host.ok(f"R F {MAC2} 10.0.0.6", port=4)
    fake.refuse(lambda m: type(m).__name__ == "OFPFlowMod" and "10.66.0.0" in str(m.match), times=None)
    answers = host.service.submit([CommandRequest(DPID, MB_PORT, f"A {MAC} I 4 s 10.66.0.0/16", "vm-a", 1, 1),
                                   CommandRequest(DPID, 4, f"A {MAC2} I 4 s 10.77.0.0/16", "vm-b", 1, 1),
                                   CommandRequest(DPID, 4, f"A {MAC2} I 4 s 10.78.0.0/16", "vm-b", 1, 2)])
    assert [(a.status, a.code) for a in answers] == [("REJECTED", "switch-error"), ("OK", "ok"), ("OK", "ok")]
    assert len(host.service.state.find(DPID, MAC2).filters) == 2 and not host.service.state.find(DPID, MAC).filters
    assert Store(host.database).answer(("vm-b", 1, 1))[1].status == "OK"
    assert Store(host.database).answer(("vm-a", 1, 1))[1].code == "switch-error"


class OFPFlowStatsReply:
    """A part of a multipart reply, as SwitchLink.receive routes it (by xid and name)."""

    def __init__(self, datapath, xid: int, body: list, more: bool):
        self.datapath, self.xid, self.body = datapath, xid, body
        self.flags = datapath.ofproto.OFPMPF_REPLY_MORE if more else 0


class _PacedSwitch:
    """A switch that sends one part of its multipart reply per timeout period of the
    link's wait (a slow switch: 200,000 flows take os-ken half a minute to list), and falls
    silent after ``stop_after`` parts: it stands in for the waiter's event and the link's
    clock, so each ``wait(timeout)`` is one whole period on that clock, and no time passes
    in the test."""

    def __init__(self, link, parts: int, stop_after: int | None):
        self.link, self.parts = link, parts
        self.sent, self.stop_after = 0, parts if stop_after is None else stop_after
        self.flag = False
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def Event(self):  # noqa: N802 (hub.Event's name, which this replaces for the link)
        return self

    def set(self) -> None:
        self.flag = True

    def wait(self, timeout=None) -> bool:
        self.now += timeout
        if not self.flag and self.sent < self.stop_after:
            xid = next(xid for xid, waiter in self.link.waiters.items() if waiter.done is self)
            more = self.sent < self.parts - 1
            self.link.receive(OFPFlowStatsReply(self.link.datapath, xid, [self.sent], more=more))
            self.sent += 1
        return self.flag


def _listing(monkeypatch, parts: int, stop_after: int | None = None):
    """The outcome of listing the flows of a switch that takes one timeout period per part."""
    fake = FakeSwitch(DPID)
    try:
        link = switchlink.SwitchLink(fake.datapath)
        fake.hold()  # the link's request is sent; the answers come from the paced "switch"
        paced = _PacedSwitch(link, parts, stop_after)
        monkeypatch.setattr(switchlink, "hub", paced)
        monkeypatch.setattr(switchlink, "time", paced)
        return _outcome(lambda: link.flow_stats(0, 0))
    finally:
        fake.close()


def _outcome(call):
    try:
        return call()
    except switchlink.SwitchUnreachable as error:
        return error


def test_a_long_listing_may_take_as_long_as_its_parts_keep_coming(monkeypatch):
    """Each part must come within the timeout, not the whole listing: thirty periods with
    a part each is an answer; silence for one period after three parts is not."""
    assert _listing(monkeypatch, parts=30) == list(range(30))
    silent = _listing(monkeypatch, parts=30, stop_after=3)
    assert isinstance(silent, switchlink.SwitchUnreachable) and "did not answer" in str(silent)


class OFPErrorMsg:
    def __init__(self, datapath, xid: int):
        self.datapath, self.xid = datapath, xid
        self.type, self.code = datapath.ofproto.OFPET_FLOW_MOD_FAILED, datapath.ofproto.OFPFMFC_UNKNOWN


def test_a_bundle_refused_while_it_streams_is_discarded_not_committed(monkeypatch):
    """OVS checks each message as it is added: once it refused one, the rest of the
    bundle is discarded instead of committed (whose failure nobody would wait for)."""
    monkeypatch.setattr(switchlink, "CHUNK_BYTES", 1)
    fake = FakeSwitch(DPID)
    fake.hold()  # what the link sends is recorded; the test plays the switch's answers
    link = switchlink.SwitchLink(fake.datapath)
    flow = Flow(1, 3000, (("eth_dst", MAC),), (), 0x4D42 << 48)

    def messages(frame):
        parser = fake.datapath.ofproto_parser
        yield frame.flow_mods(parser, [flow], "add", lambda actions: b"")
        link.receive(OFPErrorMsg(fake.datapath, next(iter(link.waiters))))  # the switch refuses the first
        yield frame.flow_mods(parser, [flow], "delete", lambda actions: b"")

    errors = link.commit(messages)
    controls = [m.type for m in fake.received if type(m).__name__ == "ONFBundleCtrlMsg"]
    assert errors and "OpenFlow error" in errors[0]
    assert controls == [fake.datapath.ofproto.ONF_BCT_OPEN_REQUEST, fake.datapath.ofproto.ONF_BCT_DISCARD_REQUEST]
    assert not link.waiters
    fake.close()


@pytest.mark.parametrize("bound", ["LISTING_CEILING", "MAX_LISTED"])
def test_a_switch_that_keeps_sending_parts_of_a_listing_is_given_up_on(monkeypatch, bound):
    """Every wait is bounded: a listing has 5 s per part, but no more than LISTING_CEILING
    in all and MAX_LISTED entries (here 12 s and 5 entries; the switch sends 30 parts, one
    per 5 s period)."""
    monkeypatch.setattr(switchlink, bound, 12.0 if bound == "LISTING_CEILING" else 5)
    outcome = _listing(monkeypatch, parts=30)
    assert isinstance(outcome, switchlink.SwitchUnreachable) and "still answering" in str(outcome)


def test_a_bug_in_a_later_channels_rerun_does_not_unsay_an_earlier_channels_commit(host, monkeypatch):
    """Channel vm-a's re-run commits (state and store say OK); a bug while planning
    vm-b's re-run costs vm-b's answer only, never vm-a's, which was applied."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    host.ok(f"R F {MAC2} 10.0.0.6", port=4)
    fake.refuse(lambda m: type(m).__name__ == "OFPFlowMod" and "10.77.0.0" in str(m.match), times=1)
    plan, calls = host.service.plan, []

    def planning(dpid, requests):
        calls.append(len(requests))
        if len(calls) == 3:  # combined, vm-a alone, vm-b alone
            raise RuntimeError("a bug while planning")
        return plan(dpid, requests)

    monkeypatch.setattr(host.service, "plan", planning)
    answers = host.service.submit([CommandRequest(DPID, MB_PORT, f"A {MAC} I 4 s 10.66.0.0/16", "vm-a", 1, 1),
                                   CommandRequest(DPID, 4, f"A {MAC2} I 4 s 10.77.0.0/16", "vm-b", 1, 1)])
    assert host.service.state.find(DPID, MAC).filters  # vm-a's command was applied ...
    assert Store(host.database).answer(("vm-a", 1, 1))[1].status == "OK"  # ... and stored as OK
    assert answers[0].status == "OK", f"vm-a is told: {answers[0].status} {answers[0].text!r}"
    assert answers[1].status == "INTERNAL"


def test_a_filter_added_to_a_large_middlebox_sends_only_its_own_flows(host, monkeypatch):
    """Incremental compilation: one IP filter more for a middlebox of 300 costs the
    bundle its own two flows, not 600 compiled and compared; a removal (or a port filter)
    compiles the middlebox whole; either way the switch ends up with exactly the
    filters' flows."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", *[f"A {MAC} I 4 s 10.66.{i // 250}.{i % 250 + 1}" for i in range(300)])
    whole = []
    monkeypatch.setattr(reconciler_module, "compile_middlebox",
                        lambda *a: whole.append(a[0].mac) or flows_module.compile_middlebox(*a))
    before = len(sent(fake, "ONFBundleAddMsg"))
    host.ok(f"A {MAC} I 4 s 10.99.0.1")
    added = sent(fake, "ONFBundleAddMsg")[before:]
    assert len(added) == 2 and all("10.99.0.1" in str(m.message) for m in added)
    assert whole == []
    host.ok(f"D {MAC} I 4 s 10.66.0.1", f"A {MAC} T 9 d 80 p tcp")
    assert whole == [MAC]
    mb = host.service.state.find(DPID, MAC)
    expected = [f for f in compile_filters(mb, frozenset({"10.0.0.5"})) if (f.table, f.priority) == (OFFLOAD_TABLE, FILTER)]
    assert len(filter_flows(fake)) == len(expected)
    for source, verdict in (("10.99.0.1", "drop"), ("10.66.0.2", "drop"), ("10.66.0.1", "normal")):
        assert fake.trace(CLIENT_PORT, eth_dst=MAC, eth_type=0x0800, ipv4_src=source).verdict == verdict, source


# --- only added filters are compiled when the switch is known to hold the rest ----------------


def test_added_flows_are_diffed_in_one_pass_as_the_general_diff_does(host):
    """Each added flow is added unless the middlebox holds its identity (another
    middlebox's flow there is replaced whole), modified where it holds it with other
    actions, left alone where it holds it as it is: what ``_diff`` says of the same flows
    compared with the middlebox's flows at their identities."""
    host.switch()
    reconciler, mine, theirs = host.service.reconcilers[DPID], cookie_of(MAC), cookie_of(MAC2)

    def at(value: int, cookie: int, actions: tuple = ()) -> Flow:
        return Flow(OFFLOAD_TABLE, FILTER, (("ipv4_src", f"10.0.0.{value}"),), actions, cookie)

    reconciler.installed = Installed()
    reconciler.installed.holds_all([at(2, mine), at(3, mine, (("normal",),)), at(4, theirs), at(5, mine, ())])
    added = [at(1, mine), at(2, mine), at(3, mine), at(4, mine), at(5, mine, (("normal",),))]
    held = [f._replace(actions=h[1]) for f in added if (h := reconciler.installed.held_at(f)) is not None and h[0] == mine]
    general = reconciler._diff(SwitchConfig(frozenset(added), frozenset()), held, set())
    one_pass = reconciler._added_changes(added, mine)
    assert sorted(one_pass.add_flows, key=repr) == sorted(general.add_flows, key=repr) == [at(1, mine), at(4, mine)]
    assert sorted(one_pass.modify_flows, key=repr) == sorted(general.modify_flows, key=repr) == [
        at(3, mine), at(5, mine, (("normal",),))]
    assert one_pass.delete_flows == general.delete_flows == ()
    assert (one_pass.add_groups, one_pass.modify_groups, one_pass.delete_groups) == ((), (), ())


def test_a_middlebox_refused_at_reconnection_is_compiled_whole_by_its_next_filter(host, fast_timeouts):
    """Its earlier filter was refused while the switch was reconciled: an added filter
    must not be confirmed OK while that one is still missing (it is sent again)."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    fake.clear_flows()  # ovs-vswitchd restarted
    fake.refuse(lambda m: type(m).__name__ == "OFPFlowMod" and "10.66.0.0" in str(m.match), times=None)
    host.service.switch_disconnected(fake.datapath)
    fake.reconnect()
    reconciler = host.service.reconcilers[DPID]
    wait_until(lambda: reconciler.synced and reconciler.last_error is not None, what="refused in parts")
    fake._refusals.clear()  # the cause went away
    host.ok(f"A {MAC} I 4 s 10.99.0.1")
    for source in ("10.66.1.1", "10.99.0.1"):
        assert fake.trace(CLIENT_PORT, eth_dst=MAC, eth_type=0x0800, ipv4_src=source).verdict == "drop", source


def test_a_change_confirmed_but_not_committed_is_undone_by_the_next_filter(host, monkeypatch):
    """The switch took a filter, then storing the job failed (INTERNAL, nothing applied):
    the next added filter compiles the middlebox whole, which removes the orphan."""
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16")
    real_save, failures = Store.save, []

    def save_failing_once(self, *args, **kwargs):
        if not failures:
            failures.append("disk full")
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Store, "save", save_failing_once)
    assert host.run(f"A {MAC} I 4 s 10.77.0.0/16")[0].status == "INTERNAL"
    host.ok(f"A {MAC} I 4 s 10.99.0.1")
    assert fake.trace(CLIENT_PORT, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.77.1.1").verdict == "normal"
    assert fake.trace(CLIENT_PORT, eth_dst=MAC, eth_type=0x0800, ipv4_src="10.99.0.1").verdict == "drop"


def test_redirects_missing_since_a_restart_come_back_with_the_next_filter(tmp_path, fast_timeouts):
    """Lab mode: a backend silent while a restarted controller reconciled leaves its
    balancer without redirects; the next filter compiles the middlebox whole, so once
    the backend is located they are installed."""
    first = Host(tmp_path)
    fake = first.switch()
    fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
    first.ok(f"R F {MAC} 10.0.0.5", f"R L {MAC} 10.0.0.6 0 * 10.0.0.11", f"A {MAC} I 4 s 10.66.0.0/16")
    first.close()
    host = Host(tmp_path)
    try:
        fake = host.switch()
        redirects = lambda: [f for f in fake.flows(REDIRECT_TABLE) if f.cookie == cookie_of(MAC)]
        assert redirects() == []
        fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
        host.service.reconcilers[DPID].probe_backends()
        wait_until(lambda: "10.0.0.11" in host.service.neighbours_of(DPID), what="the backend located")
        host.ok(f"A {MAC} I 4 s 10.99.0.1")
        assert redirects()
    finally:
        host.close()


def test_bulk_requests_are_read_while_a_command_waits_for_its_switch(host, fast_timeouts, monkeypatch):
    """The bundle's commit is the switch's work: a bulk request's reading (pacing.preparing)
    runs meanwhile, not only after the command was answered."""
    monkeypatch.setattr(pacing, "PREPARE_DEFERRAL", 30.0)
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    fake.hold()  # the job streams its bundle, then waits for the commit's answer
    answered = []
    hub.spawn(lambda: answered.extend(host.run(f"A {MAC} I 4 s 10.66.0.0/16")))
    reconciler = host.service.reconcilers[DPID]
    wait_until(lambda: reconciler.current is not None, what="the command carried out")
    carried = reconciler.current
    with pacing.preparing():
        read_while_it_waits = reconciler.current is carried
    assert carried.kind == "commands" and read_while_it_waits and not answered
    wait_until(lambda: answered, timeout=5, what="the held switch's answer")
    fake.release()
