"""Flow mods as bytes, for the reconciler's bulk path.

Building an os-ken ``OFPFlowMod`` per flow costs most of a bulk install: every message
parses its MAC and addresses from text again (netaddr), builds match and instruction
objects, and serialises them.  A flow mod is a fixed header, a match of OXM TLVs and the
instructions' bytes; the same (field, value) TLVs recur in thousands of flows (one MAC per
middlebox, a few ether types), and the reconciler already keeps each action list's wire
bytes.  So each TLV is encoded once, by os-ken itself (so the bytes are its own), and a
flow mod is packed from cached pieces.  tests/test_wire.py checks byte equality with
``ofmessages.flow_mod`` for every shape the compilers emit.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from .compat import ofproto_v1_3 as ofp
from .ofmessages import AFTER_PREREQUISITES
from .pipeline import Flow

_HEADER_AND_FIELDS = struct.Struct("!BBHI QQ BBHHHIII H2x")  # ofp_header + ofp_flow_mod up to the match
_COMMANDS = {"add": ofp.OFPFC_ADD, "modify": ofp.OFPFC_MODIFY_STRICT, "delete": ofp.OFPFC_DELETE_STRICT}
ALL_ONES = 0xFFFFFFFFFFFFFFFF


@lru_cache(maxsize=1 << 18)
def _field(parser, name: str, value) -> tuple[int, bytes]:
    """One match field: (os-ken's order key, its OXM TLV as os-ken writes it)."""
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
    prerequisites after them (``ofmessages.ofp_match``)."""
    fields = sorted((_field(parser, name, value) for name, value in match), key=lambda item: item[0])
    body = b"".join(tlv for _, tlv in fields)
    length = 4 + len(body)
    return struct.pack("!HH", ofp.OFPMT_OXM, length) + body + bytes(-length % 8)


class WireMessage:
    """Pre-packed message bytes that os-ken sends and embeds in a bundle like its own: it
    takes an xid and serialises into ``buf``."""

    def __init__(self, datapath, data: bytes):
        self.datapath = datapath
        self.data = data
        self.xid = None
        self.buf = None
        self.version, self.msg_type, self.msg_len = data[0], data[1], len(data)

    def set_xid(self, xid: int) -> None:
        self.xid = xid

    def serialize(self) -> None:
        self.buf = bytearray(self.data)
        struct.pack_into("!I", self.buf, 4, self.xid or 0)


def flow_mod(datapath, flow: Flow, command: str, instructions: bytes) -> WireMessage:
    """``ofmessages.flow_mod`` as bytes; ``instructions`` are the flow's encoded
    instructions (the reconciler's cache), none for a delete."""
    parser = datapath.ofproto_parser
    body = match_bytes(parser, flow.match) + (b"" if command == "delete" else instructions)
    length = _HEADER_AND_FIELDS.size + len(body)
    head = _HEADER_AND_FIELDS.pack(ofp.OFP_VERSION, ofp.OFPT_FLOW_MOD, length, 0, flow.cookie,
                                   0 if command == "add" else ALL_ONES, flow.table, _COMMANDS[command], 0, 0,
                                   flow.priority, ofp.OFP_NO_BUFFER, ofp.OFPP_ANY, ofp.OFPG_ANY, 0)
    return WireMessage(datapath, head + body)
