"""Filters in rows of their own, one per job that added to a middlebox (store.py), and the
migration of databases written before them."""
from __future__ import annotations

import json
import sqlite3

import pytest

from mbvisor.controller.model import Limits, Middlebox, State
from mbvisor.controller.store import Store
from mbvisor.guest.grammar import format_command, parse_command

MAC = "52:34:56:00:12:22"


def old_database(path, texts):
    """A database as the release before filter rows wrote it (filters in the body)."""
    db = sqlite3.connect(str(path))
    db.executescript("""
CREATE TABLE middleboxes (dpid INTEGER NOT NULL, mac TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (dpid, mac));
CREATE TABLE ports (dpid INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE answers (channel TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    status TEXT NOT NULL, text TEXT NOT NULL, code TEXT NOT NULL DEFAULT 'ok', command TEXT,
    stored REAL NOT NULL DEFAULT 0, PRIMARY KEY (channel, epoch, seq));""")
    body = {"port": 2, "zone": 1, "firewall_ip": "10.0.0.5", "balancer_ip": None,
            "filters": sorted(texts), "redirects": []}
    db.execute("INSERT INTO middleboxes VALUES (?, ?, ?)", (1, MAC, json.dumps(body)))
    db.commit()
    db.close()


def test_a_migrated_filter_deleted_later_stays_deleted(tmp_path):
    path = tmp_path / "c.sqlite"
    texts = [format_command(parse_command(f"A {MAC} I 4 s 10.{n}.0.0/16")) for n in range(3)]
    old_database(path, texts)
    store = Store(path)
    state = store.load(Limits())
    mb = state.find(1, MAC)
    assert len(mb.filters) == 3
    gone = parse_command(texts[0]).filter
    after = state.put(Middlebox(mb.dpid, mb.port, mb.mac, mb.zone, mb.firewall_ip, mb.balancer_ip,
                                mb.filters - {gone}, mb.redirects))
    store.save(state, after, [], {(1, MAC)})
    store.db.close()
    again = Store(path).load(Limits()).find(1, MAC)
    assert gone not in again.filters and len(again.filters) == 2


def test_a_cancel_and_register_again_in_one_save_keeps_only_the_new_filters(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    f = [parse_command(f"A {MAC} I 4 s 10.{n}.0.0/16").filter for n in range(3)]
    first = State.of([Middlebox(1, 2, MAC, 1, "10.0.0.5", None, frozenset(f[:2]))])
    store.save(State(), first, [])
    again = State.of([Middlebox(1, 2, MAC, 7, "10.0.0.5", None, frozenset(f[1:]))])
    store.save(first, again, [])
    assert store.load(Limits()).find(1, MAC).filters == frozenset(f[1:])
    removed = State()
    store.save(again, removed, [])
    assert store.db.execute("SELECT COUNT(*) FROM filter_texts").fetchone()[0] == 0


FILTERS_TABLES = {
    "rowid": "CREATE TABLE filters (dpid INTEGER NOT NULL, mac TEXT NOT NULL, text TEXT NOT NULL, "
             "PRIMARY KEY (dpid, mac, text))",
    "without rowid": "CREATE TABLE filters (dpid INTEGER NOT NULL, mac TEXT NOT NULL, text TEXT NOT NULL, "
                     "PRIMARY KEY (dpid, mac, text)) WITHOUT ROWID",
}


def filters_table_database(path, texts, declaration):
    """A database as the releases with one ``filters`` row per filter wrote it."""
    db = sqlite3.connect(str(path))
    db.executescript(f"""
CREATE TABLE middleboxes (dpid INTEGER NOT NULL, mac TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (dpid, mac));
{declaration};
CREATE TABLE ports (dpid INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE answers (channel TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    status TEXT NOT NULL, text TEXT NOT NULL, code TEXT NOT NULL DEFAULT 'ok', command TEXT,
    stored REAL NOT NULL DEFAULT 0, PRIMARY KEY (channel, epoch, seq));""")
    body = {"port": 2, "zone": 1, "firewall_ip": "10.0.0.5", "balancer_ip": None, "redirects": []}
    db.execute("INSERT INTO middleboxes VALUES (?, ?, ?)", (1, MAC, json.dumps(body)))
    db.executemany("INSERT INTO filters VALUES (?, ?, ?)", [(1, MAC, text) for text in texts])
    db.commit()
    db.close()


def tables(store) -> set[str]:
    return {name for (name,) in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.mark.parametrize("form", sorted(FILTERS_TABLES))
def test_a_filters_table_of_one_row_per_filter_moves_to_one_row_per_middlebox(tmp_path, form):
    path = tmp_path / "c.sqlite"
    texts = [format_command(parse_command(f"A {MAC} I 4 s 10.{n}.0.0/16")) for n in range(3)]
    filters_table_database(path, texts, FILTERS_TABLES[form])
    store = Store(path)
    assert "filters" not in tables(store)
    assert store.db.execute("SELECT COUNT(*) FROM filter_texts").fetchone()[0] == 1
    assert store.load(Limits()).find(1, MAC).filters == frozenset(parse_command(t).filter for t in texts)
    store.db.close()
    again = Store(path)  # once: opening it again finds nothing to move
    assert again.db.execute("SELECT COUNT(*) FROM filter_texts").fetchone()[0] == 1
    assert len(again.load(Limits()).find(1, MAC).filters) == 3


def test_a_bulk_job_writes_one_row_per_middlebox_and_a_removal_folds_its_rows_into_one(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    f = [parse_command(f"A {MAC} I 4 s 10.{n}.0.0/16").filter for n in range(5)]
    states = [State.of([Middlebox(1, 2, MAC, 1, "10.0.0.5", None, frozenset(f[:n]))]) for n in (0, 3, 4, 5)]
    for before, after in zip(states, states[1:]):
        store.save(before, after, [])
    rows = lambda: store.db.execute("SELECT COUNT(*) FROM filter_texts").fetchone()[0]
    assert rows() == 3 and store.load(Limits()).find(1, MAC).filters == frozenset(f)
    fewer = State.of([Middlebox(1, 2, MAC, 1, "10.0.0.5", None, frozenset(f[1:]))])
    store.save(states[-1], fewer, [])
    assert rows() == 1 and store.load(Limits()).find(1, MAC).filters == frozenset(f[1:])
