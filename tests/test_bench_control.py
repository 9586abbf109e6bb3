"""The control benchmark's table from per-round figures (pure: no OVS, no processes)."""

from __future__ import annotations

from mbvisor.bench.control import rows, size_label


def _agent_round(p99: float) -> dict:
    return {"p50": 2.0, "p99": p99, "direct_p50": 1.0, "direct_p99": 2.0, "channels_per_s": 900.0,
            "direct_per_s": 1000.0}


def _install_round(seconds_100k: float) -> dict:
    def size(seconds, bundle, controller_mb):
        return {"seconds": seconds, "bundle_seconds": bundle, "controller_mb": controller_mb,
                "vswitchd_mb": 60.0, "vswitchd_before_mb": 40.0}
    return {1_000: size(0.4, 0.1, 80.0), 100_000: size(seconds_100k, 1.0, 400.0)}


def test_size_labels():
    assert [size_label(n) for n in (1_000, 10_000, 100_000, 500)] == ["1k", "10k", "100k", "500"]


def test_rows_targets_and_ratios_per_round():
    table = rows([_agent_round(9.0), _agent_round(20.0), _agent_round(12.0)],
                 [_install_round(20.0), _install_round(2.0), _install_round(30.0)], (1_000, 100_000))
    by_metric = {row.metric: row for row in table}
    assert list(by_metric) == [
        "command -> flow confirmed p50", "command -> flow confirmed p99", "commands/s sustained",
        "install 1k filters", "install 100k filters", "controller memory at 1k", "controller memory at 100k",
        "ovs-vswitchd memory at 1k", "ovs-vswitchd memory at 100k"]
    p99 = by_metric["command -> flow confirmed p99"]
    assert (p99.target, p99.target_on, p99.value.median, p99.verdict) == (("<=", 15.0), "value", 12.0, "PASS")
    assert by_metric["command -> flow confirmed p50"].verdict is None
    bulk = by_metric["install 100k filters"]
    assert bulk.ratio.values == (20.0, 2.0, 30.0)  # per round, not a ratio of medians
    assert (bulk.target, bulk.target_on, bulk.verdict) == (("<=", 3.0), "ratio", "MISS")
    assert by_metric["install 1k filters"].target is None
    memory = by_metric["controller memory at 100k"]
    assert (memory.baseline, memory.target, memory.verdict) == (None, ("<=", 300.0), "MISS")
    assert by_metric["controller memory at 1k"].target is None
    vswitchd = by_metric["ovs-vswitchd memory at 1k"]
    assert (vswitchd.baseline_name, vswitchd.ratio.median, vswitchd.verdict) == ("before install", 1.5, None)
