"""Byte layout of the mbvisor channel: a versioned ring in a shared-memory region.

Pure encode/decode functions only; opening regions, writing and reading live in
``region``, ``writer`` and ``reader``.  Every offset and rule here is specified in
``docs/protocol.md`` so that a middlebox vendor can implement the guest side in C;
keep the two in step.

Why a ring and not the report's ``@...@`` string in a flat region: a flat region
loses a command that is overwritten before the host polls it and cannot tell the
guest what happened.  Here every command has a sequence number and CRC, every
command gets an answer, and the host's consume counter lives in the region so a
restarted host resumes without replaying answered commands.
"""

from __future__ import annotations

import enum
import struct
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple

MAGIC = b"MBVR"
VERSION = 1
HEADER_SIZE = 256
SLOT_HEADER_SIZE = 32
DEFAULT_COMMAND_SLOT_SIZE = 4096  # a 64-backend IPv6 pool fits in one command
DEFAULT_RESPONSE_SLOT_SIZE = 4096
MIN_SLOT_COUNT = 4
MAX_SLOT_COUNT = 1024
MAX_SLOT_SIZE = 65536
LARGEST_RING = HEADER_SIZE + MAX_SLOT_COUNT * 2 * MAX_SLOT_SIZE  # header + the most slots of the largest size

# Header: magic, version, header_size, slot_count, command_slot_size,
# response_slot_size, guest_epoch, publish, consume, host_epoch.
_HEADER = struct.Struct("<4sHHIIIIQQI")
OFFSET_GUEST_EPOCH = 20
OFFSET_PUBLISH = 24
OFFSET_CONSUME = 32
OFFSET_HOST_EPOCH = 40

# Command slot: seq, epoch, length, crc32, writer_pid, state, collect_by.
_COMMAND = struct.Struct("<QIIIIII")
OFFSET_SLOT_STATE = 24
NO_PROMISE = 0  # collect_by: the writer named no time by which it collects its answer
# Response slot: seq, epoch, length, crc32, status, flags.
_RESPONSE = struct.Struct("<QIIIHH")

FLAG_TRUNCATED = 0x0001


class SlotState(enum.IntEnum):
    """Guest-owned life cycle of a command slot (outside the CRC: it changes after publish)."""

    FREE = 0
    PUBLISHED = 1
    COLLECTED = 2
    ABANDONED = 3


class Status(enum.IntEnum):
    """Status codes the host writes into a response slot."""

    OK = 0
    SYNTAX = 1
    CORRUPT = 2
    REFUSED = 3
    REJECTED = 4
    RATE_LIMITED = 5
    UNAVAILABLE = 6
    INTERNAL = 7

    @property
    def ok(self) -> bool:
        return self is Status.OK


class LayoutError(ValueError):
    """The region's header does not describe a usable ring."""


@dataclass(frozen=True)
class Geometry:
    """Slot count and sizes; everything else about the layout derives from them."""

    slot_count: int
    command_slot_size: int = DEFAULT_COMMAND_SLOT_SIZE
    response_slot_size: int = DEFAULT_RESPONSE_SLOT_SIZE

    @property
    def region_size(self) -> int:
        return HEADER_SIZE + self.slot_count * (self.command_slot_size + self.response_slot_size)

    @property
    def max_command_length(self) -> int:
        return self.command_slot_size - SLOT_HEADER_SIZE

    @property
    def max_response_length(self) -> int:
        return self.response_slot_size - SLOT_HEADER_SIZE

    def command_offset(self, seq: int) -> int:
        return HEADER_SIZE + (seq % self.slot_count) * self.command_slot_size

    def response_offset(self, seq: int) -> int:
        return (
            HEADER_SIZE
            + self.slot_count * self.command_slot_size
            + (seq % self.slot_count) * self.response_slot_size
        )

    def problem(self, region_size: int) -> str | None:
        """Why this geometry cannot be used in a region of ``region_size`` bytes, or None."""
        count = self.slot_count
        if count < MIN_SLOT_COUNT or count > MAX_SLOT_COUNT or count & (count - 1):
            return f"slot count {count} is not a power of two in {MIN_SLOT_COUNT}..{MAX_SLOT_COUNT}"
        for name, size in (("command", self.command_slot_size), ("response", self.response_slot_size)):
            if size < 2 * SLOT_HEADER_SIZE or size > MAX_SLOT_SIZE or size % 64:
                return f"{name} slot size {size} is not a multiple of 64 in 64..{MAX_SLOT_SIZE}"
        if self.region_size > region_size:
            return f"ring needs {self.region_size} bytes but the region has {region_size}"
        return None


def geometry_for(region_size: int) -> Geometry:
    """The default geometry for a region: as many default-sized slots as fit (power of two)."""
    per_slot = DEFAULT_COMMAND_SLOT_SIZE + DEFAULT_RESPONSE_SLOT_SIZE
    fitting = max(0, region_size - HEADER_SIZE) // per_slot
    if fitting < MIN_SLOT_COUNT:
        needed = Geometry(MIN_SLOT_COUNT).region_size
        raise LayoutError(f"region of {region_size} bytes is too small; the ring needs at least {needed}")
    count = min(MAX_SLOT_COUNT, 1 << (fitting.bit_length() - 1))
    return Geometry(count)


@dataclass(frozen=True)
class Header:
    """The region header as read; ``problem()`` says whether it can be trusted."""

    magic: bytes
    version: int
    header_size: int
    geometry: Geometry
    guest_epoch: int
    publish: int
    consume: int
    host_epoch: int

    @property
    def blank(self) -> bool:
        """A region nobody has initialised yet (QEMU and shm_open hand out zeroes)."""
        return self.magic == b"\0\0\0\0"

    @property
    def host_consume(self) -> int:
        """The consume counter, if it belongs to the current guest epoch (else nothing consumed)."""
        return self.consume if self.host_epoch == self.guest_epoch else 0

    def problem(self, region_size: int) -> str | None:
        if self.magic != MAGIC:
            return f"bad magic {self.magic!r}; expected {MAGIC!r} (not an mbvisor channel)"
        if self.version != VERSION:
            return f"protocol version {self.version}; this side speaks version {VERSION}"
        if self.header_size != HEADER_SIZE:
            return f"header size {self.header_size}; expected {HEADER_SIZE}"
        if self.guest_epoch == 0:
            return "guest epoch is 0 (region not initialised)"
        return self.geometry.problem(region_size)


def read_header(buf) -> Header:
    (magic, version, header_size, count, cmd_size, resp_size,
     guest_epoch, publish, consume, host_epoch) = _HEADER.unpack_from(buf, 0)
    return Header(magic, version, header_size, Geometry(count, cmd_size, resp_size),
                  guest_epoch, publish, consume, host_epoch)


def initialise(buf, region_size: int, geometry: Geometry, epoch: int) -> None:
    """Format a region: invalidate the magic first and write it last, so a reader never
    sees a valid header over half-cleared slots."""
    problem = geometry.problem(region_size)
    if problem:
        raise LayoutError(problem)
    if not 0 < epoch < 2**32:
        raise LayoutError(f"epoch {epoch} must be in 1..2^32-1")
    buf[0:4] = b"\0\0\0\0"
    buf[4:geometry.region_size] = bytes(geometry.region_size - 4)
    _HEADER.pack_into(buf, 0, b"\0\0\0\0", VERSION, HEADER_SIZE, geometry.slot_count,
                      geometry.command_slot_size, geometry.response_slot_size, epoch, 0, 0, 0)
    buf[0:4] = MAGIC


def write_u64(buf, offset: int, value: int) -> None:
    struct.pack_into("<Q", buf, offset, value)


def write_u32(buf, offset: int, value: int) -> None:
    struct.pack_into("<I", buf, offset, value)


def read_u32(buf, offset: int) -> int:
    return struct.unpack_from("<I", buf, offset)[0]


def _crc(fixed: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(fixed))


@dataclass(frozen=True)
class CommandSlot:
    seq: int
    epoch: int
    payload: bytes
    writer_pid: int
    state: int


def encode_command(buf, geometry: Geometry, seq: int, epoch: int, payload: bytes, writer_pid: int,
                   collect_by: int = NO_PROMISE) -> None:
    """Write a command slot: payload first, then the fields and CRC that make it valid.
    ``collect_by`` (``clock_ms()`` units): when the writer will have read or abandoned
    the answer; later, another writer may reuse the answered slot."""
    if len(payload) > geometry.max_command_length:
        raise LayoutError(f"command of {len(payload)} bytes exceeds the slot's {geometry.max_command_length}")
    offset = geometry.command_offset(seq)
    start = offset + SLOT_HEADER_SIZE
    buf[start:start + len(payload)] = payload
    fixed = struct.pack("<QII", seq, epoch, len(payload))
    _COMMAND.pack_into(buf, offset, seq, epoch, len(payload), _crc(fixed, payload),
                       writer_pid, SlotState.PUBLISHED, collect_by)


def decode_command(buf, geometry: Geometry, seq: int, epoch: int) -> CommandSlot | str:
    """The command expected at ``seq``, or a description of why the slot is not it."""
    offset = geometry.command_offset(seq)
    got_seq, got_epoch, length, crc, pid, state, _ = _COMMAND.unpack_from(buf, offset)
    if got_seq != seq:
        return f"slot holds sequence {got_seq}, expected {seq}"
    if got_epoch != epoch:
        return f"slot belongs to epoch {got_epoch:#x}, expected {epoch:#x}"
    if length > geometry.max_command_length:
        return f"length {length} exceeds the slot's {geometry.max_command_length} bytes"
    start = offset + SLOT_HEADER_SIZE
    payload = bytes(buf[start:start + length])
    if crc != _crc(struct.pack("<QII", seq, epoch, length), payload):
        return "CRC mismatch (torn or corrupted slot)"
    return CommandSlot(seq, epoch, payload, pid, state)


class SlotOwner(NamedTuple):
    """Who the command in a slot belongs to: what a writer needs to decide whether the
    slot's previous occupant is done with it.  (A tuple: read two or three times per
    command, where a frozen dataclass cost a writer ~10 % of its throughput.)"""

    seq: int
    epoch: int
    writer_pid: int
    state: int
    collect_by: int

    def promise_expired(self, now_ms: int) -> bool:
        """The writer's collect-by time has passed (never, for NO_PROMISE)."""
        return self.collect_by != NO_PROMISE and not clock_ms_before(now_ms, self.collect_by)


def read_command_owner(buf, geometry: Geometry, seq: int) -> SlotOwner:
    """The owner of the slot that ``seq`` maps to."""
    got_seq, epoch, _, _, pid, state, collect_by = _COMMAND.unpack_from(buf, geometry.command_offset(seq))
    return SlotOwner(got_seq, epoch, pid, state, collect_by)


def clock_ms() -> int:
    """CLOCK_MONOTONIC in milliseconds, modulo 2**32, never NO_PROMISE: the clock every
    process of one guest shares, in the unit of ``collect_by``."""
    return (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000) % (1 << 32) or 1


MAX_PROMISE_MS = 24 * 3600 * 1000  # far below the 32-bit clock's half-range (~24.8 days)


def clock_ms_after(milliseconds: float) -> int:
    """The clock ``milliseconds`` from now, rounded up (a promise never falls before the
    deadline it stands for), bounded to 1 ms..MAX_PROMISE_MS."""
    span = min(max(float(milliseconds), 1.0), MAX_PROMISE_MS)
    now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return (-(-(now_ns + int(span * 1_000_000)) // 1_000_000) + 1) % (1 << 32) or 1


def clock_ms_before(a: int, b: int) -> bool:
    """``a`` is earlier than ``b`` on the wrapping 32-bit clock (they are < 2**31 ms, about
    24 days, apart)."""
    return 0 < (b - a) % (1 << 32) < (1 << 31)


@dataclass(frozen=True)
class Response:
    seq: int
    epoch: int
    status: int
    text: str
    truncated: bool

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def status_name(self) -> str:
        try:
            return Status(self.status).name
        except ValueError:
            return f"STATUS_{self.status}"


def encode_response(buf, geometry: Geometry, seq: int, epoch: int, status: int, text: str) -> bool:
    """Write a response slot; text beyond the slot is cut and flagged.  Returns truncated."""
    data = text.encode("utf-8", "replace")
    truncated = len(data) > geometry.max_response_length
    if truncated:
        data = data[:geometry.max_response_length].decode("utf-8", "ignore").encode("utf-8")
    flags = FLAG_TRUNCATED if truncated else 0
    offset = geometry.response_offset(seq)
    start = offset + SLOT_HEADER_SIZE
    buf[start:start + len(data)] = data
    fixed = struct.pack("<QIIHH", seq, epoch, len(data), status, flags)
    _RESPONSE.pack_into(buf, offset, seq, epoch, len(data), _crc(fixed, data), status, flags)
    return truncated


def decode_response(buf, geometry: Geometry, seq: int, epoch: int) -> Response | None:
    """The host's answer to ``seq`` if the response slot holds a complete one, else None."""
    offset = geometry.response_offset(seq)
    got_seq, got_epoch, length, crc, status, flags = _RESPONSE.unpack_from(buf, offset)
    if got_seq != seq or got_epoch != epoch or length > geometry.max_response_length:
        return None
    start = offset + SLOT_HEADER_SIZE
    data = bytes(buf[start:start + length])
    if crc != _crc(struct.pack("<QIIHH", seq, epoch, length, status, flags), data):
        return None
    return Response(seq, epoch, status, data.decode("utf-8", "replace"), bool(flags & FLAG_TRUNCATED))


def describe(buf, region_size: int, recent: int = 5) -> dict:
    """What an operator wants to know about a region, without changing it: its state,
    counters and the last few answers (``mbctl -r``, ``mbvisor channel status``)."""
    header = read_header(buf)
    if header.blank:
        return {"state": "blank", "detail": "not initialised yet (the guest's first command does it)"}
    problem = header.problem(region_size)
    if problem:
        return {"state": "unusable", "detail": problem}
    consume = header.host_consume
    answers = []
    for seq in range(max(0, consume - recent), consume):
        response = decode_response(buf, header.geometry, seq, header.guest_epoch)
        if response is not None:
            answers.append({"seq": seq, "status": response.status_name, "text": response.text})
    return {
        "state": "ready",
        "epoch": f"{header.guest_epoch:#010x}",
        "slots": header.geometry.slot_count,
        "published": header.publish,
        "answered": consume,
        "pending": max(0, header.publish - consume),
        "host_attached": header.host_epoch == header.guest_epoch,
        "last_answers": answers,
    }


def format_description(state: dict) -> str:
    lines = [f"{key:14} {value}" for key, value in state.items() if key != "last_answers"]
    for answer in state.get("last_answers", []):
        text = answer["text"].replace("\n", "\n" + " " * 22)
        lines.append(f"  #{answer['seq']:<6} {answer['status']:12} {text}")
    return "\n".join(lines)
