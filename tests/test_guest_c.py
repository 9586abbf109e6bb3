"""The C guest library (guest/c: mbv.h, mbv.c, mbvctl, mbvtest) against the real host reader.

The library was written from docs/protocol.md and docs/grammar.md alone; these tests hold it
to the Python reference on the wire:

* one conformance suite, two implementations: the same tests run the Python ``mbctl`` (with
  ``--raw``: ``-w`` sends the text as given, as ``mbvctl`` does) and the C ``mbvctl``, each as
  a subprocess, against ``ChannelReader``/``serve`` with the echo responder's ``answer_frame``;
* C and Python writer processes at once on one region, some SIGKILLed mid-wait: every
  command answered exactly once and the ring keeps working;
* byte-level checks with ``guest/ring.py`` (command slots, CRC, formatting) and the library's
  own pieces (CRC-32, the answer-list parser, device discovery, threads, the own-answers stash);
* the doorbell: ``mbvctl --doorbell`` and ``mbctl --doorbell`` against the real ivshmem server
  and an echo responder that only a ring wakes, hostile servers, and a device's BAR0.

The library is built once per session into a temporary directory with guest/c/Makefile; a
machine without ``cc``/``make`` fails here (CI installs gcc, libc6-dev and make).  Children
are forked while this process runs no other thread (the doorbell tests' threads end with their
test), synchronisation is by polling the region
with deadlines, and every child is killed and reaped even when a test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from mbvisor.agents.bell import HostBell
from mbvisor.agents.echo import answer_frame
from mbvisor.guest import answers, ivshmem, ring
from mbvisor.guest.reader import ChannelReader, serve
from mbvisor.guest.region import open_file
from mbvisor.guest.writer import ChannelWriter
from test_channel_processes import wait_until
from test_doorbell import running, scripted_server, sockets  # noqa: F401 - sockets is a fixture

FORK = multiprocessing.get_context("fork")
C_SOURCES = Path(__file__).resolve().parents[1] / "guest" / "c"
MAC = "52:34:56:00:12:22"
DEADLINE = 20.0  # bound for any single wait; a passing run is far quicker
SMALL = ring.Geometry(4, 128, 128)
EXIT_OK, EXIT_HOST_ERROR, EXIT_INVALID, EXIT_TIMEOUT, EXIT_CHANNEL, EXIT_RING_FULL = 0, 1, 3, 4, 5, 6


# ---------------------------------------------------------------- build


@pytest.fixture(scope="session")
def c_build(tmp_path_factory) -> Path:
    """libmbv.a, mbvctl and mbvtest, built with the Makefile's strict flags (-Werror).
    ``MBV_C_EXTRA_CFLAGS`` is passed as the Makefile's EXTRA_CFLAGS, e.g. a sanitizer run:
    ``MBV_C_EXTRA_CFLAGS='-fsanitize=address,undefined -fno-omit-frame-pointer -g'``."""
    missing = [tool for tool in ("cc", "make") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the C guest library cannot be built "
                    "(Debian: apt-get install gcc libc6-dev make; topologies/host-setup.sh installs them)")
    build = tmp_path_factory.mktemp("mbv-c-build")
    extra = os.environ.get("MBV_C_EXTRA_CFLAGS", "")
    done = subprocess.run(["make", "-C", str(C_SOURCES), f"BUILD={build}", f"EXTRA_CFLAGS={extra}"],
                          capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"building guest/c failed:\n{done.stdout}\n{done.stderr}"
    for name in ("libmbv.a", "mbvctl", "mbvtest"):
        assert (build / name).is_file(), f"the build made no {name}"
    return build


SANITIZE = "-fsanitize=address,undefined -fno-omit-frame-pointer -g"
# A sanitizer report makes the program exit with these codes (LeakSanitizer too), never 0.
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:exitcode=86", "LSAN_OPTIONS": "exitcode=86",
                 "UBSAN_OPTIONS": "halt_on_error=1:exitcode=87:print_stacktrace=1"}


@pytest.fixture(scope="session")
def c_sanitized(tmp_path_factory) -> Path:
    """The same programs built with AddressSanitizer (LeakSanitizer) and UBSan (EXTRA_CFLAGS);
    run them with SANITIZER_ENV in the environment."""
    build = tmp_path_factory.mktemp("mbv-c-asan")
    done = subprocess.run(["make", "-C", str(C_SOURCES), f"BUILD={build}", f"EXTRA_CFLAGS={SANITIZE}"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"building guest/c with sanitizers failed:\n{done.stdout}\n{done.stderr}"
    return build


# ---------------------------------------------------------------- child processes


def echo_command(writer_id: int, i: int) -> tuple[str, str]:
    """The payload mbvtest sends as request ``i`` of writer ``writer_id``, and the MAC that
    names it (its answer is one OK record naming that MAC, whatever the responder's wording)."""
    mac = f"52:34:56:{writer_id:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"
    return f"@R F {mac} 10.0.0.1@", mac


def answers_command(text: str, mac: str) -> bool:
    records = answers.parse(text)
    return len(records) == 1 and records[0].ok and records[0].code == "ok" and mac in text


def hold_command(writer_id: int) -> str:
    return f"@X 52:34:56:{writer_id:02x}:ff:ff@"


def _reader_main(path: str, log_path: str | None, release, holding) -> None:
    """The real reader with the echo responder until SIGTERM.  Each command is logged as
    ``epoch seq payload`` before it is answered; a hold command (``...:ff:ff``) is answered
    only once ``release`` is set (``holding`` says the reader has reached one)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path else None

    def handle(incoming):
        text = incoming.payload.decode()
        if log_fd is not None:
            os.write(log_fd, f"{incoming.epoch} {incoming.seq} {text}\n".encode())
        if release is not None and text.endswith(":ff:ff@") and not release.is_set():
            holding.set()
            release.wait(DEADLINE)
        return answer_frame(incoming)

    serve(ChannelReader(open_file(path)), handle, stop)


def _python_writer_main(path: str, writer_id: int, count: int, hold_after: int | None = None) -> None:
    """``count`` requests through the Python writer, each checked against its echo; with
    ``hold_after``, then one hold command, waited for until killed."""
    writer = ChannelWriter(open_file(path))
    for i in range(count):
        if i == hold_after:
            writer.request(hold_command(writer_id).encode(), timeout=600)
            sys.exit("the held command was answered; expected to be killed first")
        payload, mac = echo_command(writer_id, i)
        response = writer.request(payload.encode(), timeout=DEADLINE)
        if not response.ok or not answers_command(response.text, mac):
            sys.exit(f"writer {writer_id}: {payload!r} answered with {response!r}")


def _python_stalling_writer_main(path: str, count: int, collect_within: float) -> None:
    """Submit ``count`` commands promising to read them within ``collect_within`` s, then
    never read them (a live writer that stopped: hung, buggy)."""
    writer = ChannelWriter(open_file(path))
    for i in range(count):
        writer.submit(echo_command(0xee, i)[0].encode(), timeout=5, collect_within=collect_within)
    while True:
        signal.pause()  # alive, never reading: until the test's SIGKILL


# ---------------------------------------------------------------- helpers


@pytest.fixture
def popen():
    """Subprocesses (stdout piped); whatever still runs at teardown is SIGKILLed and reaped."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str]) -> subprocess.Popen:
        process = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)


def header_of(writer: ChannelWriter) -> ring.Header:
    return ring.read_header(writer.region.buf)


@dataclass
class Done:
    code: int
    out: str
    err: str
    pid: int
    elapsed: float

    @property
    def json(self) -> dict:
        return json.loads(self.out)


def run(argv: list, timeout: float = DEADLINE, env: dict | None = None) -> Done:
    start = time.monotonic()
    process = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=None if env is None else {**os.environ, **env})
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"{argv} still running after {timeout:g} s")
    return Done(process.returncode, out, err, process.pid, time.monotonic() - start)


@dataclass
class Cli:
    name: str
    prog: str
    base: list

    def __call__(self, path: str, *arguments, timeout: float = DEADLINE) -> Done:
        return run([*self.base, "--shm", path, *arguments], timeout)


def python_cli() -> Cli:
    return Cli("python", "mbctl", [sys.executable, "-m", "mbvisor.guest.mbctl", "--raw"])


def c_cli(build: Path) -> Cli:
    return Cli("c", "mbvctl", [build / "mbvctl"])


@pytest.fixture(params=["python", "c"])
def cli(request, c_build) -> Cli:
    return python_cli() if request.param == "python" else c_cli(c_build)


@pytest.fixture
def served(make_channel, spawn):
    """A formatted region answered by the real reader and the echo responder in a forked
    process; ``served(geometry)`` gives the writer (its region's path: ``.region.path``)."""

    def start(geometry: ring.Geometry | None = None) -> ChannelWriter:
        writer = make_channel(geometry)
        spawn(_reader_main, writer.region.path, None, None, None)
        return writer

    return start


def owners(writer: ChannelWriter, seqs) -> list[ring.SlotOwner]:
    geometry = header_of(writer).geometry
    return [ring.read_command_owner(writer.region.buf, geometry, seq) for seq in seqs]


def answered(writer: ChannelWriter, count: int):
    return lambda: header_of(writer).host_consume >= count


# ---------------------------------------------------------------- one suite, two implementations


def test_single_command(cli, served):
    writer = served()
    path = writer.region.path
    done = cli(path, "--json", "--timeout", "5", "-w", f"@R F {MAC} 10.0.0.5@")
    assert (done.code, done.err) == (EXIT_OK, ""), done.err
    answer = done.json
    epoch = header_of(writer).guest_epoch
    assert (answer["seq"], answer["epoch"], answer["status"], answer["code"]) == (0, epoch, "OK", 0)
    (record,) = answer["answers"]
    assert (record["status"], record["code"]) == ("OK", "ok") and MAC in record["text"]
    assert (answer["text"], answer["truncated"]) == (f"OK ok {record['text']}", False)
    response = ring.decode_response(writer.region.buf, header_of(writer).geometry, 0, epoch)
    assert response.text == answer["text"]  # what the host wrote, to the byte
    # The slot names its writer and the promise of a request: its deadline, 5 s after it began.
    (owner,) = owners(writer, [0])
    assert (owner.seq, owner.epoch, owner.writer_pid, owner.state) == (0, epoch, done.pid, ring.SlotState.COLLECTED)
    promised_in = (owner.collect_by - ring.clock_ms()) % (1 << 32)
    assert 5000 - done.elapsed * 1000 - 50 <= promised_in <= 5000 + 5, promised_in

    human = cli(path, "-w", f"@X {MAC}@@M {MAC}@")
    assert (human.code, human.err) == (EXIT_OK, "")
    last = ring.decode_response(writer.region.buf, header_of(writer).geometry, 1, epoch)
    assert human.out.splitlines() == [r.message for r in answers.parse(last.text)]  # one line per command
    assert len(human.out.splitlines()) == 2 and MAC in human.out.splitlines()[0]


def test_frame_with_a_syntax_error_answers_every_command(cli, served):
    path = served().region.path
    frame = f"@R F {MAC} 10.0.0.5@@A {MAC} I 4 d 10.0.0.1@@T {MAC}@"
    done = cli(path, "--json", "-w", frame)
    assert done.code == EXIT_HOST_ERROR, done.err
    records = done.json["answers"]
    assert [(r["status"], r["code"]) for r in records] == [
        ("SYNTAX", "not-applied"), ("SYNTAX", "syntax"), ("SYNTAX", "not-applied")]
    assert records[1]["text"].startswith("column ") and "mask 4 means" in records[1]["text"]
    assert done.json["status"] == "SYNTAX"

    human = cli(path, "-w", frame)
    assert (human.code, human.out) == (EXIT_HOST_ERROR, "")
    lines = human.err.splitlines()
    assert len(lines) == 3
    for line, head in zip(lines, ("SYNTAX not-applied: ", "SYNTAX syntax: column ", "SYNTAX not-applied: ")):
        assert line.startswith(f"{cli.prog}: {head}"), line


def test_no_reader_is_a_timeout_and_the_command_stays_pending(cli, make_channel, spawn):
    writer = make_channel()
    path = writer.region.path
    done = cli(path, "--json", "--timeout", "0.2", "-w", f"@X {MAC}@")
    assert done.code == EXIT_TIMEOUT, done.err
    assert done.json["exit_code"] == EXIT_TIMEOUT and "stays pending" in done.json["error"]
    assert "stays pending" in done.err and done.elapsed >= 0.2
    header = header_of(writer)
    assert (header.publish, header.host_consume) == (1, 0)
    slot = ring.decode_command(writer.region.buf, header.geometry, 0, header.guest_epoch)
    assert isinstance(slot, ring.CommandSlot), slot
    assert (slot.payload, slot.writer_pid) == (f"@X {MAC}@".encode(), done.pid)

    spawn(_reader_main, path, None, None, None)  # a host that comes late still answers it
    wait_until(answered(writer, 1), "the late reader to answer the pending command")
    response = ring.decode_response(writer.region.buf, header.geometry, 0, header.guest_epoch)
    assert response.status == ring.Status.OK and answers_command(response.text, MAC)


def test_full_ring_fails_at_the_timeout_naming_the_cause(cli, make_channel, spawn):
    writer = make_channel(SMALL)
    path = writer.region.path
    for i in range(SMALL.slot_count):
        writer.submit(echo_command(0x77, i)[0].encode())
    done = cli(path, "--timeout", "0.2", "-w", f"@X {MAC}@")
    assert done.code == EXIT_RING_FULL, done.err
    assert "ring full" in done.err and "waiting for the host" in done.err and "nothing was sent" in done.err

    spawn(_reader_main, path, None, None, None)  # answered now, but this (live) process has not read them
    wait_until(answered(writer, SMALL.slot_count), "the reader to answer the four commands")
    done = cli(path, "--timeout", "0.2", "-w", f"@X {MAC}@")
    assert done.code == EXIT_RING_FULL, done.err
    assert f"process {os.getpid()}, alive, promised within" in done.err
    assert header_of(writer).publish == SMALL.slot_count  # nothing was sent


def test_lock_held_by_another_descriptor_gives_up_at_the_timeout(cli, make_channel):
    writer = make_channel(SMALL)
    holder = open_file(writer.region.path)
    fcntl.flock(holder.fd, fcntl.LOCK_EX)
    try:
        done = cli(writer.region.path, "--timeout", "0.3", "-w", f"@X {MAC}@")
    finally:
        fcntl.flock(holder.fd, fcntl.LOCK_UN)
        holder.close()
    assert done.code == EXIT_RING_FULL, done.err
    assert "lock" in done.err and "nothing was sent" in done.err
    assert 0.3 <= done.elapsed < 0.3 + 5.0  # tried until its deadline, gave up then
    assert header_of(writer).publish == 0


def test_live_writer_that_never_reads_costs_others_only_until_its_promise(cli, served, spawn, popen, c_build):
    promise_ms = 3000
    writer = served(SMALL)
    path = writer.region.path
    if cli.name == "python":
        stalled = spawn(_python_stalling_writer_main, path, SMALL.slot_count, promise_ms / 1000)
        alive = stalled.is_alive
    else:
        stalled = popen([c_build / "mbvtest", "stall", path, SMALL.slot_count, promise_ms])
        alive = lambda: stalled.poll() is None
    wait_until(answered(writer, SMALL.slot_count), "the stalled writer's commands to be answered")
    slots = owners(writer, range(SMALL.slot_count))
    assert {(o.writer_pid, o.state) for o in slots} == {(stalled.pid, ring.SlotState.PUBLISHED)}
    promise = slots[0].collect_by

    early = cli(path, "--timeout", "0.3", "-w", f"@X {MAC}@")
    assert ring.clock_ms_before(ring.clock_ms(), promise), "the promise passed too early for this test"
    assert early.code == EXIT_RING_FULL, early.err
    assert f"process {stalled.pid}, alive, promised within" in early.err

    later = cli(path, "--json", "--timeout", "15", "-w", f"@X {MAC}@")
    assert later.code == EXIT_OK, later.err
    assert later.json["seq"] == SMALL.slot_count and later.elapsed < 15
    assert not ring.clock_ms_before(ring.clock_ms(), promise)  # it got the slot only once the promise passed
    assert alive(), "the stalled writer should still be alive (only its promise expired)"
    (reused,) = owners(writer, [0])
    assert (reused.seq, reused.writer_pid) == (SMALL.slot_count, later.pid)  # the stalled answer is gone
    assert ring.decode_response(writer.region.buf, SMALL, 0, header_of(writer).guest_epoch) is None


def test_dead_writers_slots_are_reclaimed_at_once(cli, served, spawn, popen, c_build):
    """A writer of the same implementation publishes a full ring promising to read within 10
    minutes, and is SIGKILLed (and reaped); once the host has answered, the next lap of
    commands takes its slots at once (kill(pid, 0) fails with ESRCH), not after the promise."""
    writer = served(SMALL)
    path = writer.region.path
    if cli.name == "python":
        dead = spawn(_python_stalling_writer_main, path, SMALL.slot_count, 600.0)
    else:
        dead = popen([c_build / "mbvtest", "stall", path, SMALL.slot_count, 600000])
    wait_until(answered(writer, SMALL.slot_count), "the doomed writer's commands to be answered")
    dead.kill()
    if cli.name == "python":
        dead.join(DEADLINE)
        assert dead.exitcode == -signal.SIGKILL
    else:
        assert dead.wait(DEADLINE) == -signal.SIGKILL
    slots = owners(writer, range(SMALL.slot_count))
    assert {(o.writer_pid, o.state) for o in slots} == {(dead.pid, ring.SlotState.PUBLISHED)}
    assert all(ring.clock_ms_before(ring.clock_ms(), o.collect_by) for o in slots)  # promises still hold
    for i in range(SMALL.slot_count):
        done = cli(path, "--json", "--timeout", "3", "-w", echo_command(0x33, i)[0])
        assert (done.code, done.json["seq"]) == (EXIT_OK, SMALL.slot_count + i), done.err


def test_command_longer_than_a_slot_is_refused_before_sending(cli, served):
    writer = served(SMALL)
    done = cli(writer.region.path, "-w", "@" + "X" * (SMALL.max_command_length - 1) + "@")
    assert done.code == EXIT_INVALID and f"{SMALL.max_command_length}-byte slots" in done.err, done.err
    assert header_of(writer).publish == 0


def test_missing_too_small_and_foreign_regions(cli, tmp_path):
    done = cli(str(tmp_path / "nothing"), "-w", f"@X {MAC}@")
    assert done.code == EXIT_CHANNEL and "does not exist" in done.err
    small = tmp_path / "small"
    small.write_bytes(bytes(33023))  # one byte short of the smallest ring
    assert cli(str(small), "-w", f"@X {MAC}@").code == EXIT_CHANNEL
    assert small.read_bytes() == bytes(33023)  # left alone
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"ELF!" + bytes((1 << 20) - 4))
    done = cli(str(foreign), "-w", f"@X {MAC}@")
    assert done.code == EXIT_CHANNEL and "magic" in done.err
    assert foreign.read_bytes()[:8] == b"ELF!" + bytes(4)


def test_usage_errors(cli, make_channel):
    writer = make_channel()
    assert cli(writer.region.path).code == 2  # nothing to do
    assert cli(writer.region.path, "--no-such-option").code == 2
    assert header_of(writer).publish == 0


def test_an_option_is_never_taken_as_another_options_value(cli, make_channel, tmp_path):
    """mbvctl's --json scan read "-w --json" as both the text and the flag: it sent "--json"
    to the host; "--shm --json" opened a file of that name.  Both are usage errors, as in mbctl."""
    writer = make_channel()
    path = writer.region.path
    for arguments in (["-w", "--json"], ["--json", "-w", "-r"], ["--timeout", "--json", "-w", "x"]):
        done = cli(path, "--timeout", "0.2", *arguments)
        assert done.code == 2, (arguments, done.out, done.err)
    assert header_of(writer).publish == 0  # nothing was sent
    done = run([*cli.base, "--shm", "--json", "-r"], timeout=DEADLINE)
    assert done.code == 2 and "--json" not in done.out + done.err.replace("[--json]", ""), done.err


def test_both_implementations_print_the_same(c_build, served):
    """Same region, same frames: the same lines and the same JSON (but seq and timing)."""
    path = served().region.path
    python, c = python_cli(), c_cli(c_build)
    frames = [f"@R F {MAC} 10.0.0.5@", f"@I {MAC}@@X {MAC}@", f"@R F {MAC} 10.0.0.5@@A {MAC} I 4 d 10.0.0.1@",
              f"@X {MAC}@" * 107, f"@Q {MAC}@"]
    for frame in frames:
        for mode in ([], ["--json"]):
            a, b = python(path, *mode, "-w", frame), c(path, *mode, "-w", frame)
            assert a.code == b.code, (frame, a.err, b.err)
            if mode:
                one, other = a.json, b.json
                for answer in (one, other):
                    answer.pop("round_trip_ms")
                    answer.pop("seq")
                assert one == other, frame
            else:
                assert a.out == b.out, frame
                assert a.err.replace("mbctl: ", "mbvctl: ") == b.err, frame
    refused = c(path, "--json", "-w", f"@X {MAC}@" * 107).json
    assert [(r["status"], r["code"]) for r in refused["answers"]] == [("REFUSED", "too-many-commands")]
    for mode in ([], ["--json"]):
        a, b = python(path, *mode, "-r"), c(path, *mode, "-r")
        assert (a.code, a.out) == (b.code, b.out)


# ---------------------------------------------------------------- C only: --no-wait, byte level


def test_no_wait_publishes_for_nobody_and_the_slot_is_free_once_answered(c_build, served, make_channel):
    writer = served(SMALL)
    path = writer.region.path
    mbvctl = c_cli(c_build)
    for i in range(3 * SMALL.slot_count):  # wraps the ring: each slot is free once answered
        done = mbvctl(path, "--json", "--no-wait", "-w", echo_command(0x55, i)[0])
        assert done.code == EXIT_OK, done.err
        assert done.json == {"seq": i, "epoch": header_of(writer).guest_epoch, "published": True}
    wait_until(answered(writer, 3 * SMALL.slot_count), "every --no-wait command to be answered")
    slots = owners(writer, range(2 * SMALL.slot_count, 3 * SMALL.slot_count))
    assert {(o.writer_pid, o.state, o.collect_by) for o in slots} == {(0, ring.SlotState.PUBLISHED, 0)}
    # What the Python writer writes for nobody: the same.
    writer.submit(b"@X 52:34:56:00:12:22@", collect=False)
    (python_slot,) = owners(writer, [3 * SMALL.slot_count])
    assert (python_slot.writer_pid, python_slot.state, python_slot.collect_by) == (0, ring.SlotState.PUBLISHED, 0)


def test_c_written_command_slots_decode_with_the_reference(c_build, make_channel):
    writer = make_channel()
    header = header_of(writer)
    payloads = [f"@X {MAC}@", "@" + "A" * 100 + "@", "x" * header.geometry.max_command_length]
    for payload in payloads:
        assert run([c_build / "mbvctl", "--shm", writer.region.path, "--no-wait", "-w", payload]).code == EXIT_OK
    buf = writer.region.buf
    for seq, payload in enumerate(p.encode() for p in payloads):
        slot = ring.decode_command(buf, header.geometry, seq, header.guest_epoch)
        assert isinstance(slot, ring.CommandSlot), slot
        assert (slot.payload, slot.writer_pid, slot.state) == (payload, 0, ring.SlotState.PUBLISHED)
        offset = header.geometry.command_offset(seq)
        raw = bytes(buf[offset:offset + 32])
        fixed = struct.pack("<QII", seq, header.guest_epoch, len(payload))
        assert raw[:16] == fixed
        assert struct.unpack_from("<IIII", raw, 16) == (zlib.crc32(payload, zlib.crc32(fixed)), 0, 1, 0)
    assert header_of(writer).publish == len(payloads)


@pytest.mark.parametrize("size", [33024, 40000, 1 << 20, (1 << 20) + 100, 8388864 + 8192])
def test_c_formats_a_blank_region_as_the_reference_reads_it(c_build, region_path, size):
    Path(region_path).write_bytes(bytes(size))
    done = run([c_build / "mbvctl", "--shm", region_path, "--no-wait", "-w", f"@X {MAC}@"])
    assert done.code == EXIT_OK, done.err
    region = open_file(region_path)
    try:
        header = ring.read_header(region.buf)
        assert header.problem(size) is None
        assert header.geometry == ring.geometry_for(size)
        assert (header.publish, header.consume, header.host_epoch) == (1, 0, 0) and header.guest_epoch != 0
        data = bytes(region.buf[:header.geometry.region_size])
        assert data[44:256] == bytes(212)  # reserved
        assert data[256 + 32 + len(f"@X {MAC}@"):] == bytes(len(data) - 256 - 32 - len(f"@X {MAC}@"))
    finally:
        region.close()


def test_c_explicit_format_matches_the_documented_bytes(c_build, region_path):
    Path(region_path).write_bytes(bytes(1 << 20))
    mbvtest = c_build / "mbvtest"
    first = run([mbvtest, "format", region_path, 0, 0, 0])
    assert first.code == 0, first.out
    data = Path(region_path).read_bytes()
    # protocol.md section 4: a formatted 1 MiB region, but for the (random) epoch at 20..23.
    documented = bytes.fromhex("4d 42 56 52 01 00 00 01 40 00 00 00 00 10 00 00 00 10 00 00 78 56 34 12") + bytes(24)
    assert data[:20] + data[24:48] == documented[:20] + documented[24:48]
    assert int(first.out.split()[1]) == struct.unpack_from("<I", data, 20)[0] != 0
    second = run([mbvtest, "format", region_path, 16, 256, 512])
    assert second.code == 0, second.out
    header = ring.read_header(Path(region_path).read_bytes())
    assert header.geometry == ring.Geometry(16, 256, 512) and header.problem(1 << 20) is None
    assert header.guest_epoch == int(second.out.split()[1]) != int(first.out.split()[1])
    too_big = run([mbvtest, "format", region_path, 1024, 4096, 4096])
    assert too_big.code == 4 and too_big.out.startswith("error bad region:"), too_big.out


def test_crc32_is_zlibs(c_build):
    samples = [b"123456789", b"", b"\x00" * 3,
               bytes.fromhex("0000000000000000785634121300000058") + b" 52:34:56:00:12:22",
               bytes(range(256)) * 7]
    for data in samples:
        done = subprocess.run([str(c_build / "mbvtest"), "crc"], input=data, capture_output=True, timeout=10, check=False)
        assert int(done.stdout, 16) == zlib.crc32(data), data[:20]
    check = subprocess.run([str(c_build / "mbvtest"), "crc"], input=b"123456789", capture_output=True,
                           timeout=10, check=False)
    assert int(check.stdout, 16) == 0xCBF43926
    fixed = struct.pack("<QII", 0, 0x12345678, 19)  # protocol.md section 7's worked example
    done = subprocess.run([str(c_build / "mbvtest"), "crc"], input=fixed + b"X 52:34:56:00:12:22",
                          capture_output=True, timeout=10, check=False)
    assert int(done.stdout, 16) == 0x2961E1FD


@pytest.mark.parametrize("text", [
    ("OK ok R F 52:34:56:00:12:22 10.0.0.5\nREJECTED limit 52:34:56:00:12:22 has 1000 filters, the limit is 1000\n"
     "OK ok 2 filter(s)\n  A 52:34:56:00:12:22 I 4 s 10.0.0.0/8\n  A 52:34:56:00:12:22 I 1 p 6"),
    "OK ok", "OK ok\n", "", "ok ok", "OK", "OK -", "OK Bad x", "SYNTAX syntax\n  first\n  second",
    "  indented first", "OK ok two  spaces  kept ", "STATUS_9 odd-code m", "OK ok caf\u00e9", "INTERNAL 9x",
    "OK ok\n\n  x", "OK -bad",
])
def test_answer_list_parser_agrees_with_the_reference(c_build, text):
    done = subprocess.run([str(c_build / "mbvtest"), "answers"], input=text.encode(), capture_output=True,
                          timeout=10, check=False)
    lines = done.stdout.decode().splitlines()
    try:
        expected = answers.parse(text)
    except answers.AnswerFormatError:
        assert lines == ["not an answer list"]
        return
    records = []
    for line in lines[:-1]:
        kind, *fields = line.split("\t")
        if kind == "R":
            status, code, message = fields
            records.append([status, code, (message,) if message else ()])
        else:
            records[-1][2] += (fields[0],)
    assert lines[-1] == f"count {len(expected)}"
    assert [tuple(r) for r in records] == [(a.status, a.code, a.lines) for a in expected]


def fake_pci_device(root: Path, bdf: str, vendor: str, product: str, size: int = 0, enable: str = "0\n",
                    registers: bytes | None = None) -> Path:
    """A PCI function as sysfs shows it below ``root``: BAR2 (resource2) of ``size`` zero
    bytes if ``size``, BAR0 (resource0) holding ``registers`` if given."""
    folder = root / bdf
    folder.mkdir()
    (folder / "vendor").write_text(vendor + "\n")
    (folder / "device").write_text(product + "\n")
    (folder / "enable").write_text(enable)
    if size:
        (folder / "resource2").write_bytes(bytes(size))
    if registers is not None:
        (folder / "resource0").write_bytes(registers)
    return folder


def test_device_discovery(c_build, tmp_path):
    mbvtest = c_build / "mbvtest"
    device = functools.partial(fake_pci_device, tmp_path)
    assert run([mbvtest, "device", tmp_path]).out.startswith("error device not found: no ivshmem device")
    device("0000:00:03.0", "0x8086", "0x100e")
    ivshmem = device("0000:00:04.0", "0x1af4", "0x1110", 1 << 20)
    done = run([mbvtest, "device", tmp_path])
    assert (done.code, done.out.split()) == (0, ["ok", str(1 << 20), str(ivshmem / "resource2")])
    assert (ivshmem / "enable").read_text().strip() == "1"  # memory decoding turned on
    device("0000:00:05.0", "0x1af4", "0x1110", 1 << 20, enable="1\n")
    several = run([mbvtest, "device", tmp_path])
    assert several.code == 4 and several.out.startswith("error channel error: several ivshmem devices")
    assert run([mbvtest, "device", tmp_path, "00:05.0"]).out.split()[0] == "ok"  # a short BDF
    assert run([mbvtest, "device", tmp_path, "0000:00:03.0"]).out.startswith("error device not found")
    small = device("0000:00:06.0", "0x1af4", "0x1110", 4096)
    assert run([mbvtest, "device", tmp_path, "00:06.0"]).out.startswith("error region too small")
    assert small.is_dir()


def test_threads_sharing_one_handle_on_a_small_ring(c_build, served):
    """Eight threads, one descriptor, four slots: the mutex orders them and a submit that
    meets another thread's answer keeps it for that thread (the own-answers rule)."""
    writer = served(SMALL)
    done = run([c_build / "mbvtest", "threads", writer.region.path, 8, 300], timeout=60)
    assert (done.code, done.out.strip()) == (0, "ok 2400"), done.err
    assert header_of(writer).host_consume == 2400


def test_own_answers_are_kept_up_to_the_documented_bound(c_build, served):
    """One thread pipelines without waiting: its own answered slots are read and kept
    (MBV_STASH_ENTRIES = 64) so it can go on; past 64 + slot_count the ring is full, naming
    this process; every kept answer is then handed to its ticket."""
    writer = served(SMALL)
    done = run([c_build / "mbvtest", "pipeline", writer.region.path, 100, 300])
    lines = done.out.splitlines()
    assert done.code == 0, done.out + done.err
    assert lines[0] == f"submitted {64 + SMALL.slot_count}"
    assert lines[1].startswith("error ring full:") and "of this process" in lines[1]
    assert lines[2] == f"answered {64 + SMALL.slot_count}"


def test_a_timed_out_wait_marks_the_command_abandoned(c_build, make_channel):
    writer = make_channel(SMALL)
    done = run([c_build / "mbvtest", "abandon", writer.region.path, 10000, 100])
    assert (done.code, done.out.strip()) == (0, "timeout 0"), done.out
    (owner,) = owners(writer, [0])
    assert (owner.writer_pid, owner.state) == (done.pid, ring.SlotState.ABANDONED)


def test_the_protocol_pages_example_compiles(c_build, tmp_path):
    """docs/protocol.md section 15's usage example builds against mbv.h with the strict flags."""
    page = (C_SOURCES.parents[1] / "docs" / "protocol.md").read_text()
    section = page[page.index("## 15."):]
    example = section[section.index("```c\n") + 5:]
    example = example[:example.index("```")]
    (tmp_path / "example.c").write_text(example)
    done = subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-D_GNU_SOURCE",
                           f"-I{C_SOURCES}", "-c", str(tmp_path / "example.c"), "-o", str(tmp_path / "example.o")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "mbv_request(" in example


# ---------------------------------------------------------------- C and Python writers at once


def test_c_and_python_writers_at_once_with_some_killed_mid_wait(c_build, make_channel, spawn, popen, tmp_path):
    geometry = ring.Geometry(16, 128, 128)
    writer = make_channel(geometry)
    path = writer.region.path
    buf = writer.region.buf
    log_path = tmp_path / "reader.log"
    release, holding = FORK.Event(), FORK.Event()
    mbvtest = c_build / "mbvtest"
    c_ids, python_ids, c_victim_ids, python_victim_ids = (1, 2, 3), (0x81, 0x82, 0x83), (0x11, 0x12), (0x91, 0x92)
    c_count, python_count, before_hold = 800, 300, 60

    reader = spawn(_reader_main, path, str(log_path), release, holding)
    python_writers = [spawn(_python_writer_main, path, i, python_count) for i in python_ids]
    python_victims = [spawn(_python_writer_main, path, i, 10**6, before_hold) for i in python_victim_ids]
    c_writers = [popen([mbvtest, "request", path, i, c_count]) for i in c_ids]
    c_victims = [popen([mbvtest, "request", path, i, 10**6, before_hold]) for i in c_victim_ids]

    # The reader stops at the first hold command; every victim is then waiting for an answer.
    wait_until(lambda: holding.is_set(), "a victim to send its hold command")
    victim_pids = {v.pid for v in python_victims + c_victims}

    def waiting_writers() -> set[int]:
        header = ring.read_header(buf)
        pending = owners(writer, range(header.host_consume, header.publish))
        return {o.writer_pid for o in pending if o.epoch == header.guest_epoch and o.state == ring.SlotState.PUBLISHED}

    wait_until(lambda: victim_pids <= waiting_writers(), "every victim to wait for an answer")
    for victim in c_victims:
        victim.kill()
        assert victim.wait(timeout=DEADLINE) == -signal.SIGKILL  # still waiting when killed
    for victim in python_victims:
        victim.kill()
        victim.join(DEADLINE)
        assert victim.exitcode == -signal.SIGKILL
    release.set()

    for process in c_writers:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, f"C writer: {out} {err}"
        assert out.startswith(f"done {c_count} ")
    for process in python_writers:
        process.join(60)
        assert process.exitcode == 0, "a Python writer saw a wrong, missing or failed answer (stderr above)"
    wait_until(lambda: header_of(writer).host_consume == header_of(writer).publish, "every command to be answered")

    # The ring still works, over every slot the dead victims left (3 laps).
    again = run([mbvtest, "request", path, 0x21, 3 * geometry.slot_count])
    assert again.code == 0, again.out + again.err
    total = header_of(writer).publish
    wait_until(answered(writer, total), "the last commands to be answered")
    reader.terminate()
    reader.join(DEADLINE)
    assert reader.exitcode == 0

    log = [line.split(" ", 2) for line in log_path.read_text().splitlines()]
    assert [int(seq) for _, seq, _ in log] == list(range(total))  # each command handled once, in order
    payloads = [payload for _, _, payload in log]
    duplicates = {p for p, n in Counter(payloads).items() if n > 1}
    assert duplicates == set(), f"handled twice: {sorted(duplicates)[:5]}"
    by_writer: dict[int, list[str]] = {}
    for payload in payloads:
        by_writer.setdefault(int(payload.split(":")[3], 16), []).append(payload)
    for i, count in [(i, c_count) for i in c_ids] + [(i, python_count) for i in python_ids] + [(0x21, 48)]:
        assert by_writer[i] == [echo_command(i, n)[0] for n in range(count)], f"writer {i:#x} lost or reordered"
    holds = 0
    for i in c_victim_ids + python_victim_ids:
        mine = by_writer[i]
        held = mine[-1] == hold_command(i)
        holds += held
        plain = mine[:-1] if held else mine
        assert plain == [echo_command(i, n)[0] for n in range(len(plain))], f"victim {i:#x}"
        assert len(plain) == before_hold or not held
    assert holds >= 1
    assert set(by_writer) == {*c_ids, *python_ids, *c_victim_ids, *python_victim_ids, 0x21}
    assert total > 3000
    kinds = ["c" if int(p.split(":")[3], 16) < 0x80 else "python" for p in payloads]
    # C and Python really interleaved: one after the other switches a few times; seen 95 to hundreds
    assert sum(a != b for a, b in itertools.pairwise(kinds)) >= 20


# ---------------------------------------------------------------- sanitizers and a hostile host


def test_error_paths_free_what_they_allocated(c_sanitized, tmp_path):
    """mbvtest leaked its response buffer whenever the library failed (LeakSanitizer)."""
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"ELF!" + bytes((1 << 20) - 4))
    mbvtest = c_sanitized / "mbvtest"
    for argv in ([mbvtest, "request", foreign, 1, 1], [mbvtest, "abandon", foreign, 100, 10],
                 [mbvtest, "pipeline", foreign, 3, 10]):
        done = run(argv, env=SANITIZER_ENV)
        assert "Sanitizer" not in done.err, done.err
        assert done.code in (0, 4) and "error bad region" in done.out, (argv, done.code, done.out)


def _raw_response(buf, geometry: ring.Geometry, seq: int, epoch: int, status: int, flags: int, text: bytes,
                  length: int | None = None, crc: int | None = None, seq_field: int | None = None) -> None:
    """A response slot as a hostile host may write it: any bytes, any length, any CRC."""
    offset = geometry.response_offset(seq)
    length = len(text) if length is None else length
    seq_field = seq if seq_field is None else seq_field
    buf[offset + 32:offset + 32 + len(text)] = text
    fixed = struct.pack("<QIIHH", seq_field, epoch, length, status, flags)
    crc = zlib.crc32(text, zlib.crc32(fixed)) if crc is None else crc
    struct.pack_into("<QIIIHH", buf, offset, seq_field, epoch, length, crc, status, flags)


FULL_LINE = b"OK ok " + b"x" * (SMALL.max_response_length - 6)  # fills the slot, no newline at its end
HOSTILE = {
    "non-utf8": (dict(text=b"OK ok \xff\xfe\xc3(\xe2\x82 \xf0\x9f\x98\nREJECTED x \xed\xa0\x80"), EXIT_OK),
    "not-an-answer-list": (dict(text=b"hello\n  world\x00\x01"), EXIT_OK),
    "full-slot-no-newline": (dict(text=FULL_LINE), EXIT_OK),
    "unknown-status-flags": (dict(text=b"OK ok", status=65535, flags=65535), EXIT_HOST_ERROR),
    "length-beyond-slot": (dict(text=b"OK ok", length=SMALL.max_response_length + 1), EXIT_TIMEOUT),
    "length-huge": (dict(text=b"OK ok", length=0xFFFFFFFF), EXIT_TIMEOUT),
    "bad-crc": (dict(text=b"OK ok", crc=0xDEADBEEF), EXIT_TIMEOUT),
    "huge-seq": (dict(text=b"OK ok", seq_field=2**64 - 1), EXIT_TIMEOUT),
    "geometry-invalid": ("geometry", EXIT_CHANNEL),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_host_under_sanitizers(c_sanitized, make_channel, case):
    """The host writes what it likes into the response slot (or the header) while mbvctl
    waits; mbvctl, built with ASan and UBSan, answers as mbctl does and within its deadline."""
    change, code = HOSTILE[case]
    outputs = []
    for argv in ([c_sanitized / "mbvctl"], python_cli().base):
        writer = make_channel(SMALL)
        buf, epoch = writer.region.buf, header_of(writer).guest_epoch
        process = subprocess.Popen([str(a) for a in argv] + ["--shm", writer.region.path, "--json", "--timeout", "0.5",
                                                             "-w", f"@X {MAC}@"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, **SANITIZER_ENV})
        try:
            wait_until(lambda: header_of(writer).publish == 1, "the command to be published")
            if change == "geometry":
                struct.pack_into("<I", buf, 8, 3)  # slot_count 3: the header is no longer valid
            else:
                _raw_response(buf, SMALL, 0, epoch, **{"status": 0, "flags": 0, **change})
            out, err = process.communicate(timeout=DEADLINE)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert "Sanitizer" not in err and "runtime error" not in err, err
        assert process.returncode == code, (argv[0], out, err)
        answer = json.loads(out)
        answer.pop("round_trip_ms", None)
        answer.pop("epoch", None)
        if "error" in answer:
            answer["error"] = answer["error"].split(" within ")[0]
        outputs.append(answer)
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------- the doorbell (protocol.md section 12)
# The ivshmem server and the responder run in threads of this process; they end with their
# test, so the forks of other tests still happen while no other thread runs.


class WatchedBell:
    """A bell whose ``when_asleep(action, rings)`` runs ``action`` once, as the responder
    goes to sleep on it (``serve`` asks for its descriptor last, after its final look at
    the region) having taken ``rings`` rings in all off it: what is published after that,
    without a ring, is not seen."""

    def __init__(self, bell: HostBell):
        self.bell, self.eventfd, self.action, self.rings_taken, self.after = bell, bell.eventfd, None, 0, 0

    def when_asleep(self, action, rings: int = 0) -> None:
        self.action, self.after = action, rings

    def clear(self):
        rung = self.bell.clear()
        self.rings_taken += rung
        return rung

    def fileno(self) -> int:
        if self.action is not None and self.rings_taken >= self.after:
            action, self.action = self.action, None
            action()
        return self.bell.fileno()

    def close(self) -> None:
        self.bell.close()


@contextlib.contextmanager
def responding_to_rings(path: str, socket_path: str):
    """The echo responder on the region, asleep until a ring (its sweep is far longer than
    any test): a command published without a ring stays unanswered.  Yields its bell
    (``WatchedBell``)."""
    bell = WatchedBell(HostBell.connect(socket_path))
    region = open_file(path)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(ChannelReader(region), answer_frame, stop),
                              kwargs={"bell": bell, "sweep": 3600}, daemon=True)
    thread.start()
    try:
        yield bell
    finally:
        stop.set()
        ivshmem.ring_eventfd(bell.eventfd)  # wakes the sleeping loop to see stop
        thread.join(DEADLINE)
        bell.close()
        region.close()
    assert not thread.is_alive()


def test_doorbell_wakes_a_responder_that_only_a_ring_wakes(cli, make_channel, sockets):
    writer = make_channel()
    path, socket_path = writer.region.path, str(sockets / "a.sock")
    with running([(path, socket_path)]), responding_to_rings(path, socket_path) as bell:
        for i in range(5):
            payload, mac = echo_command(0x61, i)
            done = cli(path, "--doorbell", socket_path, "--json", "-w", payload)
            assert done.code == EXIT_OK, done.err
            assert done.json["seq"] == i and answers_command(done.json["text"], mac)
        # The same, without the doorbell, once the responder sleeps (right after an answer
        # it still looks at the region a few times: a pipelining writer's next command).
        unrung, started = [], threading.Event()

        def send_unrung() -> None:
            started.set()
            unrung.append(cli(path, "--timeout", "0.3", "-w", f"@X {MAC}@"))

        # The command goes once the responder has taken every ring off its bell (one per
        # command above, and a spurious one now: it looks, finds nothing) and sleeps again:
        # sent as it still looked at the region after the spurious ring, it was answered.
        bell.when_asleep(threading.Thread(target=send_unrung).start, rings=5 + 1)
        ivshmem.ring_eventfd(bell.eventfd)
        assert started.wait(DEADLINE), "the responder never went back to sleep"
        wait_until(lambda: unrung, timeout=DEADLINE, what="the unrung command's end")
        assert unrung[0].code == EXIT_TIMEOUT, unrung


def test_doorbell_rings_once_per_published_command(cli, make_channel, sockets):
    writer = make_channel(SMALL)
    path, socket_path = writer.region.path, str(sockets / "b.sock")
    with running([(path, socket_path)]):
        bell = HostBell.connect(socket_path)
        try:
            done = cli(path, "--doorbell", socket_path, "--timeout", "0.3", "-w", f"@X {MAC}@")
            assert done.code == EXIT_TIMEOUT, done.err  # nobody answers, but the ring was heard
            assert bell.clear() == 1
            too_long = "@" + "X" * SMALL.max_command_length + "@"
            assert cli(path, "--doorbell", socket_path, "-w", too_long).code == EXIT_INVALID
            assert cli(path, "--doorbell", socket_path, "-r").code == EXIT_OK
            assert bell.clear() == 0  # nothing published, nothing rung
        finally:
            bell.close()
    assert header_of(writer).publish == 1


@pytest.mark.parametrize("case", ["missing", "other-region", "version"])
def test_a_doorbell_server_that_cannot_serve_is_refused(cli, make_channel, sockets, tmp_path, case):
    """Exit 5 with mbctl's message, as text and as JSON, and nothing sent."""
    writer = make_channel()
    path, socket_path = writer.region.path, str(sockets / "c.sock")
    other = tmp_path / "other-region"
    other.write_bytes(bytes(1 << 20))
    server, message = {
        "missing": (contextlib.nullcontext(), f"cannot connect to the doorbell server at {socket_path}: "
                                              "No such file or directory"),
        "other-region": (running([(str(other), socket_path)]), f"the doorbell server at {socket_path} "
                                                               "serves another region"),
        "version": (scripted_server(socket_path, [(7, None)]), f"{socket_path}: ivshmem protocol version 7, "
                                                               "only 0 is known"),
    }[case]
    with server:
        done = cli(path, "--json", "--doorbell", socket_path, "-w", f"@X {MAC}@")
    assert (done.code, done.err) == (EXIT_CHANNEL, f"{cli.prog}: {message}\n")
    assert done.json == {"error": message, "exit_code": EXIT_CHANNEL}
    assert header_of(writer).publish == 0


def test_doorbell_usage_errors(cli, make_channel, sockets):
    path = make_channel().region.path
    without_shm = run([*cli.base, "--doorbell", str(sockets / "d.sock"), "-r"])
    assert without_shm.code == 2 and "--doorbell goes with --shm" in without_shm.err
    for arguments in (["-r", "--doorbell"], ["--doorbell", "--json", "-r"]):
        done = cli(path, *arguments)
        assert done.code == 2, (arguments, done.err)


def _scripted_setups(memory: int, eventfd: int) -> dict[str, tuple[list, str]]:
    """Servers that break QEMU's protocol, some after handing out descriptors: what they
    send, and what the client must say."""
    return {
        "version": ([(7, None)], "ivshmem protocol version 7, only 0 is known"),
        "version-with-fd": ([(0, eventfd)], "ivshmem protocol version 0, only 0 is known"),
        "host-id": ([(0, None), (0, None)], "peer ID 0 is not a guest's"),
        "no-memory": ([(0, None), (1, None), (5, eventfd)], "expected the shared memory, got message 5"),
        "peer-out-of-range": ([(0, None), (1, None), (-1, memory), (70000, eventfd)],
                              "unexpected message 70000 during the setup"),
        "no-host-peer": ([(0, None), (1, None), (-1, memory), (2, eventfd), (1, eventfd)],
                         "the doorbell server did not finish its setup in time"),
    }


@pytest.mark.parametrize("case", sorted(_scripted_setups(-1, -1)))
def test_hostile_doorbell_servers_leak_nothing_under_sanitizers(c_sanitized, make_channel, sockets, case):
    """mbv_attach_doorbell against servers that speak otherwise: MBV_EDOORBELL naming the
    problem, and every descriptor it received closed (counted in /proc/self/fd)."""
    writer = make_channel()
    socket_path = str(sockets / "e.sock")
    memory, eventfd = os.open(writer.region.path, os.O_RDONLY), os.eventfd(0)
    try:
        messages, problem = _scripted_setups(memory, eventfd)[case]
        with scripted_server(socket_path, messages):
            done = run([c_sanitized / "mbvtest", "doorbell", writer.region.path, socket_path, 300, 1],
                       env=SANITIZER_ENV)
    finally:
        os.close(memory)
        os.close(eventfd)
    assert "Sanitizer" not in done.err and "runtime error" not in done.err, done.err
    error, closed = done.out.splitlines()
    assert done.code == 4 and error.startswith(f"error doorbell error: {socket_path}: {problem}"), done.out
    assert closed == "closed 0"
    assert header_of(writer).publish == 0


def test_attached_doorbell_keeps_one_descriptor_and_rings_per_command(c_sanitized, make_channel, sockets,
                                                                      tmp_path):
    writer = make_channel()
    path, socket_path = writer.region.path, str(sockets / "f.sock")
    other = tmp_path / "other-region"
    other.write_bytes(bytes(1 << 20))
    mbvtest = c_sanitized / "mbvtest"
    with running([(path, socket_path)]):
        bell = HostBell.connect(socket_path)
        try:
            done = run([mbvtest, "doorbell", path, socket_path, 2000, 7], env=SANITIZER_ENV)
            assert "Sanitizer" not in done.err, done.err
            assert (done.code, done.out.splitlines()) == (0, ["attached 2", "closed 0"])  # the region and the eventfd
            assert bell.clear() == 7
            refusals = ((other, socket_path, "serves another region"),
                        (path, sockets / "none.sock", "cannot connect"))
            for region, doorbell, problem in refusals:
                done = run([mbvtest, "doorbell", region, doorbell, 2000, 1], env=SANITIZER_ENV)
                error, closed = done.out.splitlines()
                assert (done.code, closed) == (4, "closed 0") and problem in error, done.out + done.err
            assert bell.clear() == 0
        finally:
            bell.close()
    assert header_of(writer).publish == 7


BAR0_DOORBELL = 12
HOST_COMMAND_BELL = ivshmem.HOST_PEER << 16 | ivshmem.COMMAND_VECTOR


def _bar0(position: int, size: int = 256) -> bytes:
    """Registers with IVPosition = ``position`` and a Doorbell register that shows a write."""
    return (struct.pack("<4I", 0, 0, position, 0xFFFFFFFF) + bytes(256))[:size]


@pytest.mark.parametrize("registers, rung", [
    (_bar0(1), True),            # ivshmem-doorbell: this guest is peer 1
    (_bar0(0), False),           # ivshmem-plain reads 0
    (_bar0(1, 16), False),       # a BAR0 shorter than its 256 bytes is not mapped
    (None, False),               # no BAR0 to map: no doorbell, not an error
], ids=["doorbell", "plain", "short-bar0", "no-bar0"])
def test_a_device_rings_only_through_a_doorbell_it_has(c_build, tmp_path, registers, rung):
    device = fake_pci_device(tmp_path, "0000:00:04.0", "0x1af4", "0x1110", 1 << 20, registers=registers)
    done = run([c_build / "mbvtest", "ring", tmp_path, 3])
    assert (done.code, done.out) == (0, "published 3\n"), done.out + done.err
    assert ring.read_header((device / "resource2").read_bytes()).publish == 3
    if registers is not None:
        expected = bytearray(registers)
        if rung:
            struct.pack_into("<I", expected, BAR0_DOORBELL, HOST_COMMAND_BELL)
        assert (device / "resource0").read_bytes() == expected
