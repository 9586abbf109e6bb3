"""Parsing and canonical formatting of single command values.

Each kind of value (MAC address, EtherType, port range, ...) is a `ValueKind`:
a parser from text to its canonical Python value and a formatter back.  Keeping
them as data lets the text parser, the dict decoder and the documentation all
use the same definitions, so a value accepted in one place is accepted in all.
Parsers raise `InvalidValueError` without a column; the caller knows where the
text came from and attaches it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from .errors import InvalidValueError

Value = str | int | tuple[int, int] | None

# Twelve digits is far beyond any valid number here and keeps int() cheap and safe.
_DECIMAL = re.compile(r"[0-9]{1,12}")
_HEX = re.compile(r"0x[0-9a-fA-F]{1,12}")
_MAC = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}")
_PORTS = re.compile(r"([0-9]{1,12})(?:-([0-9]{1,12}))?")
_ANY_SOURCE = ("*", "any")


@dataclass(frozen=True)
class ValueKind:
    """What a value is called, what forms it takes, and how to read and write it."""

    noun: str
    expected: str
    parse: Callable[[str], Value]
    format: Callable[[Value], str] = str

    def rejection(self, text: str, shown: str | None = None) -> InvalidValueError:
        """The standard "this is not a X; expected Y" error (`shown` overrides the quoted text)."""
        shown = f"'{text}'" if shown is None else shown
        return InvalidValueError(f"{shown} is not {self.noun}; expected {self.expected}", token=text)


def _number_kind(
    noun: str,
    expected: str,
    accepts: Callable[[int], bool],
    names: dict[str, int] | None = None,
    hexadecimal: bool = False,
    format: Callable[[int], str] = str,
) -> ValueKind:
    """A numeric value that may also be written as a name (or in hex)."""

    def parse(text: str) -> int:
        if names and text in names:
            return names[text]
        if _DECIMAL.fullmatch(text):
            number = int(text)
        elif hexadecimal and _HEX.fullmatch(text):
            number = int(text, 16)
        else:
            raise kind.rejection(text)
        if not accepts(number):
            raise kind.rejection(text)
        return number

    kind = ValueKind(noun, expected, parse, format)
    return kind  # `parse` above refers to it for its error message


def _parse_mac(text: str) -> str:
    if not _MAC.fullmatch(text):
        raise MAC_ADDRESS.rejection(text)
    return text.lower().replace("-", ":")


def _parse_ip_address(text: str) -> str:
    # Scope ids ("fe80::1%eth0") are host-local and could smuggle frame syntax.
    try:
        if "%" in text:
            raise ValueError(text)
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise IP_ADDRESS.rejection(text) from None


def _parse_ip_endpoint(text: str) -> str:
    """An address or a network; a full-length prefix is just the address."""
    if "/" not in text:
        return _parse_ip_address(text)
    try:
        if "%" in text:
            raise ValueError(text)
        network = ipaddress.ip_network(text)
    except ValueError:
        try:
            suggestion = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise IP_ENDPOINT.rejection(text) from None
        raise InvalidValueError(
            f"'{text}' has host bits set; did you mean {suggestion}?", token=text
        ) from None
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _parse_redirect_source(text: str) -> str | None:
    """None means "any source": `*`, `any` or the unspecified address."""
    if text in _ANY_SOURCE:
        return None
    endpoint = _parse_ip_endpoint(text)
    if "/" not in endpoint and ipaddress.ip_address(endpoint).is_unspecified:
        return None
    return endpoint


def _parse_ports(text: str) -> tuple[int, int]:
    match = _PORTS.fullmatch(text)
    if not match:
        raise PORT_RANGE.rejection(text)
    low = int(match[1])
    high = int(match[2]) if match[2] is not None else low
    if high > 65535:
        raise PORT_RANGE.rejection(text)
    if low > high:
        raise InvalidValueError(
            f"'{text}' is not a port range; the low port {low} is above the high port {high}", token=text
        )
    return (low, high)


def _format_ports(ports: tuple[int, int]) -> str:
    low, high = ports
    return str(low) if low == high else f"{low}-{high}"


def _format_redirect_source(source: str | None) -> str:
    return "*" if source is None else source


def ip_family(text: str) -> int:
    """4 or 6 for a canonical address or network (as this module's parsers return
    them).  Canonical IPv6 text always has a colon and IPv4 text never does; reading
    that, not re-parsing with `ipaddress`, keeps the family checks of 100,000 filters cheap."""
    return 6 if ":" in text else 4


def family_name(text: str) -> str:
    return f"IPv{ip_family(text)}"


ETHERTYPE_NAMES = {"ipv4": 0x0800, "arp": 0x0806, "ipv6": 0x86DD, "vlan": 0x8100, "lldp": 0x88CC}
IP_PROTOCOL_NAMES = {
    "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47,
    "esp": 50, "ah": 51, "icmpv6": 58, "ospf": 89, "sctp": 132,
}  # fmt: skip
TRANSPORT_PROTOCOL_NAMES = {"tcp": 6, "udp": 17, "sctp": 132}
DSCP_NAMES = {
    "be": 0,
    "ef": 46,
    "va": 44,
    **{f"cs{klass}": 8 * klass for klass in range(8)},
    **{f"af{klass}{drop}": 8 * klass + 2 * drop for klass in range(1, 5) for drop in range(1, 4)},
}

MAC_ADDRESS = ValueKind("a MAC address", "six hex pairs like 52:34:56:00:12:22", _parse_mac)
IP_ADDRESS = ValueKind(
    "an IP address", "an IPv4 or IPv6 address like 10.0.0.5 or 2001:db8::5", _parse_ip_address
)
IP_ENDPOINT = ValueKind(
    "an IP address or network", "an IPv4/IPv6 address or CIDR like 10.0.0.0/8", _parse_ip_endpoint
)
REDIRECT_SOURCE = ValueKind(
    "a redirect source",
    "* (any source) or an IPv4/IPv6 address or CIDR like 10.0.0.0/8",
    _parse_redirect_source,
    _format_redirect_source,
)
PORT_RANGE = ValueKind(
    "a port or port range", "a port 0-65535 or a range like 1024-2047", _parse_ports, _format_ports
)
ETHERTYPE = _number_kind(
    "an EtherType",
    "0x0600-0xffff (hex or decimal) or ipv4, arp, ipv6, vlan, lldp",
    lambda number: 0x0600 <= number <= 0xFFFF,
    ETHERTYPE_NAMES,
    hexadecimal=True,
    format=lambda number: f"0x{number:04x}",
)
VLAN_PCP = _number_kind("a VLAN PCP", "a number 0-7", lambda number: number <= 7)
DSCP = _number_kind(
    "a DSCP value", "a number 0-63 or be, cs0-cs7, af11-af43, ef, va", lambda number: number <= 63, DSCP_NAMES
)
IP_PROTOCOL = _number_kind(
    "an IP protocol",
    "a number 0-255 or " + ", ".join(IP_PROTOCOL_NAMES),
    lambda number: number <= 255,
    IP_PROTOCOL_NAMES,
)
TRANSPORT_PROTOCOL = _number_kind(
    "a transport protocol",
    "tcp, udp or sctp (or 6, 17, 132)",
    lambda number: number in TRANSPORT_PROTOCOL_NAMES.values(),
    TRANSPORT_PROTOCOL_NAMES,
)
FILTER_MASK = _number_kind(
    "a filter mask", "a number 1-15 (d=8 s=4 t=2 p=1)", lambda number: 1 <= number <= 15
)
REDIRECT_TYPE = _number_kind(
    "a redirect type", "0 (all traffic) or 1 (only traffic from srcip)", lambda number: number <= 1
)


def value_from_json(kind: ValueKind, value: object) -> Value:
    """Decode a JSON value with the same rules as its text form.

    Numbers and `[low, high]` pairs are turned into their text spelling first, so
    the dict decoder needs no second set of validation rules.
    """
    if isinstance(value, str):
        return kind.parse(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return kind.parse(str(value))
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(end, int) and not isinstance(end, bool) for end in value)
    ):
        return kind.parse(f"{value[0]}-{value[1]}")
    raise kind.rejection(repr(value), shown=repr(value))
