"""Writer and reader as real, separate processes on one shared-memory file: concurrent
writers, a reader SIGKILLed and restarted mid-stream, a writer SIGKILLed mid-wait, and a
guest re-initialisation under a running reader.

Children are forked (``multiprocessing`` "fork" context; this module starts no threads in
the test process) and each opens the region itself, so every process has its own
mapping, its own descriptor (``flock`` is per open file) and its own pid in the slots.
Synchronisation is by polling the region or files with a deadline, never by sleeping a
fixed time; every child is killed and reaped by the ``spawn`` fixture even on failure.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

import pytest

from mbvisor.guest import ring
from mbvisor.guest.reader import ChannelReader, serve
from mbvisor.guest.region import open_file
from mbvisor.guest.writer import ChannelWriter

FORK = multiprocessing.get_context("fork")
DEADLINE = 20.0  # generous bound for any single wait; a passing run is far quicker


# ---------------------------------------------------------------- child processes


def _reader_main(path: str, log_path: str) -> None:
    """Serve the region until SIGTERM.  Each command is logged as ``epoch seq payload``
    (one ``write`` on an O_APPEND descriptor, so a line survives a SIGKILL that follows
    it) *before* it is answered with ``ack <payload>``."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def handle(incoming):
        text = incoming.payload.decode()
        os.write(log_fd, f"{incoming.epoch} {incoming.seq} {text}\n".encode())
        return ring.Status.OK, f"ack {text}"

    serve(ChannelReader(open_file(path)), handle, stop)
    os.close(log_fd)


def _requesting_writer_main(path: str, number: int, count: int, go) -> None:
    """One of several concurrent writers: ``count`` requests, each checked against its echo."""
    writer = ChannelWriter(open_file(path))
    if not go.wait(DEADLINE):
        sys.exit(f"writer {number}: start signal never came")
    for i in range(count):
        payload = f"w{number}-{i}"
        response = writer.request(payload.encode(), timeout=DEADLINE)
        if not response.ok or response.text != f"ack {payload}":
            sys.exit(f"writer {number}: {payload!r} answered with {response!r}")


def _pipelining_writer_main(path: str, count: int, window: int, answers_path: str) -> None:
    """Keep up to ``window`` commands in flight; record every answer as ``seq status text``."""
    writer = ChannelWriter(open_file(path))
    answers_fd = os.open(answers_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    in_flight: deque = deque()

    def collect() -> None:
        ticket, payload = in_flight.popleft()
        response = writer.wait(ticket, timeout=DEADLINE)
        os.write(answers_fd, f"{response.seq} {response.status} {response.text}\n".encode())
        if response.seq != ticket.seq or not response.ok or response.text != f"ack {payload}":
            sys.exit(f"command {payload!r} (seq {ticket.seq}) answered with {response!r}")

    for i in range(count):
        if len(in_flight) >= window:
            collect()
        payload = f"c{i}"
        ticket = writer.submit(payload.encode(), timeout=DEADLINE)
        if ticket.seq != i:
            sys.exit(f"command {payload!r} got seq {ticket.seq}")
        in_flight.append((ticket, payload))
    while in_flight:
        collect()
    os.close(answers_fd)


def _orphan_writer_main(path: str, count: int) -> None:
    """Publish ``count`` commands, then wait for the first answer (until killed)."""
    writer = ChannelWriter(open_file(path))
    tickets = [writer.submit(f"orphan-{i}".encode()) for i in range(count)]
    writer.wait(tickets[0], timeout=60)
    sys.exit("the orphan writer was expected to be killed while waiting")


# ---------------------------------------------------------------- helpers


def wait_until(condition, what: str, timeout: float = DEADLINE):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.0005)


def join(process: multiprocessing.Process, what: str, timeout: float = DEADLINE) -> int:
    process.join(timeout)
    if process.exitcode is None:
        pytest.fail(f"{what} (pid {process.pid}) still running after {timeout:g} s")
    return process.exitcode


def stop_reader(process: multiprocessing.Process) -> None:
    """SIGTERM makes ``serve`` return; a clean exit shows the reader never crashed."""
    assert process.is_alive(), f"reader process died early with exit code {process.exitcode}"
    process.terminate()
    assert join(process, "reader") == 0


def header(writer: ChannelWriter) -> ring.Header:
    return ring.read_header(writer.region.buf)


def consumed(writer: ChannelWriter, count: int):
    return lambda: header(writer).consume == count


def read_log(path: Path) -> list[tuple[int, int, str]]:
    """(epoch, seq, payload) for each line a reader logged."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        epoch, seq, payload = line.split(" ", 2)
        entries.append((int(epoch), int(seq), payload))
    return entries


# ---------------------------------------------------------------- tests


def test_concurrent_writer_processes_lose_and_duplicate_nothing(make_channel, spawn, tmp_path):
    geometry = ring.Geometry(8, 128, 128)
    writers, per_writer = 4, 300
    total = writers * per_writer
    assert total >= 10 * geometry.slot_count  # the ring wraps many times
    writer = make_channel(geometry)
    log_path = tmp_path / "reader.log"
    go = FORK.Event()
    reader = spawn(_reader_main, writer.region.path, str(log_path))
    children = [spawn(_requesting_writer_main, writer.region.path, n, per_writer, go)
                for n in range(writers)]
    go.set()

    codes = [join(child, f"writer {n}") for n, child in enumerate(children)]
    assert codes == [0] * writers, "a writer saw a wrong, missing or failed answer (stderr above)"
    wait_until(consumed(writer, total), f"consume counter to reach {total}")
    stop_reader(reader)

    log = read_log(log_path)
    payloads = [payload for _, _, payload in log]
    expected = {f"w{n}-{i}" for n in range(writers) for i in range(per_writer)}
    counts = Counter(payloads)
    assert {p for p, c in counts.items() if c > 1} == set(), "commands handled twice"
    assert expected - counts.keys() == set(), "commands never handled"
    assert counts.keys() == expected
    assert [seq for _, seq, _ in log] == list(range(total))  # handled in ring order, no gap
    for n in range(writers):
        mine = [p for p in payloads if p.startswith(f"w{n}-")]
        assert mine == [f"w{n}-{i}" for i in range(per_writer)], f"writer {n}'s order not preserved"
    # The writers really ran at the same time: their commands interleave in the ring.
    switches = sum(a.split("-")[0] != b.split("-")[0] for a, b in zip(payloads, payloads[1:]))
    assert switches >= writers * 10
    assert header(writer).consume == total


def test_reader_killed_mid_stream_and_restarted(make_channel, spawn, tmp_path):
    geometry = ring.Geometry(16, 128, 128)
    count, window, kill_after = 2000, geometry.slot_count // 2, 500
    writer = make_channel(geometry)
    first_log, second_log = tmp_path / "reader-1.log", tmp_path / "reader-2.log"
    answers_path = tmp_path / "answers.log"
    reader = spawn(_reader_main, writer.region.path, str(first_log))
    producer = spawn(_pipelining_writer_main, writer.region.path, count, window, str(answers_path))

    wait_until(lambda: header(writer).consume > kill_after, f"consume to pass {kill_after}")
    reader.kill()
    assert join(reader, "killed reader") == -signal.SIGKILL
    at_kill = header(writer)
    in_flight = at_kill.consume  # the one command the dead reader may have handled unanswered
    assert kill_after < in_flight < count and at_kill.publish < count, "not killed mid-stream"
    assert producer.is_alive(), "the writer finished or died while no reader was running"

    restarted = spawn(_reader_main, writer.region.path, str(second_log))
    assert join(producer, "writer") == 0, "the writer saw a wrong or missing answer (stderr above)"
    wait_until(consumed(writer, count), f"consume counter to reach {count}")
    stop_reader(restarted)

    # Exactly one answer per command, in order, each the answer to that command.
    answers = [line.split(" ", 2) for line in answers_path.read_text().splitlines()]
    assert [int(seq) for seq, _, _ in answers] == list(range(count))
    assert all(status == str(int(ring.Status.OK)) for _, status, _ in answers)
    assert [text for _, _, text in answers] == [f"ack c{i}" for i in range(count)]

    before, after = read_log(first_log), read_log(second_log)
    assert all(payload == f"c{seq}" for _, seq, payload in before + after)
    seqs_before, seqs_after = [s for _, s, _ in before], [s for _, s, _ in after]
    counts = Counter(seqs_before + seqs_after)
    duplicates = {seq for seq, n in counts.items() if n > 1}
    assert duplicates <= {in_flight} and len(duplicates) <= 1, (
        f"handled again after the restart: {sorted(duplicates)} (in flight at the kill: {in_flight})")
    assert counts.keys() == set(range(count)), "commands never handled"
    # The first reader handled a prefix, the restarted one resumed at the kill point.
    assert seqs_before == list(range(len(seqs_before)))
    assert seqs_before[-1] in (in_flight - 1, in_flight)
    assert seqs_after == list(range(seqs_after[0], count))
    assert seqs_after[0] in (in_flight, in_flight + 1)
    assert header(writer).consume == count


def test_writer_killed_mid_wait_does_not_wedge_the_ring(make_channel, spawn, tmp_path):
    geometry = ring.Geometry(8, 128, 128)
    orphans = 3
    writer = make_channel(geometry)
    log_path = tmp_path / "reader.log"

    # No reader yet, so the orphan can never read its answers before it dies.
    orphan = spawn(_orphan_writer_main, writer.region.path, orphans)
    wait_until(lambda: header(writer).publish == orphans, "the orphan writer to publish")
    orphan.kill()
    assert join(orphan, "orphan writer") == -signal.SIGKILL  # reaped: no zombie that looks alive
    for seq in range(orphans):
        owner = ring.read_command_owner(writer.region.buf, geometry, seq)
        assert (owner.seq, owner.writer_pid, owner.state) == (seq, orphan.pid, ring.SlotState.PUBLISHED)

    reader = spawn(_reader_main, writer.region.path, str(log_path))
    survivors = 3 * geometry.slot_count  # wraps onto the orphan's slots more than once
    for i in range(survivors):
        response = writer.request(f"s{i}".encode(), timeout=5)
        assert (response.seq, response.ok, response.text) == (orphans + i, True, f"ack s{i}")
    wait_until(consumed(writer, orphans + survivors), "every command to be counted")
    stop_reader(reader)

    log = read_log(log_path)
    assert [(seq, payload) for _, seq, payload in log] == (
        [(i, f"orphan-{i}") for i in range(orphans)]
        + [(orphans + i, f"s{i}") for i in range(survivors)])


def test_guest_reinitialisation_under_a_running_reader(make_channel, spawn, tmp_path):
    geometry = ring.Geometry(16, 128, 128)
    batch = 50
    writer = make_channel(geometry)
    first_epoch = header(writer).guest_epoch
    log_path = tmp_path / "reader.log"
    reader = spawn(_reader_main, writer.region.path, str(log_path))

    for i in range(batch):
        response = writer.request(f"a{i}".encode(), timeout=5)
        assert (response.seq, response.epoch, response.text) == (i, first_epoch, f"ack a{i}")
    second_epoch = writer.initialise(geometry)
    assert second_epoch != first_epoch
    for i in range(batch):
        response = writer.request(f"b{i}".encode(), timeout=5)
        assert (response.seq, response.epoch, response.text) == (i, second_epoch, f"ack b{i}")

    assert reader.is_alive(), f"reader process died with exit code {reader.exitcode}"
    wait_until(consumed(writer, batch), "the new epoch's commands to be counted")
    final = header(writer)
    assert (final.guest_epoch, final.host_epoch, final.publish) == (second_epoch, second_epoch, batch)
    stop_reader(reader)

    assert read_log(log_path) == (
        [(first_epoch, i, f"a{i}") for i in range(batch)]
        + [(second_epoch, i, f"b{i}") for i in range(batch)])
