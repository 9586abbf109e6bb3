"""Port security: what an annotated VM port may send, compiled into the ingress table.

A VM port sends only its own MAC, and for IP, ARP and neighbour discovery only its own
addresses (``mbvisor-ips``); no other port may send that MAC or those addresses.  So no
VM can attract another's traffic by MAC learning or poisoned ARP/ND caches, and a reply
flow keyed on a backend's port, MAC and address cannot be entered by anyone else.  Ports
without annotations are not constrained (a lab's, an uplink's, a patch port's), but they
cannot claim an annotated VM's identity either.  Pure: inventory in, flows out.
"""

from __future__ import annotations

import ipaddress

from .pipeline import (CLAIMED, INGRESS_TABLE, OFFLOAD_TABLE, PORT_ALLOWED, PORT_CHECKED, PORT_OTHER, PORT_SPOOFED,
                       PORT_TAGGED, PORT_WRONG_MAC, Flow, match, port_cookie)
from .trust import Inventory, PortIdentity

ETH_IPV4, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
ICMPV6, ROUTER_ADVERT, NEIGHBOUR_SOLICIT, NEIGHBOUR_ADVERT, REDIRECT = 58, 134, 135, 136, 137
DHCP_SERVER, DHCP_CLIENT = 67, 68
VLAN_PRESENT = (0x1000, 0x1000)
UNSPECIFIED_V6 = "::"
NO_LINK_ADDRESS = "00:00:00:00:00:00"  # what OVS reports for a neighbour message without the option
CONTINUE = (("goto", OFFLOAD_TABLE),)
DROP = ()


def link_local(mac: str) -> str:
    """The modified EUI-64 link-local address a host derives from its MAC (RFC 4291)."""
    octets = bytearray(int(part, 16) for part in mac.split(":"))
    octets[0] ^= 0x02
    interface = bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + interface))


def compile_ingress(inventory: Inventory) -> set[Flow]:
    """The ingress table: every annotated port's own rules, then the miss that continues."""
    flows = {Flow(INGRESS_TABLE, 0, (), CONTINUE, port_cookie(0))}
    for identity in inventory.identities:
        flows |= port_flows(identity)
    return flows


def port_flows(identity: PortIdentity) -> set[Flow]:
    port, mac, cookie = identity.port, identity.mac, port_cookie(identity.port)
    v4 = [a for a in identity.ips if ipaddress.ip_address(a).version == 4]
    v6 = [a for a in identity.ips if ipaddress.ip_address(a).version == 6] + [link_local(mac)]

    def flow(priority: int, actions: tuple, **fields) -> Flow:
        return Flow(INGRESS_TABLE, priority, match(**fields), actions, cookie)

    own = {"in_port": port, "eth_src": mac}
    flows = {
        flow(PORT_TAGGED, DROP, in_port=port, vlan_vid=VLAN_PRESENT),
        # DHCP before the port has its address: needed to get one, claims nothing.
        flow(PORT_ALLOWED, CONTINUE, **own, eth_type=ETH_IPV4, ip_proto=17, ipv4_src="0.0.0.0",
             udp_src=DHCP_CLIENT, udp_dst=DHCP_SERVER),
        # A VM is neither a router nor a DHCP server for the others on the bridge.
        flow(PORT_CHECKED, DROP, **own, eth_type=ETH_IPV6, ip_proto=ICMPV6, icmpv6_type=ROUTER_ADVERT),
        flow(PORT_CHECKED, DROP, **own, eth_type=ETH_IPV6, ip_proto=ICMPV6, icmpv6_type=REDIRECT),
        flow(PORT_CHECKED, DROP, **own, eth_type=ETH_IPV4, ip_proto=17, udp_src=DHCP_SERVER),
        # Neighbour discovery is IPv6's ARP: solicitations and adverts are checked for the
        # link address they announce (and adverts for their target) before the allowances
        # of the source address could let them through.
        flow(PORT_CHECKED, DROP, **own, eth_type=ETH_IPV6, ip_proto=ICMPV6, icmpv6_type=NEIGHBOUR_ADVERT),
        flow(PORT_CHECKED, DROP, **own, eth_type=ETH_IPV6, ip_proto=ICMPV6, icmpv6_type=NEIGHBOUR_SOLICIT),
        flow(PORT_SPOOFED, DROP, **own, eth_type=ETH_IPV4),
        flow(PORT_SPOOFED, DROP, **own, eth_type=ETH_IPV6),
        flow(PORT_SPOOFED, DROP, **own, eth_type=ETH_ARP),
        flow(PORT_OTHER, CONTINUE, **own),
        flow(PORT_WRONG_MAC, DROP, in_port=port),
        flow(CLAIMED, DROP, eth_src=mac),
        # Its MAC announced one layer up, by someone else: receivers would send it traffic
        # meant for the announcer.
        flow(CLAIMED, DROP, eth_type=ETH_ARP, arp_sha=mac),
        flow(CLAIMED, DROP, eth_type=ETH_IPV6, ip_proto=ICMPV6, icmpv6_type=NEIGHBOUR_ADVERT, ipv6_nd_tll=mac),
        flow(CLAIMED, DROP, eth_type=ETH_IPV6, ip_proto=ICMPV6, icmpv6_type=NEIGHBOUR_SOLICIT, ipv6_nd_sll=mac),
    }
    for address in v4:
        flows |= {
            # ARP probes (RFC 5227) from the unspecified address, for its own addresses only:
            # a probe for another VM's address would keep that VM from configuring it.
            flow(PORT_ALLOWED, CONTINUE, **own, eth_type=ETH_ARP, arp_sha=mac, arp_spa="0.0.0.0", arp_tpa=address),
            flow(PORT_ALLOWED, CONTINUE, **own, eth_type=ETH_IPV4, ipv4_src=address),
            flow(PORT_ALLOWED, CONTINUE, **own, eth_type=ETH_ARP, arp_sha=mac, arp_spa=address),
            flow(CLAIMED, DROP, eth_type=ETH_IPV4, ipv4_src=address),
            flow(CLAIMED, DROP, eth_type=ETH_ARP, arp_spa=address),
        }
    for address in v6:
        flows |= {
            # Duplicate address detection (RFC 4862), from ::, without a link address, for its own.
            flow(PORT_CHECKED + 1, CONTINUE, **own, eth_type=ETH_IPV6, ip_proto=ICMPV6, ipv6_src=UNSPECIFIED_V6,
                 icmpv6_type=NEIGHBOUR_SOLICIT, ipv6_nd_sll=NO_LINK_ADDRESS, ipv6_nd_target=address),
            flow(PORT_ALLOWED, CONTINUE, **own, eth_type=ETH_IPV6, ipv6_src=address),
            *(flow(PORT_CHECKED + 1, CONTINUE, **own, eth_type=ETH_IPV6, ip_proto=ICMPV6,
                   icmpv6_type=NEIGHBOUR_ADVERT, ipv6_nd_target=address, ipv6_nd_tll=link)
              for link in (mac, NO_LINK_ADDRESS)),
            *(flow(PORT_CHECKED + 1, CONTINUE, **own, eth_type=ETH_IPV6, ip_proto=ICMPV6,
                   icmpv6_type=NEIGHBOUR_SOLICIT, ipv6_src=address, ipv6_nd_sll=link)
              for link in (mac, NO_LINK_ADDRESS)),
            flow(CLAIMED, DROP, eth_type=ETH_IPV6, ipv6_src=address),
            flow(CLAIMED, DROP, eth_type=ETH_IPV6, ip_proto=ICMPV6, icmpv6_type=NEIGHBOUR_ADVERT,
                 ipv6_nd_target=address),
        }
    return flows
