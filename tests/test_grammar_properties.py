"""Property tests: every valid command survives text, frame and JSON round trips,
no input whatsoever makes the parser raise anything but `CommandError`, and the
parser's fast path returns exactly what the full parser does (or leaves it the text)."""

import ipaddress
import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mbvisor.guest import fields as kinds
from mbvisor.guest.commands import (
    FIELD_BY_LETTER,
    FIELD_KINDS,
    FILTER_FIELDS,
    AddFilter,
    Cancel,
    CancelRedirect,
    DeleteFilter,
    DeleteFilters,
    Filter,
    Layer,
    Query,
    RegisterFirewall,
    RegisterLoadBalancer,
    command_from_dict,
    command_to_dict,
)
from mbvisor.guest.errors import CommandError
from mbvisor.guest.grammar import (
    _parse_ip_address,
    _parse_ip_endpoint,
    _parse_token_by_token,
    _parse_well_formed,
    format_command,
    format_frame,
    parse_command,
    parse_frame,
    split_frame,
)

FAST = settings(max_examples=150, deadline=None)

macs = st.binary(min_size=6, max_size=6).map(lambda raw: ":".join(f"{byte:02x}" for byte in raw))
families = st.sampled_from([4, 6])
layers = st.sampled_from(list(Layer))
masks = st.integers(1, 15)


def addresses(family):
    return st.ip_addresses(v=family).map(str)


def endpoints(family):
    """Canonical address or network text: a full-length prefix is written as the address."""
    bits = 32 if family == 4 else 128

    def canonical(address, prefix):
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        return str(network.network_address) if prefix == bits else str(network)

    return st.builds(canonical, st.ip_addresses(v=family), st.integers(0, bits))


ports = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda pair: tuple(sorted(pair)))


@st.composite
def filters(draw, layer=None):
    layer = layer or draw(layers)
    mask = draw(masks)
    if layer is Layer.MAC:
        values = {"s": macs, "d": macs, "t": st.integers(0, 7), "p": st.integers(0x0600, 0xFFFF)}
    elif layer is Layer.IP:
        family = draw(families)
        values = {"s": endpoints(family), "d": endpoints(family), "t": st.integers(0, 63), "p": st.integers(0, 255)}
    else:
        values = {"s": ports, "d": ports, "t": st.integers(0, 63), "p": st.sampled_from([6, 17, 132])}
    chosen = {
        FIELD_BY_LETTER[letter].attribute: draw(strategy)
        for letter, strategy in values.items()
        if mask & FIELD_BY_LETTER[letter].bit
    }
    return Filter(layer, **chosen)


@st.composite
def load_balancers(draw):
    family = draw(families)
    redirect_type = draw(st.sampled_from([0, 1]))
    # The unspecified address means "any source", which only type 0 takes.
    specific_sources = endpoints(family).filter(lambda text: text not in ("0.0.0.0", "::"))
    source = draw(specific_sources) if redirect_type else None
    backends = draw(st.lists(addresses(family), min_size=1, max_size=6, unique=True))
    return RegisterLoadBalancer(draw(macs), draw(addresses(family)), redirect_type, source, tuple(backends))


commands = st.one_of(
    st.builds(RegisterFirewall, macs, families.flatmap(addresses)),
    load_balancers(),
    st.builds(AddFilter, macs, filters()),
    st.builds(DeleteFilter, macs, filters()),
    st.builds(DeleteFilters, macs, layers, masks),
    st.builds(Cancel, macs),
    st.builds(CancelRedirect, macs, st.one_of(st.none(), families.flatmap(endpoints).filter(
        lambda text: text not in ("0.0.0.0", "::")))),
    st.builds(Query, macs, layers),
    st.builds(Query, macs, layers, st.integers(0, 2**31 - 1)),
)


@FAST
@given(commands)
def test_text_round_trip(command):
    text = format_command(command)
    assert parse_command(text) == command
    assert format_command(parse_command(text)) == text


@FAST
@given(st.builds(AddFilter, macs, filters()))
def test_a_filter_is_written_as_its_fields_each_in_its_canonical_text(command):
    """The canonical text, spelt out from the grammar's tables (letters in s d t p order,
    each value in its kind's format), whatever shortcut format_command takes."""
    filter = command.filter
    given = [(spec.letter, getattr(filter, spec.attribute)) for spec in FILTER_FIELDS
             if getattr(filter, spec.attribute) is not None]
    fields = " ".join(f"{letter} {FIELD_KINDS[filter.layer][letter].format(value)}" for letter, value in given)
    assert format_command(command) == f"A {command.mac} {filter.layer.value} {filter.mask} {fields}"


@FAST
@given(st.lists(commands, min_size=1, max_size=5))
def test_frame_round_trip(command_list):
    assert parse_frame(format_frame(command_list)) == command_list


@FAST
@given(commands)
def test_dict_round_trip_through_json(command):
    assert command_from_dict(json.loads(json.dumps(command_to_dict(command)))) == command


def rejects_cleanly(parse, value):
    try:
        parse(value)
    except CommandError:
        pass


@FAST
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_arbitrary_input_raises_only_command_errors(value):
    for parse in (parse_command, parse_frame, split_frame):
        rejects_cleanly(parse, value)


printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@st.composite
def mutated_command_text(draw):
    """A valid command's text with a token removed or repeated, or characters changed."""
    tokens = format_command(draw(commands)).split(" ")
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(tokens) - 1))
        mutation = draw(st.sampled_from(["delete", "duplicate", "flip", "swap"]))
        if mutation == "delete" and len(tokens) > 1:
            del tokens[index]
        elif mutation == "duplicate":
            tokens.insert(index, tokens[index])
        elif mutation == "flip" and tokens[index]:
            token = tokens[index]
            position = draw(st.integers(0, len(token) - 1))
            tokens[index] = token[:position] + draw(printable) + token[position + 1 :]
        elif mutation == "swap":
            other = draw(st.integers(0, len(tokens) - 1))
            tokens[index], tokens[other] = tokens[other], tokens[index]
    return " ".join(tokens)


@settings(max_examples=400, deadline=None)
@given(mutated_command_text())
def test_mutated_commands_raise_only_command_errors(text):
    rejects_cleanly(parse_command, text)
    rejects_cleanly(parse_frame, f"@{text}@")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


@st.composite
def mutated_dicts(draw):
    """A valid command dict with one value (possibly nested) replaced by arbitrary JSON."""
    data = command_to_dict(draw(commands))
    target = data["filter"] if "filter" in data and draw(st.booleans()) else data
    target[draw(st.sampled_from(sorted(target)))] = draw(json_values)
    return data


@FAST
@given(st.one_of(json_values, mutated_dicts()))
def test_arbitrary_dicts_raise_only_command_errors(data):
    rejects_cleanly(command_from_dict, data)


# ---- the fast path agrees with the full parser ----

MAC = "02:00:00:00:01:02"


def outcome(parse, text):
    """What a parser does with `text`: the command, or everything observable of its error."""
    try:
        return parse(text)
    except CommandError as error:
        return (type(error), str(error), error.column, error.token, error.field)


def full_parser(first_column):
    return lambda text: _parse_token_by_token(text, first_column)


def assert_fast_path_agrees(text, first_column=1):
    expected = outcome(full_parser(first_column), text)
    assert outcome(lambda text: parse_command(text, first_column), text) == expected
    fast = _parse_well_formed(text)
    if isinstance(text, bytes) or isinstance(expected, tuple):
        assert fast is None
    else:
        # The fast path takes every valid text command; repr also compares value types.
        assert fast == expected and repr(fast) == repr(expected)


@FAST
@given(commands)
def test_fast_path_takes_every_canonical_command(command):
    assert _parse_well_formed(format_command(command)) == command


def other_spellings(token):
    """Other ways to write a token, valid or not, at the edges of what the fast path takes:
    other value forms, a token dropped or repeated, characters `split()` would take for
    blanks, and padding past the length limit."""
    return [
        "",
        f"{token} {token}",
        token + "\x0b",
        "\n" + token,
        token + "\x1c",
        token + "\u00e9",
        token + " " * 4096,
        token.upper(),
        token.replace(":", "-"),
        token + "/32",
        token + "/128",
        token + "/08",
        "0" + token,
        token.replace(".", ".0", 1),
        token.replace(".", ".256", 1),
        token + ",",
        f"{token},{token}",
        f"0x{int(token):x}" if token.isdigit() else token + "x",
        "-1", "2147483647", "2147483648", "0", "00", "1e3", "+5", "\u0661",  # skip counts at their edges
        *["*", "any", "0.0.0.0", "::", "tcp", "ef", "cs7", "ipv6", "s", "d", "t", "p", "L", "I"],
    ]


blanks = st.sampled_from([" ", "  ", "\t", " \t "])
edges = st.sampled_from(["", "", "", " ", "\t", "  "])


@st.composite
def respelled_command_text(draw):
    """A valid command's text with fields reordered, blanks varied and some tokens
    written another way, so both valid and near-valid spellings come out."""
    tokens = format_command(draw(commands)).split(" ")
    if tokens[0] in ("A", "D") and len(tokens) > 4:
        fields = tokens[4:]
        paired = len(fields) % 2 == 0 and fields[1] not in FIELD_BY_LETTER
        groups = [fields[i : i + 2] for i in range(0, len(fields), 2)] if paired else [[letter] for letter in fields]
        tokens[4:] = [token for group in draw(st.permutations(groups)) for token in group]
    for index in draw(st.lists(st.integers(0, len(tokens) - 1), max_size=2)):
        tokens[index] = draw(st.sampled_from(other_spellings(tokens[index])))
    text = draw(edges) + tokens[0]
    for token in tokens[1:]:
        text += draw(blanks) + token
    return text + draw(edges)


octets = st.sampled_from(["0", "1", "9", "10", "99", "100", "199", "200", "249", "250", "255", "256", "300", "01", "00"])
prefixes = st.sampled_from(["", "", "/0", "/1", "/8", "/08", "/16", "/24", "/31", "/32", "/33", "/", "/255.0.0.0", "/-1"])
ipv4_texts = st.builds(lambda parts, prefix: ".".join(parts) + prefix, st.lists(octets, min_size=4, max_size=4), prefixes)


@st.composite
def ipv4_command_text(draw):
    """Commands around near-canonical dotted quads: the fast path reads those itself."""
    address = draw(ipv4_texts)
    return draw(st.sampled_from([
        f"A {MAC} I 4 s {address}",
        f"D {MAC} I 12 s 10.0.0.1 d {address}",
        f"R F {MAC} {address}",
        f"R L {MAC} 10.0.0.1 1 {address} 10.0.0.5,{address}",
    ]))


@settings(max_examples=600, deadline=None)
@given(st.one_of(respelled_command_text(), mutated_command_text(), ipv4_command_text()), st.integers(1, 60))
@example(f"X {MAC}" + " " * 4096, 1)
@example(f"X {MAC}\x0b", 1)
@example(f"R F {MAC} 10.0.0.1 10.0.0.1", 1)
@example(f"A {MAC} I 4 s 10.0.0.0/08", 1)
@example(f"A {MAC} I 4 s 10.0.0.1/32", 1)
@example(f"D {MAC} I 12 s d 10.0.0.1", 1)
@example(f"D {MAC} I 4 s s", 1)
@example(f"A {MAC} T 3 t p p 6", 1)
@example(f"I {MAC} 2147483648", 1)
@example(f"I {MAC} 0007", 1)
@example(f"T {MAC} 12 s", 1)
def test_fast_path_agrees_with_the_full_parser(text, first_column):
    assert_fast_path_agrees(text, first_column)


@FAST
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_fast_path_agrees_on_arbitrary_input(value):
    assert_fast_path_agrees(value)


@settings(max_examples=400, deadline=None)
@given(ipv4_texts)
@example("10.0.0.0/08")
@example("10.0.0.0/33")
@example("10.0.0.1/32")
def test_ipv4_shortcuts_canonicalise_like_ipaddress(text):
    assert outcome(_parse_ip_address, text) == outcome(kinds.IP_ADDRESS.parse, text)
    assert outcome(_parse_ip_endpoint, text) == outcome(kinds.IP_ENDPOINT.parse, text)
