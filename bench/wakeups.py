"""wakeups: how much of an attack still reaches the middlebox.  An attacker floods the
middlebox's address with UDP; counted are the packets that reach the middlebox's interface
per million sent, when the middlebox filters them itself (iptables in its namespace, the
in-guest way) vs when its filter is offloaded to the switch.  Then the same with a real
QEMU guest: virtio-net input interrupts in the guest per 100,000 attack packets, before
and after the guest's ``mbctl filter add`` (bench/qemu_interrupts.py).

Each round measures both ways once; the table shows medians over the rounds with min-max.
See bench/dataplane.py for the namespace lab and docs/benchmarks.md for the figures."""

from __future__ import annotations

import sys
import time

from mbvisor.bench import qemu_interrupts
from mbvisor.bench.benchlib import compare, finish, measured, start
from mbvisor.bench.dataplane import Dataplane
from mbvisor.topologies.netlab import NetlabError
from mbvisor.topologies.qemu.vm import VMError

PACKETS = {"default": 1_000_000, "quick": 200_000}        # namespace flood, per way and round
PER_MILLION = 1_000_000


def progress(message: str) -> None:
    print(f"[bench/wakeups] {message}", file=sys.stderr, flush=True)


def measure_namespaces(dataplane: Dataplane, rounds: int, packets: int) -> dict[str, list[dict]]:
    """Per way ("in-guest filtering", "offloaded"), one attack() result per round."""
    results: dict[str, list[dict]] = {"in-guest filtering": [], "offloaded": []}
    for number in range(rounds):
        ways = ("in-guest filtering", "offloaded") if number % 2 == 0 else ("offloaded", "in-guest filtering")
        for way in ways:
            dataplane.use("through-mb" if way == "in-guest filtering" else "offloaded")
            result = dataplane.attack(packets)
            results[way].append(result)
            progress(f"round {number + 1}/{rounds} {way:18}: sent {result['sent']}, reached the middlebox "
                     f"{result['reached_mb']}, dropped in the switch {result['dropped_in_switch']}")
    return results


def per(count: int, sent: int, unit: int) -> float:
    return count * unit / sent if sent else float("nan")


def rows(namespaces: dict[str, list[dict]], qemu: list[dict]) -> list:
    def scaled(results, key, sent_key, unit):
        return [per(r[key], r[sent_key], unit) for r in results]

    offloaded, software = namespaces["offloaded"], namespaces["in-guest filtering"]
    return [
        compare("attack packets at the MB per 1M", "packets", "offloaded",
                scaled(offloaded, "reached_mb", "sent", PER_MILLION), "in-guest filtering",
                scaled(software, "reached_mb", "sent", PER_MILLION), ("<=", 0), target_on="value"),
        # (the switch drops nothing without the offload: no baseline, the ratio would be infinite)
        compare("dropped in the switch per 1M", "packets", "offloaded",
                scaled(offloaded, "dropped_in_switch", "sent", PER_MILLION)),
        *qemu_interrupts.rows(qemu),
    ]


def main(argv: list[str] | None = None) -> int:
    args, mode, when = start(__doc__.split("\n\n")[0], "200,000 packets per way (QEMU: 20,000), fewer rounds",
                             argv, rounds=(3, 1))
    started = time.monotonic()

    def body():
        with Dataplane(progress) as dataplane:
            namespaces = measure_namespaces(dataplane, args.rounds, PACKETS[mode])
        progress("the QEMU middlebox (a TCG guest, ready in about 5 s with its image cached)")
        return namespaces, qemu_interrupts.measure(args.rounds, packets=qemu_interrupts.PACKETS[mode],
                                                   progress=progress)

    status, results = measured(progress, body, failures=(NetlabError, VMError))
    if status is not None:
        return status
    namespaces, qemu = results
    progress(f"done in {time.monotonic() - started:.0f} s")
    return finish("wakeups", mode, when, args.rounds, rows(namespaces, qemu), args.json, progress,
                  packets=PACKETS[mode], qemu_packets=qemu_interrupts.PACKETS[mode], namespaces=namespaces, qemu=qemu)


if __name__ == "__main__":
    sys.exit(main())
