"""The QEMU middlebox as the benchmarks' through-the-middlebox baseline (issue 14):

* the launcher's accelerator choice, with the real QEMU: KVM when its probe runs there (and
  fast enough), TCG when told so or when KVM runs guests slower than TCG, and it says why;
* the data-plane lab's through-vm path: a request really goes through the guest (its tap's
  counters, its own iptables counters), a flood of that path hits the guest, and a guest that
  cannot start is named as the reason the benchmark failed;
* the latency and throughput tables compare the offload with the VM, under the report's targets.

Needs root, Open vSwitch and the QEMU packages (docs/qemu.md): fails, never skips, without them.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest

from mbvisor.bench import dataplane as dataplane_module
from mbvisor.bench import latency, throughput
from mbvisor.bench.dataplane import MB_IP, VM_IP, VM_PATH, Dataplane
from mbvisor.topologies import netlab
from mbvisor.topologies.netlab import wait_until
from mbvisor.topologies.qemu.vm import LAUNCH, MiddleboxVM, build_image

pytestmark = pytest.mark.host

FAST = re.compile(r"^KVM runs guests: .* loop iterations after (\d+\.\d+) s \(TCG: (\d+\.\d+) s\)$")
SLOW = re.compile(r"^KVM works \(.*\) but is too slow: \d+ loop iterations did not finish in (\d+\.\d+) s "
                  r"\((\d+)x TCG's (\d+\.\d+) s, at least 1 s\)$")
LAUNCH_TIMEOUT = 100.0     # s: the probes (a first instruction within 30 s, then the loops), then QEMU's start


@contextlib.contextmanager
def launched(lab, state_dir: Path):
    """The launch script on a lab bridge until it has started QEMU (the guest need not boot:
    only the choice of accelerator is looked at); everything it made is gone afterwards."""
    bridge = lab.bridge(fail_mode="standalone")
    vm = MiddleboxVM(bridge.name, f"{lab.prefix}-vm", "52:54:00:4d:42:07", build_image(), state_dir,
                     tap=f"{lab.prefix}t").start()
    try:
        wait_until(lambda: "running (qemu pid" in vm.launch_log.read_text(), LAUNCH_TIMEOUT, interval=0.1,
                   what="the launch script to start QEMU")
        yield vm
    finally:
        vm.stop()
        assert vm.leftovers() == []


def qemu_accel(vm: MiddleboxVM) -> str:
    """The accelerator on the running QEMU's own command line (not the script's word for it)."""
    pid_file = vm.state_dir / "qemu.pid"
    wait_until(pid_file.exists, 10, what="QEMU's pid file")
    arguments = Path(f"/proc/{pid_file.read_text().split()[0]}/cmdline").read_bytes().split(b"\0")
    machine = arguments[arguments.index(b"-machine") + 1].decode()
    return machine.split("accel=")[1]


def test_the_launcher_uses_kvm_when_its_probe_boots_there(lab, tmp_path, monkeypatch):
    """A KVM that runs the probe's guest is used when its speed is allowed (here up to 1000x
    TCG's time: this machine's KVM emulates its guests, see docs/qemu.md); the choice, with the
    probe's times, is printed and recorded, and QEMU really runs with it."""
    monkeypatch.delenv("MB_ACCEL", raising=False)
    monkeypatch.setenv("MB_KVM_MAX_SLOWDOWN", "1000")
    with launched(lab, tmp_path) as vm:
        log = vm.launch_log.read_text()
        if not os.path.exists("/dev/kvm"):
            assert vm.accel == "tcg" and vm.accel_reason == "no /dev/kvm" and qemu_accel(vm) == "tcg"
            return
        assert vm.accel == "kvm", log
        assert FAST.match(vm.accel_reason), vm.accel_reason
        assert f"launch-middlebox: accelerator kvm: {vm.accel_reason}" in log
        assert qemu_accel(vm) == "kvm"


def test_the_launcher_follows_its_rule_on_the_probes_times(lab, tmp_path, monkeypatch):
    """By default KVM is used only if the probe's loop ran on it within 10x TCG's time (and at
    least 1 s): a KVM that emulates its guests (this machine's, docs/qemu.md) is reported as
    working but not used.  Whatever this machine's KVM is, the choice follows the printed times."""
    monkeypatch.delenv("MB_ACCEL", raising=False)
    monkeypatch.delenv("MB_KVM_MAX_SLOWDOWN", raising=False)
    with launched(lab, tmp_path) as vm:
        reason = vm.accel_reason
        assert qemu_accel(vm) == vm.accel and f"accelerator {vm.accel}: {reason}" in vm.launch_log.read_text()
        if not os.path.exists("/dev/kvm"):
            assert (vm.accel, reason) == ("tcg", "no /dev/kvm")
            return
        fast, slow = FAST.match(reason), SLOW.match(reason)
        if fast:                                           # (times are printed to 10 ms)
            assert vm.accel == "kvm" and float(fast.group(1)) <= max(10 * float(fast.group(2)), 1.0) + 0.01
        elif slow:
            limit, factor, tcg = float(slow.group(1)), int(slow.group(2)), float(slow.group(3))
            assert vm.accel == "tcg" and factor == 10 and abs(limit - max(10 * tcg, 1.0)) <= 0.1, reason
        else:                                              # no instruction ran on KVM in 30 s
            assert vm.accel == "tcg" and re.match(r"no guest instruction ran on KVM: its probe exited with "
                                                  r"(?!33\b)\d+ after", reason), reason


def test_mb_accel_tcg_is_obeyed_without_a_probe(lab, tmp_path, monkeypatch):
    monkeypatch.setenv("MB_ACCEL", "tcg")
    with launched(lab, tmp_path) as vm:
        assert (vm.accel, vm.accel_reason) == ("tcg", "MB_ACCEL=tcg (no probe)")
        assert "probe took" not in vm.launch_log.read_text()
        assert qemu_accel(vm) == "tcg"


@pytest.mark.parametrize("setting", [("MB_KVM_PROBE_TIMEOUT", "0"), ("MB_KVM_PROBE_TIMEOUT", "2.5"),
                                     ("MB_KVM_MAX_SLOWDOWN", "ten")])
def test_the_launcher_refuses_a_bad_probe_setting(setting):
    import subprocess

    name, value = setting
    done = subprocess.run([str(LAUNCH), "nobridge", "probe", "52:54:00:00:00:01", "/nonexistent", "/nonexistent"],
                          env={**os.environ, name: value}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"{name} must be" in done.stderr and f"'{value}'" in done.stderr


@pytest.fixture
def vm_lab():
    netlab.require_host_tools()
    with Dataplane(progress=lambda message: None, vm=True) as lab:
        yield lab
    assert all(not names for names in lab.lab.leftovers().values())
    assert lab.vm.leftovers() == []


def guest_rule_packets(dataplane: Dataplane, table: str, target: str) -> int:
    """Packets counted by the guest's own iptables rules of ``table`` that jump to ``target``."""
    code, out = dataplane.vm.run(f"iptables -t {table} -L -v -n -x")
    assert code == 0, out
    return sum(int(line.split()[0]) for line in out.splitlines()
               if len(line.split()) > 2 and line.split()[2] == target)


def tap_counters(dataplane: Dataplane) -> tuple[int, int]:
    """(to the guest, from the guest): the tap's tx and rx counters in the root namespace."""
    statistics = Path(f"/sys/class/net/{dataplane.vm.tap}/statistics")
    return int((statistics / "tx_packets").read_text()), int((statistics / "rx_packets").read_text())


def test_the_vm_path_carries_requests_through_the_guest(vm_lab):
    """300 request/response transactions to the VM's address: each request and each answer
    crosses the tap both ways (in to the guest, out again to the backend or the client), the
    guest's own DNAT and SNAT rules count the connection, and the namespace middlebox sees
    none of it.  A flood of the path hits the guest, whose raw rule drops it."""
    assert vm_lab.use(VM_PATH) == VM_IP
    assert vm_lab.vm_info["accel"] == vm_lab.vm.accel in ("kvm", "tcg") and vm_lab.vm_info["accel_reason"]
    to_guest, from_guest = tap_counters(vm_lab)
    mb_rx = vm_lab.mb_rx()
    dnat, snat = guest_rule_packets(vm_lab, "nat", "DNAT"), guest_rule_packets(vm_lab, "nat", "SNAT")

    result = vm_lab.request_response(VM_IP, 300, warmup=10)

    assert result["count"] == 300
    to_after, from_after = tap_counters(vm_lab)
    assert to_after - to_guest >= 2 * 310 and from_after - from_guest >= 2 * 310, (to_after - to_guest,
                                                                                  from_after - from_guest)
    assert guest_rule_packets(vm_lab, "nat", "DNAT") > dnat and guest_rule_packets(vm_lab, "nat", "SNAT") > snat
    assert vm_lab.mb_rx() == mb_rx

    dropped = guest_rule_packets(vm_lab, "raw", "DROP")
    with vm_lab.under_flood(VM_PATH) as flood:
        wait_until(lambda: vm_lab.vm_rx() - to_after >= 1000, 30, interval=0.1, what="the flood to reach the guest")
    assert flood.sent >= 1000
    wait_until(lambda: guest_rule_packets(vm_lab, "raw", "DROP") - dropped >= 1000, 30, interval=0.5,
               what="the guest's raw rule to drop the flood")
    assert vm_lab.use("offloaded") == MB_IP and vm_lab.use(VM_PATH) == VM_IP   # the VM's path ignores offloads


def test_a_guest_that_cannot_start_fails_the_benchmark_by_name(monkeypatch, capsys):
    """No QEMU: the latency benchmark fails (exit 1) saying the through-vm middlebox could not
    be started and why, writes no table, and leaves nothing behind."""
    labs = []

    class Recorded(Dataplane):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            labs.append(self)

    monkeypatch.setattr(dataplane_module, "Dataplane", Recorded)
    monkeypatch.setattr(dataplane_module, "requirements",
                        lambda: ["qemu-system-x86_64 (Debian package qemu-system-x86)"])
    assert latency.main(["--quick", "--rounds", "1"]) == 1
    captured = capsys.readouterr()
    assert ("failed, everything created was removed: the through-vm path's QEMU middlebox could not be built or "
            "started: this machine lacks qemu-system-x86_64 (Debian package qemu-system-x86)") in captured.err
    assert "request/response" not in captured.out
    assert len(labs) == 1 and all(not names for names in labs[0].lab.leftovers().values())
    assert not labs[0].workdir.exists()


def test_tables_compare_the_offload_with_the_vm_under_the_reports_targets():
    def results(p50, **extra):
        return [{"p50_us": p50, "p99_us": 2 * p50, "mb_rx": 2400, "gbps": 1000 / p50, "kpps": 10_000 / p50,
                 **extra}] * 3

    figures = {"through-mb": results(200), "offloaded": results(120), "direct": results(110),
               VM_PATH: results(400, accel="tcg")}
    rows = {(row.metric, row.baseline_name): row for row in latency.rows(figures)}
    p50 = rows[("request/response p50", "through-vm tcg")]
    assert p50.ratio.median == pytest.approx(0.3) and p50.target == ("<=", 0.7) and p50.verdict == "PASS"
    assert rows[("request/response p99", "through-vm tcg")].verdict is None

    flooded = {f"{path} +flood": values for path, values in figures.items()}
    table = {(row.metric, row.baseline_name): row for row in throughput.rows({**figures, **flooded})}
    tcp = table[("client TCP throughput, flood", "through-vm tcg +flood")]
    assert tcp.subject == "offloaded +flood" and tcp.target == (">=", 1.5)
    assert tcp.ratio.median == pytest.approx(400 / 120)
    assert table[("64-byte UDP rate", "through-vm tcg")].target == (">=", 1.25)
