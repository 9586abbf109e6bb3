"""An in-memory OpenFlow 1.3 switch for unit tests of the controller shell (the FAUCET
``clib/fakeoftable.py`` idea, issue 10).

Why: the shell (reconcilers, barriers, bundles, error handling) only meets a switch in the
slow host tests, so its failure paths went untested.  This fake is honest in the one way
that matters: every message the controller sends is serialised, parsed back from the
bytes with os-ken's own parsers (or the small local ones below for what os-ken cannot
decode: GroupMod, BarrierRequest, multipart requests, PacketOut, ONF bundle add) and only
then applied; every answer is encoded to bytes and parsed back too, so handlers get exactly
the objects a real connection would give them (``msg.datapath`` is the fake datapath).

Modelled as in Open vSwitch 3.1 (``ofproto/ofproto.c``):

* FlowMod ADD replaces a flow with the same table, priority and match; like OVS (and
  unlike the OpenFlow text) the replaced flow's counters are kept unless
  ``OFPFF_RESET_COUNTS``.  MODIFY/MODIFY_STRICT change instructions only (cookie and
  counters kept), DELETE/DELETE_STRICT honour cookie/mask, ``OFPTT_ALL``, out_port and
  out_group.  Matches are normalised (value masked, a full mask is an exact match, a zero
  mask no match); prerequisites are enforced (``OFPBMC_BAD_PREREQ``), order-independent.
  Actions that name a missing group fail with ``OFPBAC_BAD_OUT_GROUP`` (checked when
  applied, so a bundle may add the group first).
* GroupMod ADD/MODIFY/DELETE (``OFPG_ALL``); deleting a group deletes the flows using it.
* Barrier, Echo, multipart flow stats (filters as DELETE; replies split below 64 KiB with
  ``OFPMPF_REPLY_MORE``), group description, port description.
* ONF bundles (EXT-230, what OVS offers for OF1.3): OPEN/CLOSE/COMMIT/DISCARD, ADD with
  an implicit open; a commit applies every message to a copy of the tables and keeps the
  copy only if all succeed.  On a failing message OVS sends that message's error (xid of
  the inner message = the add message's xid) and then fails the commit with
  ``OFPBFC_MSG_FAILED``; for OF1.3 OVS encodes bundle errors as ONF experimenter errors
  (type ``OFPET_EXPERIMENTER``, experimenter ``ONF_EXPERIMENTER_ID``, exp_type 2300 + the
  OF1.4 code, so MSG_FAILED is 2313).  Replies carry flags 0, as OVS's.
* Errors carry the offending message's first 64 bytes, as OVS's do.

``tests/test_fakeswitch.py::test_the_fake_answers_and_holds_what_a_real_ovs_vswitchd_does``
(a host test) sends the same bytes to a private ovs-vswitchd and to the fake and compares
errors (xid, type, code), flow stats and group descriptions: they agree, bundle failures
included.

Meters are kept (add/modify/delete, and a flow naming an unknown meter is refused, as OVS
does) but do not limit rates.  Not modelled: timeouts, flow-removed and flow-monitor messages, OF versions other
than 1.3, roles, port mods, table features, ``OFPFF_CHECK_OVERLAP``, write-actions in
traces, conjunctive matches and fragment reassembly in traces (flows holding them are
kept and reported; their behaviour is proved on a real switch, tests/test_filters_ovs.py),
packets other than ARP replies from :meth:`FakeSwitch.add_host` hosts, NORMAL's MAC learning; a packet-out inside a bundle acts when the commit reaches it, even if the
commit then fails.  ``trace`` is a model of the pipeline for assertions, not a datapath.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

from os_ken.lib import addrconv, hub
from os_ken.lib.packet import arp, ethernet, packet
from os_ken.ofproto import nicira_ext, ofproto_common, ofproto_parser
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

ONF = ofproto_common.ONF_EXPERIMENTER_ID
# OVS's OF1.3 numbering of the OF1.4 bundle errors (ONF1.3(2300 + code) in ofp-errors.h).
OFPBFC_BAD_ID = 2302
OFPBFC_BUNDLE_CLOSED = 2304
OFPBFC_BAD_TYPE = 2306
OFPBFC_BAD_FLAGS = 2307
OFPBFC_MSG_BAD_XID = 2309
OFPBFC_MSG_UNSUP = 2310
OFPBFC_MSG_FAILED = 2313
OFPBFC_TIMEOUT = 2314
ERROR_DATA = 64  # bytes of the offending message an error carries
REPLY_LIMIT = 0xFFFF  # a message's length is 16 bits: multipart replies split below it
TABLES = 255  # OVS: tables 0-254
RESUBMIT_DEPTH = 64
NO_RECIRC = 0xFF
NX_NAT_F_DESTINATION = 1 << 1  # not in os-ken's nicira_ext


class OpenFlowError(Exception):
    """What the switch answers with an OFPT_ERROR.  ``type == OFPET_EXPERIMENTER`` means an
    ONF experimenter error whose exp_type is ``code`` (how OVS encodes bundle errors)."""

    def __init__(self, type_: int, code: int):
        super().__init__(f"OpenFlow error type {type_} code {code}")
        self.type, self.code = type_, code


def _bundle_error(code: int) -> OpenFlowError:
    return OpenFlowError(ofp.OFPET_EXPERIMENTER, code)


# --- the wire: what the controller sends, parsed back from its bytes ------------------------

@dataclass
class Raw:
    """A message neither os-ken nor this module decodes; the switch answers OFPBRC_BAD_TYPE."""

    msg_type: int
    xid: int
    buf: bytes


def _headed(msg, version, msg_type, msg_len, xid, buf):
    msg.set_headers(version, msg_type, msg_len, xid)
    msg.set_buf(buf)
    return msg


def _parse_barrier(datapath, version, msg_type, msg_len, xid, buf):
    return _headed(parser.OFPBarrierRequest(datapath), version, msg_type, msg_len, xid, buf)


def _parse_group_mod(datapath, version, msg_type, msg_len, xid, buf):
    command, type_, group_id = struct.unpack_from(ofp.OFP_GROUP_MOD_PACK_STR, buf, ofp.OFP_HEADER_SIZE)
    buckets, offset = [], ofp.OFP_GROUP_MOD_SIZE
    while offset < msg_len:
        bucket = parser.OFPBucket.parser(buf, offset)
        buckets.append(bucket)
        offset += bucket.len
    return _headed(parser.OFPGroupMod(datapath, command, type_, group_id, buckets),
                   version, msg_type, msg_len, xid, buf)


def _parse_multipart_request(datapath, version, msg_type, msg_len, xid, buf):
    kind, flags = struct.unpack_from(ofp.OFP_MULTIPART_REQUEST_PACK_STR, buf, ofp.OFP_HEADER_SIZE)
    if kind == ofp.OFPMP_FLOW:
        table_id, out_port, out_group, cookie, cookie_mask = struct.unpack_from(
            ofp.OFP_FLOW_STATS_REQUEST_0_PACK_STR, buf, ofp.OFP_MULTIPART_REQUEST_SIZE)
        match = parser.OFPMatch.parser(
            buf, ofp.OFP_MULTIPART_REQUEST_SIZE + ofp.OFP_FLOW_STATS_REQUEST_SIZE - ofp.OFP_MATCH_SIZE)
        msg = parser.OFPFlowStatsRequest(datapath, flags, table_id, out_port, out_group, cookie, cookie_mask, match)
    elif kind == ofp.OFPMP_AGGREGATE:
        table_id, out_port, out_group, cookie, cookie_mask = struct.unpack_from(
            ofp.OFP_AGGREGATE_STATS_REQUEST_0_PACK_STR, buf, ofp.OFP_MULTIPART_REQUEST_SIZE)
        match = parser.OFPMatch.parser(
            buf, ofp.OFP_MULTIPART_REQUEST_SIZE + ofp.OFP_AGGREGATE_STATS_REQUEST_SIZE - ofp.OFP_MATCH_SIZE)
        msg = parser.OFPAggregateStatsRequest(datapath, flags, table_id, out_port, out_group, cookie, cookie_mask,
                                              match)
    elif kind == ofp.OFPMP_GROUP_DESC:
        msg = parser.OFPGroupDescStatsRequest(datapath, flags)
    elif kind == ofp.OFPMP_PORT_DESC:
        msg = parser.OFPPortDescStatsRequest(datapath, flags)
    else:
        return Raw(msg_type, xid, bytes(buf))
    return _headed(msg, version, msg_type, msg_len, xid, buf)


def _parse_packet_out(datapath, version, msg_type, msg_len, xid, buf):
    buffer_id, in_port, actions_len = struct.unpack_from(ofp.OFP_PACKET_OUT_PACK_STR, buf, ofp.OFP_HEADER_SIZE)
    actions, offset = [], ofp.OFP_PACKET_OUT_SIZE
    while offset < ofp.OFP_PACKET_OUT_SIZE + actions_len:
        action = parser.OFPAction.parser(buf, offset)
        actions.append(action)
        offset += action.len
    return _headed(parser.OFPPacketOut(datapath, buffer_id, in_port, actions, bytes(buf[offset:msg_len])),
                   version, msg_type, msg_len, xid, buf)


def _parse_bundle_add(datapath, version, msg_type, msg_len, xid, buf):
    bundle_id, flags = struct.unpack_from(ofp.ONF_BUNDLE_ADD_MSG_PACK_STR, buf, ofp.OFP_EXPERIMENTER_HEADER_SIZE)
    start = ofp.OFP_EXPERIMENTER_HEADER_SIZE + ofp.ONF_BUNDLE_ADD_MSG_SIZE
    inner_length = ofproto_parser.header(buf[start:])[2]
    inner = decode(datapath, bytes(buf[start:start + inner_length]))
    return _headed(parser.ONFBundleAddMsg(datapath, bundle_id, flags, inner, []),
                   version, msg_type, msg_len, xid, buf)


@dataclass
class MeterMod:
    """os-ken only encodes meter mods; the switch needs the command and the meter id."""

    command: int
    meter_id: int
    xid: int
    buf: bytes


def _parse_meter_mod(datapath, version, msg_type, msg_len, xid, buf):
    command, _flags, meter_id = struct.unpack_from("!HHI", buf, ofp.OFP_HEADER_SIZE)
    return MeterMod(command, meter_id, xid, bytes(buf))


_LOCAL_PARSERS = {
    ofp.OFPT_METER_MOD: _parse_meter_mod,
    ofp.OFPT_BARRIER_REQUEST: _parse_barrier,
    ofp.OFPT_GROUP_MOD: _parse_group_mod,
    ofp.OFPT_MULTIPART_REQUEST: _parse_multipart_request,
    ofp.OFPT_PACKET_OUT: _parse_packet_out,
}
_OSKEN_PARSED = {ofp.OFPT_ECHO_REQUEST, ofp.OFPT_FLOW_MOD, ofp.OFPT_EXPERIMENTER}


def decode(datapath, data: bytes):
    """One message from its bytes, as the switch would read it."""
    version, msg_type, msg_len, xid = ofproto_parser.header(data)
    if msg_type == ofp.OFPT_EXPERIMENTER and struct.unpack_from("!II", data, ofp.OFP_HEADER_SIZE) == (
            ONF, ofp.ONF_ET_BUNDLE_ADD_MESSAGE):
        return _parse_bundle_add(datapath, version, msg_type, msg_len, xid, data)
    if msg_type in _LOCAL_PARSERS:
        return _LOCAL_PARSERS[msg_type](datapath, version, msg_type, msg_len, xid, data)
    if msg_type in _OSKEN_PARSED:
        return ofproto_parser.msg(datapath, version, msg_type, msg_len, xid, data)
    return Raw(msg_type, xid, bytes(data))


# --- the wire: what the switch answers, encoded, then parsed as the controller would --------

def _message(msg_type: int, xid: int, body: bytes) -> bytes:
    return struct.pack(ofproto_common.OFP_HEADER_PACK_STR, ofp.OFP_VERSION, msg_type,
                       ofp.OFP_HEADER_SIZE + len(body), xid) + body


def serialized(thing) -> bytes:
    """Bytes of an os-ken match, instruction or bucket (they serialise into a buffer)."""
    buf = bytearray()
    length = thing.serialize(buf, 0)
    if isinstance(length, int):  # OFPMatch returns its padded length
        buf += bytes(length - len(buf))
    return bytes(buf)


def _error_body(error: OpenFlowError, offending: bytes) -> bytes:
    data = bytes(offending[:ERROR_DATA])
    if error.type == ofp.OFPET_EXPERIMENTER:
        return struct.pack(ofp.OFP_ERROR_EXPERIMENTER_MSG_PACK_STR, error.type, error.code, ONF) + data
    return struct.pack(ofp.OFP_ERROR_MSG_PACK_STR, error.type, error.code) + data


def _bundle_ctrl_body(bundle_id: int, type_: int) -> bytes:
    return (struct.pack("!II", ONF, ofp.ONF_ET_BUNDLE_CONTROL)
            + struct.pack(ofp.ONF_BUNDLE_CTRL_PACK_STR, bundle_id, type_, 0))


def _port_bytes(port: parser.OFPPort) -> bytes:
    return struct.pack(ofp.OFP_PORT_PACK_STR, port.port_no, addrconv.mac.text_to_bin(port.hw_addr),
                       port.name, port.config, port.state, port.curr, port.advertised, port.supported,
                       port.peer, port.curr_speed, port.max_speed)


def _multipart_replies(kind: int, xid: int, entries: list[bytes], limit: int) -> list[bytes]:
    """Entries packed into as few replies as fit ``limit`` bytes each, all but the last
    flagged OFPMPF_REPLY_MORE (what OVS's ofpmp_postappend does at 64 KiB)."""
    room = limit - ofp.OFP_MULTIPART_REPLY_SIZE
    chunks, current = [], b""
    for entry in entries:
        if current and len(current) + len(entry) > room:
            chunks.append(current)
            current = b""
        current += entry
    chunks.append(current)
    return [_message(ofp.OFPT_MULTIPART_REPLY, xid,
                     struct.pack(ofp.OFP_MULTIPART_REPLY_PACK_STR, kind,
                                 ofp.OFPMPF_REPLY_MORE if i < len(chunks) - 1 else 0) + chunk)
            for i, chunk in enumerate(chunks)]


# --- matches ------------------------------------------------------------------------------

Match = tuple  # ((field, value, mask, width_bytes), ...) sorted, value masked, mask never 0

PREREQUISITES = {  # field -> (required field, allowed values), checked on the whole match
    "ipv4_src": ("eth_type", {0x0800}), "ipv4_dst": ("eth_type", {0x0800}),
    "ipv6_src": ("eth_type", {0x86DD}), "ipv6_dst": ("eth_type", {0x86DD}),
    "ipv6_flabel": ("eth_type", {0x86DD}),
    "ip_proto": ("eth_type", {0x0800, 0x86DD}), "ip_dscp": ("eth_type", {0x0800, 0x86DD}),
    "ip_ecn": ("eth_type", {0x0800, 0x86DD}),
    "tcp_src": ("ip_proto", {6}), "tcp_dst": ("ip_proto", {6}),
    "udp_src": ("ip_proto", {17}), "udp_dst": ("ip_proto", {17}),
    "sctp_src": ("ip_proto", {132}), "sctp_dst": ("ip_proto", {132}),
    "icmpv4_type": ("ip_proto", {1}), "icmpv4_code": ("ip_proto", {1}),
    "icmpv6_type": ("ip_proto", {58}), "icmpv6_code": ("ip_proto", {58}),
    "arp_op": ("eth_type", {0x0806}), "arp_spa": ("eth_type", {0x0806}), "arp_tpa": ("eth_type", {0x0806}),
    "arp_sha": ("eth_type", {0x0806}), "arp_tha": ("eth_type", {0x0806}),
}


def field_int(name: str, value) -> tuple[int, int, int]:
    """A field's user value (as OFPMatch takes it) as (value, mask, width in bytes)."""
    _, raw, mask = ofp.oxm_from_user(name, value)
    full = (1 << 8 * len(raw)) - 1
    mask_int = int.from_bytes(mask, "big") if mask is not None else full
    return int.from_bytes(raw, "big") & mask_int, mask_int, len(raw)


def canonical(match: parser.OFPMatch) -> Match:
    """The normal form OVS keeps: value & mask, full masks exact, zero masks dropped."""
    fields = []
    for name, value in match.items():
        number, mask, width = field_int(name, value)
        if mask:
            fields.append((name, number, mask, width))
    return tuple(sorted(fields))


def user_items(match: Match) -> list[tuple[str, object]]:
    """A canonical match as (name, user value) pairs, masks only where partial."""
    items = []
    for name, value, mask, width in match:
        full = (1 << 8 * width) - 1
        items.append(ofp.oxm_to_user(ofp.oxm_from_user_header(name), value.to_bytes(width, "big"),
                                     None if mask == full else mask.to_bytes(width, "big")))
    return items


def check_prerequisites(match: Match) -> None:
    """OVS refuses a match whose fields' prerequisites are not matched exactly (the
    transport ones through ip_proto, which needs an IP eth_type in turn); vlan_pcp needs
    a VLAN to be present."""
    exact = {name: value for name, value, mask, width in match if mask == (1 << 8 * width) - 1}
    vlan = {name: (value, mask) for name, value, mask, _ in match}.get("vlan_vid", (0, 0))
    for name, *_ in match:
        required = PREREQUISITES.get(name)
        if (required and exact.get(required[0]) not in required[1]
                or name == "vlan_pcp" and not vlan[0] & vlan[1] & ofp.OFPVID_PRESENT):
            raise OpenFlowError(ofp.OFPET_BAD_MATCH, ofp.OFPBMC_BAD_PREREQ)


def within(flow: Match, request: Match) -> bool:
    """True if ``flow`` is at least as specific as ``request`` (loose DELETE/MODIFY/stats)."""
    have = {name: (value, mask) for name, value, mask, _ in flow}
    for name, value, mask, _ in request:
        if name not in have or have[name][1] & mask != mask or have[name][0] & mask != value:
            return False
    return True


# --- tables -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A flow as the switch holds it; ``instructions`` are the decoded os-ken objects."""

    table: int
    priority: int
    match: Match
    cookie: int
    instructions: tuple
    flags: int = 0
    packet_count: int = 0
    byte_count: int = 0
    created: float = field(default_factory=time.monotonic, compare=False)

    @property
    def identity(self) -> tuple:
        return (self.table, self.priority, self.match)

    def ofp_match(self) -> parser.OFPMatch:
        return parser.OFPMatch(**dict(user_items(self.match)))

    def actions(self) -> list:
        """Every action of the flow's instructions, in order."""
        return [a for i in self.instructions for a in getattr(i, "actions", [])]


@dataclass(frozen=True)
class GroupEntry:
    group_id: int
    type: int
    buckets: tuple


def _dump_order(entry: Entry) -> tuple:
    """Tables in order, higher priorities first (as ovs-ofctl dump-flows lists them)."""
    return (entry.table, -entry.priority, entry.match)


def _outputs_to(actions, port: int) -> bool:
    return any(isinstance(a, parser.OFPActionOutput) and a.port == port for a in actions)


def _uses_group(actions, group_id: int) -> bool:
    return any(isinstance(a, parser.OFPActionGroup) and a.group_id == group_id for a in actions)


def _meters(instructions) -> set[int]:
    return {i.meter_id for i in instructions if isinstance(i, parser.OFPInstructionMeter)}


@dataclass
class Tables:
    """Flows by identity and groups by id; copied whole for an atomic bundle commit."""

    flows: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    meters: set = field(default_factory=set)

    def copy(self) -> "Tables":
        return Tables(dict(self.flows), dict(self.groups), set(self.meters))

    def meter_mod(self, mod: MeterMod) -> None:
        known = mod.meter_id in self.meters
        if mod.command == ofp.OFPMC_ADD and known:
            raise OpenFlowError(ofp.OFPET_METER_MOD_FAILED, ofp.OFPMMFC_METER_EXISTS)
        if mod.command in (ofp.OFPMC_MODIFY, ofp.OFPMC_DELETE) and not known:
            raise OpenFlowError(ofp.OFPET_METER_MOD_FAILED, ofp.OFPMMFC_UNKNOWN_METER)
        if mod.command == ofp.OFPMC_DELETE:
            self.meters.discard(mod.meter_id)
            for identity in [i for i, e in self.flows.items() if mod.meter_id in _meters(e.instructions)]:
                del self.flows[identity]  # OpenFlow: a deleted meter takes its flows along
        else:
            self.meters.add(mod.meter_id)

    def select(self, table: int, match: Match, cookie: int, cookie_mask: int, priority: int | None = None,
               out_port: int = ofp.OFPP_ANY, out_group: int = ofp.OFPG_ANY) -> list[Entry]:
        """Flows a DELETE/MODIFY/stats request names: strict when ``priority`` is given."""
        if priority is not None and table != ofp.OFPTT_ALL:
            found = self.flows.get((table, priority, match))
            candidates = [found] if found else []
        else:
            candidates = [e for e in self.flows.values() if table in (ofp.OFPTT_ALL, e.table)
                          and (e.match == match and e.priority == priority if priority is not None
                               else within(e.match, match))]
        return [e for e in candidates if e.cookie & cookie_mask == cookie & cookie_mask
                and (out_port == ofp.OFPP_ANY or _outputs_to(e.actions(), out_port))
                and (out_group == ofp.OFPG_ANY or _uses_group(e.actions(), out_group))]

    def check_groups(self, actions) -> None:
        for action in actions:
            if isinstance(action, parser.OFPActionGroup) and action.group_id not in self.groups:
                raise OpenFlowError(ofp.OFPET_BAD_ACTION, ofp.OFPBAC_BAD_OUT_GROUP)

    def flow_mod(self, mod) -> None:
        match = canonical(mod.match)
        check_prerequisites(match)
        strict = mod.command in (ofp.OFPFC_MODIFY_STRICT, ofp.OFPFC_DELETE_STRICT)
        priority = mod.priority if strict else None
        if mod.command == ofp.OFPFC_ADD:
            self._add(mod, match)
        elif mod.command in (ofp.OFPFC_MODIFY, ofp.OFPFC_MODIFY_STRICT):
            targets = self.select(mod.table_id, match, mod.cookie, mod.cookie_mask, priority)
            if targets:
                self.check_groups([a for i in mod.instructions for a in getattr(i, "actions", [])])
                if not _meters(mod.instructions) <= self.meters:
                    raise OpenFlowError(ofp.OFPET_METER_MOD_FAILED, ofp.OFPMMFC_UNKNOWN_METER)
            reset = mod.flags & ofp.OFPFF_RESET_COUNTS
            for entry in targets:
                self.flows[entry.identity] = replace(
                    entry, instructions=tuple(mod.instructions),
                    packet_count=0 if reset else entry.packet_count, byte_count=0 if reset else entry.byte_count)
        elif mod.command in (ofp.OFPFC_DELETE, ofp.OFPFC_DELETE_STRICT):
            for entry in self.select(mod.table_id, match, mod.cookie, mod.cookie_mask, priority,
                                     mod.out_port, mod.out_group):
                del self.flows[entry.identity]
        else:
            raise OpenFlowError(ofp.OFPET_FLOW_MOD_FAILED, ofp.OFPFMFC_BAD_COMMAND)

    def _add(self, mod, match: Match) -> None:
        if mod.table_id >= TABLES:
            raise OpenFlowError(ofp.OFPET_FLOW_MOD_FAILED, ofp.OFPFMFC_BAD_TABLE_ID)
        self.check_groups([a for i in mod.instructions for a in getattr(i, "actions", [])])
        if not _meters(mod.instructions) <= self.meters:
            raise OpenFlowError(ofp.OFPET_METER_MOD_FAILED, ofp.OFPMMFC_UNKNOWN_METER)
        old = self.flows.get((mod.table_id, mod.priority, match))
        keep = old is not None and not mod.flags & ofp.OFPFF_RESET_COUNTS
        entry = Entry(mod.table_id, mod.priority, match, mod.cookie, tuple(mod.instructions), mod.flags,
                      old.packet_count if keep else 0, old.byte_count if keep else 0)
        self.flows[entry.identity] = entry

    def group_mod(self, mod) -> None:
        if mod.command == ofp.OFPGC_ADD:
            if mod.group_id in self.groups:
                raise OpenFlowError(ofp.OFPET_GROUP_MOD_FAILED, ofp.OFPGMFC_GROUP_EXISTS)
            if mod.group_id > ofp.OFPG_MAX:
                raise OpenFlowError(ofp.OFPET_GROUP_MOD_FAILED, ofp.OFPGMFC_INVALID_GROUP)
        elif mod.command == ofp.OFPGC_MODIFY:
            if mod.group_id not in self.groups:
                raise OpenFlowError(ofp.OFPET_GROUP_MOD_FAILED, ofp.OFPGMFC_UNKNOWN_GROUP)
        elif mod.command == ofp.OFPGC_DELETE:
            for group_id in (list(self.groups) if mod.group_id == ofp.OFPG_ALL else [mod.group_id]):
                self._delete_group(group_id)
            return
        else:
            raise OpenFlowError(ofp.OFPET_GROUP_MOD_FAILED, ofp.OFPGMFC_BAD_COMMAND)
        self.groups[mod.group_id] = GroupEntry(mod.group_id, mod.type, tuple(mod.buckets))

    def _delete_group(self, group_id: int) -> None:
        """As OVS: the flows that use a deleted group go with it."""
        self.groups.pop(group_id, None)
        for entry in [e for e in self.flows.values() if _uses_group(e.actions(), group_id)]:
            del self.flows[entry.identity]


# --- trace --------------------------------------------------------------------------------

@dataclass
class Trace:
    """Where a packet went.  ``verdict``: "normal" if NORMAL ran, else "output" if it left by
    a port, else "controller" if it went to the controller, else "drop".  ``fields`` are the
    packet's fields as it left (or at the end), ``path`` the flows it hit in order."""

    verdict: str
    ports: list[int]
    fields: dict
    path: list[tuple[int, int, int]]
    controller: tuple[int, int, int] | None = None  # the flow that sent it to the controller


class _Tracer:
    """One packet through the tables.  Nicira ct: the state after ``ct`` in zone Z is
    ``ct_state[Z]`` (or ``ct_state`` if an int; ``+new+trk`` if not given); NAT applies only
    a ct(commit) with a destination range (it rewrites the destination address); ct exec()
    register moves write into the packet's fields."""

    def __init__(self, switch: "FakeSwitch", fields: dict, ct_state, bucket: int | None, count: bool, length: int):
        self.switch, self.fields, self.ct_state, self.bucket = switch, fields, ct_state, bucket
        self.count, self.length = count, length
        self.trace = Trace("drop", [], dict(fields), [])
        self.normal = False
        self.current: Entry | None = None  # the flow whose actions run

    def run(self) -> Trace:
        self.pipeline(0, 0)
        trace = self.trace
        if self.normal:
            trace.verdict = "normal"
        elif trace.ports:
            trace.verdict = "output"
        elif trace.controller:
            trace.verdict = "controller"
        else:
            trace.fields = dict(self.fields)
        return trace

    def lookup(self, table: int) -> Entry | None:
        best = None
        for entry in self.switch.tables.flows.values():
            if entry.table == table and (best is None or entry.priority > best.priority) and self.matches(entry):
                best = entry
        return best

    def matches(self, entry: Entry) -> bool:
        return all(self.value(name) & mask == value for name, value, mask, _ in entry.match)

    def value(self, name: str) -> int:
        """A field of the packet as an integer; absent fields are 0, as in OVS's flow key."""
        if name not in self.fields:
            return 0
        return field_int(name, self.fields[name])[0]

    def pipeline(self, table: int, depth: int) -> None:
        if depth > RESUBMIT_DEPTH:
            return
        entry = self.lookup(table)
        if entry is None:
            return  # OpenFlow 1.3 table miss without a miss flow: drop
        self.trace.path.append((entry.table, entry.priority, entry.cookie))
        if self.count:
            self.switch.tables.flows[entry.identity] = replace(
                entry, packet_count=entry.packet_count + 1, byte_count=entry.byte_count + self.length)
        caller, self.current = self.current, entry
        for instruction in entry.instructions:
            if isinstance(instruction, parser.OFPInstructionActions) and instruction.type == ofp.OFPIT_APPLY_ACTIONS:
                self.actions(instruction.actions, depth)
            elif isinstance(instruction, parser.OFPInstructionGotoTable):
                self.pipeline(instruction.table_id, depth + 1)
            elif isinstance(instruction, parser.OFPInstructionMeter):
                pass  # meters are kept, not rate-limiting: every traced packet passes
            elif isinstance(instruction, parser.OFPInstructionWriteMetadata):
                old = self.value("metadata")
                self.fields["metadata"] = (old & ~instruction.metadata_mask) | (
                    instruction.metadata & instruction.metadata_mask)
            else:
                raise NotImplementedError(f"trace does not model {instruction}")
        self.current = caller

    def actions(self, actions, depth: int) -> None:
        for action in actions:
            self.action(action, depth)

    def action(self, action, depth: int) -> None:
        if isinstance(action, parser.OFPActionOutput):
            self.output(action.port)
        elif isinstance(action, parser.OFPActionSetField):
            self.fields[action.key] = action.value
        elif isinstance(action, parser.OFPActionGroup):
            self.group(self.switch.tables.groups[action.group_id], depth)
        elif isinstance(action, parser.NXActionResubmitTable):
            self.pipeline(action.table_id, depth + 1)
        elif isinstance(action, parser.NXActionCT):
            self.conntrack(action, depth)
        elif isinstance(action, parser.NXActionRegMove):
            self.move(action)
        elif isinstance(action, parser.NXActionOutputReg):
            offset, bits = action.ofs_nbits >> 6, (action.ofs_nbits & 0x3F) + 1
            self.output((self.value(action.src) >> offset) & ((1 << bits) - 1))
        else:
            raise NotImplementedError(f"trace does not model {action}")

    def output(self, port: int) -> None:
        in_port = self.fields.get("in_port")
        if port == ofp.OFPP_NORMAL:
            self.normal = True
        elif port == ofp.OFPP_CONTROLLER:
            self.trace.controller = (self.current.table, self.current.priority, self.current.cookie)
        elif port in (ofp.OFPP_FLOOD, ofp.OFPP_ALL):
            self.trace.ports += [p for p in sorted(self.switch.ports) if p != in_port]
        elif port == ofp.OFPP_IN_PORT:
            self.trace.ports.append(in_port)
        elif port != in_port:  # OpenFlow (and OVS) drop an output to the port it came in on
            self.trace.ports.append(port)
        self.trace.fields = dict(self.fields)

    def group(self, group: GroupEntry, depth: int) -> None:
        if group.type == ofp.OFPGT_ALL:
            chosen = list(group.buckets)
        elif group.type == ofp.OFPGT_SELECT:
            index = self.bucket if self.bucket is not None else zlib.crc32(
                repr(sorted(self.fields.items())).encode()) % len(group.buckets)
            chosen = [group.buckets[index]]
        else:
            chosen = list(group.buckets[:1])
        for bucket in chosen:
            self.actions(bucket.actions, depth)

    def conntrack(self, action, depth: int) -> None:
        zone = action.zone_ofs_nbits
        state = self.ct_state.get(zone, 0x21) if isinstance(self.ct_state, dict) else self.ct_state
        for inner in action.actions:
            if (isinstance(inner, parser.NXActionNAT) and action.flags & nicira_ext.NX_CT_F_COMMIT
                    and inner.flags & NX_NAT_F_DESTINATION):
                address = inner.range_ipv4_min or inner.range_ipv6_min
                self.fields["ipv4_dst" if inner.range_ipv4_min else "ipv6_dst"] = address
            elif isinstance(inner, parser.NXActionRegMove):
                self.move(inner)
        self.fields.update(ct_state=state, ct_zone=zone)
        if action.recirc_table != NO_RECIRC:
            self.pipeline(action.recirc_table, depth + 1)

    def move(self, action) -> None:
        bits = (1 << action.n_bits) - 1
        moved = (self.value(action.src_field) >> action.src_ofs) & bits
        old = self.value(action.dst_field)
        self.fields[action.dst_field] = (old & ~(bits << action.dst_ofs)) | (moved << action.dst_ofs)


# --- the switch ---------------------------------------------------------------------------

class FakeDatapath:
    """What the controller uses of os-ken's ``Datapath``; one per connection."""

    ofproto = ofp
    ofproto_parser = parser

    def __init__(self, switch: "FakeSwitch", dpid: int):
        self.switch, self.id, self.xid = switch, dpid, 0
        self.is_active = True

    def set_xid(self, msg) -> int:
        self.xid = (self.xid + 1) & ofp.MAX_XID
        msg.set_xid(self.xid)
        return self.xid

    def send_msg(self, msg, close_socket: bool = False) -> bool:
        """Serialise as os-ken does, then hand the bytes to the switch (False once the
        connection is gone)."""
        if msg.xid is None:
            self.set_xid(msg)
        msg.serialize()
        return self.send(bytes(msg.buf))

    def send(self, data: bytes, close_socket: bool = False) -> bool:
        """Bytes as written to the socket: any number of whole messages, each handed to
        the switch on its own (False once the connection is gone)."""
        if not self.is_active:
            return False
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("!H", data, offset + 2)
            assert length >= ofp.OFP_HEADER_SIZE and offset + length <= len(data), "a message cut in two"
            self.switch.receive(self, data[offset:offset + length])
            offset += length
        return True


@dataclass
class _Bundle:
    flags: int
    messages: list = field(default_factory=list)
    closed: bool = False


@dataclass
class _Refusal:
    predicate: Callable
    error: OpenFlowError
    times: int | None


class FakeSwitch:
    """``FakeSwitch(dpid, ports=(1, 2, 3, 4), sink=None)``; the controller talks to
    ``switch.datapath``, answers go to ``switch.sink(msg)`` from one green thread, in order.
    Use as a context manager (or call :meth:`close`) so its green threads end."""

    def __init__(self, dpid: int, ports=(1, 2, 3, 4), sink: Callable | None = None,
                 reply_limit: int = REPLY_LIMIT):
        self.dpid, self.sink, self.reply_limit = dpid, sink, reply_limit
        self.ports = {number: self._port(number) for number in ports}
        self.tables = Tables()
        self.received: list = []
        self.sink_errors: list[Exception] = []  # what the sink raised (delivery goes on)
        self.hosts: dict[str, tuple[str, int]] = {}
        self.datapath = FakeDatapath(self, dpid)
        self._bundles: dict[int, _Bundle] = {}
        self._refusals: list[_Refusal] = []
        self._failing_commit: OpenFlowError | None = None
        self._running = hub.Event()
        self._running.set()
        self._inbox, self._outbox = hub.Queue(), hub.Queue()
        self._busy = 0
        self._threads = [hub.spawn(self._process_loop), hub.spawn(self._deliver_loop)]

    # --- life cycle and fault injection ------------------------------------------------

    def __enter__(self) -> "FakeSwitch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for thread in self._threads:
            hub.kill(thread)
        self._threads = []

    @property
    def connected(self) -> bool:
        return self.datapath.is_active

    def hold(self) -> None:
        """A slow or hung switch: nothing more is processed or answered until release()."""
        self._running.clear()

    def release(self) -> None:
        self._running.set()

    def disconnect(self) -> None:
        """The connection drops: later sends return False, nothing more reaches the sink,
        unprocessed messages and open bundles are lost; the flows stay (fail-mode secure)."""
        self.datapath.is_active = False
        self._bundles.clear()

    def reconnect(self) -> FakeDatapath:
        """A new connection (a new datapath object, as os-ken makes); the tables are kept and
        the sink gets the features reply os-ken's handshake would give the app."""
        self.disconnect()
        self.datapath = FakeDatapath(self, self.dpid)
        features = struct.pack(ofp.OFP_SWITCH_FEATURES_PACK_STR, self.dpid, 0, TABLES, 0, 0, 0)
        self._answer(self.datapath, _message(ofp.OFPT_FEATURES_REPLY, 0, features))
        return self.datapath

    def fail_next_commit(self, type_: int = ofp.OFPET_EXPERIMENTER, code: int = OFPBFC_TIMEOUT) -> None:
        """The next bundle commit fails as a whole with this error and changes nothing
        (``OFPET_EXPERIMENTER``: an ONF bundle error whose exp_type is ``code``)."""
        self._failing_commit = OpenFlowError(type_, code)

    def refuse(self, predicate: Callable, type_: int = ofp.OFPET_FLOW_MOD_FAILED,
               code: int = ofp.OFPFMFC_UNKNOWN, times: int | None = 1) -> None:
        """Messages for which ``predicate(msg)`` holds (also inside a bundle, at commit) fail
        with this error, ``times`` times (None: always)."""
        self._refusals.append(_Refusal(predicate, OpenFlowError(type_, code), times))

    def clear_flows(self) -> None:
        """Another application wiped the tables: nothing is said to the controller."""
        self.tables.flows.clear()

    def remove_port(self, port: int) -> None:
        description = self.ports.pop(port)
        self._port_status(ofp.OFPPR_DELETE, description)

    def add_port(self, port: int) -> None:
        self.ports[port] = self._port(port)
        self._port_status(ofp.OFPPR_ADD, self.ports[port])

    def add_host(self, ip: str, mac: str, port: int) -> None:
        """A host on ``port`` that answers ARP requests for ``ip`` sent by packet-out; its
        reply goes through the tables and reaches the controller only if a flow sends it."""
        self.hosts[ip] = (mac, port)

    # --- inspection ---------------------------------------------------------------------

    def flows(self, table: int | None = None) -> list[Entry]:
        return sorted((e for e in self.tables.flows.values() if table is None or e.table == table), key=_dump_order)

    def flow_count(self) -> int:
        return len(self.tables.flows)

    @property
    def groups(self) -> dict[int, GroupEntry]:
        return dict(self.tables.groups)

    def idle(self) -> bool:
        return self._busy == 0

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until everything sent so far is processed and every answer delivered."""
        wait_until(self.idle, timeout, "fake switch still busy")

    def trace(self, in_port: int, *, ct_state=0x21, bucket: int | None = None, count: bool = False,
              length: int = 64, **fields) -> Trace:
        """Follow a packet with these fields (user values as OFPMatch takes them) arriving on
        ``in_port``; ``count`` adds 1 packet and ``length`` bytes to every flow it hits."""
        return _Tracer(self, {"in_port": in_port, **fields}, ct_state, bucket, count, length).run()

    # --- receiving --------------------------------------------------------------------

    def receive(self, datapath: FakeDatapath, data: bytes) -> bool:
        msg = decode(datapath, data)
        self.received.append(msg)
        self._busy += 1
        self._inbox.put((datapath, msg))
        return True

    def _live(self, datapath: FakeDatapath) -> bool:
        return datapath is self.datapath and datapath.is_active

    def _process_loop(self) -> None:
        while True:
            datapath, msg = self._inbox.get()
            self._running.wait()
            try:
                if self._live(datapath):
                    self._process(datapath, msg)
            finally:
                self._busy -= 1

    def _deliver_loop(self) -> None:
        while True:
            datapath, data = self._outbox.get()
            self._running.wait()
            try:
                if self._live(datapath) and self.sink is not None:
                    self.sink(ofproto_parser.msg(datapath, *ofproto_parser.header(data), data))
            except Exception as error:  # noqa: BLE001 - as os-ken: a failing handler stops nothing
                self.sink_errors.append(error)
            finally:
                self._busy -= 1

    def _answer(self, datapath: FakeDatapath, data: bytes) -> None:
        self._busy += 1
        self._outbox.put((datapath, data))

    def _error(self, datapath: FakeDatapath, error: OpenFlowError, xid: int, offending: bytes) -> None:
        self._answer(datapath, _message(ofp.OFPT_ERROR, xid, _error_body(error, offending)))

    def _process(self, datapath: FakeDatapath, msg) -> None:
        try:
            self._handle(datapath, msg)
        except OpenFlowError as error:
            self._error(datapath, error, msg.xid, msg.buf)

    def _refused(self, msg) -> None:
        for refusal in self._refusals:
            if refusal.predicate(msg):
                if refusal.times is not None:
                    refusal.times -= 1
                    if refusal.times == 0:
                        self._refusals.remove(refusal)
                raise refusal.error

    def _handle(self, datapath: FakeDatapath, msg) -> None:
        self._refused(msg)
        if isinstance(msg, parser.OFPFlowMod):
            self.tables.flow_mod(msg)
        elif isinstance(msg, parser.OFPGroupMod):
            self.tables.group_mod(msg)
        elif isinstance(msg, MeterMod):
            self.tables.meter_mod(msg)
        elif isinstance(msg, parser.OFPBarrierRequest):
            self._answer(datapath, _message(ofp.OFPT_BARRIER_REPLY, msg.xid, b""))
        elif isinstance(msg, parser.OFPEchoRequest):
            self._answer(datapath, _message(ofp.OFPT_ECHO_REPLY, msg.xid, bytes(msg.data or b"")))
        elif isinstance(msg, parser.OFPFlowStatsRequest):
            self._flow_stats(datapath, msg)
        elif isinstance(msg, parser.OFPAggregateStatsRequest):
            self._aggregate(datapath, msg)
        elif isinstance(msg, parser.OFPGroupDescStatsRequest):
            self._group_desc(datapath, msg)
        elif isinstance(msg, parser.OFPPortDescStatsRequest):
            self._port_desc(datapath, msg)
        elif isinstance(msg, parser.OFPPacketOut):
            self._packet_out(datapath, msg)
        elif isinstance(msg, parser.ONFBundleCtrlMsg):
            self._bundle_control(datapath, msg)
        elif isinstance(msg, parser.ONFBundleAddMsg):
            self._bundle_add(msg)
        elif isinstance(msg, Raw) and msg.msg_type == ofp.OFPT_MULTIPART_REQUEST:
            raise OpenFlowError(ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_BAD_MULTIPART)
        elif isinstance(msg, parser.OFPExperimenter):
            raise OpenFlowError(ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_BAD_EXPERIMENTER)
        else:
            raise OpenFlowError(ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_BAD_TYPE)

    # --- multipart ----------------------------------------------------------------------

    def _flow_stats(self, datapath: FakeDatapath, request) -> None:
        chosen = self.tables.select(request.table_id, canonical(request.match), request.cookie,
                                    request.cookie_mask, None, request.out_port, request.out_group)
        now = time.monotonic()
        entries = [self._flow_stats_entry(e, now) for e in sorted(chosen, key=_dump_order)]
        for data in _multipart_replies(ofp.OFPMP_FLOW, request.xid, entries, self.reply_limit):
            self._answer(datapath, data)

    def _aggregate(self, datapath: FakeDatapath, request) -> None:
        chosen = list(self.tables.select(request.table_id, canonical(request.match), request.cookie,
                                         request.cookie_mask, None, request.out_port, request.out_group))
        body = struct.pack(ofp.OFP_AGGREGATE_STATS_REPLY_PACK_STR, sum(e.packet_count for e in chosen),
                           sum(e.byte_count for e in chosen), len(chosen))
        for data in _multipart_replies(ofp.OFPMP_AGGREGATE, request.xid, [body], self.reply_limit):
            self._answer(datapath, data)

    @staticmethod
    def _flow_stats_entry(entry: Entry, now: float) -> bytes:
        tail = serialized(entry.ofp_match()) + b"".join(serialized(i) for i in entry.instructions)
        age = now - entry.created
        head = struct.pack(ofp.OFP_FLOW_STATS_0_PACK_STR, ofp.OFP_FLOW_STATS_SIZE - ofp.OFP_MATCH_SIZE + len(tail),
                           entry.table, int(age), int(age % 1 * 1e9), entry.priority, 0, 0, entry.flags,
                           entry.cookie, entry.packet_count, entry.byte_count)
        return head + tail

    def _group_desc(self, datapath: FakeDatapath, request) -> None:
        entries = []
        for group in sorted(self.tables.groups.values(), key=lambda g: g.group_id):
            buckets = b"".join(serialized(b) for b in group.buckets)
            entries.append(struct.pack(ofp.OFP_GROUP_DESC_STATS_PACK_STR, ofp.OFP_GROUP_DESC_STATS_SIZE + len(buckets),
                                       group.type, group.group_id) + buckets)
        for data in _multipart_replies(ofp.OFPMP_GROUP_DESC, request.xid, entries, self.reply_limit):
            self._answer(datapath, data)

    def _port_desc(self, datapath: FakeDatapath, request) -> None:
        entries = [_port_bytes(self.ports[n]) for n in sorted(self.ports)]
        for data in _multipart_replies(ofp.OFPMP_PORT_DESC, request.xid, entries, self.reply_limit):
            self._answer(datapath, data)

    # --- ports and packets ----------------------------------------------------------------

    def _port(self, number: int) -> parser.OFPPort:
        mac = "02:fa:4e:%02x:%02x:%02x" % ((number >> 16) & 0xFF, (number >> 8) & 0xFF, number & 0xFF)
        return parser.OFPPort(number, mac, f"p{number}".encode(), 0, 0, 0, 0, 0, 0, 10_000_000, 10_000_000)

    def _port_status(self, reason: int, port: parser.OFPPort) -> None:
        body = struct.pack("!B7x", reason) + _port_bytes(port)
        self._answer(self.datapath, _message(ofp.OFPT_PORT_STATUS, 0, body))

    def _packet_out(self, datapath: FakeDatapath, msg) -> None:
        self.tables.check_groups(msg.actions)
        request = packet.Packet(msg.data).get_protocol(arp.arp) if msg.data else None
        if request is None or request.opcode != arp.ARP_REQUEST or request.dst_ip not in self.hosts:
            return
        mac, port = self.hosts[request.dst_ip]
        frame = packet.Packet()
        frame.add_protocol(ethernet.ethernet(dst=request.src_mac, src=mac, ethertype=0x0806))
        frame.add_protocol(arp.arp(opcode=arp.ARP_REPLY, src_mac=mac, src_ip=request.dst_ip,
                                   dst_mac=request.src_mac, dst_ip=request.src_ip))
        frame.serialize()
        trace = self.trace(port, eth_type=0x0806, eth_src=mac, eth_dst=request.src_mac, arp_op=arp.ARP_REPLY,
                           arp_spa=request.dst_ip, arp_tpa=request.src_ip, arp_sha=mac, arp_tha=request.src_mac)
        if trace.controller:
            self._packet_in(datapath, port, trace.controller, bytes(frame.data))

    def _packet_in(self, datapath: FakeDatapath, in_port: int, flow: tuple, data: bytes) -> None:
        table, priority, cookie = flow
        reason = ofp.OFPR_NO_MATCH if priority == 0 else ofp.OFPR_ACTION
        head = struct.pack(ofp.OFP_PACKET_IN_PACK_STR, ofp.OFP_NO_BUFFER, len(data), reason, table, cookie)
        self._answer(datapath, _message(ofp.OFPT_PACKET_IN, 0,
                                        head + serialized(parser.OFPMatch(in_port=in_port)) + bytes(2) + data))

    # --- bundles ------------------------------------------------------------------------

    def _bundle_control(self, datapath: FakeDatapath, msg) -> None:
        """As OVS's handle_bundle_control: a reply (flags 0) unless an error."""
        handlers = {ofp.ONF_BCT_OPEN_REQUEST: (self._bundle_open, ofp.ONF_BCT_OPEN_REPLY),
                    ofp.ONF_BCT_CLOSE_REQUEST: (self._bundle_close, ofp.ONF_BCT_CLOSE_REPLY),
                    ofp.ONF_BCT_COMMIT_REQUEST: (self._bundle_commit, ofp.ONF_BCT_COMMIT_REPLY),
                    ofp.ONF_BCT_DISCARD_REQUEST: (self._bundle_discard, ofp.ONF_BCT_DISCARD_REPLY)}
        if msg.type not in handlers:
            raise _bundle_error(OFPBFC_BAD_TYPE)
        handle, reply = handlers[msg.type]
        handle(datapath, msg)
        self._answer(datapath, _message(ofp.OFPT_EXPERIMENTER, msg.xid, _bundle_ctrl_body(msg.bundle_id, reply)))

    def _bundle_open(self, datapath: FakeDatapath, msg) -> None:
        if self._bundles.pop(msg.bundle_id, None) is not None:
            raise _bundle_error(OFPBFC_BAD_ID)
        self._bundles[msg.bundle_id] = _Bundle(msg.flags)

    def _bundle_close(self, datapath: FakeDatapath, msg) -> None:
        bundle = self._open_bundle(msg.bundle_id, msg.flags)
        bundle.closed = True

    def _bundle_discard(self, datapath: FakeDatapath, msg) -> None:
        if self._bundles.pop(msg.bundle_id, None) is None:
            raise _bundle_error(OFPBFC_BAD_ID)

    def _open_bundle(self, bundle_id: int, flags: int) -> _Bundle:
        """The bundle, which must be open with these flags; any misuse discards it (OVS)."""
        bundle = self._bundles.get(bundle_id)
        if bundle is None:
            raise _bundle_error(OFPBFC_BAD_ID)
        if bundle.closed or bundle.flags != flags:
            del self._bundles[bundle_id]
            raise _bundle_error(OFPBFC_BUNDLE_CLOSED if bundle.closed else OFPBFC_BAD_FLAGS)
        return bundle

    def _bundle_add(self, msg) -> None:
        if msg.bundle_id not in self._bundles:
            self._bundles[msg.bundle_id] = _Bundle(msg.flags)  # OVS opens it implicitly
        bundle = self._open_bundle(msg.bundle_id, msg.flags)
        inner = msg.message
        if not isinstance(inner, (parser.OFPFlowMod, parser.OFPGroupMod, parser.OFPPacketOut)):
            raise _bundle_error(OFPBFC_MSG_UNSUP)
        if inner.xid != msg.xid:
            raise _bundle_error(OFPBFC_MSG_BAD_XID)
        bundle.messages.append(inner)

    def _bundle_commit(self, datapath: FakeDatapath, msg) -> None:
        """All of the bundle on a copy of the tables, kept only if every message succeeds;
        the bundle is gone afterwards whatever the outcome (OVS's do_bundle_commit)."""
        bundle = self._bundles.get(msg.bundle_id)
        if bundle is None:
            raise _bundle_error(OFPBFC_BAD_ID)
        del self._bundles[msg.bundle_id]
        if bundle.flags != msg.flags:
            raise _bundle_error(OFPBFC_BAD_FLAGS)
        if self._failing_commit is not None:
            error, self._failing_commit = self._failing_commit, None
            raise error
        live, self.tables = self.tables, self.tables.copy()
        try:
            for inner in bundle.messages:
                self._apply_bundled(datapath, inner)
        except OpenFlowError:
            self.tables = live
            raise _bundle_error(OFPBFC_MSG_FAILED) from None

    def _apply_bundled(self, datapath: FakeDatapath, inner) -> None:
        try:
            self._handle(datapath, inner)
        except OpenFlowError as error:
            self._error(datapath, error, inner.xid, inner.buf)
            raise


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> None:
    """Yield to the hub until ``predicate()`` holds; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:g} s")
        hub.sleep(0.001)
