#!/usr/bin/env python3
"""Benchmark of the guest<->host shared-memory channel (``mbvisor.guest`` ring).

The writer (``ChannelWriter``) and the real ``ChannelReader`` run in separate processes
(fork); the reader process runs ``serve()`` with the default ``Backoff`` and a handler
that answers every command ``OK "ok"``.  Every figure is printed next to a baseline
measured in the same run: the same request/response traffic over ``os.pipe()`` pairs
between two processes (an idle process blocked in ``select`` for the idle-CPU row).

With a doorbell (docs/protocol.md §12): the reader sleeps on the host's eventfd of an
``mbvisor ivshmem-server`` (its own process) and the writer rings it after each command,
as a guest's ivshmem-doorbell device makes QEMU do.  Throughput with the doorbell, and
the round trip of a command after ``silence`` seconds: ten readers, each sent a command
every ``silence`` seconds, staggered (baseline: ten pipe servers, the same way).  Last,
the C guest library (guest/c, built here) against the Python writer, one request at a
time each, on the echo responder's answers (baseline of that row: the Python writer).

    python bench/channel.py            # full run, < 60 s on 2 cores
    python bench/channel.py --quick    # about 10 s
    python bench/channel.py --json out.json

The table on stdout always has the same rows and columns; progress goes to stderr.
``ratio`` is ring / baseline in every row.  ``result`` compares the ring figure with
the project target (PASS/MISS); rows without a target show ``-``.  The benchmark never
adapts itself to the targets.  Every /dev/shm file it creates is removed on exit,
including on Ctrl-C.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import os
import platform
import select
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from mbvisor.bench.benchlib import BenchError, after_silence, expect, judge, publish, release_together, start
try:
    from mbvisor.agents.bell import HostBell
    from mbvisor.agents.echo import answer_frame
    from mbvisor.agents.ivshmem_server import IvshmemServer
    from mbvisor.guest import answers, ring
    from mbvisor.guest.channel_errors import ChannelError
    from mbvisor.guest.reader import ChannelReader, serve
    from mbvisor.guest.region import DEFAULT_REGION_SIZE, open_file, open_region
    from mbvisor.guest.writer import ChannelWriter
except ImportError as error:  # pragma: no cover - environment problem, not a benchmark result
    sys.exit(f"bench/channel.py: cannot import mbvisor ({error}); install the project first (make setup)")

CTX = multiprocessing.get_context("fork")
C_SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guest", "c")

# A realistic command (docs/grammar.md): add an IP filter on source, destination, protocol.
PAYLOAD = b"A 52:34:56:00:12:22 I 13 s 10.0.0.0/8 d 10.129.126.115 p tcp"
REPLY_STATUS = ring.Status.OK
REPLY_TEXT = "ok"
WRITERS = 4

PROFILES = {
    # commands: per throughput run (the 4-writer run splits them between the writers)
    "default": dict(commands=50_000, busy_samples=5_000, idle_samples=200, idle_gap=0.020,
                    idle_cpu_seconds=5.0, silence=10.0, silent_rounds=3, one_at_a_time=5_000),
    "quick": dict(commands=10_000, busy_samples=5_000, idle_samples=100, idle_gap=0.020,
                  idle_cpu_seconds=2.0, silence=2.0, silent_rounds=2, one_at_a_time=2_000),
}
SILENT_READERS = 10

# id, label, unit, value format, target (operator, value) or None
ROWS = [
    ("throughput_1_writer", "throughput 1 writer (cmd/s)", "cmd/s", "{:.0f}", (">=", 40_000)),
    ("throughput_doorbell", "throughput 1 writer, doorbell (cmd/s)", "cmd/s", "{:.0f}", (">=", 40_000)),
    ("throughput_4_writers", "throughput 4 writers (cmd/s)", "cmd/s", "{:.0f}", None),
    ("rtt_busy_p50", "round trip busy p50 (us)", "us", "{:.1f}", None),
    ("rtt_busy_p99", "round trip busy p99 (us)", "us", "{:.1f}", ("<=", 2_000)),
    ("rtt_busy_max", "round trip busy max (us)", "us", "{:.1f}", None),
    ("rtt_idle_p50", "round trip idle p50 (us)", "us", "{:.1f}", None),
    ("rtt_idle_p99", "round trip idle p99 (us)", "us", "{:.1f}", None),
    ("rtt_idle_max", "round trip idle max (us)", "us", "{:.1f}", None),
    ("idle_cpu", "idle reader CPU (% of a core)", "%", "{:.2f}", ("<=", 1.0)),
    ("rtt_silence_p50", "after silence, doorbell p50 (us)", "us", "{:.1f}", None),
    ("rtt_silence_p99", "after silence, doorbell p99 (us)", "us", "{:.1f}", ("<=", 2_000)),
    ("c_writer", "C writer, one at a time (cmd/s)", "cmd/s", "{:.0f}", None),
]
# The row whose baseline is the Python writer, not the pipe; judged as C >= Python.
VERSUS_PYTHON = {"c_writer"}

_T0 = time.perf_counter()
_children: list = []   # processes started by this run, stopped in cleanup()
_fds: set[int] = set()  # pipe descriptors opened by this run
_paths: list[str] = []  # /dev/shm files created by this run



def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _spawn(target, *args):
    """Fork a child with Ctrl-C/SIGTERM blocked until it has set its own handlers, and
    registered before the parent can be interrupted, so cleanup() always finds it."""
    sys.stdout.flush()
    sys.stderr.flush()
    process = CTX.Process(target=target, args=args, daemon=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        process.start()
        _children.append(process)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return process


def _stop(process, timeout: float = 5.0) -> None:
    if process.is_alive():
        process.terminate()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(2.0)
    if process in _children:
        _children.remove(process)


def _child_signals(graceful: threading.Event | None = None) -> None:
    """In a child: Ctrl-C is the parent's business (it stops us); SIGTERM ends us, or
    only sets ``graceful`` so the reader can leave ``serve()`` and report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if graceful is None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    else:
        signal.signal(signal.SIGTERM, lambda signum, frame: graceful.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)



def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    _fds.update((r, w))
    return r, w


def _close_fds(*fds: int) -> None:
    for fd in fds:
        if fd in _fds:
            _fds.discard(fd)
            os.close(fd)


def cleanup() -> None:
    for process in list(_children):
        try:
            _stop(process, timeout=2.0)
        except Exception:  # keep cleaning up whatever else is left
            pass
    _close_fds(*list(_fds))
    for path in _paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- helpers

def _handler(incoming) -> tuple[int, str]:
    return REPLY_STATUS, REPLY_TEXT


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _summary(samples_us: list[float]) -> dict[str, float]:
    values = sorted(samples_us)
    return {"p50": _percentile(values, 0.50), "p99": _percentile(values, 0.99), "max": values[-1]}


def _cpu_seconds(pid: int) -> float:
    """CPU time used so far by a single-threaded process: /proc/PID/schedstat (ns, the
    same sum_exec_runtime utime+stime are scaled to), else utime+stime from /proc/PID/stat
    (clock ticks)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    """1-minute load average at the end of the run: other work on the machine skews figures."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _cpu_source() -> str:
    try:
        with open("/proc/self/schedstat") as f:
            int(f.read().split()[0])
        return "/proc/PID/schedstat"
    except (OSError, ValueError, IndexError):
        return "/proc/PID/stat utime+stime"


# --------------------------------------------------------------------------- ring side

def _reader_main(path: str, echo: bool, doorbell: str | None, conn) -> None:
    """The host side: the real ChannelReader in serve(), answering ``OK "ok"`` (or as the
    echo responder does), polling with the default Backoff or asleep on the doorbell of
    the ivshmem server at ``doorbell``.  Reports its figures when SIGTERM ends it."""
    stop = threading.Event()
    _child_signals(graceful=stop)
    region = open_file(path)
    bell = HostBell.connect(doorbell) if doorbell else None
    reader = ChannelReader(region, name="bench")
    conn.send(os.getpid())
    serve(reader, answer_frame if echo else _handler, stop, bell=bell)
    stats = reader.stats
    try:
        conn.send({"commands": stats.commands, "corrupt": stats.corrupt,
                   "resumed_answers": stats.resumed_answers, "epochs": stats.epochs})
    except OSError:
        pass  # the parent is gone or interrupted: nobody wants the figures
    if bell is not None:
        bell.close()
    region.close()


def _ring_pipelined(writer: ChannelWriter, n: int, window: int) -> int:
    """Send n commands keeping up to ``window`` outstanding; returns wrong answers."""
    tickets: collections.deque = collections.deque()
    bad = 0
    for _ in range(n):
        if len(tickets) >= window:
            response = writer.wait(tickets.popleft())
            bad += not (response.ok and response.text == REPLY_TEXT)
        tickets.append(writer.submit(PAYLOAD))
    while tickets:
        response = writer.wait(tickets.popleft())
        bad += not (response.ok and response.text == REPLY_TEXT)
    return bad


def _ring_writer_main(path: str, n: int, window: int, go, conn) -> None:
    _child_signals()
    region = open_file(path)  # its own descriptor: flock must exclude the other writers
    writer = ChannelWriter(region)
    conn.send("ready")
    go.wait()
    start = time.monotonic()
    bad = _ring_pipelined(writer, n, window)
    conn.send((start, time.monotonic(), bad))
    region.close()


def _ring_latency(writer: ChannelWriter, samples: int, gap: float) -> list[float]:
    out = []
    for _ in range(samples):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter_ns()
        response = writer.request(PAYLOAD)
        t1 = time.perf_counter_ns()
        if not (response.ok and response.text == REPLY_TEXT):
            raise BenchError(f"ring answered {response.status_name} {response.text!r}")
        out.append((t1 - t0) / 1000)
    return out


# --------------------------------------------------------------------------- pipe side

_LEN = struct.Struct("<I")


def _frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


EXPECTED_REPLY = bytes([REPLY_STATUS]) + REPLY_TEXT.encode()


class _Frames:
    """Length-prefixed messages read from a pipe."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def feed(self) -> bool:
        data = os.read(self.fd, 65536)
        self.buf += data
        return bool(data)

    def pop(self) -> bytes | None:
        if len(self.buf) < 4:
            return None
        size = _LEN.unpack_from(self.buf)[0]
        if len(self.buf) < 4 + size:
            return None
        message = bytes(self.buf[4:4 + size])
        del self.buf[:4 + size]
        return message

    def read(self) -> bytes:
        while (message := self.pop()) is None:
            if not self.feed():
                raise BenchError("pipe server closed the connection")
        return message


def _pipe_server_main(pairs: list[tuple[int, int]], conn) -> None:
    """The baseline host: answers each request on its pipe pair, one write per answer."""
    _child_signals()
    selector = selectors.DefaultSelector()
    for rfd, wfd in pairs:
        selector.register(rfd, selectors.EVENT_READ, (_Frames(rfd), wfd))
    conn.send("ready")
    while selector.get_map():
        for key, _ in selector.select():
            frames, wfd = key.data
            if not frames.feed():
                selector.unregister(key.fileobj)
                continue
            while (message := frames.pop()) is not None:
                status, text = _handler(message)
                os.write(wfd, _frame(bytes([status]) + text.encode()))


def _pipe_pipelined(wfd: int, frames: _Frames, n: int, window: int) -> int:
    outstanding = bad = 0
    for _ in range(n):
        if outstanding >= window:
            bad += frames.read() != EXPECTED_REPLY
            outstanding -= 1
        os.write(wfd, _frame(PAYLOAD))
        outstanding += 1
    for _ in range(outstanding):
        bad += frames.read() != EXPECTED_REPLY
    return bad


def _pipe_writer_main(wfd: int, rfd: int, n: int, window: int, go, conn) -> None:
    _child_signals()
    frames = _Frames(rfd)
    conn.send("ready")
    go.wait()
    start = time.monotonic()
    bad = _pipe_pipelined(wfd, frames, n, window)
    conn.send((start, time.monotonic(), bad))


def _pipe_latency(wfd: int, frames: _Frames, samples: int, gap: float) -> list[float]:
    out = []
    for _ in range(samples):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter_ns()
        os.write(wfd, _frame(PAYLOAD))
        reply = frames.read()
        t1 = time.perf_counter_ns()
        if reply != EXPECTED_REPLY:
            raise BenchError(f"pipe server answered {reply!r}")
        out.append((t1 - t0) / 1000)
    return out


class PipeServer:
    """A baseline server process with ``clients`` pipe pairs; client ends in ``.clients``."""

    def __init__(self, clients: int):
        self.clients: list[tuple[int, int]] = []  # (write requests, read replies)
        server_pairs = []
        for _ in range(clients):
            req_r, req_w = _pipe()
            rep_r, rep_w = _pipe()
            self.clients.append((req_w, rep_r))
            server_pairs.append((req_r, rep_w))
        parent, child = CTX.Pipe()
        self.process = _spawn(_pipe_server_main, server_pairs, child)
        child.close()
        expect(parent, "pipe server", 30.0)
        parent.close()
        _close_fds(*(fd for pair in server_pairs for fd in pair))

    def __enter__(self) -> "PipeServer":
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.process)
        _close_fds(*(fd for pair in self.clients for fd in pair))


def _idle_select_main(rfd: int, conn) -> None:
    _child_signals()
    conn.send("ready")
    while True:
        select.select([rfd], [], [])
        if not os.read(rfd, 4096):
            return


# --------------------------------------------------------------------------- doorbell side

def _ivshmem_server_main(pairs: list[tuple[str, str]], conn) -> None:
    """``mbvisor ivshmem-server`` for the doorbell readers' regions."""
    stop = threading.Event()
    _child_signals(graceful=stop)
    server = IvshmemServer(pairs, max_clients=4)
    conn.send("ready")
    try:
        server.serve_forever(stop.is_set)
    finally:
        server.close()


def _region(tag: str) -> str:
    path = f"/dev/shm/mbvisor-bench-{os.getpid()}-{tag}-{uuid.uuid4().hex[:8]}"
    _paths.append(path)
    open_file(path, create_size=DEFAULT_REGION_SIZE).close()
    return path


def _started(target, *args) -> tuple:
    """(process, its first message) of a child that reports when it is ready."""
    parent, child = CTX.Pipe()
    process = _spawn(target, *args, child)
    child.close()
    return process, expect(parent, target.__name__, 30.0), parent


def _doorbell_phase(profile: dict, pipe_throughput: float, sockets: str) -> tuple[dict, dict, int]:
    """(ring figures, baseline figures, commands answered) of the doorbell rows."""
    ring_fig, base_fig = {}, {}
    paths = [_region(f"bell{i}") for i in range(1 + SILENT_READERS)]
    pairs = [(path, os.path.join(sockets, f"{i}.sock")) for i, path in enumerate(paths)]
    server, _, _ = _started(_ivshmem_server_main, pairs)
    readers = [_started(_reader_main, path, False, socket_path) for path, socket_path in pairs]
    writers = [ChannelWriter(open_region(shm=path, doorbell=socket_path)) for path, socket_path in pairs]
    try:
        for writer in writers:
            writer.initialise()
        geometry = writers[0].header().geometry
        window, n = geometry.slot_count // 2, profile["commands"]
        progress(f"throughput with the doorbell, 1 writer, {n} commands, window {window} ...")
        bad = _ring_pipelined(writers[0], 2 * geometry.slot_count, window)
        t0 = time.perf_counter()
        bad += _ring_pipelined(writers[0], n, window)
        elapsed = time.perf_counter() - t0
        if bad:
            raise BenchError(f"{bad} wrong answers from the doorbell reader")
        ring_fig["throughput_doorbell"], base_fig["throughput_doorbell"] = n / elapsed, pipe_throughput
        progress(f"  ring {n / elapsed:.0f} cmd/s with the doorbell; pipe {pipe_throughput:.0f} cmd/s")
        sent = 2 * geometry.slot_count + n
        silence, rounds = profile["silence"], profile["silent_rounds"]
        progress(f"after silence: {SILENT_READERS} doorbell readers and {SILENT_READERS} pipe servers, "
                 f"{rounds} commands each, {silence:g} s apart, staggered ...")
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(PipeServer(1)) for _ in range(SILENT_READERS)]
            pipes = [(server.clients[0][0], _Frames(server.clients[0][1])) for server in servers]
            rung, piped = _after_silence(writers[1:], pipes, silence, rounds)
        sent_each = rounds
        for stat in ("p50", "p99"):
            ring_fig[f"rtt_silence_{stat}"] = _summary(rung)[stat]
            base_fig[f"rtt_silence_{stat}"] = _summary(piped)[stat]
        progress(f"  doorbell p50 {ring_fig['rtt_silence_p50']:.1f} p99 {ring_fig['rtt_silence_p99']:.1f} us; "
                 f"pipe p50 {base_fig['rtt_silence_p50']:.1f} p99 {base_fig['rtt_silence_p99']:.1f} us")
    finally:
        for writer in writers:
            writer.region.close()
    answered = []
    for (process, pid, link), expected in zip(readers, [sent] + [sent_each] * SILENT_READERS):
        os.kill(pid, signal.SIGTERM)
        answered.append((expect(link, "doorbell reader", 10.0)["commands"], expected))
        _stop(process)
    _stop(server)
    if any(got != expected for got, expected in answered):
        raise BenchError(f"doorbell readers answered {answered} (got, expected) commands")
    return ring_fig, base_fig, sum(got for got, _ in answered)


def _after_silence(writers: list[ChannelWriter], pipes: list, silence: float, rounds: int):
    """Round trips (us) of commands each sent ``silence`` s after its reader's last one,
    the readers staggered over the silence; a ring and a pipe sample at each step, in
    alternating order, so both see the same machine."""
    rung, piped = [], []
    for step, (index, _) in enumerate(after_silence(len(writers), silence, rounds)):
        wfd, frames = pipes[index]
        for way in (("ring", "pipe") if step % 2 == 0 else ("pipe", "ring")):
            if way == "ring":
                rung += _ring_latency(writers[index], 1, 0.0)
            else:
                piped += _pipe_latency(wfd, frames, 1, 0.0)
    return rung, piped


def _c_versus_python(count: int, build: str) -> tuple[float, float]:
    """(C, Python) requests per second, one at a time each, the echo responder answering
    both; two rounds, alternating, the better of each."""
    made = subprocess.run(["make", "-C", str(C_SOURCES), f"BUILD={build}"], capture_output=True, text=True)
    if made.returncode != 0:
        raise BenchError(f"building the C library failed (gcc, libc6-dev and make needed):\n{made.stderr[-2000:]}")
    path = _region("c")
    process, _, _ = _started(_reader_main, path, True, None)
    writer = ChannelWriter(open_file(path))
    try:
        writer.initialise()
        c_rates, python_rates = [], []
        for number in range(2):
            progress(f"C vs Python writer, round {number + 1}: {count} requests one at a time each ...")
            done = subprocess.run([os.path.join(build, "mbvtest"), "request", path, "0xc1", str(count)],
                                  capture_output=True, text=True, timeout=600)
            words = done.stdout.split()
            if done.returncode != 0 or words[:2] != ["done", str(count)]:
                raise BenchError(f"mbvtest request failed ({done.returncode}): {done.stdout} {done.stderr}")
            c_rates.append(count / float(words[2]))
            t0 = time.perf_counter()
            for index in range(count):
                mac = f"52:34:56:c2:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"
                records = answers.parse(writer.request(f"@R F {mac} 10.0.0.1@".encode()).text)
                if len(records) != 1 or not records[0].ok or mac not in records[0].lines[0]:
                    raise BenchError(f"the echo responder answered {records} to R F {mac}")
            python_rates.append(count / (time.perf_counter() - t0))
            progress(f"  C {c_rates[-1]:.0f} req/s; Python {python_rates[-1]:.0f} req/s")
    finally:
        writer.region.close()
        _stop(process)
    return max(c_rates), max(python_rates)


# --------------------------------------------------------------------------- phases

def _parallel(target, per_writer_args: list[tuple], what: str) -> tuple[float, int]:
    """Run one child per argument tuple, released together; returns (seconds from the
    first start to the last finish, wrong answers)."""
    results = release_together(CTX, _spawn, _stop, target, per_writer_args, what,
                               ready_timeout=30.0, finish_timeout=300.0)
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return end - start, sum(r[2] for r in results)


def run(profile: dict) -> dict:
    path = f"/dev/shm/mbvisor-bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    _paths.append(path)
    region = open_file(path, create_size=DEFAULT_REGION_SIZE)
    try:
        return _run(profile, path, region)
    finally:
        region.close()


def _run(profile: dict, path: str, region) -> dict:
    writer = ChannelWriter(region)
    writer.initialise()
    geometry = writer.header().geometry
    window = geometry.slot_count // 2
    # Each of the writers pipelines too, sharing the ring: a writer blocked in submit()
    # collects its own answers for wait() (writer.py), so they cannot stall one another.
    window_each = max(1, geometry.slot_count // (2 * WRITERS))
    n = profile["commands"]
    warmup = 2 * geometry.slot_count  # past the first wrap: slot reuse is on the measured path
    ring_sent = 0
    ring_fig: dict[str, float] = {}
    base_fig: dict[str, float] = {}

    parent, child = CTX.Pipe()
    reader_process = _spawn(_reader_main, path, False, None, child)
    child.close()
    reader_pid = expect(parent, "ring reader", 30.0)
    progress(f"ring {geometry.slot_count}x{geometry.command_slot_size}/{geometry.response_slot_size} "
             f"in {path}; reader pid {reader_pid}")

    # 1. throughput, one writer
    progress(f"throughput, 1 writer, {n} commands, window {window}: ring ...")
    bad = _ring_pipelined(writer, warmup, window)
    t0 = time.perf_counter()
    bad += _ring_pipelined(writer, n, window)
    elapsed = time.perf_counter() - t0
    ring_sent += warmup + n
    if bad:
        raise BenchError(f"{bad} wrong answers from the ring")
    ring_fig["throughput_1_writer"] = n / elapsed
    progress(f"  ring {n / elapsed:.0f} cmd/s ({elapsed:.2f} s); pipe ...")
    with PipeServer(1) as server:
        wfd, rfd = server.clients[0]
        frames = _Frames(rfd)
        bad = _pipe_pipelined(wfd, frames, warmup, window)
        t0 = time.perf_counter()
        bad += _pipe_pipelined(wfd, frames, n, window)
        elapsed = time.perf_counter() - t0
    if bad:
        raise BenchError(f"{bad} wrong answers from the pipe server")
    base_fig["throughput_1_writer"] = n / elapsed
    progress(f"  pipe {n / elapsed:.0f} cmd/s ({elapsed:.2f} s)")

    # 2. throughput, four writer processes at once
    each = n // WRITERS
    total = each * WRITERS
    progress(f"throughput, {WRITERS} writers, {WRITERS}x{each} commands, window {window_each} each: ring ...")
    elapsed, bad = _parallel(_ring_writer_main, [(path, each, window_each)] * WRITERS, "ring writer")
    ring_sent += total
    if bad:
        raise BenchError(f"{bad} wrong answers from the ring ({WRITERS} writers)")
    ring_fig["throughput_4_writers"] = total / elapsed
    progress(f"  ring {total / elapsed:.0f} cmd/s ({elapsed:.2f} s); pipe ...")
    with PipeServer(WRITERS) as server:
        elapsed, bad = _parallel(_pipe_writer_main,
                                 [(wfd, rfd, each, window_each) for wfd, rfd in server.clients],
                                 "pipe writer")
    if bad:
        raise BenchError(f"{bad} wrong answers from the pipe server ({WRITERS} writers)")
    base_fig["throughput_4_writers"] = total / elapsed
    progress(f"  pipe {total / elapsed:.0f} cmd/s ({elapsed:.2f} s)")

    # 3. round-trip latency: back to back (reader busy), then from idle
    busy, idle, gap = profile["busy_samples"], profile["idle_samples"], profile["idle_gap"]
    progress(f"round trip, busy, {busy} back-to-back requests: ring ...")
    _ring_latency(writer, 200, 0.0)
    ring_busy = _summary(_ring_latency(writer, busy, 0.0))
    progress(f"round trip, idle, {idle} requests {gap * 1000:g} ms apart: ring ...")
    ring_idle = _summary(_ring_latency(writer, idle, gap))
    ring_sent += 200 + busy + idle
    progress("round trip, busy and idle: pipe ...")
    with PipeServer(1) as server:
        wfd, rfd = server.clients[0]
        frames = _Frames(rfd)
        _pipe_latency(wfd, frames, 200, 0.0)
        base_busy = _summary(_pipe_latency(wfd, frames, busy, 0.0))
        base_idle = _summary(_pipe_latency(wfd, frames, idle, gap))
    for kind, ring_s, base_s in (("busy", ring_busy, base_busy), ("idle", ring_idle, base_idle)):
        for stat in ("p50", "p99", "max"):
            ring_fig[f"rtt_{kind}_{stat}"] = ring_s[stat]
            base_fig[f"rtt_{kind}_{stat}"] = base_s[stat]
        progress(f"  {kind}: ring p50 {ring_s['p50']:.1f} p99 {ring_s['p99']:.1f} max {ring_s['max']:.1f} us; "
                 f"pipe p50 {base_s['p50']:.1f} p99 {base_s['p99']:.1f} max {base_s['max']:.1f} us")

    # 4. idle CPU: the reader polling an empty ring vs a process blocked in select
    seconds = profile["idle_cpu_seconds"]
    progress(f"idle CPU over {seconds:g} s: ring reader and select() baseline side by side ...")
    idle_r, idle_w = _pipe()
    link, child = CTX.Pipe()
    idle_process = _spawn(_idle_select_main, idle_r, child)
    child.close()
    expect(link, "idle baseline", 30.0)
    link.close()
    time.sleep(0.5)  # the reader's back-off reaches its ceiling within ~15 ms
    pids = (reader_pid, idle_process.pid)
    cpu0 = [_cpu_seconds(pid) for pid in pids]
    wall0 = time.perf_counter()
    time.sleep(seconds)
    cpu1 = [_cpu_seconds(pid) for pid in pids]
    wall = time.perf_counter() - wall0
    ring_fig["idle_cpu"] = 100 * (cpu1[0] - cpu0[0]) / wall
    base_fig["idle_cpu"] = 100 * (cpu1[1] - cpu0[1]) / wall
    _stop(idle_process)
    _close_fds(idle_r, idle_w)
    progress(f"  ring reader {ring_fig['idle_cpu']:.3f} % of a core; select() {base_fig['idle_cpu']:.3f} %")

    # the reader must have answered every command exactly once, none corrupt
    os.kill(reader_pid, signal.SIGTERM)
    stats = expect(parent, "ring reader", timeout=10.0)
    parent.close()
    _stop(reader_process)
    if stats["commands"] != ring_sent or stats["corrupt"]:
        raise BenchError(f"reader answered {stats['commands']} commands ({stats['corrupt']} corrupt); "
                         f"{ring_sent} were sent")
    progress(f"reader answered {stats['commands']} commands, none corrupt")

    # 5. the doorbell, and the C library
    with tempfile.TemporaryDirectory(prefix="mbvisor-bench-channel-") as work:
        sockets = os.path.join(work, "ivshmem")
        os.mkdir(sockets, 0o700)
        bell_fig, bell_base, bell_answered = _doorbell_phase(profile, base_fig["throughput_1_writer"], sockets)
        ring_fig.update(bell_fig)
        base_fig.update(bell_base)
        ring_fig["c_writer"], base_fig["c_writer"] = _c_versus_python(profile["one_at_a_time"],
                                                                      os.path.join(work, "c"))
    progress(f"doorbell readers answered {bell_answered} commands; done")

    return {
        "geometry": geometry, "load": _load(), "ring": ring_fig, "baseline": base_fig, "reader": stats,
        "params": {**profile, "window": window, "window_per_writer": window_each, "writers": WRITERS,
                   "warmup_commands": warmup, "payload_bytes": len(PAYLOAD),
                   "cpu_source": _cpu_source()},
    }


# --------------------------------------------------------------------------- report


def report(result: dict, mode: str, when: str) -> tuple[str, dict]:
    g = result["geometry"]
    p = result["params"]
    lines = [
        f"mbvisor channel benchmark  {when}  python {platform.python_version()}  "
        f"cpus {len(os.sched_getaffinity(0))}  ring {g.slot_count}x{g.command_slot_size}/"
        f"{g.response_slot_size}  mode {mode}  load {result['load']}",
        f"{'metric':<32}{'ring':>12}{'baseline(pipe)':>16}{'ratio':>8}  {'target':<14}result",
    ]
    rows = []
    for key, label, unit, fmt, target in ROWS:
        ring_v, base_v = result["ring"][key], result["baseline"][key]
        ratio = ring_v / base_v if base_v > 0 else None
        if key in VERSUS_PYTHON:  # the C library must be at least as fast as the Python writer
            target = (">=", base_v)
        verdict = judge(ring_v, target)
        target_text = ">= Python" if key in VERSUS_PYTHON else f"{target[0]} {target[1]:g}" if target else "-"
        ratio_text = f"{ratio:.2f}" if ratio is not None else "n/a"
        lines.append(f"{label:<32}{fmt.format(ring_v):>12}{fmt.format(base_v):>16}{ratio_text:>8}  "
                     f"{target_text:<14}{verdict or '-'}")
        rows.append({"id": key, "metric": label, "unit": unit, "ring": ring_v, "baseline": base_v,
                     "ratio": ratio,
                     "target": {"op": target[0], "value": target[1]} if target else None,
                     "result": verdict})
    lines += [
        f"notes: ratio = ring / baseline.  throughput: {p['commands']} commands, window {p['window']} "
        f"(1 writer);",
        f"       {p['writers']} writer processes x {p['commands'] // p['writers']} commands, "
        f"window {p['window_per_writer']} each.",
        f"       round trip: {p['busy_samples']} back-to-back requests (busy), {p['idle_samples']} requests "
        f"{p['idle_gap'] * 1000:g} ms apart (idle).  baseline: length-prefixed messages over os.pipe() pairs.",
        f"       idle CPU: {p['idle_cpu_seconds']:g} s, default Backoff, from {p['cpu_source']}; "
        f"baseline: a process blocked in select() on a pipe.",
        f"       doorbell: the reader asleep on an ivshmem server's eventfd, the writer ringing it; after "
        f"silence: {SILENT_READERS} readers x {p['silent_rounds']} commands,",
        f"       each {p['silence']:g} s after its reader's last (staggered); baseline: {SILENT_READERS} pipe "
        f"servers blocked in select(), the same way.",
        f"       C writer: guest/c's mbvtest request, {p['one_at_a_time']} requests one at a time on the echo "
        f"responder; its baseline is the Python writer (the same), best of 2 rounds each.",
    ]
    document = {
        "benchmark": "mbvisor channel", "timestamp": when, "mode": mode,
        "python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)), "load": result["load"],
        "ring": {"slot_count": g.slot_count, "command_slot_size": g.command_slot_size,
                 "response_slot_size": g.response_slot_size},
        "baseline": "os.pipe", "ratio": "ring / baseline",
        "params": p, "reader": result["reader"], "rows": rows,
    }
    return "\n".join(lines), document


def main(argv: list[str] | None = None) -> int:
    args, mode, when = start("Benchmark the mbvisor shared-memory channel "
                       "against an os.pipe() baseline measured in the same run.",
                       "smaller run, about 10 s", argv)

    try:
        result = run(PROFILES[mode])
    except KeyboardInterrupt:
        print("bench/channel.py: interrupted; stopping children and removing its /dev/shm file",
              file=sys.stderr)
        return 130
    except (BenchError, ChannelError) as error:
        print(f"bench/channel.py: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    publish(*report(result, mode, when), args.json, progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
