"""Flow mods and bundle frames as bytes, for the reconciler's bulk path.

Building an os-ken ``OFPFlowMod`` per flow costs most of a bulk install: every message
parses its MAC and addresses from text again (netaddr), builds match and instruction
objects, and serialises them.  A flow mod is a fixed header, a match of OXM TLVs and the
instructions' bytes; the same (field, value) TLVs recur in thousands of flows (one MAC per
middlebox, a few ether types), and the reconciler already keeps each action list's wire
bytes.  So each TLV is encoded once, by os-ken itself (so the bytes are its own), and a
flow mod is packed from cached pieces, framed for its bundle in the same pack
(``BundleFrame``), and a bundle's messages are written to the switch many at a time (``SwitchLink.commit``): one
queue item and one ``sendall`` per 80-byte message cost the controller and the switch
more than the flows themselves.  tests/test_wire.py checks byte equality with os-ken's
``ofmessages.flow_mod`` and ``ONFBundleAddMsg`` for every shape the compilers emit.
"""

from __future__ import annotations

import operator
import socket
import struct
from functools import lru_cache
from typing import NamedTuple

from .compat import ofproto_v1_3 as ofp
from .ofmessages import AFTER_PREREQUISITES

_HEADER_AND_FIELDS = struct.Struct("!BBHI QQ BBHHHIII H2x")  # ofp_header + ofp_flow_mod up to the match
_BUNDLE_ADD = struct.Struct("!BBHI II I2xH")  # ofp_header + ONF experimenter header + bundle id and flags
_BUNDLED_FLOW_MOD = struct.Struct(_BUNDLE_ADD.format + _HEADER_AND_FIELDS.format[1:])
_XID = struct.Struct("!I")
_TLV_HEADER = struct.Struct("!I")
_COMMANDS = {"add": ofp.OFPFC_ADD, "modify": ofp.OFPFC_MODIFY_STRICT, "delete": ofp.OFPFC_DELETE_STRICT}
ALL_ONES = 0xFFFFFFFFFFFFFFFF
ONF_EXPERIMENTER_ID = 0x4F4E4600  # the bundle extension's experimenter (OpenFlow 1.3 Extension Pack 1)


def _mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ipv6_bytes(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


# Fields whose values are mostly distinct in a bulk (a source address per filter): packed
# here, without os-ken, as OpenFlow basic OXM TLVs (class 0x8000, field number, has-mask
# bit, length; the value, then the mask).  Every other field is encoded by os-ken, once
# per distinct value.
_BASIC_FIELDS = {"eth_dst": (3, _mac_bytes), "eth_src": (4, _mac_bytes), "ipv4_src": (11, socket.inet_aton),
                 "ipv4_dst": (12, socket.inet_aton), "ipv6_src": (26, _ipv6_bytes), "ipv6_dst": (27, _ipv6_bytes)}
OFPXMC_OPENFLOW_BASIC = 0x8000


def _field(parser, name: str, value) -> tuple[tuple, bytes]:
    """One match field: (os-ken's order key, its OXM TLV as os-ken writes it)."""
    basic = _BASIC_FIELDS.get(name)
    if basic is None:
        return _encoded_field(parser, name, value)
    number, pack = basic
    masked = isinstance(value, tuple)
    if masked:  # os-ken writes the value with the mask applied
        mask = pack(value[1])
        data = bytes(v & m for v, m in zip(pack(value[0]), mask)) + mask
    else:
        data = pack(value)
    header = OFPXMC_OPENFLOW_BASIC << 16 | number << 9 | masked << 8 | len(data)
    return _order(parser, name, value), _TLV_HEADER.pack(header) + data


_ORDERS: dict = {}


def _order(parser, name: str, value) -> tuple:
    """A basic field's place in os-ken's order, which does not depend on its value."""
    order = _ORDERS.get((parser, name))
    if order is None:
        order = _ORDERS[(parser, name)] = (AFTER_PREREQUISITES.get(name, 0), _order_key(parser, name, value))
    return order


@lru_cache(maxsize=1 << 14)
def _encoded_field(parser, name: str, value) -> tuple[tuple, bytes]:
    match = parser.OFPMatch(**{name: value})
    buf = bytearray()
    length = match.serialize(buf, 0)
    (match_length,) = struct.unpack_from("!H", buf, 2)
    order = (AFTER_PREREQUISITES.get(name, 0), _order_key(parser, name, value))
    return order, bytes(buf[4:match_length][:length])


def _order_key(parser, name: str, value):
    number = parser.ofproto.oxm_from_user(name, value)[0]
    return number[0] if isinstance(number, tuple) else number


def match_bytes(parser, match) -> bytes:
    """An ofp_match (OXM, padded to 8 bytes) with fields in os-ken's order, and those with
    prerequisites after them (``ofmessages.ofp_match``).  A bulk's matches differ in their
    last pair (a filter's source, which the compiler sorts last or nearly), so the TLVs of
    the others are joined once per shape, around the gap where the last one goes: a
    flow's match is then two look-ups and a concatenation, not a sort."""
    if not match:
        return _EMPTY_MATCH
    tlvs = _TLVS.get(parser)
    if tlvs is None:
        tlvs = _TLVS[parser] = {}
        _SHAPES[parser] = {}
    last = match[-1]
    field = tlvs.get(last)
    if field is None:
        field = _cached_field(parser, tlvs, last)
    shapes = _SHAPES[parser]
    shape = (match[:-1], last[0])
    around = shapes.get(shape)
    if around is None:
        if len(shapes) >= MAX_CACHED_SHAPES:
            shapes.clear()
        around = shapes[shape] = _around(parser, tlvs, match[:-1], field[0])
    if around is _NO_GAP:
        return _sorted_match(parser, tlvs, match)
    before, after, others = around
    length = 4 + others + len(field[1])
    return _MATCH_HEADER.pack(ofp.OFPMT_OXM, length) + before + field[1] + after + _PADS[length % 8]


def _sorted_match(parser, tlvs: dict, match) -> bytes:
    """The match's TLVs sorted into os-ken's order one by one (a stable sort: fields of
    the same place, the experimenter ones, keep the match's order, as os-ken keeps them)."""
    fields = sorted((tlvs.get(pair) or _cached_field(parser, tlvs, pair) for pair in match), key=_place)
    body = b"".join([tlv for _, tlv in fields])
    length = 4 + len(body)
    return _MATCH_HEADER.pack(ofp.OFPMT_OXM, length) + body + _PADS[length % 8]


def _cached_field(parser, tlvs: dict, pair: tuple) -> tuple[tuple, bytes]:
    if len(tlvs) >= MAX_CACHED_TLVS:
        tlvs.clear()
    field = tlvs[pair] = _field(parser, *pair)
    return field


def _around(parser, tlvs: dict, others: tuple, order: tuple) -> tuple[bytes, bytes, int] | object:
    """The TLVs of ``others`` in os-ken's order, joined into those before and those after
    a field of ``order``, and their length; _NO_GAP if one of them shares that place (two
    experimenter fields): then the order is the match's, not a gap's."""
    fields = sorted((tlvs.get(pair) or _cached_field(parser, tlvs, pair) for pair in others), key=_place)
    if any(place == order for place, _ in fields):
        return _NO_GAP
    before = b"".join(tlv for place, tlv in fields if place < order)
    after = b"".join(tlv for place, tlv in fields if place > order)
    return before, after, len(before) + len(after)


# Each match field's TLV by its (name, value) pair, per parser: a middlebox's MAC, ether
# types and masks recur in every flow, and a filter's address in its two flows one after
# the other, so a bounded table (cleared when full) encodes most pairs once.  And the
# joined TLVs of every pair but the last, by those pairs and the last one's name.
_TLVS: dict = {}
_SHAPES: dict = {}
MAX_CACHED_TLVS = 4096
MAX_CACHED_SHAPES = 4096
_MATCH_HEADER = struct.Struct("!HH")
_EMPTY_MATCH = _MATCH_HEADER.pack(ofp.OFPMT_OXM, 4) + bytes(4)
_PADS = tuple(bytes(-length % 8) for length in range(8))
_NO_GAP = object()
_place = operator.itemgetter(0)


class BundleFrame(NamedTuple):
    """What frames a message for one bundle: its id and flags, and the xid that every
    message of it carries (the bundle extension wants the inner xid equal to the frame's,
    and the switch quotes it if it refuses one)."""

    bundle_id: int
    flags: int
    xid: int

    def wrap(self, message) -> bytes:
        """Any message (pre-packed bytes or os-ken's) as this bundle's."""
        return bundle_add(self.bundle_id, self.flags, self.xid, with_xid(message, self.xid))

    def flow_mods(self, parser, flows, command: str, instructions_of) -> bytes:
        """``ofmessages.flow_mod`` of each of ``flows`` (``command``: add, modify or
        delete), framed for this bundle, packed in one go: a bulk install frames 200,000
        of them, and packing the frame and the flow mod's header together costs a third
        less than one after the other.  ``instructions_of(actions)``: the encoded
        instructions (the reconciler's cache), asked once per run of flows with the same
        actions (every filter drops), never for a delete."""
        pack, frame_size, head_size = _BUNDLED_FLOW_MOD.pack, _BUNDLE_ADD.size, _HEADER_AND_FIELDS.size
        bundle_id, flags, xid = self
        code, cookie_mask = _COMMANDS[command], 0 if command == "add" else ALL_ONES
        actions = instructions = None
        messages = []
        heads: dict = {}  # the frame and header differ only by length, cookie, table and priority
        for flow in flows:
            body = match_bytes(parser, flow.match)
            if command != "delete":
                if flow.actions is not actions:
                    actions, instructions = flow.actions, instructions_of(flow.actions)
                body += instructions
            key = (len(body), flow.cookie, flow.table, flow.priority)
            head = heads.get(key)
            if head is None:
                inner = head_size + len(body)
                head = heads[key] = pack(ofp.OFP_VERSION, ofp.OFPT_EXPERIMENTER, frame_size + inner, xid,
                                         ONF_EXPERIMENTER_ID, ofp.ONF_ET_BUNDLE_ADD_MESSAGE, bundle_id, flags,
                                         ofp.OFP_VERSION, ofp.OFPT_FLOW_MOD, inner, xid, flow.cookie, cookie_mask,
                                         flow.table, code, 0, 0, flow.priority, ofp.OFP_NO_BUFFER, ofp.OFPP_ANY,
                                         ofp.OFPG_ANY, 0)
            messages.append(head)
            messages.append(body)
        return b"".join(messages)


def with_xid(message, xid: int) -> bytes:
    """A message's bytes carrying ``xid``: pre-packed bytes, or an os-ken message."""
    if isinstance(message, (bytes, bytearray)):
        return message[:4] + _XID.pack(xid) + message[8:]
    message.xid = xid  # os-ken's set_xid refuses a second xid; ONFBundleAddMsg overwrites it the same way
    message.serialize()
    return bytes(message.buf)


def bundle_add(bundle_id: int, flags: int, xid: int, inner: bytes) -> bytes:
    """``ONFBundleAddMsg`` around ``inner`` (whose xid must be ``xid``, as the bundle
    extension requires), without properties, as os-ken frames it."""
    return _BUNDLE_ADD.pack(ofp.OFP_VERSION, ofp.OFPT_EXPERIMENTER, _BUNDLE_ADD.size + len(inner), xid,
                            ONF_EXPERIMENTER_ID, ofp.ONF_ET_BUNDLE_ADD_MESSAGE, bundle_id,
                            flags) + inner
