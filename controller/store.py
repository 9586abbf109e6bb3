"""Desired state on disk (SQLite), so a restarted controller restores every offload, and
the first answer to each idempotency key, so a command forwarded twice applies once.

A middlebox is one row; its filters are rows of their own, one per job that added to it
(``filter_texts``: the canonical texts of what the job added, one per line), so a job that
adds one filter to a middlebox with 1,000 writes one short row, not the middlebox's 1,000
again, and a bulk job that adds 100 writes one row, not 100 (each row is a b-tree insert,
about 1.5 us).  A job that removes filters rewrites that middlebox's rows as one (at most
``MBVISOR_MAX_FILTERS`` texts); a middlebox never has more rows than filters.

Answers are kept for replay only as long as a retry can come: per channel, the newest
``KEEP_PER_CHANNEL`` and none older than ``KEEP_SECONDS``, so a guest cannot grow the
database without bound.  Each answer remembers its command, so a key reused for another
command is recognised (and refused) instead of answered with the first command's result.

A copy to a migrating VM's twin (``migration.Copy``) is a row of ``copies`` from the
transaction that stores the change asking for it (a confirmed job, or the annotations that
show an arrival) to the one that stores the copy: a controller stopped in between makes it
at its next start, so the twins never stay different.

The write-ahead log is copied into the database (a checkpoint) by an OS thread, at most
once a second: SQLite's automatic checkpoint ran in whichever commit filled 1,000 pages,
wrote them back and synced the file, and every switch's commands and the REST API waited
the 6-15 ms it took.  SQLite lets go of the interpreter while it works, so the thread
costs the event loop nothing.  The log starts over only when a checkpoint has caught up
with every commit, which the thread's cannot while commits keep landing (hundreds a
second): then the automatic one, set to WAL_PAGES, still bounds the log, and costs that
one commit in 4,000 pages (~16 MB) of writes its sync instead of one in 1,000."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

from eventlet import tpool

from mbvisor.guest.commands import RegisterLoadBalancer
from mbvisor.guest.grammar import format_command, parse_command

from .migration import Copy
from .model import Limits, Middlebox, Redirect, State, added_text
from .trust import PortIdentity, Underlay
from .requests import Answer
from .compat import hub

log = logging.getLogger("mbvisor.controller.store")
CHECKPOINT_INTERVAL = 1.0  # seconds between two checkpoints at most, while changes come
WAL_PAGES = 4_000  # pages in the log past which a commit checkpoints (see the module)

KEEP_PER_CHANNEL = 4096
KEEP_SECONDS = 24 * 3600.0
PRUNE_EVERY = 1024  # answers stored for a channel between two prunings of it (one costs ~2 ms)

SCHEMA = """
CREATE TABLE IF NOT EXISTS middleboxes (
    dpid INTEGER NOT NULL, mac TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (dpid, mac));
CREATE TABLE IF NOT EXISTS filter_texts (dpid INTEGER NOT NULL, mac TEXT NOT NULL, texts TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS filter_texts_of_middlebox ON filter_texts (dpid, mac);
CREATE TABLE IF NOT EXISTS ports (dpid INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    channel TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    status TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (channel, epoch, seq));
CREATE TABLE IF NOT EXISTS copies (
    id INTEGER PRIMARY KEY AUTOINCREMENT, dpid INTEGER NOT NULL, origin_dpid INTEGER NOT NULL, mac TEXT NOT NULL,
    cancelled INTEGER NOT NULL, change TEXT);
"""
# Columns added since the first release; an older database gains them on open.
ANSWER_COLUMNS = {"code": "TEXT NOT NULL DEFAULT 'ok'", "command": "TEXT", "stored": "REAL NOT NULL DEFAULT 0"}
COPY_COLUMNS = {"vm": "TEXT"}


def command_text(command: dict | str) -> str:
    """A command as the store compares it: the text as sent, or canonical JSON."""
    return command if isinstance(command, str) else json.dumps(command, sort_keys=True, separators=(",", ":"))


def _inventory_entry(entry: PortIdentity | Underlay) -> dict:
    if isinstance(entry, Underlay):
        return {"underlay": True, "port": entry.port, "interface": entry.interface,
                "leads_to": None if entry.leads_to is None else sorted(entry.leads_to)}
    return {"port": entry.port, "mac": entry.mac, "tenant": entry.tenant, "vm_id": entry.vm_id, "ips": list(entry.ips),
            "interface": entry.interface}


def _loaded_entry(e: dict) -> PortIdentity | Underlay:
    if e.get("underlay"):
        return Underlay(e["port"], e["interface"], None if e["leads_to"] is None else frozenset(e["leads_to"]))
    return PortIdentity(e["port"], e["mac"], e["tenant"], e["vm_id"], tuple(e["ips"]), e["interface"])


def encode_middlebox(middlebox: Middlebox) -> str:
    """Everything but the filters (rows of their own, ``filter_text``), in canonical
    command text: readable and versionless."""
    redirects = [format_command(RegisterLoadBalancer(middlebox.mac, middlebox.balancer_ip, 1 if r.source else 0,
                                                     r.source, r.backends)) for r in middlebox.redirects]
    return json.dumps({
        "port": middlebox.port, "zone": middlebox.zone, "firewall_ip": middlebox.firewall_ip,
        "balancer_ip": middlebox.balancer_ip, "redirects": redirects,
        "anchor": None if middlebox.anchor is None else {"vm_id": middlebox.anchor[0], "tenant": middlebox.anchor[1]},
    })


def filter_text(mac: str, filter) -> str:
    """A filter's row: the text its add was answered with (formatted once, ``added_text``)."""
    return added_text(mac, filter)


def stored_dpid(dpid: int) -> int:
    """A datapath id as SQLite keeps it: its INTEGER is signed 64-bit, a dpid unsigned, so
    ids from 2^63 up are stored as their two's complement (they are ids, never compared by
    size)."""
    return dpid - (1 << 64) if dpid >= 1 << 63 else dpid


def loaded_dpid(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def decode_middlebox(dpid: int, mac: str, body: str, filter_texts=()) -> Middlebox:
    data = json.loads(body)
    redirects = tuple(Redirect(c.source, c.backends) for c in map(parse_command, data["redirects"]))
    return Middlebox(dpid, data["port"], mac, data["zone"], data["firewall_ip"], data["balancer_ip"],
                     frozenset(parse_command(text).filter for text in filter_texts), redirects,
                     None if data.get("anchor") is None else (data["anchor"]["vm_id"], data["anchor"]["tenant"]))


def encode_change(change: tuple[Middlebox | None, Middlebox | None] | None) -> str | None:
    """A copy's change (already ``migration.compact``: the filters it added and removed)."""
    if change is None:
        return None
    return json.dumps([None if side is None else
                       {"body": encode_middlebox(side), "filters": sorted(filter_text(side.mac, f) for f in side.filters)}
                       for side in change])


def decode_change(dpid: int, mac: str, text: str | None) -> tuple[Middlebox | None, Middlebox | None] | None:
    if text is None:
        return None
    before, after = (None if side is None else decode_middlebox(dpid, mac, side["body"], side["filters"])
                     for side in json.loads(text))
    return before, after


def checkpoint(path: Path) -> None:
    """Copy what the write-ahead log holds into the database, waiting for nobody (PASSIVE:
    writers go on meanwhile).  On a connection of its own: it runs in another thread."""
    with contextlib.closing(sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", uri=True)) as db:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")


class Store:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # Each committed transaction is in the WAL before the answer goes out, so a
        # controller killed at any point (kill -9) restarts with every answered change;
        # not syncing the WAL to the disk at every commit (a host that loses power may
        # lose its last ones, with its switch's flows and its VMs) keeps a slow disk's
        # 5-40 ms out of every command.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")  # see the module: _checkpoint_soon
        self.path = None if str(path) == ":memory:" else Path(path).absolute()  # whatever the cwd becomes
        self.checkpointing = False
        self.checkpointed_at = time.monotonic()
        # A database from before copies were stored: the copies its controller had queued
        # are looked for once, as arrivals (``Controller``).
        self.copies_were_stored = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'copies'").fetchone() is not None
        self.db.executescript(SCHEMA)
        answer_columns = self._add_columns("answers", ANSWER_COLUMNS)
        self._add_columns("copies", COPY_COLUMNS)
        if "stored" not in answer_columns:  # older rows start their retention now, not in 1970
            self.db.execute("UPDATE answers SET stored = ?", (time.time(),))
        self._move_filters_to_their_rows()
        self.stored_since_prune: dict[str, int] = {}

    def _move_filters_to_their_rows(self) -> None:
        """Databases written before kept filters in the middlebox's body, or in a
        ``filters`` table of one row per filter: move them, once, in one transaction."""
        tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        in_bodies = self.db.execute("SELECT dpid, mac, body FROM middleboxes WHERE body LIKE '%\"filters\"%'"
                                    ).fetchall()
        if "filters" not in tables and not in_bodies:
            return
        texts = defaultdict(list)
        if "filters" in tables:
            for dpid, mac, text in self.db.execute("SELECT dpid, mac, text FROM filters"):
                texts[(dpid, mac)].append(text)
        with self._transaction():
            for dpid, mac, body in in_bodies:
                data = json.loads(body)
                texts[(dpid, mac)].extend(data.pop("filters", []))
                self.db.execute("UPDATE middleboxes SET body = ? WHERE dpid = ? AND mac = ?",
                                (json.dumps(data), dpid, mac))
            self.db.executemany("INSERT INTO filter_texts VALUES (?, ?, ?)",
                                [(*key, "\n".join(dict.fromkeys(found))) for key, found in texts.items() if found])
            self.db.execute("DROP TABLE IF EXISTS filters")

    def _add_columns(self, table: str, columns: dict[str, str]) -> set[str]:
        """The ``columns`` an older database's ``table`` lacks, added; the columns it had."""
        present = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
        for column, declaration in columns.items():
            if column not in present:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        return present

    def load(self, limits: Limits) -> State:
        filters = defaultdict(list)
        for dpid, mac, texts in self.db.execute("SELECT dpid, mac, texts FROM filter_texts"):
            filters[(dpid, mac)].extend(texts.split("\n"))
        rows = self.db.execute("SELECT dpid, mac, body FROM middleboxes ORDER BY dpid, mac").fetchall()
        return State.of((decode_middlebox(loaded_dpid(dpid), mac, body, filters.get((dpid, mac), ()))
                         for dpid, mac, body in rows), limits)

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction; then a checkpoint, if one is due, off the event loop."""
        with self.db:
            self.db.execute("BEGIN")
            yield
        self._checkpoint_soon()

    def _checkpoint_soon(self) -> None:
        if self.path is None or self.checkpointing or time.monotonic() - self.checkpointed_at < CHECKPOINT_INTERVAL:
            return
        self.checkpointing = True
        hub.spawn(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            tpool.execute(checkpoint, self.path)
        except sqlite3.Error as error:  # the log grows until the next one succeeds; nothing is lost
            log.warning("checkpoint of %s failed: %s", self.path, error)
        finally:
            self.checkpointing = False
            self.checkpointed_at = time.monotonic()

    def save_inventory(self, dpid: int, entries: list[PortIdentity | Underlay], copies: list[Copy] = ()
                       ) -> list[int]:
        """A switch's annotated ports (and underlay ports) as published (refusals are
        recomputed on load), with the copies (arrivals) they ask for; the copies' ids."""
        body = json.dumps([_inventory_entry(e) for e in entries])
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO ports VALUES (?, ?)", (stored_dpid(dpid), body))
            return self._add_copies(copies)

    def save_copies(self, copies: list[Copy]) -> list[int]:
        """Copies asked for by nothing else stored (a port added again); their ids."""
        with self._transaction():
            return self._add_copies(copies)

    def _add_copies(self, copies: list[Copy]) -> list[int]:
        return [self.db.execute("INSERT INTO copies (dpid, origin_dpid, mac, cancelled, change, vm) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                (stored_dpid(copy.dpid), stored_dpid(copy.origin[0]), copy.origin[1],
                                 int(copy.cancelled), encode_change(copy.change),
                                 None if copy.vm is None else json.dumps(copy.vm))).lastrowid
                for copy in copies]

    def load_copies(self) -> list[tuple[int, Copy]]:
        """The copies stored and not made yet, in the order they were asked for."""
        return [(row_id, Copy(loaded_dpid(dpid), (loaded_dpid(origin), mac), bool(cancelled),
                              decode_change(loaded_dpid(origin), mac, change), vm and tuple(json.loads(vm))))
                for row_id, dpid, origin, mac, cancelled, change, vm
                in self.db.execute("SELECT id, dpid, origin_dpid, mac, cancelled, change, vm FROM copies ORDER BY id")]

    def forget_copy(self, copy_id: int | None) -> None:
        """A copy that changed nothing (or could not be made): not to be made again."""
        if copy_id is not None:
            with self._transaction():
                self.db.execute("DELETE FROM copies WHERE id = ?", (copy_id,))

    def load_inventories(self) -> dict[int, list[PortIdentity | Underlay]]:
        return {loaded_dpid(dpid): [_loaded_entry(e) for e in json.loads(body)]
                for dpid, body in self.db.execute("SELECT dpid, body FROM ports ORDER BY dpid")}

    def save(self, before: State, after: State, answers: list[tuple[tuple[str, int, int], Answer, str]],
             among=None, added=None, copies: list[Copy] = (), made: int | None = None) -> list[int]:
        """Write the middleboxes that changed (``among`` these keys, if given; their
        filters: only those added or removed) and the (key, answer, command text) rows, in
        one transaction; prune channels that stored many answers since their last pruning.
        ``added``: by key, the filters ``after`` adds to a middlebox it changes no other
        way (``Draft.added``), written without comparing its whole filter sets.  In the same
        transaction: the ``copies`` the change asks for (their ids are returned), and the
        copy this change ``made`` (its id) forgotten."""
        changed = before.changed_keys(after, among)
        if not changed and not answers and not copies and made is None:
            return []
        now = time.time()
        with self._transaction():
            if made is not None:
                self.db.execute("DELETE FROM copies WHERE id = ?", (made,))
            for key in sorted(changed):
                self._save_middlebox(key, before.by_key.get(key), after.by_key.get(key), (added or {}).get(key))
            self.db.executemany(
                "INSERT OR IGNORE INTO answers (channel, epoch, seq, status, text, code, command, stored) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*key, answer.status, answer.text, answer.code, command, now) for key, answer, command in answers])
            for channel in {key[0] for key, _, _ in answers}:
                self._count_and_prune(channel, sum(1 for key, _, _ in answers if key[0] == channel), now)
            return self._add_copies(copies)

    def _save_middlebox(self, key: tuple[int, str], old: Middlebox | None, new: Middlebox | None,
                        added=None) -> None:
        key = (stored_dpid(key[0]), key[1])
        if new is None:
            self.db.execute("DELETE FROM middleboxes WHERE dpid = ? AND mac = ?", key)
            self.db.execute("DELETE FROM filter_texts WHERE dpid = ? AND mac = ?", key)
            return
        self.db.execute("INSERT OR REPLACE INTO middleboxes VALUES (?, ?, ?)", (*key, encode_middlebox(new)))
        if added is None:
            had = old.filters if old is not None else frozenset()
            if new.filters is had:
                return
            if not had <= new.filters:  # some went: the middlebox's rows become one
                self.db.execute("DELETE FROM filter_texts WHERE dpid = ? AND mac = ?", key)
                added = new.filters
            else:
                added = new.filters - had
        if added:
            self.db.execute("INSERT INTO filter_texts VALUES (?, ?, ?)",
                            (*key, "\n".join([filter_text(new.mac, f) for f in added])))

    def _count_and_prune(self, channel: str, stored: int, now: float) -> None:
        count = self.stored_since_prune.get(channel, 0) + stored
        if count < PRUNE_EVERY:
            self.stored_since_prune[channel] = count
            return
        self.stored_since_prune[channel] = 0
        self.prune(channel, now)

    def prune_old(self, now: float) -> None:
        """Every channel's answers older than KEEP_SECONDS, also of channels gone quiet."""
        with self._transaction():
            self.db.execute("DELETE FROM answers WHERE stored < ?", (now - KEEP_SECONDS,))

    def prune(self, channel: str, now: float) -> None:
        """Keep the channel's newest KEEP_PER_CHANNEL answers younger than KEEP_SECONDS."""
        self.db.execute("DELETE FROM answers WHERE channel = ? AND stored < ?", (channel, now - KEEP_SECONDS))
        newest_gone = self.db.execute("SELECT rowid FROM answers WHERE channel = ? ORDER BY rowid DESC LIMIT 1 "
                                      "OFFSET ?", (channel, KEEP_PER_CHANNEL)).fetchone()
        if newest_gone is not None:  # rows are numbered as stored: the older ones go (half the cost of NOT IN)
            self.db.execute("DELETE FROM answers WHERE channel = ? AND rowid <= ?", (channel, newest_gone[0]))

    def stored_keys(self, keys: list[tuple[str, int, int]]) -> set[tuple[str, int, int]]:
        """Those of ``keys`` with a stored answer: one range query per channel and epoch
        (a frame's keys are consecutive), not one query per key."""
        seqs: dict[tuple[str, int], list[int]] = defaultdict(list)
        for channel, epoch, seq in keys:
            seqs[(channel, epoch)].append(seq)
        stored = set()
        for (channel, epoch), among in seqs.items():
            stored.update((channel, epoch, seq) for (seq,) in self.db.execute(
                "SELECT seq FROM answers WHERE channel = ? AND epoch = ? AND seq BETWEEN ? AND ?",
                (channel, epoch, min(among), max(among))))
        return stored

    def answer(self, key: tuple[str, int, int]) -> tuple[str | None, Answer] | None:
        """(command text, answer) stored for ``key``; the text is None for rows written
        before commands were stored (they replay without the reuse check)."""
        row = self.db.execute("SELECT command, status, text, code FROM answers WHERE channel = ? AND epoch = ? "
                              "AND seq = ?", key).fetchone()
        return None if row is None else (row[0], Answer(row[1], row[2], row[3]))

    def answer_count(self, channel: str | None = None) -> int:
        if channel is None:
            return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM answers WHERE channel = ?", (channel,)).fetchone()[0]
