"""What every benchmark script here shares: its failure type, target verdicts, and
waiting for a child process's report.  (Scripts run as ``python bench/NAME.py``, so this
directory is on their import path.)"""

from __future__ import annotations


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


def start(description: str, quick_help: str, argv: list[str] | None = None):
    """The common start of a benchmark's main(): ``--quick`` and ``--json PATH`` parsed,
    SIGTERM turned into KeyboardInterrupt (so cleanup runs), and the UTC timestamp.
    Returns (args, mode, when)."""
    import argparse
    import datetime
    import signal

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)

    def terminated(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return args, "quick" if args.quick else "default", when


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


def publish(table: str, document: dict, json_path: str | None, progress) -> None:
    """The stable table on stdout and, with --json, the same figures in a file."""
    import json

    print(table, flush=True)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        progress(f"figures written to {json_path}")
