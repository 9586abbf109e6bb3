"""Where mbvisor's pipeline sits among the switch's tables, so it can run in front of
another OpenFlow app (FAUCET's table offset).

The compilers number mbvisor's tables from 0 (``pipeline.py``) and let what they do not
handle continue to ovs's ``NORMAL``.  A ``Placement`` moves every table, and every
action that names one (goto, resubmit, the conntrack actions' recirculation), up by
``offset``, and hands what mbvisor lets through to ``next_table`` (another app's first
table) instead of ``NORMAL``.  It is applied where compiled flows meet the switch (the
reconciler), so the compilers and their tests stay in logical tables; the default
placement changes nothing and costs nothing.
"""

from __future__ import annotations

from typing import NamedTuple

from .pipeline import FRAGMENT_TABLE, Flow, Group

LAST_TABLE = FRAGMENT_TABLE  # the highest logical table mbvisor uses
MAX_TABLE = 253              # OpenFlow's tables are 0..254, and OVS keeps 254 for itself (no app may write it)
_TABLE_AT = {"goto": 1, "resubmit": 1, "ct_nat": 2, "ct_commit": 2}  # action -> index of its table


class Placement(NamedTuple):
    """mbvisor owns tables ``offset`` .. ``offset + LAST_TABLE``; what it lets through goes
    to table ``next_table`` (None: to ``NORMAL``, as a standalone switch)."""

    offset: int = 0
    next_table: int | None = None

    @property
    def is_default(self) -> bool:
        return self.offset == 0 and self.next_table is None

    @property
    def tables(self) -> range:
        return range(self.offset, self.offset + LAST_TABLE + 1)

    def check(self) -> "Placement":
        """Itself, or ValueError saying what is wrong: the tables must exist, and the next
        table must come after mbvisor's (a goto only goes forward)."""
        if not 0 <= self.offset <= MAX_TABLE - LAST_TABLE:
            raise ValueError(f"the table offset must be 0..{MAX_TABLE - LAST_TABLE} (mbvisor uses "
                             f"{LAST_TABLE + 1} tables, up to table {MAX_TABLE}), not {self.offset}")
        if self.next_table is not None and not self.tables.stop <= self.next_table <= MAX_TABLE:
            raise ValueError(f"the next table must be {self.tables.stop}..{MAX_TABLE}: after mbvisor's tables "
                             f"{self.tables.start}..{self.tables.stop - 1}, not {self.next_table}")
        return self

    def flow(self, flow: Flow) -> Flow:
        return Flow(flow.table + self.offset, flow.priority, flow.match, self.actions(flow.actions, "goto"),
                    flow.cookie)

    def group(self, group: Group) -> Group:
        """A bucket cannot hold an instruction: its hand-off is a resubmit."""
        return Group(group.group_id, tuple(self.actions(bucket, "resubmit") for bucket in group.buckets))

    def actions(self, actions: tuple, hand_off: str) -> tuple:
        placed = []
        for action in actions:
            kind = action[0]
            if kind == "normal" and self.next_table is not None:
                action = (hand_off, self.next_table)
            elif kind in _TABLE_AT:
                index = _TABLE_AT[kind]
                action = (*action[:index], action[index] + self.offset, *action[index + 1:])
            placed.append(action)
        return tuple(placed)

    def logical_table(self, table: int) -> int:
        """The compilers' number of a switch table (counters are read from the switch)."""
        return table - self.offset


def placement_from(offset: str | None, next_table: str | None) -> Placement:
    """A placement from settings' text (``MBVISOR_TABLE_OFFSET``, ``MBVISOR_NEXT_TABLE``);
    ValueError with the reason for anything else than table numbers that fit."""
    def number(text: str | None, name: str) -> int | None:
        if text is None or text.strip() == "":
            return None
        try:
            return int(text, 10)
        except ValueError:
            raise ValueError(f"{name} must be a table number, not {text!r}") from None

    return Placement(number(offset, "the table offset") or 0, number(next_table, "the next table")).check()
