"""A real live migration (issue 15): a QEMU middlebox guest (the project's initramfs, TCG)
running the real ``mbctl`` on its ivshmem-plain device, migrated with QMP ``migrate`` from
hypervisor A to hypervisor B of a two-hypervisor :class:`DataCentre`, while an attacker on
A keeps sending and a client on B keeps a TCP connection busy through the guest's
load-balancer redirect to backends on A (they stay there: controller/anchors.py).  Each QEMU runs in its hypervisor's network namespace, so its tap is that
hypervisor's bridge port, annotated as an operator would (same ``vm-id``, tenant and MAC on
both sides, each side its own region file); each hypervisor's real agent serves its own side's
region, and the one controller copies the middlebox to B when B's agent publishes the paused
destination's port.

Needs root, Open vSwitch, qemu-system-x86, linux-image-cloud-amd64, busybox-static and
python3.11: the test FAILS, never skips, when one is missing.  The QEMU side is
``mbvisor.topologies.qemu.migration``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mbvisor.controller.flows import cookie_of
from mbvisor.guest.ring import describe
from mbvisor.topologies.datacentre import DataCentre
from mbvisor.topologies.netlab import run, settle, wait_until
from mbvisor.topologies.qemu.migration import REGION_SIZE, QMP, QMPError, MigratableVM, event_time, migrate
from mbvisor.topologies.qemu.vm import build_image, requirements

from test_anchors_ovs import CHATTER, ECHO, answered_so_far, chatter_summary

pytestmark = pytest.mark.host

GUEST_IP = "10.0.1.200"
SERVICE_PORT = 7000
TENANT = "blue"
PACED = 300          # attack packets per measured phase, 1 ms apart
RESUME_TO_FLOWS_TARGET = 0.100   # s (issue 15): offloads active on B within 100 ms of the resume

# Attack traffic that runs through the migration: one UDP datagram every `interval` s until
# the file `stop` exists (at most 120 s); prints how many were sent.
_ATTACK = r"""
import os, socket, sys, time
dst, stop, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, deadline = 0, time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    s.sendto(b"attack", (dst, 9))
    sent += 1
    time.sleep(interval)
print(sent, flush=True)
"""


def guest_rx(vm: MigratableVM) -> int:
    """The guest's own eth0 rx_packets (migrates with the guest's kernel)."""
    code, out = vm.run("cat /sys/class/net/eth0/statistics/rx_packets")
    assert code == 0, out
    return int(out.split()[-1])


def ring_state(vm: MigratableVM) -> dict:
    """``mbctl -r --json`` in the guest: the ring's epoch and counters as the guest sees them."""
    code, out = vm.run("python3 -m mbvisor.guest.mbctl -r --json")
    assert code == 0, out
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def attack_drops(bridge, mac: str, source: str) -> int:
    """Packets counted by the middlebox's drop flow(s) for ``source`` on ``bridge``."""
    return sum(f.n_packets for f in bridge.flows(f"cookie={cookie_of(mac):#x}/-1")
               if f"nw_src={source}" in f.raw and f.actions == "drop")


def has_drop_flow(bridge, mac: str, source: str) -> bool:
    return any(f"nw_src={source}" in f.raw and f.actions == "drop"
               for f in bridge.flows(f"cookie={cookie_of(mac):#x}/-1"))


def learned_port(hypervisor, mac: str) -> int | None:
    """The port a hypervisor's switch learned ``mac`` on (NORMAL's MAC table), if any."""
    table = run(["ovs-appctl", "-t", str(hypervisor.directory / "ovs-vswitchd.ctl"), "fdb/show",
                 hypervisor.bridge.name]).stdout
    return next((int(fields[0]) for fields in map(str.split, table.splitlines()[1:])
                 if len(fields) >= 3 and fields[2] == mac and fields[0].isdigit()), None)


def mbctl_ok(vm: MigratableVM, arguments: str) -> dict:
    code, answer = vm.mbctl(arguments)
    assert code == 0 and answer.get("status") == "OK", (arguments, code, answer)
    return answer


@pytest.fixture
def image():
    missing = requirements()
    if missing:
        pytest.fail("the QEMU middlebox needs: " + "; ".join(missing))
    return build_image()


@contextlib.contextmanager
def two_hypervisors():
    """(a data centre of two hypervisors, the list its test adds its VMs to): the VMs are
    stopped before the data centre goes (their ports are in its databases), and none may
    leave anything behind."""
    vms: list[MigratableVM] = []
    with DataCentre(hypervisors=2) as dc:
        try:
            yield dc, vms
        finally:
            errors = []
            for vm in vms:
                try:
                    vm.stop()
                except Exception as error:
                    errors.append(str(error))
                errors += vm.leftovers()
            assert not errors, f"the migration's VMs left {errors}"


def test_a_qemu_middlebox_live_migrates_with_its_offloads(image, tmp_path, record_property):
    with two_hypervisors() as (dc, vms):
        _migrate_under_attack(dc, image, tmp_path, vms, record_property)


def _migrate_under_attack(dc, image, tmp_path, vms, record_property):
    a, b = dc.hypervisors
    digits = dc.prefix[-4:]
    mac = f"52:54:00:{digits[:2]}:{digits[2:]}:c8"
    vm_id = f"{dc.prefix}-mb"
    attacker = dc.add_vm(0, "attacker", tenant="red")          # on A, another tenant
    backends = [dc.add_vm(0, f"web{i}", tenant=TENANT) for i in (1, 2)]   # on A, the guest's tenant
    client = dc.add_vm(1, "client", tenant="green")            # on B
    for backend in backends:
        backend.popen([sys.executable, "-I", "-u", "-c", ECHO, backend.name, str(SERVICE_PORT)])
        backend.wait_listening(SERVICE_PORT)
        backend.set_arp(client.ip, client.mac)                 # no broadcast ARP reaches the guest's counts
    client.set_arp(GUEST_IP, mac)
    common = dict(vm_id=vm_id, mac=mac, image=image, tenant=TENANT, ips=GUEST_IP,
                  append=f"mbv.ip={GUEST_IP}/16 mbv.arp={attacker.ip},{attacker.mac}")

    # 1. the middlebox VM on A, its channel served by A's agent
    source = MigratableVM(a, **common, state_dir=tmp_path / "a", region=f"/dev/shm/{dc.prefix}-mb-a", tap="mbqa")
    vms.append(source)
    source.start()
    source.wait_ready()
    a.agent.wait_serving(f"{vm_id}/mbqa")
    attacker.set_arp(GUEST_IP, mac)                           # no ARP in the counts

    # the attack reaches the guest before any offload (the path works, the counter counts)
    rx = guest_rx(source)
    assert attacker.send_udp(GUEST_IP, 9, count=50, interval=0.001) == 50
    wait_until(lambda: guest_rx(source) - rx >= 50, 20, "the attack reaching the guest before the filter",
               interval=0.2)

    # 3. the guest's own mbctl registers the firewall and filters the attacker, on A
    mbctl_ok(source, f"register firewall --ip {GUEST_IP}")
    mbctl_ok(source, f"filter add --layer ip --src {attacker.ip}")
    # ... and balances its address to its backends on A; a client on B keeps a connection busy
    mbctl_ok(source, f"redirect --ip {GUEST_IP} --to {','.join(b.ip for b in backends)}")
    # the guest talks (as any VM does): the switches learn where its MAC is, and the client's
    # traffic to it is not flooded, into the paused destination's queue among others (NORMAL)
    source.run(f"ping -c 1 -W 1 {client.ip}")   # its reply goes the redirect's way: only the ARP matters
    wait_until(lambda: learned_port(b, mac) == b.bridge.ofport(f"ul{a.index}"), 10,
               "B's switch to learn that the guest's MAC is behind its underlay port")
    stop_client = tmp_path / "stop-client"
    chatter = client.popen([sys.executable, "-I", "-u", "-c", CHATTER, GUEST_IP, str(SERVICE_PORT),
                            str(stop_client), "0.005"])
    wait_until(lambda: answered_so_far(chatter) >= 20, 20, "the client's connection answered through A")
    assert has_drop_flow(a.bridge, mac, attacker.ip) and not has_drop_flow(b.bridge, mac, attacker.ip)
    rx, dropped = guest_rx(source), attack_drops(a.bridge, mac, attacker.ip)
    assert attacker.send_udp(GUEST_IP, 9, count=PACED, interval=0.001) == PACED
    wait_until(lambda: attack_drops(a.bridge, mac, attacker.ip) - dropped >= PACED, 20, "the attack dropped on A")
    assert guest_rx(source) == rx
    ring_before = ring_state(source)

    # 2. the paused destination on B (-incoming): B's agent publishes its port, the controller copies
    destination = MigratableVM(b, **common, state_dir=tmp_path / "b", region=f"/dev/shm/{dc.prefix}-mb-b",
                               tap="mbqb", incoming=True)
    vms.append(destination)
    destination.start()
    assert destination.status() == "inmigrate"
    copy_path = f"/v1/middleboxes/{b.dpid:016x}/{mac}"

    def confirmed_on_b() -> float | None:
        status, view = dc.controller.get(copy_path)
        switch = dc.switch_view(1)
        if (status == 200 and any(attacker.ip in f for f in view["filters"]) and view["port"] == destination.ofport
                and switch["synced"] and switch["applied_generation"] == switch["generation"]
                and has_drop_flow(b.bridge, mac, attacker.ip)):
            return time.time()
        return None
    flows_on_b = wait_until(confirmed_on_b, 20, "the middlebox copied to B and its flows confirmed", interval=0.02)
    assert dc.controller.get(f"/v1/middleboxes/{a.dpid:016x}/{mac}")[0] == 200   # both hold it meanwhile

    # 4. migrate while the attacker keeps sending (1 every ~1 ms)
    stop = tmp_path / "stop-attack"
    rx, drops_b = guest_rx(source), attack_drops(b.bridge, mac, attacker.ip)
    sender = attacker.popen([sys.executable, "-I", "-c", _ATTACK, GUEST_IP, str(stop), "0.001"])
    wait_until(lambda: attack_drops(a.bridge, mac, attacker.ip) - dropped >= PACED + 20, 10,
               "the attack running before the migration")
    assert open(destination.region, "rb").read() == bytes(REGION_SIZE)   # B's region: nothing in it yet
    outcome = migrate(source, destination, tmp_path / "migration.sock")
    assert source.status() == "postmigrate"
    resume = wait_until(lambda: destination.qmp.event("RESUME"), 10, "QEMU's RESUME event on the destination")
    assert destination.status() == "running"
    region_a = open(source.region, "rb").read()
    region_b = open(destination.region, "rb").read()
    # the switchover: the source quits and its port goes, as a real one would
    source.quit()
    dropped_on_a = attack_drops(a.bridge, mac, attacker.ip) - dropped - PACED   # its flows go with its port
    source.remove_port()
    # its redirect's backends stay on A: A's entry stays as their anchor, without filters
    wait_until(lambda: dc.controller.get(f"/v1/middleboxes/{a.dpid:016x}/{mac}")[1].get("anchor")
               == {"vm_id": vm_id, "tenant": TENANT}, 20, "A's entry to stay as the anchor once its port went")
    assert has_drop_flow(a.bridge, mac, attacker.ip)  # the anchor filters what enters at A, as its twin does
    answered_at_switchover = answered_so_far(chatter)
    wait_until(lambda: answered_so_far(chatter) >= answered_at_switchover + 100, 20,
               "the client's connection answered after the switchover")
    # the attack goes on for a moment after the switchover, then stops
    def dropped_anywhere() -> int:
        return attack_drops(a.bridge, mac, attacker.ip) + attack_drops(b.bridge, mac, attacker.ip)
    drops_now = dropped_anywhere()
    wait_until(lambda: dropped_anywhere() - drops_now >= 200, 20,
               "the attack dropped after the switchover (on A by the anchor, as the attacker is there)")
    stop.touch()
    wait_until(lambda: not sender.alive(), 10, "the attack sender to stop")
    sent_during = int(sender.output().split()[-1])
    during_b = settle(lambda: attack_drops(b.bridge, mac, attacker.ip)) - drops_b
    reached_during = guest_rx(destination) - rx

    # the ivshmem region migrated with the guest's RAM: B's file is A's, and the guest's ring
    # on B has the same epoch and counters as on A
    assert region_a[:4096] != bytes(4096) and region_b == region_a
    ring_after = ring_state(destination)
    assert {k: ring_after[k] for k in ("state", "epoch", "published", "answered", "pending")} == \
        {k: ring_before[k] for k in ("state", "epoch", "published", "answered", "pending")}, (ring_before, ring_after)

    # 5. after the switchover: the paced attack is dropped (by A's anchor), 0 reach the guest
    rx, before = guest_rx(destination), dropped_anywhere()
    assert attacker.send_udp(GUEST_IP, 9, count=PACED, interval=0.001) == PACED
    wait_until(lambda: dropped_anywhere() - before >= PACED, 20, "the attack dropped after the switchover")
    dropped_after = settle(dropped_anywhere) - before
    reached_after = guest_rx(destination) - rx
    # the guest's mbctl keeps working on B, from the migrated ring, through B's agent
    b.agent.wait_serving(f"{vm_id}/mbqb")
    answered_before = next(c for c in b.agent.channels() if c["channel"] == f"{vm_id}/mbqb")
    answer = mbctl_ok(destination, "filter add --layer ip --src 10.66.0.0/16")
    assert answer["epoch"] == int(ring_before["epoch"], 16) and answer["seq"] >= ring_before["published"]
    assert any("10.66.0.0" in f for f in dc.controller.get(copy_path)[1]["filters"])
    assert b.bridge.dump_flows(f"cookie={cookie_of(mac):#x}/-1,ip,nw_src=10.66.0.0/16")
    # B's agent forwarded it and answered it (its status file is rewritten a moment later)
    key = f"{vm_id}/mbqb"
    channel = wait_until(lambda: next((c for c in b.agent.channels() if c["channel"] == key
                                       and c["forwarded"] > answered_before["forwarded"]), None),
                         10, "B's agent to count the command it forwarded")
    assert channel["forwarded"] == answered_before["forwarded"] + 1
    assert channel["answered"] == answered_before["answered"] + 1

    stop_client.touch()
    wait_until(lambda: not chatter.alive(), 10, "the client to stop")
    connection = chatter_summary(chatter)

    resume_at = event_time(resume)
    figures = {
        "client_connection": connection,
        "migration_total_ms": outcome.get("total-time"), "downtime_ms": outcome.get("downtime"),
        "ram_transferred": outcome.get("ram", {}).get("transferred"),
        "resume_to_flows_confirmed_ms": round((flows_on_b - resume_at) * 1000, 1),
        "attack_sent_during_migration": sent_during, "dropped_on_a_during": dropped_on_a,
        "dropped_on_b_during": during_b,
        "reached_guest_during": reached_during,
        "attack_after_switchover": PACED, "dropped_after": dropped_after, "reached_guest_after": reached_after,
        "ring_before": {k: ring_before[k] for k in ("epoch", "published", "answered")},
        "ring_after": {k: ring_after[k] for k in ("epoch", "published", "answered")},
        "b_agent_channel": {k: channel.get(k) for k in ("answered", "forwarded", "state") if k in channel},
        "b_agent_channel_before": {k: answered_before.get(k) for k in ("answered", "forwarded", "state")
                                   if k in answered_before},
    }
    record_property("live_migration", figures)
    print("live migration figures:", json.dumps(figures))
    assert flows_on_b - resume_at <= RESUME_TO_FLOWS_TARGET, figures
    # the redirected connection survived: every line answered in order, by one backend, no reset
    assert connection["errors"] == [] and connection["answered"] == connection["sent"], figures
    assert len(connection["servers"]) == 1, figures
    assert reached_during == 0 and reached_after == 0, figures
    assert dropped_after == PACED, figures


def test_a_command_in_flight_at_the_switchover_is_answered_once(image, tmp_path):
    """docs/datacentre.md: an answer the source's agent writes once the region's pages were
    sent never reaches the destination; the destination's agent forwards the command again
    and the controller answers it from the stored answer (its key is ``vm-id/MAC``), once.
    Made deterministic with both agents stopped (SIGSTOP) while the guest's mbctl publishes a
    command and the VM migrates: then the source's agent goes on (it forwards the command and
    answers into the source's region, after the migration), then the destination's."""
    with two_hypervisors() as (dc, vms):
        stopped: list[int] = []
        try:
            _command_across_the_switchover(dc, image, tmp_path, vms, stopped)
        finally:
            for pid in stopped:   # never leave a lab's agent stopped
                os.killpg(pid, signal.SIGCONT)


def _command_across_the_switchover(dc, image, tmp_path, vms, stopped):
    a, b = dc.hypervisors
    digits = dc.prefix[-4:]
    mac = f"52:54:00:{digits[:2]}:{digits[2:]}:c9"
    vm_id = f"{dc.prefix}-mbf"
    on_a, on_b = f"{vm_id}/mbfa", f"{vm_id}/mbfb"
    common = dict(vm_id=vm_id, mac=mac, image=image, tenant=TENANT, ips=GUEST_IP, append=f"mbv.ip={GUEST_IP}/16")
    source = MigratableVM(a, **common, state_dir=tmp_path / "a", region=f"/dev/shm/{dc.prefix}-mbf-a", tap="mbfa")
    vms.append(source)
    source.start()
    source.wait_ready()
    a.agent.wait_serving(on_a)
    mbctl_ok(source, f"register firewall --ip {GUEST_IP}")
    destination = MigratableVM(b, **common, state_dir=tmp_path / "b", region=f"/dev/shm/{dc.prefix}-mbf-b",
                               tap="mbfb", incoming=True)
    vms.append(destination)
    destination.start()
    copy_path = f"/v1/middleboxes/{b.dpid:016x}/{mac}"
    wait_until(lambda: dc.controller.get(copy_path)[0] == 200, 20, "the middlebox copied to B")
    b.agent.wait_serving(on_b)

    # both agents stop (A's status file counts the registration first); the guest's mbctl
    # publishes a command and waits for its answer; the VM migrates meanwhile
    forwarded_by_a = wait_until(lambda: _channel(a.agent, on_a).get("forwarded"), 10,
                                "A's agent to count the registration")
    forwarded_by_b = _channel(b.agent, on_b).get("forwarded", 0)
    for agent in (a.agent, b.agent):
        os.killpg(agent.process.pid, signal.SIGSTOP)
        stopped.append(agent.process.pid)
    code, out = source.run("python3 -m mbvisor.guest.mbctl --json --timeout 120 filter add --layer ip "
                           "--src 10.55.0.0/16 > /tmp/in-flight.json 2>&1 </dev/null &")
    assert code == 0, out
    wait_until(lambda: ring_state(source)["pending"] == 1, 20, "the guest's command published, unanswered")
    seq = ring_state(source)["published"] - 1
    migrate(source, destination, tmp_path / "migration.sock")
    wait_until(lambda: destination.qmp.event("RESUME"), 10, "QEMU's RESUME event on the destination")

    # the source's agent goes on: it forwards the command, the controller applies it, and
    # the answer lands in the source's region, which the guest left
    os.killpg(a.agent.process.pid, signal.SIGCONT)
    stopped.remove(a.agent.process.pid)

    def answer_on_a() -> dict | None:
        with open(source.region, "rb") as region:
            found = describe(region.read(), REGION_SIZE, recent=1)
        return next((x for x in found.get("last_answers", []) if x["seq"] == seq), None)
    late = wait_until(answer_on_a, 20, "the source's agent to answer in the source's region")
    assert late["status"] == "OK" and "already present" not in late["text"], late
    wait_until(lambda: _channel(a.agent, on_a)["forwarded"] == forwarded_by_a + 1, 10,
               "A's agent to count the command it forwarded")
    assert ring_state(destination)["pending"] == 1, "the source's late answer reached the guest"

    # the destination's agent goes on: it reads the command again from the migrated ring,
    # and the guest's mbctl gets the stored answer (a second application would have said
    # "filter already present")
    os.killpg(b.agent.process.pid, signal.SIGCONT)
    stopped.remove(b.agent.process.pid)
    output = wait_until(lambda: _json_line(destination.run("cat /tmp/in-flight.json")[1]), 60,
                        "the guest's in-flight mbctl to print its answer")
    assert output["status"] == "OK" and output["seq"] == seq, output
    assert output["text"] == late["text"], ("the command was applied twice", output, late)
    wait_until(lambda: _channel(b.agent, on_b).get("forwarded") == forwarded_by_b + 1, 10,
               "B's agent to count the command it forwarded")
    ring = ring_state(destination)
    assert ring["pending"] == 0 and ring["answered"] == ring["published"] == seq + 1, ring
    assert any("10.55.0.0/16" in f for f in dc.controller.get(copy_path)[1]["filters"])
    assert b.bridge.dump_flows(f"cookie={cookie_of(mac):#x}/-1,ip,nw_src=10.55.0.0/16")


def _channel(agent, key: str) -> dict:
    return next((c for c in agent.channels() if c["channel"] == key), {})


def _json_line(text: str) -> dict | None:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def test_qemu_refuses_to_migrate_an_ivshmem_plain_device_without_master_on(tmp_path):
    """Why the migratable VM sets ``master=on``: QEMU's default for ivshmem-plain (``master=off``,
    a peer) blocks migration.  A paused QEMU (-S), nothing booted."""
    if requirements():
        pytest.fail("the QEMU middlebox needs: " + "; ".join(requirements()))
    region = tmp_path / "region"
    region.write_bytes(bytes(1 << 20))
    qmp_path = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-S", "-nodefaults", "-display", "none",
                             "-object", f"memory-backend-file,id=mb,share=on,mem-path={region},size=1M",
                             "-device", "ivshmem-plain,memdev=mb", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: qmp_path.exists() or qemu.poll() is not None, 20, "QEMU's QMP socket")
        qmp = QMP(qmp_path)
        with pytest.raises(QMPError, match="Migration is disabled when using feature 'peer mode'"):
            qmp.execute("migrate", uri=f"unix:{tmp_path / 'nowhere.sock'}")
        qmp.close()
    finally:
        qemu.kill()
        qemu.wait(10)


def _paused_qemu(tmp_path, name: str, region, *extra: str) -> tuple[subprocess.Popen, QMP]:
    """A QEMU with an ivshmem-plain device on ``region`` (master=on), paused (-S): nothing boots."""
    qmp_path = tmp_path / f"{name}.qmp"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64", "-S", "-nodefaults",
                             "-display", "none", "-object",
                             f"memory-backend-file,id=mb,share=on,mem-path={region},size=1M",
                             "-device", "ivshmem-plain,memdev=mb,master=on",
                             "-qmp", f"unix:{qmp_path},server=on,wait=off", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: qmp_path.exists() or qemu.poll() is not None, 20, f"QEMU {name}'s QMP socket")
        return qemu, QMP(qmp_path)
    except BaseException:
        qemu.kill()
        qemu.wait(10)
        raise


def test_the_region_migrates_but_a_host_write_after_its_pages_went_does_not(tmp_path):
    """What QEMU does with the ivshmem region (master=on): its content at the start of the
    migration arrives in the destination's file, but a write by a host process (the agent's
    pwrite of an answer or of the consume counter) after the region's pages were sent is not
    tracked as dirty and never reaches the destination.  Made deterministic with
    ``pause-before-switchover``: the source's iterations are over, its last pass not yet sent."""
    if requirements():
        pytest.fail("the QEMU middlebox needs: " + "; ".join(requirements()))
    source_region, destination_region = tmp_path / "a", tmp_path / "b"
    source_region.write_bytes(b"BEFORE-MIGRATION".ljust(1 << 20, b"\0"))
    destination_region.write_bytes(bytes(1 << 20))
    started = []
    try:
        source, source_qmp = _paused_qemu(tmp_path, "a", source_region)
        started.append(source)
        destination, destination_qmp = _paused_qemu(tmp_path, "b", destination_region, "-incoming", "defer")
        started.append(destination)
        source_qmp.execute("migrate-set-capabilities",
                           capabilities=[{"capability": "pause-before-switchover", "state": True}])
        destination_qmp.execute("migrate-incoming", uri=f"unix:{tmp_path / 'migration.sock'}")
        source_qmp.execute("migrate", uri=f"unix:{tmp_path / 'migration.sock'}")
        wait_until(lambda: source_qmp.execute("query-migrate")["status"] == "pre-switchover", 30,
                   "the source to pause before its switchover")
        with open(source_region, "r+b") as region:    # what the source's agent would pwrite now
            region.seek(8192)
            region.write(b"HOST-WRITE")
        source_qmp.execute("migrate-continue", state="pre-switchover")
        wait_until(lambda: source_qmp.execute("query-migrate")["status"] == "completed", 30, "the migration")
        arrived = destination_region.read_bytes()
        assert arrived[:16] == b"BEFORE-MIGRATION"       # the region is migrated with the guest's RAM
        assert arrived[8192:8202] == bytes(10)           # the late host write is not
        source_qmp.close()
        destination_qmp.close()
    finally:
        for qemu in started:
            qemu.kill()
            qemu.wait(10)
