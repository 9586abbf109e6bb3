"""What crosses the boundary between the REST edge and the command service.

The edge validates a request whole here, before the service sees any of it, so a bad
batch changes nothing and every refusal names the field at fault.  The service parses
the command text itself: a grammar error is an answer (status SYNTAX), not a bad request.
Pure: no I/O except ``read_token_file``, and nothing from the REST or service layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mbvisor.guest.errors import InvalidValueError
from mbvisor.guest.fields import MAC_ADDRESS

MAX_DPID = 2**64 - 1
MAX_PORT = 0xFFFFFF00  # OFPP_MAX: numbers above it are OpenFlow's reserved ports
MAX_COMMAND_CHARS = 4096
MAX_CHANNEL_CHARS = 256
MAX_EPOCH = 2**32 - 1
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER is signed 64-bit
MAX_BATCH = 200_000
KEY_FIELDS = ("channel", "epoch", "seq")
COMMAND_FIELDS = ("dpid", "port", "command", *KEY_FIELDS)
BATCH_FIELD = "commands"
CLIP_CHARS = 200

_HEX_DPID = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,16}")


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


class BadRequest(ValueError):
    """An input refused at the edge; ``field`` says where (``commands[1].port``) so the
    client can fix it without reading our code, ``message`` what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SwitchUnavailable(Exception):
    """The switch a read needs is not connected: its counters are unknown, not zero."""


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """``text`` cut to ``limit`` characters with its length, so nothing a client sends can
    make one log line (or one error message) large."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def is_batch(body) -> bool:
    """The batch form ``{"commands": [...]}`` rather than one command object."""
    return isinstance(body, dict) and BATCH_FIELD in body


def requests_from_body(body) -> list[CommandRequest]:
    """Every command of a request body (one command object or the batch form), all
    validated before any is returned, so nothing of a bad batch is applied."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object: one command or {\"commands\": [...]}")
    if not is_batch(body):
        return [request_from_json(body)]
    _refuse_unknown(body, (BATCH_FIELD,), "")
    commands = body[BATCH_FIELD]
    if not isinstance(commands, list) or len(commands) > MAX_BATCH:
        raise BadRequest(BATCH_FIELD, f"must be a list of at most {MAX_BATCH} command objects")
    return [request_from_json(item, f"{BATCH_FIELD}[{index}]") for index, item in enumerate(commands)]


def request_from_json(body, where: str = "") -> CommandRequest:
    """One command object as a request; ``where`` prefixes the field names in errors."""
    if not isinstance(body, dict):
        raise BadRequest(where or "body", "must be a JSON object with dpid, port and command")
    _refuse_unknown(body, COMMAND_FIELDS, where)
    for field in ("dpid", "port", "command"):
        if body.get(field) is None:
            raise BadRequest(_field(where, field), "required")
    channel, epoch, seq = (body.get(field) for field in KEY_FIELDS)
    given = [field for field in KEY_FIELDS if body.get(field) is not None]
    if given and len(given) < len(KEY_FIELDS):
        missing = next(field for field in KEY_FIELDS if field not in given)
        raise BadRequest(_field(where, missing),
                         f"required with {' and '.join(given)}: the idempotency key is channel, epoch and seq")
    return CommandRequest(
        dpid=dpid_from(body["dpid"], _field(where, "dpid")),
        port=_integer(body["port"], _field(where, "port"), 1, MAX_PORT),
        command=_command(body["command"], _field(where, "command")),
        channel=None if channel is None else _channel(channel, _field(where, "channel")),
        epoch=None if epoch is None else _integer(epoch, _field(where, "epoch"), 0, MAX_EPOCH),
        seq=None if seq is None else _integer(seq, _field(where, "seq"), 0, MAX_SEQ),
    )


def dpid_from(value, field: str = "dpid") -> int:
    """A datapath id: an integer, or hex text as the API prints it (``00000000000000a1``)."""
    if isinstance(value, str) and _HEX_DPID.fullmatch(value):
        return int(value, 16)
    if type(value) is int and 0 <= value <= MAX_DPID:
        return value
    raise BadRequest(field, f"must be an integer 0..{MAX_DPID} or 1-16 hex digits (optionally 0x)")


def mac_from(value: str, field: str = "mac") -> str:
    """A MAC address in its canonical lower-case form, as the grammar reads it."""
    try:
        return MAC_ADDRESS.parse(value)
    except InvalidValueError:
        raise BadRequest(field, "must be a MAC address, six hex pairs like 52:34:56:00:12:22") from None


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path``, without surrounding white space.  An empty file is an
    error, not "no token": treating it as none would silently open every write."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty; put a secret in it or give no token file")
    return token


def _refuse_unknown(body: dict, known: tuple[str, ...], where: str) -> None:
    """A misspelt field (``sequence`` for ``seq``) must not be ignored silently."""
    for field in body:
        if field not in known:
            raise BadRequest(_field(where, clip(str(field), 40)), f"unknown field; expected {', '.join(known)}")


def _field(where: str, field: str) -> str:
    return f"{where}.{field}" if where else field


def _integer(value, field: str, low: int, high: int) -> int:
    # type() rather than isinstance(): JSON true is a bool, and bool is an int in Python.
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(field, f"must be an integer {low}..{high}")
    return value


def _command(value, field: str) -> dict | str:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and len(value) <= MAX_COMMAND_CHARS:
        return value
    got = f" (got {len(value)})" if isinstance(value, str) else ""
    raise BadRequest(field, f"must be command text of at most {MAX_COMMAND_CHARS} characters{got}, "
                            "or a command object")


def _channel(value, field: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CHANNEL_CHARS:
        raise BadRequest(field, f"must be a string of 1..{MAX_CHANNEL_CHARS} characters")
    return value
