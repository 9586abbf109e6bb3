"""The suite's report (bench/report.py): results/bench/*.json -> docs/benchmarks.md + PNG.
Pure: fake benchmark documents built with benchlib, written to tmp_path."""

from __future__ import annotations

import json

import pytest

from mbvisor.bench import report
from mbvisor.bench.benchlib import compare, document

WHEN = "2025-01-02T03:04:05Z"
NOTES = "### bulk install\n\nThe controller sends one flow_mod per filter | see issue 12.\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def latency_rows():
    return [compare("TCP RR p50", "ms", "offloaded", [0.21, 0.25, 0.22], "through middlebox", [0.30, 0.33, 0.31],
                    target=("<=", 1.0)),
            compare("TCP RR p99", "ms", "offloaded", [0.51, 0.55, 0.52], "through middlebox", [0.50, 0.53, 0.51],
                    target=("<=", 1.0)),
            compare("TCP RR p50", "ms", "direct", [0.19, 0.20, 0.20])]


def control_rows():
    return [compare("command -> flow p99", "ms", "guest", [12, 16, 18], target=("<=", 15)),
            compare("bulk install 100k", "s", "controller", [40, 42, 39], "ovs-ofctl --bundle", [2, 2.1, 1.9],
                    target=("<=", 3)),
            compare("controller memory", "MB", "controller", [210, 212, 215], target=("<=", 300))]


def write_results(directory, suite=True):
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("latency", latency_rows()), ("control", control_rows())):
        (directory / f"{name}.json").write_text(json.dumps(document(name, "quick", WHEN, 3, rows, raw=[1, 2])))
    if suite:
        (directory / "suite.json").write_text(json.dumps({
            "started": WHEN, "seconds_total": 321.4,
            "benchmarks": {"latency": {"seconds": 61.2, "status": "ok"}, "control": {"seconds": 250, "status": "ok"},
                           "throughput": {"seconds": 3, "status": "failed"}}}))
    return directory


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One full report (page + plot) shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("report")
    results = write_results(base / "results")
    docs = base / "docs"
    docs.mkdir()
    (docs / "benchmarks-notes.md").write_text(NOTES)
    report.write_report(results, docs / "benchmarks.md", docs / "benchmarks.png")
    return base, (docs / "benchmarks.md").read_text(), (docs / "benchmarks.png").read_bytes()


def test_page_says_it_is_generated_and_how(generated):
    _, page, _ = generated
    head = page[:600]
    assert "generated" in head.lower()
    assert "`mbvisor bench all`" in head and "`mbvisor bench report`" in head and "results/bench/*.json" in head


def test_summary_lists_every_target_with_its_verdict(generated):
    _, page, _ = generated
    summary = page.split("## Targets", 1)[1].split("\n## ", 1)[0]
    assert "| benchmark | metric | subject vs baseline | figure median [min–max] | target | result |" in summary
    assert ("| latency | TCP RR p50 | offloaded vs through middlebox | 0.710 [0.700–0.758]x | ≤ 1.00x | **PASS** |"
            in summary)
    assert "| latency | TCP RR p99 | offloaded vs through middlebox | 1.02 [1.02–1.04]x | ≤ 1.00x | **MISS** |" in summary
    assert "| control | command -> flow p99 | guest | 16.0 [12.0–18.0] ms | ≤ 15.0 ms | **MISS** |" in summary
    assert "| control | bulk install 100k | controller vs ovs-ofctl --bundle | 20.0 [20.0–20.5]x | ≤ 3.00x | **MISS** |" in summary
    assert "| control | controller memory | controller | 212 [210–215] MB | ≤ 300 MB | **PASS** |" in summary
    assert "direct" not in summary  # a row without target is only in its benchmark's table
    assert "2 PASS, 3 MISS of 5 targets." in summary
    assert "Not run: wakeups, throughput, scale, datacentre, follow." in summary


def test_each_benchmark_has_a_section(generated):
    _, page, _ = generated
    for name in report.BENCHMARKS:
        assert f"\n## {name}\n\n{report.DESCRIPTIONS[name]}\n" in page
    latency = page.split("\n## latency\n", 1)[1].split("\n## ", 1)[0]
    assert f"Mode quick, 3 rounds, run {WHEN}; machine: python " in latency
    assert ("| metric | unit | subject | median [min–max] | baseline | median [min–max] | ratio [min–max] "
            "| target | result |") in latency
    assert ("| TCP RR p50 | ms | offloaded | 0.220 [0.210–0.250] | through middlebox | 0.310 [0.300–0.330] "
            "| 0.710 [0.700–0.758]x | ≤ 1.00x | **PASS** |") in latency
    assert "| TCP RR p50 | ms | direct | 0.200 [0.190–0.200] | - | - | - | - | - |" in latency
    throughput = page.split("\n## throughput\n", 1)[1].split("\n## ", 1)[0]
    assert "Not run (suite status: failed)." in throughput and "| metric |" not in throughput
    assert "Not run." in page.split("\n## scale\n", 1)[1].split("\n## ", 1)[0]


def test_suite_durations(generated):
    _, page, _ = generated
    run = page.split("\n## Run\n", 1)[1].split("\n## ", 1)[0]
    assert "| latency | ok | 61 s |" in run and "| control | ok | 250 s |" in run
    assert "| throughput | failed | 3 s |" in run
    assert f"Started {WHEN}, 321 s in all." in run


def test_notes_are_included_verbatim_at_the_end(generated):
    base, page, _ = generated
    assert page.endswith(f"## {report.NOTES_HEADING}\n\n{NOTES}")
    assert (base / "docs" / "benchmarks-notes.md").read_text() == NOTES


def test_plot_is_a_png_linked_relatively(generated):
    _, page, png = generated
    assert "](benchmarks.png)" in page and "![" in page
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert b"Software" not in png and b"tIME" not in png  # nothing that changes from run to run


def test_report_is_deterministic(generated, tmp_path):
    base, page, png = generated
    report.write_report(base / "results", tmp_path / "benchmarks.md", tmp_path / "benchmarks.png",
                        notes=base / "docs" / "benchmarks-notes.md")
    assert (tmp_path / "benchmarks.md").read_text() == page
    assert (tmp_path / "benchmarks.png").read_bytes() == png


def test_without_notes_suite_or_plot(tmp_path):
    results = write_results(tmp_path / "results", suite=False)
    report.write_report(results, tmp_path / "docs" / "benchmarks.md", None)
    page = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert f"## {report.NOTES_HEADING}\n\nNo notes yet" in page
    assert not (tmp_path / "docs" / "benchmarks-notes.md").exists()  # never written by the generator
    assert "## Run" not in page and "benchmarks.png" not in page


def test_main_writes_the_page(tmp_path, monkeypatch):
    plotted = []
    monkeypatch.setattr(report, "render_plot", lambda results, path: plotted.append((sorted(results), path)))
    results = write_results(tmp_path / "results")
    page, plot = tmp_path / "out" / "page.md", tmp_path / "img" / "plot.png"
    assert report.main(["--results", str(results), "--output", str(page), "--plot", str(plot)]) == 0
    assert "](../img/plot.png)" in page.read_text()
    assert plotted == [(["control", "latency"], str(plot))]


def test_wrong_schema_is_refused(tmp_path, capsys):
    results = write_results(tmp_path / "results")
    (results / "scale.json").write_text(json.dumps({"schema": "mbvisor-bench/0", "benchmark": "scale", "rows": []}))
    page = tmp_path / "benchmarks.md"
    assert report.main(["--results", str(results), "--output", str(page), "--plot", str(tmp_path / "p.png")]) == 2
    error = capsys.readouterr().err
    assert "scale.json" in error and "mbvisor-bench/0" in error and "mbvisor-bench/1" in error
    assert not page.exists() and not (tmp_path / "p.png").exists()
    with pytest.raises(report.ReportError, match="schema"):
        report.write_report(results, page, None)


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read"),
    (json.dumps(document("latency", "quick", WHEN, 1, [])), "holds benchmark 'latency'"),
    (json.dumps({**document("scale", "quick", WHEN, 1, []), "rows": [{"metric": "x"}]}), "row 1"),
], ids=["not-json", "other-benchmark", "bad-row"])
def test_broken_results_are_refused(tmp_path, content, message):
    results = write_results(tmp_path / "results", suite=False)
    (results / "scale.json").write_text(content)
    with pytest.raises(report.ReportError, match=message):
        report.write_report(results, tmp_path / "benchmarks.md", None)


def test_missing_results_directory_is_refused(tmp_path):
    assert report.main(["--results", str(tmp_path / "nowhere"), "--output", str(tmp_path / "b.md"),
                        "--plot", str(tmp_path / "b.png")]) == 2
    assert not (tmp_path / "b.md").exists()


def test_empty_results_directory_lists_everything_as_not_run(tmp_path):
    (tmp_path / "results").mkdir()
    report.write_report(tmp_path / "results", tmp_path / "benchmarks.md", tmp_path / "benchmarks.png")
    page = (tmp_path / "benchmarks.md").read_text()
    assert "No target measured." in page and "Not run: wakeups, latency, throughput, control, scale, datacentre, follow." in page
    assert (tmp_path / "benchmarks.png").read_bytes().startswith(PNG_MAGIC)


def test_log_axis_when_ratios_span_more_than_20x():
    assert report.log_axis([0.9, 1.0, 20.5])
    assert not report.log_axis([0.9, 1.1, 3.0, 15.0])
    assert not report.log_axis([0.0, 1.0, float("inf")])  # zero and infinite ratios do not count
