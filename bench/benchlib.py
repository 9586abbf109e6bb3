"""What every benchmark script here shares: its failure type, target verdicts, and
waiting for a child process's report.  (Scripts run as ``python bench/NAME.py``, so this
directory is on their import path.)"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass


class BenchError(RuntimeError):
    """The benchmark itself failed (wrong answer, a process died): figures are meaningless."""


def judge(value: float, target) -> str | None:
    """PASS/MISS against ``(">=" | "<=", limit)``, or None for a row without a target."""
    if target is None:
        return None
    op, limit = target
    return "PASS" if (value >= limit if op == ">=" else value <= limit) else "MISS"


def expect(conn, what: str, timeout: float):
    """The next message a child sends on ``conn``; BenchError if it is silent, exits, or
    reports ``("error", text)``."""
    if not conn.poll(timeout):
        raise BenchError(f"no message from the {what} within {timeout:g} s")
    try:
        message = conn.recv()
    except EOFError:
        raise BenchError(f"the {what} exited without reporting") from None
    if isinstance(message, tuple) and message and message[0] == "error":
        raise BenchError(f"the {what} failed: {message[1]}")
    return message


def start(description: str, quick_help: str, argv: list[str] | None = None, rounds: tuple[int, int] | None = None):
    """The common start of a benchmark's main(): ``--quick`` and ``--json PATH`` parsed
    (and ``--rounds N`` when ``rounds`` gives its (default, quick) values), SIGTERM turned
    into KeyboardInterrupt (so cleanup runs), and the UTC timestamp.
    Returns (args, mode, when)."""
    import argparse
    import datetime
    import signal

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    if rounds:
        parser.add_argument("--rounds", type=int, metavar="N",
                            help=f"repetitions (default {rounds[0]}, with --quick {rounds[1]})")
    args = parser.parse_args(argv)
    if rounds:
        if args.rounds is None:
            args.rounds = rounds[1] if args.quick else rounds[0]
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")

    def terminated(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return args, "quick" if args.quick else "default", when


def measured(progress, body, failures: tuple = ()) -> tuple[int | None, object]:
    """Run ``body()`` (which removes what it creates on the way out) and return
    (None, its result), or (exit status, None) after saying what happened: 130 on Ctrl-C
    or SIGTERM, 1 on BenchError or one of ``failures``."""
    try:
        return None, body()
    except KeyboardInterrupt:
        progress("interrupted; everything created was removed")
        return 130, None
    except (BenchError, *failures) as error:
        progress(f"failed, everything created was removed: {error}")
        return 1, None


def release_together(ctx, spawn, stop, target, per_child: list[tuple], what: str,
                     ready_timeout: float, finish_timeout: float) -> list:
    """One child per argument tuple (``spawn(target, *args, go, pipe_end)``), each reporting
    when ready and then its result; all are released at once so they really compete.
    Returns the results in order; every child is joined and ``stop``ped, even on failure."""
    go = ctx.Event()
    links, processes = [], []
    for args in per_child:
        parent, child = ctx.Pipe()
        processes.append(spawn(target, *args, go, child))
        child.close()
        links.append(parent)
    try:
        for link in links:
            expect(link, what, ready_timeout)
        go.set()
        return [expect(link, what, timeout=finish_timeout) for link in links]
    finally:
        for link in links:
            link.close()
        for process in processes:
            process.join(5.0)
            stop(process)


def after_silence(channels: int, silence: float, rounds: int):
    """Yield (channel, round) at the times a command is due when each of ``channels`` gets
    one every ``silence`` seconds, the channels staggered evenly over the silence: each
    command comes after ``silence`` s of its own channel's silence (sleeping until then is
    the workload's own timing)."""
    started = time.monotonic()
    for due, channel, number in sorted((started + silence * (number + 1) + channel * silence / channels, channel,
                                        number) for channel in range(channels) for number in range(rounds)):
        time.sleep(max(0.0, due - time.monotonic()))
        yield channel, number


def publish(table: str, document: dict, json_path: str | None, progress) -> None:
    """The stable table on stdout and, with --json, the same figures in a file."""
    import json

    print(table, flush=True)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        progress(f"figures written to {json_path}")


# --- The suite's common form: rounds, rows compared with a baseline, one table, one JSON ---

SCHEMA = "mbvisor-bench/1"


@dataclass(frozen=True)
class Spread:
    """A figure over repeated rounds: the median, with the lowest and highest round."""
    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> "Spread":
        values = tuple(float(v) for v in values)
        if not values:
            raise BenchError("a figure with no measured round")
        return cls(statistics.median(values), min(values), max(values), values)

    def text(self) -> str:
        return f"{_number(self.median)} [{_number(self.low)}-{_number(self.high)}]"

    def as_json(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "values": list(self.values)}


@dataclass(frozen=True)
class Row:
    """One line of a benchmark's table: a subject's figure over the rounds, the baseline
    measured in the same rounds, their ratio (computed round by round, so a slow moment of
    the machine hits both sides), and the project's target with its verdict."""
    metric: str
    unit: str
    subject: str
    value: Spread
    baseline_name: str | None = None
    baseline: Spread | None = None
    ratio: Spread | None = None
    target: tuple[str, float] | None = None
    target_on: str = "ratio"
    verdict: str | None = None

    def as_json(self) -> dict:
        return {"metric": self.metric, "unit": self.unit, "subject": self.subject, "value": self.value.as_json(),
                "baseline_name": self.baseline_name,
                "baseline": self.baseline.as_json() if self.baseline else None,
                "ratio": self.ratio.as_json() if self.ratio else None,
                "target": list(self.target) if self.target else None, "target_on": self.target_on,
                "verdict": self.verdict}


def compare(metric: str, unit: str, subject: str, values, baseline_name: str | None = None,
            baseline_values=None, target: tuple[str, float] | None = None, target_on: str | None = None) -> Row:
    """A Row from per-round values.  With a baseline the ratio is subject/baseline per round
    and the target (if any) applies to the ratio's median, unless ``target_on="value"``."""
    value = Spread.of(values)
    baseline = ratio = None
    if baseline_values is not None:
        baseline = Spread.of(baseline_values)
        if len(baseline.values) != len(value.values):
            raise BenchError(f"{metric}: {len(value.values)} rounds of {subject} but "
                             f"{len(baseline.values)} of {baseline_name}")
        ratio = Spread.of(v / b if b else math.inf if v else 1.0 for v, b in zip(value.values, baseline.values))
    target_on = target_on or ("ratio" if ratio else "value")
    judged = ratio if target_on == "ratio" else value
    verdict = judge(judged.median, target) if judged is not None else None
    return Row(metric, unit, subject, value, baseline_name, baseline, ratio, target, target_on, verdict)


def _number(value: float) -> str:
    """Three significant figures, no exponent for the sizes these tables show."""
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:#.3g}"


def _target_text(row: Row) -> str:
    if not row.target:
        return "-"
    op, limit = row.target
    return f"{op} {_number(limit)}{'x' if row.target_on == 'ratio' else ''}"


def render_table(title: str, rows: list[Row]) -> str:
    """The stable text table: same columns every run, one row per Row (baselines get 22
    characters: "through-vm tcg +flood" is the longest name)."""
    header = (f"{'metric':34} {'unit':8} {'subject':20} {'median [min-max]':24} "
              f"{'baseline':22} {'median [min-max]':24} {'ratio [min-max]':20} {'target':11} result")
    lines = [title, header]
    for row in rows:
        lines.append(f"{row.metric:34} {row.unit:8} {row.subject:20} {row.value.text():24} "
                     f"{row.baseline_name or '-':22} {row.baseline.text() if row.baseline else '-':24} "
                     f"{row.ratio.text() if row.ratio else '-':20} {_target_text(row):11} {row.verdict or '-'}")
    return "\n".join(lines)


def machine() -> dict:
    """What the figures depend on: Python, CPUs, load average at the start."""
    import os
    import platform
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "kernel": platform.release()}


def document(benchmark: str, mode: str, when: str, rounds: int, rows: list[Row], **extra) -> dict:
    """The JSON form of a benchmark run (``SCHEMA``); ``extra`` holds raw per-round detail."""
    return {"schema": SCHEMA, "benchmark": benchmark, "mode": mode, "when": when, "rounds": rounds,
            "machine": machine(), "rows": [row.as_json() for row in rows], **extra}


def title(benchmark: str, mode: str, when: str, rounds: int) -> str:
    info = machine()
    return (f"mbvisor bench {benchmark}  {when}  {mode}  rounds {rounds}  python {info['python']}  "
            f"cpus {info['cpus']}  load {' '.join(map(str, info['loadavg']))}")


def finish(benchmark: str, mode: str, when: str, rounds: int, rows: list[Row], json_path: str | None,
           progress, **extra) -> int:
    """Print the table, write the JSON (when asked), return the exit status (0: figures
    measured, whatever the verdicts: a MISS is a result, not a failure)."""
    publish(render_table(title(benchmark, mode, when, rounds), rows),
            document(benchmark, mode, when, rounds, rows, **extra), json_path, progress)
    return 0
