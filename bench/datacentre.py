#!/usr/bin/env python3
"""The data-centre benchmark: one controller, many hypervisors, single commands and a switch crash.

Issue 15's target, control plane only: 8 hypervisors x 125 middleboxes x 100 filters (100k
filters) on one real ``mbvisor controller``.  Each hypervisor is a private ovsdb-server and
ovs-vswitchd with OVS's dummy datapaths (``topologies/private_switch.py``'s
``DummySwitch``: OpenFlow tables and bundles as in the real thing, no kernel devices, never
the machine's own switch), in its own directory, its one bridge connected to the controller
over TCP loopback.  Phases, each timed (the "duration" rows):

* **build**: the controller and the switches (only hypervisor 0 connected);
* **single**: hypervisor 0's share (125 x 100 filters) loaded through REST batches, then,
  every round, single commands on it, one at a time (REST ``POST /v1/commands`` of one
  filter add or delete of the probe middlebox, answered OK only after the switch confirmed
  the bundle): the baseline, a single host holding its share;
* **load**: the other hypervisors connected and their shares loaded (the whole data centre's
  filters are then installed);
* **all**: every round, the same single commands on every hypervisor, interleaved (each
  cycle visits every hypervisor once, in a new random order): p50/p99 per hypervisor, of
  the worst one (the target: <= 2x the baseline's p99) and of all pooled;
* **crash**: every round, one hypervisor's ovs-vswitchd is SIGKILLed and restarted on the
  same database (``crash_and_restart_vswitchd``).  Just before, the others' single commands
  are measured (interleaved, quiet); then, from the kill until the restarted switch has
  converged, one client sends the others single commands back to back (in turn); the
  switch stays down until DOWN_SAMPLES of them were answered and the controller saw it go,
  and is then started again, until the controller holds it connected and reconciled.  The
  others' p99 in that window is compared with theirs just
  before (target <= NOISE_RATIO: "unchanged within noise"; the "noise" row compares two
  quiet passes of the same hosts for scale).  Converged, checked after the window (a dump
  of 25k flows is no part of what the others live with): the controller holds the switch
  connected and reconciled again and its flows with mbvisor's cookie (sorted ``ovs-ofctl
  dump-flows --no-stats``) are exactly those before the kill; "flows compared" and the
  time to converge are reported.  A switch that does not converge within
  CONVERGE_TIMEOUT is a MISS with the differing flows in the JSON.

    python bench/datacentre.py            # about 2 minutes on 2 cores
    python bench/datacentre.py --quick    # 3 hypervisors x 20 middleboxes x 20 filters, fewer commands
    python bench/datacentre.py --rounds 5 --json out.json

Needs root, Open vSwitch's programs and a running machine ovsdb-server (a Lab reserves its
prefix by listing the machine's bridges; nothing is created on the machine's switch).
Everything it creates (processes, directories) is removed on exit, including on Ctrl-C.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from mbvisor.bench.benchlib import BenchError, Row, compare, finish, measured, start
from mbvisor.controller.pipeline import COOKIE_TAG, COOKIE_TAG_MASK
from mbvisor.topologies.controller_run import Controller, ControllerError
from mbvisor.topologies.datacentre import require_tools
from mbvisor.topologies.netlab import Lab, NetlabError, WaitTimeout, datapath_id_for, wait_until
from mbvisor.topologies.private_switch import DummySwitch

SCRIPT = "bench/datacentre"
MBVISOR_FLOWS = f"cookie={COOKIE_TAG:#x}/{COOKIE_TAG_MASK:#x}"  # every flow of mbvisor's, none of anyone else's
TARGET_RATIO = 2.0       # any host's p99 with every hypervisor loaded vs one host alone
NOISE_RATIO = 1.5        # the others' p99 during a crash vs just before: "unchanged within noise"
MIN_SAMPLES = 20         # in the crash window, or its p99 means nothing
WARMUP = 4               # untimed commands per host before each measured pass (even: state unchanged)
BATCH_MIDDLEBOXES = 10   # middleboxes' filters per load request
IN_FLIGHT = 4            # load requests outstanding at a time
DOWN_TIMEOUT = 60.0      # for DOWN_SAMPLES while the switch is down
CONVERGE_TIMEOUT = 120.0
PROBE_IP = "10.98.0.1"   # the single commands' filter: added and deleted in turn

PROFILES = {
    "default": dict(hypervisors=8, middleboxes=125, filters=100, rounds=3, commands=500, before=200,
                    down_samples=200),
    "quick": dict(hypervisors=3, middleboxes=20, filters=20, rounds=2, commands=60, before=40, down_samples=30),
}


def progress(message: str) -> None:
    print(f"[{SCRIPT}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def mac(host: int, index: int) -> str:
    return f"52:36:{host:02x}:00:{index >> 8:02x}:{index & 0xff:02x}"


def filter_ip(number: int) -> str:
    return f"10.{200 + number // 62500}.{(number // 250) % 250}.{number % 250 + 1}"


def label(filters: int) -> str:
    return f"{filters / 1000:g}k" if filters >= 1000 else str(filters)


# --------------------------------------------------------------------------- the flows

def table_difference(desired: list[str], found: list[str]) -> dict:
    """What differs between two ``dump-flows --no-stats`` tables: flows only in ``desired``
    (missing) and only in ``found`` (extra), each sorted; both empty when they are equal
    (duplicates count: a table is compared as a sorted list)."""
    if sorted(desired) == sorted(found):
        return {"missing": [], "extra": []}
    wanted, seen = collections.Counter(desired), collections.Counter(found)
    return {"missing": sorted((wanted - seen).elements()), "extra": sorted((seen - wanted).elements())}


def mbvisor_flows(bridge) -> list[str]:
    """The bridge's flows with mbvisor's cookie, sorted ``dump-flows --no-stats`` lines."""
    return sorted(bridge.dump_flows(MBVISOR_FLOWS, no_stats=True))


# --------------------------------------------------------------------------- the data centre

class Fleet:
    """One controller and ``hypervisors`` dummy-datapath switches, each in its own
    directory under one Lab's work directory; bridges ``<prefix>b<i>``, none connected to
    the controller until :meth:`connect`; ``environment``: more for the controller.  ``close`` stops every process and removes the
    directory, also after a failure halfway through the build."""

    def __init__(self, hypervisors: int, middleboxes: int, say=progress, environment: dict | None = None):
        self.size, self.middleboxes, self.say = hypervisors, middleboxes, say
        self.environment = {"MBVISOR_MAX_PER_PORT": str(middleboxes), **(environment or {})}
        self.lab: Lab | None = None
        self.controller: Controller | None = None
        self.switches: list[DummySwitch] = []
        self.bridges: list = []
        self._probes: dict[int, itertools.cycle] = {}

    def __enter__(self) -> "Fleet":
        require_tools()
        self.lab = Lab()
        try:
            workdir = Path(self.lab.workdir)
            (workdir / "controller").mkdir()
            self.controller = Controller(workdir / "controller", environment=self.environment)
            self.controller.start()
            for index in range(self.size):
                directory = workdir / f"hv{index}"
                directory.mkdir()
                switch = DummySwitch(directory)
                self.switches.append(switch)
                switch.start()
                self.bridges.append(switch.bridge(self.lab, f"{self.lab.prefix}b{index}",
                                                  datapath_id_for(self.lab.prefix, index)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        errors = []
        for action in [switch.stop for switch in self.switches] + [
                self.controller.stop if self.controller else None, self.lab.close if self.lab else None]:
            if action is None:
                continue
            try:
                action()
            except Exception as error:  # try everything, then say what failed
                errors.append(str(error))
        self.switches.clear()
        self.controller = self.lab = None
        if errors:
            raise BenchError("cleanup incomplete: " + "; ".join(errors))

    def pids(self) -> list[int]:
        own = [self.controller.process.pid] if self.controller and self.controller.process.poll() is None else []
        return own + [pid for switch in self.switches for pid in switch.pids()]

    def dpid(self, host: int) -> int:
        return self.bridges[host].dpid

    def view(self, host: int) -> dict | None:
        dpid = f"{self.dpid(host):016x}"
        return next((s for s in self.controller.get("/v1/switches")[1]["switches"] if s["dpid"] == dpid), None)

    def wait_synced(self, host: int, after: float = 0.0, timeout: float = 30.0) -> dict:
        def synced():
            view = self.view(host)
            return view if view and view["connected"] and view["synced"] and view["connected_at"] > after else None
        return wait_until(synced, timeout, f"hypervisor {host}'s switch connected and reconciled", interval=0.05)

    def connect(self, host: int) -> None:
        self.bridges[host].set_controller(self.controller.target)
        self.wait_synced(host)

    # -- state
    def register(self, host: int) -> None:
        """The host's middleboxes (firewalls on port 1), a hundred per request."""
        for first in range(0, self.middleboxes, 100):
            texts = [f"R F {mac(host, i)} 10.{1 + host}.{i // 250}.{i % 250 + 1}"
                     for i in range(first, min(first + 100, self.middleboxes))]
            refused = [a for a in self.controller.batch(self.dpid(host), 1, texts) if a["status"] != "OK"]
            if refused:
                raise BenchError(f"registration on hypervisor {host} refused: {refused[:2]}")

    def load(self, hosts: list[int], filters: int) -> float:
        """Register the hosts' middleboxes and install ``filters`` IP filters on each of
        them, BATCH_MIDDLEBOXES middleboxes' filters per request, IN_FLIGHT requests
        outstanding (the hosts' requests in turn); seconds for the filters."""
        for host in hosts:
            self.register(host)
        tasks = [(host, first) for first in range(0, self.middleboxes, BATCH_MIDDLEBOXES) for host in hosts]

        def send(task) -> None:
            host, first = task
            texts = [f"A {mac(host, i)} I 4 s {filter_ip(f)}"
                     for i in range(first, min(first + BATCH_MIDDLEBOXES, self.middleboxes)) for f in range(filters)]
            refused = [a for a in self.controller.batch(self.dpid(host), 1, texts) if a["status"] != "OK"]
            if refused:
                raise BenchError(f"{len(refused)} filters refused on hypervisor {host}, e.g. {refused[0]}")

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
            list(pool.map(send, tasks))
        return time.perf_counter() - started

    def single(self, host: int) -> float:
        """The host's next single command (add, then delete, of one filter of its first
        middlebox: every command changes a flow), answered once confirmed; milliseconds."""
        texts = self._probes.setdefault(host, itertools.cycle(
            [f"A {mac(host, 0)} I 4 s {PROBE_IP}", f"D {mac(host, 0)} I 4 s {PROBE_IP}"]))
        text = next(texts)
        started = time.perf_counter()
        self.controller.ok(self.dpid(host), 1, text)
        return (time.perf_counter() - started) * 1000


def interleaved(fleet: Fleet, hosts: list[int], commands: int, rng: random.Random) -> dict[int, list[float]]:
    """``commands`` single commands per host (after WARMUP untimed ones), one at a time,
    each cycle visiting every host once in a new random order: milliseconds per host."""
    for _ in range(WARMUP):
        for host in hosts:
            fleet.single(host)
    latencies: dict[int, list[float]] = {host: [] for host in hosts}
    for _ in range(commands):
        order = list(hosts)
        rng.shuffle(order)
        for host in order:
            latencies[host].append(fleet.single(host))
    return latencies


def summary(values: list[float]) -> dict:
    return {"samples": len(values), "p50": percentile(values, .5), "p99": percentile(values, .99),
            "max": max(values)}


# --------------------------------------------------------------------------- the crash

def converged(fleet: Fleet, host: int, desired: list[str], after: float, timeout: float) -> dict:
    """Wait (up to ``timeout`` s) until the controller holds ``host``'s switch connected
    since Unix time ``after`` and reconciled, and its mbvisor flows are exactly
    ``desired``.  Returns {"converged", "seconds" (from the call), "flows_compared",
    "missing", "extra"} (the differences as last seen: empty once converged)."""
    started = time.monotonic()
    last = {"missing": list(desired), "extra": []}

    def identical() -> bool:
        last.update(table_difference(desired, mbvisor_flows(fleet.bridges[host])))
        return not last["missing"] and not last["extra"]

    try:
        fleet.wait_synced(host, after=after, timeout=timeout)
        wait_until(identical, max(0.0, timeout - (time.monotonic() - started)),
                   f"hypervisor {host}'s flows to be what they were", interval=0.2)
    except WaitTimeout:  # a MISS, reported with what differed
        return {"converged": False, "seconds": time.monotonic() - started, "flows_compared": len(desired), **last}
    return {"converged": True, "seconds": time.monotonic() - started, "flows_compared": len(desired), **last}


def crash_round(fleet: Fleet, victim: int, profile: dict, rng: random.Random) -> dict:
    """One crash of ``victim``'s ovs-vswitchd (see the module), the others probed."""
    others = [host for host in range(fleet.size) if host != victim]
    before = interleaved(fleet, others, profile["before"], rng)
    desired = mbvisor_flows(fleet.bridges[victim])
    samples: list[tuple[str, float]] = []
    phase, halt, failure = ["down"], threading.Event(), []

    def probe() -> None:
        try:
            while not halt.is_set():
                order = list(others)
                rng.shuffle(order)
                for host in order:
                    if halt.is_set():
                        return
                    stage = phase[0]
                    samples.append((stage, fleet.single(host)))
        except BaseException as error:  # the main thread reports it
            failure.append(error)

    def down_samples() -> int:
        if failure:
            raise BenchError(f"a single command failed while hypervisor {victim} was down: {failure[0]}")
        return sum(1 for stage, _ in samples if stage == "down")

    prober = threading.Thread(target=probe, name="others", daemon=True)
    killed = time.monotonic()
    fleet.switches[victim].kill_vswitchd()
    prober.start()
    try:
        wait_until(lambda: not (fleet.view(victim) or {}).get("connected"), 10,
                   f"the controller to see hypervisor {victim} go")
        wait_until(lambda: down_samples() >= profile["down_samples"], DOWN_TIMEOUT,
                   f"{profile['down_samples']} single commands to the others while hypervisor {victim} is down")
        phase[0] = "reconverging"
        restarted_wall, restarted = time.time(), time.monotonic()
        fleet.switches[victim].start_vswitchd()
        synced_s = None
        try:  # the window ends when the controller has the switch reconciled...
            fleet.wait_synced(victim, after=restarted_wall, timeout=CONVERGE_TIMEOUT)
            synced_s = time.monotonic() - restarted
        except WaitTimeout:
            pass  # ... or at the deadline; converged() below reports the MISS
    finally:
        halt.set()
        prober.join(30)
    # ... and only then are its 25k flows dumped and compared: an ovs-ofctl dump-flows
    # every 0.2 s inside the window loaded the machine the probes measure (two cores).
    state = converged(fleet, victim, desired, after=restarted_wall,
                      timeout=max(1.0, CONVERGE_TIMEOUT - (time.monotonic() - restarted)))
    if state["converged"] and synced_s is not None:
        state["seconds"] = synced_s  # the controller's reconciliation; its flows then checked identical
    if failure:
        raise BenchError(f"a single command to another hypervisor failed during hypervisor {victim}'s crash: "
                         f"{failure[0]}")
    window = [ms for _, ms in samples]
    if len(window) < MIN_SAMPLES:
        raise BenchError(f"only {len(window)} single commands to the others during hypervisor {victim}'s crash; "
                         f"at least {MIN_SAMPLES} are needed for a p99")
    quiet = [ms for host in others for ms in before[host]]
    return {"victim": victim, "before": summary(quiet), "during": summary(window),
            "during_down": summary([ms for stage, ms in samples if stage == "down"]),
            "during_reconverging": summary([ms for stage, ms in samples if stage == "reconverging"] or [0.0]),
            "converged": state["converged"], "flows_compared": state["flows_compared"],
            "converge_after_restart_s": state["seconds"],
            "converge_after_kill_s": time.monotonic() - killed if state["converged"] else None,
            "down_s": restarted - killed, "missing": state["missing"][:20], "extra": state["extra"][:20],
            "missing_count": len(state["missing"]), "extra_count": len(state["extra"])}


# --------------------------------------------------------------------------- the run

def run(profile: dict, rounds: int, say=progress, fleet_hook=None) -> dict:
    """Every phase (see the module) on a fresh Fleet, closed on the way out whatever
    happens; ``fleet_hook(fleet)`` (tests) is called with the open fleet at the end.
    Returns the per-round figures and each phase's seconds."""
    if profile["commands"] % 2 or profile["before"] % 2:
        raise ValueError("commands and before must be even (each host's probe filter is added, then deleted)")
    hosts, filters = profile["hypervisors"], profile["filters"]
    share = profile["middleboxes"] * filters
    rng = random.Random(15)
    phases, clock = {}, time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[name] = now - clock
        clock = now
        say(f"{name} phase took {phases[name]:.1f} s")

    say(f"build: controller and {hosts} dummy-datapath switches")
    with Fleet(hosts, profile["middleboxes"], say) as fleet:
        fleet.connect(0)
        say(f"controller pid {fleet.controller.process.pid}, switches in {fleet.lab.workdir}")
        lap("build")

        say(f"single: hypervisor 0 loads its share, {profile['middleboxes']} middleboxes x {filters} filters")
        single_load = fleet.load([0], filters)
        say(f"  {share} filters in {single_load:.1f} s; {rounds} rounds of {profile['commands']} single commands")
        baseline = []
        for number in range(rounds):
            values = interleaved(fleet, [0], profile["commands"], rng)[0]
            baseline.append(summary(values))
            say(f"  round {number + 1}: p50 {baseline[-1]['p50']:.2f} ms, p99 {baseline[-1]['p99']:.2f} ms")
        lap("single")

        say(f"load: hypervisors 1..{hosts - 1} connect and load {share} filters each")
        for host in range(1, hosts):
            fleet.connect(host)
        others_load = fleet.load(list(range(1, hosts)), filters)
        say(f"  {share * (hosts - 1)} filters in {others_load:.1f} s ({share * hosts} installed in all)")
        lap("load")

        say(f"all: {rounds} rounds of {profile['commands']} single commands on each of {hosts} hypervisors, "
            "interleaved")
        everyone = []
        for number in range(rounds):
            values = interleaved(fleet, list(range(hosts)), profile["commands"], rng)
            everyone.append({str(host): summary(v) for host, v in values.items()}
                            | {"pooled": summary([ms for v in values.values() for ms in v])})
            worst = max(range(hosts), key=lambda h: everyone[-1][str(h)]["p99"])
            say(f"  round {number + 1}: pooled p50 {everyone[-1]['pooled']['p50']:.2f} ms, p99 "
                f"{everyone[-1]['pooled']['p99']:.2f} ms; worst hypervisor {worst} p99 "
                f"{everyone[-1][str(worst)]['p99']:.2f} ms")
        lap("all")

        crashes = []
        for number in range(rounds):
            victim = hosts - 1 - number % (hosts - 1) if hosts > 1 else 0
            if hosts < 2:
                raise ValueError("the crash phase needs at least 2 hypervisors")
            say(f"crash round {number + 1}/{rounds}: SIGKILL hypervisor {victim}'s ovs-vswitchd, the others probed")
            crash = crash_round(fleet, victim, profile, rng)
            crashes.append(crash)
            say(f"  down {crash['down_s']:.2f} s; others p99 {crash['before']['p99']:.2f} ms before, "
                f"{crash['during']['p99']:.2f} ms during ({crash['during']['samples']} samples: "
                f"{crash['during_down']['samples']} down); "
                + (f"converged {crash['converge_after_restart_s']:.2f} s after the restart "
                   f"({crash['flows_compared']} flows identical)" if crash["converged"] else
                   f"NOT converged within {CONVERGE_TIMEOUT:g} s: {crash['missing_count']} flows missing, "
                   f"{crash['extra_count']} extra"))
        lap("crash")
        if fleet_hook:
            fleet_hook(fleet)
    return {"baseline": baseline, "everyone": everyone, "crashes": crashes, "phases": phases,
            "load": {"single_s": single_load, "others_s": others_load}}


# --------------------------------------------------------------------------- the table

def rows(result: dict, profile: dict) -> list[Row]:
    """The table from ``run``'s figures."""
    hosts, share = profile["hypervisors"], profile["middleboxes"] * profile["filters"]
    baseline, everyone, crashes = result["baseline"], result["everyone"], result["crashes"]
    alone = f"1 host, {label(share)} filters"
    loaded = f"{hosts} hosts, {label(share * hosts)}"

    def base(key):
        return [figures[key] for figures in baseline]

    def worst(figures):
        return max(figures[str(host)]["p99"] for host in range(hosts))

    def others_quiet(number, crash):
        """The crash round's others' p99 in the all-hosts pass of the same round number."""
        return max(everyone[number][str(host)]["p99"] for host in range(hosts) if host != crash["victim"])

    table = [
        compare("single command p50, all hosts", "ms", loaded, [f["pooled"]["p50"] for f in everyone], alone,
                base("p50")),
        compare("single command p99, worst host", "ms", loaded, [worst(f) for f in everyone], alone, base("p99"),
                target=("<=", TARGET_RATIO)),
        compare("single command p99, all hosts", "ms", loaded, [f["pooled"]["p99"] for f in everyone], alone,
                base("p99")),
    ]
    table += [compare(f"single command p99, host {host}", "ms", loaded, [f[str(host)]["p99"] for f in everyone],
                      alone, base("p99")) for host in range(hosts)]
    others = f"{hosts - 1} others"
    table += [
        compare("others' p99 during a crash", "ms", f"{others}, crash", [c["during"]["p99"] for c in crashes],
                "just before", [c["before"]["p99"] for c in crashes], target=("<=", NOISE_RATIO)),
        compare("others' p50 during a crash", "ms", f"{others}, crash", [c["during"]["p50"] for c in crashes],
                "just before", [c["before"]["p50"] for c in crashes]),
        compare("others' p99 quiet (noise)", "ms", f"{others}, before", [c["before"]["p99"] for c in crashes],
                "worst, 'all' pass", [others_quiet(n, c) for n, c in enumerate(crashes)]),
        compare("crash window samples", "commands", f"{others}, crash", [c["during"]["samples"] for c in crashes]),
        compare("restarted switch converged", "1=yes", "restarted switch", [float(c["converged"]) for c in crashes],
                target=(">=", 1.0)),
        compare("flows compared", "flows", "restarted switch", [c["flows_compared"] for c in crashes]),
        compare("time to converge after restart", "s", "restarted switch",
                [c["converge_after_restart_s"] for c in crashes]),
        compare("switch down (kill to restart)", "s", "restarted switch", [c["down_s"] for c in crashes]),
        compare(f"load {label(share * (hosts - 1))} filters", "s", f"{hosts - 1} hosts", [result["load"]["others_s"]],
                alone, [result["load"]["single_s"]]),
    ]
    table += [compare(f"duration: {name} phase", "s", "this run", [seconds])
              for name, seconds in result["phases"].items()]
    return table


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args, mode, when = start(__doc__.splitlines()[0], "3 hypervisors x 20 middleboxes x 20 filters, fewer commands",
                             argv, rounds=(PROFILES["default"]["rounds"], PROFILES["quick"]["rounds"]))
    profile, rounds = PROFILES[mode], args.rounds
    progress(f"{mode} run, {rounds} rounds: {profile['hypervisors']} hypervisors x {profile['middleboxes']} "
             f"middleboxes x {profile['filters']} filters "
             f"({label(profile['hypervisors'] * profile['middleboxes'] * profile['filters'])}), "
             f"{profile['commands']} single commands per host and round")
    started = time.perf_counter()
    status, result = measured(progress, lambda: run(profile, rounds),
                              failures=(ControllerError, NetlabError, OSError, subprocess.SubprocessError))
    if status is not None:
        return status
    seconds = time.perf_counter() - started
    progress(f"done in {seconds:.0f} s ("
             + ", ".join(f"{name} {value:.0f} s" for name, value in result["phases"].items())
             + "); everything it created is removed")
    return finish("datacentre", mode, when, rounds, rows(result, profile), args.json, progress,
                  seconds=round(seconds, 1), params={**profile, "rounds": rounds, "target_ratio": TARGET_RATIO,
                                                     "noise_ratio": NOISE_RATIO, "warmup": WARMUP,
                                                     "batch_middleboxes": BATCH_MIDDLEBOXES,
                                                     "in_flight": IN_FLIGHT},
                  phases=result["phases"], per_round={key: result[key] for key in
                                                      ("baseline", "everyone", "crashes", "load")})


if __name__ == "__main__":
    sys.exit(main())
