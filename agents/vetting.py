"""What the agent decides on its own, before the controller sees anything.

A frame from a guest is parsed with the shared grammar and every command must name one
of the VM's own MACs (the identity OVS records for it, not what the guest claims).  A
frame with any invalid or foreign command is answered at once and nothing of it is
forwarded: the guest learns exactly which command was wrong and nothing half-happens.
Pure functions; ``agent`` does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbvisor.guest.errors import CommandError
from mbvisor.guest.grammar import format_command, parse_command, split_frame
from mbvisor.guest.ring import Status


@dataclass(frozen=True)
class Verdict:
    """Either commands to forward (canonical text) or an answer to give right away."""

    forward: tuple[str, ...] = ()
    status: Status = Status.OK
    text: str = ""


def vet(payload: bytes, macs: tuple[str, ...]) -> Verdict:
    try:
        parts = split_frame(payload)
    except CommandError as error:
        return Verdict(status=Status.SYNTAX, text=f"error {error}")
    lines, forward, worst = [], [], None
    for column, text in parts:
        try:
            command = parse_command(text, column)
        except CommandError as error:
            lines.append(f"error {error}")
            worst = worst or Status.SYNTAX
            continue
        canonical = format_command(command)
        if command.mac not in macs:
            lines.append(f"refused {canonical}: {command.mac} is not this VM's MAC ({', '.join(macs) or 'none known'})")
            worst = worst or Status.REFUSED
            continue
        lines.append(f"ok {canonical}")
        forward.append(canonical)
    if worst is not None:
        return Verdict(status=worst, text="\n".join(lines + ["nothing was applied"]))
    return Verdict(forward=tuple(forward))


def combine(answers: list[dict]) -> tuple[Status, str]:
    """One channel answer for a frame's controller answers: the first error's status, or OK;
    the text has one line (or block) per command."""
    status = Status.OK
    for answer in answers:
        if answer["status"] != "OK":
            status = Status.__members__.get(answer["status"], Status.INTERNAL)
            break
    return status, "\n".join(answer["text"] for answer in answers)
