"""The control benchmark's table from per-round figures, and its pure helpers: the flow
comparison and the probes' sampling window (no OVS, no processes)."""

from __future__ import annotations

import threading

import pytest

from mbvisor.bench.benchlib import BenchError
from mbvisor.bench.control import rows, sample, size_label
from mbvisor.bench.controller import same_flows


def _agent_round(p99: float) -> dict:
    return {"p50": 2.0, "p99": p99, "direct_p50": 1.0, "direct_p99": 2.0, "channels_per_s": 900.0,
            "direct_per_s": 1000.0}


def _install_round(seconds_100k: float) -> dict:
    def size(seconds, bundle, controller_mb, vswitchd_cpu, controller_cpu):
        return {"seconds": seconds, "bundle_seconds": bundle, "controller_mb": controller_mb,
                "vswitchd_mb": 60.0, "vswitchd_before_mb": 40.0, "vswitchd_cpu_s": vswitchd_cpu,
                "bundle_vswitchd_cpu_s": 1.0, "controller_cpu_s": controller_cpu, "flows_identical": True}
    return {1_000: size(0.4, 0.1, 80.0, 0.02, 0.5), 100_000: size(seconds_100k, 1.0, 400.0, 1.1, 5.0)}


def _probed_round(health_p99: float, other_p99: float) -> dict:
    return {"seconds": 2.0, "health": {"samples": 900, "p50": 3.0, "p99": health_p99, "max": 200.0},
            "other_switch": {"samples": 90, "p50": 4.0, "p99": other_p99, "max": 90.0}}


def test_size_labels():
    assert [size_label(n) for n in (1_000, 10_000, 100_000, 500)] == ["1k", "10k", "100k", "500"]


def test_rows_targets_and_ratios_per_round():
    table = rows([_agent_round(9.0), _agent_round(20.0), _agent_round(12.0)],
                 [_install_round(20.0), _install_round(1.0), _install_round(1.4)],
                 [_probed_round(50.0, 30.0), _probed_round(150.0, 60.0), _probed_round(80.0, 70.0)], (1_000, 100_000))
    by_metric = {row.metric: row for row in table}
    assert list(by_metric) == [
        "command -> flow confirmed p50", "command -> flow confirmed p99", "commands/s sustained",
        "install 1k filters", "install 100k filters", "flows identical, all sizes",
        "ovs-vswitchd CPU for 1k install", "ovs-vswitchd CPU for 100k install",
        "controller CPU per filter at 1k", "controller CPU per filter at 100k",
        "controller memory at 1k", "controller memory at 100k",
        "ovs-vswitchd memory at 1k", "ovs-vswitchd memory at 100k",
        "health p99 during 100k install", "command p99 during 100k install"]
    p99 = by_metric["command -> flow confirmed p99"]
    assert (p99.target, p99.target_on, p99.value.median, p99.verdict) == (("<=", 15.0), "value", 12.0, "PASS")
    assert by_metric["command -> flow confirmed p50"].verdict is None
    bulk = by_metric["install 100k filters"]
    assert bulk.ratio.values == (20.0, 1.0, 1.4)  # per round, not a ratio of medians
    assert (bulk.target, bulk.target_on, bulk.verdict) == (("<=", 1.5), "ratio", "PASS")
    assert by_metric["install 1k filters"].target is None
    identical = by_metric["flows identical, all sizes"]
    assert (identical.value.values, identical.target_on, identical.verdict) == ((1.0, 1.0, 1.0), "value", "PASS")
    cpu = by_metric["ovs-vswitchd CPU for 100k install"]
    assert (cpu.baseline_name, cpu.ratio.median, cpu.target, cpu.verdict) == ("ovs-ofctl --bundle", 1.1,
                                                                              ("<=", 1.2), "PASS")
    assert by_metric["ovs-vswitchd CPU for 1k install"].target is None
    per_filter = by_metric["controller CPU per filter at 100k"]
    assert (per_filter.unit, per_filter.value.median, per_filter.target) == ("us", 50.0, None)
    assert by_metric["controller CPU per filter at 1k"].value.median == 500.0
    memory = by_metric["controller memory at 100k"]
    assert (memory.baseline, memory.target, memory.verdict) == (None, ("<=", 150.0), "MISS")
    assert by_metric["controller memory at 1k"].target is None
    vswitchd = by_metric["ovs-vswitchd memory at 1k"]
    assert (vswitchd.baseline_name, vswitchd.ratio.median, vswitchd.verdict) == ("before install", 1.5, None)
    health = by_metric["health p99 during 100k install"]
    assert (health.value.median, health.target, health.target_on, health.verdict) == (80.0, ("<=", 100.0),
                                                                                      "value", "PASS")
    other = by_metric["command p99 during 100k install"]
    assert (other.value.median, other.target, other.verdict) == (60.0, ("<=", 50.0), "MISS")


def test_probe_rows_name_the_largest_size_measured_and_judge_only_the_targeted_one():
    install = [{1_000: _install_round(1.0)[1_000]}]
    table = rows([_agent_round(9.0)], install, [_probed_round(1.0, 1.0)], (1_000,))
    assert [(row.metric, row.target) for row in table[-2:]] == [("health p99 during 1k install", None),
                                                                ("command p99 during 1k install", None)]


def test_same_flows_accepts_equal_tables_and_names_what_differs():
    flows = ["cookie=0x1, table=1, priority=3000,ip,nw_src=10.0.0.1 actions=drop",
             "cookie=0x1, table=1, priority=3000,ip,nw_src=10.0.0.2 actions=drop"]
    same_flows(flows, list(flows))
    changed = [flows[0], flows[1].replace("cookie=0x1", "cookie=0x2")]
    with pytest.raises(BenchError, match=r"1 only in the controller's table, e\.g\. \['cookie=0x1, .*10\.0\.0\.2"
                                         r".*1 only in the bundle's, e\.g\. \['cookie=0x2"):
        same_flows(flows, sorted(changed))
    with pytest.raises(BenchError, match="0 only in the controller's table.*1 only in the bundle's"):
        same_flows(flows[:1], flows)


def test_sample_counts_only_calls_begun_between_the_events():
    running, ended = threading.Event(), threading.Event()
    calls = []

    def probe():
        calls.append(running.is_set())
        if len(calls) == 3:
            ended.set()  # the bulk ends during the third call: it counts, no fourth begins

    latencies = []
    sampler = threading.Thread(target=lambda: latencies.extend(sample(probe, running, ended)))
    sampler.start()
    assert not calls  # nothing before the install begins
    running.set()
    sampler.join(5.0)
    assert calls == [True, True, True] and len(latencies) == 3 and all(ms >= 0 for ms in latencies)
