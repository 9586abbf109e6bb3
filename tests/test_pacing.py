"""Long work yields to the event loop by the clock, not by a count of items."""

from __future__ import annotations

import contextlib
import gc

from fakeswitch import wait_until
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


def test_background_slices_are_shorter_than_a_commands_wait(monkeypatch):
    """What a command that arrives during background work waits for is the slice under way:
    after each rest a background pacer runs BACKGROUND_SLICE, not its own longer slice;
    a foreground pacer keeps its own."""
    now = [50.0]
    monkeypatch.setattr(pacing.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(pacing.hub, "sleep", lambda seconds: None)
    foreground, background = pacing.Pacer(0.001), None
    with pacing.background():
        background = pacing.Pacer(0.001)
        background.rest()
    foreground.rest()
    start, tick = now[0], 1e-6
    now[0] = start + pacing.BACKGROUND_SLICE - tick
    assert not background.due() and not foreground.due()
    now[0] = start + pacing.BACKGROUND_SLICE
    assert background.due() and not foreground.due()  # a command arriving now has waited 0.3 ms at most
    now[0] = start + 0.001 - tick
    assert not foreground.due()
    now[0] = start + 0.001
    assert foreground.due()


def test_background_work_collects_garbage_at_its_own_rests_while_no_command_runs(monkeypatch):
    """Past half the young generation's threshold a background rest makes the
    collection the collector would make (young, or middle when that is past its own
    threshold), so that it does not fall in a command's slice; with a command on its way,
    for foreground work, below that mark or with automatic collection off, it makes none.
    No other green thread runs meanwhile (their collections would count here)."""
    monkeypatch.setattr(pacing.hub, "sleep", lambda seconds: None)
    monkeypatch.setattr(pacing.COMMANDS.idle, "wait", lambda timeout=None: False)
    assert pacing.COMMANDS.running == 0, "an earlier test left a command counted"
    collections = []

    def seen(phase: str, info: dict) -> None:
        if phase == "stop":
            collections.append(info["generation"])

    def background_rest() -> None:
        with pacing.background():
            pacing.Pacer(0.0001).rest()

    threshold, enabled = gc.get_threshold(), gc.isenabled()
    gc.enable()
    gc.collect(1)  # the young and middle counts start at 0
    gc.set_threshold(80_000, 1, threshold[2])  # no collection of its own during the test
    gc.callbacks.append(seen)
    try:
        kept = [[] for _ in range(30_000)]  # below half the threshold
        background_rest()
        assert collections == [], "collected below the mark"
        kept += [[] for _ in range(20_000)]  # past it
        pacing.Pacer(1.0).rest()
        assert collections == [], "foreground work collected"
        pacing.COMMANDS.begin()
        try:
            background_rest()
        finally:
            pacing.COMMANDS.end()
        assert collections == [], "collected while a command was on its way"
        gc.disable()
        try:
            background_rest()
        finally:
            gc.enable()
        gc.set_threshold(0)
        try:
            background_rest()
        finally:
            gc.set_threshold(80_000, 1, threshold[2])
        assert collections == [], "collected with automatic collection off"
        background_rest()
        assert collections == [0]
        for _ in range(2):
            kept += [[] for _ in range(50_000)]
            background_rest()
        assert collections == [0, 0, 1], "not the generation the collector would choose"
        background_rest()
        assert collections == [0, 0, 1], "collected again with the young generation nearly empty"
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*threshold)
        if not enabled:
            gc.disable()


def _background_loop(progress: list, slice_seconds: float, stop: list) -> None:
    """Background work: one step per rest."""
    with pacing.background():
        pace = pacing.Pacer(slice_seconds)
        while not stop:
            pace.rest()
            progress.append(1)


def test_background_work_steps_aside_while_a_command_is_on_its_way():
    progress, stop = [], []
    worker = pacing.hub.spawn(_background_loop, progress, 0.5, stop)  # waits up to 1 s per step
    pacing.hub.sleep(0)
    try:
        pacing.COMMANDS.begin()
        before = len(progress)
        for _ in range(50):  # the command's hand-offs between green threads
            pacing.hub.sleep(0)
        assert len(progress) - before <= 1  # at most the step it was taking
        pacing.COMMANDS.end()
        wait_until(lambda: len(progress) > before + 10, what="the background work to resume")
    finally:
        stop.append(True)
        pacing.hub.kill(worker)


def test_a_long_command_does_not_starve_background_work():
    progress, stop = [], []
    worker = pacing.hub.spawn(_background_loop, progress, 0.01, stop)  # waits up to 20 ms per step
    pacing.COMMANDS.begin()
    try:
        wait_until(lambda: len(progress) >= 3, what="background steps while a command lasts")
    finally:
        pacing.COMMANDS.end()
        stop.append(True)
        pacing.hub.kill(worker)


def test_work_that_is_not_background_never_waits_for_commands():
    progress, stop = [], []

    def foreground():
        pace = pacing.Pacer(0.5)
        while not stop:
            pace.rest()
            progress.append(1)

    worker = pacing.hub.spawn(foreground)
    pacing.COMMANDS.begin()
    try:
        for _ in range(50):
            pacing.hub.sleep(0)
        assert len(progress) >= 40
    finally:
        pacing.COMMANDS.end()
        stop.append(True)
        pacing.hub.kill(worker)


def test_commands_are_counted_until_the_last_one_ends():
    commands = pacing.Commands()
    assert commands.idle.is_set()
    commands.begin()
    commands.begin()
    assert commands.running == 2 and not commands.idle.is_set()
    commands.end()
    assert not commands.idle.is_set()
    commands.end()
    assert commands.running == 0 and commands.idle.is_set()


def test_a_command_waiting_elsewhere_does_not_count_meanwhile():
    pacing.COMMANDS.begin()
    try:
        with pacing.carrying():
            with pacing.elsewhere():
                assert pacing.COMMANDS.running == 0 and pacing.COMMANDS.idle.is_set()
                assert pacing.CPU_FREE.is_set()  # nor does it hold bulk requests' reading back (an ARP wait)
            assert pacing.COMMANDS.running == 1 and not pacing.CPU_FREE.is_set()
        with pacing.elsewhere():  # a green thread carrying nothing: nothing to take off
            assert pacing.COMMANDS.running == 1
    finally:
        pacing.COMMANDS.end()
    assert pacing.COMMANDS.running == 0


# --- bulk requests are read while commands wait on their switches ----------------------------

def test_the_cpu_is_free_of_commands_only_while_each_waits_on_its_switch():
    assert pacing.CPU_FREE.is_set()
    with pacing.on_switch():  # a green thread carrying no command (a reconciliation's listing)
        assert pacing.CPU_FREE.is_set()
    with pacing.carrying():
        assert not pacing.CPU_FREE.is_set()
        with pacing.on_switch():
            assert pacing.CPU_FREE.is_set()
            with pacing.on_switch():  # nested: still waiting when the inner wait ends
                pass
            assert pacing.CPU_FREE.is_set()
        assert not pacing.CPU_FREE.is_set()
        release = []
        other = pacing.hub.spawn(_carried_command, [], release)  # another switch's command at work
        wait_until(lambda: len(pacing._carrying) == 2, what="the second command carried")
        with pacing.on_switch():
            assert not pacing.CPU_FREE.is_set()  # this one waits, the other works
        try:
            release.append("on switch")
            with pacing.on_switch():
                wait_until(pacing.CPU_FREE.is_set, what="both commands waiting on their switches")
        finally:
            _answer(other, release)
    assert pacing.CPU_FREE.is_set() and not pacing._carrying and not pacing._on_switch


def _carried_command(log: list, release: list) -> None:
    """A command carried out: it works on the CPU (yielding between slices) until told to
    wait on its switch, waits until told it was answered, then works again briefly."""
    with pacing.carrying():
        while "on switch" not in release:
            log.append("working")
            pacing.hub.sleep(0)
        with pacing.on_switch():
            log.append("on switch")
            while "done" not in release:
                pacing.hub.sleep(0)
        log.append("answered")


def _answer(command, release: list) -> None:
    """Let a _carried_command end (also when a test failed half way: a command left
    carried out would hold every later test's bulk reading back)."""
    release.extend(["on switch", "done"])
    if command is not None:
        command.wait()


@contextlib.contextmanager
def _command_at_work():
    """A _carried_command working on the CPU: its log and its release."""
    log, release = [], []
    command = pacing.hub.spawn(_carried_command, log, release)
    try:
        wait_until(lambda: log, what="the command at work")
        yield log, release
    finally:
        _answer(command, release)


def test_a_bulk_request_is_read_once_the_command_at_work_waits_on_its_switch(monkeypatch):
    monkeypatch.setattr(pacing, "PREPARE_DEFERRAL", 30.0)
    with _command_at_work() as (log, release):
        pacing.hub.spawn(lambda: (wait_until(lambda: len(log) > 20, what="some work"), release.append("on switch")))
        with pacing.preparing():
            log.append("read")
        assert log.index("read") > log.index("on switch")  # not a slice of the command's work before


def test_a_bulk_reading_steps_aside_at_its_rests_while_a_command_works(monkeypatch):
    monkeypatch.setattr(pacing, "PREPARE_DEFERRAL", 30.0)
    log, release = [], []
    command = None
    try:
        with pacing.preparing():
            log.append("reading")  # nothing carried out: at once
            command = pacing.hub.spawn(_carried_command, log, release)
            pacing.hub.spawn(lambda: (wait_until(lambda: len(log) > 20, what="some work"),
                                      release.append("on switch")))
            pacing.Pacer().rest()
            log.append("reading on")
        assert log.index("reading on") > log.index("on switch")
    finally:
        _answer(command, release)


def test_a_bulk_reading_waits_no_longer_than_its_deferral(monkeypatch):
    monkeypatch.setattr(pacing, "PREPARE_DEFERRAL", 0.05)
    with _command_at_work() as (log, _):
        started = pacing.time.monotonic()
        with pacing.preparing():
            waited = pacing.time.monotonic() - started
            pacing.Pacer(0).rest()  # its deferral is spent: the rest only yields
        assert waited >= 0.05 and "on switch" not in log  # a command that never waits delays it this long only


def test_a_bulk_reading_s_rests_share_its_one_deferral(monkeypatch):
    monkeypatch.setattr(pacing, "PREPARE_DEFERRAL", 0.5)
    with _command_at_work() as (log, _):
        started = pacing.time.monotonic()
        with pacing.preparing():
            for _ in range(4):
                pacing.Pacer(0).rest()
        waited = pacing.time.monotonic() - started
        assert 0.5 <= waited < 1.0 and "on switch" not in log  # not 0.5 s more at each rest


def test_a_request_that_is_not_bulk_is_read_at_once(monkeypatch):
    monkeypatch.setattr(pacing, "PREPARE_DEFERRAL", 30.0)
    with _command_at_work() as (log, _):
        with pacing.preparing(bulk=False):
            log.append("read")
            pacing.Pacer(0).rest()
        assert "on switch" not in log
