"""The command data model and its JSON form.

Commands are plain frozen dataclasses holding canonical values, so two commands
that mean the same thing compare equal however they were spelled.  The dict form
is what the host forwards to the controller over HTTP; `command_from_dict`
re-validates it with the same value rules and cross-field checks as the text
parser, because a dict from the network is no more trusted than text.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, ClassVar, NamedTuple, Union

from . import fields as kinds
from .errors import (
    CommandError,
    InvalidValueError,
    MissingTokenError,
    UnexpectedTokenError,
    UnknownCommandError,
)
from .fields import Value, ValueKind

MAX_BACKENDS = 64


class Layer(StrEnum):
    """The packet layer a filter looks at (the report's I, M, T letters)."""

    IP = "I"
    MAC = "M"
    TRANSPORT = "T"


# Python 3.11 finds an enum's members on its class through a descriptor (about 50 ns a
# look-up); the bulk path's checks, several per filter, compare with these instead.
IP_LAYER, MAC_LAYER, TRANSPORT_LAYER = Layer.IP, Layer.MAC, Layer.TRANSPORT


def _parse_layer(text: str) -> Layer:
    if text not in Layer._value2member_map_:
        raise LAYER.rejection(text)
    return Layer(text)


LAYER = ValueKind("a filter layer", "I, M or T", _parse_layer)

# A query's skip count: at most what a 32-bit signed integer holds, so a guest library in C
# reads it into an int; no middlebox has that many filters.
MAX_SKIP = 2**31 - 1
_SKIP = re.compile(r"[0-9]{1,10}")


def _parse_skip(text: str) -> int:
    if not _SKIP.fullmatch(text) or int(text) > MAX_SKIP:
        raise QUERY_SKIP.rejection(text)
    return int(text)


QUERY_SKIP = ValueKind("a skip count", f"a number 0-{MAX_SKIP} (how many of the sorted filters to leave out)",
                       _parse_skip)


@dataclass(frozen=True)
class FieldSpec:
    """One filter field: its letter in the grammar, its attribute, its mask bit."""

    letter: str
    attribute: str
    bit: int


# Canonical (output) order s d t p; mask bits d=8 s=4 t=2 p=1.
FILTER_FIELDS = (
    FieldSpec("s", "source", 4),
    FieldSpec("d", "destination", 8),
    FieldSpec("t", "tos", 2),
    FieldSpec("p", "protocol", 1),
)
FIELD_BY_LETTER = {spec.letter: spec for spec in FILTER_FIELDS}

FIELD_KINDS: dict[Layer, dict[str, ValueKind]] = {
    Layer.MAC: {"s": kinds.MAC_ADDRESS, "d": kinds.MAC_ADDRESS, "t": kinds.VLAN_PCP, "p": kinds.ETHERTYPE},
    Layer.IP: {"s": kinds.IP_ENDPOINT, "d": kinds.IP_ENDPOINT, "t": kinds.DSCP, "p": kinds.IP_PROTOCOL},
    Layer.TRANSPORT: {
        "s": kinds.PORT_RANGE,
        "d": kinds.PORT_RANGE,
        "t": kinds.DSCP,
        "p": kinds.TRANSPORT_PROTOCOL,
    },
}


def mask_letters(mask: int) -> list[str]:
    """The field letters a mask selects, in bit order (d s t p) so the sum reads naturally."""
    return [spec.letter for spec in sorted(FILTER_FIELDS, key=lambda spec: -spec.bit) if mask & spec.bit]


class Filter(NamedTuple):
    """A deny rule: packets to the MB matching every given (non-None) field are dropped.

    A named tuple, not a frozen dataclass: a bulk install makes 100,000 of them and keeps
    them in sets, and a tuple is built in a quarter of the time and hashed and compared
    without a Python call."""

    layer: Layer
    source: Value = None
    destination: Value = None
    tos: Value = None
    protocol: Value = None

    @property
    def mask(self) -> int:
        # A plain loop over prepared pairs: parsing and formatting a bulk request's
        # 100,000 filters each ask for it, and a sum over a generator costs twice as much.
        mask = 0
        for attribute, bit in _ATTRIBUTE_BITS:
            if getattr(self, attribute) is not None:
                mask |= bit
        return mask


_ATTRIBUTE_BITS = tuple((spec.attribute, spec.bit) for spec in FILTER_FIELDS)


@dataclass(frozen=True)
class RegisterFirewall:
    op: ClassVar[str] = "register_firewall"
    mac: str
    ip: str


@dataclass(frozen=True)
class RegisterLoadBalancer:
    """Type 0 sends all of the MB's traffic to the backends (source None = any);
    type 1 only traffic from `source`."""

    op: ClassVar[str] = "register_load_balancer"
    mac: str
    ip: str
    redirect_type: int
    source: str | None
    backends: tuple[str, ...]


@dataclass(frozen=True)
class AddFilter:
    op: ClassVar[str] = "add_filter"
    mac: str
    filter: Filter


@dataclass(frozen=True)
class DeleteFilter:
    """Remove exactly this filter."""

    op: ClassVar[str] = "delete_filter"
    mac: str
    filter: Filter


@dataclass(frozen=True)
class DeleteFilters:
    """Remove every filter of `layer` whose mask is `mask`, whatever its values."""

    op: ClassVar[str] = "delete_filters"
    mac: str
    layer: Layer
    mask: int


@dataclass(frozen=True)
class Cancel:
    op: ClassVar[str] = "cancel"
    mac: str


@dataclass(frozen=True)
class CancelRedirect:
    """One load-balancer redirect withdrawn (the one ``R L`` made for ``source``; None:
    the any-source redirect), the MB's other redirects and its firewall kept."""

    op: ClassVar[str] = "cancel_redirect"
    mac: str
    source: str | None


@dataclass(frozen=True)
class Query:
    """The MB's filters of `layer`, sorted; the answer leaves out the first `skip` of them
    (and still counts them), so a list longer than one answer slot is read page by page."""

    op: ClassVar[str] = "query"
    mac: str
    layer: Layer
    skip: int = 0


Command = Union[RegisterFirewall, RegisterLoadBalancer, AddFilter, DeleteFilter, DeleteFilters, Cancel, CancelRedirect,
                Query]


# ---- cross-field rules, shared by the text parser and the dict decoder ----


def check_filter(filter: Filter) -> None:
    """Rules no single value can check.  Errors name the offending field so the
    text parser can point at its token."""
    if filter.mask == 0:
        raise InvalidValueError("a filter must match at least one field (s, d, t or p)")
    check_fields_agree(filter)


def check_fields_agree(filter: Filter) -> None:
    """`check_filter` for a filter known to have a field (the parser read its mask)."""
    if filter.layer is IP_LAYER and filter.source is not None and filter.destination is not None:
        _check_same_family(filter.destination, filter.source, "destination", "source")


def check_load_balancer(command: RegisterLoadBalancer) -> None:
    if command.redirect_type == 0 and command.source is not None:
        raise InvalidValueError(
            f"type 0 redirects all traffic, so the source must be * (not '{command.source}');"
            " use type 1 to redirect only traffic from that source",
            token=command.source,
            field="source",
        )
    if command.redirect_type == 1 and command.source is None:
        raise InvalidValueError(
            "type 1 redirects only traffic from one source, so give its address or network;"
            " use type 0 to redirect all traffic",
            token="*",
            field="source",
        )
    _check_backends(command.backends)
    if command.source is not None:
        _check_same_family(command.source, command.ip, "source", "MB address")
    _check_same_family(command.backends[0], command.ip, "backends", "MB address")


def _check_backends(backends: tuple[str, ...]) -> None:
    if not backends:
        raise MissingTokenError("missing backend address; expected at least one", field="backends")
    if len(backends) > MAX_BACKENDS:
        raise InvalidValueError(
            f"{len(backends)} backends given; at most {MAX_BACKENDS} are allowed", field="backends"
        )
    seen: set[str] = set()
    for backend in backends:
        if backend in seen:
            raise InvalidValueError(f"backend '{backend}' is listed twice", token=backend, field="backends")
        seen.add(backend)
        _check_same_family(backend, backends[0], "backends", "first backend")


def _check_same_family(value: str, reference: str, field: str, reference_name: str) -> None:
    if kinds.ip_family(value) != kinds.ip_family(reference):
        raise InvalidValueError(
            f"'{value}' is {kinds.family_name(value)} but the {reference_name} '{reference}'"
            f" is {kinds.family_name(reference)}; both must be the same family",
            token=value,
            field=field,
        )


# ---- JSON form ----


def command_to_dict(command: Command) -> dict:
    """A dict of plain JSON types with an "op" discriminator.  A query of the whole list
    has no "skip" key: its form from before paging existed."""
    data = {"op": command.op, **_to_json(dataclasses.asdict(command))}
    if isinstance(command, Query) and command.skip == 0:
        del data["skip"]
    return data


def _to_json(value: object) -> object:
    if isinstance(value, Filter):
        return _to_json(value._asdict())
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, Layer):
        return value.value
    return value


Decoder = Callable[[object, str], object]


def _required(kind: ValueKind) -> Decoder:
    return lambda value, field: kinds.value_from_json(kind, value)


def _optional(kind: ValueKind) -> Decoder:
    return lambda value, field: None if value is None else kinds.value_from_json(kind, value)


def _decode_backends(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidValueError(f"{value!r} is not a list of backend addresses", field=field)
    return tuple(kinds.value_from_json(kinds.IP_ADDRESS, item) for item in value)


def _decode_filter(value: object, field: str) -> Filter:
    layer = value.get("layer") if isinstance(value, dict) else None
    # An invalid layer fails on the "layer" key, decoded first; the IP kinds are then never used.
    layer_kinds = FIELD_KINDS[layer] if isinstance(layer, str) and layer in FIELD_KINDS else FIELD_KINDS[Layer.IP]
    decoders = {
        "layer": _required(LAYER),
        **{spec.attribute: _optional(layer_kinds[spec.letter]) for spec in FILTER_FIELDS},
    }
    filter = Filter(**_decode_object(value, decoders, field))
    try:
        check_filter(filter)
    except CommandError as error:
        raise error.located(field=f"{field}.{error.field}" if error.field else field) from None
    return filter


_MAC = _required(kinds.MAC_ADDRESS)
_DECODERS: dict[str, tuple[type, dict[str, Decoder]]] = {
    RegisterFirewall.op: (RegisterFirewall, {"mac": _MAC, "ip": _required(kinds.IP_ADDRESS)}),
    RegisterLoadBalancer.op: (
        RegisterLoadBalancer,
        {
            "mac": _MAC,
            "ip": _required(kinds.IP_ADDRESS),
            "redirect_type": _required(kinds.REDIRECT_TYPE),
            "source": _optional(kinds.REDIRECT_SOURCE),
            "backends": _decode_backends,
        },
    ),
    AddFilter.op: (AddFilter, {"mac": _MAC, "filter": _decode_filter}),
    DeleteFilter.op: (DeleteFilter, {"mac": _MAC, "filter": _decode_filter}),
    DeleteFilters.op: (
        DeleteFilters,
        {"mac": _MAC, "layer": _required(LAYER), "mask": _required(kinds.FILTER_MASK)},
    ),
    Cancel.op: (Cancel, {"mac": _MAC}),
    CancelRedirect.op: (CancelRedirect, {"mac": _MAC, "source": _optional(kinds.REDIRECT_SOURCE)}),
    Query.op: (Query, {"mac": _MAC, "layer": _required(LAYER), "skip": _required(QUERY_SKIP)}),
}
# Keys that may be left out, with the value they then have.
_DEFAULTS: dict[str, dict[str, object]] = {Query.op: {"skip": 0}}


def _decode_object(value: object, decoders: dict[str, Decoder], path: str) -> dict:
    """Decode exactly the keys `decoders` names; errors carry the key path (e.g. filter.source)."""
    where = path or None
    if not isinstance(value, dict):
        raise InvalidValueError(f"{value!r} is not an object", field=where)
    for key in value:
        if key not in decoders:
            raise UnexpectedTokenError(f"unexpected key {key!r}", token=str(key), field=where)
    decoded = {}
    for key, decode in decoders.items():
        if key not in value:
            raise MissingTokenError(f"missing key {key!r}", token=key, field=where)
        field = f"{path}.{key}" if path else key
        try:
            decoded[key] = decode(value[key], field)
        except CommandError as error:
            raise (error if error.field else error.located(field=field)) from None
    return decoded


def command_from_dict(data: object) -> Command:
    """The inverse of `command_to_dict`: validates like the text parser and raises
    the same `CommandError` subclasses on bad input."""
    if not isinstance(data, dict):
        raise InvalidValueError(f"{data!r} is not an object")
    op = data.get("op")
    if not isinstance(op, str) or op not in _DECODERS:
        raise UnknownCommandError(
            f"{op!r} is not a command op; expected one of {', '.join(_DECODERS)}", field="op"
        )
    command_class, decoders = _DECODERS[op]
    body = {**_DEFAULTS.get(op, {}), **{key: value for key, value in data.items() if key != "op"}}
    command = command_class(**_decode_object(body, decoders, ""))
    if isinstance(command, RegisterLoadBalancer):
        check_load_balancer(command)
    return command
