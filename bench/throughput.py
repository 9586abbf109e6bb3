"""throughput: client TCP throughput and 64-byte UDP packet rate (iperf3) to the
middlebox's redirected service: through the middlebox (a namespace, and a real QEMU
middlebox VM) vs the offloaded redirect vs direct to the backend, each with and without an
attacker flooding the middlebox on the path (mausezahn, as fast as it goes, for the whole
measurement).

Each round measures every path once (alternating order); the table shows medians over the
rounds with min-max, and ratios computed round by round.  See bench/dataplane.py for the
lab and docs/benchmarks.md for the figures."""

from __future__ import annotations

import contextlib
import sys

from mbvisor.bench.benchlib import compare, start
from mbvisor.bench.dataplane import VM_PATH, Dataplane, path_label, run_in_lab, schedule

SECONDS = {"default": 4.0, "quick": 2.0}     # per iperf3 run
TARGETS = {("through-mb", False): (">=", 1.25), ("through-mb", True): (">=", 1.5),
           (VM_PATH, False): (">=", 1.25), (VM_PATH, True): (">=", 1.5),
           ("direct", False): (">=", 0.95), ("direct", True): (">=", 0.95)}
KINDS = (("client TCP throughput", "Gb/s", "gbps"), ("64-byte UDP rate", "kpps", "kpps"))


def progress(message: str) -> None:
    print(f"[bench/throughput] {message}", file=sys.stderr, flush=True)


def case(path: str, flooded: bool) -> str:
    return f"{path}{' +flood' if flooded else ''}"


def measure(dataplane: Dataplane, rounds: int, seconds: float) -> dict[str, list[dict]]:
    """Per case (path, with or without flood), one result per round: TCP Gb/s, UDP kpps
    received by the backend, the flood's packets, packets through the path's middlebox
    (through-vm: also its accelerator)."""
    results: dict[str, list[dict]] = {case(path, flooded): [] for path in dataplane.paths for flooded in (False, True)}
    for number, path in schedule(rounds, dataplane.paths):
        target = dataplane.use(path)
        for flooded in (False, True):
            rx = dataplane.middlebox_rx(path)
            attack = dataplane.under_flood(path) if flooded else contextlib.nullcontext()
            with attack:
                tcp = dataplane.iperf(target, seconds)
                udp = dataplane.iperf(target, seconds, udp=True)
            result = {"gbps": tcp["gbps"], "tcp_retransmits": tcp["retransmits"], "kpps": udp["pps"] / 1000,
                      "udp_sent_kpps": udp["sent_pps"] / 1000, "flood_sent": attack.sent if flooded else 0,
                      "mb_rx": dataplane.middlebox_rx(path) - rx}
            if path == VM_PATH:
                result["accel"] = dataplane.vm_info["accel"]
            results[case(path, flooded)].append(result)
            progress(f"round {number + 1}/{rounds} {case(path, flooded):17}: TCP {result['gbps']:.2f} Gb/s, "
                     f"UDP {result['kpps']:.1f} kpps" + (f", flood {result['flood_sent']} packets" if flooded else ""))
    return results


def rows(results: dict[str, list[dict]]) -> list:
    """Offloaded against each baseline (the namespace middlebox, the VM, direct), without and
    with the flood; the report's targets against both middleboxes."""
    table = []
    for metric, unit, key in KINDS:
        for flooded in (False, True):
            subject = case("offloaded", flooded)
            for baseline in ("through-mb", VM_PATH, "direct"):
                label = path_label(baseline, {VM_PATH: results[case(VM_PATH, flooded)]})
                table.append(compare(
                    f"{metric}{', flood' if flooded else ''}", unit, subject,
                    [r[key] for r in results[subject]], case(label, flooded),
                    [r[key] for r in results[case(baseline, flooded)]], TARGETS[(baseline, flooded)]))
    return table


def main(argv: list[str] | None = None) -> int:
    args, mode, when = start(__doc__.split("\n\n")[0], "2 s per iperf3 run, 1 round", argv, rounds=(3, 1))
    seconds = SECONDS[mode]
    return run_in_lab("throughput", args, mode, when, progress,
                      lambda dataplane: measure(dataplane, args.rounds, seconds), rows, vm=True,
                      seconds_per_run=seconds)


if __name__ == "__main__":
    sys.exit(main())
