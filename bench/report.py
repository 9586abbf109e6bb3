#!/usr/bin/env python3
"""The benchmark suite's report: ``results/bench/<name>.json`` (written by
``benchlib.finish()``) turned into ``docs/benchmarks.md`` and the plot
``docs/benchmarks.png``.

``mbvisor bench all`` runs every benchmark and then calls :func:`write_report`;
``mbvisor bench report`` (or ``python bench/report.py``) rewrites the page from the JSON
files already there.  A benchmark without a file is listed as "not run".  The hand-written
explanations of missed targets live in ``docs/benchmarks-notes.md`` (next to the page),
which is included verbatim and never written by this script.

The page and the plot depend only on the JSON files and the notes: no generation
timestamp, so regenerating from the same results gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from pathlib import Path

from mbvisor.bench.benchlib import SCHEMA, BenchError, Row, Spread, _number

# The suite's benchmarks, in the page's order.
BENCHMARKS = ("wakeups", "latency", "throughput", "control", "scale", "datacentre", "follow")

DEFAULT_RESULTS = "results/bench"
DEFAULT_OUTPUT = "docs/benchmarks.md"
DEFAULT_PLOT = "docs/benchmarks.png"
NOTES_NAME = "benchmarks-notes.md"
NOTES_HEADING = "Why targets are missed and what would close them"

# What each benchmark measures and what its baseline is: the only prose the generator writes.
DESCRIPTIONS = {
    "wakeups": (
        "An attacker floods the middlebox's address. Measured: the attack packets that reach "
        "the middlebox's network interface per million sent, with the attacker filtered inside "
        "the guest (iptables in the middlebox's namespace, the baseline) and with the filter "
        "offloaded to the switch; and, in a QEMU guest, the virtio input interrupts per 100,000 "
        "attack packets before the offload (baseline) and after it."),
    "latency": (
        "TCP request/response ping-pong latency, p50 and p99, for traffic the middlebox "
        "redirects to a backend: through the middlebox (kernel DNAT in its namespace: "
        "through-mb; in a real QEMU middlebox VM on a tap of the bridge: through-vm, named with "
        "its accelerator), with the redirect offloaded to the switch, and sent directly to the "
        "backend. The baselines are the two paths through a middlebox and the direct path."),
    "throughput": (
        "Client TCP throughput and 64-byte UDP packet rate through the middlebox (a namespace: "
        "through-mb; a real QEMU middlebox VM: through-vm, named with its accelerator), with the "
        "middlebox's work offloaded to the switch, and directly to the backend, each without "
        "and with an attack flood of the path's middlebox running. The baselines are the two "
        "paths through a middlebox and the direct path."),
    "control": (
        "The control path: guest command to flow confirmed latency, p50 and p99, through the "
        "shared-memory channel, the host agent and the controller; commands per second; bulk "
        "install of 1k, 10k and 100k filters, against the baseline of `ovs-ofctl --bundle` "
        "installing the same flows (the run fails unless both tables are identical), with "
        "ovs-vswitchd's CPU for each and the controller's CPU per filter; the resident memory "
        "of the controller and ovs-vswitchd; and, while the 100k install runs once more, the "
        "p99 of `GET /v1/health` from another client and of single commands to another switch "
        "of the same controller. Targets at 100k: install ≤ 1.5× the bundle, ovs-vswitchd CPU "
        "≤ 1.2× the bundle's, controller ≤ 150 MB, health p99 ≤ 100 ms, the other switch's "
        "command p99 ≤ 50 ms."),
    "scale": (
        "Client throughput through the switch with 100,000 filters of other middleboxes "
        "installed, against the baseline of the same traffic with none installed."),
    "datacentre": (
        "One controller serving 8 hypervisors, each a private ovs-vswitchd with OVS's dummy datapaths "
        "(control plane only), 125 middleboxes x 100 filters on each (100k filters): single-command "
        "latency (command to flow confirmed), p50 and p99, on every hypervisor interleaved, against the "
        "baseline of the same commands with only one hypervisor connected holding its 12.5k share, "
        "earlier in the same run; then one hypervisor's ovs-vswitchd is SIGKILLed and restarted: the "
        "others' p99 while it is down and reconverging against theirs just before, and whether the "
        "restarted switch converges to exactly the flows it had (mbvisor's cookie, sorted "
        "`dump-flows --no-stats`). Targets: the worst host's p99 ≤ 2× the single host's, the "
        "others' p99 during the crash ≤ 1.5× (\"unchanged within noise\"), converged."),
    "follow": (
        "`mbctl follow nft` in a middlebox namespace keeping the host equal to a real nftables set, "
        "through the real agent and controller: a 10,000-element set offloaded from scratch, against "
        "the baseline of the same 10,000 filters written through the same channel in full frames by a "
        "script; `nft add element` to drop flow confirmed, p50 and p99, against one `A` command through "
        "the same channel; the follower's idle CPU (with its `nft monitor`); 1,000 random changes and "
        "whether the host then equals the set. Targets: 10k offloaded ≤ 2 s, propagation p99 ≤ 50 ms, "
        "idle CPU ≤ 0.1 % of a core, host equal to the set."),
}

COLOURS = {"PASS": "#2e9d3a", "MISS": "#d0312d", None: "#9a9a9a"}


class ReportError(BenchError):
    """The results cannot be reported (wrong schema, unreadable file): nothing is written."""


# --- reading ------------------------------------------------------------------------------

def _spread(data, where: str) -> Spread | None:
    if data is None:
        return None
    try:
        return Spread(float(data["median"]), float(data["min"]), float(data["max"]),
                      tuple(float(v) for v in data["values"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ReportError(f"{where}: not a figure {{median, min, max, values}}: {error!r}") from None


def _row(data, where: str) -> Row:
    try:
        target = data["target"]
        if target is not None:
            op, limit = target
            if op not in (">=", "<="):
                raise ValueError(f"target operator {op!r}")
            target = (op, float(limit))
        row = Row(metric=str(data["metric"]), unit=str(data["unit"]), subject=str(data["subject"]),
                  value=_spread(data["value"], f"{where} value"),
                  baseline_name=data["baseline_name"],
                  baseline=_spread(data["baseline"], f"{where} baseline"),
                  ratio=_spread(data["ratio"], f"{where} ratio"),
                  target=target, target_on=data["target_on"], verdict=data["verdict"])
    except (KeyError, TypeError, ValueError) as error:
        raise ReportError(f"{where}: not a row of {SCHEMA}: {error!r}") from None
    if row.value is None or row.target_on not in ("ratio", "value") or row.verdict not in ("PASS", "MISS", None):
        raise ReportError(f"{where}: not a row of {SCHEMA} (value, target_on or verdict)")
    return row


def load_result(path: Path, name: str) -> dict:
    """One benchmark's JSON, with its rows as :class:`benchlib.Row`; ReportError if it is
    unreadable, of another schema, or of another benchmark."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: cannot read: {error}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"{path}: schema {found!r}, expected {SCHEMA!r} "
                          f"(a file written by benchlib.finish())")
    if data.get("benchmark") != name:
        raise ReportError(f"{path}: holds benchmark {data.get('benchmark')!r}, expected {name!r}")
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise ReportError(f"{path}: no list of rows")
    data = dict(data)
    data["rows"] = [_row(row, f"{path} row {index + 1}") for index, row in enumerate(rows)]
    return data


def load_results(results_dir) -> tuple[dict[str, dict], dict | None]:
    """({name: document} for the suite's benchmarks that have a file, suite.json or None)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: no such results directory (run `mbvisor bench all` first)")
    results = {name: load_result(results_dir / f"{name}.json", name)
               for name in BENCHMARKS if (results_dir / f"{name}.json").exists()}
    suite = None
    suite_path = results_dir / "suite.json"
    if suite_path.exists():
        try:
            suite = json.loads(suite_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ReportError(f"{suite_path}: cannot read: {error}") from None
        if not isinstance(suite, dict) or not isinstance(suite.get("benchmarks", {}), dict):
            raise ReportError(f"{suite_path}: not a suite summary {{started, seconds_total, benchmarks}}")
    return results, suite


# --- the page -----------------------------------------------------------------------------

def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _spread_text(spread: Spread | None, suffix: str = "") -> str:
    if spread is None:
        return "-"
    return f"{_number(spread.median)} [{_number(spread.low)}–{_number(spread.high)}]{suffix}"


def _target(row: Row) -> str:
    """``≤ 3x`` on a ratio, ``≤ 15 ms`` on a value."""
    if not row.target:
        return "-"
    op, limit = row.target
    suffix = "x" if row.target_on == "ratio" else (f" {row.unit}" if row.unit else "")
    return f"{'≥' if op == '>=' else '≤'} {_number(limit)}{suffix}"


def _table(header: list[str], lines: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in line) + " |" for line in lines]
    return out


def _result(row: Row) -> str:
    return f"**{row.verdict}**" if row.verdict else "-"


def _judged(row: Row) -> str:
    """The figure a target applies to: the ratio (``x``) or the subject's value (its unit)."""
    if row.target_on == "ratio":
        return _spread_text(row.ratio, "x")
    return _spread_text(row.value, f" {row.unit}" if row.unit else "")


def _versus(row: Row) -> str:
    return f"{row.subject} vs {row.baseline_name}" if row.baseline_name else row.subject


def _machine(info: dict) -> str:
    if not isinstance(info, dict):
        return "-"
    load = info.get("loadavg")
    load = " ".join(map(str, load)) if isinstance(load, list) else load
    return (f"python {info.get('python', '?')}, {info.get('cpus', '?')} CPUs, "
            f"load {load if load is not None else '?'}, kernel {info.get('kernel', '?')}")


def _vm(info) -> list[str]:
    """The through-vm middlebox's line: which accelerator the launcher chose, and why."""
    if not isinstance(info, dict):
        return []
    return [f"The through-vm middlebox ran under {str(info.get('accel', '?')).upper()} (the launcher: "
            f"{info.get('accel_reason', '?')}), ready {info.get('ready_seconds', '?')} s after its start.", ""]


def _seconds(value) -> str:
    return f"{value:.0f} s" if isinstance(value, (int, float)) else "-"


def render_markdown(results: dict[str, dict], suite: dict | None, notes: str | None,
                    plot_link: str | None, results_dir: str = DEFAULT_RESULTS) -> str:
    lines = [
        "<!-- Generated by bench/report.py from results/bench/*.json: do not edit by hand. -->",
        "# Benchmarks",
        "",
        "This page is generated: `mbvisor bench all` runs every benchmark and writes it; "
        "`mbvisor bench report` rewrites it from `results/bench/*.json`"
        + (f" (this time from `{results_dir}`)" if str(results_dir).rstrip("/") != DEFAULT_RESULTS else "")
        + f". Explanations go in `docs/{NOTES_NAME}`, which is included below.",
        "",
        "## Targets",
        "",
    ]
    targets = [(name, row) for name in BENCHMARKS if name in results
               for row in results[name]["rows"] if row.target]
    if targets:
        lines += _table(["benchmark", "metric", "subject vs baseline", "figure median [min–max]", "target",
                         "result"],
                        [[name, row.metric, _versus(row), _judged(row), _target(row), _result(row)]
                         for name, row in targets])
        passed = sum(row.verdict == "PASS" for _, row in targets)
        missed = sum(row.verdict == "MISS" for _, row in targets)
        lines += ["", f"{passed} PASS, {missed} MISS of {len(targets)} targets."]
    else:
        lines.append("No target measured.")
    not_run = [name for name in BENCHMARKS if name not in results]
    lines += ["", "Not run: " + (", ".join(not_run) if not_run else "none") + "."]

    if suite:
        lines += ["", "## Run", ""]
        ran = suite.get("benchmarks", {})
        lines += _table(["benchmark", "status", "duration"],
                        [[name, ran[name].get("status", "-") if isinstance(ran[name], dict) else "-",
                          _seconds(ran[name].get("seconds") if isinstance(ran[name], dict) else None)]
                         for name in list(BENCHMARKS) + sorted(set(ran) - set(BENCHMARKS)) if name in ran])
        lines += ["", f"Started {suite.get('started', '-')}, {_seconds(suite.get('seconds_total'))} in all."]

    if plot_link and results:
        lines += ["", "## Ratios", "",
                  "Each bar is a ratio subject / baseline (median over the rounds, whiskers the lowest and "
                  "highest round); the dashed line is 1.0 and the black tick the target. Green PASS, red MISS, "
                  "grey no target. Rows without a ratio are only in the tables.",
                  "", f"![Benchmark ratios against their baselines and targets]({plot_link})"]

    for name in BENCHMARKS:
        lines += ["", f"## {name}", "", DESCRIPTIONS[name], ""]
        if name not in results:
            status = (suite or {}).get("benchmarks", {}).get(name)
            status = status.get("status") if isinstance(status, dict) else None
            lines.append("Not run" + (f" (suite status: {status})." if status else "."))
            continue
        doc = results[name]
        lines += [f"Mode {doc.get('mode', '-')}, {doc.get('rounds', '-')} rounds, run {doc.get('when', '-')}; "
                  f"machine: {_machine(doc.get('machine'))}.", ""]
        lines += _vm(doc.get("vm"))
        if not doc["rows"]:
            lines.append("No rows.")
            continue
        lines += _table(["metric", "unit", "subject", "median [min–max]", "baseline", "median [min–max]",
                         "ratio [min–max]", "target", "result"],
                        [[row.metric, row.unit, row.subject, _spread_text(row.value), row.baseline_name or "-",
                          _spread_text(row.baseline), _spread_text(row.ratio, "x"), _target(row),
                          _result(row)] for row in doc["rows"]])

    lines += ["", f"## {NOTES_HEADING}", ""]
    if notes is not None and notes.strip():
        lines.append(notes.rstrip("\n"))
    else:
        lines.append(f"No notes yet: they are written by hand in `docs/{NOTES_NAME}`.")
    return "\n".join(lines) + "\n"


# --- the plot -----------------------------------------------------------------------------

def _label(row: Row) -> str:
    return textwrap.fill(f"{row.metric}: {row.subject} / {row.baseline_name}", 60)


def log_axis(values) -> bool:
    """A log x-axis when the positive finite figures of a panel span more than 20x."""
    values = [v for v in values if math.isfinite(v) and v > 0]
    return bool(values) and max(values) / min(values) > 20


def render_plot(results: dict[str, dict], path) -> None:
    """One panel per benchmark present: each row's ratio (median, min-max whiskers), a line
    at 1.0, the target as a tick, coloured by verdict.  Deterministic PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ReportError(f"the plot needs matplotlib (pip install 'mbvisor[bench]'): {error}") from None

    names = [name for name in BENCHMARKS if name in results]
    panels = [(name, [row for row in results[name]["rows"] if row.ratio is not None and math.isfinite(row.ratio.median)])
              for name in names]
    heights = [max(len(rows), 1) * 0.5 + 1.0 for _, rows in panels] or [1.5]
    figure = Figure(figsize=(14, sum(heights) + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without pyplot's global state
    axes = figure.subplots(len(heights), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    if not panels:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no benchmark results", ha="center", va="center", transform=axes[0].transAxes)

    for ax, (name, rows) in zip(axes, panels):
        ax.set_title(name, loc="left", fontweight="bold")
        if not rows:
            ax.axis("off")
            ax.text(0.5, 0.5, "no ratio rows (see the table)", ha="center", va="center", transform=ax.transAxes)
            continue
        points = [v for row in rows for v in (row.ratio.low, row.ratio.median, row.ratio.high)
                  if math.isfinite(v) and v > 0]
        points += [row.target[1] for row in rows if row.target and row.target_on == "ratio" and row.target[1] > 0]
        log = log_axis(points)
        floor = min(points + [1.0]) / 2 if log else 0.0
        ys = list(range(len(rows)))[::-1]  # first row at the top
        for y, row in zip(ys, rows):
            median = max(row.ratio.median, floor)
            low = max(min(row.ratio.low, median), floor)
            high = row.ratio.high if math.isfinite(row.ratio.high) else median
            colour = COLOURS.get(row.verdict if row.target_on == "ratio" else None, COLOURS[None])
            ax.barh(y, median - floor, left=floor, height=0.6, color=colour, alpha=0.85)
            ax.errorbar(median, y, xerr=[[median - low], [max(high, median) - median]], fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
            if row.target and row.target_on == "ratio":
                ax.plot([row.target[1]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2.5)
            if row.target_on == "ratio":
                note = f" {_number(row.ratio.median)}x" + (f" {row.verdict}" if row.verdict else "")
            else:   # the target is on the figure itself: show it beside the baseline's
                note = (f" {_number(row.ratio.median)}x ({_number(row.value.median)} vs "
                        f"{_number(row.baseline.median)} {row.unit}" + (f", {row.verdict}" if row.verdict else "") + ")")
            ax.annotate(note, (max(high, median), y), va="center", fontsize=8)
        ax.axvline(1.0, color="#444444", linestyle="--", linewidth=1)
        ax.set_yticks(ys, [_label(row) for row in rows], fontsize=9)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        right = max(points + [1.0])
        if log:
            ax.set_xscale("log")
            ax.set_xlim(floor, right * 4)
        else:
            ax.set_xlim(0, right * 1.2)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_xlabel("ratio subject / baseline" + (" (log scale)" if log else ""), fontsize=9)

    figure.legend(handles=[Patch(color=COLOURS["PASS"], label="PASS"), Patch(color=COLOURS["MISS"], label="MISS"),
                           Patch(color=COLOURS[None], label="no target on the ratio"),
                           Line2D([], [], color="black", linewidth=2.5, label="target"),
                           Line2D([], [], color="#444444", linestyle="--", label="1.0")],
                  loc="outside lower center", ncols=5, fontsize=9, frameon=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})


# --- entry points -------------------------------------------------------------------------

def write_report(results_dir=DEFAULT_RESULTS, output=DEFAULT_OUTPUT, plot=DEFAULT_PLOT, notes=None) -> None:
    """Read every ``<benchmark>.json`` (and ``suite.json``) in ``results_dir``; write the page
    ``output`` and the plot ``plot`` (None: no plot).  ``notes`` defaults to
    ``benchmarks-notes.md`` beside the page.  ReportError (nothing written) for a file of
    another schema or an unreadable one."""
    results, suite = load_results(results_dir)
    output = Path(output)
    notes_path = Path(notes) if notes is not None else output.with_name(NOTES_NAME)
    if notes_path.resolve() == output.resolve():
        raise ReportError(f"{output}: the page would overwrite its own notes file")
    notes_text = notes_path.read_text() if notes_path.exists() else None
    link = None
    if plot is not None:
        link = Path(os.path.relpath(Path(plot).resolve(), output.resolve().parent)).as_posix()
        render_plot(results, plot)
    page = render_markdown(results, suite, notes_text, link, str(results_dir))
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(page)
    temporary.replace(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mbvisor bench report",
        description="Write docs/benchmarks.md and its plot from the suite's JSON results "
                    f"({', '.join(BENCHMARKS)}); missing ones are listed as not run.")
    parser.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                        help=f"directory of <benchmark>.json and suite.json (default {DEFAULT_RESULTS})")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PATH", help=f"the page (default {DEFAULT_OUTPUT})")
    parser.add_argument("--plot", default=DEFAULT_PLOT, metavar="PATH", help=f"the PNG (default {DEFAULT_PLOT})")
    args = parser.parse_args(argv)
    try:
        write_report(args.results, args.output, args.plot)
    except ReportError as error:
        print(f"mbvisor bench report: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} and {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
