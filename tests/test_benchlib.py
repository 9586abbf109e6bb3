"""The benchmark suite's common form (bench/benchlib.py): figures over rounds, rows compared
with a baseline round by round, verdicts, the stable text table and the JSON document."""

from __future__ import annotations

import json
import math

import pytest

from mbvisor.bench.benchlib import SCHEMA, BenchError, Spread, compare, document, judge, render_table


def test_spread_is_median_min_max_of_the_rounds():
    spread = Spread.of([3, 1, 2, 10])
    assert (spread.median, spread.low, spread.high) == (2.5, 1.0, 10.0)
    assert spread.values == (3.0, 1.0, 2.0, 10.0)
    assert spread.text() == "2.50 [1.00-10.0]"
    assert spread.as_json() == {"median": 2.5, "min": 1.0, "max": 10.0, "values": [3.0, 1.0, 2.0, 10.0]}


def test_spread_of_nothing_is_an_error():
    with pytest.raises(BenchError):
        Spread.of([])


@pytest.mark.parametrize("value, target, verdict", [
    (5, (">=", 5), "PASS"), (4.9, (">=", 5), "MISS"),
    (5, ("<=", 5), "PASS"), (5.1, ("<=", 5), "MISS"),
    (0, ("<=", 0), "PASS"), (7, None, None),
])
def test_judge_limits_are_inclusive(value, target, verdict):
    assert judge(value, target) == verdict


def test_ratio_is_computed_round_by_round():
    row = compare("rate", "op/s", "ring", [2, 4, 9], "pipe", [1, 4, 3])
    assert row.ratio.values == (2.0, 1.0, 3.0)
    assert row.ratio.median == 2.0  # the median of the ratios, not 4/3 (the ratio of the medians)
    assert (row.value.median, row.baseline.median) == (4.0, 3.0)


def test_ratio_with_a_zero_baseline():
    row = compare("packets", "pkts", "offloaded", [0, 5], "in-guest", [0, 0])
    assert row.ratio.values == (1.0, math.inf)


def test_mismatched_round_counts_raise():
    with pytest.raises(BenchError, match="3 rounds of ring but 2 of pipe"):
        compare("rate", "op/s", "ring", [1, 2, 3], "pipe", [1, 2])


def test_target_applies_to_the_ratio_by_default_with_a_baseline():
    row = compare("install", "s", "controller", [30, 40, 50], "bundle", [10, 10, 10], target=("<=", 3))
    assert row.target_on == "ratio" and row.ratio.median == 4.0 and row.verdict == "MISS"


def test_target_on_value_judges_the_subject_despite_a_baseline():
    row = compare("p99", "ms", "agent", [12, 14, 13], "direct", [1, 1, 1], target=("<=", 15), target_on="value")
    assert row.target_on == "value" and row.verdict == "PASS"  # the ratio (13x) is not judged


def test_target_applies_to_the_value_without_a_baseline():
    row = compare("memory", "MB", "controller", [310, 320, 330], target=("<=", 300))
    assert row.baseline is None and row.ratio is None
    assert row.target_on == "value" and row.verdict == "MISS"


def test_row_without_target_has_no_verdict():
    assert compare("rate", "op/s", "ring", [1, 2], "pipe", [1, 1]).verdict is None


def test_table_has_a_stable_header_and_one_line_per_row():
    rows = [compare("throughput", "Mbit/s", "offloaded", [900, 950, 1000], "middlebox", [400, 500, 450],
                    target=(">=", 1.5)),
            compare("p99", "ms", "agent", [12, 14, 13], target=("<=", 15))]
    table = render_table("title line", rows).splitlines()
    other = render_table("another title", rows[:1]).splitlines()
    assert table[0] == "title line"
    assert table[1] == other[1]  # same header whatever the rows
    assert table[1].split() == ["metric", "unit", "subject", "median", "[min-max]", "baseline", "median",
                                "[min-max]", "ratio", "[min-max]", "target", "result"]
    assert len(table) == 2 + len(rows) and len(other) == 3
    first, second = table[2].split(), table[3].split()
    assert first[:3] == ["throughput", "Mbit/s", "offloaded"] and first[-3:] == [">=", "1.50x", "PASS"]
    assert second[:3] == ["p99", "ms", "agent"] and second[-3:] == ["<=", "15.0", "PASS"]
    assert second.count("-") == 3  # no baseline, no baseline figure, no ratio


def test_document_is_json_with_the_schema_and_the_rows():
    row = compare("install", "s", "controller", [30, 40], "bundle", [10, 10], target=("<=", 3))
    doc = json.loads(json.dumps(document("control", "quick", "2025-01-01T00:00:00Z", 2, [row], raw={"a": 1})))
    assert doc["schema"] == SCHEMA and doc["benchmark"] == "control" and doc["rounds"] == 2
    assert set(doc["machine"]) == {"python", "cpus", "loadavg", "kernel"} and doc["raw"] == {"a": 1}
    assert doc["rows"] == [{
        "metric": "install", "unit": "s", "subject": "controller",
        "value": {"median": 35.0, "min": 30.0, "max": 40.0, "values": [30.0, 40.0]},
        "baseline_name": "bundle", "baseline": {"median": 10.0, "min": 10.0, "max": 10.0, "values": [10.0, 10.0]},
        "ratio": {"median": 3.5, "min": 3.0, "max": 4.0, "values": [3.0, 4.0]},
        "target": ["<=", 3], "target_on": "ratio", "verdict": "MISS"}]


def test_after_silence_staggers_the_channels_round_by_round():
    from mbvisor.bench.benchlib import after_silence

    assert list(after_silence(3, 0.003, 2)) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert list(after_silence(2, 0.0, 0)) == []
