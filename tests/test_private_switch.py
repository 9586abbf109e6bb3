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
