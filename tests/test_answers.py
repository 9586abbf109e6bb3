"""The answer list of a response slot (guest/answers.py): one record per command, and
whatever the slot's size, every status and code fits and nothing is cut silently."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.guest import answers as A

STATUSES = st.sampled_from(["OK", "SYNTAX", "REFUSED", "REJECTED", "RATE_LIMITED", "UNAVAILABLE", "INTERNAL"])
CODES = st.from_regex(r"[a-z0-9][a-z0-9-]{0,23}", fullmatch=True)
LINE = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=60).map(str.strip).filter(bool)
ANSWERS = st.lists(st.builds(A.Answer, STATUSES, CODES, st.lists(LINE, max_size=5).map(tuple), st.booleans()),
                   min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(ANSWERS)
def test_a_list_that_fits_reads_back_exactly(answers):
    assert A.parse(A.render(answers, 1 << 20)) == answers


@settings(max_examples=300, deadline=None)
@given(ANSWERS, st.integers(0, 4096))
def test_whatever_the_slot_every_status_and_code_fits_or_nothing_is_applied(answers, limit):
    if not A.fits(len(answers), limit):
        return  # the host refuses such a frame before applying it
    if len(answers) == 1 and len(f"{answers[0].status} {answers[0].code}".encode()) > limit:
        with pytest.raises(ValueError):  # a slot too small for one record (reader.answer_with cuts it)
            A.render(answers, limit)
        return
    text = A.render(answers, limit)
    assert len(text.encode()) <= limit
    read = A.parse(text)
    assert [(a.status, a.code) for a in read] == [(a.status, a.code) for a in answers]
    for got, sent in zip(read, answers):
        if got.lines == sent.lines:
            continue
        kept = got.lines if sent.ok else got.lines[1:]
        if not sent.ok and got.lines:  # a failure's message: whole, clipped with "...", or left out
            assert got.lines[0] == sent.lines[0] or got.lines[0].endswith("...")
        if (len(sent.lines) > 1 or sent.result and sent.ok) and kept:  # a result cut short says what is missing
            assert kept[-1].startswith("(+") and kept[-1].endswith("line(s) not shown)"), got
            assert list(kept[:-1]) == list((sent.lines if sent.ok else sent.lines[1:])[:len(kept) - 1])
        if sent.ok and len(sent.lines) == 1 and not sent.result:  # the echo of a command: all or nothing
            assert got.lines == ()


def test_failures_keep_their_message_before_successes_keep_their_echo():
    answers = [A.answer("OK", "ok", "A 52:34:56:00:12:22 I 4 s 10.0.0.1")] * 3 + [
        A.answer("REJECTED", "limit", "52:34:56:00:12:22 has 1000 filters, the limit is 1000")]
    text = A.render(answers, 90)
    assert text.splitlines() == ["OK ok", "OK ok", "OK ok",
                                 "REJECTED limit 52:34:56:00:12:22 has 1000 filters, the limit is 1000"]


def test_texts_become_clean_lines_and_codes_tokens():
    made = A.answer("SYNTAX", "Bad Code!", "column 3: unexpected 'x'\x07\n\nsecond line\n")
    assert made == A.Answer("SYNTAX", "bad-code", ("column 3: unexpected 'x'", "", "second line"))
    assert A.parse(A.render([made], 200)) == [made]


@pytest.mark.parametrize("text", ["ok lower case", "OK Not-A-Code", "  an indented first line"])
def test_anything_else_is_not_an_answer_list(text):
    with pytest.raises(A.AnswerFormatError):
        A.parse(text)


def test_a_one_line_query_result_is_never_dropped_without_a_note():
    """A query with one filter is a one-line record, but a result: when the slot is full
    of failures' messages it says what it left out, unlike the echo of a command."""
    refusals = [A.answer("REJECTED", "limit", "x" * 60)] * 3
    query = A.answer("OK", "ok", "1 filter(s)\nI 4 s 10.0.0.0/8", result=True)
    for limit in range(60, 260):
        text = A.render(refusals + [query], limit)
        last = A.parse(text)[-1]
        assert last.lines in ((), ("1 filter(s)", "I 4 s 10.0.0.0/8")) or "not shown" in last.lines[-1], (limit, text)
