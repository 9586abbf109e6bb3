"""The difference between what a switch should hold and what it holds.

Flows are identified the way OpenFlow identifies them: table, priority and match.  A
flow whose identity exists on both sides with the same actions and cookie is left alone
(its counters keep counting); one with other actions is modified in place, which keeps
its counters too; only flows nobody wants any more are deleted.  Only flows carrying
mbvisor's cookie tag are considered, so other applications' flows are never touched.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterable

from .flows import SwitchConfig
from .pipeline import COOKIE_TAG, COOKIE_TAG_MASK, Flow, Group
from .stepping import let_go, pausing


@dataclass(frozen=True)
class Changes:
    add_groups: tuple[Group, ...] = ()
    modify_groups: tuple[Group, ...] = ()
    add_flows: tuple[Flow, ...] = ()
    modify_flows: tuple[Flow, ...] = ()
    delete_flows: tuple[Flow, ...] = ()
    delete_groups: tuple[int, ...] = ()

    def __add__(self, other: "Changes") -> "Changes":
        return Changes(*(mine + theirs for mine, theirs in zip(self.__dict__.values(), other.__dict__.values())))

    @property
    def empty(self) -> bool:
        return not any((self.add_groups, self.modify_groups, self.add_flows, self.modify_flows,
                        self.delete_flows, self.delete_groups))

    def summary(self) -> str:
        return (f"+{len(self.add_flows)} ~{len(self.modify_flows)} -{len(self.delete_flows)} flows, "
                f"+{len(self.add_groups)} ~{len(self.modify_groups)} -{len(self.delete_groups)} groups")


def ours(flow: Flow) -> bool:
    return flow.cookie & COOKIE_TAG_MASK == COOKIE_TAG


def _identity(flow: Flow) -> tuple:
    return (flow.table, flow.priority, flow.match)


def same_flow(desired: Flow, installed: Flow) -> bool:
    return (desired.actions, desired.cookie) == (installed.actions, installed.cookie)


def reconcile(desired: SwitchConfig, flows: Iterable[Flow], groups: Iterable[Group],
              managed_groups: set[int] | None = None,
              same: Callable[[Flow, Flow], bool] = same_flow,
              same_group: Callable[[Group, Group], bool] = operator.eq,
              pause: Callable[[], None] = lambda: None) -> Changes:
    """Messages that turn the installed ``flows``/``groups`` into ``desired``.

    ``managed_groups`` are the group ids mbvisor may delete (groups carry no cookie); by
    default every installed group not desired is considered ours.  ``same``/``same_group``
    compare a desired item with an installed one (the shell compares wire encodings).
    Flows come in no particular order: the changes of one job go to the switch in one
    bundle, and no two of them share an identity, so their order changes nothing there
    (sorting 200,000 matches cost more than encoding them).  Groups are few: sorted.
    ``pause`` is called every few flows read or compared (stepping.py)."""
    wanted = {_identity(f): f for f in pausing(desired.flows, pause)}
    present = {_identity(f): f for f in pausing(flows, pause) if ours(f)}
    add, modify = [], []
    for key, flow in pausing(wanted.items(), pause):
        had = present.get(key)
        if had is None:
            add.append(flow)
        elif not same(flow, had):
            modify.append(flow)
    delete = tuple(f for key, f in pausing(present.items(), pause) if key not in wanted)
    wanted_groups = {g.group_id: g for g in desired.groups}
    present_groups = {g.group_id: g for g in groups}
    removable = set(present_groups) if managed_groups is None else managed_groups & set(present_groups)
    changes = Changes(
        add_groups=tuple(sorted(g for i, g in wanted_groups.items() if i not in present_groups)),
        modify_groups=tuple(sorted(g for i, g in wanted_groups.items()
                                   if i in present_groups and not same_group(g, present_groups[i]))),
        add_flows=tuple(add),
        modify_flows=tuple(modify),
        delete_flows=delete,
        delete_groups=tuple(sorted(i for i in removable if i not in wanted_groups)),
    )
    let_go(wanted, pause)  # 25,000 identities freed at once held the loop for milliseconds
    let_go(present, pause)
    return changes
