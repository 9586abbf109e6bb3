"""Between compiled flows (plain data) and OpenFlow 1.3 messages (os-ken objects).

Encoding builds FlowMod/GroupMod messages from ``Flow``/``Group``.  Decoding turns the
switch's flow statistics back into ``Flow`` so the reconciler compares like with like:
matches are normalised (a mask of all ones is an exact match), and actions are compared
as their wire encoding, which is what the switch holds whatever object built it.
"""

from __future__ import annotations

import ipaddress

from .compat import nicira_ext

from .pipeline import Action, Flow, Group

NX_NAT_F_DESTINATION = 1 << 1
NX_CT_RECIRC_NONE = 0xFF
NX_IN_PORT = 0xFFF8  # Nicira actions carry 16-bit port numbers
ALL_ONES = {"eth": "ff:ff:ff:ff:ff:ff"}


def _nat_range(parser, destination: str | None):
    if destination is None:
        return parser.NXActionNAT(flags=0)
    if ipaddress.ip_address(destination).version == 4:
        return parser.NXActionNAT(flags=NX_NAT_F_DESTINATION, range_ipv4_min=destination,
                                  range_ipv4_max=destination)
    return parser.NXActionNAT(flags=NX_NAT_F_DESTINATION, range_ipv6_min=destination,
                              range_ipv6_max=destination)


def encode_action(datapath, action: Action):
    parser, ofp = datapath.ofproto_parser, datapath.ofproto
    kind = action[0]
    if kind == "normal":
        return parser.OFPActionOutput(ofp.OFPP_NORMAL)
    if kind == "output":
        return parser.OFPActionOutput(action[1])
    if kind == "controller":
        return parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)
    if kind == "set_field":
        return parser.OFPActionSetField(**{action[1]: action[2]})
    if kind == "group":
        return parser.OFPActionGroup(action[1])
    if kind == "resubmit":
        return parser.NXActionResubmitTable(in_port=NX_IN_PORT, table_id=action[1])
    if kind == "ct_nat":  # (zone, table): track, undo/redo NAT of known connections, continue there
        _, zone, table = action
        return parser.NXActionCT(flags=0, zone_src="", zone_ofs_nbits=zone, recirc_table=table, alg=0,
                                 actions=[_nat_range(parser, None)])
    if kind == "ct_commit_nat":
        # (zone, backend): commit a new connection with destination NAT, remembering the
        # client's port in ct_mark so replies can go straight back to it.
        _, zone, backend = action
        remember_port = parser.NXActionRegMove(src_field="in_port", dst_field="ct_mark", n_bits=16)
        return parser.NXActionCT(flags=nicira_ext.NX_CT_F_COMMIT, zone_src="", zone_ofs_nbits=zone,
                                 recirc_table=NX_CT_RECIRC_NONE, alg=0,
                                 actions=[_nat_range(parser, backend), remember_port])
    if kind == "ct_commit":  # (zone, table): commit (conntrack's original tuple needs it), continue there
        _, zone, table = action
        return parser.NXActionCT(flags=nicira_ext.NX_CT_F_COMMIT, zone_src="", zone_ofs_nbits=zone,
                                 recirc_table=table, alg=0, actions=[])
    if kind == "conjunction":  # (id, k, n): clause k of n (1-based, as ovs-ofctl writes it; 0-based on the wire)
        _, conj_id, clause, clauses = action
        return parser.NXActionConjunction(clause=clause - 1, n_clauses=clauses, id_=conj_id)
    if kind == "output_ct_mark":  # to the port the connection's first packet came from
        return parser.NXActionOutputReg(ofs_nbits=nicira_ext.ofs_nbits(0, 15), src="ct_mark", max_len=0)
    raise ValueError(f"unknown action {action!r}")


def instructions(datapath, actions: tuple[Action, ...]) -> list:
    """No actions means drop: an empty instruction list.  ``("meter", id)`` and
    ``("goto", table)`` are instructions of their own (OpenFlow 1.3 orders them: meter,
    apply-actions, goto); the rest are applied actions."""
    parser, ofp = datapath.ofproto_parser, datapath.ofproto
    meters = [parser.OFPInstructionMeter(a[1], ofp.OFPIT_METER) for a in actions if a[0] == "meter"]
    applied = [encode_action(datapath, a) for a in actions if a[0] not in ("meter", "goto")]
    gotos = [parser.OFPInstructionGotoTable(a[1]) for a in actions if a[0] == "goto"]
    return [*meters, *([parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, applied)] if applied else []), *gotos]


# Nicira fields that OVS checks against the fields *before* them (ip_frag needs eth_type;
# the conntrack tuple needs ct_state and ct_nw_proto).  os-ken orders a match by OXM class,
# Nicira's (1) before OpenFlow's (0x8000), so these are moved after the rest.
AFTER_PREREQUISITES = {"ip_frag": 1, "ct_nw_src": 1, "ct_nw_dst": 1, "ct_ipv6_src": 1, "ct_ipv6_dst": 1,
                        "ct_nw_proto": 1, "ct_tp_src": 2, "ct_tp_dst": 2}


def ofp_match(parser, match):
    """An OFPMatch whose fields come after their prerequisites, as OVS requires."""
    built = parser.OFPMatch(**dict(match))
    if not any(name in AFTER_PREREQUISITES for name, _ in built._fields2):
        return built
    ordered = sorted(built._fields2, key=lambda item: AFTER_PREREQUISITES.get(item[0], 0))  # stable
    return parser.OFPMatch(_ordered_fields=ordered)


def flow_mod(datapath, flow: Flow, command: str):
    """``command``: add, modify (strict, keeps counters) or delete (strict)."""
    parser, ofp = datapath.ofproto_parser, datapath.ofproto
    codes = {"add": ofp.OFPFC_ADD, "modify": ofp.OFPFC_MODIFY_STRICT, "delete": ofp.OFPFC_DELETE_STRICT}
    return parser.OFPFlowMod(
        datapath, cookie=flow.cookie, cookie_mask=0 if command == "add" else 0xFFFFFFFFFFFFFFFF,
        table_id=flow.table, command=codes[command], priority=flow.priority,
        out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY, flags=0,
        match=ofp_match(parser, flow.match),
        instructions=[] if command == "delete" else instructions(datapath, flow.actions))


def group_mod(datapath, group: Group | int, command: str):
    parser, ofp = datapath.ofproto_parser, datapath.ofproto
    codes = {"add": ofp.OFPGC_ADD, "modify": ofp.OFPGC_MODIFY, "delete": ofp.OFPGC_DELETE}
    if command == "delete":
        return parser.OFPGroupMod(datapath, ofp.OFPGC_DELETE, ofp.OFPGT_SELECT, group, [])
    buckets = [parser.OFPBucket(weight=1, watch_port=ofp.OFPP_ANY, watch_group=ofp.OFPG_ANY,
                                actions=[encode_action(datapath, a) for a in bucket])
               for bucket in group.buckets]
    return parser.OFPGroupMod(datapath, codes[command], ofp.OFPGT_SELECT, group.group_id, buckets)


# --- decoding what the switch reports ---------------------------------------------------

def _normal_value(value):
    """(value, mask) with an all-ones mask is the exact value; addresses in canonical text."""
    if isinstance(value, tuple):
        item, mask = value
        if isinstance(mask, str):
            try:
                net = ipaddress.ip_network(f"{item}/{mask}")
                if net.prefixlen == net.max_prefixlen:
                    return str(net.network_address)
                return (str(net.network_address), str(net.netmask))
            except ValueError:
                return item.lower() if mask.lower() == ALL_ONES["eth"] else (item.lower(), mask.lower())
        return value
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value.lower()
    return value


def normal_match(items) -> tuple:
    return tuple(sorted((name, _normal_value(value)) for name, value in items))


def encoded_actions(datapath, instruction_list) -> bytes:
    """The wire bytes of a flow's instructions: equal bytes, equal behaviour."""
    out = bytearray()
    for instruction in instruction_list:
        buf = bytearray()
        instruction.serialize(buf, 0)
        out += buf
    return bytes(out)
