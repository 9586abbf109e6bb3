"""guest/follow/ipvs.py: IPVS services read from ipvsadm's save format or /proc/net/ip_vs,
and the plan that turns them into the middlebox's redirect or refuses each with its reason.
This machine's kernel has no IPVS, so the formats are literal fixtures (their sources are
named on each); the real ipvsadm is run only to see how its failure is reported."""

from __future__ import annotations

import os

import pytest

from mbvisor.guest.commands import RegisterLoadBalancer
from mbvisor.guest.follow.ipvs import (
    DIRECT_ROUTING, LOCAL, MASQUERADING, TUNNEL, Balancing, IpvsSource, Redirect, Refusal, RealServer,
    VirtualService, parse_ipvsadm_save, parse_proc_ip_vs, plan,
)
from mbvisor.guest.follow.source import SourceError
from mbvisor.guest.grammar import format_command

# ipvsadm 1.31 (Debian 12's 1:1.31-1), ``ipvsadm -Sn``: print_service_entry() with FMT_RULE
# prints "-A %s -s %s" then " -p %u", " -M %s", " --pe %s", " -o", " -b <flags>"; each real
# server "-a %s -r %s %s -w %d" (tunnels add "--tun-type %s [--tun-port %d] [--tun-*csum]");
# a firewall mark is "-f %d" ("-f %d -6"), an IPv6 address "[%s]:%u" (the format strings are
# in the installed binary: strings /usr/sbin/ipvsadm).
IPVSADM_SAVE = """\
-A -t 10.0.0.5:80 -s rr
-a -t 10.0.0.5:80 -r 10.0.1.2:80 -m -w 1
-a -t 10.0.0.5:80 -r 10.0.1.3:80 -m -w 1
-A -t 10.0.0.5:443 -s wlc
-a -t 10.0.0.5:443 -r 10.0.1.2:443 -m -w 1
-a -t 10.0.0.5:443 -r 10.0.1.3:443 -m -w 1
-A -u 10.0.0.6:53 -s sh -p 300 -M 255.255.255.0 --pe sip -o -b sh-fallback,sh-port
-a -u 10.0.0.6:53 -r 10.0.1.4:5353 -i -w 2 --tun-type gue --tun-port 6080 --tun-nocsum
-A -t [2001:db8::5]:443 -s mh -b mh-port
-a -t [2001:db8::5]:443 -r [2001:db8:1::2]:443 -m -w 3
-a -t [2001:db8::5]:443 -r [2001:db8:1::3]:443 -m -w 3
-A -f 7 -6 -s rr
-a -f 7 -6 -r [2001:db8:1::9]:0 -g -w 1
-A --sctp-service 10.0.0.7:3868 -s rr
-a --sctp-service 10.0.0.7:3868 -r 10.0.1.8:3868 -m -w 1
"""

# Linux net/netfilter/ipvs/ip_vs_ctl.c, ip_vs_info_seq_show(): three heading lines, then per
# service "%s  %08X:%04X %s %s " (protocol, address, port, scheduler, "ops " or ""), IPv6
# "%s  [%pI6]:%04X %s ", a mark "FWM  %08X %s %s", then "persistent %d %08X" or nothing and a
# newline; per real server "  -> %08X:%04X      %-7s %-6d %-10d %-10d" (forwarding name,
# weight, active and inactive connections), IPv6 "  -> [%pI6]:%04X      ...".  The persistence
# timeout is in jiffies (300 s at HZ=250 here).
PROC_IP_VS = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A000005:0050 rr  
  -> 0A000102:0050      Masq    1      0          0         
  -> 0A000103:0050      Masq    1      3          12        
UDP  0A000006:0035 sh ops persistent 75000 FFFFFF00
  -> 0A000104:14E9      Tunnel  2      0          0         
TCP  [2001:0db8:0000:0000:0000:0000:0000:0005]:01BB mh 
  -> [2001:0db8:0001:0000:0000:0000:0000:0002]:01BB      Masq    3      0          0         
FWM  00000007 rr 
  -> 0A000109:0000      Route   1      0          0         
  -> 0A00010A:0000      Local   1      0          0         
"""  # the trailing spaces are the kernel's

MB = "10.0.0.5"
POOL = (RealServer("10.0.1.2", 80, MASQUERADING, 1), RealServer("10.0.1.3", 80, MASQUERADING, 1))
WEB = VirtualService("TCP", MB, 80, None, "rr", real_servers=POOL)


def test_ipvsadm_save_text_becomes_services_with_their_real_servers():
    services = parse_ipvsadm_save(IPVSADM_SAVE)
    assert [service.describe() for service in services] == [
        "TCP 10.0.0.5:80", "TCP 10.0.0.5:443", "UDP 10.0.0.6:53", "TCP [2001:db8::5]:443", "FWM 7",
        "SCTP 10.0.0.7:3868"]
    assert services[0] == WEB
    assert services[2] == VirtualService("UDP", "10.0.0.6", 53, None, "sh", persistent=True, one_packet=True,
                                         scheduler_flags=frozenset({"sh-fallback", "sh-port"}),
                                         real_servers=(RealServer("10.0.1.4", 5353, TUNNEL, 2),))
    assert services[3].scheduler_flags == frozenset({"mh-port"})
    assert services[3].real_servers[1] == RealServer("2001:db8:1::3", 443, MASQUERADING, 3)
    assert services[4] == VirtualService("FWM", None, 0, 7, "rr",
                                         real_servers=(RealServer("2001:db8:1::9", 0, DIRECT_ROUTING, 1),))


def test_proc_net_ip_vs_text_becomes_the_same_services_in_hexadecimal():
    services = parse_proc_ip_vs(PROC_IP_VS)
    assert services[0] == WEB
    assert services[1] == VirtualService("UDP", "10.0.0.6", 53, None, "sh", persistent=True, one_packet=True,
                                         real_servers=(RealServer("10.0.1.4", 5353, TUNNEL, 2),))
    assert services[2].address == "2001:db8::5" and services[2].port == 443
    assert services[2].real_servers == (RealServer("2001:db8:1::2", 443, MASQUERADING, 3),)
    assert services[3].fwmark == 7 and [s.forwarding for s in services[3].real_servers] == [DIRECT_ROUTING, LOCAL]


@pytest.mark.parametrize("text, why", [
    ("-A -t www.example.org:http -s rr\n", "'www.example.org:http' has no numeric port; read IPVS with ipvsadm -Sn"),
    ("-A -t www.example.org:80 -s rr\n",
     "'www.example.org' is not a numeric virtual address; read IPVS with ipvsadm -Sn"),
    ("-a -t 10.0.0.5:80 -r 10.0.1.2:80 -m -w 1\n",
     "ipvsadm listed a real server of '-t 10.0.0.5:80' before the service"),
    ("-A -t 10.0.0.5:80 -s rr --colour blue\n",
     "ipvsadm printed '--colour' in '-A -t 10.0.0.5:80 -s rr --colour blue'"),
    ("Prot LocalAddress:Port\n", "ipvsadm printed 'Prot LocalAddress:Port'; not understood"),
])
def test_save_text_that_is_not_what_ipvsadm_prints_is_a_source_error(text, why):
    with pytest.raises(SourceError, match=f"^{why}"):
        parse_ipvsadm_save(text)


def test_services_on_the_middlebox_address_with_one_pool_become_one_redirect():
    services = parse_ipvsadm_save(IPVSADM_SAVE)
    redirects, refusals = plan(services, MB)
    assert redirects == [Redirect(MB, ("10.0.1.2", "10.0.1.3"))]
    assert refusals == [
        Refusal("UDP 10.0.0.6:53", "is not on the middlebox's address 10.0.0.5, the only one redirected"),
        Refusal("TCP [2001:db8::5]:443", "is not on the middlebox's address 10.0.0.5, the only one redirected"),
        Refusal("FWM 7", "is a firewall-mark service: which packets it takes is up to firewall rules the follower"
                         " does not read"),
        Refusal("SCTP 10.0.0.7:3868", "is not on the middlebox's address 10.0.0.5, the only one redirected")]
    command = redirects[0].command("52:54:00:12:34:56")
    assert command == RegisterLoadBalancer("52:54:00:12:34:56", MB, 0, None, ("10.0.1.2", "10.0.1.3"))
    assert format_command(command) == "R L 52:54:00:12:34:56 10.0.0.5 0 * 10.0.1.2,10.0.1.3"


def test_an_ipv6_service_hashed_per_connection_with_equal_weights_is_offloadable():
    redirects, refusals = plan(parse_ipvsadm_save(IPVSADM_SAVE), "2001:db8:0::5")
    assert redirects == [Redirect("2001:db8::5", ("2001:db8:1::2", "2001:db8:1::3"))] and len(refusals) == 5


@pytest.mark.parametrize("change", [
    {"scheduler": "rr", "weights": (1, 5)},  # rr and lc ignore weights other than 0
    {"scheduler": "lc", "weights": (2, 1)},
    {"scheduler": "sh", "scheduler_flags": frozenset({"sh-port"})},
    {"scheduler": "mh", "scheduler_flags": frozenset({"mh-port", "mh-fallback"})},
    *({"scheduler": name} for name in ("wrr", "wlc", "sed", "nq")),
])
def test_schedulers_that_spread_connections_like_the_switch_are_offloadable(change):
    weights = change.pop("weights", (1, 1))
    servers = tuple(server._replace(weight=weight) for server, weight in zip(POOL, weights))
    assert plan([WEB._replace(real_servers=servers, **change)], MB)[0] == [Redirect(MB, ("10.0.1.2", "10.0.1.3"))]


def _servers(*changes: dict) -> tuple[RealServer, ...]:
    return tuple(server._replace(**change) for server, change in zip(POOL, changes))


@pytest.mark.parametrize("service, why", [
    (WEB._replace(real_servers=()), "has no real server"),
    (WEB._replace(real_servers=tuple(RealServer(f"10.0.2.{n}", 80, MASQUERADING, 1) for n in range(1, 66))),
     "has 65 real servers; a redirect takes at most 64"),
    (WEB._replace(persistent=True),
     "is persistent (-p): IPVS keeps a client on one real server, the switch chooses per connection"),
    (WEB._replace(one_packet=True), "schedules each datagram apart (-o): the switch keeps a flow on one backend"),
    (WEB._replace(scheduler="dh"), "uses scheduler dh, which chooses by destination address, so one server takes"
                                   " all of an address's connections; the switch spreads connections by hash"),
    (WEB._replace(scheduler="lblc"), "uses scheduler lblc, which chooses by destination address, so one server"
                                     " takes all of an address's connections; the switch spreads connections by hash"),
    (WEB._replace(scheduler="lblcr"), "uses scheduler lblcr, which chooses by destination address, so few servers"
                                      " take all of an address's connections; the switch spreads connections by hash"),
    (WEB._replace(scheduler="fo"), "uses scheduler fo, which sends every new connection to the highest-weight"
                                   " server (failover); the switch spreads connections by hash"),
    (WEB._replace(scheduler="ovf"), "uses scheduler ovf, which fills the highest-weight server first (overflow);"
                                    " the switch spreads connections by hash"),
    (WEB._replace(scheduler="sh", scheduler_flags=frozenset({"sh-fallback"})),
     "uses scheduler sh without sh-port, which keeps a client on one server; the switch hashes each connection"),
    (WEB._replace(scheduler="mh"),
     "uses scheduler mh without mh-port, which keeps a client on one server; the switch hashes each connection"),
    (WEB._replace(scheduler="twos"), "uses scheduler 'twos', unknown to the follower"),
    (WEB._replace(real_servers=_servers({"forwarding": DIRECT_ROUTING}, {})),
     "reaches real server 10.0.1.2:80 by direct routing; the switch can only rewrite the destination address,"
     " as masquerading (-m) does"),
    (WEB._replace(real_servers=_servers({}, {"forwarding": TUNNEL})), "reaches real server 10.0.1.3:80 by tunnelling;"
     " the switch can only rewrite the destination address, as masquerading (-m) does"),
    (WEB._replace(real_servers=_servers({}, {"forwarding": LOCAL})), "reaches real server 10.0.1.3:80 by local"
     " delivery; the switch can only rewrite the destination address, as masquerading (-m) does"),
    (WEB._replace(real_servers=_servers({"port": 8080}, {"port": 8080})),
     "translates port 80 to real server 10.0.1.2:8080; the switch's redirect rewrites the address, never the port"),
    (WEB._replace(real_servers=_servers({"weight": 0}, {})),
     "quiesces real server 10.0.1.2:80 (weight 0): IPVS sends it no new connection, the switch still would"),
    (WEB._replace(scheduler="wrr", real_servers=_servers({"weight": 1}, {"weight": 3})),
     "weighs its real servers unequally (1, 3); the switch spreads connections evenly"),
    (WEB._replace(real_servers=_servers({}, {"address": "2001:db8:1::3"})),
     "mixes families with real server 2001:db8:1::3:80; a redirect keeps one family"),
])
def test_each_service_the_switch_would_balance_differently_is_refused_with_its_reason(service, why):
    redirects, refusals = plan([service], MB)
    assert redirects == [] and Refusal("TCP 10.0.0.5:80", why) in refusals


def test_one_refused_service_keeps_the_whole_address_with_the_middlebox():
    ssh = VirtualService("TCP", MB, 22, None, "rr", persistent=True, real_servers=_servers({"port": 22}, {"port": 22}))
    redirects, refusals = plan([WEB, ssh], MB)
    assert redirects == []
    assert refusals == [
        Refusal("TCP 10.0.0.5:80", "shares the address with a service that cannot be offloaded, and the redirect"
                                   " would take all of 10.0.0.5's traffic"),
        Refusal("TCP 10.0.0.5:22", "is persistent (-p): IPVS keeps a client on one real server, the switch chooses"
                                   " per connection")]


def test_two_services_on_the_address_with_different_pools_are_both_refused():
    dns = VirtualService("UDP", MB, 80, None, "rr", real_servers=(RealServer("10.0.1.7", 80, MASQUERADING, 1),))
    redirects, refusals = plan([WEB, dns], MB)
    assert redirects == []
    reason = "shares the address with services of another pool; one address gets one redirect"
    assert refusals == [Refusal("TCP 10.0.0.5:80", reason), Refusal("UDP 10.0.0.5:80", reason)]


def test_the_source_reads_either_format_and_polls(tmp_path):
    for name, text in (("save", IPVSADM_SAVE), ("ip_vs", PROC_IP_VS)):
        (tmp_path / name).write_text(text)
        source = IpvsSource(MB, command=("cat", str(tmp_path / name)), poll_interval=3.0)
        balancing = source.snapshot()
        assert balancing.redirects == {MB: ("10.0.1.2", "10.0.1.3")}
        assert {refusal.service for refusal in balancing.refusals} >= {"UDP 10.0.0.6:53", "FWM 7"}
        watch = source.watch()
        assert (watch.fileno(), watch.poll_interval, watch.changes()) == (None, 3.0, [])




@pytest.mark.host
def test_ipvsadm_that_cannot_reach_the_kernel_is_a_clear_source_error():
    """As an unprivileged user ipvsadm fails on any kernel, with or without IPVS: "Can't
    initialize ipvs: Permission denied (you must be root)"."""
    source = IpvsSource(MB, argv_prefix=("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"))
    with pytest.raises(SourceError, match=r"^IPVS could not be read: 'setpriv .* ipvsadm -Sn' failed with exit status"
                                          r" 2: .*Can't initialize ipvs: Permission denied \(you must be root\)"):
        source.snapshot()


@pytest.mark.host
def test_ipvsadm_as_root_in_a_fresh_namespace_reads_nothing_or_says_ipvs_is_missing(netns_name):
    source = IpvsSource(MB, argv_prefix=("ip", "netns", "exec", netns_name))
    if _kernel_has_ipvs():
        assert source.snapshot() == Balancing({}, ())
    else:
        with pytest.raises(SourceError, match="Can't initialize ipvs: Protocol not available; Are you sure that"
                                              " IP Virtual Server is built in the kernel or as module"):
            source.snapshot()


def _kernel_has_ipvs() -> bool:
    """Loaded (or built in), or loadable: ipvsadm loads the module itself."""
    release = os.uname().release
    return os.path.exists("/proc/net/ip_vs") or os.path.isdir(f"/lib/modules/{release}/kernel/net/netfilter/ipvs")
