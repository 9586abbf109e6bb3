"""The data-path benchmarks' tables from given per-round results (pure, no lab): which
figure is compared with which baseline, and which target applies where."""

from __future__ import annotations

import pytest

from mbvisor.bench import latency, scale, throughput, wakeups


def by_key(rows):
    return {(row.metric, row.subject, row.baseline_name): row for row in rows}


def test_throughput_rows_compare_offloaded_with_both_baselines_and_the_issue_targets():
    def results(gbps, kpps, **extra):
        return [{"gbps": gbps, "kpps": kpps, **extra}, {"gbps": gbps * 1.1, "kpps": kpps * 1.1, **extra}]

    figures = {"through-mb": results(0.6, 80), "through-mb +flood": results(0.4, 30),
               "offloaded": results(0.9, 100), "offloaded +flood": results(0.8, 50),
               "direct": results(0.95, 100), "direct +flood": results(0.8, 50),
               "through-vm": results(0.3, 30, accel="tcg"), "through-vm +flood": results(0.1, 10, accel="tcg")}
    rows = by_key(throughput.rows(figures))
    assert len(rows) == 12
    tcp = rows[("client TCP throughput", "offloaded", "through-mb")]
    assert tcp.ratio.median == pytest.approx(1.5) and tcp.target == (">=", 1.25) and tcp.verdict == "PASS"
    flood = rows[("client TCP throughput, flood", "offloaded +flood", "through-mb +flood")]
    assert flood.target == (">=", 1.5) and flood.verdict == "PASS"
    direct = rows[("client TCP throughput", "offloaded", "direct")]
    assert direct.target == (">=", 0.95) and direct.ratio.median == pytest.approx(0.9 / 0.95) and direct.verdict == "MISS"
    udp = rows[("64-byte UDP rate, flood", "offloaded +flood", "through-mb +flood")]
    assert udp.unit == "kpps" and udp.ratio.median == pytest.approx(50 / 30)


def test_latency_rows_targets_on_p50_ratio_and_on_packets_through_the_middlebox():
    def results(p50, mb_rx):
        return [{"p50_us": p50, "p99_us": 3 * p50, "mb_rx": mb_rx}] * 3

    vm = [dict(result, accel="tcg") for result in results(300, 2400)]
    rows = by_key(latency.rows({"through-mb": results(200, 2400), "offloaded": results(120, 0),
                                "direct": results(110, 0), "through-vm": vm}))
    assert rows[("request/response p50", "offloaded", "through-mb")].verdict == "PASS"     # 0.6 <= 0.7
    assert rows[("request/response p50", "offloaded", "direct")].verdict == "PASS"         # 1.09 <= 1.1
    assert rows[("request/response p99", "offloaded", "direct")].verdict is None
    leak = rows[("packets through the middlebox", "offloaded", "through-mb")]
    assert leak.target_on == "value" and leak.verdict == "PASS"
    assert by_key(latency.rows({"through-mb": results(200, 2400), "offloaded": results(120, 1),
                                "direct": results(110, 0), "through-vm": vm}))[
        ("packets through the middlebox", "offloaded", "through-mb")].verdict == "MISS"


def test_wakeups_rows_scale_to_the_packets_sent():
    namespaces = {"in-guest filtering": [{"sent": 500_000, "reached_mb": 200_000, "dropped_in_switch": 0}],
                  "offloaded": [{"sent": 500_000, "reached_mb": 1, "dropped_in_switch": 480_000}]}
    qemu = [{"sent_before": 50_000, "interrupts_before": 30_000, "guest_rx_before": 50_000,
             "sent_after": 50_000, "interrupts_after": 0, "guest_rx_after": 0}]
    rows = by_key(wakeups.rows(namespaces, qemu))
    reached = rows[("attack packets at the MB per 1M", "offloaded", "in-guest filtering")]
    assert reached.value.median == 2 and reached.baseline.median == 400_000 and reached.verdict == "MISS"
    assert rows[("dropped in the switch per 1M", "offloaded", None)].value.median == 960_000
    irqs = rows[("QEMU virtio irqs per 100k", "offloaded", "in-guest filtering")]
    assert irqs.baseline.median == 60_000 and irqs.value.median == 0 and irqs.verdict == "PASS"


def test_scale_rows_compare_many_filters_with_none():
    results = {"none": [{"gbps": 1.0, "kpps": 100}], "many": [{"gbps": 0.96, "kpps": 90}]}
    rows = by_key(scale.rows(results, 100_000))
    assert rows[("client TCP throughput", "100k filters", "0 filters")].verdict == "PASS"
    assert rows[("64-byte UDP rate", "100k filters", "0 filters")].verdict == "MISS"
