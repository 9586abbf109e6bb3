"""A stand-in for the agent: validates each command with the shared grammar and answers.

Until the agent forwards commands to the controller, this responder lets the guest ABI
be exercised end to end with the real ``ChannelReader``: every command in a frame is
parsed on the host side too (the guest is not trusted), and the answer has one record per
command (guest/answers.py): the canonical form of each accepted command, or the error of
each rejected one, as the agent words it.
Nothing is offloaded: every query answers ``0 filter(s)``.
"""

from __future__ import annotations

from mbvisor.guest import ring
from mbvisor.guest.answers import Answer, answer, fits
from mbvisor.guest.reader import Incoming

from .vetting import is_query, query_result, too_many, vet


def answer_frame(incoming: Incoming) -> tuple[ring.Status, list[Answer]]:
    """(status, one answer per command): OK when every command is valid, else SYNTAX and
    nothing applied, worded as the agent words them."""
    verdict = vet(incoming.payload, None)
    count = len(verdict.forward) or len(verdict.answers)
    if not fits(count, incoming.answer_limit):
        return ring.Status.REFUSED, [too_many(count, incoming.answer_limit)]
    if verdict.answers:
        return verdict.status, list(verdict.answers)
    return ring.Status.OK, [query_result([]) if is_query(text) else answer("OK", "ok", text)
                            for text in verdict.forward]
