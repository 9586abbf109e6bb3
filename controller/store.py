"""Desired state on disk (SQLite), so a restarted controller restores every offload, and
the first answer to each idempotency key, so a command forwarded twice applies once."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from mbvisor.guest.commands import AddFilter, RegisterLoadBalancer
from mbvisor.guest.grammar import format_command, parse_command

from .model import Limits, Middlebox, Redirect, State

SCHEMA = """
CREATE TABLE IF NOT EXISTS middleboxes (
    dpid INTEGER NOT NULL, mac TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (dpid, mac));
CREATE TABLE IF NOT EXISTS answers (
    channel TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    status TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (channel, epoch, seq));
"""


def encode_middlebox(middlebox: Middlebox) -> str:
    """Filters and redirects in their canonical command text: readable and versionless."""
    redirects = [format_command(RegisterLoadBalancer(middlebox.mac, middlebox.balancer_ip, 1 if r.source else 0,
                                                     r.source, r.backends)) for r in middlebox.redirects]
    return json.dumps({
        "port": middlebox.port, "zone": middlebox.zone, "firewall_ip": middlebox.firewall_ip,
        "balancer_ip": middlebox.balancer_ip,
        "filters": sorted(format_command(AddFilter(middlebox.mac, f)) for f in middlebox.filters),
        "redirects": redirects,
    })


def decode_middlebox(dpid: int, mac: str, body: str) -> Middlebox:
    data = json.loads(body)
    redirects = tuple(Redirect(c.source, c.backends) for c in map(parse_command, data["redirects"]))
    return Middlebox(dpid, data["port"], mac, data["zone"], data["firewall_ip"], data["balancer_ip"],
                     frozenset(parse_command(text).filter for text in data["filters"]), redirects)


class Store:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def load(self, limits: Limits) -> State:
        rows = self.db.execute("SELECT dpid, mac, body FROM middleboxes ORDER BY dpid, mac").fetchall()
        return State.of((decode_middlebox(*row) for row in rows), limits)

    def save(self, before: State, after: State, answers: list[tuple[tuple[str, int, int], str, str]]) -> None:
        """Write the middleboxes that changed and the answers by key, in one transaction."""
        changed = before.changed_keys(after)
        if not changed and not answers:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM middleboxes WHERE dpid = ? AND mac = ?", sorted(changed))
            self.db.executemany("INSERT INTO middleboxes VALUES (?, ?, ?)",
                                [(*key, encode_middlebox(after.by_key[key])) for key in sorted(changed)
                                 if key in after.by_key])
            self.db.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?)",
                                [(*key, status, text) for key, status, text in answers])

    def answer(self, key: tuple[str, int, int]) -> tuple[str, str] | None:
        return self.db.execute("SELECT status, text FROM answers WHERE channel = ? AND epoch = ? AND seq = ?",
                               key).fetchone()
