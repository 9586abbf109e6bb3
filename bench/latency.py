"""latency: TCP request/response (one byte each way, TCP_RR style) p50/p99 for the
middlebox's redirected service: through the middlebox (its kernel DNATs to the backend: a
namespace, and a real QEMU middlebox VM) vs the offloaded redirect (the switch rewrites the
connection) vs direct to the backend.

Each round measures every path once (alternating order); the table shows medians over the
rounds with min-max, and ratios computed round by round.  See bench/dataplane.py for the
lab and docs/benchmarks.md for the figures."""

from __future__ import annotations

import sys

from mbvisor.bench.benchlib import compare, start
from mbvisor.bench.dataplane import VM_PATH, Dataplane, path_label, run_in_lab, schedule

TRANSACTIONS = {"default": 5000, "quick": 1000}
TARGET_VS_MB = ("<=", 0.7)       # offloaded p50 / through-middlebox p50 (namespace or VM)
TARGET_VS_DIRECT = ("<=", 1.1)   # offloaded p50 / direct p50


def progress(message: str) -> None:
    print(f"[bench/latency] {message}", file=sys.stderr, flush=True)


def measure(dataplane: Dataplane, rounds: int, transactions: int) -> dict[str, list[dict]]:
    """Per path, one result per round: the client's p50/p99/mean in microseconds and the
    packets that reached that path's middlebox meanwhile (through-vm: also its accelerator)."""
    results: dict[str, list[dict]] = {path: [] for path in dataplane.paths}
    for number, path in schedule(rounds, dataplane.paths):
        target = dataplane.use(path)
        rx = dataplane.middlebox_rx(path)
        result = dataplane.request_response(target, transactions)
        result["mb_rx"] = dataplane.middlebox_rx(path) - rx
        if path == VM_PATH:
            result["accel"] = dataplane.vm_info["accel"]
        results[path].append(result)
        progress(f"round {number + 1}/{rounds} {path:10}: p50 {result['p50_us']:.0f} us, "
                 f"p99 {result['p99_us']:.0f} us, {result['mb_rx']} packets through the middlebox")
    return results


def rows(results: dict[str, list[dict]]) -> list:
    """The table: offloaded against each baseline; the report's target (p50 ≤ 0.7x) against
    both middleboxes, the namespace and the VM."""
    def series(path, key):
        return [result[key] for result in results[path]]

    offloaded, vm = "offloaded", path_label(VM_PATH, results)
    return [
        compare("request/response p50", "us", offloaded, series(offloaded, "p50_us"),
                "through-mb", series("through-mb", "p50_us"), TARGET_VS_MB),
        compare("request/response p50", "us", offloaded, series(offloaded, "p50_us"),
                vm, series(VM_PATH, "p50_us"), TARGET_VS_MB),
        compare("request/response p50", "us", offloaded, series(offloaded, "p50_us"),
                "direct", series("direct", "p50_us"), TARGET_VS_DIRECT),
        compare("request/response p99", "us", offloaded, series(offloaded, "p99_us"),
                "through-mb", series("through-mb", "p99_us")),
        compare("request/response p99", "us", offloaded, series(offloaded, "p99_us"),
                vm, series(VM_PATH, "p99_us")),
        compare("request/response p99", "us", offloaded, series(offloaded, "p99_us"),
                "direct", series("direct", "p99_us")),
        compare("packets through the middlebox", "packets", offloaded, series(offloaded, "mb_rx"),
                "through-mb", series("through-mb", "mb_rx"), ("<=", 0), target_on="value"),
        compare("packets through the middlebox", "packets", offloaded, series(offloaded, "mb_rx"),
                vm, series(VM_PATH, "mb_rx")),
    ]


def main(argv: list[str] | None = None) -> int:
    args, mode, when = start(__doc__.split("\n\n")[0], "1000 transactions per path and round, 2 rounds",
                             argv, rounds=(5, 2))
    transactions = TRANSACTIONS[mode]
    return run_in_lab("latency", args, mode, when, progress,
                      lambda dataplane: measure(dataplane, args.rounds, transactions), rows, vm=True,
                      transactions=transactions)


if __name__ == "__main__":
    sys.exit(main())
