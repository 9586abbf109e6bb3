"""One app for two managers: OS-Ken (``osken-manager``) and Ryu (``ryu-manager``).

The two frameworks are the same code under two package names; whichever manager loaded
us has already imported its own, so prefer that one and fall back to the other.
"""

import sys

if "ryu" in sys.modules and "os_ken" not in sys.modules:
    from ryu.base.app_manager import RyuApp as OSKenApp
    from ryu.cfg import CONF
    from ryu.controller import ofp_event
    from ryu.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
    from ryu.lib import hub
    from ryu.lib.packet import arp, ethernet, packet
    from ryu.ofproto import ether, nicira_ext, ofproto_v1_3
    FRAMEWORK = "ryu"
else:
    from os_ken.base.app_manager import OSKenApp
    from os_ken.cfg import CONF
    from os_ken.controller import ofp_event
    from os_ken.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
    from os_ken.lib import hub
    from os_ken.lib.packet import arp, ethernet, packet
    from os_ken.ofproto import ether, nicira_ext, ofproto_v1_3
    FRAMEWORK = "os_ken"

__all__ = ["CONF", "OSKenApp", "ofp_event", "CONFIG_DISPATCHER", "DEAD_DISPATCHER", "MAIN_DISPATCHER", "set_ev_cls",
           "hub", "arp", "ethernet", "packet", "ether", "nicira_ext", "ofproto_v1_3", "FRAMEWORK"]
