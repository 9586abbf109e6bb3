"""topologies/private_switch.py: a fresh ovsdb-server + ovs-vswitchd of our own, which the
lab tools talk to while it is open, and which leaves nothing behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from mbvisor.bench.controller import rss_mb, vswitchd_pid
from mbvisor.topologies import netlab
from mbvisor.topologies.private_switch import PrivateSwitch

pytestmark = pytest.mark.host


def test_private_switch_takes_flows_and_goes_away():
    netlab.require_host_tools()
    shared_pid, before_env = vswitchd_pid(), os.environ.get("OVS_RUNDIR")
    with PrivateSwitch() as switch:
        assert vswitchd_pid() == switch.vswitchd_pid != shared_pid
        empty = rss_mb(switch.vswitchd_pid)
        with netlab.Lab() as lab:
            bridge = lab.bridge()
            assert bridge.name in subprocess.run(["ovs-vsctl", "list-br"], capture_output=True, text=True).stdout
            bridge.add_flows(f"priority=10,ip,nw_src=10.{i // 250}.{i % 250}.1,actions=drop" for i in range(20_000))
            assert len(bridge.dump_flows()) >= 20_000
            assert rss_mb(switch.vswitchd_pid) > empty + 5       # a fresh switch shows what flows cost
        # the shared switch never saw that bridge
        shared = subprocess.run(["ovs-vsctl", "--db=unix:/var/run/openvswitch/db.sock", "list-br"],
                                capture_output=True, text=True).stdout
        assert bridge.name not in shared
        directory, pid = switch.directory, switch.vswitchd_pid
    assert os.environ.get("OVS_RUNDIR") == before_env and vswitchd_pid() == shared_pid
    assert not directory.exists()
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_controller_restores_flows_after_a_real_vswitchd_crash(tmp_path):
    """A real ovs-vswitchd process killed and restarted (on a private switch, so nobody
    else's is touched): the bridge comes back without flows, reconnects, and the controller's
    reconciliation installs exactly the flows it had."""
    from mbvisor.topologies.controller_run import Controller

    netlab.require_host_tools()
    mac = "52:34:56:00:12:22"
    with PrivateSwitch() as switch, netlab.Lab() as lab:
        controller = Controller(tmp_path).start()
        try:
            bridge = lab.bridge(controller=controller.target, fail_mode="secure")
            controller.wait_switch(bridge.dpid)
            controller.ok(bridge.dpid, 1, f"R F {mac} 10.0.0.5")
            controller.ok(bridge.dpid, 1, f"A {mac} I 4 s 10.0.0.66")
            before = sorted(bridge.dump_flows(no_stats=True))
            assert any("nw_src=10.0.0.66" in line and "drop" in line for line in before)
            crashed = switch.vswitchd_pid
            switch.crash_and_restart_vswitchd()
            assert switch.vswitchd_pid != crashed

            def restored():
                try:
                    return sorted(bridge.dump_flows(no_stats=True)) == before
                except netlab.CommandError:      # the new vswitchd is still opening its bridges
                    return False

            netlab.wait_until(restored, timeout=30, interval=0.2, what="flows restored after the crash")
            assert len(controller.reconciliations()) >= 2
            assert "+0 ~0 -0 flows" not in controller.reconciliations()[-1]    # it re-added them
        finally:
            controller.stop()
