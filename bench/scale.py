"""scale: does the data path stay fast with many offloads?  Client TCP throughput and
64-byte UDP rate over the offloaded redirect with no other offloads vs with 100,000 IP
filters of 1,000 other middleboxes installed through the controller (the switch's megaflow
cache should make the number of rules irrelevant to packets of established flows).

Each round measures with none, installs the filters (timed), measures again and removes
them (every other middlebox cancels), so each ratio compares neighbouring measurements;
each measurement is the median of three iperf3 runs.
See bench/dataplane.py for the lab and docs/benchmarks.md for the figures."""

from __future__ import annotations

import statistics
import sys

from mbvisor.bench.benchlib import BenchError, compare, start
from mbvisor.bench.controller import MIDDLEBOXES, install, mac, rss_mb, vswitchd_pid
from mbvisor.bench.dataplane import Dataplane, run_in_lab

FILTERS = {"default": 100_000, "quick": 10_000}
SECONDS = {"default": 3.0, "quick": 2.0}
SAMPLES = {"default": 3, "quick": 1}     # iperf3 runs per state and round (their median counts)
TARGET = (">=", 0.95)


def progress(message: str) -> None:
    print(f"[bench/scale] {message}", file=sys.stderr, flush=True)


def remove_others(dataplane: Dataplane) -> None:
    """Every other middlebox cancels its registration; their flows must all be gone."""
    controller, dpid = dataplane.controller, dataplane.bridge.dpid
    for first in range(0, MIDDLEBOXES, 100):
        answers = controller.batch(dpid, 1, [f"X {mac(i)}" for i in range(first, first + 100)])
        if any(answer["status"] != "OK" for answer in answers):
            raise BenchError(f"cancel refused: {[a for a in answers if a['status'] != 'OK'][:2]}")


def drop_flows(dataplane: Dataplane) -> int:
    return sum(1 for line in dataplane.bridge.dump_flows(no_stats=True) if "actions=drop" in line)


def throughput(dataplane: Dataplane, seconds: float, samples: int) -> dict:
    """Median of ``samples`` iperf3 runs each of TCP and UDP over the offloaded redirect: one
    run varies by ±10 % on this machine, more than the effect the target is about."""
    target = dataplane.use("offloaded")
    tcp = [dataplane.iperf(target, seconds)["gbps"] for _ in range(samples)]
    udp = [dataplane.iperf(target, seconds, udp=True)["pps"] / 1000 for _ in range(samples)]
    return {"gbps": statistics.median(tcp), "kpps": statistics.median(udp), "gbps_runs": tcp, "kpps_runs": udp}


def measure(dataplane: Dataplane, rounds: int, filters: int, seconds: float, samples: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"none": [], "many": []}
    for number in range(rounds):
        empty = throughput(dataplane, seconds, samples)
        empty["drop_flows"] = drop_flows(dataplane)
        progress(f"round {number + 1}/{rounds} installing {filters} filters of {MIDDLEBOXES} other middleboxes ...")
        installed = install(dataplane.controller, dataplane.bridge, filters)
        full = throughput(dataplane, seconds, samples)
        full.update(drop_flows=drop_flows(dataplane), install_s=installed,
                    vswitchd_mb=rss_mb(vswitchd_pid()), controller_mb=rss_mb(dataplane.controller.process.pid))
        if full["drop_flows"] < filters:
            raise BenchError(f"only {full['drop_flows']} drop flows in the switch after installing {filters}")
        remove_others(dataplane)
        results["none"].append(empty)
        results["many"].append(full)
        progress(f"round {number + 1}/{rounds}: TCP {empty['gbps']:.2f} -> {full['gbps']:.2f} Gb/s, UDP "
                 f"{empty['kpps']:.1f} -> {full['kpps']:.1f} kpps ({full['drop_flows']} drop flows, "
                 f"installed in {installed:.1f} s)")
    return results


def rows(results: dict[str, list[dict]], filters: int) -> list:
    many, none = f"{filters // 1000}k filters", "0 filters"
    return [compare(metric, unit, many, [r[key] for r in results["many"]], none,
                    [r[key] for r in results["none"]], TARGET)
            for metric, unit, key in (("client TCP throughput", "Gb/s", "gbps"), ("64-byte UDP rate", "kpps", "kpps"))]


def main(argv: list[str] | None = None) -> int:
    args, mode, when = start(__doc__.split("\n\n")[0], "10,000 filters, 2 s runs, 1 round", argv, rounds=(3, 1))
    filters, seconds, samples = FILTERS[mode], SECONDS[mode], SAMPLES[mode]
    return run_in_lab("scale", args, mode, when, progress,
                      lambda dataplane: measure(dataplane, args.rounds, filters, seconds, samples),
                      lambda results: rows(results, filters), filters=filters, middleboxes=MIDDLEBOXES,
                      seconds_per_run=seconds, runs_per_state=samples)


if __name__ == "__main__":
    sys.exit(main())
