"""The edges of running beside other apps (controller/placement.py) and of recording a
bundle's flows while the switch applies it (``Installed.undo``): another app's groups,
a disconnection in the middle of the recording, a restart with another placement, the
tables OVS lets an app write.  Found by an adversarial review of both changes."""

from __future__ import annotations

import logging
import subprocess

import pytest

from fakeswitch import parser, wait_until
from mbvisor.controller import reconciler as reconciler_module
from mbvisor.controller.flows import Surroundings, compile_switch
from mbvisor.controller.pacing import Pacer
from mbvisor.controller.pipeline import COOKIE_TAG, COOKIE_TAG_MASK
from mbvisor.controller.placement import Placement
from mbvisor.controller.reconciler import Job
from test_controller_shell import BACKEND_PORT, DPID, MAC, Host, sent

OTHER_COOKIE = 7
NEXT_TABLE = 10


def ours(fake) -> list:
    return [f for f in fake.flows() if f.cookie & COOKIE_TAG_MASK == COOKIE_TAG]


# --- another app's groups (and the flows using them) are never deleted ---------------------

def another_apps_group_and_flow(fake, group_id: int = 1) -> None:
    """Another app (behind mbvisor, in the next table) floods through a group of its own."""
    ofp = fake.datapath.ofproto
    bucket = parser.OFPBucket(weight=0, watch_port=ofp.OFPP_ANY, watch_group=ofp.OFPG_ANY,
                              actions=[parser.OFPActionOutput(ofp.OFPP_NORMAL)])
    fake.tables.group_mod(parser.OFPGroupMod(fake.datapath, ofp.OFPGC_ADD, ofp.OFPGT_ALL, group_id, [bucket]))
    fake.tables.flow_mod(parser.OFPFlowMod(
        fake.datapath, cookie=OTHER_COOKIE, table_id=NEXT_TABLE, priority=5, match=parser.OFPMatch(),
        instructions=[parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, [parser.OFPActionGroup(group_id)])]))


@pytest.mark.parametrize("how", ["audit", "reconnect"])
def test_another_apps_group_and_the_flows_using_it_survive_mbvisors_reconciliation(tmp_path, how):
    """docs/controller.md, "Beside other apps": groups carry no cookie, so a sync (at every
    connection, and an audit) manages only the group ids mbvisor gives (flows.GROUP_IDS).
    It once managed every group of the switch and deleted another app's, and OVS deleted
    the flows that used it."""
    host = Host(tmp_path, placement=Placement(0, NEXT_TABLE))
    try:
        fake = host.switch()
        another_apps_group_and_flow(fake)
        reconciler = host.service.reconcilers[DPID]
        if how == "audit":
            reconciler.submit(Job("audit")).done.wait()
        else:
            fake.reconnect()
            wait_until(lambda: reconciler.synced and not reconciler.jobs, what="the reconciliation")
            fake.settle()
        assert 1 in fake.groups, "mbvisor deleted another app's group"
        assert [f.cookie for f in fake.flows(NEXT_TABLE)] == [OTHER_COOKIE], "and with it the app's flow"
    finally:
        host.close()


# --- a disconnection while the bundle's flows are recorded is UNAVAILABLE, not INTERNAL -----

@pytest.mark.parametrize("at_yield", [1, 2], ids=["looking-for-meters", "recording"])
def test_a_switch_that_disconnects_while_its_bundle_is_made_answers_unavailable(tmp_path, monkeypatch, caplog,
                                                                                  at_yield):
    """Making a bundle yields to the loop (``Pacer``): while the meters its flows use are
    looked for, and while ``_record`` runs as the switch applies it (``meanwhile``).  A
    disconnection handled meanwhile drops ``reconciler.link``: the bundle is abandoned or
    recorded with its own connection, so the commands are answered UNAVAILABLE ("try
    again"), not INTERNAL, and nothing crashes."""
    host = Host(tmp_path)
    try:
        fake = host.switch()
        fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
        armed = {"on": False}
        yields = []

        class DisconnectingPacer(Pacer):
            """At the chosen yield, the loop handles the switch's disconnection."""

            def __call__(self) -> None:
                if not armed["on"]:
                    return
                yields.append(1)
                if len(yields) == at_yield:
                    armed["on"] = False
                    datapath = fake.datapath
                    fake.disconnect()
                    host.service.switch_disconnected(datapath)

        monkeypatch.setattr(reconciler_module, "Pacer", DisconnectingPacer)
        armed["on"] = True
        with caplog.at_level(logging.ERROR, logger="mbvisor.controller"):
            answers = host.run(f"R F {MAC} 10.0.0.5", f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
        assert not armed["on"], "the disconnection happened while the bundle was made"
        assert [a.status for a in answers] == ["UNAVAILABLE", "UNAVAILABLE"], answers
        assert not [r for r in caplog.records if "job failed" in r.getMessage()]
    finally:
        host.close()


# --- coverage kept: a restart with another placement moves every flow and group -------------

def test_a_restart_with_another_placement_leaves_no_flow_in_the_old_tables(tmp_path):
    """The first sync after a restart with another placement deletes every tagged flow of
    the old tables, moves the groups' resubmits, keeps the other apps' flows; and the next
    reconciliation finds the placed flows as it wants them (goto/resubmit read back equal)."""
    first = Host(tmp_path)
    fake = first.switch()
    fake.add_host("10.0.0.11", "02:00:00:00:00:11", BACKEND_PORT)
    first.ok(f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16", f"A {MAC} T 13 s 1024-2047 d 53 p udp",
             f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")
    assert {f.table for f in ours(fake)} == {0, 1, 2, 3, 4}
    first.service.close()
    placement = Placement(2, NEXT_TABLE)
    second = Host(tmp_path, placement=placement)
    try:
        second.service.neighbours[DPID] = dict(first.service.neighbours_of(DPID))  # the backend located
        fake.sink = second.deliver
        second.switches[DPID] = fake
        fake.tables.flow_mod(parser.OFPFlowMod(fake.datapath, cookie=OTHER_COOKIE, table_id=0, priority=1,
                                               match=parser.OFPMatch(in_port=4),
                                               instructions=[parser.OFPInstructionGotoTable(2)]))
        fake.reconnect()
        wait_until(lambda: DPID in second.service.reconcilers, what="the connection")
        reconciler = second.service.reconcilers[DPID]
        wait_until(lambda: reconciler.synced and not reconciler.jobs, what="the reconciliation")
        fake.settle()
        desired = compile_switch(second.service.state, DPID, second.service.surroundings(DPID))
        placed = {(f.table, f.priority, f.match) for f in map(placement.flow, desired.flows)}
        assert {f.table for f in ours(fake)} <= set(placement.tables)
        assert len(ours(fake)) == len(placed) == reconciler.installed.flow_count()
        assert [f.cookie for f in fake.flows(0)] == [OTHER_COOKIE]
        for group in fake.groups.values():
            assert all(a.table_id == 3 + 2 for b in group.buckets for a in b.actions if hasattr(a, "table_id"))
        bundles = len(sent(fake, "ONFBundleCtrlMsg"))
        fake.reconnect()
        wait_until(lambda: reconciler.synced and not reconciler.jobs, what="the second reconciliation")
        fake.settle()
        assert len(sent(fake, "ONFBundleCtrlMsg")) == bundles, "placed flows read back as different"
    finally:
        second.close()


# --- the next table is one another app can write ------------------------------------------

@pytest.mark.host
def test_the_next_table_is_one_another_app_can_write_on_ovs(lab):
    """OVS keeps table 254 for itself (OFPBRC_EPERM for any flow mod there): a next table
    of 254 would drop everything mbvisor lets through, so it is refused at start; 253 is
    the last one an app behind mbvisor can write."""
    bridge = lab.bridge()
    with pytest.raises(ValueError, match="next table must be 5..253"):
        Placement(0, 254).check()
    assert Placement(0, 253).check().next_table == 253

    def add_flow(table: int) -> subprocess.CompletedProcess:
        return subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "add-flow", bridge.name,
                               f"table={table},priority=0,actions=NORMAL"], capture_output=True, text=True)

    assert add_flow(254).returncode != 0, "OVS took a flow in table 254: the limit can be raised"
    assert add_flow(253).returncode == 0, add_flow(253).stderr


@pytest.mark.host
def test_a_restarted_controller_finds_its_placed_flows_and_groups_as_it_wants_them_on_ovs(lab, tmp_path):
    """Real OVS reads back goto_table, placed ct(table=...) and resubmit(,N) in group
    buckets byte-equal to what mbvisor compiles: a restart changes nothing."""
    from mbvisor.topologies.controller_run import Controller
    from mbvisor.topologies.netlab import wait_until as lab_wait
    from test_controller_ovs import MB_MAC

    controller = Controller(tmp_path, arguments=("--table-offset", "2", "--next-table", str(NEXT_TABLE))).start()
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        controller.wait_switch(bridge.dpid)
        bridge.add_flow("table=0,priority=0,actions=goto_table:2")  # the app in front
        bridge.add_flow(f"table={NEXT_TABLE},priority=0,actions=NORMAL")  # the app behind
        mb = lab.host("mb", ip="10.0.0.5/24", mac=MB_MAC)
        lab.host("backend", ip="10.0.0.11/24")
        controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} 10.0.0.5")
        controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} I 4 s 10.0.0.66")
        controller.ok(bridge.dpid, mb.ofport, f"A {MB_MAC} T 13 s 1024-2047 d 53 p udp")
        controller.ok(bridge.dpid, mb.ofport, f"R L {MB_MAC} 10.0.0.5 0 * 10.0.0.11")
        assert any("resubmit(,5)" in line for line in
                   subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-groups", bridge.name],
                                  capture_output=True, text=True).stdout.splitlines())
        controller.stop()
        controller.start()
        controller.wait_switch(bridge.dpid)

        def reconciled() -> list:
            return [line for line in controller.log.read_text().splitlines() if "reconciled" in line]

        lab_wait(lambda: len(reconciled()) >= 2, timeout=10, what="the second reconciliation")
        assert reconciled()[-1].endswith("+0 ~0 -0 flows, +0 ~0 -0 groups"), reconciled()[-1]
    finally:
        controller.stop()
