"""The byte layout: encode/decode of header and slots, and rejection of damaged slots."""

import struct

import pytest

from mbvisor.guest import ring

GEOMETRY = ring.Geometry(8, 128, 256)


def fresh(epoch: int = 0x1234) -> bytearray:
    buf = bytearray(GEOMETRY.region_size)
    ring.initialise(buf, len(buf), GEOMETRY, epoch)
    return buf


def test_initialised_header_is_valid_and_empty():
    header = ring.read_header(fresh())
    assert header.problem(GEOMETRY.region_size) is None
    assert (header.magic, header.version, header.guest_epoch) == (ring.MAGIC, ring.VERSION, 0x1234)
    assert (header.publish, header.consume, header.host_epoch) == (0, 0, 0)
    assert header.geometry == GEOMETRY


def test_documented_offsets():
    """docs/protocol.md gives these offsets; a C implementation relies on them."""
    buf = fresh()
    ring.write_u64(buf, ring.OFFSET_PUBLISH, 7)
    ring.write_u64(buf, ring.OFFSET_CONSUME, 5)
    ring.write_u32(buf, ring.OFFSET_HOST_EPOCH, 0x1234)
    assert buf[0:4] == b"MBVR"
    assert struct.unpack_from("<HHIII", buf, 4) == (1, 256, 8, 128, 256)
    assert struct.unpack_from("<IQQI", buf, 20) == (0x1234, 7, 5, 0x1234)
    assert GEOMETRY.command_offset(9) == 256 + 128
    assert GEOMETRY.response_offset(9) == 256 + 8 * 128 + 256


def test_command_round_trip_and_crc_covers_every_field():
    buf = fresh()
    ring.encode_command(buf, GEOMETRY, 9, 0x1234, b"X 52:34:56:00:12:22", 4242)
    slot = ring.decode_command(buf, GEOMETRY, 9, 0x1234)
    assert slot == ring.CommandSlot(9, 0x1234, b"X 52:34:56:00:12:22", 4242, ring.SlotState.PUBLISHED)
    offset = GEOMETRY.command_offset(9)
    for position in list(range(0, 16)) + [ring.SLOT_HEADER_SIZE + 3]:
        damaged = bytearray(buf)
        damaged[offset + position] ^= 0x40
        assert isinstance(ring.decode_command(damaged, GEOMETRY, 9, 0x1234), str), position


def test_state_and_pid_are_outside_the_crc():
    buf = fresh()
    ring.encode_command(buf, GEOMETRY, 1, 0x1234, b"I 52:34:56:00:12:22", 1)
    ring.write_u32(buf, GEOMETRY.command_offset(1) + ring.OFFSET_SLOT_STATE, ring.SlotState.COLLECTED)
    assert not isinstance(ring.decode_command(buf, GEOMETRY, 1, 0x1234), str)


@pytest.mark.parametrize("seq, epoch, reason", [
    (10, 0x1234, "sequence 2, expected 10"),
    (2, 0x9999, "epoch 0x1234, expected 0x9999"),
])
def test_wrong_sequence_or_epoch_is_named(seq, epoch, reason):
    buf = fresh()
    ring.encode_command(buf, GEOMETRY, 2, 0x1234, b"X 52:34:56:00:12:22", 1)
    assert reason in ring.decode_command(buf, GEOMETRY, seq, epoch)


def test_oversized_length_is_rejected_without_reading_past_the_slot():
    buf = fresh()
    ring.encode_command(buf, GEOMETRY, 3, 0x1234, b"abc", 1)
    struct.pack_into("<I", buf, GEOMETRY.command_offset(3) + 12, 0xFFFFFFFF)
    assert "exceeds" in ring.decode_command(buf, GEOMETRY, 3, 0x1234)


def test_command_larger_than_slot_is_refused():
    with pytest.raises(ring.LayoutError, match="exceeds"):
        ring.encode_command(fresh(), GEOMETRY, 0, 1, b"x" * 97, 1)


def test_response_round_trip_truncation_and_damage():
    buf = fresh()
    assert not ring.encode_response(buf, GEOMETRY, 4, 0x1234, ring.Status.OK, "ok")
    assert ring.decode_response(buf, GEOMETRY, 4, 0x1234) == ring.Response(4, 0x1234, 0, "ok", False)
    assert ring.decode_response(buf, GEOMETRY, 4, 0x9999) is None
    assert ring.decode_response(buf, GEOMETRY, 12, 0x1234) is None
    assert ring.encode_response(buf, GEOMETRY, 5, 0x1234, ring.Status.SYNTAX, "é" * 500)
    response = ring.decode_response(buf, GEOMETRY, 5, 0x1234)
    assert response.truncated and response.status_name == "SYNTAX"
    assert len(response.text.encode()) <= GEOMETRY.max_response_length
    buf[GEOMETRY.response_offset(5) + ring.SLOT_HEADER_SIZE] ^= 1
    assert ring.decode_response(buf, GEOMETRY, 5, 0x1234) is None


@pytest.mark.parametrize("field, offset, fmt, value, expected", [
    ("magic", 0, "<4s", b"MBVX", "bad magic"),
    ("version", 4, "<H", 2, "protocol version 2"),
    ("header size", 6, "<H", 64, "header size 64"),
    ("slot count", 8, "<I", 6, "not a power of two"),
    ("slot count", 8, "<I", 1 << 20, "not a power of two"),
    ("command slot size", 12, "<I", 100, "not a multiple of 64"),
    ("response slot size", 16, "<I", 1 << 30, "not a multiple of 64"),
    ("epoch", 20, "<I", 0, "not initialised"),
    ("geometry too big", 8, "<I", 1024, "needs"),
])
def test_every_header_field_is_validated(field, offset, fmt, value, expected):
    buf = fresh()
    struct.pack_into(fmt, buf, offset, value)
    assert expected in ring.read_header(buf).problem(len(buf)), field


def test_default_geometry_fills_a_power_of_two_and_refuses_tiny_regions():
    assert ring.geometry_for(1 << 20) == ring.Geometry(64)
    assert ring.geometry_for(1 << 20).region_size <= 1 << 20
    assert ring.geometry_for(64 << 20).slot_count == ring.MAX_SLOT_COUNT
    with pytest.raises(ring.LayoutError, match="too small"):
        ring.geometry_for(4096)


def test_collect_by_is_written_outside_the_crc_and_read_with_the_owner():
    buf = fresh()
    ring.encode_command(buf, GEOMETRY, 9, 0x1234, b"X 52:34:56:00:12:22", 4242, collect_by=0xFFFFFFF0)
    assert struct.unpack_from("<I", buf, GEOMETRY.command_offset(9) + 28)[0] == 0xFFFFFFF0
    owner = ring.read_command_owner(buf, GEOMETRY, 9)
    assert (owner.seq, owner.epoch, owner.writer_pid, owner.state, owner.collect_by) == (
        9, 0x1234, 4242, ring.SlotState.PUBLISHED, 0xFFFFFFF0)
    assert ring.decode_command(buf, GEOMETRY, 9, 0x1234).payload == b"X 52:34:56:00:12:22"


@pytest.mark.parametrize("now, collect_by, expired", [
    (1000, 2000, False), (2000, 2000, True), (2001, 2000, True),
    (0xFFFFFF00, 0x10, False),      # the promise lies past the wrap of the 32-bit clock
    (0x20, 0xFFFFFF00, True),       # ... and has passed after it
    (5, ring.NO_PROMISE, False),    # no promise: never expires (only a dead writer frees the slot)
])
def test_a_promise_expires_on_the_wrapping_millisecond_clock(now, collect_by, expired):
    owner = ring.SlotOwner(1, 1, 99, ring.SlotState.PUBLISHED, collect_by)
    assert owner.promise_expired(now) is expired


def test_the_clock_never_reads_as_no_promise():
    assert ring.clock_ms() != ring.NO_PROMISE and ring.clock_ms_after(0) != ring.NO_PROMISE
    assert ring.clock_ms_before(ring.clock_ms(), ring.clock_ms_after(1000))


def test_a_promise_never_falls_before_its_deadline_and_is_bounded():
    before = ring.clock_ms()
    promise = ring.clock_ms_after(5000)
    assert (promise - before) % (1 << 32) >= 5000  # rounded up: the whole 5 s and then some
    assert (ring.clock_ms_after(float("inf")) - ring.clock_ms()) % (1 << 32) <= ring.MAX_PROMISE_MS + 2
    assert ring.clock_ms_after(-5) != ring.NO_PROMISE
