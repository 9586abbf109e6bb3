"""What the agent decides on its own, before the controller sees anything.

A frame from a guest is parsed with the shared grammar and every command must name one
of the VM's own MACs (the identity OVS records for it, not what the guest claims).  A
frame with any invalid or foreign command is answered at once and nothing of it is
forwarded: the guest learns exactly which command was wrong and nothing half-happens.
Pure functions; ``agent`` does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbvisor.guest.answers import Answer, answer
from mbvisor.guest.errors import CommandError
from mbvisor.guest.grammar import format_command, parse_command, split_frame
from mbvisor.guest.ring import Status


@dataclass(frozen=True)
class Verdict:
    """Either commands to forward (canonical text) or the answers to give right away
    (one per command of the frame, or one for a frame that could not be split)."""

    forward: tuple[str, ...] = ()
    status: Status = Status.OK
    answers: tuple[Answer, ...] = ()


def vet(payload: bytes, macs: tuple[str, ...] | None) -> Verdict:
    """``macs``: the VM's own; None checks the grammar only (the echo responder)."""
    try:
        parts = split_frame(payload)
    except CommandError as error:
        return Verdict(status=Status.SYNTAX, answers=(answer("SYNTAX", "syntax", str(error)),))
    verdicts, forward, worst = [], [], None
    for index, (column, text) in enumerate(parts):
        try:
            command = parse_command(text, column)
        except CommandError as error:
            verdicts.append(answer("SYNTAX", "syntax", str(error)))
            worst = worst or Status.SYNTAX
            continue
        canonical = format_command(command)
        if macs is not None and command.mac not in macs:
            verdicts.append(answer("REFUSED", "foreign-mac",
                                   f"{command.mac} is not this VM's MAC ({', '.join(macs) or 'none known'})"))
            worst = worst or Status.REFUSED
            continue
        verdicts.append(None)
        forward.append(canonical)
    if worst is None:
        return Verdict(forward=tuple(forward))
    spare = answer(worst.name, "not-applied", "another command of the frame was refused; nothing was applied")
    return Verdict(status=worst, answers=tuple(spare if v is None else v for v in verdicts))


def too_many(count: int, limit: int) -> Answer:
    """The one record for a frame whose commands' records might not fit the answer slot."""
    return answer("REFUSED", "too-many-commands", f"a frame of {count} commands: their answers might not fit this "
                                                  f"ring's {limit}-byte answer slots; split it; nothing was applied")


def frame_wide(status: Status, code: str, text: str, count: int) -> list[Answer]:
    """The same outcome for each of a frame's ``count`` commands (rate limit, no
    controller, ...): one record per command, as the guest expects."""
    return [answer(status.name, code, text)] * max(1, count)


def combine(answers: list[dict], commands: list[str] | None = None) -> tuple[Status, list[Answer]]:
    """The controller's answers to a frame's ``commands`` as the channel's: the first
    error's status (else OK), and one record per command with the controller's code and
    text; a query's answer as a result: ``N filter(s)``, then one line per filter."""
    status = Status.OK
    for reply in answers:
        if reply["status"] != "OK":
            status = Status.__members__.get(reply["status"], Status.INTERNAL)
            break
    commands = commands or [""] * len(answers)
    return status, [_record(reply, text) for reply, text in zip(answers, commands)]


def _record(reply: dict, command: str) -> Answer:
    status = reply["status"] if reply["status"] in Status.__members__ else "INTERNAL"
    code = reply.get("code") or reply["status"].lower()
    if status == "OK" and is_query(command):
        if is_paged_query(command):  # the controller counted them all and left out the first skip
            return answer("OK", "ok", reply["text"], result=True)
        return query_result(reply["text"].splitlines() if reply["text"] != NO_FILTERS else [])
    return answer(status, code, reply["text"])


def is_query(canonical: str) -> bool:
    """Whether a command the vetting let through (canonical text) is a query: I, M and T
    are the grammar's query letters and no other command starts with them (no second
    parse per answer)."""
    return canonical[:2] in ("I ", "M ", "T ")


def is_paged_query(canonical: str) -> bool:
    """Whether a query's canonical text carries a skip count (``I <mac> <skip>``; a skip
    of 0 is written as no skip), whose answer the controller already words as a record."""
    return canonical.count(" ") == 2


NO_FILTERS = "no filters"  # the controller's answer to a query of a layer without filters


def query_result(filters: list[str]) -> Answer:
    """A query's record: how many filters, then each (a result: cut only with a note)."""
    return answer("OK", "ok", "\n".join([f"{len(filters)} filter(s)", *filters]), result=True)
