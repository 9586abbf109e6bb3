"""The filter compiler's flows on a real ovs-vswitchd (netdev datapath), with scapy frames
from namespaces counted where they arrive: the middlebox's own interface.

Each test runs twice.  ``ofctl``: the flows are exactly ``compile_filters``'s, written with
ovs-ofctl (``render``) on a bridge without a controller, behind a table 0 that only
continues to table 1 (the ingress table's miss) and a table-1 miss to NORMAL (the base
flows).  ``controller``: the real controller (product trust mode, the middlebox's port
annotated and published) installs them from the middlebox's commands, with everything
else of its pipeline around them.  "Nothing arrived" is bounded:
after the frames that must be dropped, the same sender sends a marker that must arrive, and
the test waits for the marker."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mbvisor.controller.filters import compile_filters
from mbvisor.controller.pipeline import cookie_of
from mbvisor.controller.model import Middlebox
from mbvisor.guest.grammar import parse_command
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import wait_until

pytestmark = pytest.mark.host

MB_MAC = "52:34:56:00:12:22"
MB_IP = "10.0.0.5"

_SNIFF = r"""
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
print("READY", flush=True)
while True:
    data, address = s.recvfrom(65535)
    if address[2] != socket.PACKET_OUTGOING:
        print(data.hex(), flush=True)
"""


def _value(name: str, value) -> str:
    if isinstance(value, tuple):
        item, mask = value
        return f"{_value(name, item)}/{_value(name, mask)}"
    if name == "ip_frag":
        raise AssertionError("ip_frag is rendered whole")
    return hex(value) if isinstance(value, int) else str(value)


IP_FRAG = {0: "no", (1, 1): "yes", 1: "first", 3: "later"}
NAMES = {"ipv4_src": "ip_src", "ipv4_dst": "ip_dst"}  # ovs-ofctl spells these two otherwise


def render(flow) -> str:
    """A compiled flow in ovs-ofctl's syntax (the same fields; only ip_frag is spelled)."""
    parts = [f"table={flow.table}", f"priority={flow.priority}", f"cookie={flow.cookie:#x}"]
    for name, value in flow.match:
        parts.append(f"ip_frag={IP_FRAG[value]}" if name == "ip_frag" else f"{NAMES.get(name, name)}={_value(name, value)}")
    actions = []
    for action in flow.actions:
        if action[0] == "ct_commit":
            actions.append(f"ct(commit,zone={action[1]},table={action[2]})")
        elif action[0] == "resubmit":
            actions.append(f"resubmit(,{action[1]})")
        elif action[0] == "conjunction":
            actions.append(f"conjunction({action[1]},{action[2]}/{action[3]})")
        else:
            raise AssertionError(f"not rendered: {action}")
    return ",".join(parts) + ",actions=" + (",".join(actions) or "drop")


class Sniffer:
    """Every frame that reaches a host's eth0, in order."""

    def __init__(self, host):
        self.process = host.popen([sys.executable, "-u", "-c", _SNIFF], stdout=subprocess.PIPE, text=True)
        self.frames: list[bytes] = []
        assert self.process.popen.stdout.readline().strip() == "READY"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.popen.stdout:
            self.frames.append(bytes.fromhex(line.strip()))


@pytest.fixture(params=["ofctl", "controller"])
def net(lab, tmp_path, request):
    controller = None
    if request.param == "controller":
        controller = Controller(tmp_path, trust="annotations").start()
        request.addfinalizer(controller.stop)
    bridge = lab.bridge(fail_mode="secure", controller=controller.target if controller else None)
    hosts = {"attacker": lab.host("attacker", ip="10.0.0.66/24"), "client": lab.host("client", ip="10.0.0.1/24"),
             "mb": lab.host("mb", ip=f"{MB_IP}/24", mac=MB_MAC)}
    lab.fill_arp()
    if controller:
        controller.wait_switch(bridge.dpid)
        mb = hosts["mb"]
        status, _ = controller.request("PUT", f"/v1/switches/{bridge.dpid:016x}/ports", {"ports": [
            {"port": mb.ofport, "mac": MB_MAC, "tenant": "red", "ips": [MB_IP, "fd00::5"]}]})
        assert status == 200
        controller.ok(bridge.dpid, mb.ofport, f"R F {MB_MAC} {MB_IP}")
    bridge.installer = controller
    return bridge, hosts, Sniffer(hosts["mb"])


def install(bridge, *filters: str) -> int:
    """The filters on the bridge (by ovs-ofctl, or by the controller from the middlebox's
    commands); how many flows they cost."""
    mb = Middlebox(bridge.dpid, 3, MB_MAC, 1, MB_IP,
                   filters=frozenset(parse_command(f"A {MB_MAC} {text}").filter for text in filters))
    flows = compile_filters(mb, frozenset({MB_IP, "fd00::5"}))
    if bridge.installer is None:
        bridge.add_flows(["table=0,priority=0,actions=goto_table:1", "table=1,priority=0,actions=NORMAL",
                          *(render(f) for f in flows)])
    else:
        port = next(h for h in bridge.lab.hosts.values() if h.mac == MB_MAC).ofport
        for text in filters:
            bridge.installer.ok(bridge.dpid, port, f"A {MB_MAC} {text}")
        installed = [line for line in bridge.dump_flows() if f"cookie={cookie_of(MB_MAC):#x}," in line]
        assert len(installed) == len(flows)  # the controller (zone 1, the first) installs exactly these
    return len(flows)


def send(host, code: str) -> None:
    script = ("from scapy.all import *\nconf.verb = 0\n"
              f"MB, ME, MB_IP = {MB_MAC!r}, {host.mac!r}, {MB_IP!r}\n" + code)
    host.run([sys.executable, "-c", script])


def frames_of(sniffer: Sniffer, host, code: str) -> list:
    """What of ``code``'s frames reached the middlebox: everything before the marker the
    same host sends afterwards from an address no test filters (it must arrive)."""
    from scapy.all import Ether
    marker = f"marker-{time.monotonic_ns()}".encode()
    start = len(sniffer.frames)
    send(host, code + f"\nsendp(Ether(src=ME, dst=MB)/IP(src='10.0.0.250', dst=MB_IP)/UDP(sport=9, dport=40000)"
                      f"/Raw({marker!r}), iface='eth0')")
    wait_until(lambda: any(marker in f for f in sniffer.frames[start:]), timeout=10, what="the marker")
    seen = sniffer.frames[start:]
    return [Ether(f) for f in seen[:next(i for i, f in enumerate(seen) if marker in f)]]


def test_group_frames_with_the_middlebox_address_from_a_filtered_source_are_dropped(net):
    bridge, h, sniffer = net
    install(bridge, "I 4 s 10.0.0.66")
    for dst in ("ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"):
        assert frames_of(sniffer, h["attacker"], f"sendp(Ether(src=ME, dst={dst!r})/IP(src='10.0.0.66', dst=MB_IP)"
                                                  "/UDP(dport=5000), iface='eth0')") == []
    got = frames_of(sniffer, h["client"], "sendp(Ether(src=ME, dst='ff:ff:ff:ff:ff:ff')/IP(src='10.0.0.1', dst=MB_IP)"
                                           "/UDP(dport=5000), iface='eth0')")
    assert len(got) == 1
    other = frames_of(sniffer, h["attacker"], "sendp(Ether(src=ME, dst='ff:ff:ff:ff:ff:ff')/IP(src='10.0.0.66', "
                                               "dst='10.0.0.99')/UDP(dport=5000), iface='eth0')")
    assert len(other) == 1  # group traffic for another address is never touched


BIG = "Raw(b'x' * 3000)"


def test_fragmented_syn_to_a_filtered_port_loses_its_first_fragment(net):
    bridge, h, sniffer = net
    install(bridge, "T 9 d 23 p tcp")
    got = frames_of(sniffer, h["attacker"], "sendp([Ether(src=ME, dst=MB)/f for f in fragment(IP(src='10.0.0.66', "
                    f"dst=MB_IP, id=11)/TCP(sport=1234, dport=23, flags='S')/{BIG}, fragsize=1400)], iface='eth0')")
    assert all(f["IP"].frag > 0 for f in got)  # never the first: the middlebox cannot reassemble it
    tiny = ("t = bytes(TCP(sport=1235, dport=23, flags='S'))\n"
            "sendp([Ether(src=ME, dst=MB)/IP(src='10.0.0.66', dst=MB_IP, id=12, proto=6, flags='MF')/Raw(t[:8]),"
            " Ether(src=ME, dst=MB)/IP(src='10.0.0.66', dst=MB_IP, id=12, proto=6, frag=1)/Raw(t[8:])], iface='eth0')")
    assert frames_of(sniffer, h["attacker"], tiny) == []


def test_a_fragmented_datagram_to_an_unfiltered_port_is_delivered_whole(net):
    bridge, h, sniffer = net
    install(bridge, "T 9 d 0-1023 p udp")
    listener = h["mb"].udp_listener(9999)
    send(h["attacker"], "sendp([Ether(src=ME, dst=MB)/f for f in fragment(IP(src='10.0.0.66', dst=MB_IP, id=13)"
                        f"/UDP(sport=5, dport=9999)/{BIG}, fragsize=1400)], iface='eth0')")
    (datagram,) = listener.wait_for(1)
    assert len(datagram.payload) == 3000


@pytest.mark.parametrize("outer", [0x88A8, 0x8100])
def test_double_tagged_frames_from_a_filtered_source_are_not_delivered(net, outer):
    bridge, h, sniffer = net
    install(bridge, "I 4 s 10.0.0.66")
    assert frames_of(sniffer, h["attacker"], f"sendp(Ether(src=ME, dst=MB, type={outer})/Dot1Q(vlan=10, type=0x8100)"
                     "/Dot1Q(vlan=20)/IP(src='10.0.0.66', dst=MB_IP)/UDP(dport=5000), iface='eth0')") == []


def test_m_p_vlan_drops_a_tagged_frame(net):
    bridge, h, sniffer = net
    install(bridge, "M 1 p vlan")
    assert frames_of(sniffer, h["client"], "sendp(Ether(src=ME, dst=MB)/Dot1Q(vlan=10)/IP(src='10.0.0.1', "
                                            "dst=MB_IP)/UDP(dport=5000), iface='eth0')") == []


def test_a_range_product_is_cheap_and_still_exact(net):
    bridge, h, sniffer = net
    count = install(bridge, "T 13 s 1025-65534 d 1-65534 p tcp")
    assert count < 400 < 29 * 30 * 2
    assert len(bridge.dump_flows(f"conj_id={1 << 16}")) == 2  # zone 1's first conjunction
    syn = "sendp(Ether(src=ME, dst=MB)/IP(src='10.0.0.66', dst=MB_IP)/TCP(sport={}, dport={}, flags='S'), iface='eth0')"
    assert frames_of(sniffer, h["attacker"], syn.format(40000, 80)) == []
    assert len(frames_of(sniffer, h["attacker"], syn.format(1000, 80))) == 1
    assert len(frames_of(sniffer, h["attacker"], syn.format(40000, 65535))) == 1


@pytest.mark.parametrize("filtered_port", [23, 24])
def test_ipv6_fragments_lose_their_first_only_when_the_datagram_is_filtered(net, filtered_port):
    """A fragmented IPv6 SYN to port 23: with port 23 filtered its first fragment never
    arrives (the rest cannot be reassembled); with port 24 filtered all three do."""
    bridge, h, sniffer = net
    install(bridge, f"T 9 d {filtered_port} p tcp")
    got = frames_of(sniffer, h["attacker"], "sendp([Ether(src=ME, dst=MB)/f for f in fragment6(IPv6(src='fd00::66', "
                    "dst='fd00::5')/IPv6ExtHdrFragment(id=21)/TCP(sport=1234, dport=23, flags='S')/" + BIG +
                    ", 1400)], iface='eth0')")
    offsets = sorted(f["IPv6ExtHdrFragment"].offset for f in got)
    if filtered_port == 23:
        assert offsets and offsets[0] > 0, [f.summary() for f in got]
    else:
        assert len(offsets) == 3 and offsets[0] == 0, [f.summary() for f in got]
