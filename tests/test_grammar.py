"""Table-driven tests of the command grammar: every form, canonical text, every
error class with its exact message, which texts the fast path takes, framing and
the JSON form."""

import json

import pytest

from mbvisor.guest.commands import (
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
from mbvisor.guest.errors import (
    CommandError,
    DuplicateFieldError,
    EncodingError,
    FramingError,
    InvalidValueError,
    MaskMismatchError,
    MissingTokenError,
    UnexpectedTokenError,
    UnknownCommandError,
)
from mbvisor.guest.grammar import (
    _parse_well_formed,
    format_command,
    format_frame,
    parse_command,
    parse_frame,
    split_frame,
)

MAC = "52:34:56:00:12:22"

# (text, parsed command, canonical text)
VALID = [
    # the report's examples
    (f"R F {MAC} 10.129.126.115", RegisterFirewall(MAC, "10.129.126.115"), None),
    (f"D {MAC} M 4 s", DeleteFilters(MAC, Layer.MAC, 4), None),
    (f"R F 52-34-56-00-12-AB 2001:DB8::0:5", RegisterFirewall("52:34:56:00:12:ab", "2001:db8::5"),
     "R F 52:34:56:00:12:ab 2001:db8::5"),
    (f"R L {MAC} 10.0.0.1 0 * 10.0.0.5", RegisterLoadBalancer(MAC, "10.0.0.1", 0, None, ("10.0.0.5",)), None),
    (f"R L {MAC} 10.0.0.1 0 any 10.0.0.5", RegisterLoadBalancer(MAC, "10.0.0.1", 0, None, ("10.0.0.5",)),
     f"R L {MAC} 10.0.0.1 0 * 10.0.0.5"),
    (f"R L {MAC} 10.0.0.1 0 0.0.0.0 10.0.0.5", RegisterLoadBalancer(MAC, "10.0.0.1", 0, None, ("10.0.0.5",)),
     f"R L {MAC} 10.0.0.1 0 * 10.0.0.5"),
    (f"R L {MAC} ::1 0 :: ::5,::6", RegisterLoadBalancer(MAC, "::1", 0, None, ("::5", "::6")),
     f"R L {MAC} ::1 0 * ::5,::6"),
    (f"R L {MAC} 10.0.0.1 1 192.168.0.0/16 10.0.0.5,10.0.0.6",
     RegisterLoadBalancer(MAC, "10.0.0.1", 1, "192.168.0.0/16", ("10.0.0.5", "10.0.0.6")), None),
    (f"R L {MAC} 10.0.0.1 1 192.168.0.7/32 10.0.0.5",
     RegisterLoadBalancer(MAC, "10.0.0.1", 1, "192.168.0.7", ("10.0.0.5",)), f"R L {MAC} 10.0.0.1 1 192.168.0.7 10.0.0.5"),
    (f"A {MAC} I 4 s 10.0.0.0/8", AddFilter(MAC, Filter(Layer.IP, source="10.0.0.0/8")), None),
    (f"A {MAC} I 15 p tcp t ef d 10.1.0.0/255.255.0.0 s 10.0.0.1/32",
     AddFilter(MAC, Filter(Layer.IP, "10.0.0.1", "10.1.0.0/16", 46, 6)), f"A {MAC} I 15 s 10.0.0.1 d 10.1.0.0/16 t 46 p 6"),
    (f"A {MAC} I 12 s 2001:db8::/32 d ::1", AddFilter(MAC, Filter(Layer.IP, "2001:db8::/32", "::1")), None),
    (f"A {MAC} I 3 t af41 p icmpv6", AddFilter(MAC, Filter(Layer.IP, tos=34, protocol=58)), f"A {MAC} I 3 t 34 p 58"),
    (f"A {MAC} I 2 t cs7", AddFilter(MAC, Filter(Layer.IP, tos=56)), f"A {MAC} I 2 t 56"),
    (f"A {MAC} M 15 s AA:BB:CC:DD:EE:FF d aa-bb-cc-dd-ee-01 t 7 p ipv6",
     AddFilter(MAC, Filter(Layer.MAC, "aa:bb:cc:dd:ee:ff", "aa:bb:cc:dd:ee:01", 7, 0x86DD)),
     f"A {MAC} M 15 s aa:bb:cc:dd:ee:ff d aa:bb:cc:dd:ee:01 t 7 p 0x86dd"),
    (f"A {MAC} M 1 p 0x0800", AddFilter(MAC, Filter(Layer.MAC, protocol=0x0800)), None),
    (f"A {MAC} M 1 p 2054", AddFilter(MAC, Filter(Layer.MAC, protocol=0x0806)), f"A {MAC} M 1 p 0x0806"),
    (f"A {MAC} T 13 p udp d 53 s 1024-65535",
     AddFilter(MAC, Filter(Layer.TRANSPORT, (1024, 65535), (53, 53), None, 17)), f"A {MAC} T 13 s 1024-65535 d 53 p 17"),
    (f"A {MAC} T 8 d 80-80", AddFilter(MAC, Filter(Layer.TRANSPORT, destination=(80, 80))), f"A {MAC} T 8 d 80"),
    (f"A {MAC} T 3 t be p 132", AddFilter(MAC, Filter(Layer.TRANSPORT, tos=0, protocol=132)), f"A {MAC} T 3 t 0 p 132"),
    (f"D {MAC} I 4 s 10.0.0.0/8", DeleteFilter(MAC, Filter(Layer.IP, source="10.0.0.0/8")), None),
    (f"D {MAC} T 9 p sctp d 9", DeleteFilter(MAC, Filter(Layer.TRANSPORT, destination=(9, 9), protocol=132)),
     f"D {MAC} T 9 d 9 p 132"),
    (f"D {MAC} I 15 p t d s", DeleteFilters(MAC, Layer.IP, 15), f"D {MAC} I 15 s d t p"),
    (f"X {MAC}", Cancel(MAC), None),
    (f"I {MAC}", Query(MAC, Layer.IP), None),
    (f"M {MAC}", Query(MAC, Layer.MAC), None),
    (f"T {MAC}", Query(MAC, Layer.TRANSPORT), None),
    (f"I {MAC} 100", Query(MAC, Layer.IP, 100), None),
    (f"M {MAC} 2147483647", Query(MAC, Layer.MAC, 2147483647), None),
    (f"T {MAC} 0", Query(MAC, Layer.TRANSPORT), f"T {MAC}"),  # skip 0 is the whole list, written as before
    (f"I {MAC}\t007 ", Query(MAC, Layer.IP, 7), f"I {MAC} 7"),
    (f" \tX   {MAC}\t ", Cancel(MAC), f"X {MAC}"),
]


@pytest.mark.parametrize(("text", "command", "canonical"), VALID)
def test_valid_commands_parse_and_format_canonically(text, command, canonical):
    assert parse_command(text) == command
    assert parse_command(text.encode()) == command
    assert format_command(command) == (canonical or text)
    assert parse_command(format_command(command)) == command


@pytest.mark.parametrize(("text", "command", "canonical"), VALID)
def test_dict_form_round_trips_through_json(text, command, canonical):
    data = command_to_dict(command)
    assert command_from_dict(json.loads(json.dumps(data))) == command
    assert command_from_dict(data) == command


def test_a_query_of_the_whole_list_keeps_its_json_form_from_before_paging():
    assert command_to_dict(Query(MAC, Layer.IP)) == {"op": "query", "mac": MAC, "layer": "I"}
    assert command_to_dict(Query(MAC, Layer.IP, 200)) == {"op": "query", "mac": MAC, "layer": "I", "skip": 200}
    assert command_from_dict({"op": "query", "mac": MAC, "layer": "T"}) == Query(MAC, Layer.TRANSPORT, 0)
    assert command_from_dict({"op": "query", "mac": MAC, "layer": "T", "skip": "12"}) == Query(MAC, Layer.TRANSPORT, 12)


def test_dict_form_is_plain_json_with_op():
    command = parse_command(f"A {MAC} T 12 s 1000-2000 d 80")
    assert command_to_dict(command) == {
        "op": "add_filter",
        "mac": MAC,
        "filter": {"layer": "T", "source": [1000, 2000], "destination": [80, 80], "tos": None, "protocol": None},
    }
    assert command_to_dict(Cancel(MAC)) == {"op": "cancel", "mac": MAC}


def test_filter_mask_is_the_sum_of_its_field_bits():
    assert Filter(Layer.IP, source="10.0.0.1").mask == 4
    assert Filter(Layer.IP, destination="10.0.0.1", protocol=6).mask == 9
    assert Filter(Layer.TRANSPORT, (1, 1), (2, 2), 0, 6).mask == 15


# (text, error class, column, message without the "column N: " prefix)
ERRORS = [
    (f"X {MAC} F", UnknownCommandError, 21, "'F' is not what X cancels; expected L <srcip> (one load-balancer "
     "redirect) or nothing (the whole registration)"),
    (f"X {MAC} L", MissingTokenError, 22, "missing redirect source; expected * (any source) or an IPv4/IPv6 "
     "address or CIDR like 10.0.0.0/8"),
    ("", MissingTokenError, 1, "missing command; expected R, A, D, X, I, M or T"),
    ("Q", UnknownCommandError, 1, "'Q' is not a command; expected R, A, D, X, I, M or T"),
    ("x " + MAC, UnknownCommandError, 1, "'x' is not a command; expected R, A, D, X, I, M or T"),
    ("R", MissingTokenError, 2, "missing service; expected F (firewall) or L (load balancer)"),
    ("R Z", UnknownCommandError, 3, "'Z' is not a service; expected F (firewall) or L (load balancer)"),
    ("X 52:34:56:00:12", InvalidValueError, 3,
     "'52:34:56:00:12' is not a MAC address; expected six hex pairs like 52:34:56:00:12:22"),
    ("X 52:34-56:00:12:22", InvalidValueError, 3,
     "'52:34-56:00:12:22' is not a MAC address; expected six hex pairs like 52:34:56:00:12:22"),
    (f"X {MAC} extra", UnknownCommandError, 21, "'extra' is not what X cancels; expected L <srcip> (one "
     "load-balancer redirect) or nothing (the whole registration)"),
    (f"X {MAC} L * extra", UnexpectedTokenError, 25, "unexpected 'extra' after the end of the command"),
    ("I", MissingTokenError, 2, "missing MB MAC address; expected six hex pairs like 52:34:56:00:12:22"),
    (f"I {MAC} -1", InvalidValueError, 21,
     "'-1' is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to leave out)"),
    (f"M {MAC} ten", InvalidValueError, 21,
     "'ten' is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to leave out)"),
    (f"T {MAC} 2147483648", InvalidValueError, 21,
     "'2147483648' is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to leave out)"),
    (f"I {MAC} 99999999999999999999", InvalidValueError, 21,
     "'99999999999999999999' is not a skip count; expected a number 0-2147483647 (how many of the sorted filters "
     "to leave out)"),
    (f"I {MAC} 1.5", InvalidValueError, 21,
     "'1.5' is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to leave out)"),
    (f"I {MAC} 5 5", UnexpectedTokenError, 23, "unexpected '5' after the end of the command"),
    (f"R F {MAC}", MissingTokenError, 22,
     "missing MB IP address; expected an IPv4 or IPv6 address like 10.0.0.5 or 2001:db8::5"),
    (f"R F {MAC} 10.0.0.0/8", InvalidValueError, 23,
     "'10.0.0.0/8' is not an IP address; expected an IPv4 or IPv6 address like 10.0.0.5 or 2001:db8::5"),
    (f"R F {MAC} fe80::1%eth0", InvalidValueError, 23,
     "'fe80::1%eth0' is not an IP address; expected an IPv4 or IPv6 address like 10.0.0.5 or 2001:db8::5"),
    (f"A {MAC} q 4", InvalidValueError, 21, "'q' is not a filter layer; expected I, M or T"),
    (f"A {MAC} I", MissingTokenError, 22, "missing filter mask; expected a number 1-15 (d=8 s=4 t=2 p=1)"),
    (f"A {MAC} I 16 s 10.0.0.1", InvalidValueError, 23,
     "'16' is not a filter mask; expected a number 1-15 (d=8 s=4 t=2 p=1)"),
    (f"A {MAC} I 0", InvalidValueError, 23, "'0' is not a filter mask; expected a number 1-15 (d=8 s=4 t=2 p=1)"),
    (f"D {MAC} I 0", InvalidValueError, 23, "'0' is not a filter mask; expected a number 1-15 (d=8 s=4 t=2 p=1)"),
    (f"A {MAC} I 12 s 10.0.0.1", MaskMismatchError, 23, "mask 12 means fields d s but the command gives s"),
    (f"D {MAC} M 4 d", MaskMismatchError, 23, "mask 4 means fields s but the command gives d"),
    (f"D {MAC} M 4", MaskMismatchError, 23, "mask 4 means fields s but the command gives none"),
    (f"A {MAC} I 4 s 10.0.0.1 s 10.0.0.2", DuplicateFieldError, 36, "field s is given twice; each field may appear once"),
    (f"D {MAC} I 4 s s", DuplicateFieldError, 27, "field s is given twice; each field may appear once"),
    (f"A {MAC} I 4 x 10.0.0.1", UnexpectedTokenError, 25, "'x' is not a field letter; expected s, d, t or p"),
    (f"A {MAC} I 4 s", MissingTokenError, 26, "missing value for field s; every field of a filter needs a value"),
    (f"A {MAC} I 12 s d 10.0.0.1", MissingTokenError, 28,
     "missing value for field s; every field of a filter needs a value"),
    (f"D {MAC} I 12 s 10.0.0.1 d", MissingTokenError, 38,
     "missing value for field d; give every field a value (one exact filter) or none (every filter with this mask)"),
    (f"A {MAC} I 4 s 10.0.0.1/8", InvalidValueError, 27, "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
    (f"A {MAC} I 12 s 10.0.0.1 d ::1", InvalidValueError, 39,
     "'::1' is IPv6 but the source '10.0.0.1' is IPv4; both must be the same family"),
    (f"A {MAC} I 1 p 256", InvalidValueError, 27,
     "'256' is not an IP protocol; expected a number 0-255 or icmp, igmp, tcp, udp, gre, esp, ah, icmpv6, ospf, sctp"),
    (f"A {MAC} I 2 t 64", InvalidValueError, 27,
     "'64' is not a DSCP value; expected a number 0-63 or be, cs0-cs7, af11-af43, ef, va"),
    (f"A {MAC} I 2 t af44", InvalidValueError, 27,
     "'af44' is not a DSCP value; expected a number 0-63 or be, cs0-cs7, af11-af43, ef, va"),
    (f"A {MAC} M 1 p 0x05ff", InvalidValueError, 27,
     "'0x05ff' is not an EtherType; expected 0x0600-0xffff (hex or decimal) or ipv4, arp, ipv6, vlan, lldp"),
    (f"A {MAC} M 2 t 8", InvalidValueError, 27, "'8' is not a VLAN PCP; expected a number 0-7"),
    (f"A {MAC} M 4 s 10.0.0.1", InvalidValueError, 27,
     "'10.0.0.1' is not a MAC address; expected six hex pairs like 52:34:56:00:12:22"),
    (f"A {MAC} T 1 p icmp", InvalidValueError, 27,
     "'icmp' is not a transport protocol; expected tcp, udp or sctp (or 6, 17, 132)"),
    (f"A {MAC} T 4 s 65536", InvalidValueError, 27,
     "'65536' is not a port or port range; expected a port 0-65535 or a range like 1024-2047"),
    (f"A {MAC} T 4 s 90-80", InvalidValueError, 27,
     "'90-80' is not a port range; the low port 90 is above the high port 80"),
    (f"R L {MAC} 10.0.0.1 2 * 10.0.0.5", InvalidValueError, 32,
     "'2' is not a redirect type; expected 0 (all traffic) or 1 (only traffic from srcip)"),
    (f"R L {MAC} 10.0.0.1 0 10.9.0.0/16 10.0.0.5", InvalidValueError, 34,
     "type 0 redirects all traffic, so the source must be * (not '10.9.0.0/16');"
     " use type 1 to redirect only traffic from that source"),
    (f"R L {MAC} 10.0.0.1 1 * 10.0.0.5", InvalidValueError, 34,
     "type 1 redirects only traffic from one source, so give its address or network;"
     " use type 0 to redirect all traffic"),
    (f"R L {MAC} 10.0.0.1 0 *", MissingTokenError, 35,
     "missing backend address; expected an address or a comma-separated list like 10.0.0.5,10.0.0.6"),
    (f"R L {MAC} 10.0.0.1 0 * 10.0.0.5,,10.0.0.6", MissingTokenError, 45,
     "missing backend address in the list; expected addresses separated by single commas"),
    (f"R L {MAC} 10.0.0.1 0 * 10.0.0.5,", MissingTokenError, 45,
     "missing backend address in the list; expected addresses separated by single commas"),
    (f"R L {MAC} 10.0.0.1 0 * 10.0.0.5,10.0.0.x", InvalidValueError, 45,
     "'10.0.0.x' is not an IP address; expected an IPv4 or IPv6 address like 10.0.0.5 or 2001:db8::5"),
    (f"R L {MAC} 10.0.0.1 0 * 10.0.0.5,10.0.0.5", InvalidValueError, 36, "backend '10.0.0.5' is listed twice"),
    (f"R L {MAC} 10.0.0.1 0 * 10.0.0.5,::5", InvalidValueError, 36,
     "'::5' is IPv6 but the first backend '10.0.0.5' is IPv4; both must be the same family"),
    (f"R L {MAC} 10.0.0.1 0 * ::5", InvalidValueError, 36,
     "'::5' is IPv6 but the MB address '10.0.0.1' is IPv4; both must be the same family"),
    (f"R L {MAC} 10.0.0.1 1 ::/0 10.0.0.5", InvalidValueError, 34,
     "'::/0' is IPv6 but the MB address '10.0.0.1' is IPv4; both must be the same family"),
    (f"R L {MAC} 10.0.0.1 0 * " + ",".join(f"10.0.1.{n}" for n in range(65)), InvalidValueError, 36,
     "65 backends given; at most 64 are allowed"),
    ("X 52:34:56:00:12:22\x07", EncodingError, 20,
     "control character U+0007 is not allowed; commands are printable ASCII text"),
    ("X 52:34:56:00:12:2é", EncodingError, 19,
     "non-ASCII character U+00E9 is not allowed; commands are printable ASCII text"),
    (b"X 52:34:56:00:12:22\xff", EncodingError, 20, "byte 0xff is not valid UTF-8; commands are printable ASCII text"),
    ("X " + "a" * 5000, FramingError, 4097, "text is 5002 characters long; at most 4096 bytes are allowed"),
]


@pytest.mark.parametrize(("text", "error_class", "column", "detail"), ERRORS)
def test_errors_name_their_column_and_what_was_expected(text, error_class, column, detail):
    with pytest.raises(error_class) as caught:
        parse_command(text)
    assert caught.value.column == column
    assert str(caught.value) == f"column {column}: {detail}"
    assert caught.value.detail == detail


def test_every_error_is_a_value_error_with_its_token():
    with pytest.raises(ValueError) as caught:
        parse_command(f"A {MAC} q 4")
    assert isinstance(caught.value, CommandError)
    assert caught.value.token == "q"


def test_commands_are_case_sensitive():
    with pytest.raises(UnknownCommandError):
        parse_command(f"r F {MAC} 10.0.0.1")
    with pytest.raises(UnexpectedTokenError):
        parse_command(f"A {MAC} I 4 S 10.0.0.1")


# ---- the fast path ----


@pytest.mark.parametrize(("text", "command", "canonical"), VALID)
def test_fast_path_takes_every_valid_text(text, command, canonical):
    assert _parse_well_formed(text) == command


# The shapes of a bulk request, in the spellings generators write.
BULK = [
    (f"A {MAC} I 4 s 10.200.3.7", AddFilter(MAC, Filter(Layer.IP, source="10.200.3.7"))),
    (f"A {MAC} I 4 s 10.0.0.0/8", AddFilter(MAC, Filter(Layer.IP, source="10.0.0.0/8"))),
    (f"A {MAC} I 12 s 10.0.0.1 d 0.0.0.0/0", AddFilter(MAC, Filter(Layer.IP, "10.0.0.1", "0.0.0.0/0"))),
    (f"A {MAC} I 8 d 10.0.0.0/08", AddFilter(MAC, Filter(Layer.IP, destination="10.0.0.0/8"))),
    (f"A {MAC} T 3 t 6 p 6", AddFilter(MAC, Filter(Layer.TRANSPORT, tos=6, protocol=6))),
    (f"A {MAC} T 9 d 80 p tcp", AddFilter(MAC, Filter(Layer.TRANSPORT, destination=(80, 80), protocol=6))),
    (f"A {MAC} M 1 p 0x0800", AddFilter(MAC, Filter(Layer.MAC, protocol=0x0800))),
    (f"D {MAC}\tI 4\ts\t10.0.0.0/8  ", DeleteFilter(MAC, Filter(Layer.IP, source="10.0.0.0/8"))),
    (f"D {MAC} T 3 p t", DeleteFilters(MAC, Layer.TRANSPORT, 3)),
]


@pytest.mark.parametrize(("text", "command"), BULK)
def test_fast_path_takes_bulk_shapes(text, command):
    assert _parse_well_formed(text) == command
    assert parse_command(text) == command


# One field, the fast path's own shortcut: its edges go to the full parser, which decides.
@pytest.mark.parametrize("text", [f"A {MAC} I 4 s s", f"A {MAC} I 4 d 10.0.0.1", f"A {MAC} I 8 s 10.0.0.1",
                                  f"A {MAC} I 12 s 10.0.0.1", f"A {MAC} I 4 x 10.0.0.1", f"D {MAC} I 4 s t",
                                  f"A {MAC} M 4 s 10.0.0.1", f"A {MAC} T 4 s 10.0.0.1"])
def test_one_field_edges_are_decided_by_the_full_parser(text):
    assert _parse_well_formed(text) is None


def test_a_one_field_filter_is_the_full_parsers_filter():
    fast = _parse_well_formed(f"A {MAC} M 4 s 02:00:00:00:00:09")
    assert fast == AddFilter(MAC, Filter(Layer.MAC, source="02:00:00:00:00:09"))
    assert type(fast.filter) is Filter and repr(fast) == repr(parse_command(f"A {MAC}  M 4 s 02:00:00:00:00:09"))


@pytest.mark.parametrize(("text", "error_class", "column", "detail"), ERRORS)
def test_fast_path_leaves_every_error_to_the_full_parser(text, error_class, column, detail):
    assert _parse_well_formed(text) is None


def test_fast_path_leaves_bytes_to_the_full_parser():
    assert _parse_well_formed(f"X {MAC}".encode()) is None
    assert parse_command(f"X {MAC}".encode()) == Cancel(MAC)


# ---- framing ----

FIRST = f"R F {MAC} 10.0.0.5"
SECOND = f"A {MAC} I 4 s 10.0.0.0/8"


def test_frames_split_with_columns_in_the_whole_text():
    text = f"@{FIRST}@ \t@ {SECOND} @"
    assert split_frame(text) == [(2, FIRST), (36, f" {SECOND} ")]
    assert parse_frame(text) == [parse_command(FIRST), parse_command(SECOND)]
    assert parse_frame(text.encode()) == parse_frame(text)


def test_text_without_frames_is_one_bare_command():
    assert split_frame(FIRST) == [(1, FIRST)]
    assert parse_frame(FIRST) == [parse_command(FIRST)]


def test_format_frame_is_canonical_and_round_trips():
    commands = parse_frame(f"@{FIRST}@@ {SECOND}@")
    assert format_frame(commands) == f"@{FIRST}@@{SECOND}@"
    assert parse_frame(format_frame(commands)) == commands


def test_errors_in_a_frame_point_into_the_whole_text():
    with pytest.raises(InvalidValueError) as caught:
        parse_frame(f"@{FIRST}@@A {MAC} q 4@")
    assert str(caught.value) == "column 54: 'q' is not a filter layer; expected I, M or T"


FRAMING_ERRORS = [
    (f"@{FIRST}@ junk", 34, "text outside a frame; expected @command@"),
    (f"x@{FIRST}@", 1, "text outside a frame; expected @command@"),
    (f"@{FIRST}@@{SECOND}", 33, "frame is not terminated; expected a closing @"),
    (f"@{FIRST}@@@", 33, "empty frame; expected a command between the @ marks"),
    (f"@ \t @", 1, "empty frame; expected a command between the @ marks"),
]


@pytest.mark.parametrize(("text", "column", "detail"), FRAMING_ERRORS)
def test_framing_errors(text, column, detail):
    with pytest.raises(FramingError) as caught:
        parse_frame(text)
    assert str(caught.value) == f"column {column}: {detail}"


def test_frame_length_limit_counts_bytes():
    frame = f"@{FIRST}@" * 200
    assert len(frame) > 4096
    with pytest.raises(FramingError, match="at most 4096 bytes"):
        split_frame(frame.encode())
    assert len(parse_frame(f"@{FIRST}@" * 100)) == 100


# ---- dict form errors ----

DICT_ERRORS = [
    ([], InvalidValueError, "[] is not an object"),
    ({"mac": MAC}, UnknownCommandError,
     "op: None is not a command op; expected one of register_firewall, register_load_balancer,"
     " add_filter, delete_filter, delete_filters, cancel, cancel_redirect, query"),
    ({"op": "cancel"}, MissingTokenError, "missing key 'mac'"),
    ({"op": "cancel", "mac": MAC, "ip": "10.0.0.1"}, UnexpectedTokenError, "unexpected key 'ip'"),
    ({"op": "cancel", "mac": True}, InvalidValueError,
     "mac: True is not a MAC address; expected six hex pairs like 52:34:56:00:12:22"),
    ({"op": "delete_filters", "mac": MAC, "layer": "I", "mask": 0}, InvalidValueError,
     "mask: '0' is not a filter mask; expected a number 1-15 (d=8 s=4 t=2 p=1)"),
    ({"op": "add_filter", "mac": MAC, "filter": {"layer": "T", "source": None}}, MissingTokenError,
     "filter: missing key 'destination'"),
    ({"op": "add_filter", "mac": MAC,
      "filter": {"layer": "T", "source": [9, 1], "destination": None, "tos": None, "protocol": None}},
     InvalidValueError, "filter.source: '9-1' is not a port range; the low port 9 is above the high port 1"),
    ({"op": "add_filter", "mac": MAC,
      "filter": {"layer": "I", "source": None, "destination": None, "tos": None, "protocol": None}},
     InvalidValueError, "filter: a filter must match at least one field (s, d, t or p)"),
    ({"op": "delete_filter", "mac": MAC,
      "filter": {"layer": "I", "source": "10.0.0.1", "destination": "::1", "tos": None, "protocol": None}},
     InvalidValueError, "filter.destination: '::1' is IPv6 but the source '10.0.0.1' is IPv4; both must be the same family"),
    ({"op": "register_load_balancer", "mac": MAC, "ip": "10.0.0.1", "redirect_type": 0, "source": None,
      "backends": []}, MissingTokenError, "backends: missing backend address; expected at least one"),
    ({"op": "register_load_balancer", "mac": MAC, "ip": "10.0.0.1", "redirect_type": 0, "source": None,
      "backends": "10.0.0.5"}, InvalidValueError, "backends: '10.0.0.5' is not a list of backend addresses"),
    ({"op": "query", "mac": MAC, "layer": "I", "skip": -3}, InvalidValueError,
     "skip: '-3' is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to leave out)"),
    ({"op": "query", "mac": MAC, "layer": "I", "skip": 2**31}, InvalidValueError,
     "skip: '2147483648' is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to "
     "leave out)"),
    ({"op": "query", "mac": MAC, "layer": "I", "skip": True}, InvalidValueError,
     "skip: True is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to leave out)"),
    ({"op": "query", "mac": MAC, "layer": "I", "skip": 1.0}, InvalidValueError,
     "skip: 1.0 is not a skip count; expected a number 0-2147483647 (how many of the sorted filters to leave out)"),
]


@pytest.mark.parametrize(("data", "error_class", "message"), DICT_ERRORS)
def test_dict_errors_name_the_key(data, error_class, message):
    with pytest.raises(error_class) as caught:
        command_from_dict(data)
    assert str(caught.value) == message
    assert caught.value.column is None


def test_dict_values_accept_the_text_spellings_and_canonicalise():
    data = {"op": "add_filter", "mac": "52-34-56-00-12-22",
            "filter": {"layer": "I", "source": None, "destination": None, "tos": "ef", "protocol": "tcp"}}
    assert command_from_dict(data) == AddFilter(MAC, Filter(Layer.IP, tos=46, protocol=6))
