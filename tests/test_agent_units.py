"""Pure unit tests of the host agent's functional parts: OVS discovery parsing, vetting of
guest frames, combining controller answers, the per-channel token bucket, and the lane that
sends the frames of many channels in one request (with threads standing for workers).

No OVS, network or processes: the ovsdb tables below are literal ``ovs-vsctl
--format=json`` output captured once from Open vSwitch 3.1.0 (a throwaway netdev bridge
``mbxut7549`` with an annotated internal port ``mbxut7549p`` and a plain one
``mbxut7549q``), then varied in the same encoding.
"""

from __future__ import annotations

import copy
import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbvisor.agents.batching import IN_FLIGHT, Alone, Lane
from mbvisor.agents.controller_client import ControllerFailed, ControllerUnavailable
from mbvisor.agents.discovery import CHANNEL_KEY, VmChannel, load_static, scan_ovsdb, vm_channels
from mbvisor.agents.ratelimit import TokenBucket
from mbvisor.agents.vetting import Verdict, combine, vet
from mbvisor.guest.answers import Answer
from mbvisor.guest.grammar import format_command, parse_command
from mbvisor.guest.ring import Status
from mbvisor.topologies.netlab import wait_until

# ---- discovery -------------------------------------------------------------------------

# `ovs-vsctl --format=json --columns=name,datapath_id,ports list Bridge`
REAL_BRIDGES = json.loads(
    '{"data":[["mbxut7549","0000ae3abb160c49",["set",[["uuid","18bddd00-d71f-4507-830f-35efe35ab4d8"],'
    '["uuid","34029db7-6217-41ba-97a1-b3054245cb86"],["uuid","a48d9b09-2592-4693-9a18-1f69ddf55e3e"]]]]],'
    '"headings":["name","datapath_id","ports"]}'
)
# `ovs-vsctl --format=json --columns=_uuid,interfaces list Port` (one interface: a bare atom)
REAL_PORTS = json.loads(
    '{"data":[[["uuid","18bddd00-d71f-4507-830f-35efe35ab4d8"],["uuid","ffad8406-0d82-4c19-aaba-f0bd9f0e0a6c"]],'
    '[["uuid","a48d9b09-2592-4693-9a18-1f69ddf55e3e"],["uuid","322ed9fc-e9cc-49dd-a9bf-89515781c0af"]],'
    '[["uuid","34029db7-6217-41ba-97a1-b3054245cb86"],["uuid","aec3cc92-a231-4666-879f-35c496556427"]]],'
    '"headings":["_uuid","interfaces"]}'
)
# `ovs-vsctl --format=json --columns=_uuid,name,ofport,external_ids,mac_in_use list Interface`
REAL_INTERFACES = json.loads(
    '{"data":[[["uuid","322ed9fc-e9cc-49dd-a9bf-89515781c0af"],"mbxut7549",65534,["map",[]],"ae:3a:bb:16:0c:49"],'
    '[["uuid","aec3cc92-a231-4666-879f-35c496556427"],"mbxut7549p",2,["map",[["attached-mac","52:54:00:AB:CD:EF"],'
    '["mbvisor-channel","/dev/shm/x"],["vm-id","vm-7"]]],"8a:f6:38:20:5d:cb"],'
    '[["uuid","ffad8406-0d82-4c19-aaba-f0bd9f0e0a6c"],"mbxut7549q",1,["map",[]],"ae:91:61:04:24:8d"]],'
    '"headings":["_uuid","name","ofport","external_ids","mac_in_use"]}'
)
REAL_DPID = 0x0000AE3ABB160C49
ANNOTATED = "mbxut7549p"
EXPECTED_REAL = VmChannel(ANNOTATED, "/dev/shm/x", REAL_DPID, 2, ("52:54:00:ab:cd:ef",), "vm-7", "mbxut7549")


def tables():
    """Fresh deep copies of the captured tables, so a test may edit them."""
    return copy.deepcopy(REAL_BRIDGES), copy.deepcopy(REAL_PORTS), copy.deepcopy(REAL_INTERFACES)


def set_column(table: dict, name: str, column: str, value) -> None:
    """Change one cell of the row whose ``name`` column is ``name``."""
    headings = table["headings"]
    rows = [row for row in table["data"] if row[headings.index("name")] == name]
    assert len(rows) == 1, name
    rows[0][headings.index(column)] = value


def external_ids(**ids: str) -> list:
    return ["map", [[key.replace("_", "-"), value] for key, value in sorted(ids.items())]]


def annotate(interfaces: dict, name: str, **ids: str) -> None:
    set_column(interfaces, name, "external_ids", external_ids(**ids))


def test_real_sample_yields_the_annotated_interface_with_its_identity():
    assert vm_channels(*tables()) == [EXPECTED_REAL]


def test_real_sample_channel_name_is_vm_id_slash_interface():
    [channel] = vm_channels(*tables())
    assert channel.name == "vm-7/mbxut7549p"
    assert VmChannel("tap0", "/dev/shm/r", 1, 3, (), "web-1").name == "web-1/tap0"


def test_the_channels_key_is_the_vm_and_its_mac_the_same_on_every_host():
    """A live-migrated VM's destination agent forwards with the keys its source agent
    used: a command both forward is answered once (docs/datacentre.md)."""
    [channel] = vm_channels(*tables())
    assert channel.key == f"vm-7/{channel.macs[0]}"
    elsewhere = VmChannel("tap-on-b", "/dev/shm/other", 2, 9, channel.macs, "vm-7")
    assert elsewhere.key == channel.key and elsewhere.name != channel.name
    assert VmChannel("tap0", "/dev/shm/r", 1, 3, (), "web-1").key == "web-1/tap0"  # no MAC: the interface
    assert len(VmChannel("tap0", "/r", 1, 3, ("02:00:00:00:00:01",), "v" * 500).key) <= 200


def test_unannotated_interfaces_are_ignored():
    bridges, ports, interfaces = tables()
    annotate(interfaces, ANNOTATED, attached_mac="52:54:00:ab:cd:ef", vm_id="vm-7")  # no channel key
    assert vm_channels(bridges, ports, interfaces) == []


def test_empty_channel_annotation_is_ignored():
    bridges, ports, interfaces = tables()
    annotate(interfaces, ANNOTATED, **{"mbvisor_channel": ""}, vm_id="vm-7")
    assert vm_channels(bridges, ports, interfaces) == []


def test_annotating_a_plain_port_makes_it_a_channel_too():
    bridges, ports, interfaces = tables()
    annotate(interfaces, "mbxut7549q", mbvisor_channel="/dev/shm/y", attached_mac="02:00:00:00:00:0A", vm_id="vm-8")
    found = vm_channels(bridges, ports, interfaces)
    assert found == [EXPECTED_REAL, VmChannel("mbxut7549q", "/dev/shm/y", REAL_DPID, 1, ("02:00:00:00:00:0a",), "vm-8",
                                              "mbxut7549")]


@pytest.mark.parametrize("ofport", [-1, 0, ["set", []]], ids=["failed", "zero", "unset"])
def test_interface_without_an_openflow_port_is_ignored(ofport):
    bridges, ports, interfaces = tables()
    set_column(interfaces, ANNOTATED, "ofport", ofport)
    assert vm_channels(bridges, ports, interfaces) == []


def test_attached_mac_is_preferred_over_mac_in_use_and_lower_cased():
    [channel] = vm_channels(*tables())
    assert channel.macs == ("52:54:00:ab:cd:ef",)  # not the tap's own 8a:f6:38:20:5d:cb


def test_mac_in_use_is_the_fallback_and_lower_cased():
    bridges, ports, interfaces = tables()
    annotate(interfaces, ANNOTATED, mbvisor_channel="/dev/shm/x", vm_id="vm-7")
    set_column(interfaces, ANNOTATED, "mac_in_use", "8A:F6:38:20:5D:CB")
    [channel] = vm_channels(bridges, ports, interfaces)
    assert channel.macs == ("8a:f6:38:20:5d:cb",)


def test_a_channel_with_no_mac_at_all_is_refused_with_its_reason():
    """The agent vouches for a MAC; with neither attached-mac nor mac_in_use it has none."""
    bridges, ports, interfaces = tables()
    annotate(interfaces, ANNOTATED, mbvisor_channel="/dev/shm/x", vm_id="vm-7")
    set_column(interfaces, ANNOTATED, "mac_in_use", ["set", []])
    found = scan_ovsdb(bridges, ports, interfaces)
    assert found.channels == []
    [refusal] = found.refused
    assert "is not a MAC address" in refusal.reason


def test_vm_id_defaults_to_the_interface_name():
    bridges, ports, interfaces = tables()
    annotate(interfaces, ANNOTATED, mbvisor_channel="/dev/shm/x", attached_mac="52:54:00:ab:cd:ef")
    [channel] = vm_channels(bridges, ports, interfaces)
    assert channel.vm_id == ANNOTATED
    assert channel.name == f"{ANNOTATED}/{ANNOTATED}"


def test_bridge_without_a_datapath_id_yet_is_ignored():
    bridges, ports, interfaces = tables()
    bridges["data"][0][bridges["headings"].index("datapath_id")] = ["set", []]
    assert vm_channels(bridges, ports, interfaces) == []


def test_interface_in_no_bridge_is_ignored():
    bridges, ports, interfaces = tables()
    bridges["data"] = []
    assert vm_channels(bridges, ports, interfaces) == []
    bridges, ports, interfaces = tables()
    ports["data"] = [row for row in ports["data"] if row[1] != ["uuid", "aec3cc92-a231-4666-879f-35c496556427"]]
    assert vm_channels(bridges, ports, interfaces) == []


def test_several_bridges_each_give_their_own_dpid_and_results_are_sorted_by_interface():
    bridges, ports, interfaces = tables()
    # A second bridge with a single port (ovsdb writes a one-element set as a bare atom),
    # and a third whose only port holds two interfaces (a bond: a real set).
    bridges["data"] += [
        ["br-b", "00000000000000ff", ["uuid", "00000000-0000-0000-0000-00000000b001"]],
        ["br-c", "0000020000000001", ["set", [["uuid", "00000000-0000-0000-0000-00000000c001"]]]],
    ]
    ports["data"] += [
        [["uuid", "00000000-0000-0000-0000-00000000b001"], ["uuid", "00000000-0000-0000-0000-0000000b1f01"]],
        [["uuid", "00000000-0000-0000-0000-00000000c001"],
         ["set", [["uuid", "00000000-0000-0000-0000-0000000c1f01"], ["uuid", "00000000-0000-0000-0000-0000000c1f02"]]]],
    ]
    interfaces["data"] += [
        [["uuid", "00000000-0000-0000-0000-0000000b1f01"], "aa-vnet0", 7,
         external_ids(mbvisor_channel="/dev/shm/b", vm_id="vm-b"), "FE:54:00:00:00:0B"],
        [["uuid", "00000000-0000-0000-0000-0000000c1f01"], "zz-vnet1", 12,
         external_ids(mbvisor_channel="/dev/shm/c1", attached_mac="52:54:00:00:0C:01"), ["set", []]],
        [["uuid", "00000000-0000-0000-0000-0000000c1f02"], "zz-vnet2", ["set", []],
         external_ids(mbvisor_channel="/dev/shm/c2", attached_mac="52:54:00:00:0c:02"), ["set", []]],
    ]
    found = vm_channels(bridges, ports, interfaces)
    assert found == [
        VmChannel("aa-vnet0", "/dev/shm/b", 0xFF, 7, ("fe:54:00:00:00:0b",), "vm-b", "br-b"),
        EXPECTED_REAL,
        VmChannel("zz-vnet1", "/dev/shm/c1", 0x0000020000000001, 12, ("52:54:00:00:0c:01",), "zz-vnet1", "br-c"),
    ]
    assert [channel.name for channel in found] == ["vm-b/aa-vnet0", "vm-7/mbxut7549p", "zz-vnet1/zz-vnet1"]


def test_empty_tables_give_no_channels():
    empty = {"data": [], "headings": []}
    assert vm_channels(empty, empty, empty) == []


def test_channel_key_is_the_documented_one():
    assert CHANNEL_KEY == "mbvisor-channel"


def test_load_static_parses_hex_or_int_dpids_and_lower_cases_macs(tmp_path):
    path = tmp_path / "channels.json"
    path.write_text(json.dumps([
        {"interface": "vnet9", "region": "/dev/shm/nine", "dpid": "0000ae3abb160c49", "port": 4,
         "macs": ["52:54:00:AB:CD:EF", "02:00:00:00:00:01"], "vm_id": "vm-9"},
        {"interface": "vnet1", "region": "/tmp/one", "dpid": 255, "port": "3", "macs": ["FE:54:00:00:00:01"]},
        {"interface": "vnet5", "region": "/tmp/five", "dpid": "ff", "port": 1, "macs": []},
    ]))
    assert load_static(path) == [
        VmChannel("vnet1", "/tmp/one", 255, 3, ("fe:54:00:00:00:01",), "vnet1"),
        VmChannel("vnet5", "/tmp/five", 255, 1, (), "vnet5"),
        VmChannel("vnet9", "/dev/shm/nine", REAL_DPID, 4, ("52:54:00:ab:cd:ef", "02:00:00:00:00:01"), "vm-9"),
    ]
    assert load_static(str(path))[0].name == "vnet1/vnet1"  # a str path works too


def test_load_static_empty_file_list(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]")
    assert load_static(path) == []


# ---- vetting ---------------------------------------------------------------------------

OWN = "52:54:00:ab:cd:ef"
OTHER = "52:54:00:00:00:01"
MACS = (OWN,)


def test_single_valid_command_is_forwarded_in_canonical_form():
    verdict = vet(b"R F 52-54-00-AB-CD-EF 10.0.0.1", MACS)
    assert verdict == Verdict(forward=(f"R F {OWN} 10.0.0.1",), status=Status.OK)


def test_canonical_form_normalises_blanks_values_and_field_order():
    verdict = vet(f"A  {OWN}\tI 15 p tcp t ef d 10.1.0.0/255.255.0.0 s 10.0.0.1/32".encode(), MACS)
    assert verdict.forward == (f"A {OWN} I 15 s 10.0.0.1 d 10.1.0.0/16 t 46 p 6",)
    assert verdict.status is Status.OK


def test_several_commands_in_a_frame_are_all_forwarded_in_order():
    payload = f"@R F {OWN} 10.0.0.1@  @A {OWN} T 3 t 4 p tcp@@X {OWN}@".encode()
    verdict = vet(payload, MACS)
    assert verdict.forward == (f"R F {OWN} 10.0.0.1", f"A {OWN} T 3 t 4 p 6", f"X {OWN}")
    assert verdict.status is Status.OK and verdict.answers == ()


def test_any_of_the_vms_macs_is_accepted():
    verdict = vet(f"@I {OWN}@@M {OTHER}@".encode(), (OWN, OTHER))
    assert verdict.forward == (f"I {OWN}", f"M {OTHER}")


def test_one_foreign_mac_refuses_the_whole_frame_and_reports_every_command():
    payload = f"@R F {OWN} 10.0.0.1@@X {OTHER}@@I {OWN}@".encode()
    verdict = vet(payload, MACS)
    assert verdict.forward == ()
    assert verdict.status is Status.REFUSED
    assert verdict.answers == (NOT_APPLIED["REFUSED"],
                               Answer("REFUSED", "foreign-mac", (f"{OTHER} is not this VM's MAC ({OWN})",)),
                               NOT_APPLIED["REFUSED"])


def test_refusal_without_any_known_mac_says_so():
    verdict = vet(f"X {OTHER}".encode(), ())
    assert verdict.status is Status.REFUSED and verdict.forward == ()
    assert verdict.answers == (Answer("REFUSED", "foreign-mac", (f"{OTHER} is not this VM's MAC (none known)",)),)


def test_syntax_error_gives_the_column_message():
    verdict = vet(f"A {OWN} I 4 s".encode(), MACS)
    assert verdict == Verdict(status=Status.SYNTAX, answers=(Answer("SYNTAX", "syntax", (
        "column 26: missing value for field s; every field of a filter needs a value",)),))


def test_syntax_error_columns_count_in_the_whole_frame():
    payload = f"@X {OWN}@@A {OWN} I 4 s@".encode()
    verdict = vet(payload, MACS)
    assert verdict.forward == () and verdict.status is Status.SYNTAX
    assert verdict.answers == (NOT_APPLIED["SYNTAX"], Answer("SYNTAX", "syntax", (
        "column 48: missing value for field s; every field of a filter needs a value",)))


@pytest.mark.parametrize("payload, status", [
    (f"@Z@@X {OTHER}@", Status.SYNTAX),   # the first bad command decides the status
    (f"@X {OTHER}@@Z@", Status.REFUSED),
])
def test_first_bad_command_decides_the_status(payload, status):
    verdict = vet(payload.encode(), MACS)
    assert verdict.status is status and verdict.forward == ()
    assert [a.code for a in verdict.answers] == (["syntax", "foreign-mac"] if status is Status.SYNTAX
                                                 else ["foreign-mac", "syntax"])


def test_unknown_command_and_empty_payload_are_syntax_errors():
    assert vet(b"Z", MACS).answers == (
        Answer("SYNTAX", "syntax", ("column 1: 'Z' is not a command; expected R, A, D, X, I, M or T",)),)
    empty = vet(b"", MACS)
    assert empty.status is Status.SYNTAX and empty.forward == ()
    assert empty.answers[0].message.startswith("column 1: missing command")


@pytest.mark.parametrize("payload, message", [
    (f"@X {OWN}", "column 1: frame is not terminated; expected a closing @"),
    (f"X {OWN}@X {OWN}@", "column 1: text outside a frame; expected @command@"),
    (f"@X {OWN}@ junk", "column 23: text outside a frame; expected @command@"),
    ("@ @", "column 1: empty frame; expected a command between the @ marks"),
])
def test_framing_errors_are_syntax_and_forward_nothing(payload, message):
    """A frame that cannot be split into commands gets one answer."""
    assert vet(payload.encode(), MACS) == Verdict(status=Status.SYNTAX, answers=(Answer("SYNTAX", "syntax", (message,)),))


def test_encoding_and_length_errors_are_syntax():
    assert vet(b"X \xff", MACS) == Verdict(status=Status.SYNTAX, answers=(Answer("SYNTAX", "syntax", (
        "column 3: byte 0xff is not valid UTF-8; commands are printable ASCII text",)),))
    assert vet(b"X\n", MACS).status is Status.SYNTAX
    too_long = vet(b"@X " + OWN.encode() + b"@" * 4096, MACS)
    assert too_long.status is Status.SYNTAX and too_long.forward == ()
    assert "at most 4096 bytes" in too_long.answers[0].message


NOT_APPLIED = {status: Answer(status, "not-applied", ("another command of the frame was refused; nothing was applied",))
               for status in ("SYNTAX", "REFUSED")}


def check_verdict(verdict: Verdict, macs: tuple[str, ...]) -> None:
    """What the agent relies on: either canonical commands of the VM's own MACs, OK and
    no answers; or nothing forwarded with SYNTAX/REFUSED and an answer per command."""
    assert isinstance(verdict, Verdict)
    if verdict.forward:
        assert verdict.status is Status.OK and verdict.answers == ()
        for text in verdict.forward:
            command = parse_command(text)
            assert format_command(command) == text
            assert command.mac in macs
    else:
        assert verdict.status in (Status.SYNTAX, Status.REFUSED)
        assert verdict.answers and {a.code for a in verdict.answers} <= {"syntax", "foreign-mac", "not-applied"}
        assert verdict.answers[0].status == verdict.status.name or verdict.answers[0].code == "not-applied"


MAC_SETS = st.sampled_from([(OWN,), (), (OWN, OTHER)])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), MAC_SETS)
def test_arbitrary_bytes_never_raise(payload, macs):
    check_verdict(vet(payload, macs), macs)


PIECES = st.sampled_from([
    f"R F {OWN} 10.0.0.1", "R F 52-54-00-AB-CD-EF ::1", f"X {OTHER}", "X 52:54:00:AB:CD:EF",
    f"A {OWN} I 4 s 10.0.0.0/8", f"D {OWN} M 4 s", f"I {OWN}", f"T {OTHER}", f"A {OWN} T 3 t 4 p tcp",
    f"I {OWN} 100", f"M {OWN} 0", " 7",
    f"R L {OWN} 10.0.0.1 1 10.1.0.0/16 10.0.0.5,10.0.0.6", "@", "@", " ", "\t", "Z", OWN, "s", "\n", "\xff",
]).map(lambda text: text.encode("latin-1"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(PIECES, st.binary(max_size=3)), max_size=10).map(b"".join), MAC_SETS)
def test_command_soup_never_raises_and_never_forwards_foreign_or_bad_commands(payload, macs):
    check_verdict(vet(payload, macs), macs)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([f"R F {OWN} 10.0.0.1", f"X {OWN}", f"I {OWN}", f"X {OTHER}",
                                 f"A {OWN} M 1 p ipv6"]), min_size=1, max_size=6))
def test_frame_is_forwarded_exactly_when_every_command_is_the_vms(commands):
    verdict = vet("".join(f"@{text}@" for text in commands).encode(), MACS)
    if any(OTHER in text for text in commands):
        assert verdict.forward == () and verdict.status is Status.REFUSED
        assert len(verdict.answers) == len(commands)
    else:
        assert verdict.forward == tuple(format_command(parse_command(text)) for text in commands)


# ---- combine ---------------------------------------------------------------------------


def test_combine_gives_one_answer_per_command_with_its_lines():
    status, records = combine([{"status": "OK", "code": "ok", "text": "added"},
                               {"status": "OK", "code": "ok", "text": "line 1\nline 2"}])
    assert status is Status.OK and records == [Answer("OK", "ok", ("added",)), Answer("OK", "ok", ("line 1", "line 2"))]


@pytest.mark.parametrize("statuses, expected", [
    (["OK", "REJECTED", "SYNTAX"], Status.REJECTED),
    (["SYNTAX", "REJECTED"], Status.SYNTAX),
    (["OK", "OK", "REFUSED"], Status.REFUSED),
    (["BOGUS", "REJECTED"], Status.INTERNAL),
    (["OK", "ok"], Status.INTERNAL),
    (["OK", "CONFLICT", "SYNTAX"], Status.INTERNAL),
])
def test_combine_takes_the_first_non_ok_status(statuses, expected):
    answers = [{"status": name, "text": f"answer {i}", "code": "some-code"} for i, name in enumerate(statuses)]
    status, records = combine(answers)
    assert status is expected
    assert Status(status).name == expected.name  # what the agent records
    assert [r.message for r in records] == [f"answer {i}" for i in range(len(statuses))]
    assert [r.status for r in records] == [name if name in Status.__members__ else "INTERNAL" for name in statuses]
    assert {r.code for r in records} == {"some-code"}


def test_combine_of_nothing_is_ok_and_empty():
    assert combine([]) == (Status.OK, [])


def test_a_query_answers_as_a_result_counting_its_filters_and_a_paged_one_keeps_the_controllers_total():
    lines = [f"A {OWN} I 4 s 10.0.{i}.0/24" for i in range(3)]
    whole = {"status": "OK", "code": "ok", "text": "\n".join(lines)}
    page = {"status": "OK", "code": "ok", "text": "\n".join(["3 filter(s)", lines[2]])}
    past_the_end = {"status": "OK", "code": "ok", "text": "3 filter(s)"}
    none = {"status": "OK", "code": "ok", "text": "no filters"}
    _, records = combine([whole, page, past_the_end, none], [f"I {OWN}", f"I {OWN} 2", f"I {OWN} 9", f"T {OWN}"])
    assert [r.lines for r in records] == [("3 filter(s)", *lines), ("3 filter(s)", lines[2]), ("3 filter(s)",),
                                          ("0 filter(s)",)]
    assert all(r.result for r in records)  # cut only with a note saying how many lines were left out


# ---- token bucket ----------------------------------------------------------------------


def takes(bucket: TokenBucket, now: float, count: int) -> list[bool]:
    return [bucket.take(now) for _ in range(count)]


def test_burst_is_allowed_at_once_then_refused():
    bucket = TokenBucket(rate=4.0, burst=3.0)
    assert takes(bucket, 100.0, 5) == [True, True, True, False, False]


def test_refill_is_rate_per_second():
    bucket = TokenBucket(rate=4.0, burst=3.0)
    takes(bucket, 100.0, 3)
    assert takes(bucket, 100.125, 1) == [False]        # half a token
    assert takes(bucket, 100.25, 2) == [True, False]   # one token after 1/4 s
    assert takes(bucket, 100.75, 3) == [True, True, False]  # two more after 1/2 s


def test_refill_is_capped_at_burst():
    bucket = TokenBucket(rate=4.0, burst=3.0)
    takes(bucket, 0.0, 3)
    assert takes(bucket, 1000.0, 5) == [True, True, True, False, False]


def test_first_reading_of_any_clock_starts_full():
    for start in (0.0, 1e-9, 12345.5, 1e9):
        bucket = TokenBucket(rate=1.0, burst=2.0)
        assert takes(bucket, start, 3) == [True, True, False]
        assert takes(bucket, start + 1.0, 2) == [True, False]


def test_fractional_rate():
    bucket = TokenBucket(rate=0.5, burst=1.0)
    assert bucket.take(10.0) is True
    assert bucket.take(11.0) is False
    assert bucket.take(12.0) is True
    assert bucket.take(12.0) is False


def test_refused_takes_spend_nothing():
    bucket = TokenBucket(rate=2.0, burst=1.0)
    assert bucket.take(0.0)
    assert takes(bucket, 0.25, 10) == [False] * 10  # half a token, asked ten times
    assert bucket.take(0.5)


def test_sustained_flood_gets_burst_plus_rate_times_duration():
    bucket = TokenBucket(rate=8.0, burst=2.0)
    tick = 1 / 64  # exact in binary, so the expected count is exact
    granted = sum(bucket.take(k * tick) for k in range(10 * 64 + 1))
    assert granted == 2 + 8 * 10


@settings(max_examples=200, deadline=None)
@given(st.floats(0.5, 50), st.integers(1, 20),
       st.lists(st.integers(0, 64), min_size=1, max_size=80))
def test_never_more_than_burst_plus_rate_times_elapsed(rate, burst, gaps):
    bucket = TokenBucket(rate=rate, burst=float(burst))
    now, start, granted = 1000.0, 1000.0, 0
    for gap in gaps:
        now += gap / 64
        granted += bucket.take(now)
        assert granted <= burst + rate * (now - start) + 1e-9
    assert granted >= min(burst, len(gaps))  # the first `burst` takes at most are never refused


def test_static_macs_are_compared_in_canonical_form(tmp_path):
    path = tmp_path / "channels.json"
    path.write_text('[{"interface": "tap1", "region": "/dev/shm/r", "dpid": 1, "port": 2, '
                    '"macs": ["52-54-00-AB-CD-EF"]}]')
    (channel,) = load_static(path)
    assert channel.macs == ("52:54:00:ab:cd:ef",)
    assert vet(b"@X 52:54:00:ab:cd:ef@", channel.macs).forward == ("X 52:54:00:ab:cd:ef",)


def test_a_take_of_several_commands_spends_that_many_or_nothing():
    bucket = TokenBucket(rate=1.0, burst=5.0)
    assert bucket.take(0.0, 3) is True
    assert bucket.take(0.0, 3) is False  # 2 left: nothing spent
    assert bucket.take(0.0, 2) is True
    assert bucket.take(1000.0, 6) is False  # more than the burst is never granted
    assert bucket.take(1000.0, 5) is True


# ---- bounded fault logging -------------------------------------------------------------


def test_fault_log_logs_the_first_then_one_summary_per_interval(caplog):
    import logging

    from mbvisor.guest.reader import FaultLog

    now = [0.0]
    faults = FaultLog(logging.getLogger("mbvisor.test"), interval=10.0, clock=lambda: now[0])
    for step in range(1000):  # 1000 faults over 25 s
        now[0] = step * 0.025
        faults("corrupt", logging.WARNING, "slot %d rejected", step)
        faults("unusable", logging.WARNING, "bad header")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["slot 0 rejected", "bad header",
                        "slot 400 rejected (399 more like this in the last 10 s)",
                        "bad header (399 more like this in the last 10 s)",
                        "slot 800 rejected (399 more like this in the last 10 s)",
                        "bad header (399 more like this in the last 10 s)"]


# ---- one request for the frames of many channels (agents/batching.py) -------------------


class Controller:
    """A lane's ``send``: records each request and answers each command with its own
    command, channel and seq (so an answer routed to the wrong frame shows); ``behave``
    may raise instead.  While ``gate`` is closed requests wait, so the test decides when
    those in flight end."""

    def __init__(self, behave=lambda requests: None):
        self.requests: list[list[dict]] = []
        self.behave = behave
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, requests: list[dict]) -> list[dict]:
        self.requests.append(requests)
        self.gate.wait()
        self.behave(requests)
        return [answer_to(r) for r in requests]


def answer_to(request: dict) -> dict:
    return {"status": "OK", "text": f"{request['channel']} {request['seq']} {request['command']}"}


def frame_of(channel: str, size: int = 1, first: int = 0) -> list[dict]:
    return [{"channel": channel, "seq": first + k, "command": f"X {OWN}"} for k in range(size)]


def answers_to(frame: list[dict]) -> list[dict]:
    return [answer_to(r) for r in frame]


class Worker(threading.Thread):
    """A channel's worker forwarding frames one after another through ``lane``: its
    answers, or what was raised, per frame."""

    def __init__(self, lane: Lane, frames: list[list[dict]]):
        super().__init__(daemon=True)
        self.lane, self.frames, self.results = lane, frames, []

    def run(self):
        for frame in self.frames:
            try:
                self.results.append(self.lane.forward(frame))
            except Exception as error:
                self.results.append(error)


def in_flight_then_waiting(controller: Controller, lane: Lane, *frames: list[dict]) -> list[Worker]:
    """The first IN_FLIGHT ``frames`` sent, each alone, and held at the controller, then
    the others waiting in this order; their workers, in the same order."""
    controller.gate.clear()
    workers = []
    for frame in frames:
        workers.append(Worker(lane, [frame]))
        workers[-1].start()
        if len(workers) <= IN_FLIGHT:
            wait_until(lambda: len(controller.requests) == len(workers), timeout=10.0,
                       what=f"{len(workers)} request(s) in flight")
        else:
            wait_until(lambda: lane.waiting == len(workers) - IN_FLIGHT, timeout=10.0, what="the frame waiting")
    return workers


def finish(controller: Controller, workers: list[Worker]) -> None:
    controller.gate.set()
    for worker in workers:
        worker.join(10)
        assert not worker.is_alive()


def test_a_lone_frame_is_sent_at_once_by_itself():
    controller = Controller()
    lane = Lane(controller)
    worker = Worker(lane, [frame_of("a", 2)])
    worker.start()
    finish(controller, [worker])
    assert worker.results == [answers_to(frame_of("a", 2))]
    assert controller.requests == [frame_of("a", 2)] and lane.waiting == 0


def test_frames_that_wait_meanwhile_go_in_one_request_each_with_its_own_answers():
    controller = Controller()
    lane = Lane(controller)
    held = [frame_of(f"held{k}") for k in range(IN_FLIGHT)]
    b, c, d = frame_of("b", 2), frame_of("c", 1, 7), frame_of("d", 3)
    workers = in_flight_then_waiting(controller, lane, *held, b, c, d)
    finish(controller, workers)
    assert controller.requests == [*held, b + c + d]  # in the order they came, each frame whole
    for worker, frame in zip(workers, (*held, b, c, d)):
        assert worker.results == [answers_to(frame)]
    assert lane.status() == {"requests": IN_FLIGHT + 1, "frames": IN_FLIGHT + 3, "commands": IN_FLIGHT + 6,
                             "split": 0, "waiting": 0}


def test_a_batch_failing_as_a_whole_tells_each_frame_to_ask_alone_and_a_lone_frame_its_error():
    def behave(requests):
        raise (ControllerUnavailable if len(requests) == 1 else ControllerFailed)("HTTP 400 bad-request")

    controller = Controller(behave)
    lane = Lane(controller)
    held = [frame_of(f"held{k}") for k in range(IN_FLIGHT)]
    workers = in_flight_then_waiting(controller, lane, *held, frame_of("b"), frame_of("c"))
    finish(controller, workers)
    results = [result for worker in workers for result in worker.results]
    assert all(isinstance(result, ControllerUnavailable) for result in results[:IN_FLIGHT])  # their own failure
    assert all(isinstance(result, Alone) and "HTTP 400" in str(result) for result in results[IN_FLIGHT:])
    assert lane.status()["split"] == 1
    controller.behave = lambda requests: None
    workers = [Worker(lane, [frame_of(name)]) for name in "efg"]  # the lane goes on, every place free
    for worker in workers:
        worker.start()
    finish(controller, workers)
    assert [worker.results for worker in workers] == [[answers_to(frame_of(name))] for name in "efg"]


def test_a_batch_holds_at_most_the_limit_of_commands_but_always_one_frame():
    controller = Controller()
    lane = Lane(controller, limit=3)
    held = [frame_of(f"held{k}") for k in range(IN_FLIGHT)]
    b, c, d, e = frame_of("b", 2), frame_of("c", 2), frame_of("d"), frame_of("e", 5)
    workers = in_flight_then_waiting(controller, lane, *held, b, c, d, e)
    finish(controller, workers)
    assert controller.requests[:IN_FLIGHT] == held
    assert sorted(controller.requests[IN_FLIGHT:], key=len) == [b, c + d, e]  # ended in any order


def test_a_wrong_number_of_answers_is_never_shared_out():
    controller = Controller()
    lane = Lane(lambda requests: controller(requests)[:-1])
    held = [frame_of(f"held{k}", 2) for k in range(IN_FLIGHT)]
    workers = in_flight_then_waiting(controller, lane, *held, frame_of("b"), frame_of("c"))
    finish(controller, workers)
    results = [result for worker in workers for result in worker.results]
    assert all(isinstance(result, ValueError) for result in results[:IN_FLIGHT])
    assert all(isinstance(result, Alone) for result in results[IN_FLIGHT:])


def test_never_more_than_in_flight_requests_at_once():
    controller = Controller()
    lane = Lane(controller)
    workers = in_flight_then_waiting(controller, lane, *(frame_of(name) for name in "abcdef"))
    assert len(controller.requests) == IN_FLIGHT and lane.waiting == 6 - IN_FLIGHT
    finish(controller, workers)
    assert len(controller.requests) == IN_FLIGHT + 1


def test_many_channels_each_get_their_own_answers_in_their_own_order():
    controller = Controller()
    lane = Lane(controller)
    frames = {name: [frame_of(name, 1 + k % 3, 10 * k) for k in range(40)] for name in "abcdefgh"}
    workers = [Worker(lane, own) for own in frames.values()]
    controller.gate.clear()
    for worker in workers:
        worker.start()
    wait_until(lambda: lane.waiting == len(workers) - IN_FLIGHT, timeout=10.0,
               what="every other channel's first frame waiting")
    finish(controller, workers)
    widest = max(len({request["channel"] for request in batch}) for batch in controller.requests)
    assert widest >= len(workers) - IN_FLIGHT  # the first frames that waited went together
    for worker, own in zip(workers, frames.values()):
        assert worker.results == [answers_to(frame) for frame in own]
    sent = [request for batch in controller.requests for request in batch]
    for name, own in frames.items():
        assert [r for r in sent if r["channel"] == name] == [r for frame in own for r in frame]
    assert lane.status()["commands"] == len(sent) == sum(len(f) for own in frames.values() for f in own)


# ---- the controller's lean start (agents/cli.py) -----------------------------------------------


class Relaunched(Exception):
    pass


def _exec_recorder(calls):
    def execve(path, argv, environment):
        calls.append((path, argv, environment))
        raise Relaunched
    return execve


def test_controller_relaunches_itself_with_the_lean_environment(monkeypatch):
    from mbvisor.agents import cli
    calls = []
    monkeypatch.setattr(cli.os, "execve", _exec_recorder(calls))
    for name in cli.LEAN_CONTROLLER_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli.sys, "orig_argv", ["/venv/bin/python", "-X", "dev", "/venv/bin/mbvisor", "controller"])
    with pytest.raises(Relaunched):
        cli.relaunch_lean()
    (path, argv, environment), = calls
    assert path == cli.sys.executable  # the command line as given, the interpreter's options too:
    assert argv == ["/venv/bin/python", "-X", "dev", "/venv/bin/mbvisor", "controller"]  # no -m, no cwd on the path
    assert {name: environment[name] for name in cli.LEAN_CONTROLLER_ENVIRONMENT} == cli.LEAN_CONTROLLER_ENVIRONMENT


def test_controller_keeps_an_environment_the_caller_chose(monkeypatch):
    """Once every variable is set (by the relaunch or by the operator, whatever the value)
    there is no relaunch: no loop, and an operator's own choice stands."""
    from mbvisor.agents import cli
    calls = []
    monkeypatch.setattr(cli.os, "execve", _exec_recorder(calls))
    monkeypatch.setenv("EVENTLET_NO_GREENDNS", "no")
    monkeypatch.setenv("SETUPTOOLS_USE_DISTUTILS", "local")
    cli.relaunch_lean()
    assert calls == []
    monkeypatch.delenv("EVENTLET_NO_GREENDNS")
    monkeypatch.setattr(cli.sys, "stdout", None)  # a closed stdout (started with >&-) is no reason to fail
    with pytest.raises(Relaunched):
        cli.relaunch_lean()
    assert calls[0][2]["SETUPTOOLS_USE_DISTUTILS"] == "local" and calls[0][2]["EVENTLET_NO_GREENDNS"] == "yes"


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=4).map(b"".join))
def test_a_forwarded_command_is_a_query_exactly_when_the_grammar_says_so(payload):
    """The agent tells queries by their letter, and paged ones by their skip (no second
    parse per answer)."""
    from mbvisor.agents.vetting import is_paged_query, is_query
    from mbvisor.guest.commands import Query
    for text in vet(payload, (OWN, OTHER)).forward:
        command = parse_command(text)
        assert is_query(text) == isinstance(command, Query)
        if is_query(text):
            assert is_paged_query(text) == (command.skip > 0)
