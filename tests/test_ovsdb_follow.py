"""agents/ovsdb_follow.py against a real ovsdb-server (a private one): the replica decides
exactly what three ``ovs-vsctl list`` calls would, and a change wakes the agent's
discovery without any periodic scan."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from mbvisor.agents.discovery import scan_ovsdb
from mbvisor.agents.ovsdb_follow import OvsdbFollower
from mbvisor.topologies import netlab
from mbvisor.topologies.netlab import wait_until
from mbvisor.topologies.private_switch import PrivateSwitch

pytestmark = pytest.mark.host


def listed() -> object:
    """What discovery made of ``ovs-vsctl --format=json list`` (the way it read OVS before)."""
    def table(name: str, columns: str) -> dict:
        done = subprocess.run(["ovs-vsctl", "--format=json", f"--columns={columns}", "list", name],
                              capture_output=True, text=True, check=True, timeout=30)
        return json.loads(done.stdout)

    return scan_ovsdb(table("Bridge", "name,datapath_id,ports"), table("Port", "_uuid,interfaces"),
                      table("Interface", "_uuid,name,ofport,external_ids,mac_in_use"))


def test_the_replica_sees_what_ovs_vsctl_sees_and_each_change_wakes_discovery():
    netlab.require_host_tools()
    with PrivateSwitch(), netlab.Lab() as lab:
        lab.bridge()
        vm, other = lab.host("vm"), lab.host("other")
        follower = OvsdbFollower().start()
        try:
            wait_until(lambda: follower.changes.is_set(), 10, "the first replica")
            wait_until(lambda: follower.scan() == listed(), 10, "the replica to match ovs-vsctl")
            assert follower.status() == {"remote": follower.remote, "connected": True,
                                         "snapshots": follower.snapshots} and follower.snapshots >= 1
            follower.changes.clear()
            vm.annotate("tenant-a", vm_id="vm-1", channel="/dev/shm/mbv-follow-test")
            wait_until(lambda: follower.changes.is_set(), 10, "a change to wake discovery")
            wait_until(lambda: [c.interface for c in follower.scan().channels] == [vm.port_name], 10,
                       "the annotated VM's channel")
            assert follower.scan() == listed()
            channel = follower.scan().channels[0]
            assert (channel.vm_id, channel.macs, channel.port) == ("vm-1", (vm.mac,), vm.ofport)
            # Two ports claiming one MAC: both refused, as ovs-vsctl's view would have it.
            other.annotate("tenant-b", ips="10.0.0.99")
            vm.bridge.vsctl("set", "Interface", other.port_name, f'external_ids:attached-mac="{vm.mac}"')
            wait_until(lambda: not follower.scan().channels, 10, "the shared MAC refused")
            assert follower.scan() == listed() and len(follower.scan().refused) == 2
        finally:
            follower.close()


def test_no_ovsdb_server_is_an_error_for_each_round_not_a_hang(tmp_path):
    follower = OvsdbFollower(remote=f"unix:{tmp_path}/nothing.sock").start()
    try:
        with pytest.raises(RuntimeError, match="not reached yet"):
            follower.scan()
        assert follower.status()["connected"] is False
    finally:
        follower.close()
    assert not follower.thread.is_alive()


def test_a_storm_of_changes_is_coalesced_and_the_last_one_is_seen(tmp_path):
    """Fifty annotations changed one after another cost a few snapshots, not fifty (each
    costs ~50 ms at 1,000 interfaces), and the replica ends with the last value.  The
    schema is asked of the server when its file is not where Debian puts it."""
    netlab.require_host_tools()
    with PrivateSwitch(), netlab.Lab() as lab:
        lab.bridge()
        vm = lab.host("vm")
        follower = OvsdbFollower(schema=str(tmp_path / "no-such.ovsschema")).start()
        try:
            wait_until(lambda: follower.changes.is_set(), 10, "the first replica")
            before = follower.snapshots
            for n in range(50):
                vm.annotate("tenant-a", vm_id=f"vm-{n}", channel="/dev/shm/mbv-follow-storm")
            wait_until(lambda: [c.vm_id for c in follower.scan().channels] == ["vm-49"], 10, "the last change")
            assert follower.snapshots - before <= 12
        finally:
            follower.close()


def test_a_restarted_ovsdb_server_is_followed_again(caplog):
    """ovsdb-server killed: the replica is kept and the status says so; once a new one
    serves the database, the follower reconnects and sees changes made after it."""
    netlab.require_host_tools()
    caplog.set_level("INFO", "mbvisor")
    with PrivateSwitch() as switch, netlab.Lab() as lab:
        lab.bridge()
        vm = lab.host("vm")
        follower = OvsdbFollower().start()
        try:
            wait_until(lambda: follower.changes.is_set(), 10, "the first replica")
            known = follower.scan()
            switch.crash_and_restart_ovsdb()
            wait_until(lambda: follower.status()["connected"] and follower.snapshots >= 2, 15,
                       "the follower back on the new server")
            assert follower.scan() == known  # nothing changed meanwhile: the same view
            follower.changes.clear()
            vm.annotate("tenant-a", vm_id="vm-after", channel="/dev/shm/mbv-follow-restart")
            wait_until(lambda: [c.vm_id for c in follower.scan().channels] == ["vm-after"], 10,
                       "a change made after the restart")
            assert follower.changes.is_set()
            assert "connection lost" in caplog.text and caplog.text.count("connected; following") >= 2
        finally:
            follower.close()


def test_an_idle_database_costs_the_follower_no_wake_ups_and_close_is_prompt():
    netlab.require_host_tools()
    with PrivateSwitch(), netlab.Lab() as lab:
        lab.bridge()
        follower = OvsdbFollower().start()
        try:
            wait_until(lambda: follower.changes.is_set(), 10, "the first replica")
            runs = []
            run = follower.idl.run
            follower.idl.run = lambda: runs.append(1) or run()
            time.sleep(1.5)  # an observation window, not a wait for something: nothing happens in it
            assert len(runs) <= 1  # it looked every 250 ms before (6 runs here)
        finally:
            started = time.monotonic()
            follower.close()
            assert not follower.thread.is_alive() and time.monotonic() - started < 2


def test_closing_the_follower_twice_touches_nothing_else(tmp_path):
    follower = OvsdbFollower(remote=f"unix:{tmp_path}/nothing.sock").start()
    follower.close()
    other = os.eventfd(0)  # may take the number the follower's bell had
    try:
        follower.close()
        os.fstat(other)  # still open, still ours
        os.eventfd_write(other, 1)
        assert os.eventfd_read(other) == 1  # nothing else was written into it
    finally:
        os.close(other)
