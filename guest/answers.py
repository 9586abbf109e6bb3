"""One answer per command: the text of a response slot (docs/protocol.md §6).

A frame of several commands gets one response slot, so its text is a list of records, one
per command and in the frame's order (a frame that could not be split into commands gets
one record).  A record is one line ``STATUS code[ message]``, then any further lines of
its detail (a query's result, one item per line), each indented by two spaces:

    OK ok R F 52:34:56:00:12:22 10.0.0.5
    REJECTED limit 52:34:56:00:12:22 has 1000 filters, the limit is 1000
    OK ok 2 filter(s)
      I 4 s 10.0.0.0/8
      I 1 p tcp

The status and code of every record always fit: the host fits the details into the slot
(dropping what the guest already knows first: the echo of a command that succeeded) and
says how many lines it left out; a frame whose bare records could not fit is refused
before anything of it is applied.  Standard library only (it runs in the guest too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

INDENT = "  "
OMITTED = "(+{} line(s) not shown)"
_CODE = re.compile(r"[a-z0-9][a-z0-9-]*")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


class AnswerFormatError(ValueError):
    """A response text that is not a list of records."""


@dataclass(frozen=True)
class Answer:
    """``status``: a ``ring.Status`` name; ``code``: a stable lower-case token of at most
    MAX_CODE characters (the controller's error codes, ``ok``, ``syntax``, ...); ``lines``:
    the message, then any result lines."""

    status: str
    code: str
    lines: tuple[str, ...] = ()
    result: bool = field(default=False, compare=False)  # a query's result: never dropped silently

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def message(self) -> str:
        return self.lines[0] if self.lines else ""


def answer(status: str, code: str, text: str = "", result: bool = False) -> Answer:
    """An answer from a text that may span lines (a query's result) or hold control
    characters (an error quoting the guest): one clean line per line of text."""
    if not _CODE.fullmatch(code):
        code = "-" if not code else re.sub(r"[^a-z0-9-]", "-", code.lower()).strip("-") or "-"
    code = code[:MAX_CODE]
    lines = tuple(_UNPRINTABLE.sub(" ", line).strip() for line in text.splitlines())
    while lines and not lines[-1]:
        lines = lines[:-1]
    while lines and not lines[0]:  # a record's first line is its message: never empty
        lines = lines[1:]
    return Answer(status, code, lines, result)


MAX_CODE = 24
MAX_HEAD = len("RATE_LIMITED ") + MAX_CODE  # the longest status name and the longest code


def fits(count: int, limit: int) -> bool:
    """Whether the status and code of ``count`` records surely fit ``limit`` bytes: what
    the host checks before it applies a frame (a 4 KiB slot: 106 commands).  One command
    is always taken: its one record is all a frame can get (clipped to the slot if need be)."""
    return count <= 1 or count * (MAX_HEAD + 1) <= limit + 1


def render(answers: list[Answer], limit: int) -> str:
    """The records in at most ``limit`` UTF-8 bytes: every status and code; then the
    failures' messages in order while they fit (a frame-wide failure's first record says
    it all); then the other lines (a query's result, the echo of a successful command) in
    order while they fit, with a line saying how many of a result's lines were left out.
    ValueError if the bare records do not fit."""
    parts = [[f"{a.status} {a.code}"] for a in answers]
    budget = limit - sum(len(p[0].encode()) for p in parts) - max(0, len(parts) - 1)
    if budget < 0:
        raise ValueError(f"{len(answers)} answers need more than the slot's {limit} bytes")
    for i, a in enumerate(answers):  # failures' messages, in order, while they fit (the last one clipped)
        if not a.ok and a.lines:
            message = _clip(" " + a.lines[0], budget)
            if message:
                parts[i].append(message)
                budget -= len(message.encode())
    # The rest of a list the guest cannot know (a failure's further lines only under its message)
    results = [i for i, a in enumerate(answers) if (a.result or len(a.lines) > 1) and (a.ok or len(parts[i]) > 1)]
    is_result = set(results)
    echoes = [i for i, a in enumerate(answers) if a.ok and len(a.lines) == 1 and i not in is_result]
    for i in results + echoes:  # a list the guest cannot know before the echo of what it sent
        a = answers[i]
        lines = a.lines if a.ok else a.lines[1:]
        texts = [" " + line if a.ok and k == 0 else "\n" + INDENT + line for k, line in enumerate(lines)]
        whole = sum(len(text.encode()) for text in texts)
        if whole <= budget:
            parts[i] += texts
            budget -= whole
            continue
        kept = 0
        for k, text in enumerate(texts):
            reserve = _note_size(len(texts) - k - 1) if i in is_result else 0
            if len(text.encode()) + reserve > budget:
                break
            parts[i].append(text)
            budget -= len(text.encode())
            kept += 1
        if i in is_result:  # room for the note, giving back kept lines if need be; else no lines at all
            while True:
                note = (" " if a.ok and kept == 0 else "\n" + INDENT) + OMITTED.format(len(texts) - kept)
                if len(note.encode()) <= budget or kept == 0:
                    break
                budget += len(parts[i].pop().encode())
                kept -= 1
            if len(note.encode()) <= budget:
                parts[i].append(note)
                budget -= len(note.encode())
    return "\n".join("".join(p) for p in parts)


def _note_size(pending: int) -> int:
    return len(("\n" + INDENT + OMITTED.format(pending)).encode()) if pending else 0


def _clip(text: str, size: int) -> str:
    """``text`` in ``size`` bytes, cut with "..." (nothing if fewer than 16 bytes are left:
    a few characters of a message say less than its code)."""
    data = text.encode()
    if len(data) <= size:
        return text
    if size < 16:
        return ""
    return data[:size - 3].decode("utf-8", "ignore") + "..."


def parse(text: str) -> list[Answer]:
    """The records of a response text (the inverse of ``render``, up to what it left out)."""
    answers: list[Answer] = []
    for line in text.split("\n"):
        if line.startswith(INDENT) and answers:
            last = answers[-1]
            answers[-1] = Answer(last.status, last.code, last.lines + (line[len(INDENT):],))
            continue
        status, _, rest = line.partition(" ")
        code, _, message = rest.partition(" ")
        if not (status.isupper() and (_CODE.fullmatch(code) or code == "-")):
            raise AnswerFormatError(f"not an answer record: {line[:80]!r}")
        answers.append(Answer(status, code, (message,) if message else ()))
    return answers
