#!/usr/bin/env python3
"""qemu_interrupts: virtio-net input interrupts in a real QEMU middlebox guest per 100,000
attack packets, before the offload (the guest receives the attack and would filter it
itself) and after the guest's own ``mbctl filter add`` (the switch drops it).

One VM (TCG) on a netlab bridge with the real controller and agent
(``mbvisor.topologies.qemu.scenario``); an attacker namespace floods the guest's address
with minimum-size UDP frames from ``mausezahn``, paced ``DELAY_US`` apart.  Each round:

1. flood, wait until the guest's eth0 rx accounts for what was sent (or stops rising),
   read the deltas of the guest's virtio input interrupts and eth0 rx and of the switch's
   drop counters;
2. ``mbctl register`` (first round only) and ``mbctl filter add --layer ip --src ATTACKER``
   in the guest, through its ivshmem channel;
3. the same flood, wait until the switch's drop counters account for it, read the deltas;
4. ``mbctl filter del`` (when another round follows): the next round starts from "before".

    python bench/qemu_interrupts.py            # 2 rounds of 100,000 packets per phase (~55 s)
    python bench/qemu_interrupts.py --quick    # 1 round of 20,000 packets (~12 s)
    python bench/qemu_interrupts.py --rounds 3 --json out.json

Figures are normalised to 100,000 packets sent (the attacker's tx counter).  Needs root,
Open vSwitch, mausezahn (netsniff-ng) and the QEMU packages (docs/qemu.md).  Everything it
creates (VM, tap, region, bridge, namespace, controller, agent, state directory) is
removed on exit, also on failure or Ctrl-C.  ``bench/wakeups.py`` uses :func:`measure`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from mbvisor.bench.benchlib import BenchError, compare, finish, measured, start
from mbvisor.topologies.netlab import Lab, NetlabError, require_host_tools, wait_until
from mbvisor.topologies.qemu.scenario import GUEST_IP, GUEST_MAC, Counters, Scenario, attacked_middlebox
from mbvisor.topologies.qemu.vm import VMError
from mbvisor.topologies.traffic import MAUSEZAHN, flood

# mausezahn's -d: what it achieves here is about 1 / (delay + ~95 us) per second, since each
# packet also costs a timer wake-up (see docs/qemu.md): 20 us gives 8,200-9,300 packets/s,
# 100,000 packets in 11-12 s, and the TCG guest still receives (nearly) all of them.
DELAY_US = 20
PER_100K = 100_000
QUIET = 2.0                     # s without any counter moving: the rest of the attack is lost
SETTLE_TIMEOUT = 60.0           # s after the flood for the counters to account for it
PACKETS = {"default": 100_000, "quick": 20_000}


def progress(message: str) -> None:
    print(f"[bench/qemu_interrupts] {message}", file=sys.stderr, flush=True)


def attack(mb: Scenario, packets: int, delay_us: int) -> tuple[int, float, Counters]:
    """Flood the guest; wait until the guest's rx plus the switch's drops account for what
    was sent, or until no counter has moved for QUIET seconds.  Returns (sent, seconds the
    flood took, counter deltas)."""
    start_counters = mb.counters()
    started = time.monotonic()
    sent = flood(mb.attacker, GUEST_IP, GUEST_MAC, packets, delay_us=delay_us)
    seconds = time.monotonic() - started
    last = {"counters": None, "since": time.monotonic()}

    def settled() -> Counters | None:
        delta = mb.counters() - start_counters
        if delta.guest_rx + delta.switch_drops >= sent:
            return delta
        if delta != last["counters"]:
            last.update(counters=delta, since=time.monotonic())
            return None
        return delta if time.monotonic() - last["since"] >= QUIET else None

    delta = wait_until(settled, timeout=SETTLE_TIMEOUT, interval=0.2,
                       what=f"the guest's rx and the switch's drops to account for {sent} attack packets")
    return sent, seconds, delta


def measure(rounds: int, packets: int = 100_000, delay_us: int = DELAY_US,
            progress: Callable[[str], None] = print) -> list[dict]:
    """One QEMU middlebox, ``rounds`` rounds of ``packets`` attack packets before and after
    the offload.  Per round: sent_before, interrupts_before, guest_rx_before,
    switch_drops_before, the same ``_after``, and the floods' durations (seconds_before,
    seconds_after).  Raises BenchError (or the lab's / VM's error) when it cannot measure."""
    if rounds < 1 or packets < 1:
        raise ValueError("measure() needs rounds >= 1 and packets >= 1")
    require_host_tools()
    if shutil.which(MAUSEZAHN) is None:
        raise BenchError(f"{MAUSEZAHN} is missing (Debian package netsniff-ng)")
    results = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mbvisor-qemu-bench-") as state, Lab() as lab, \
            attacked_middlebox(lab, Path(state)) as mb:
        progress(f"QEMU middlebox ready in {time.monotonic() - started:.1f} s (image "
                 f"{'cached' if mb.image['cached'] else 'built'}); {packets} packets per phase, "
                 f"{delay_us} us apart")
        for number in range(rounds):
            phases = {}
            for phase in ("before", "after"):
                if phase == "after":
                    mb.offload()
                sent, seconds, delta = attack(mb, packets, delay_us)
                phases.update({f"sent_{phase}": sent, f"interrupts_{phase}": delta.interrupts,
                               f"guest_rx_{phase}": delta.guest_rx, f"switch_drops_{phase}": delta.switch_drops,
                               f"seconds_{phase}": round(seconds, 3)})
                progress(f"round {number + 1}/{rounds} {phase:6} offload: sent {sent} in {seconds:.1f} s "
                         f"({sent / seconds:.0f}/s), guest rx {delta.guest_rx}, virtio input interrupts "
                         f"{delta.interrupts}, dropped in the switch {delta.switch_drops}")
            if number + 1 < rounds:
                mb.withdraw()
            results.append(phases)
    progress(f"measured in {time.monotonic() - started:.0f} s, everything removed")
    return results


def per_100k(results: list[dict], key: str, phase: str) -> list[float]:
    """``key_<phase>`` of each round per 100,000 packets sent in that phase."""
    return [r[f"{key}_{phase}"] * PER_100K / r[f"sent_{phase}"] if r[f"sent_{phase}"] else float("nan")
            for r in results]


def rows(results: list[dict]) -> list:
    """Per 100,000 attack packets: the guest's virtio input interrupts and received packets."""
    return [compare(f"QEMU {what} per 100k", unit, "offloaded", per_100k(results, key, "after"),
                    "in-guest filtering", per_100k(results, key, "before"), ("<=", 0), target_on="value")
            for what, unit, key in (("virtio irqs", "irqs", "interrupts"), ("guest rx", "packets", "guest_rx"))]


def main(argv: list[str] | None = None) -> int:
    args, mode, when = start(__doc__.split("\n\n")[0], "1 round of 20,000 packets per phase", argv, rounds=(2, 1))
    packets = PACKETS[mode]
    started = time.monotonic()
    status, results = measured(progress, lambda: measure(args.rounds, packets=packets, progress=progress),
                               failures=(NetlabError, VMError))
    if status is not None:
        return status
    rates = [r[f"sent_{p}"] / r[f"seconds_{p}"] for r in results for p in ("before", "after")]
    return finish("qemu_interrupts", mode, when, args.rounds, rows(results), args.json, progress,
                  packets=packets, delay_us=DELAY_US, achieved_packets_per_s=[round(r) for r in rates],
                  seconds=round(time.monotonic() - started, 1), per_round=results)


if __name__ == "__main__":
    sys.exit(main())
