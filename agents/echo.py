"""A stand-in for the agent: validates each command with the shared grammar and answers.

Until the agent forwards commands to the controller, this responder lets the guest ABI
be exercised end to end with the real ``ChannelReader``: every command in a frame is
parsed on the host side too (the guest is not trusted), and the answer lists, line by
line, the canonical form of each accepted command or the error of each rejected one.
Nothing is offloaded; queries say so.
"""

from __future__ import annotations

from mbvisor.guest import ring
from mbvisor.guest.commands import Query
from mbvisor.guest.errors import CommandError
from mbvisor.guest.grammar import format_command, parse_command, split_frame
from mbvisor.guest.reader import Incoming


def answer_frame(incoming: Incoming) -> tuple[ring.Status, str]:
    """(status, text) for a frame: OK when every command is valid, else SYNTAX."""
    try:
        parts = split_frame(incoming.payload)
    except CommandError as error:
        return ring.Status.SYNTAX, f"error {error}"
    lines, status = [], ring.Status.OK
    for column, text in parts:
        try:
            command = parse_command(text, column)
        except CommandError as error:
            lines.append(f"error {error}")
            status = ring.Status.SYNTAX
            continue
        if isinstance(command, Query):
            lines.append(f"ok {format_command(command)}: no filters (echo responder keeps no state)")
        else:
            lines.append(f"ok {format_command(command)}")
    return status, "\n".join(lines)
