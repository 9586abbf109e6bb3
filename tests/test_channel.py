"""Writer and reader on a real shared-memory file, in one process: ordering, wrap-around,
restart, re-initialisation, full ring, time-outs and hostile bytes."""

from __future__ import annotations

import fcntl
import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mbvisor.guest import ring
from mbvisor.guest.channel_errors import (AnswerLost, BadRegion, ChannelBusy, ChannelReset, DeviceNotFound,
                                          RegionTooSmall, ResponseTimeout, RingFull)
from mbvisor.guest.reader import ChannelReader, serve
from mbvisor.guest.region import open_file, open_shm
from mbvisor.guest.writer import ChannelWriter, Ticket
from mbvisor.topologies.netlab import wait_until

SMALL = ring.Geometry(4, 128, 128)


def reader_for(writer: ChannelWriter) -> ChannelReader:
    return ChannelReader(open_file(writer.region.path))


def answer_all(reader: ChannelReader, prefix: str = "ok ") -> list[bytes]:
    taken = []
    while (incoming := reader.poll()) is not None:
        taken.append(incoming.payload)
        reader.answer(incoming.seq, ring.Status.OK, prefix + incoming.payload.decode())
    return taken


def test_round_trip_in_order(make_channel):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    tickets = [writer.submit(f"cmd {i}".encode()) for i in range(3)]
    assert answer_all(reader) == [b"cmd 0", b"cmd 1", b"cmd 2"]
    assert [writer.wait(t).text for t in tickets] == ["ok cmd 0", "ok cmd 1", "ok cmd 2"]
    assert [t.seq for t in tickets] == [0, 1, 2]


def test_wrap_around_ten_times_the_ring(make_channel):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(reader, lambda c: (0, c.payload.decode()[::-1]), stop))
    thread.start()
    try:
        for i in range(SMALL.slot_count * 12):
            response = writer.request(f"n{i:05d}".encode())
            assert (response.ok, response.text) == (True, f"n{i:05d}"[::-1])
    finally:
        stop.set()
        thread.join()
    assert reader.consume == SMALL.slot_count * 12 and reader.stats.corrupt == 0


def test_poll_returns_the_same_command_until_answered(make_channel):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    writer.submit(b"X 52:34:56:00:12:22")
    first, again = reader.poll(), reader.poll()
    assert first == again and first.seq == 0
    with pytest.raises(ValueError, match="out of order"):
        reader.answer(1, ring.Status.OK, "")


def test_full_ring_is_reported_after_the_timeout(make_channel):
    writer = make_channel(SMALL)
    for i in range(SMALL.slot_count):
        writer.submit(b"x")
    with pytest.raises(RingFull, match="4 of 4 commands are waiting"):
        writer.submit(b"x", timeout=0.05)


def test_answer_not_yet_read_is_never_overwritten(make_channel):
    """The host answered every slot, but another process's writer has not read its answers
    yet: reusing a slot would destroy one, so the ring counts as full until it reads them."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    published, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # a live writer that reads its answers only when told to
        other = ChannelWriter(open_file(writer.region.path))
        tickets = [other.submit(b"x") for _ in range(SMALL.slot_count)]
        os.write(published[1], b"!")
        os.read(release[0], 1)
        os._exit(0 if all(other.wait(t).ok for t in tickets) else 1)
    try:
        assert os.read(published[0], 1) == b"!"
        answer_all(reader)
        with pytest.raises(RingFull, match=f"host answered command 0, but its writer \\(process {pid}, alive"):
            writer.submit(b"y", timeout=0.05)
        os.write(release[1], b"!")
        assert os.waitpid(pid, 0)[1] == 0
        assert writer.submit(b"y").seq == SMALL.slot_count
    finally:
        for fd in published + release:
            os.close(fd)


def test_a_live_writer_that_never_reads_blocks_others_only_until_its_promise(make_channel):
    """A writer that stops reading (stopped, hung, buggy) while alive: past the time it
    promised to read its answers by, the others reuse its answered slots, and it learns
    that its answer is lost instead of reading someone else's."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    published, release, verdict = os.pipe(), os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        other = ChannelWriter(open_file(writer.region.path))
        tickets = [other.submit(b"x", collect_within=0.05) for _ in range(SMALL.slot_count)]
        os.write(published[1], b"!")
        os.read(release[0], 1)
        try:
            other.wait(tickets[0], timeout=5)
            os.write(verdict[1], b"read an answer")
        except AnswerLost:
            os.write(verdict[1], b"lost")
        os._exit(0)
    try:
        assert os.read(published[0], 1) == b"!"
        answer_all(reader)
        buf = writer.region.buf
        wait_until(lambda: all(ring.read_command_owner(buf, SMALL, seq).promise_expired(ring.clock_ms())
                               for seq in range(SMALL.slot_count)), what="the other writer's promise to pass")
        ticket = writer.submit(b"y", timeout=1)
        assert ticket.seq == SMALL.slot_count
        answer_all(reader)
        assert writer.wait(ticket).text == "ok y"
        os.write(release[1], b"!")
        assert os.read(verdict[0], 64) == b"lost"
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        for fd in published + release + verdict:
            os.close(fd)


def test_commands_nobody_will_read_free_their_slots_once_answered(make_channel):
    """``collect=False`` writes writer_pid 0: the answer is for the host's log only."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    for _ in range(SMALL.slot_count):
        writer.submit(b"fire and forget", collect=False)
    with pytest.raises(RingFull, match="waiting for the host"):
        writer.submit(b"x", timeout=0.02)
    answer_all(reader)
    assert writer.submit(b"next lap", timeout=0.05).seq == SMALL.slot_count
    assert ring.read_command_owner(writer.region.buf, SMALL, 1).writer_pid == 0


def in_thread(call):
    """``call()`` in a thread: its outcome, or a failure if it is still blocked after a while
    (the test fails instead of hanging if a deadline is not kept)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except Exception as error:  # the outcome under test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "still blocked long after its deadline"
    return outcome


def test_a_writer_stuck_holding_the_lock_costs_others_their_deadline_and_sends_nothing(make_channel):
    writer = make_channel(SMALL)
    holder = open_file(writer.region.path)
    fcntl.flock(holder.fd, fcntl.LOCK_EX)  # another descriptor: another writer, as far as flock goes
    try:
        outcome = in_thread(lambda: writer.submit(b"x", timeout=0.1))
        assert isinstance(outcome.get("error"), ChannelBusy), outcome
        assert "nothing was sent" in str(outcome["error"])
        assert ring.read_header(writer.region.buf).publish == 0
        outcome = in_thread(lambda: writer.request(b"x", timeout=0.1))
        assert isinstance(outcome.get("error"), ChannelBusy), outcome
    finally:
        fcntl.flock(holder.fd, fcntl.LOCK_UN)
        holder.close()
    assert writer.submit(b"x", timeout=1).seq == 0


def test_a_slot_marked_for_another_epoch_is_left_alone(make_channel):
    """A waiter whose channel was re-initialised must not mark the new epoch's command."""
    writer = make_channel(SMALL)
    old = writer.submit(b"old")
    writer.initialise(SMALL)
    new = writer.submit(b"new")
    assert new.seq == old.seq == 0
    writer._mark(SMALL, old, ring.SlotState.ABANDONED)
    assert ring.read_command_owner(writer.region.buf, SMALL, 0).state == ring.SlotState.PUBLISHED


def test_slot_of_a_dead_writer_is_reclaimed(make_channel):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    pid = os.fork()
    if pid == 0:  # a writer that publishes and dies without reading its answer
        ChannelWriter(open_file(writer.region.path)).submit(b"orphan")
        os._exit(0)
    os.waitpid(pid, 0)
    tickets = [writer.submit(b"x") for _ in range(SMALL.slot_count - 1)]
    answer_all(reader)
    assert all(writer.wait(t).ok for t in tickets)
    assert writer.submit(b"reuses the orphan's slot", timeout=1).seq == SMALL.slot_count


def test_timeout_leaves_command_pending_and_its_slot_reusable(make_channel):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    ticket = writer.submit(b"slow")
    with pytest.raises(ResponseTimeout, match="no answer to command 0") as raised:
        writer.wait(ticket, timeout=0.02)
    assert raised.value.seq == 0
    assert reader.poll().payload == b"slow"  # still pending, answered later
    answer_all(reader)
    for _ in range(SMALL.slot_count):
        writer.submit(b"more", timeout=0.1)


def test_an_abandoned_ticket_frees_its_slot_before_its_promise(make_channel):
    """A writer that gives up on frames in flight (an earlier one failed) abandons them:
    once answered, their slots are reused at once, not after the promise (60 s here)."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    tickets = [writer.submit(b"in flight", collect_within=60.0) for _ in range(SMALL.slot_count)]
    for ticket in tickets:
        writer.abandon(ticket)
    assert ring.read_command_owner(writer.region.buf, SMALL, 0).state == ring.SlotState.ABANDONED
    answer_all(reader)
    assert writer.submit(b"next", timeout=0.5).seq == SMALL.slot_count


def test_abandoning_a_ticket_of_an_earlier_epoch_changes_nothing(make_channel):
    writer = make_channel(SMALL)
    old = writer.submit(b"old")
    writer.initialise(SMALL)
    writer.submit(b"new")
    writer.abandon(old)
    assert ring.read_command_owner(writer.region.buf, SMALL, 0).state == ring.SlotState.PUBLISHED


def test_restarted_reader_resumes_without_replaying(make_channel):
    writer = make_channel(SMALL)
    first = reader_for(writer)
    for i in range(3):
        writer.submit(f"c{i}".encode())
    incoming = first.poll()
    first.answer(incoming.seq, ring.Status.OK, "done")
    # Die between writing the answer to c1 and moving the consume counter.
    geometry = ring.read_header(writer.region.buf).geometry
    ring.encode_response(writer.region.buf, geometry, 1, first.epoch, ring.Status.OK, "done before crash")
    restarted = reader_for(writer)
    assert restarted.poll().payload == b"c2"
    assert restarted.stats.resumed_answers == 1
    assert writer.wait(Ticket(1, first.epoch)).text == "done before crash"


def test_guest_reinitialisation_starts_a_new_epoch(make_channel):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    writer.submit(b"old")
    waiting = writer.submit(b"old too")
    assert reader.poll().payload == b"old"
    old_epoch = reader.epoch
    new_epoch = writer.initialise(SMALL)
    assert new_epoch != old_epoch
    with pytest.raises(ChannelReset):
        writer.wait(waiting, timeout=1)
    assert not reader.answer(0, ring.Status.OK, "late answer for the old epoch")
    writer.submit(b"new")
    incoming = reader.poll()
    assert (incoming.payload, incoming.seq, incoming.epoch) == (b"new", 0, new_epoch)
    header = ring.read_header(writer.region.buf)
    assert (header.host_epoch, header.consume) == (new_epoch, 0)


def test_corrupt_slot_is_answered_with_an_error_and_skipped(make_channel):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    bad = writer.submit(b"A 52:34:56:00:12:22 I 4 s 10.0.0.1")
    good = writer.submit(b"X 52:34:56:00:12:22")
    writer.region.buf[SMALL.command_offset(0) + ring.SLOT_HEADER_SIZE + 5] ^= 0x20
    assert reader.poll().payload == b"X 52:34:56:00:12:22"
    reader.answer(1, ring.Status.OK, "ok")
    response = writer.wait(bad)
    assert response.status == ring.Status.CORRUPT and "CRC mismatch" in response.text
    assert writer.wait(good).ok and reader.stats.corrupt == 1


def test_writer_reports_foreign_or_damaged_regions(make_channel, tmp_path):
    writer = make_channel(SMALL)
    writer.region.buf[0:4] = b"NOPE"
    with pytest.raises(BadRegion, match="bad magic"):
        writer.submit(b"x")
    writer.region.buf[0:4] = ring.MAGIC
    struct.pack_into("<H", writer.region.buf, 4, 9)
    with pytest.raises(BadRegion, match="protocol version 9"):
        writer.submit(b"x")
    tiny = tmp_path / "tiny"
    tiny.write_bytes(bytes(4096))
    with pytest.raises(RegionTooSmall, match="4096 bytes"):
        open_file(tiny)
    with pytest.raises(DeviceNotFound):
        open_file(tmp_path / "missing")


def test_blank_region_is_initialised_by_the_first_writer(region_path):
    with open_file(region_path, create_size=1 << 20) as region:
        ticket = ChannelWriter(region).submit(b"first")
        header = ring.read_header(region.buf)
        assert header.problem(region.size) is None
        assert (ticket.seq, ticket.epoch) == (0, header.guest_epoch)
        assert header.geometry == ring.Geometry(64)


def test_posix_shm_name_opens_the_same_bytes(region_path):
    name = os.path.basename(region_path)
    with open_shm(name, create_size=1 << 20) as host, open_file(region_path) as guest:
        ChannelWriter(guest).submit(b"via posix_ipc")
        assert ChannelReader(host).poll().payload == b"via posix_ipc"
    with pytest.raises(DeviceNotFound, match="does not exist"):
        open_shm("mbvisor-test-no-such-object")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, SMALL.region_size - 1), st.binary(min_size=1, max_size=16)),
                min_size=1, max_size=20))
def test_reader_survives_any_bytes_anywhere(make_channel, damage):
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    try:
        writer.submit(b"before")
        for offset, data in damage:
            chunk = data[:SMALL.region_size - offset]
            writer.region.buf[offset:offset + len(chunk)] = chunk
        for _ in range(2 * SMALL.slot_count):
            incoming = reader.poll()
            if incoming is not None:
                reader.answer(incoming.seq, ring.Status.OK, "ok")
        assert reader.consume >= 0
    finally:  # one pair of descriptors per example, not hundreds held until the test ends
        reader.region.close()
        writer.region.close()


def test_pipelining_writer_never_blocks_on_its_own_unread_answers(make_channel):
    """More tickets outstanding than slots: the writer's next slot holds one of its own
    answers; it must keep that answer for wait() rather than wait for itself."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(reader, lambda c: (0, c.payload.decode()), stop))
    thread.start()
    try:
        tickets = [writer.submit(f"p{i}".encode(), timeout=2) for i in range(SMALL.slot_count * 3)]
        assert [writer.wait(t, timeout=2).text for t in tickets] == [f"p{i}" for i in range(SMALL.slot_count * 3)]
    finally:
        stop.set()
        thread.join()


def test_a_timeout_of_zero_tries_once_and_formatting_keeps_its_deadline(make_channel):
    writer = make_channel(SMALL)
    assert writer.submit(b"now", timeout=0).seq == 0     # a free lock and slot: published at once
    holder = open_file(writer.region.path)
    fcntl.flock(holder.fd, fcntl.LOCK_EX)
    try:
        assert isinstance(in_thread(lambda: writer.initialise(SMALL, timeout=0.1)).get("error"), ChannelBusy)
        assert isinstance(in_thread(lambda: writer.header(timeout=0.1)).get("error"), ChannelBusy)
    finally:
        fcntl.flock(holder.fd, fcntl.LOCK_UN)
        holder.close()
    assert ring.read_header(writer.region.buf).publish == 1  # not re-initialised


def test_a_late_reader_does_not_mark_a_slot_it_no_longer_owns(make_channel):
    """Past its promise a writer leaves the slot's state alone: another writer may have
    taken the slot meanwhile, and a mark would free that one's command."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    ticket = writer.submit(b"x", collect_within=0.001)
    answer_all(reader)
    wait_until(lambda: not ring.clock_ms_before(ring.clock_ms(), ticket.collect_by), what="the promise to pass")
    assert writer.wait(ticket).text == "ok x"
    assert ring.read_command_owner(writer.region.buf, SMALL, 0).state == ring.SlotState.PUBLISHED


def test_a_writer_pid_no_process_can_have_is_a_dead_writer(make_channel):
    """The slot's writer_pid is the guest's to write: a number beyond any pid must not
    crash the next writer (it is nobody, like 0)."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    for _ in range(SMALL.slot_count):
        writer.submit(b"x", collect=False)
    answer_all(reader)
    struct.pack_into("<II", writer.region.buf, SMALL.command_offset(0) + 20, 2**32 - 1, ring.SlotState.PUBLISHED)
    assert writer.submit(b"next lap", timeout=0.05).seq == SMALL.slot_count


def test_the_own_answers_kept_for_waiters_are_bounded(make_channel, monkeypatch):
    """Answers read for this process's waiters (while it waited for a slot) stay in a
    bounded store: past it, this process's slots free themselves when its promises pass."""
    from mbvisor.guest import writer as writer_module
    monkeypatch.setattr(writer_module, "MAX_STASH", 2)
    monkeypatch.setattr(writer_module, "_STASH", {})
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    tickets = [writer.submit(b"kept", collect_within=0.2) for _ in range(SMALL.slot_count)]
    answer_all(reader)
    assert writer.submit(b"y", timeout=5).seq == SMALL.slot_count  # slot 0: its answer kept for its waiter
    assert len(writer_module._STASH) == 2
    assert writer.wait(tickets[0]).text == "ok kept"  # kept for its waiter


def test_threads_of_one_process_pipelining_through_several_writers_lose_no_answer(make_channel):
    """Threads of one process, two of them sharing a writer and two with writers of their
    own (their own descriptors), each keeping several commands in flight on a 4-slot ring:
    answers are collected for one another while waiting for slots, marked without the
    writers' lock, and every thread gets exactly its own answers, none lost."""
    writer = make_channel(SMALL)
    reader = reader_for(writer)
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(reader, lambda c: (0, c.payload.decode()), stop))
    server.start()
    writers = [writer, writer, ChannelWriter(open_file(writer.region.path)), ChannelWriter(open_file(writer.region.path))]
    outcomes: dict[int, object] = {}

    def pipeline(number: int, own: ChannelWriter) -> None:
        try:
            texts = [f"t{number}-{i}" for i in range(300)]
            tickets = []
            got = []
            for text in texts:
                tickets.append(own.submit(text.encode(), timeout=10))
                if len(tickets) >= 3:
                    got.append(own.wait(tickets.pop(0), timeout=10).text)
            got += [own.wait(t, timeout=10).text for t in tickets]
            outcomes[number] = got == texts or got
        except Exception as error:  # the outcome under test
            outcomes[number] = error

    threads = [threading.Thread(target=pipeline, args=(n, w)) for n, w in enumerate(writers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert outcomes == {n: True for n in range(len(writers))}
    finally:
        stop.set()
        server.join()
