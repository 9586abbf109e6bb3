"""Property tests: every valid command survives text, frame and JSON round trips,
and no input whatsoever makes the parser raise anything but `CommandError`."""

import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.guest.commands import (
    FIELD_BY_LETTER,
    AddFilter,
    Cancel,
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
from mbvisor.guest.grammar import format_command, format_frame, parse_command, parse_frame, split_frame

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
    st.builds(Query, macs, layers),
)


@FAST
@given(commands)
def test_text_round_trip(command):
    text = format_command(command)
    assert parse_command(text) == command
    assert format_command(parse_command(text)) == text


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
