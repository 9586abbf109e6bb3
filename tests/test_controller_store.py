"""Unit tests of the controller's SQLite store: desired state and idempotency answers on disk."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest
from pathlib import Path

from fakeswitch import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.controller.model import (ApplyError, Binding, Draft, Limits, Middlebox, Redirect, State, apply,
                                      decide)
from mbvisor.controller import store as store_module
from mbvisor.controller.migration import Copy
from mbvisor.controller.requests import Answer
from mbvisor.controller.store import Store, decode_middlebox, encode_middlebox, filter_text
from mbvisor.guest.grammar import parse_command

FAST = settings(max_examples=40, deadline=None)

MAC = "52:34:56:00:12:22"
MAC2 = "52:34:56:00:12:33"
LIMITS = Limits(filters=50, redirects=8)


def build(*texts: str, state: State | None = None, binding: Binding = Binding(1, 5)) -> State:
    state = state if state is not None else State(limits=LIMITS)
    for text in texts:
        state = apply(state, binding, parse_command(text)).state
    return state


EVERYTHING = (
    f"R F {MAC} 10.0.0.100",
    f"A {MAC} I 15 s 10.1.0.0/16 d 10.0.0.100 t ef p tcp",
    f"A {MAC} I 8 d 2001:db8::/32",
    f"A {MAC} M 7 s aa:bb:cc:dd:ee:ff t 3 p arp",
    f"A {MAC} M 8 d {MAC}",
    f"A {MAC} T 13 s 1000-1999 d 80 p udp",
    f"A {MAC} T 2 t 0",
    f"R L {MAC} 10.0.0.101 0 * 10.0.0.5,10.0.0.6",
    f"R L {MAC} 10.0.0.101 1 10.9.0.0/16 10.0.0.7",
    f"R L {MAC} 10.0.0.101 1 10.8.0.1 10.0.0.8",
)


@pytest.mark.parametrize("middlebox", [
    Middlebox(1, 5, MAC, 1),
    Middlebox(7, 3, MAC, 9, firewall_ip="2001:db8::1"),
    Middlebox(1, 5, MAC, 2, balancer_ip="2001:db8::100",
              redirects=(Redirect("2001:db8:9::/48", ("2001:db8::5",)), Redirect(None, ("2001:db8::6", "2001:db8::7")))),
    build(*EVERYTHING).find(1, MAC),
], ids=["bare", "firewall-v6", "balancer-v6", "everything"])
def test_encode_decode_round_trip(middlebox):
    assert round_trip(middlebox) == middlebox


def round_trip(middlebox: Middlebox) -> Middlebox:
    return decode_middlebox(middlebox.dpid, middlebox.mac, encode_middlebox(middlebox),
                            [filter_text(middlebox.mac, f) for f in middlebox.filters])


def test_encoding_is_canonical_readable_json():
    middlebox = build(*EVERYTHING).find(1, MAC)
    data = json.loads(encode_middlebox(middlebox))
    assert data["port"] == 5 and data["zone"] == 1
    assert data["firewall_ip"] == "10.0.0.100" and data["balancer_ip"] == "10.0.0.101"
    assert "filters" not in data  # rows of their own
    assert f"A {MAC} T 13 s 1000-1999 d 80 p 17" in {filter_text(MAC, f) for f in middlebox.filters}
    assert f"R L {MAC} 10.0.0.101 0 * 10.0.0.5,10.0.0.6" in data["redirects"]
    assert f"R L {MAC} 10.0.0.101 1 10.9.0.0/16 10.0.0.7" in data["redirects"]
    # The same middlebox reached by another order of commands encodes identically.
    reordered = build(EVERYTHING[0], *reversed(EVERYTHING[1:])).find(1, MAC)
    assert encode_middlebox(reordered) == encode_middlebox(middlebox)


SEQUENCE_MACS = [MAC, MAC2, "52:34:56:00:12:44"]


@st.composite
def command_texts(draw):
    mac = draw(st.sampled_from(SEQUENCE_MACS))
    n = draw(st.integers(1, 4))
    return draw(st.sampled_from([
        f"R F {mac} 10.0.0.{n}",
        f"R F {mac} 2001:db8::{n}",
        f"R L {mac} 10.0.1.{n} 0 * 10.0.2.{n},10.0.3.{n}",
        f"R L {mac} 10.0.1.{n} 1 10.{n}.0.0/16 10.0.4.{n}",
        f"A {mac} I 4 s 10.{n}.0.0/16",
        f"A {mac} T 9 d {n}-{n * 100} p sctp",
        f"A {mac} M 3 t {n} p 0x88cc",
        f"D {mac} I 4 s",
        f"X {mac}",
    ]))


@FAST
@given(st.lists(st.tuples(st.sampled_from([Binding(1, 5), Binding(2, 6)]), command_texts()), max_size=15))
def test_any_reachable_state_survives_a_store_round_trip(steps):
    store = Store(":memory:")
    state = State(limits=LIMITS)
    for binding, text in steps:
        try:
            after = apply(state, binding, parse_command(text)).state
        except ApplyError:
            continue
        store.save(state, after, [])
        state = after
        for middlebox in state.middleboxes:
            assert round_trip(middlebox) == middlebox
        assert store.load(LIMITS) == state
        rows = store.db.execute("SELECT dpid, mac, texts FROM filter_texts").fetchall()
        stored = [(dpid, mac, text) for dpid, mac, texts in rows for text in texts.split("\n")]
        assert sorted(stored) == sorted((mb.dpid, mb.mac, filter_text(mb.mac, f)) for mb in state.middleboxes
                                        for f in mb.filters)  # nothing left behind by a delete or a cancel


@FAST
@given(st.lists(st.lists(st.tuples(st.sampled_from([Binding(1, 5), Binding(2, 6)]), command_texts()), max_size=8),
                max_size=5))
def test_jobs_saved_with_what_their_drafts_added_write_the_same_rows(jobs):
    """Store.save told a job's added filters (Draft.added) writes what comparing the
    middleboxes' whole filter sets writes."""
    told, compared = Store(":memory:"), Store(":memory:")
    state = State(limits=LIMITS)
    for job in jobs:
        draft = Draft(state)
        for binding, text in job:
            try:
                draft.record(decide(draft, binding, parse_command(text)))
            except ApplyError:
                pass
        after = draft.state()
        told.save(state, after, [], added=draft.added)
        compared.save(state, after, [])
        state = after
        query = "SELECT * FROM middleboxes ORDER BY 1, 2, 3"
        assert told.db.execute(query).fetchall() == compared.db.execute(query).fetchall()
        assert filter_rows(told) == filter_rows(compared)


def filter_rows(store) -> list:
    """Each row's texts as a sorted tuple: a row's order is its set's."""
    return sorted((dpid, mac, tuple(sorted(texts.split("\n"))))
                  for dpid, mac, texts in store.db.execute("SELECT dpid, mac, texts FROM filter_texts"))


# --- Store on disk ------------------------------------------------------------------------

def test_empty_store_loads_the_empty_state_with_the_given_limits(tmp_path):
    store = Store(tmp_path / "sub" / "dir" / "controller.sqlite")  # parents are created
    assert store.load(LIMITS) == State(limits=LIMITS)
    assert store.answer(("chan", 1, 1)) is None


def test_restart_restores_the_same_state(tmp_path):
    path = tmp_path / "controller.sqlite"
    store = Store(path)
    state = State(limits=LIMITS)
    for binding, text in [(Binding(1, 5), t) for t in EVERYTHING] + [
            (Binding(1, 6), f"R F {MAC2} 10.0.0.200"), (Binding(1, 6), f"A {MAC2} I 1 p 6"),
            (Binding(2, 5), f"R L {MAC} 10.0.0.101 0 * 10.0.0.5")]:
        after = apply(state, binding, parse_command(text)).state
        store.save(state, after, [])
        state = after
    store.db.close()

    restarted = Store(path).load(LIMITS)
    assert restarted == state
    assert len(restarted.middleboxes) == 3
    # Limits are configuration, not state: the caller's limits are used.
    assert Store(path).load(Limits(filters=1)).limits == Limits(filters=1)


@pytest.mark.parametrize("dpid", [0, 1 << 62, 1 << 63, (1 << 64) - 1])
def test_any_64_bit_datapath_id_is_stored_and_loaded(tmp_path, dpid):
    """SQLite's INTEGER is signed: a dpid from 2^63 up failed the whole request (the REST
    contract test found it with an inventory PUT)."""
    from mbvisor.controller.trust import PortIdentity

    path = tmp_path / "controller.sqlite"
    store = Store(path)
    state = State(limits=LIMITS)
    for text in (f"R F {MAC} 10.0.0.100", f"A {MAC} I 4 s 10.9.9.9"):
        after = apply(state, Binding(dpid, 5), parse_command(text)).state
        store.save(state, after, [])
        state = after
    entry = PortIdentity(5, MAC, "red", "vm", ("10.0.0.100",), "eth0")
    store.save_inventory(dpid, [entry])
    store.db.close()
    restarted = Store(path)
    assert restarted.load(LIMITS) == state and state.find(dpid, MAC) is not None
    assert restarted.load_inventories() == {dpid: [entry]}


def test_cancel_is_persisted(tmp_path):
    path = tmp_path / "controller.sqlite"
    store = Store(path)
    registered = build(f"R F {MAC} 10.0.0.1", f"R F {MAC2} 10.0.0.2")
    store.save(State(limits=LIMITS), registered, [])
    cancelled = build(f"X {MAC}", state=registered)
    store.save(registered, cancelled, [])
    assert Store(path).load(LIMITS) == cancelled
    assert [mb.mac for mb in Store(path).load(LIMITS).middleboxes] == [MAC2]


def _writes(store: Store, before: State, after: State, key=None, status="OK", text="") -> list[str]:
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    try:
        store.save(before, after, [] if key is None else [(key, Answer(status, text), "X")])
    finally:
        store.db.set_trace_callback(None)
    return [s for s in statements if s.split()[0].upper() in {"INSERT", "DELETE", "UPDATE", "REPLACE"}]


def test_save_writes_only_the_middleboxes_that_changed(tmp_path):
    store = Store(tmp_path / "controller.sqlite")
    before = build(f"R F {MAC} 10.0.0.1", f"R F {MAC2} 10.0.0.2")
    store.save(State(limits=LIMITS), before, [])
    after = build(f"A {MAC2} I 4 s 10.0.0.0/8", state=before)
    writes = _writes(store, before, after)
    assert writes and all(MAC2 in w for w in writes)
    assert not any(MAC in w for w in writes)
    assert Store(tmp_path / "controller.sqlite").load(LIMITS) == after


def test_save_without_a_change_or_key_writes_nothing(tmp_path):
    store = Store(tmp_path / "controller.sqlite")
    state = build(f"R F {MAC} 10.0.0.1")
    store.save(State(limits=LIMITS), state, [])
    assert _writes(store, state, state) == []


def test_save_of_an_answer_only_writes_the_answer(tmp_path):
    store = Store(tmp_path / "controller.sqlite")
    state = build(f"R F {MAC} 10.0.0.1")
    store.save(State(limits=LIMITS), state, [])
    writes = _writes(store, state, state, ("chan", 3, 9), "REJECTED", "no such filter")
    assert len(writes) == 1 and "answers" in writes[0]
    assert store.answer(("chan", 3, 9)) == ("X", Answer("REJECTED", "no such filter"))


def test_answers_by_idempotency_key_survive_a_restart(tmp_path):
    path = tmp_path / "controller.sqlite"
    store = Store(path)
    state = build(f"R F {MAC} 10.0.0.1")
    registered = Answer("OK", f"registered {MAC} 10.0.0.1 for firewall offload")
    store.save(State(limits=LIMITS), state, [(("vm1", 1, 1), registered, f"R F {MAC} 10.0.0.1")])
    store.save(state, state, [(("vm1", 1, 2), Answer("SYNTAX", "column 1: 'Q' is not a command", "syntax"), "Q")])
    store.save(state, state, [(("vm2", 1, 1), Answer("OK", "line one\nline two"), "I x")])
    store.db.close()

    again = Store(path)
    assert again.answer(("vm1", 1, 1)) == (f"R F {MAC} 10.0.0.1", registered)
    assert again.answer(("vm1", 1, 2)) == ("Q", Answer("SYNTAX", "column 1: 'Q' is not a command", "syntax"))
    assert again.answer(("vm2", 1, 1)) == ("I x", Answer("OK", "line one\nline two"))
    # Every part of the key counts.
    assert again.answer(("vm1", 2, 1)) is None
    assert again.answer(("vm1", 1, 3)) is None
    assert again.answer(("vm3", 1, 1)) is None
    assert again.load(LIMITS) == state


def test_answers_kept_per_channel_are_bounded(tmp_path, monkeypatch):
    """A guest cannot grow the database without bound: each channel keeps its newest
    answers only, and another channel's are untouched."""
    monkeypatch.setattr(store_module, "KEEP_PER_CHANNEL", 50)
    monkeypatch.setattr(store_module, "PRUNE_EVERY", 10)
    store = Store(tmp_path / "controller.sqlite")
    state = State(limits=LIMITS)
    store.save(state, state, [(("quiet", 1, 1), Answer("OK", "kept"), "R F x")])
    for seq in range(1000):
        store.save(state, state, [(("noisy", 1, seq), Answer("OK", "x" * 100), f"I {seq}")])
    assert store.answer_count("noisy") <= 50 + 10
    assert store.answer(("noisy", 1, 999)) is not None  # the newest stay
    assert store.answer(("noisy", 1, 0)) is None
    assert store.answer(("quiet", 1, 1)) == ("R F x", Answer("OK", "kept"))


def test_answers_older_than_the_retention_go(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_EVERY", 1)
    store = Store(tmp_path / "controller.sqlite")
    state = State(limits=LIMITS)
    clock = iter([1000.0, 1000.0 + store_module.KEEP_SECONDS + 1])
    monkeypatch.setattr(store_module.time, "time", lambda: next(clock))
    store.save(state, state, [(("vm", 1, 1), Answer("OK", "old"), "X a")])
    store.save(state, state, [(("vm", 1, 2), Answer("OK", "new"), "X b")])
    assert store.answer(("vm", 1, 1)) is None
    assert store.answer(("vm", 1, 2)) is not None


def test_a_database_of_the_first_release_gains_the_new_columns(tmp_path):
    """Answers stored before commands were remembered replay without the reuse check."""
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(store_module.SCHEMA)
    old.execute("INSERT INTO answers VALUES ('vm', 1, 2, 'OK', 'done')")
    old.commit()
    old.close()
    assert Store(path).answer(("vm", 1, 2)) == (None, Answer("OK", "done"))


def test_a_job_that_adds_writes_only_what_it_added_and_one_that_removes_one_row(tmp_path):
    store = Store(tmp_path / "controller.sqlite")
    state = build(f"R F {MAC} 10.0.0.1", *(f"A {MAC} I 4 s 10.{n}.0.0/16" for n in range(40)))
    store.save(State(limits=LIMITS), state, [])
    written = []
    store.db.set_trace_callback(written.append)
    added = build(f"A {MAC} I 4 s 10.99.0.0/16", state=state)
    store.save(state, added, [])
    filter_rows = [w for w in written if "filter_texts" in w and ("INSERT" in w or "DELETE" in w)]
    assert len(filter_rows) == 1 and "10.99.0.0/16" in filter_rows[0] and "10.7.0.0/16" not in filter_rows[0]
    written.clear()
    removed = build(f"D {MAC} I 4 s 10.7.0.0/16", state=added)
    store.save(added, removed, [])
    filter_rows = [w for w in written if "filter_texts" in w and ("INSERT" in w or "DELETE" in w)]
    assert [w.split()[0] for w in filter_rows] == ["DELETE", "INSERT"] and "10.7.0.0/16" not in filter_rows[1]
    assert store.db.execute("SELECT COUNT(*) FROM filter_texts").fetchone()[0] == 1
    assert Store(tmp_path / "controller.sqlite").load(LIMITS) == removed


def test_a_database_that_kept_filters_in_the_middlebox_row_is_moved_once(tmp_path):
    """Databases from before filters had rows of their own load the same state."""
    path = tmp_path / "controller.sqlite"
    middlebox = build(*EVERYTHING).find(1, MAC)
    legacy = json.loads(encode_middlebox(middlebox))
    legacy["filters"] = sorted(filter_text(MAC, f) for f in middlebox.filters)
    db = sqlite3.connect(path)
    db.executescript(store_module.SCHEMA)
    db.execute("INSERT INTO middleboxes VALUES (?, ?, ?)", (1, MAC, json.dumps(legacy)))
    db.commit()
    db.close()
    store = Store(path)
    assert store.load(LIMITS).find(1, MAC) == middlebox
    body = store.db.execute("SELECT body FROM middleboxes").fetchone()[0]
    assert "filters" not in json.loads(body)
    assert Store(path).load(LIMITS).find(1, MAC) == middlebox  # moved once, not twice


def _fill(store: Store, answers: int) -> None:
    """Many answers (each a row of a few hundred bytes): pages in the write-ahead log."""
    state = State(limits=LIMITS)
    for n in range(answers):
        store.save(state, state, [(("fill", 1, n), Answer("OK", "x" * 400), f"R F {MAC} 10.0.0.1")])


def test_commits_leave_the_log_to_the_thread(tmp_path, monkeypatch):
    """SQLite's own checkpoint ran inside whichever commit filled 1,000 pages and synced
    the file while the event loop waited: a commit checkpoints only past WAL_PAGES."""
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 3600)
    path = tmp_path / "controller.sqlite"
    store = Store(path)
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone() == (store_module.WAL_PAGES,)
    size = path.stat().st_size
    _fill(store, 1200)  # a page or more written per commit: past the 1,000 that set SQLite's off
    assert path.stat().st_size == size
    assert Path(f"{path}-wal").stat().st_size > 1000 * 4096
    assert not store.checkpointing


def test_the_log_stays_bounded_while_commits_never_stop(tmp_path, monkeypatch):
    """The log starts over only after a checkpoint that caught up with every commit; the
    thread's never does while commits keep landing (here: it never runs at all, the worst
    case), and the commits' own checkpoint past WAL_PAGES still bounds the log."""
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 3600)
    monkeypatch.setattr(store_module, "WAL_PAGES", 200)
    path = tmp_path / "controller.sqlite"
    store = Store(path)
    _fill(store, 5000)  # ~2.5 MB of answers
    assert Path(f"{path}-wal").stat().st_size < 200 * 4096 * 2
    assert path.stat().st_size > 1_000_000


def test_a_store_opened_by_a_relative_path_checkpoints_after_the_directory_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0)
    monkeypatch.chdir(tmp_path)
    store = Store("controller.sqlite")
    monkeypatch.chdir("/")
    _fill(store, 300)
    wait_until(lambda: not store.checkpointing, what="the checkpoint")
    assert (tmp_path / "controller.sqlite").stat().st_size > 100_000


def test_the_log_is_copied_into_the_database_off_the_event_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0)
    calls = []
    execute = store_module.tpool.execute
    monkeypatch.setattr(store_module.tpool, "execute", lambda fn, *args: calls.append(fn) or execute(fn, *args))
    path = tmp_path / "controller.sqlite"
    store = Store(path)
    size = path.stat().st_size
    _fill(store, 300)
    wait_until(lambda: not store.checkpointing, what="the checkpoint")
    _fill(store, 1)
    wait_until(lambda: not store.checkpointing, what="the checkpoint")
    assert calls and set(calls) == {store_module.checkpoint}  # in a thread of tpool's, never the loop's
    assert path.stat().st_size > size + 100_000
    store.db.close()
    assert Store(path).answer(("fill", 1, 299))[1] == Answer("OK", "x" * 400)


def test_a_failed_checkpoint_is_logged_and_loses_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0)
    path = tmp_path / "controller.sqlite"
    store = Store(path)
    store.path = tmp_path / "gone" / "controller.sqlite"  # where no database is
    _fill(store, 5)
    wait_until(lambda: not store.checkpointing and "checkpoint" in caplog.text, what="the failed checkpoint")
    assert "failed" in caplog.text
    assert not (tmp_path / "gone").exists()  # nothing created where it looked
    assert store.answer(("fill", 1, 4))[1] == Answer("OK", "x" * 400)


@pytest.mark.parametrize("change", [
    None,
    (None, build(*EVERYTHING).find(1, MAC)),
    (build(*EVERYTHING).find(1, MAC), None),
    (build(EVERYTHING[0]).find(1, MAC), build(*EVERYTHING[:3]).find(1, MAC)),
], ids=["whole", "new", "cancelled", "filters"])
def test_stored_copies_come_back_in_order_until_made_or_forgotten(tmp_path, change):
    """A copy is stored with the change that asks for it and forgotten in the transaction
    that stores the copy made (or alone, when it changed nothing): a restarted controller
    finds exactly the copies still to make, in the order they were asked for."""
    path = tmp_path / "c.sqlite"
    store = Store(path)
    before, after = build(EVERYTHING[0]), build(*EVERYTHING[:2])
    copies = [Copy(0xB2, (1, MAC), change is not None and change[1] is None, change, ("vm-7", "blue")),
              Copy(0xC3, (1, MAC))]
    ids = store.save(before, after, [], copies=copies)
    assert store.save(after, after, [], copies=[Copy(2**64 - 1, (2**63, MAC2))]) == [ids[1] + 1]
    store.db.close()
    store = Store(path)
    assert store.load_copies() == [(ids[0], copies[0]), (ids[1], copies[1]), (ids[1] + 1, Copy(2**64 - 1, (2**63, MAC2)))]
    store.save(after, build(*EVERYTHING[:3]), [], made=ids[0])
    store.forget_copy(ids[1] + 1)
    assert store.load_copies() == [(ids[1], copies[1])]
    assert Store(path).load(LIMITS) == build(*EVERYTHING[:3])


def test_an_inventory_is_stored_with_the_arrivals_it_asks_for(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    (copy_id,) = store.save_inventory(0xB2, [], [Copy(0xB2, (1, MAC))])
    assert store.load_copies() == [(copy_id, Copy(0xB2, (1, MAC)))]
    assert store.save_inventory(0xB2, []) == []


def test_a_copies_table_from_before_copies_named_their_vm_gains_the_column(tmp_path):
    """A review found a database whose copies table was made before the ``vm`` column
    stopping the controller's start (no such column)."""
    path = tmp_path / "c.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE copies (id INTEGER PRIMARY KEY AUTOINCREMENT, dpid INTEGER NOT NULL, "
                   "origin_dpid INTEGER NOT NULL, mac TEXT NOT NULL, cancelled INTEGER NOT NULL, change TEXT)")
        db.execute("INSERT INTO copies (dpid, origin_dpid, mac, cancelled, change) VALUES (178, 161, ?, 0, NULL)",
                   (MAC,))
    store = Store(path)
    assert [copy for _, copy in store.load_copies()] == [Copy(178, (161, MAC))]
    (made,) = store.save(State(), State(), [], copies=[Copy(178, (161, MAC), False, None, ("fw-1", "red"))])
    assert store.load_copies()[-1] == (made, Copy(178, (161, MAC), False, None, ("fw-1", "red")))
