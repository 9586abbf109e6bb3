"""A flow the switch reports, written in ``ovs-ofctl``'s own syntax, so that an operator
can compare it with ``ovs-ofctl dump-flows`` or paste it into ``ovs-ofctl add-flow``.

Field and action names are OVS's (``dl_dst``, ``nw_src``, ``ct(commit,...)``); values are
exact, masks as ``value/mask``.  The order of the match fields is not OVS's, and OVS
prints shorthands (``ip``, ``udp6``) where this writes ``dl_type`` and ``nw_proto``:
``ovs-ofctl`` reads both to the same flow (tests/test_ovstext_ovs.py checks every flow of
a switch that way).  It reads the normalised match of ``ofmessages.normal_match`` and
os-ken's action objects; an action mbvisor never writes is shown by its class name.
"""

from __future__ import annotations

from .ofmessages import normal_match

# os-ken's match names -> OVS's (the rest are the same in both).
_FIELDS = {"eth_dst": "dl_dst", "eth_src": "dl_src", "eth_type": "dl_type", "ip_proto": "nw_proto",
           "ipv4_src": "nw_src", "ipv4_dst": "nw_dst", "ipv6_nd_target": "nd_target", "ipv6_nd_sll": "nd_sll",
           "ipv6_nd_tll": "nd_tll", "icmpv4_type": "icmp_type", "icmpv4_code": "icmp_code", "ip_frag": "nw_frag"}
# nw_frag is written with OVS's keywords: (value, mask) of its two bits (any fragment, a later one).
_FRAGMENTS = {(0, 1): "no", (1, 1): "yes", (1, 3): "first", (3, 3): "later", (0, 2): "not_later", (0, 3): "no"}
# Output ports OVS names.
_PORTS = {0xFFFFFFF8: "IN_PORT", 0xFFFFFFF9: "TABLE", 0xFFFFFFFA: "NORMAL", 0xFFFFFFFB: "FLOOD",
          0xFFFFFFFC: "ALL", 0xFFFFFFFE: "LOCAL"}
_CONTROLLER = 0xFFFFFFFD
_WRITE_ACTIONS, _APPLY_ACTIONS, _CLEAR_ACTIONS = 3, 4, 5  # OpenFlow 1.3 instruction types
_NX_IN_PORT = 0xFFF8
_NX_CT_RECIRC_NONE = 0xFF
_NX_NAT_F_SOURCE, _NX_NAT_F_DESTINATION = 1, 2
_MOVE_FIELDS = {"in_port": "in_port_oxm"}  # os-ken's in_port is OXM's 32-bit one


def flow_text(stat) -> str:
    """One flow statistics entry as ``cookie=..., table=..., priority=...,MATCH actions=...``."""
    match = ",".join(_field(name, value) for name, value in normal_match(stat.match.items()))
    head = f"cookie={stat.cookie:#x}, table={stat.table_id}, priority={stat.priority}"
    return f"{head}{',' + match if match else ''} actions={actions_text(stat.instructions)}"


def _field(name: str, value) -> str:
    if name == "ip_frag":
        pair = value if isinstance(value, tuple) else (value, 3)
        return f"nw_frag={_FRAGMENTS.get(tuple(pair), f'{pair[0]:#x}/{pair[1]:#x}')}"
    return f"{_FIELDS.get(name, name)}={_value(name, value)}"


def _value(name: str, value) -> str:
    if isinstance(value, tuple):
        return f"{_value(name, value[0])}/{_value(name, value[1])}"
    if isinstance(value, int) and name == "eth_type":
        return f"{value:#06x}"
    return str(value)


def actions_text(instructions) -> str:
    """OVS's ``actions=`` text of os-ken instructions: ``drop`` for none; meter first and
    goto last, as OpenFlow 1.3 orders them."""
    parts = []
    for instruction in instructions:
        kind = type(instruction).__name__
        if kind == "OFPInstructionMeter":
            parts.append(f"meter:{instruction.meter_id}")
        elif kind == "OFPInstructionActions" and instruction.type == _APPLY_ACTIONS:
            parts.extend(_action(action) for action in instruction.actions)
        elif kind == "OFPInstructionActions" and instruction.type == _WRITE_ACTIONS:
            parts.append(f"write_actions({','.join(_action(action) for action in instruction.actions)})")
        elif kind == "OFPInstructionActions" and instruction.type == _CLEAR_ACTIONS:
            parts.append("clear_actions")
        elif kind == "OFPInstructionGotoTable":
            parts.append(f"goto_table:{instruction.table_id}")
        else:
            parts.append(kind)
    return ",".join(parts) or "drop"


def _action(action) -> str:
    kind = type(action).__name__
    if kind == "OFPActionOutput":
        if action.port == _CONTROLLER:
            return f"CONTROLLER:{action.max_len}"
        return _PORTS.get(action.port, f"output:{action.port}")
    if kind == "OFPActionGroup":
        return f"group:{action.group_id}"
    if kind == "OFPActionSetField":
        return f"set_field:{_value(action.key, action.value)}->{_FIELDS.get(action.key, action.key)}"
    if kind == "NXActionResubmitTable":
        port = "" if action.in_port == _NX_IN_PORT else str(action.in_port)
        return f"resubmit({port},{action.table_id})"
    if kind == "NXActionCT":
        return _conntrack(action)
    if kind == "NXActionConjunction":
        return f"conjunction({action.id},{action.clause + 1}/{action.n_clauses})"
    if kind == "NXActionOutputReg":
        return f"output:{_bits(action.src, action.ofs_nbits)}"
    if kind == "NXActionRegMove":
        source = _MOVE_FIELDS.get(action.src_field, action.src_field)
        return (f"move:{source}[{action.src_ofs}..{action.src_ofs + action.n_bits - 1}]->"
                f"{action.dst_field}[{action.dst_ofs}..{action.dst_ofs + action.n_bits - 1}]")
    return kind


def _bits(field: str, ofs_nbits: int) -> str:
    start, count = ofs_nbits >> 6, (ofs_nbits & 0x3F) + 1
    return f"{field}[{start}..{start + count - 1}]"


def _conntrack(action) -> str:
    parts = ["commit"] if action.flags & 1 else []
    if action.recirc_table != _NX_CT_RECIRC_NONE:
        parts.append(f"table={action.recirc_table}")
    parts.append(f"zone={action.zone_ofs_nbits}" if not action.zone_src else
                 f"zone={_bits(action.zone_src, action.zone_ofs_nbits)}")
    parts += [_nat(inner) for inner in action.actions if type(inner).__name__ == "NXActionNAT"]
    executed = [_action(inner) for inner in action.actions if type(inner).__name__ != "NXActionNAT"]
    if executed:
        parts.append(f"exec({','.join(executed)})")
    return f"ct({','.join(parts)})"


def _nat(action) -> str:
    low = action.range_ipv4_min or action.range_ipv6_min
    if not action.flags & (_NX_NAT_F_SOURCE | _NX_NAT_F_DESTINATION) or not low:
        return "nat"
    high = action.range_ipv4_max or action.range_ipv6_max
    side = "dst" if action.flags & _NX_NAT_F_DESTINATION else "src"

    def address(text: str) -> str:
        return f"[{text}]" if ":" in text else text

    span = address(low) if high in (None, "", low) else f"{address(low)}-{address(high)}"
    return f"nat({side}={span})"
