#!/usr/bin/env python3
"""The control benchmark: a guest's command until its flow is confirmed, and bulk installs.

Real parts only, over several rounds (``--rounds``, default 3), each figure beside a
baseline measured in the same round:

* command -> flow confirmed p50/p99: a guest's command (alternating add and delete of an
  IP filter, so every command changes a flow) written into its region with
  ``ChannelWriter.request()``, read by the real ``mbvisor agent``, forwarded to the real
  ``mbvisor controller``, which answers once the switch confirmed the flow; baseline: the
  same commands posted to the controller's REST API directly.  The phases of
  ``bench/agent.py``, set up once (33 VMs as OVS internal ports, one agent serving all of
  them) and measured every round.
* commands/s sustained: 32 channels at once, one writer process per channel pipelining;
  baseline: the same commands posted directly from 32 REST clients.
* bulk install of 1k / 10k / 100k IP filters over 1,000 middleboxes through the batch
  endpoint (asking for failures only, as a bulk loader does), each size on a fresh bridge
  of a fresh switch with a fresh controller every round; baseline: ``ovs-ofctl --bundle add-flows`` of exactly the flows the controller
  installed, into the emptied bridge (``bench/controller.py``'s install).  The two tables
  (sorted ``dump-flows --no-stats``) must be identical, or the run fails: "flows
  identical" says they were.  ovs-vswitchd's CPU (utime+stime) for the install beside its
  CPU for the bundle; the controller's CPU per filter; the controller's resident memory,
  and ovs-vswitchd's beside its own on the same empty bridge before the install.
* while the largest size installs once more (on a fresh switch and controller, so that
  this load does not count in the figures above), p99 of ``GET /v1/health`` asked back to
  back by another client, and p99 of single commands (alternating add and delete of one
  IP filter, each waited for) to a second bridge of the same controller; both only while
  the install runs, and the run fails with fewer than 10 samples of either.

    python bench/control.py            # about 3 minutes on 2 cores (mbvisor bench control)
    python bench/control.py --quick    # sizes 1k and 10k, fewer commands, 2 rounds: about a minute
    python bench/control.py --rounds 5 --json out.json

Targets: p99 <= 15 ms end to end; at 100k filters: the install within 1.5x of the bundle,
ovs-vswitchd's CPU for it within 1.2x of its CPU for the bundle, the controller <= 150 MB,
and during the install health p99 <= 100 ms and the other switch's command p99 <= 50 ms.
Needs root and a running Open vSwitch (``make setup``).
Everything it creates (bridges, ports, regions, processes, a state directory) is removed
on exit, including on Ctrl-C.  Like bench/agent.py, it waits until no other mbvisor agent
or annotated interface is on the machine (an agent serves every annotated interface).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mbvisor.bench import agent as agent_bench
from mbvisor.bench.agent import (PARALLEL_CHANNELS, TARGET_P99_MS, WARMUP, WINDOW, Created, Interference, Watch,
                                 annotate, check_agent, guarded, make_vms, measure_latency, measure_throughput,
                                 percentile, register, start_agent, unannotate, wait_alone)
from mbvisor.bench.benchlib import BenchError, Row, compare, finish, start
from mbvisor.bench.controller import (ENVIRONMENT, MIDDLEBOXES, TARGET_BULK_RATIO, TARGET_MEMORY_MB,
                                      TARGET_VSWITCHD_CPU_RATIO, add_filters, bulk_size, register_middleboxes)
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import Lab, require_host_tools
from mbvisor.topologies.private_switch import PrivateSwitch

SCRIPT = "bench/control"
TARGETED_SIZE = 100_000  # the bulk-install, CPU, memory and probe targets are for this size
TARGET_HEALTH_P99_MS = 100.0  # GET /v1/health while TARGETED_SIZE filters install
TARGET_OTHER_P99_MS = 50.0    # a single command to another switch meanwhile
MIN_SAMPLES = 10              # of each probe during the install, or its p99 means nothing
OTHER_MB = "52:35:00:00:00:01"  # the second bridge's one middlebox (not among bench/controller's)

PROFILES = {
    "default": dict(rounds=3, latency_commands=1000, per_channel_commands=100, sizes=(1_000, 10_000, 100_000)),
    "quick": dict(rounds=2, latency_commands=200, per_channel_commands=30, sizes=(1_000, 10_000)),
}

progress = agent_bench.progress  # labelled [bench/control ...] by main()


# --------------------------------------------------------------------------- measuring

def agent_rounds(created: Created, profile: dict, rounds: int) -> list[dict]:
    """Set up the controller, 1 + PARALLEL_CHANNELS VMs and one agent serving them all;
    measure latency (on the first VM) and throughput (on the others) every round; stop
    the agent and the controller.  One dict of figures per round."""
    lab = created.lab
    wait_alone(created)
    controller = created.controller = Controller(created.workdir, environment=ENVIRONMENT)
    controller.start()
    created.bridge = bridge = lab.bridge(controller=controller.target, fail_mode="secure")
    controller.wait_switch(bridge.dpid)
    vms = make_vms(created, 1 + PARALLEL_CHANNELS)
    single, group = vms[0], vms[1:]
    wait_alone(created)
    watch = created.watch = Watch(created)
    watch.start()
    agent = start_agent(created, "agent")
    annotate(vms)
    agent.wait_serving({vm.channel for vm in vms})
    register(group)
    answered = collections.Counter({vm.channel: 1 for vm in group})
    progress(f"controller pid {controller.process.pid}, agent pid {agent.pid} serving {len(vms)} channels "
             f"({vms[0].interface}..{vms[-1].interface}) on bridge {bridge.name}")
    results = []
    for number in range(1, rounds + 1):
        watch.phase = f"round {number}: latency"
        progress(f"agent round {number}/{rounds}")
        latency = measure_latency(controller, agent, bridge.dpid, single, profile["latency_commands"])
        answered[single.channel] += 1 + WARMUP + profile["latency_commands"]
        watch.phase = f"round {number}: throughput"
        per = profile["per_channel_commands"]
        channels, direct = measure_throughput(created, controller, bridge.dpid, group, per)
        for vm in group:
            answered[vm.channel] += per
        check_agent(agent, vms, answered)
        slow = [during for value, during in zip(latency["agent"], latency["overlapped_discovery"])
                if value > TARGET_P99_MS]
        results.append({"p50": percentile(latency["agent"], .5), "p99": percentile(latency["agent"], .99),
                        "max": max(latency["agent"]),
                        "direct_p50": percentile(latency["direct"], .5),
                        "direct_p99": percentile(latency["direct"], .99), "direct_max": max(latency["direct"]),
                        "over_target": len(slow), "over_target_during_discovery": sum(slow),
                        "direct_over_target": sum(1 for value in latency["direct"] if value > TARGET_P99_MS),
                        "channels_per_s": channels, "direct_per_s": direct})
    leftover = [mb for mb in controller.get("/v1/middleboxes")[1]["middleboxes"] if mb["filters"]]
    if leftover:
        raise BenchError(f"{len(leftover)} middleboxes kept filters after the throughput runs")
    watch.phase = "tear-down"
    if found := watch.check():
        raise Interference("at the end: " + "; ".join(found))
    watch.halt.set()  # no agent of ours from here on: nothing to watch
    watch.join(5.0)
    agent.stop()
    created.agents.remove(agent)
    unannotate(vms)
    controller.stop()
    return results


def install_rounds(created: Created, profile: dict, rounds: int) -> tuple[list[dict], list[dict]]:
    """Every size on a fresh bridge of a fresh private ovs-vswitchd with a fresh controller,
    every round: the switch's memory and CPU for the install are then its cost alone.  Then
    the largest size once more under probes (``probed_install``).  Returns the per-round
    figures of the sizes and of the probes."""
    results, probed = [], []
    largest = max(profile["sizes"])
    for number in range(1, rounds + 1):
        sizes = {}
        for filters in profile["sizes"]:
            progress(f"install round {number}/{rounds}, {filters} filters")
            with PrivateSwitch(), Lab() as lab:
                size = sizes[filters] = bulk_size(lab, created.workdir / f"bulk-{number}-{filters}", filters,
                                                  say=progress)
            progress(f"  controller {size['seconds']:.2f} s, bundle {size['bundle_seconds']:.2f} s "
                     f"({size['flows']} flows, identical); ovs-vswitchd CPU {size['vswitchd_cpu_s']:.2f} s vs "
                     f"{size['bundle_vswitchd_cpu_s']:.2f} s; controller CPU {size['controller_cpu_s']:.2f} s, "
                     f"{size['controller_mb']:.0f} MB; ovs-vswitchd "
                     f"{size['vswitchd_before_mb']:.0f} -> {size['vswitchd_mb']:.0f} MB")
        results.append(sizes)
        progress(f"install round {number}/{rounds}, {largest} filters under probes")
        with PrivateSwitch(), Lab() as lab:
            probes = probed_install(lab, created.workdir / f"probed-{number}", largest)
        probed.append(probes)
        progress(f"  installed in {probes['seconds']:.2f} s; health p99 {probes['health']['p99']:.1f} ms "
                 f"({probes['health']['samples']} samples), other switch p99 {probes['other_switch']['p99']:.1f} ms "
                 f"({probes['other_switch']['samples']} samples)")
    return results, probed


def probed_install(lab: Lab, state: Path, filters: int) -> dict:
    """The bulk install of ``filters`` on a fresh controller (state in the new directory
    ``state``, stopped on the way out) that also serves a second bridge with one registered
    firewall middlebox; while it runs, one client asks ``GET /v1/health`` back to back and
    another sends the second bridge single commands (alternating add and delete of one IP
    filter, each answered once its flow is confirmed).  Not the timed install: the probes'
    load would count in its seconds and CPU.  The install's seconds and each probe's latency
    summary; BenchError if either has fewer than MIN_SAMPLES."""
    state.mkdir()
    controller = Controller(state, environment=ENVIRONMENT)
    try:
        controller.start()
        bulk = lab.bridge(controller=controller.target, fail_mode="secure")
        other = lab.bridge(controller=controller.target, fail_mode="secure")
        for bridge in (bulk, other):
            controller.wait_switch(bridge.dpid)
        register_middleboxes(controller, bulk.dpid)
        controller.ok(other.dpid, 1, f"R F {OTHER_MB} 10.2.0.1")
        seconds, latencies = while_installing(controller, bulk.dpid, filters, {
            "health": lambda: healthy(controller), "other_switch": single_commands(controller, other.dpid)})
    finally:
        controller.stop()
    for probe, values in latencies.items():
        if len(values) < MIN_SAMPLES:
            raise BenchError(f"only {len(values)} {probe} samples during the {filters}-filter install "
                             f"({seconds:.2f} s); at least {MIN_SAMPLES} are needed for a p99")
    return {"seconds": seconds, **{probe: {"samples": len(values), "p50": percentile(values, .5),
                                           "p99": percentile(values, .99), "max": max(values)}
                                   for probe, values in latencies.items()}}


def while_installing(controller: Controller, dpid: int, filters: int, probes: dict) -> tuple[float, dict]:
    """``add_filters`` in a background thread, each of ``probes`` (name: a call) called back
    to back in a thread of its own from the moment the install begins until it ends.
    Returns the install's seconds and each probe's latencies (ms)."""
    running, ended = threading.Event(), threading.Event()

    def install() -> float:
        running.set()
        return add_filters(controller, dpid, filters)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1 + len(probes))
    try:
        sampling = {name: pool.submit(sample, probe, running, ended) for name, probe in probes.items()}
        seconds = pool.submit(install).result()
    finally:
        ended.set()
        running.set()  # a probe still waiting (the install never began) returns at once
        pool.shutdown(wait=False)  # on failure the controller's stop ends the calls in progress
    return seconds, {name: future.result() for name, future in sampling.items()}


def sample(probe, running: threading.Event, ended: threading.Event) -> list[float]:
    """Milliseconds of each ``probe()``, called back to back once ``running`` is set; none
    begins after ``ended`` is set (the one in progress then counts: it was asked during)."""
    running.wait()
    latencies = []
    while not ended.is_set():
        started = time.perf_counter()
        probe()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def healthy(controller: Controller) -> None:
    status, body = controller.get("/v1/health")
    if status != 200:
        raise BenchError(f"GET /v1/health answered {status}: {body}")


def single_commands(controller: Controller, dpid: int):
    """A call that sends OTHER_MB's next command to ``dpid`` and waits for its answer:
    adds and deletes of one IP filter in turn, so every command changes a flow."""
    texts = itertools.cycle([f"A {OTHER_MB} I 4 s 10.98.0.1", f"D {OTHER_MB} I 4 s 10.98.0.1"])
    return lambda: controller.ok(dpid, 1, next(texts))


def run(profile: dict, rounds: int, created: Created) -> dict:
    require_host_tools()
    created.workdir = Path(tempfile.mkdtemp(prefix="mbvisor-bench-control-"))
    created.lab = Lab()
    started = time.perf_counter()
    agent = agent_rounds(created, profile, rounds)
    agent_seconds = time.perf_counter() - started
    install, probed = install_rounds(created, profile, rounds)
    return {"agent": agent, "install": install, "probed": probed, "agent_seconds": agent_seconds,
            "install_seconds": time.perf_counter() - started - agent_seconds}


# --------------------------------------------------------------------------- the table

def size_label(filters: int) -> str:
    return f"{filters // 1000}k" if filters % 1000 == 0 and filters >= 1000 else str(filters)


def rows(agent: list[dict], install: list[dict], probed: list[dict], sizes) -> list[Row]:
    """The table's rows from the per-round figures (``run``'s ``agent``, ``install`` and
    ``probed``)."""
    def each(key):
        return [figures[key] for figures in agent]

    def at(filters, key):
        return [figures[filters][key] for figures in install]

    def probe(name):
        return [figures[name]["p99"] for figures in probed]

    def targeted(n, target):
        return target if n == TARGETED_SIZE else None

    largest = max(sizes)

    table = [
        compare("command -> flow confirmed p50", "ms", "guest channel", each("p50"), "REST direct",
                each("direct_p50")),
        compare("command -> flow confirmed p99", "ms", "guest channel", each("p99"), "REST direct",
                each("direct_p99"), target=("<=", TARGET_P99_MS), target_on="value"),
        compare("commands/s sustained", "cmd/s", f"{PARALLEL_CHANNELS} guest channels", each("channels_per_s"),
                f"{PARALLEL_CHANNELS} REST clients", each("direct_per_s")),
    ]
    table += [compare(f"install {size_label(n)} filters", "s", "controller", at(n, "seconds"), "ovs-ofctl --bundle",
                      at(n, "bundle_seconds"), target=targeted(n, ("<=", TARGET_BULK_RATIO)))
              for n in sizes]
    table.append(compare("flows identical, all sizes", "1=yes", "controller",
                         [float(all(figures[n]["flows_identical"] for n in sizes)) for figures in install],
                         target=(">=", 1.0)))
    table += [compare(f"ovs-vswitchd CPU for {size_label(n)} install", "s", "controller install",
                      at(n, "vswitchd_cpu_s"), "ovs-ofctl --bundle", at(n, "bundle_vswitchd_cpu_s"),
                      target=targeted(n, ("<=", TARGET_VSWITCHD_CPU_RATIO)))
              for n in sizes]
    table += [compare(f"controller CPU per filter at {size_label(n)}", "us", "controller",
                      [seconds * 1e6 / n for seconds in at(n, "controller_cpu_s")])
              for n in sizes]
    table += [compare(f"controller memory at {size_label(n)}", "MB", "controller", at(n, "controller_mb"),
                      target=targeted(n, ("<=", TARGET_MEMORY_MB)))
              for n in sizes]
    table += [compare(f"ovs-vswitchd memory at {size_label(n)}", "MB", "ovs-vswitchd", at(n, "vswitchd_mb"),
                      "before install", at(n, "vswitchd_before_mb"))
              for n in sizes]
    table += [compare(f"health p99 during {size_label(largest)} install", "ms", "GET /v1/health", probe("health"),
                      target=targeted(largest, ("<=", TARGET_HEALTH_P99_MS))),
              compare(f"command p99 during {size_label(largest)} install", "ms", "other switch",
                      probe("other_switch"), target=targeted(largest, ("<=", TARGET_OTHER_P99_MS)))]
    return table


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args, mode, when = start(__doc__.splitlines()[0], "sizes 1k and 10k only, fewer commands, 2 rounds", argv,
                             rounds=(PROFILES["default"]["rounds"], PROFILES["quick"]["rounds"]))
    profile, rounds = PROFILES[mode], args.rounds
    agent_bench.label_progress(SCRIPT)
    progress(f"{mode} run, {rounds} rounds: latency {profile['latency_commands']} commands, "
             f"{PARALLEL_CHANNELS} channels x {profile['per_channel_commands']} commands, "
             f"install {'/'.join(size_label(n) for n in profile['sizes'])} filters over {MIDDLEBOXES} middleboxes")
    started = time.perf_counter()
    created = Created()
    status, result = guarded(f"{SCRIPT}.py", created, lambda: run(profile, rounds, created),
                             failures=(RuntimeError, OSError, subprocess.SubprocessError))
    if status is not None:
        return status
    seconds = time.perf_counter() - started
    progress(f"done in {seconds:.0f} s (agent part {result['agent_seconds']:.0f} s, "
             f"install part {result['install_seconds']:.0f} s); everything it created is removed")
    return finish("control", mode, when, rounds,
                  rows(result["agent"], result["install"], result["probed"], profile["sizes"]),
                  args.json, progress, seconds=round(seconds, 1),
                  params={**profile, "rounds": rounds, "middleboxes": MIDDLEBOXES,
                          "parallel_channels": PARALLEL_CHANNELS, "window": WINDOW, "warmup": WARMUP,
                          "agent_rate": agent_bench.AGENT_RATE,
                          "discovery_interval": agent_bench.DISCOVERY_INTERVAL},
                  per_round={"agent": result["agent"],
                             "install": [{str(n): figures for n, figures in sizes.items()}
                                         for sizes in result["install"]],
                             "probed": result["probed"]})


if __name__ == "__main__":
    sys.exit(main())
