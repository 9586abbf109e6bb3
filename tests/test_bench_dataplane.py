"""The data-path benchmarks' lab (bench/dataplane.py) really puts traffic on the paths it
names, with real OVS, controller, agent, mbctl, iptables, iperf3 and mausezahn: otherwise
the suite's ratios would compare the wrong things.  Also one benchmark end to end (latency,
one small round) through its JSON."""

from __future__ import annotations

import json

import pytest

from mbvisor.controller.pipeline import cookie_of
from mbvisor.bench import latency
from mbvisor.bench.benchlib import SCHEMA
from mbvisor.bench.dataplane import BACKEND_IP, MB_IP, MB_MAC, Dataplane
from mbvisor.topologies import netlab

pytestmark = pytest.mark.host


@pytest.fixture
def dataplane():
    netlab.require_host_tools()
    with Dataplane(progress=lambda message: None) as lab:
        yield lab
    assert lab.lab.leftovers() == {k: [] for k in lab.lab.leftovers()}


def test_paths_carry_the_traffic_they_name(dataplane):
    # Through the middlebox: its kernel forwards every transaction (request in, out again).
    rx = dataplane.mb_rx()
    assert dataplane.use("through-mb") == MB_IP
    result = dataplane.request_response(MB_IP, 300, warmup=10)
    assert result["count"] == 300
    assert dataplane.mb_rx() - rx >= 2 * 310

    # In-guest filtering: a flood reaches the middlebox's interface, the switch drops nothing.
    attack = dataplane.attack(20_000)
    assert attack["sent"] == 20_000
    assert attack["reached_mb"] > 0 and attack["dropped_in_switch"] == 0

    # Offloaded: the same address, served by the backend in the switch; the middlebox sees
    # none of it, and the attack is dropped in the switch.
    assert dataplane.use("offloaded") == MB_IP
    assert any("drop" in line and MB_MAC in line for line in dataplane.bridge.dump_flows())
    rx = dataplane.mb_rx()
    assert dataplane.request_response(MB_IP, 300, warmup=10)["count"] == 300
    tcp = dataplane.iperf(MB_IP, 1)
    assert tcp["gbps"] > 0.01
    attack = dataplane.attack(20_000)
    assert attack["reached_mb"] == 0 and attack["dropped_in_switch"] > 0
    assert dataplane.mb_rx() == rx

    # Direct: the backend's own address, offloads in place.
    assert dataplane.use("direct") == BACKEND_IP
    assert dataplane.iperf(BACKEND_IP, 1, udp=True)["pps"] > 1000

    # A background flood counts what it sent; cancelling removes every offload flow.
    with dataplane.under_flood() as flood:
        dataplane.request_response(BACKEND_IP, 50, warmup=0)
    assert flood.sent > 0
    dataplane.use("through-mb")
    offloads = f"cookie={cookie_of(MB_MAC):#x},"  # its port security stays while it is a VM
    assert not any(offloads in line for line in dataplane.bridge.dump_flows())


def test_latency_benchmark_writes_its_table_and_json(tmp_path, capsys):
    output = tmp_path / "latency.json"
    assert latency.main(["--quick", "--rounds", "1", "--json", str(output)]) == 0
    document = json.loads(output.read_text())
    assert document["schema"] == SCHEMA and document["benchmark"] == "latency" and document["rounds"] == 1
    rows = {(row["metric"], row["baseline_name"]): row for row in document["rows"]}
    p50 = rows[("request/response p50", "through-mb")]
    assert p50["value"]["median"] > 0 and p50["baseline"]["median"] > 0 and p50["verdict"] in ("PASS", "MISS")
    assert rows[("packets through the middlebox", "through-mb")]["value"]["median"] == 0
    table = capsys.readouterr().out
    assert table.startswith("mbvisor bench latency") and "request/response p99" in table


def test_suite_runs_a_benchmark_and_writes_the_page(tmp_path):
    """`mbvisor bench all --only latency --quick`: the benchmark in its own process, its JSON,
    the suite's durations, and the page (with the benchmarks not run listed as such)."""
    from mbvisor.bench import suite

    results, page, plot = tmp_path / "results", tmp_path / "benchmarks.md", tmp_path / "benchmarks.png"
    assert suite.main(["--quick", "--only", "latency", "--results", str(results), "--output", str(page),
                       "--plot", str(plot)]) == 0
    summary = json.loads((results / "suite.json").read_text())
    assert summary["benchmarks"]["latency"]["status"] == "ok" and summary["seconds_total"] > 0
    assert json.loads((results / "latency.json").read_text())["benchmark"] == "latency"
    text = page.read_text()
    assert "request/response p50" in text and "throughput" in text.split("Not run", 1)[1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_benchmark_tool_is_named_and_nothing_is_left(monkeypatch):
    from mbvisor.bench import dataplane as dataplane_module

    monkeypatch.setitem(dataplane_module.BENCH_TOOLS, "no-such-tool-xyz", "some-package")
    lab = Dataplane(progress=lambda message: None)
    with pytest.raises(netlab.HostToolsMissing, match=r"no-such-tool-xyz \(Debian package some-package\)"):
        lab.__enter__()
    assert not lab.workdir.exists()
    assert all(not names for names in lab.lab.leftovers().values())
