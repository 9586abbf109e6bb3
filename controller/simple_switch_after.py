"""Ryu's ``simple_switch_13`` behind mbvisor, in one ``ryu-manager`` process.

Unchanged, both apps own table 0 (their table-miss flows have the same identity, so
each replaces the other's) and simple_switch never learns. Here simple_switch's flows go
to the table mbvisor hands its traffic to (``mbvisor controller --next-table`` or
``MBVISOR_NEXT_TABLE``, which must be set), and it learns only from packets that missed
there: the controller's own packet-ins (health answers, ARP to the resolver) are not
traffic to forward.  Run it as (docs/controller.md, "Beside other apps"):

    MBVISOR_NEXT_TABLE=10 ryu-manager mbvisor.controller.app mbvisor.controller.simple_switch_after

Ryu only: os-ken ships no simple_switch_13.
"""

from __future__ import annotations

import os

from ryu.app.simple_switch_13 import SimpleSwitch13
from ryu.controller import ofp_event
from ryu.controller.handler import MAIN_DISPATCHER, set_ev_cls

from .placement import placement_from


class SimpleSwitchAfterMbvisor(SimpleSwitch13):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        placement = placement_from(os.environ.get("MBVISOR_TABLE_OFFSET"), os.environ.get("MBVISOR_NEXT_TABLE"))
        if placement.next_table is None:
            raise SystemExit("simple_switch_after: set MBVISOR_NEXT_TABLE (mbvisor hands its traffic to that table)")
        self.table = placement.next_table

    def add_flow(self, datapath, priority, match, actions, buffer_id=None):
        """simple_switch_13's ``add_flow``, in ``self.table``."""
        parser, ofproto = datapath.ofproto_parser, datapath.ofproto
        instructions = [parser.OFPInstructionActions(ofproto.OFPIT_APPLY_ACTIONS, actions)]
        extra = {"buffer_id": buffer_id} if buffer_id else {}
        datapath.send_msg(parser.OFPFlowMod(datapath=datapath, table_id=self.table, priority=priority, match=match,
                                            instructions=instructions, **extra))

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in_handler(self, ev):
        if ev.msg.table_id == self.table:
            super()._packet_in_handler(ev)

