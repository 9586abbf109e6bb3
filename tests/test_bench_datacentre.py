"""The data-centre benchmark (bench/datacentre.py): its table from per-round figures and its
flow comparison (pure), then a small run end to end on real dummy-datapath switches and a
real controller (2 hypervisors, few filters), and a missing flow detected on a real switch."""

from __future__ import annotations

import os

import pytest

from mbvisor.bench import datacentre
from mbvisor.bench.datacentre import converged, mbvisor_flows, rows, table_difference

# down_samples: the crash window must hold MIN_SAMPLES probes whatever the machine's speed
# (with 5, a loaded CI run saw 15 in all: the tiny switch reconverged before 15 more came)
TINY = dict(hypervisors=2, middleboxes=4, filters=5, rounds=1, commands=10, before=6,
            down_samples=datacentre.MIN_SAMPLES)


def _summary(p99: float, samples: int = 100) -> dict:
    return {"samples": samples, "p50": p99 / 2, "p99": p99, "max": p99 * 2}


def _result(worst: list[float], during: list[float], converged_: list[bool]) -> dict:
    everyone = [{"0": _summary(2.0), "1": _summary(value), "pooled": _summary(2.5)} for value in worst]
    crashes = [{"victim": 1, "before": _summary(2.0), "during": _summary(value, 40), "converged": ok,
                "flows_compared": 50, "converge_after_restart_s": 0.3, "down_s": 0.1}
               for value, ok in zip(during, converged_)]
    return {"baseline": [_summary(2.0)] * len(worst), "everyone": everyone, "crashes": crashes,
            "phases": {"build": 1.0, "single": 2.0, "load": 3.0, "all": 4.0, "crash": 5.0},
            "load": {"single_s": 1.0, "others_s": 2.0}}


def test_rows_judge_the_worst_host_the_others_during_a_crash_and_convergence():
    table = rows(_result([3.0, 5.0, 4.2], [2.2, 4.0, 2.8], [True, True, False]), TINY)
    by_metric = {row.metric: row for row in table}
    assert list(by_metric) == [
        "single command p50, all hosts", "single command p99, worst host", "single command p99, all hosts",
        "single command p99, host 0", "single command p99, host 1", "others' p99 during a crash",
        "others' p50 during a crash", "others' p99 quiet (noise)", "crash window samples",
        "restarted switch converged", "flows compared", "time to converge after restart",
        "switch down (kill to restart)", "load 20 filters", "duration: build phase", "duration: single phase",
        "duration: load phase", "duration: all phase", "duration: crash phase"]
    worst = by_metric["single command p99, worst host"]
    assert worst.ratio.values == (1.5, 2.5, 2.1)  # per round: max over hosts / the single host's
    assert (worst.target, worst.target_on, worst.verdict) == (("<=", 2.0), "ratio", "MISS")
    crash = by_metric["others' p99 during a crash"]
    assert crash.ratio.values == (1.1, 2.0, 1.4)
    assert (crash.target, crash.verdict) == (("<=", 1.5), "PASS")
    noise = by_metric["others' p99 quiet (noise)"]  # before vs the others' worst in the all-hosts pass
    assert noise.baseline.values == (2.0, 2.0, 2.0) and noise.verdict is None  # host 0, the only other
    done = by_metric["restarted switch converged"]
    assert (done.value.values, done.target_on, done.verdict) == ((1.0, 1.0, 0.0), "value", "PASS")
    assert rows(_result([2.0], [2.0], [False]), TINY)[9].verdict == "MISS"
    assert by_metric["duration: crash phase"].value.median == 5.0


def test_table_difference_names_missing_and_extra_flows():
    flows = ["cookie=0x4d42000000000001, table=1, priority=3000,ip,nw_src=10.0.0.1 actions=drop",
             "cookie=0x4d42000000000001, table=1, priority=3000,ip,nw_src=10.0.0.2 actions=drop"]
    assert table_difference(flows, list(reversed(flows))) == {"missing": [], "extra": []}
    assert table_difference(flows, flows[:1]) == {"missing": [flows[1]], "extra": []}
    assert table_difference(flows, flows + [flows[0]]) == {"missing": [], "extra": [flows[0]]}  # a duplicate counts


@pytest.mark.host
def test_a_small_run_measures_every_row_and_removes_everything():
    seen = {}

    def look(fleet):
        seen["pids"], seen["workdir"] = fleet.pids(), fleet.lab.workdir
        assert len(seen["pids"]) == 1 + 2 * TINY["hypervisors"]  # controller, ovsdb-server + vswitchd each

    result = datacentre.run(TINY, TINY["rounds"], say=lambda text: None, fleet_hook=look)
    table = {row.metric: row for row in rows(result, TINY)}
    assert table["single command p99, worst host"].ratio is not None
    assert table["single command p99, host 1"].value.median > 0
    (crash,) = result["crashes"]
    assert crash["victim"] == 1 and crash["converged"] and not crash["missing"] and not crash["extra"]
    # 4 middleboxes x 5 filters on the victim: at least one flow each, besides the base pipeline's
    assert crash["flows_compared"] >= TINY["middleboxes"] * TINY["filters"]
    assert crash["during"]["samples"] >= datacentre.MIN_SAMPLES
    assert crash["during_down"]["samples"] >= TINY["down_samples"]
    assert table["restarted switch converged"].verdict == "PASS"
    assert set(result["phases"]) == {"build", "single", "load", "all", "crash"}
    for pid in seen["pids"]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] in "ZX"
    assert not os.path.exists(seen["workdir"])


@pytest.mark.host
def test_a_missing_flow_on_a_real_switch_is_detected():
    # no audit during the test: the controller would put the deleted flow back
    with datacentre.Fleet(1, 2, say=lambda text: None, environment={"MBVISOR_AUDIT_INTERVAL": "3600"}) as fleet:
        fleet.connect(0)
        fleet.load([0], 3)
        bridge = fleet.bridges[0]
        desired = mbvisor_flows(bridge)
        state = converged(fleet, 0, desired, after=0.0, timeout=5.0)
        assert state["converged"] and state["flows_compared"] == len(desired) > 6
        gone = next(line for line in desired if "nw_src=10.200.0.2" in line)
        match = ",".join(part.strip() for part in gone.split(" actions=")[0].split(",")
                         if not part.strip().startswith("cookie="))
        bridge.del_flows(match, strict=True)  # behind the controller's back
        state = converged(fleet, 0, desired, after=0.0, timeout=1.0)
        assert not state["converged"] and state["missing"] == [gone] and state["extra"] == []
        assert state["flows_compared"] == len(desired)
