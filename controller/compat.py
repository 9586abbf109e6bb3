"""One app for two managers: OS-Ken (``osken-manager``) and Ryu (``ryu-manager``).

The two frameworks are the same code under two package names; whichever manager loaded
us has already imported its own, so prefer that one and fall back to the other.
"""

import sys

if "ryu" in sys.modules and "os_ken" not in sys.modules:
    from ryu.base.app_manager import RyuApp as OSKenApp, lookup_service_brick
    from ryu.cfg import CONF
    from ryu.controller import ofp_event
    from ryu.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls, set_ev_handler
    from ryu.lib import hub
    from ryu.lib.packet import arp, ethernet, icmpv6, ipv6, packet
    from ryu.lib.packet import in_proto as ipv6_protocol
    from ryu.ofproto import ether, nicira_ext, ofproto_v1_3
    FRAMEWORK = "ryu"
else:
    from os_ken.base.app_manager import OSKenApp, lookup_service_brick
    from os_ken.cfg import CONF
    from os_ken.controller import ofp_event
    from os_ken.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls, set_ev_handler
    from os_ken.lib import hub
    from os_ken.lib.packet import arp, ethernet, icmpv6, ipv6, packet
    from os_ken.lib.packet import in_proto as ipv6_protocol
    from os_ken.ofproto import ether, nicira_ext, ofproto_v1_3
    FRAMEWORK = "os_ken"

__all__ = ["CONF", "OSKenApp", "ofp_event", "CONFIG_DISPATCHER", "DEAD_DISPATCHER", "MAIN_DISPATCHER", "set_ev_cls",
           "set_ev_handler", "lookup_service_brick",
           "hub", "arp", "ethernet", "icmpv6", "ipv6", "ipv6_protocol", "packet", "ether", "nicira_ext", "ofproto_v1_3", "FRAMEWORK"]

# Conntrack's original-direction tuple (OVS 2.8+, NXM class 1, ovs-fields(7)): the fragment
# table matches the reassembled datagram's protocol and ports (controller/filters.py), and
# neither os-ken nor Ryu knows these fields.  Registered once, in whichever framework loaded
# us, by regenerating the field tables its OFPMatch reads at call time.
if FRAMEWORK == "ryu":
    from ryu.ofproto import oxm_fields as _oxm_fields
    from ryu.lib import type_desc as _type_desc
else:
    from os_ken.ofproto import oxm_fields as _oxm_fields
    from os_ken.lib import type_desc as _type_desc

CONNTRACK_TUPLE_FIELDS = [
    _oxm_fields.NiciraExtended1("ct_nw_proto", 119, _type_desc.Int1),
    _oxm_fields.NiciraExtended1("ct_nw_src", 120, _type_desc.IPv4Addr),
    _oxm_fields.NiciraExtended1("ct_nw_dst", 121, _type_desc.IPv4Addr),
    _oxm_fields.NiciraExtended1("ct_ipv6_src", 122, _type_desc.IPv6Addr),
    _oxm_fields.NiciraExtended1("ct_ipv6_dst", 123, _type_desc.IPv6Addr),
    _oxm_fields.NiciraExtended1("ct_tp_src", 124, _type_desc.Int2),
    _oxm_fields.NiciraExtended1("ct_tp_dst", 125, _type_desc.Int2),
]
_known = {field.name for field in ofproto_v1_3.oxm_types}
if not _known.issuperset(field.name for field in CONNTRACK_TUPLE_FIELDS):
    ofproto_v1_3.oxm_types += [field for field in CONNTRACK_TUPLE_FIELDS if field.name not in _known]
    _oxm_fields.generate(ofproto_v1_3.__name__)
