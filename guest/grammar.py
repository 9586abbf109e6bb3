"""Text grammar of MB commands: framing, parsing and canonical formatting.

The guest writes commands as text (the report's format), the host parses them.
Parsing is strict and every rejection is a `CommandError` pointing at a column,
because the person who typed the command (or the MB software that generated it)
needs to know exactly what to fix.  Formatting is canonical, so
`parse_command(format_command(c)) == c` and equal commands format identically.
Well-formed commands in their everyday spellings take a single-pass fast path
(bulk requests carry 100,000 commands); everything else, including every error,
goes through the token-by-token parser that knows the columns.
"""

from __future__ import annotations

import functools
import itertools
import re
import socket
from dataclasses import dataclass
from typing import Callable

from . import fields as kinds
from .commands import (
    FIELD_BY_LETTER,
    FIELD_KINDS,
    FILTER_FIELDS,
    LAYER,
    QUERY_SKIP,
    AddFilter,
    Cancel,
    CancelRedirect,
    Command,
    DeleteFilter,
    DeleteFilters,
    Filter,
    Layer,
    Query,
    RegisterFirewall,
    RegisterLoadBalancer,
    TRANSPORT_LAYER,
    check_fields_agree,
    check_filter,
    check_load_balancer,
    mask_letters,
)
from .errors import (
    CommandError,
    DuplicateFieldError,
    EncodingError,
    FramingError,
    MaskMismatchError,
    MissingTokenError,
    UnexpectedTokenError,
    UnknownCommandError,
)
from .fields import ValueKind

MAX_TEXT_BYTES = 4096
FRAME_MARK = "@"
_BLANKS = " \t"
_TOKEN = re.compile(r"[^ \t]+")


# ---- text decoding and framing ----


def decode_text(text: str | bytes) -> str:
    """Check size, encoding and alphabet; commands are printable ASCII plus space and tab."""
    if len(text) > MAX_TEXT_BYTES:
        raise FramingError(
            f"text is {len(text)} {'bytes' if isinstance(text, bytes) else 'characters'} long;"
            f" at most {MAX_TEXT_BYTES} bytes are allowed",
            column=MAX_TEXT_BYTES + 1,
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            byte = text[error.start]
            raise EncodingError(
                f"byte 0x{byte:02x} is not valid UTF-8; commands are printable ASCII text",
                column=error.start + 1,
                token=f"\\x{byte:02x}",
            ) from None
    for index, character in enumerate(text):
        if not (" " <= character <= "~" or character == "\t"):
            kind = "non-ASCII" if ord(character) > 0x7F else "control"
            raise EncodingError(
                f"{kind} character U+{ord(character):04X} is not allowed; commands are printable ASCII text",
                column=index + 1,
                token=character,
            )
    return text


def split_frame(text: str | bytes) -> list[tuple[int, str]]:
    """The commands of a framed text as (column of the command's first character,
    command text), so a host can parse and report each one on its own.

    Text without any `@` is one bare command (leniency for humans at a prompt).
    """
    text = decode_text(text)
    if FRAME_MARK not in text:
        return [(1, text)]
    commands = []
    position = 0
    while True:
        position = _skip_blanks(text, position)
        if position == len(text):
            return commands
        if text[position] != FRAME_MARK:
            raise FramingError(
                f"text outside a frame; expected {FRAME_MARK}command{FRAME_MARK}",
                column=position + 1,
                token=_TOKEN.match(text, position)[0],
            )
        end = text.find(FRAME_MARK, position + 1)
        if end < 0:
            raise FramingError(
                f"frame is not terminated; expected a closing {FRAME_MARK}", column=position + 1, token=FRAME_MARK
            )
        body = text[position + 1 : end]
        if not body.strip(_BLANKS):
            raise FramingError("empty frame; expected a command between the @ marks", column=position + 1, token=text[position : end + 1])
        commands.append((position + 2, body))
        position = end + 1


def _skip_blanks(text: str, position: int) -> int:
    while position < len(text) and text[position] in _BLANKS:
        position += 1
    return position


def parse_frame(text: str | bytes) -> list[Command]:
    """Every command of a framed text; the first bad one raises (columns are in the whole text)."""
    return [parse_command(body, first_column=column) for column, body in split_frame(text)]


def format_frame(commands: list[Command]) -> str:
    return "".join(f"{FRAME_MARK}{format_command(command)}{FRAME_MARK}" for command in commands)


# ---- tokens ----


@dataclass(frozen=True)
class Token:
    text: str
    column: int


@dataclass
class _Tokens:
    """The tokens of one command, consumed left to right."""

    tokens: list[Token]
    end_column: int
    position: int = 0

    def peek(self) -> Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, what: str, expected: str) -> Token:
        token = self.peek()
        if token is None:
            raise MissingTokenError(f"missing {what}; expected {expected}", column=self.end_column)
        self.position += 1
        return token

    def take_value(self, kind: ValueKind, what: str) -> tuple[Token, object]:
        token = self.take(what, kind.expected)
        return token, parse_value(kind, token)

    def finish(self) -> None:
        token = self.peek()
        if token is not None:
            raise UnexpectedTokenError(
                f"unexpected '{token.text}' after the end of the command", column=token.column, token=token.text
            )


def _tokenize(text: str, first_column: int) -> _Tokens:
    offset = first_column - 1
    tokens = [Token(match[0], match.start() + 1 + offset) for match in _TOKEN.finditer(text)]
    end_column = tokens[-1].column + len(tokens[-1].text) if tokens else first_column
    return _Tokens(tokens, end_column)


def parse_value(kind: ValueKind, token: Token):
    try:
        return kind.parse(token.text)
    except CommandError as error:
        raise error.located(column=token.column) from None


def _checked(check: Callable[[], None], tokens_by_field: dict[str, Token]) -> None:
    """Run a cross-field check, pointing its error at the token of the field it names."""
    try:
        check()
    except CommandError as error:
        token = tokens_by_field.get(error.field)
        raise (error.located(column=token.column) if token else error) from None


# ---- parsing ----


def parse_command(text: str | bytes, first_column: int = 1) -> Command:
    """One bare (unframed) command.  `first_column` is the column of the text's first
    character in a larger text, so errors point into that text."""
    command = _parse_well_formed(text)
    return command if command is not None else _parse_token_by_token(text, first_column)


def _parse_token_by_token(text: str | bytes, first_column: int) -> Command:
    """The full parser: every token keeps its column, so any error can point at it."""
    tokens = _tokenize(decode_text(text), first_column)
    letter = tokens.take("command", "R, A, D, X, I, M or T")
    parser = _PARSERS.get(letter.text)
    if parser is None:
        raise UnknownCommandError(
            f"'{letter.text}' is not a command; expected R, A, D, X, I, M or T", column=letter.column, token=letter.text
        )
    command = parser(tokens)
    tokens.finish()
    return command


def _take_mac(tokens: _Tokens) -> tuple[Token, str]:
    return tokens.take_value(kinds.MAC_ADDRESS, "MB MAC address")


def _parse_register(tokens: _Tokens) -> Command:
    service = tokens.take("service", "F (firewall) or L (load balancer)")
    if service.text == "F":
        _, mac = _take_mac(tokens)
        _, ip = tokens.take_value(kinds.IP_ADDRESS, "MB IP address")
        return RegisterFirewall(mac, ip)
    if service.text == "L":
        return _parse_load_balancer(tokens)
    raise UnknownCommandError(
        f"'{service.text}' is not a service; expected F (firewall) or L (load balancer)",
        column=service.column,
        token=service.text,
    )


def _parse_load_balancer(tokens: _Tokens) -> RegisterLoadBalancer:
    mac_token, mac = _take_mac(tokens)
    ip_token, ip = tokens.take_value(kinds.IP_ADDRESS, "MB IP address")
    type_token, redirect_type = tokens.take_value(kinds.REDIRECT_TYPE, "redirect type")
    source_token, source = tokens.take_value(kinds.REDIRECT_SOURCE, "redirect source")
    backends_token = tokens.take("backend address", "an address or a comma-separated list like 10.0.0.5,10.0.0.6")
    command = RegisterLoadBalancer(mac, ip, redirect_type, source, _parse_backends(backends_token))
    _checked(
        lambda: check_load_balancer(command),
        {"source": source_token, "backends": backends_token, "ip": ip_token},
    )
    return command


def _parse_backends(token: Token) -> tuple[str, ...]:
    backends = []
    column = token.column
    for item in token.text.split(","):
        if not item:
            raise MissingTokenError(
                "missing backend address in the list; expected addresses separated by single commas",
                column=column,
                token=token.text,
            )
        backends.append(parse_value(kinds.IP_ADDRESS, Token(item, column)))
        column += len(item) + 1
    return tuple(backends)


def _parse_cancel(tokens: _Tokens) -> Cancel | CancelRedirect:
    """``X <mac>``: everything; ``X <mac> L <srcip>``: the redirect ``R L`` made for that
    source (``*``: the any-source one)."""
    _, mac = _take_mac(tokens)
    if tokens.peek() is None:
        return Cancel(mac)
    service = tokens.take("service", "L (one load-balancer redirect) or nothing (the whole registration)")
    if service.text != "L":
        raise UnknownCommandError(
            f"'{service.text}' is not what X cancels; expected L <srcip> (one load-balancer redirect) "
            "or nothing (the whole registration)",
            column=service.column,
            token=service.text,
        )
    _, source = tokens.take_value(kinds.REDIRECT_SOURCE, "redirect source")
    return CancelRedirect(mac, source)


def _parse_query(layer: Layer) -> Callable[[_Tokens], Query]:
    """``I <mac>``, or ``I <mac> <skip>`` for the page of the list after its first skip filters."""

    def parse(tokens: _Tokens) -> Query:
        _, mac = _take_mac(tokens)
        skip = tokens.take_value(QUERY_SKIP, "skip count")[1] if tokens.peek() is not None else 0
        return Query(mac, layer, skip)

    return parse


@dataclass(frozen=True)
class _FieldTokens:
    letter: Token
    value: Token | None


def _parse_filter_command(adding: bool) -> Callable[[_Tokens], Command]:
    """A and D share their shape: mac, layer, mask, then field letters with values
    (A always; D either all or none)."""

    def parse(tokens: _Tokens) -> Command:
        _, mac = _take_mac(tokens)
        _, layer = tokens.take_value(LAYER, "filter layer")
        mask_token, mask = tokens.take_value(kinds.FILTER_MASK, "filter mask")
        given = _take_field_tokens(tokens)
        _check_letters(given, mask, mask_token)
        with_values = [field for field in given if field.value is not None]
        if not with_values and not adding:
            return DeleteFilters(mac, layer, mask)
        _check_all_have_values(given, tokens, adding)
        filter = _build_filter(layer, given)
        return AddFilter(mac, filter) if adding else DeleteFilter(mac, filter)

    return parse


def _take_field_tokens(tokens: _Tokens) -> list[_FieldTokens]:
    """Pair each field letter with the value after it, if the next token is not a letter."""
    given = []
    while (letter := tokens.peek()) is not None:
        tokens.position += 1
        if letter.text not in FIELD_BY_LETTER:
            raise UnexpectedTokenError(
                f"'{letter.text}' is not a field letter; expected s, d, t or p",
                column=letter.column,
                token=letter.text,
            )
        value = tokens.peek()
        if value is not None and value.text not in FIELD_BY_LETTER:
            tokens.position += 1
        else:
            value = None
        given.append(_FieldTokens(letter, value))
    return given


def _check_letters(given: list[_FieldTokens], mask: int, mask_token: Token) -> None:
    seen: set[str] = set()
    for field in given:
        if field.letter.text in seen:
            raise DuplicateFieldError(
                f"field {field.letter.text} is given twice; each field may appear once",
                column=field.letter.column,
                token=field.letter.text,
            )
        seen.add(field.letter.text)
    given_mask = sum(FIELD_BY_LETTER[letter].bit for letter in seen)
    if given_mask != mask:
        raise MaskMismatchError(
            f"mask {mask} means fields {' '.join(mask_letters(mask))}"
            f" but the command gives {' '.join(mask_letters(given_mask)) or 'none'}",
            column=mask_token.column,
            token=mask_token.text,
        )


def _check_all_have_values(given: list[_FieldTokens], tokens: _Tokens, adding: bool) -> None:
    rule = (
        "every field of a filter needs a value"
        if adding
        else "give every field a value (one exact filter) or none (every filter with this mask)"
    )
    for index, field in enumerate(given):
        if field.value is None:
            following = given[index + 1] if index + 1 < len(given) else None
            column = following.letter.column if following else tokens.end_column
            raise MissingTokenError(
                f"missing value for field {field.letter.text}; {rule}", column=column, token=field.letter.text
            )


def _build_filter(layer: Layer, given: list[_FieldTokens]) -> Filter:
    layer_kinds = FIELD_KINDS[layer]
    values = {}
    tokens_by_field = {}
    for field in given:
        spec = FIELD_BY_LETTER[field.letter.text]
        values[spec.attribute] = parse_value(layer_kinds[spec.letter], field.value)
        tokens_by_field[spec.attribute] = field.value
    filter = Filter(layer, **values)
    _checked(lambda: check_filter(filter), tokens_by_field)
    return filter


_PARSERS: dict[str, Callable[[_Tokens], Command]] = {
    "R": _parse_register,
    "A": _parse_filter_command(adding=True),
    "D": _parse_filter_command(adding=False),
    "X": _parse_cancel,
    **{layer.value: _parse_query(layer) for layer in Layer},
}


# ---- fast path ----


def _parse_well_formed(text: str | bytes) -> Command | None:
    """The command `text` spells if it is well formed in an everyday spelling, else None.

    The token-by-token parser above keeps every token's column so that any mistake
    can be pointed at; a valid command never needs that, and the bookkeeping costs
    most of its time.  This path splits the text once, checks the command's shape,
    converts values with the same `ValueKind` parsers (behind bounded caches, and
    without `ipaddress` for canonical IPv4 text) and runs the same cross-field checks.

    Contract: the result is either exactly the command the full parser returns for
    `text`, or None -- for anything wrong, unusual or ambiguous -- and then the full
    parser runs, so every error keeps its class, message and column.  It never raises.
    """
    if not isinstance(text, str) or len(text) > MAX_TEXT_BYTES or not _is_printable_ascii(text):
        return None
    # With only printable ASCII, spaces and tabs left, split() yields the same tokens as _TOKEN.
    tokens = text.split()
    count = len(tokens)
    if not count:
        return None
    letter = tokens[0]
    try:
        if letter == "A" or letter == "D":
            return _well_formed_filter_command(tokens, adding=letter == "A")
        if letter == "R" and count == 4 and tokens[1] == "F":
            return RegisterFirewall(_parse_mac(tokens[2]), _parse_ip_address(tokens[3]))
        if letter == "R" and count == 7 and tokens[1] == "L":
            return _well_formed_load_balancer(tokens)
        if letter == "X" and count == 2:
            return Cancel(_parse_mac(tokens[1]))
        if letter == "X" and count == 4 and tokens[2] == "L":
            return CancelRedirect(_parse_mac(tokens[1]), kinds.REDIRECT_SOURCE.parse(tokens[3]))
        if letter in _LAYER_BY_LETTER and (count == 2 or count == 3):
            skip = _parse_skip(tokens[2]) if count == 3 else 0
            return Query(_parse_mac(tokens[1]), _LAYER_BY_LETTER[letter], skip)
    except CommandError:
        return None
    return None


def _is_printable_ascii(text: str) -> bool:
    """What `decode_text` accepts: printable ASCII plus space and tab."""
    return text.isascii() and (text.isprintable() or text.replace("\t", " ").isprintable())


_LAYER_BY_LETTER = {layer.value: layer for layer in Layer}

# Every ordering of distinct field letters, with the mask it spells: one lookup tells
# whether a command's letters are all field letters, distinct, and match its mask.
_MASK_BY_LETTERS = {
    letters: sum(FIELD_BY_LETTER[letter].bit for letter in letters)
    for count in range(1, len(FILTER_FIELDS) + 1)
    for letters in itertools.permutations(FIELD_BY_LETTER, count)
}


def _well_formed_filter_command(tokens: list[str], adding: bool) -> Command | None:
    """A or D: mac, layer, mask, then letter-value pairs or (D only) bare letters."""
    if len(tokens) < 5:
        return None
    mac = _parse_mac(tokens[1])
    layer = _LAYER_BY_LETTER.get(tokens[2])
    mask = _parse_mask(tokens[3])
    if layer is None:
        return None
    if not adding and _MASK_BY_LETTERS.get(tuple(tokens[4:])) == mask:
        return DeleteFilters(mac, layer, mask)
    if len(tokens) == 6:  # one field, a bulk's usual shape: no slicing and pairing
        letter, value = tokens[4], tokens[5]
        # The full parser would pair a value that is itself a field letter differently.
        if _MASK_BY_LETTERS.get((letter,)) != mask or value in FIELD_BY_LETTER:
            return None
        fields = [layer, None, None, None, None]  # Filter's own order, built without its argument handling
        fields[_FIELD_POSITION[letter] + 1] = _FIELD_PARSERS[layer][letter](value)
        filter = _new_tuple(Filter, fields)  # one field: nothing for check_fields_agree to compare
        return AddFilter(mac, filter) if adding else DeleteFilter(mac, filter)
    letters, values = tokens[4::2], tokens[5::2]
    if (
        len(letters) != len(values)
        or _MASK_BY_LETTERS.get(tuple(letters)) != mask
        or not FIELD_BY_LETTER.keys().isdisjoint(values)
    ):
        return None
    parsers = _FIELD_PARSERS[layer]
    fields = [None] * len(FILTER_FIELDS)  # Filter's own order: built positionally, no keywords
    for letter, value in zip(letters, values):
        fields[_FIELD_POSITION[letter]] = parsers[letter](value)
    filter = Filter(layer, *fields)
    check_fields_agree(filter)  # the mask has a field: _MASK_BY_LETTERS has no empty one
    return AddFilter(mac, filter) if adding else DeleteFilter(mac, filter)


_new_tuple = tuple.__new__
_FIELD_POSITION = {spec.letter: Filter.__match_args__.index(spec.attribute) - 1 for spec in FILTER_FIELDS}


def _well_formed_load_balancer(tokens: list[str]) -> RegisterLoadBalancer:
    """R L; an empty backend in the list fails as an address, so the full parser reports it."""
    command = RegisterLoadBalancer(
        _parse_mac(tokens[2]),
        _parse_ip_address(tokens[3]),
        kinds.REDIRECT_TYPE.parse(tokens[4]),
        kinds.REDIRECT_SOURCE.parse(tokens[5]),
        tuple(_parse_ip_address(backend) for backend in tokens[6].split(",")),
    )
    check_load_balancer(command)
    return command


# Bounded caches: a bulk request repeats its MACs, masks, protocols and networks, but
# the host parses whatever text it is sent.  Values are immutable, so sharing them is
# safe; rejections raise and are not cached.
_CACHE_SIZE = 4096


@functools.cache
def _cached(kind: ValueKind) -> Callable[[str], object]:
    """`kind.parse` remembering recent texts (one cache per kind)."""
    return functools.lru_cache(maxsize=_CACHE_SIZE)(kind.parse)


_parse_mac = _cached(kinds.MAC_ADDRESS)
_parse_mask = _cached(kinds.FILTER_MASK)
_parse_skip = QUERY_SKIP.parse  # a follower's pages: few, and each skip differs

_IPV4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = rf"{_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}"
_CANONICAL_IPV4_ADDRESS = re.compile(_CANONICAL_IPV4)
_CANONICAL_IPV4_NETWORK = re.compile(rf"({_CANONICAL_IPV4})/(3[0-2]|[12]?[0-9])")


def _parse_ip_address(text: str) -> str:
    """`IP_ADDRESS.parse`.  A dotted quad without leading zeros or octets above 255 is
    its own canonical text: a bulk request's 100,000 distinct addresses need neither
    `ipaddress` nor a cache."""
    if _CANONICAL_IPV4_ADDRESS.fullmatch(text):
        return text
    return _cached(kinds.IP_ADDRESS)(text)


def _parse_ip_endpoint(text: str) -> str:
    """`IP_ENDPOINT.parse`, with the same shortcut for canonical dotted quads."""
    if _CANONICAL_IPV4_ADDRESS.fullmatch(text):
        return text
    return _parse_other_ip_endpoint(text)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_other_ip_endpoint(text: str) -> str:
    """`IP_ENDPOINT.parse` for what is not a canonical dotted quad; a canonical IPv4
    network (prefix without leading zeros) with no host bits set needs no `ipaddress`."""
    network = _CANONICAL_IPV4_NETWORK.fullmatch(text)
    if network:
        address, prefix = network[1], int(network[2])
        host_bits = int.from_bytes(socket.inet_aton(address), "big") & ((1 << (32 - prefix)) - 1)
        if not host_bits:
            return address if prefix == 32 else text
    return kinds.IP_ENDPOINT.parse(text)


_FIELD_PARSERS: dict[Layer, dict[str, Callable[[str], object]]] = {
    layer: {
        letter: _parse_ip_endpoint if kind is kinds.IP_ENDPOINT else _cached(kind)
        for letter, kind in layer_kinds.items()
    }
    for layer, layer_kinds in FIELD_KINDS.items()
}


# ---- formatting ----


def _filter_fields_and_mask(filter: Filter) -> tuple[str, int]:
    """The filter's letters and values, in s d t p order, and its mask: a bulk request's
    answers quote 100,000 filters, so each field is read once, here.  Addresses (IP and
    MAC layers' s and d) are their own canonical text, so a filter of addresses alone,
    a bulk's usual shape, is written without looking its fields up."""
    if filter.tos is None and filter.protocol is None and filter.layer is not TRANSPORT_LAYER:
        source, destination = filter.source, filter.destination
        if destination is None and source is not None:
            return f"s {source}", 4
        if source is None and destination is not None:
            return f"d {destination}", 8
        if source is not None:
            return f"s {source} d {destination}", 12
    kinds_of_layer = FIELD_KINDS[filter.layer]
    parts = []
    mask = 0
    for spec in FILTER_FIELDS:
        value = getattr(filter, spec.attribute)
        if value is not None:
            parts.append(f"{spec.letter} {kinds_of_layer[spec.letter].format(value)}")
            mask |= spec.bit
    return " ".join(parts), mask


def filter_command_text(letter: str, mac: str, filter: Filter) -> str:
    """``format_command`` of ``AddFilter(mac, filter)`` (letter A) or ``DeleteFilter``
    (D), without making the command: a bulk install's answers and stored rows quote
    100,000 filters.  The layer, a ``StrEnum``, formats as its letter."""
    fields, mask = _filter_fields_and_mask(filter)
    return f"{letter} {mac} {filter.layer} {mask} {fields}"


def format_command(command: Command) -> str:
    """The canonical text of a command: single spaces, canonical values, fields in s d t p order."""
    kind = type(command)
    if kind is AddFilter or kind is DeleteFilter:  # first: bulk requests are filters
        return filter_command_text("A" if kind is AddFilter else "D", command.mac, command.filter)
    match command:
        case RegisterFirewall(mac=mac, ip=ip):
            return f"R F {mac} {ip}"
        case RegisterLoadBalancer():
            source = kinds.REDIRECT_SOURCE.format(command.source)
            backends = ",".join(command.backends)
            return f"R L {command.mac} {command.ip} {command.redirect_type} {source} {backends}"
        case DeleteFilters(mac=mac, layer=layer, mask=mask):
            letters = " ".join(spec.letter for spec in FILTER_FIELDS if mask & spec.bit)
            return f"D {mac} {layer.value} {mask} {letters}"
        case Cancel(mac=mac):
            return f"X {mac}"
        case CancelRedirect(mac=mac, source=source):
            return f"X {mac} L {kinds.REDIRECT_SOURCE.format(source)}"
        case Query(mac=mac, layer=layer, skip=skip):
            return f"{layer.value} {mac} {skip}" if skip else f"{layer.value} {mac}"
    raise TypeError(f"not a command: {command!r}")
