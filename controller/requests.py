"""What crosses the boundary between the REST edge and the command service.

The edge validates a request whole here, before the service sees any of it, so a bad
batch changes nothing and every refusal names the field at fault.  The service parses
the command text itself: a grammar error is an answer (status SYNTAX), not a bad request.
Pure: no I/O except ``read_token_file``, and nothing from the REST or service layers.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

from mbvisor.guest.errors import InvalidValueError
from mbvisor.guest.fields import MAC_ADDRESS

from .trust import MAX_ADDRESSES, TENANT, PortIdentity, Underlay, canonical

MAX_DPID = 2**64 - 1
MAX_PORT = 0xFFFFFF00  # OFPP_MAX: numbers above it are OpenFlow's reserved ports
MAX_COMMAND_CHARS = 4096
MAX_CHANNEL_CHARS = 256
MAX_EPOCH = 2**32 - 1
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER is signed 64-bit
MAX_BATCH = 200_000
KEY_FIELDS = ("channel", "epoch", "seq")
COMMAND_FIELDS = frozenset(("dpid", "port", "command", *KEY_FIELDS))
BATCH_FIELD = "commands"
ANSWERS_FIELD = "answers"  # in a batch: "all" (the default) or "failures"
ANSWER_MODES = ("all", "failures")
CLIP_CHARS = 200

_HEX_DPID = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,16}")


class CommandRequest(NamedTuple):
    """What the host agent posts: the command, where its guest lives, its idempotency key.
    A named tuple: a batch makes up to 200,000, and a frozen dataclass costs three times
    as much to make."""

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


class Answer(NamedTuple):
    """``status`` is a channel status name (OK, SYNTAX, REJECTED, UNAVAILABLE, ...).  A
    named tuple: a bulk request makes one per command, and a frozen dataclass costs
    twice as much to make."""

    status: str
    text: str
    code: str = "ok"
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def ok_answer(text: str) -> Answer:
    """``Answer("OK", text)``, made without the named tuple's argument handling (half the
    time): a bulk request makes one per command."""
    return _new_tuple(Answer, ("OK", text, "ok", False))


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


def requests_from_body(body, pause: Callable[[], None] = lambda: None) -> list[CommandRequest]:
    """Every command of a request body (one command object or the batch form), all
    validated before any is returned, so nothing of a bad batch is applied.  ``pause`` is
    called after each command: the REST server passes a ``pacing.Pacer``, which yields
    every few milliseconds, so a 200,000-command batch (about a second of checks) does
    not stop every other request meanwhile."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object: one command or {\"commands\": [...]}")
    if not is_batch(body):
        return [request_from_json(body)]
    _refuse_unknown(body, _BATCH_FIELDS)
    answers_wanted(body)
    commands = body[BATCH_FIELD]
    if not isinstance(commands, list) or len(commands) > MAX_BATCH:
        raise BadRequest(BATCH_FIELD, f"must be a list of at most {MAX_BATCH} command objects")
    requests = []
    same = None  # (dpid, port, request) of the last item read in full
    for index, item in enumerate(commands):
        if same is not None and _names_same_place(item, same):
            requests.append(_with_command(same[2], item["command"]))
        else:
            request = request_from_json(item, f"{BATCH_FIELD}[{index}]")
            requests.append(request)
            same = (item["dpid"], item["port"], request)
        pause()
    return requests


_BATCH_FIELDS = frozenset((BATCH_FIELD, ANSWERS_FIELD))


def flag_from(value: str | None, field: str) -> bool:
    """A query flag: absent or ``false`` is False, ``true`` True; anything else is refused."""
    if value in (None, "false"):
        return False
    if value == "true":
        return True
    raise BadRequest(field, "must be true or false")


def answers_wanted(body: dict) -> str:
    """Which answers a batch asks for: ``all``, one per command (the default), or
    ``failures``, only those not OK, each with its command's index: a bulk loader of
    100,000 filters then reads a few bytes, not 10 MB of echoes."""
    mode = body.get(ANSWERS_FIELD, "all")
    if mode not in ANSWER_MODES:
        raise BadRequest(ANSWERS_FIELD, f"must be one of {', '.join(ANSWER_MODES)}")
    return mode


def _names_same_place(item, same: tuple) -> bool:
    """Whether ``item`` is exactly ``{"dpid", "port", "command"}`` with the dpid and port
    (equal and of the same JSON type) of the item read in full before it, and command
    text within bounds: then it needs no other check."""
    dpid, port, _ = same
    return (type(item) is dict and len(item) == 3 and type(command := item.get("command")) is str
            and len(command) <= MAX_COMMAND_CHARS
            and type(item.get("dpid")) is type(dpid) and item["dpid"] == dpid
            and type(item.get("port")) is type(port) and item["port"] == port)


def _with_command(request: CommandRequest, command: str) -> CommandRequest:
    """``request`` with another command text and no key: a batch item that names the same
    switch and port as the one before, with nothing else, checked without reading those
    again (a bulk loader's batch is 1,000 of them; reading each in full cost 1.5 us)."""
    return _new_tuple(CommandRequest, (request.dpid, request.port, command, None, None, None))


_new_tuple = tuple.__new__


def request_from_json(body, where: str = "") -> CommandRequest:
    """One command object as a request; ``where`` prefixes the field names in errors."""
    if not isinstance(body, dict):
        raise BadRequest(where or "body", "must be a JSON object with dpid, port and command")
    try:
        return _request(body)
    except BadRequest as error:
        if not where:
            raise
        raise BadRequest(f"{where}.{error.field}", error.message) from None


def dpid_from(value) -> int:
    """A datapath id: an integer, or hex text as the API prints it (``00000000000000a1``)."""
    if isinstance(value, str):
        return _dpid_from_text(value)
    if type(value) is int and 0 <= value <= MAX_DPID:
        return value
    raise _bad_dpid()


@lru_cache(maxsize=1024)
def _dpid_from_text(text: str) -> int:
    """Read once per text: every command of a batch names its switch, usually the same."""
    if _HEX_DPID.fullmatch(text):
        return int(text, 16)
    raise _bad_dpid()


def _bad_dpid() -> BadRequest:
    return BadRequest("dpid", f"must be an integer 0..{MAX_DPID} or 1-16 hex digits (optionally 0x)")


def mac_from(value: str) -> str:
    """A MAC address in its canonical lower-case form, as the grammar reads it."""
    try:
        return MAC_ADDRESS.parse(value)
    except InvalidValueError:
        raise BadRequest("mac", "must be a MAC address, six hex pairs like 52:34:56:00:12:22") from None


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path``, without surrounding white space.  An empty file is an
    error, not "no token": treating it as none would silently open every write."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty; put a secret in it or give no token file")
    return token


def _request(body: dict) -> CommandRequest:
    """The checks of one command object; field names are built only for an error, since a
    batch has up to 200,000 of these."""
    _refuse_unknown(body, COMMAND_FIELDS)
    for field in ("dpid", "port", "command"):
        if body.get(field) is None:
            raise BadRequest(field, "required")
    channel, epoch, seq = key = (body.get("channel"), body.get("epoch"), body.get("seq"))
    if None in key and key != (None, None, None):
        given = [field for field, value in zip(KEY_FIELDS, key) if value is not None]
        missing = next(field for field, value in zip(KEY_FIELDS, key) if value is None)
        raise BadRequest(missing, f"required with {' and '.join(given)}: the idempotency key is channel, epoch and seq")
    return CommandRequest(
        dpid_from(body["dpid"]),
        _integer(body["port"], "port", 1, MAX_PORT),
        _command(body["command"]),
        None if channel is None else _channel(channel),
        None if epoch is None else _integer(epoch, "epoch", 0, MAX_EPOCH),
        None if seq is None else _integer(seq, "seq", 0, MAX_SEQ),
    )


def _refuse_unknown(body: dict, known: frozenset[str]) -> None:
    """A misspelt field (``sequence`` for ``seq``) must not be ignored silently."""
    if not known.issuperset(body):  # no set of the difference: a batch checks 200,000 bodies
        field = next(field for field in body if field not in known)
        raise BadRequest(clip(str(field), 40), f"unknown field; expected {', '.join(sorted(known))}")


def _integer(value, field: str, low: int, high: int) -> int:
    # type() rather than isinstance(): JSON true is a bool, and bool is an int in Python.
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(field, f"must be an integer {low}..{high}")
    return value


def _command(value) -> dict | str:
    """Text or an object, bounded alike: an object's JSON counts as its text."""
    if isinstance(value, dict):
        size = len(json.dumps(value, separators=(",", ":")))
        if size <= MAX_COMMAND_CHARS:
            return value
        raise BadRequest("command", f"a command object must be at most {MAX_COMMAND_CHARS} characters of JSON "
                                    f"(got {size})")
    if isinstance(value, str) and len(value) <= MAX_COMMAND_CHARS:
        return value
    got = f" (got {len(value)})" if isinstance(value, str) else ""
    raise BadRequest("command", f"must be command text of at most {MAX_COMMAND_CHARS} characters{got}, "
                                "or a command object")


def _channel(value) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CHANNEL_CHARS:
        raise BadRequest("channel", f"must be a string of 1..{MAX_CHANNEL_CHARS} characters")
    return value


PORT_FIELDS = frozenset(("port", "interface", "mac", "vm_id", "tenant", "ips"))
MAX_PORTS = 4096  # annotated ports per switch in one inventory


def inventory_from_body(body) -> list[PortIdentity | Underlay]:
    """A switch's annotated ports (and its underlay ports) as the agent publishes them,
    validated whole: one bad entry refuses the request (the inventory replaces the
    switch's, so half of one would drop ports' protection)."""
    if not isinstance(body, dict):
        raise BadRequest("body", 'must be a JSON object {"ports": [...]}')
    _refuse_unknown(body, frozenset(("ports", "underlay")))
    entries: list[PortIdentity | Underlay] = []
    for name, read in (("ports", _port_identity), ("underlay", _underlay)):
        items = body.get(name, [] if name == "underlay" else None)
        if not isinstance(items, list) or len(items) > MAX_PORTS:
            raise BadRequest(name, f"must be a list of at most {MAX_PORTS} port objects")
        for index, item in enumerate(items):
            try:
                entries.append(read(item))
            except BadRequest as error:
                raise BadRequest(f"{name}[{index}].{error.field}", error.message) from None
    return entries


def inventory_body(entries) -> dict:
    """The body of ``entries`` (``inventory_from_body`` reads it back)."""
    return {"ports": [port_identity_body(e) for e in entries if isinstance(e, PortIdentity)],
            "underlay": [underlay_body(e) for e in entries if isinstance(e, Underlay)]}


def port_identity_body(identity: PortIdentity) -> dict:
    return {"port": identity.port, "interface": identity.interface, "mac": identity.mac, "vm_id": identity.vm_id,
            "tenant": identity.tenant, "ips": list(identity.ips)}


def underlay_body(underlay: Underlay) -> dict:
    return {"port": underlay.port, "interface": underlay.interface,
            "leads_to": ["*"] if underlay.leads_to is None else [f"{d:016x}" for d in sorted(underlay.leads_to)]}


UNDERLAY_FIELDS = frozenset(("port", "interface", "leads_to"))
MAX_PEERS = 1024  # switches one underlay port names


def _underlay(item) -> Underlay:
    if not isinstance(item, dict):
        raise BadRequest("body", "must be an object with port and leads_to")
    _refuse_unknown(item, UNDERLAY_FIELDS)
    if item.get("port") is None:
        raise BadRequest("port", "required")
    interface = item.get("interface", "")
    if not isinstance(interface, str) or len(interface) > MAX_CHANNEL_CHARS:
        raise BadRequest("interface", f"must be a string of at most {MAX_CHANNEL_CHARS} characters")
    leads_to = item.get("leads_to", ["*"])
    if not isinstance(leads_to, list) or not 0 < len(leads_to) <= MAX_PEERS:
        raise BadRequest("leads_to", f'must be ["*"] or a list of 1..{MAX_PEERS} datapath ids')
    if leads_to == ["*"]:
        return Underlay(_integer(item["port"], "port", 1, MAX_PORT), interface, None)
    try:
        if not all(isinstance(value, str) for value in leads_to):  # as the API prints them
            raise _bad_dpid()
        peers = frozenset(dpid_from(value) for value in leads_to)
    except BadRequest:
        raise BadRequest("leads_to", f'must be ["*"] or a list of 1..{MAX_PEERS} datapath ids') from None
    return Underlay(_integer(item["port"], "port", 1, MAX_PORT), interface, peers)


def _port_identity(item) -> PortIdentity:
    if not isinstance(item, dict):
        raise BadRequest("body", "must be an object with port, mac, tenant and ips")
    _refuse_unknown(item, PORT_FIELDS)
    for field in ("port", "mac", "tenant"):
        if item.get(field) is None:
            raise BadRequest(field, "required")
    tenant = item["tenant"]
    if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
        raise BadRequest("tenant", "must be 1..64 letters, digits, '.', '_', ':' or '-', starting with a letter "
                                   "or digit")
    ips = item.get("ips", [])
    if not isinstance(ips, list) or len(ips) > MAX_ADDRESSES:
        raise BadRequest("ips", f"must be a list of at most {MAX_ADDRESSES} IP addresses")
    addresses = []
    for address in ips:
        try:
            if not isinstance(address, str):  # ipaddress would take 0 or false for 0.0.0.0
                raise TypeError(address)
            addresses.append(canonical(address))
        except (ValueError, TypeError):
            raise BadRequest("ips", f"{clip(json.dumps(address), 60)} is not an IP address text") from None
    text = {}
    for field in ("interface", "vm_id"):
        value = item.get(field, "")
        if not isinstance(value, str) or len(value) > MAX_CHANNEL_CHARS:
            raise BadRequest(field, f"must be a string of at most {MAX_CHANNEL_CHARS} characters")
        text[field] = value
    mac = mac_from(item["mac"]) if isinstance(item["mac"], str) else mac_from("")
    if int(mac.split(":")[0], 16) & 1 or mac == "00:00:00:00:00:00":
        raise BadRequest("mac", "must be a unicast MAC address")
    return PortIdentity(_integer(item["port"], "port", 1, MAX_PORT), mac, tenant, text["vm_id"],
                        tuple(dict.fromkeys(addresses)), text["interface"])

