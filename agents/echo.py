"""A stand-in for the agent: validates each command with the shared grammar and answers.

Until the agent forwards commands to the controller, this responder lets the guest ABI
be exercised end to end with the real ``ChannelReader``: every command in a frame is
parsed on the host side too (the guest is not trusted), and the answer has one record per
command (guest/answers.py): the canonical form of each accepted command, or the error of
each rejected one, as the agent words it.
Nothing is offloaded; queries say so.
"""

from __future__ import annotations

from mbvisor.guest import ring
from mbvisor.guest.answers import Answer, answer
from mbvisor.guest.commands import Query
from mbvisor.guest.grammar import parse_command
from mbvisor.guest.reader import Incoming

from .vetting import vet


def answer_frame(incoming: Incoming) -> tuple[ring.Status, list[Answer]]:
    """(status, one answer per command): OK when every command is valid, else SYNTAX and
    nothing applied, worded as the agent words them."""
    verdict = vet(incoming.payload, None)
    if verdict.answers:
        return verdict.status, list(verdict.answers)
    return ring.Status.OK, [answer("OK", "ok", f"{text}: no filters (echo responder keeps no state)"
                                   if isinstance(parse_command(text), Query) else text) for text in verdict.forward]
