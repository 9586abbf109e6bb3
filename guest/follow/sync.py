"""The follower's arithmetic, without I/O: which filters a followed list stands for, which
of the host's filters are the follower's, what to send to make the host's equal to the
list, in which frames, and what each answer means for the element it was about.

An element is an address or network; dropped as a packet's source it is the filter
``A <mac> I 4 s <network>``, as its destination ``A <mac> I 8 d <network>``.  The follower
owns every filter of exactly that shape for its middlebox (IP layer, one address field and
nothing else): those it adds and deletes until the host holds the followed list.  A filter
of that shape put there by hand is treated as the follower's (and deleted if the list does
not hold it); every other filter (other layers, other fields, several fields) is never
touched.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from .. import fields as kinds
from ..answers import Answer, fits
from ..grammar import FRAME_MARK, MAX_TEXT_BYTES
from ..ring import Geometry
from .source import DESTINATION, SOURCE

Entry = tuple[str, str]  # (SOURCE or DESTINATION, canonical network): one filter the follower owns

_SHAPE_BY_FIELD = {SOURCE: ("4", "s"), DESTINATION: ("8", "d")}
_FIELD_BY_SHAPE = {shape: field for field, shape in _SHAPE_BY_FIELD.items()}
_TOTAL = re.compile(r"([0-9]+) filter\(s\)")
_OMITTED_NOTE = re.compile(r"\(\+[0-9]+ line\(s\) not shown\)")


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
PLAIN_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")  # a dotted quad already as the grammar spells it


def canonical_network(text: str) -> str:
    """The grammar's spelling of an address or network (``10.0.0.1/32`` is ``10.0.0.1``):
    the host answers in it, so an element spelled otherwise would never match its filter
    and be deleted and added again at every re-sync.  InvalidValueError if it is neither.
    A plain IPv4 address, what most blocklists hold, is its own spelling: recognised
    without parsing (a 10,000-element first sync spent 0.12 s parsing)."""
    if PLAIN_IPV4.fullmatch(text):
        return text
    return kinds.IP_ENDPOINT.parse(text)


def filter_text(mac: str, field: str, network: str) -> str:
    """The add command of the filter dropping packets whose ``field`` is in ``network``."""
    mask, letter = _SHAPE_BY_FIELD[field]
    return f"A {mac} I {mask} {letter} {network}"


def delete_text(mac: str, field: str, network: str) -> str:
    return "D" + filter_text(mac, field, network)[1:]


def owned_entry(line: str, mac: str) -> Entry | None:
    """The (field, network) of a line of the host's answer to ``I <mac>`` if the filter has
    the follower's shape, else None (the host writes canonical text, one filter a line)."""
    tokens = line.split(" ")
    if len(tokens) != 6 or tokens[0] != "A" or tokens[1] != mac or tokens[2] != "I":
        return None
    field = _FIELD_BY_SHAPE.get((tokens[3], tokens[4]))
    return None if field is None else (field, tokens[5])


def entries(fields: Iterable[str], networks: Iterable[str]) -> set[Entry]:
    """The filters one list stands for: each network in each field its drop rule matches."""
    networks = tuple(networks)
    return {(field, network) for field in fields for network in networks}


def plan(desired: set[Entry], on_host: set[Entry]) -> tuple[list[Entry], list[Entry]]:
    """(adds, deletes) that make ``on_host`` equal to ``desired``, each sorted so a plan
    is the same however the sets were built."""
    return sorted(desired - on_host), sorted(on_host - desired)


class Step(NamedTuple):
    """One command of a frame: the add or delete of one entry."""

    adding: bool
    entry: Entry

    def text(self, mac: str) -> str:
        return (filter_text if self.adding else delete_text)(mac, *self.entry)


class Frame(NamedTuple):
    """The text written into one command slot and the steps it holds, in order (the
    host answers with one record per step, in the same order)."""

    text: str
    steps: tuple[Step, ...]


def commands_per_frame(answer_limit: int) -> int:
    """The most commands a frame may hold so that every one's record fits an answer slot
    of ``answer_limit`` bytes (the host refuses a larger frame whole)."""
    count = 1
    while fits(count + 1, answer_limit):
        count += 1
    return count


def frame_limits(geometry: Geometry) -> tuple[int, int]:
    """(commands, bytes) a frame may hold on a ring of this geometry."""
    return commands_per_frame(geometry.max_response_length), min(geometry.max_command_length, MAX_TEXT_BYTES)


def frames(mac: str, adds: Iterable[Entry], deletes: Iterable[Entry], max_commands: int,
           max_bytes: int) -> list[Frame]:
    """The commands in as few frames as fit ``max_commands`` and ``max_bytes``: adds
    first, then deletes, so a network replaced by a wider or narrower one is never
    uncovered while the list changes."""
    steps = [Step(True, entry) for entry in adds] + [Step(False, entry) for entry in deletes]
    made: list[Frame] = []
    texts: list[str] = []
    held: list[Step] = []
    size = 0
    for step in steps:
        framed = f"{FRAME_MARK}{step.text(mac)}{FRAME_MARK}"
        if held and (len(held) == max_commands or size + len(framed) > max_bytes):
            made.append(Frame("".join(texts), tuple(held)))
            texts, held, size = [], [], 0
        texts.append(framed)
        held.append(step)
        size += len(framed)
    if held:
        made.append(Frame("".join(texts), tuple(held)))
    return made


class Page(NamedTuple):
    """One answer to a paged query: how many filters the layer has in all, and the
    filter lines this answer holds (from the skip on, as many as fitted)."""

    total: int
    lines: tuple[str, ...]


def read_page(record: Answer) -> Page:
    """The page a query's record holds (docs/protocol.md §6: ``N filter(s)``, the lines,
    perhaps a note of how many did not fit).  ValueError for a record of another shape."""
    total = _TOTAL.fullmatch(record.message)
    if record.ok and _OMITTED_NOTE.fullmatch(record.message):
        raise ValueError("the answer slot is too small to hold the count of a query's filters")
    if not record.ok or total is None:
        raise ValueError(f"not a query's result: {record.status} {record.code} {record.message}")
    return Page(int(total[1]), tuple(line for line in record.lines[1:] if not _OMITTED_NOTE.fullmatch(line)))


# What an answer means for the step it answers.
DONE = "done"      # the host holds what the step asked for
RETRY = "retry"    # not applied for a passing reason (rate limit, no controller, a sibling refused): send again soon
FAILED = "failed"  # refused for a reason that stays (a limit, not registered): report, retry at the next re-sync

_PASSING = ("RATE_LIMITED", "UNAVAILABLE")


def passing(record: Answer) -> bool:
    """Whether a refusal will pass by itself: the command was not applied and may be sent
    again soon.  ``not-applied`` is the agent's record for the innocent commands of a
    frame in which another was refused."""
    return record.status in _PASSING or record.code == "not-applied"


def outcome(step: Step, record: Answer) -> str:
    """DONE, RETRY or FAILED.  A delete of a filter the host does not have is done: the
    host holds what the follower wanted."""
    if record.ok or (not step.adding and record.code == "no-such-filter"):
        return DONE
    return RETRY if passing(record) else FAILED


# The share of one core the periodic re-sync may cost on average.  Reading 10,000 filters
# back in ~100 pages costs the follower about 0.1 s of CPU (measured with `mbvisor bench
# follow`): every 60 s that alone would be 0.17 % of a core, over the idle target of 0.1 %.
RESYNC_CPU_SHARE = 0.0005
# A re-sync's CPU per filter read, for spacing the first re-sync after a first sync that
# read an empty or smaller host (measured: 0.13 s for 10,000 filters on a 2-core machine).
RESYNC_CPU_PER_FILTER = 10e-6


def next_resync_after(resync_every: float, cpu_seconds: float, share: float = RESYNC_CPU_SHARE) -> float:
    """Seconds until the next re-sync: ``resync_every``, or longer for a list whose re-sync
    cost ``cpu_seconds`` of CPU, so that re-syncing costs at most ``share`` of a core (a
    list of a few hundred filters is re-read every ``resync_every``; one of 10,000 every
    few minutes)."""
    return max(resync_every, cpu_seconds / share)
