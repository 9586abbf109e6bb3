#!/usr/bin/env python3
"""Benchmark of the controller against a real OVS bridge, beside the switch's own limits.

* command latency: one command at a time through the REST endpoint until the switch
  confirmed its flow (alternating add/delete of a filter), p50/p99 over N commands;
  baselines in the same run: the same round trip for a query (controller only, no
  switch work) and ``ovs-ofctl add-flow`` of one flow (an operator's way).
* bulk install: 1k / 10k / 100k IP filters over 1,000 middleboxes through the batch
  endpoint (each middlebox's filters together, as a guest would send them); baseline:
  ``ovs-ofctl --bundle add-flows`` of exactly the flows the controller installed, into the
  emptied bridge, after which both tables must be identical (the run fails otherwise);
  ovs-vswitchd's CPU for each, and the controller's.
* memory: the controller's and ovs-vswitchd's resident memory after each size.

Prints a stable table (same rows every run) and writes the figures as JSON with --json.
Needs root and a running Open vSwitch (``make setup``).  Everything it creates (a bridge
with a unique name, a controller process, a state directory) is removed on exit or Ctrl-C.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from mbvisor.bench.benchlib import BenchError
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import Lab, require_host_tools

MIDDLEBOXES = 1000
# All on one port of a lab bridge: the per-port bound (a lab's defence of the host's zones)
# is raised for this stress of the controller.
ENVIRONMENT = {"MBVISOR_MAX_PER_PORT": str(MIDDLEBOXES)}
BATCH_MIDDLEBOXES = 10  # middleboxes per request in the bulk install
IN_FLIGHT = 2  # bulk install requests outstanding at a time
TARGET_P99_MS = 10.0
TARGET_BULK_RATIO = 1.5            # install 100k filters vs ovs-ofctl --bundle, seconds
TARGET_VSWITCHD_CPU_RATIO = 1.2    # ovs-vswitchd's CPU for that install vs for the bundle
TARGET_MEMORY_MB = 150.0           # the controller's resident memory at 100k filters


def progress(message: str) -> None:
    print(f"[bench/controller] {message}", file=sys.stderr, flush=True)


def mac(index: int) -> str:
    return "52:34:{:02x}:{:02x}:{:02x}:{:02x}".format(*(index + 1).to_bytes(4, "big"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (utime + stime, every thread) ``pid`` has used so far, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(action, *pids: int) -> tuple[object, list[float]]:
    """``action()``'s result and the CPU seconds each of ``pids`` used while it ran."""
    before = [cpu_seconds(pid) for pid in pids]
    result = action()
    return result, [cpu_seconds(pid) - used for pid, used in zip(pids, before)]


def vswitchd_pid() -> int:
    """The ovs-vswitchd that ovs-vsctl talks to (a PrivateSwitch's while one is open)."""
    rundir = os.environ.get("OVS_RUNDIR", "/var/run/openvswitch")
    return int(Path(rundir, "ovs-vswitchd.pid").read_text().strip())


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def measure_latency(controller: Controller, bridge, commands: int) -> dict:
    dpid, port, owner = bridge.dpid, 1, mac(0)
    controller.ok(dpid, port, f"R F {owner} 10.0.0.5")
    texts = [f"{'A' if i % 2 == 0 else 'D'} {owner} I 4 s 10.99.{(i // 2) % 250}.{(i // 500) + 1}"
             for i in range(commands)]
    progress(f"latency: {commands} commands one at a time ...")
    confirmed = [timed(lambda t=text: controller.ok(dpid, port, t)) for text in texts]
    queries = [timed(lambda: controller.ok(dpid, port, f"I {owner}")) for _ in range(commands)]
    samples = max(20, commands // 20)
    progress(f"latency baseline: {samples} x ovs-ofctl add-flow ...")
    ofctl = [timed(lambda i=i: bridge.add_flow(f"cookie=0x1,priority=5,ip,nw_src=10.98.{i // 250}.{i % 250},"
                                               "actions=drop")) for i in range(samples)]
    bridge.del_flows("cookie=0x1/-1")
    controller.ok(dpid, port, f"X {owner}")
    return {"command": confirmed, "query": queries, "ofctl": ofctl}


def install(controller: Controller, bridge, filters: int) -> float:
    """Register MIDDLEBOXES middleboxes (not timed), then time installing ``filters``."""
    register_middleboxes(controller, bridge.dpid)
    return add_filters(controller, bridge.dpid, filters)


def register_middleboxes(controller: Controller, dpid: int) -> None:
    """MIDDLEBOXES firewall middleboxes on port 1 of ``dpid``, a hundred per request."""
    for first in range(0, MIDDLEBOXES, 100):
        answers = controller.batch(dpid, 1, [f"R F {mac(i)} 10.1.{i // 250}.{i % 250 + 1}"
                                             for i in range(first, first + 100)])
        if any(a["status"] != "OK" for a in answers):
            raise BenchError(f"registration refused: {answers[:3]}")


def add_filters(controller: Controller, dpid: int, filters: int) -> float:
    """Seconds to install ``filters`` IP filters spread over the registered middleboxes,
    BATCH_MIDDLEBOXES middleboxes' filters per request, answered once confirmed with its failures
    only (``"answers": "failures"``, as a bulk loader asks: no 10 MB of echoes).
    IN_FLIGHT requests are outstanding at a time, as a bulk loader streams: while the
    switch applies one request's bundle, the next is already on its way (``ovs-ofctl
    --bundle``, the baseline, streams its whole file without waiting either)."""
    per_mb = filters // MIDDLEBOXES

    def send(first: int) -> None:
        texts = [f"A {mac(i)} I 4 s 10.{200 + f // 62500}.{(f // 250) % 250}.{f % 250 + 1}"
                 for i in range(first, first + BATCH_MIDDLEBOXES) for f in range(per_mb)]
        failures = controller.load(dpid, 1, texts)
        if failures:
            raise BenchError(f"{len(failures)} filters refused, e.g. {failures[0]}")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(send, range(0, MIDDLEBOXES, BATCH_MIDDLEBOXES)))  # raises a request's BenchError
    return time.perf_counter() - started


def bundle_baseline(bridge, workdir: Path, filters: int) -> dict:
    """``ovs-ofctl --bundle add-flows`` of the flows the controller installed (its drop
    flows), into the same bridge emptied and detached from the controller, so that the
    bundle alone writes it: its seconds, ovs-vswitchd's CPU seconds for it, and the number
    of flows.  BenchError if the controller installed fewer flows than ``filters`` (the
    comparison would be with nothing) or if the bundle's table differs from the
    controller's: only the same flows make the two times comparable."""
    installed = sorted(line for line in bridge.dump_flows(no_stats=True) if "actions=drop" in line)
    if len(installed) < filters:
        raise BenchError(f"only {len(installed)} drop flows in the switch after installing {filters} filters")
    path = workdir / "flows.txt"
    path.write_text("\n".join(installed) + "\n")
    bridge.set_controller(None)
    bridge.del_flows()
    seconds, (vswitchd_cpu,) = with_cpu(lambda: bundle(bridge, path), vswitchd_pid())
    same_flows(installed, sorted(bridge.dump_flows(no_stats=True)))
    return {"bundle_seconds": seconds, "bundle_vswitchd_cpu_s": vswitchd_cpu, "flows": len(installed)}


def bundle(bridge, path: Path) -> float:
    """Seconds for ``ovs-ofctl --bundle add-flows`` of the flows in ``path``."""
    started = time.perf_counter()
    subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "--bundle", "add-flows", bridge.name, str(path)], check=True)
    return time.perf_counter() - started


def same_flows(controller_flows: list[str], bundle_flows: list[str]) -> None:
    """BenchError naming the first flows that differ unless the two sorted ``dump-flows
    --no-stats`` tables are equal.  ``--no-stats`` already leaves out what differs between
    equal flows (durations, counters, ages); cookies, tables, priorities, flags, matches and
    actions are all compared."""
    if controller_flows == bundle_flows:
        return
    only_controller = sorted(set(controller_flows) - set(bundle_flows))
    only_bundle = sorted(set(bundle_flows) - set(controller_flows))
    raise BenchError(f"the bundle installed other flows than the controller: {len(only_controller)} only in the "
                     f"controller's table, e.g. {only_controller[:3]}; {len(only_bundle)} only in the bundle's, "
                     f"e.g. {only_bundle[:3]}")


def run(args) -> dict:
    require_host_tools()
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "python": platform.python_version(), "cpus": os.cpu_count(), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="mbvisor-bench-") as work, Lab() as lab:
        workdir = Path(work)
        (workdir / "latency").mkdir()
        controller = Controller(workdir / "latency", environment=ENVIRONMENT).start()
        try:
            bridge = lab.bridge(controller=controller.target, fail_mode="secure")
            controller.wait_switch(bridge.dpid)
            result["latency"] = measure_latency(controller, bridge, args.commands)
        finally:
            controller.stop()
        for filters in args.sizes:
            result["sizes"][str(filters)] = bulk_size(lab, workdir / f"bulk-{filters}", filters)
    return result


def bulk_size(lab: Lab, state: Path, filters: int, say=progress) -> dict:
    """One size of the bulk install, on a fresh bridge of ``lab`` with a fresh controller
    (its state in the new directory ``state``, stopped on the way out whatever happens):
    the install's and the bundle's seconds and ovs-vswitchd's CPU seconds for each, the
    controller's CPU seconds for the install, whether the two installed the same flows (the
    run fails if not), and the resident memory (MB) of the controller after the install
    and of ovs-vswitchd before (empty bridge) and after it."""
    state.mkdir()
    controller = Controller(state, environment=ENVIRONMENT)
    try:
        controller.start()
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        controller.wait_switch(bridge.dpid)
        register_middleboxes(controller, bridge.dpid)
        vswitchd = vswitchd_pid()
        vswitchd_before = rss_mb(vswitchd)
        say(f"bulk: {filters} filters over {MIDDLEBOXES} middleboxes ...")
        seconds, (controller_cpu, vswitchd_cpu) = with_cpu(lambda: add_filters(controller, bridge.dpid, filters),
                                                           controller.process.pid, vswitchd)
        memory = {"controller_mb": rss_mb(controller.process.pid), "vswitchd_mb": rss_mb(vswitchd)}
        say(f"bulk baseline: ovs-ofctl --bundle add-flows of the same {filters} flows ...")
        baseline = bundle_baseline(bridge, state, filters)
        bridge.del_flows()  # the next size starts from an empty switch
    finally:
        controller.stop()
    return {"seconds": seconds, "controller_cpu_s": controller_cpu, "vswitchd_cpu_s": vswitchd_cpu, **baseline,
            "flows_identical": True, **memory, "vswitchd_before_mb": vswitchd_before}


def report(result: dict) -> str:
    latency = result["latency"]
    command, query, ofctl = latency["command"], latency["query"], latency["ofctl"]
    rows = []

    def row(metric, value, baseline, target=None, passed=None):
        ratio = value / baseline if baseline else float("nan")
        verdict = "-" if passed is None else ("PASS" if passed else "MISS")
        rows.append(f"{metric:44} {value:12.2f} {baseline:14.2f} {ratio:7.2f}  {target or '-':14} {verdict}")

    row("command -> flow confirmed p50 (ms)", statistics.median(command), statistics.median(ofctl))
    row("command -> flow confirmed p99 (ms)", percentile(command, 0.99), percentile(ofctl, 0.99),
        f"<= {TARGET_P99_MS:g}", percentile(command, 0.99) <= TARGET_P99_MS)
    row("query round trip p50 (ms)", statistics.median(query), statistics.median(ofctl))
    for filters, size in result["sizes"].items():
        ratio_ok = size["seconds"] <= TARGET_BULK_RATIO * size["bundle_seconds"]
        row(f"install {int(filters):>6} filters / {MIDDLEBOXES} MBs (s)", size["seconds"], size["bundle_seconds"],
            f"<= {TARGET_BULK_RATIO:g}x", ratio_ok)
    for filters, size in result["sizes"].items():
        cpu_ok = size["vswitchd_cpu_s"] <= TARGET_VSWITCHD_CPU_RATIO * size["bundle_vswitchd_cpu_s"]
        row(f"ovs-vswitchd CPU at {int(filters):>6} filters (s)", size["vswitchd_cpu_s"],
            size["bundle_vswitchd_cpu_s"], f"<= {TARGET_VSWITCHD_CPU_RATIO:g}x" if filters == "100000" else None,
            cpu_ok if filters == "100000" else None)
    for filters, size in result["sizes"].items():
        row(f"controller memory at {int(filters):>6} filters (MB)", size["controller_mb"], size["vswitchd_mb"],
            f"<= {TARGET_MEMORY_MB:g}" if filters == "100000" else None,
            size["controller_mb"] <= TARGET_MEMORY_MB if filters == "100000" else None)
    head = (f"mbvisor controller benchmark  {result['when']}  python {result['python']}  cpus {result['cpus']}\n"
            f"{'metric':44} {'controller':>12} {'baseline':>14} {'ratio':>7}  {'target':14} result")
    notes = ("notes: latency baseline = ovs-ofctl add-flow of one flow (process start included); "
             "install and ovs-vswitchd CPU baseline = ovs-ofctl --bundle add-flows of the same flows\n"
             "       (the run fails unless both install identical flows);\n"
             "       memory baseline column = ovs-vswitchd resident memory at the same size.")
    return "\n".join([head, *rows, notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000, help="latency samples (default 1000)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000],
                        help="filter counts for the bulk install (default 1000 10000 100000)")
    parser.add_argument("--quick", action="store_true", help="200 commands, sizes 1000 10000")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.commands, args.sizes = 200, [1000, 10000]
    try:
        result = run(args)
    except KeyboardInterrupt:
        progress("interrupted; everything created was removed")
        return 130
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
