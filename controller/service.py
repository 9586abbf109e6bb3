"""The controller's command path: idempotency, apply, install, persist, answer.

Kept apart from the OS-Ken event handlers (``app``) so the order of the steps is readable
in one place: a duplicate is answered from the store; a command is applied to a copy of the
state; the switch must confirm the flows before the new state is saved and the command is
answered; if the switch refuses, the old flows are put back and the state stays as it was.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mbvisor.guest.commands import Command, Query, RegisterLoadBalancer, command_from_dict
from mbvisor.guest.errors import CommandError
from mbvisor.guest.grammar import parse_command

from .metrics import Metrics
from .model import ApplyError, Binding, Limits, State, apply
from .store import Store

log = logging.getLogger("mbvisor.controller")


@dataclass(frozen=True)
class Settings:
    database: Path
    rest_host: str = "127.0.0.1"
    rest_port: int = 8181
    token: str | None = None
    limits: Limits = Limits()

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Settings":
        """Managers give apps no arguments of their own; ``mbvisor controller`` sets these."""
        state_dir = Path(environ.get("MBVISOR_STATE_DIR", "/var/lib/mbvisor"))
        return cls(
            database=Path(environ.get("MBVISOR_DB", state_dir / "controller.sqlite")),
            rest_host=environ.get("MBVISOR_REST_HOST", "127.0.0.1"),
            rest_port=int(environ.get("MBVISOR_REST_PORT", "8181")),
            token=environ.get("MBVISOR_TOKEN") or None,
            limits=Limits(filters=int(environ.get("MBVISOR_MAX_FILTERS", "1000")),
                          redirects=int(environ.get("MBVISOR_MAX_REDIRECTS", "64"))),
        )


@dataclass(frozen=True)
class CommandRequest:
    """What the host agent posts: the command, where its guest lives, its idempotency key."""

    dpid: int
    port: int
    command: dict | str
    channel: str | None = None
    epoch: int | None = None
    seq: int | None = None

    @property
    def key(self) -> tuple[str, int, int] | None:
        if self.channel is None or self.epoch is None or self.seq is None:
            return None
        return (self.channel, self.epoch, self.seq)

    def parsed(self) -> Command:
        if isinstance(self.command, str):
            return parse_command(self.command)
        return command_from_dict(self.command)


@dataclass(frozen=True)
class Answer:
    """``status`` is a channel status name (OK, SYNTAX, REJECTED, UNAVAILABLE, ...)."""

    status: str
    text: str
    code: str = "ok"
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass
class Core:
    settings: Settings
    switches: object  # the app: install(), resolve(), resync(), switches
    state: State = field(init=False)
    store: Store = field(init=False)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.store = Store(self.settings.database)
        self.state = self.store.load(self.settings.limits)
        self.metrics = Metrics()
        log.info("loaded %d middlebox(es) from %s", len(self.state.middleboxes), self.settings.database)

    def start_rest(self) -> None:
        from .rest import start_server

        start_server(self, self.settings)

    def execute(self, request: CommandRequest) -> Answer:
        return self.execute_all([request])[0]

    def execute_all(self, requests: list[CommandRequest]) -> list[Answer]:
        """Apply commands in order and answer each.  The flows of everything they change
        go to each switch together, confirmed by one barrier; if a switch refuses them,
        every command that changed something is answered REJECTED and nothing changes."""
        answers: list[Answer | None] = [None] * len(requests)
        state, touched, applied = self.state, set(), []
        for index, request in enumerate(requests):
            answer, state, changed = self._apply(request, state)
            answers[index] = answer
            if changed:
                touched.add((request.dpid, changed))
                applied.append(index)
        if applied:
            failure = self._install(state, touched, requests, applied)
            if failure is not None:
                for index in applied:
                    answers[index] = failure
                state = self.state
        self.store.save(self.state, state, [(r.key, a.status, a.text) for r, a in zip(requests, answers)
                                            if r.key is not None and not a.replayed and a.status != "UNAVAILABLE"])
        self.state = state
        # One line per command, except in bulk: a batch gets one summary line at INFO.
        detail = log.info if len(requests) == 1 else log.debug
        for request, answer in zip(requests, answers):
            self.metrics.command(answer.status)
            detail("command %s on %016x port %s key %s: %s %s", _short(request.command), request.dpid,
                   request.port, request.key, answer.status, answer.text.splitlines()[0] if answer.text else "")
        if len(requests) > 1:
            counts = Counter(answer.status for answer in answers)
            log.info("batch of %d commands: %s", len(requests),
                     ", ".join(f"{status} {count}" for status, count in sorted(counts.items())))
        return answers

    def _apply(self, request: CommandRequest, state: State) -> tuple[Answer, State, str | None]:
        """(answer, state after, MAC whose flows changed or None) for one command."""
        if request.key is not None and (previous := self.store.answer(request.key)) is not None:
            return Answer(previous[0], previous[1], replayed=True), state, None
        try:
            command = request.parsed()
        except CommandError as error:
            return Answer("SYNTAX", str(error), "syntax"), state, None
        try:
            outcome = apply(state, Binding(request.dpid, request.port), command)
        except ApplyError as error:
            return Answer("REJECTED", str(error), error.code), state, None
        if isinstance(command, Query) or outcome.state is state:
            return Answer("OK", outcome.text), state, None
        if request.dpid not in self.switches.switches:
            return Answer("UNAVAILABLE", f"switch {request.dpid:016x} is not connected; try again",
                          "switch-down"), state, None
        if isinstance(command, RegisterLoadBalancer):
            self.switches.resolve(request.dpid, command.backends)
        return Answer("OK", outcome.text), outcome.state, command.mac

    def _install(self, state: State, touched: set, requests, applied) -> Answer | None:
        """Install ``state``'s flows for the touched middleboxes; the failure answer, if any."""
        try:
            errors = self.switches.install(self.state, state, touched)
        except Exception as error:  # a bug here must cost these commands, not the controller
            log.exception("installing flows for %d command(s) failed", len(applied))
            for dpid in {dpid for dpid, _ in touched}:
                self.switches.resync(dpid)
            return Answer("INTERNAL", f"internal error while installing flows: {error}", "internal")
        if not errors:
            return None
        self.switches.install(state, self.state, touched)
        return Answer("REJECTED", "switch refused: " + "; ".join(errors), "switch-error")

    def delete_middlebox(self, dpid: int, mac: str) -> Answer:
        """The operator's delete: like the guest's X, without a guest."""
        middlebox = self.state.find(dpid, mac)
        if middlebox is None:
            return Answer("REJECTED", f"no middlebox {mac} on {dpid:016x}", "not-found")
        return self.execute(CommandRequest(dpid, middlebox.port, f"X {mac}"))


def _short(command: dict | str) -> str:
    return command if isinstance(command, str) else str(command.get("op"))
