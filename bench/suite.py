"""mbvisor bench all: the report's three experiments and the control plane's limits, one
benchmark after the other (wakeups, latency, throughput, control, scale, datacentre, follow), each writing
``results/bench/<name>.json``; then docs/benchmarks.md and its plot are written from them.

Each benchmark runs as its own process (a failure or Ctrl-C in one cleans up after itself
and does not take the figures of the others with it).  The run's durations go to
``results/bench/suite.json``; the exit status is non-zero if any benchmark failed."""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from mbvisor.bench.report import write_report

BENCHMARKS = ("wakeups", "latency", "throughput", "control", "scale", "datacentre", "follow")
BUDGET_S = 20 * 60


def progress(message: str) -> None:
    print(f"[bench/all] {message}", file=sys.stderr, flush=True)


def run_one(name: str, results: Path, quick: bool) -> dict:
    argv = [sys.executable, "-m", f"mbvisor.bench.{name}", "--json", str(results / f"{name}.json")]
    if quick:
        argv.append("--quick")
    progress(f"{name}: {' '.join(argv[1:])}")
    started = time.monotonic()
    try:
        code = subprocess.run(argv).returncode
    except KeyboardInterrupt:
        code = 130
    seconds = round(time.monotonic() - started, 1)
    status = "ok" if code == 0 else f"failed (exit {code})"
    progress(f"{name}: {status} in {seconds:.0f} s")
    return {"seconds": seconds, "status": status, "exit": code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's --quick (a few minutes in all)")
    parser.add_argument("--results", default="results/bench", help="where the JSON goes (default results/bench)")
    parser.add_argument("--output", default="docs/benchmarks.md", help="the page written (default docs/benchmarks.md)")
    parser.add_argument("--plot", default="docs/benchmarks.png", help="the plot written (default docs/benchmarks.png)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help="run only these (the page still shows the others' last results)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    started, clock = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), time.monotonic()
    runs = {}
    for name in args.only or BENCHMARKS:
        runs[name] = run_one(name, results, args.quick)
        if runs[name]["exit"] == 130:
            progress("interrupted; the remaining benchmarks are not run")
            break
    total = round(time.monotonic() - clock, 1)
    summary = {"started": started, "seconds_total": total, "quick": args.quick, "budget_seconds": BUDGET_S,
               "benchmarks": runs}
    (results / "suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(results, Path(args.output), Path(args.plot))
    progress(f"all done in {total / 60:.1f} min (budget {BUDGET_S // 60} min{', EXCEEDED' if total > BUDGET_S else ''}); "
             f"page {args.output}, plot {args.plot}")
    failed = [name for name, run in runs.items() if run["status"] != "ok"]
    if failed:
        progress(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
