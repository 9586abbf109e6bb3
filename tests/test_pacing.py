"""Long work yields to the event loop by the clock, not by a count of items."""

from __future__ import annotations

from mbvisor.controller import pacing


def test_work_yields_once_per_slice_of_its_own_time(monkeypatch):
    now = [100.0]
    yielded = []
    monkeypatch.setattr(pacing.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(pacing.hub, "sleep", lambda seconds: yielded.append(now[0]))
    pace = pacing.Pacer(0.002)
    for _ in range(10):  # cheap items: no yield within the slice
        now[0] += 0.0001
        pace()
    assert yielded == []
    now[0] += 0.002
    pace()
    assert yielded == [now[0]]
    now[0] += 0.001
    pace()  # the slice starts again after a yield
    assert len(yielded) == 1


def test_due_then_rest_lets_a_caller_flush_before_it_yields(monkeypatch):
    now = [5.0]
    monkeypatch.setattr(pacing.time, "monotonic", lambda: now[0])
    slept = []
    monkeypatch.setattr(pacing.hub, "sleep", slept.append)
    pace = pacing.Pacer(0.01)
    assert not pace.due()
    now[0] += 0.01
    assert pace.due() and slept == []  # due() only tells
    pace.rest()
    assert slept == [0] and not pace.due()
