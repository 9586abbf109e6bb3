"""Filters in rows of their own (store.py) and the migration of databases written before them."""
from __future__ import annotations

import json
import sqlite3

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
    assert store.db.execute("SELECT COUNT(*) FROM filters").fetchone()[0] == 0


def rowid_database(path, texts):
    """A database as the release before ``WITHOUT ROWID`` filter rows wrote it."""
    db = sqlite3.connect(str(path))
    db.executescript("""
CREATE TABLE middleboxes (dpid INTEGER NOT NULL, mac TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (dpid, mac));
CREATE TABLE filters (dpid INTEGER NOT NULL, mac TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (dpid, mac, text));
CREATE TABLE ports (dpid INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE answers (channel TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    status TEXT NOT NULL, text TEXT NOT NULL, code TEXT NOT NULL DEFAULT 'ok', command TEXT,
    stored REAL NOT NULL DEFAULT 0, PRIMARY KEY (channel, epoch, seq));""")
    body = {"port": 2, "zone": 1, "firewall_ip": "10.0.0.5", "balancer_ip": None, "redirects": []}
    db.execute("INSERT INTO middleboxes VALUES (?, ?, ?)", (1, MAC, json.dumps(body)))
    db.executemany("INSERT INTO filters VALUES (?, ?, ?)", [(1, MAC, text) for text in texts])
    db.commit()
    db.close()


def filters_declaration(store) -> str:
    return store.db.execute("SELECT sql FROM sqlite_master WHERE name = 'filters'").fetchone()[0]


def test_filter_rows_of_a_rowid_table_move_to_a_table_clustered_by_their_key(tmp_path):
    path = tmp_path / "c.sqlite"
    texts = [format_command(parse_command(f"A {MAC} I 4 s 10.{n}.0.0/16")) for n in range(3)]
    rowid_database(path, texts)
    store = Store(path)
    assert "WITHOUT ROWID" in filters_declaration(store)
    assert "filters_with_rowid" not in {name for (name,) in store.db.execute("SELECT name FROM sqlite_master")}
    assert store.load(Limits()).find(1, MAC).filters == frozenset(parse_command(t).filter for t in texts)
    store.db.close()
    again = Store(path)  # once: opening it again finds nothing to move
    assert "WITHOUT ROWID" in filters_declaration(again)
    assert len(again.load(Limits()).find(1, MAC).filters) == 3


def test_a_new_database_clusters_filter_rows_by_their_key(tmp_path):
    assert "WITHOUT ROWID" in filters_declaration(Store(tmp_path / "c.sqlite"))
