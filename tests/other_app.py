"""Another OS-Ken app for tests/test_placement_ovs.py, run in mbvisor's process with
``mbvisor controller --app other_app``: its table 0 sends every packet to mbvisor's first
table (``MBVISOR_TABLE_OFFSET``), and its flow in ``MBVISOR_NEXT_TABLE`` forwards what
mbvisor lets through with NORMAL.  Its flows carry cookie 7."""

import os

from os_ken.base.app_manager import OSKenApp
from os_ken.controller import ofp_event
from os_ken.controller.handler import CONFIG_DISPATCHER, set_ev_cls
from os_ken.ofproto import ofproto_v1_3

COOKIE = 7


class OtherApp(OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def switch_features(self, ev):
        datapath = ev.msg.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        offset, next_table = int(os.environ["MBVISOR_TABLE_OFFSET"]), int(os.environ["MBVISOR_NEXT_TABLE"])
        for table, instruction in [
                (0, parser.OFPInstructionGotoTable(offset)),
                (next_table, parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS,
                                                          [parser.OFPActionOutput(ofp.OFPP_NORMAL)]))]:
            datapath.send_msg(parser.OFPFlowMod(datapath, cookie=COOKIE, table_id=table, priority=0,
                                                match=parser.OFPMatch(), instructions=[instruction]))
