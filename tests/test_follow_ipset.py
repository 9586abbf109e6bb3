"""guest/follow/ipset.py against the real ipset and iptables in a network namespace of the
test's own (ipsets and rules are per namespace: the machine's own are never touched), plus
the parts that need no tool: the save-text parser's corners and the polled watch."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from mbvisor.guest.follow.ipset import IpsetSource, PolledWatch, parse_save, verdict_for
from mbvisor.guest.follow.source import DESTINATION, SOURCE, NotOffloadable, Resync, SourceError, Verdict



class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = ("ip", "netns", "exec", name)

    def run(self, command: str) -> str:
        done = subprocess.run([*self.prefix, *shlex.split(command)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return done.stdout

    def setup(self, *commands: str) -> None:
        for command in commands:
            self.run(command)

    def source(self, set_name: str, now: float = 1000.0, **options) -> IpsetSource:
        return IpsetSource(set_name, self.prefix, clock=lambda: now, **options)


@pytest.fixture
def namespace(netns_name):
    return Namespace(netns_name)


BLOCKLIST = "ipset create blocklist hash:ip"
DROP_SOURCES = "iptables -A INPUT -m set --match-set blocklist src -j DROP"
NO_FORWARDING = "sysctl -w net.ipv4.ip_forward=0"
FORWARDING = "sysctl -w net.ipv4.ip_forward=1"


# --- the set: its type and its elements --------------------------------------------------------

@pytest.mark.host
def test_sets_live_in_their_namespace_so_the_machines_own_are_untouched(namespace):
    namespace.setup(f"ipset create mbf-only-here-{os.getpid()} hash:ip")
    on_the_machine = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=True).stdout
    assert f"mbf-only-here-{os.getpid()}" not in on_the_machine.split()
    assert namespace.run("ipset list -n").split() == [f"mbf-only-here-{os.getpid()}"]


@pytest.mark.host
def test_an_ipv4_hash_ip_snapshot_has_canonical_addresses_and_expiry_times(namespace):
    namespace.setup("ipset create bans hash:ip timeout 0",
                    "ipset add bans 192.0.2.1 timeout 600", "ipset add bans 192.0.2.2", "ipset add bans 198.51.100.7")
    snapshot = namespace.source("bans", now=1000.0).snapshot()
    assert set(snapshot) == {"192.0.2.1", "192.0.2.2", "198.51.100.7"}
    assert 1000.0 + 598 <= snapshot["192.0.2.1"] <= 1000.0 + 600  # ipset prints the seconds left
    assert snapshot["192.0.2.2"] is None and snapshot["198.51.100.7"] is None  # timeout 0: until deleted


@pytest.mark.host
def test_an_ipv6_hash_net_snapshot_with_comments_and_counters(namespace):
    namespace.setup("ipset create nets hash:net family inet6 comment counters timeout 3600",
                    "ipset add nets 2001:0db8:0:0::/64 comment 'timeout nomatch are words here'",
                    "ipset add nets 2001:db8:1::1/128", "ipset add nets 2001:db8:2::/48 timeout 0")
    snapshot = namespace.source("nets", now=50.0).snapshot()
    assert set(snapshot) == {"2001:db8::/64", "2001:db8:1::1", "2001:db8:2::/48"}
    assert 50.0 + 3598 <= snapshot["2001:db8::/64"] <= 50.0 + 3600
    assert snapshot["2001:db8:2::/48"] is None


@pytest.mark.host
def test_an_ipv4_hash_net_and_a_hash_ip_with_netmask_give_networks(namespace):
    namespace.setup("ipset create nets hash:net", "ipset add nets 10.0.0.0/8", "ipset add nets 10.2.0.1",
                    "ipset create masked hash:ip netmask 24", "ipset add masked 10.9.8.7")
    assert namespace.source("nets").snapshot() == {"10.0.0.0/8": None, "10.2.0.1": None}
    assert namespace.source("masked").snapshot() == {"10.9.8.0/24": None}


@pytest.mark.host
@pytest.mark.parametrize("create, why", [
    ("ipset create blocklist hash:ip,port", "set blocklist is hash:ip,port; only hash:ip and hash:net"),
    ("ipset create blocklist bitmap:ip range 10.0.0.0/24", "set blocklist is bitmap:ip; only"),
    ("ipset create blocklist list:set", "set blocklist is list:set; only"),
    ("ipset create blocklist hash:net,iface", "set blocklist is hash:net,iface; only"),
    ("ipset create blocklist hash:ip bitmask 255.0.255.0",
     "set blocklist has a bitmask, so its members are not networks"),
])
def test_sets_whose_members_are_not_addresses_or_networks_are_refused(namespace, create, why):
    namespace.setup(create, DROP_SOURCES, NO_FORWARDING)
    source = namespace.source("blocklist")
    with pytest.raises(NotOffloadable, match=f"^{why}"):
        source.verdict()
    assert source.snapshot() == {}  # the set the verdict refused: nothing of it is offloaded
    with pytest.raises(SourceError, match=f"^ipset blocklist changed: {why}"):
        source.snapshot()  # read afresh without a verdict: the follower must judge it again


@pytest.mark.host
def test_a_nomatch_element_is_refused_when_it_appears(namespace):
    namespace.setup("ipset create blocklist hash:net", "ipset add blocklist 10.0.0.0/8", DROP_SOURCES, NO_FORWARDING)
    source = namespace.source("blocklist")
    assert source.verdict() == Verdict(frozenset({SOURCE}))
    namespace.setup("ipset add blocklist 10.1.0.0/16 nomatch")
    assert source.snapshot() == {"10.0.0.0/8": None}  # the set as the verdict judged it
    why = ("set blocklist has the nomatch element 10.1.0.0/16: an exception inside a network cannot be one switch"
           " drop filter")
    with pytest.raises(SourceError, match=f"^ipset blocklist changed: {why}$"):
        source.snapshot()
    with pytest.raises(NotOffloadable, match=f"^{why}$"):
        source.verdict()


@pytest.mark.host
def test_a_missing_set_is_a_source_error_in_ipsets_words(namespace):
    with pytest.raises(SourceError, match="ipset save nothing' failed with exit status 1: .*"
                                          "The set with the given name does not exist"):
        namespace.source("nothing").snapshot()


# --- the verdict: the rules that use the set ---------------------------------------------------

@pytest.mark.host
@pytest.mark.parametrize("commands, fields", [
    ((DROP_SOURCES, NO_FORWARDING), {SOURCE}),
    (("iptables -A INPUT -m set --match-set blocklist dst -j DROP", NO_FORWARDING), {DESTINATION}),
    # Forwarding: FORWARD drops them too, or drops everything by policy.
    ((DROP_SOURCES, "iptables -A FORWARD -m set --match-set blocklist src -j DROP", FORWARDING), {SOURCE}),
    ((DROP_SOURCES, "iptables -P FORWARD DROP", FORWARDING), {SOURCE}),
    # What may come first: a comment on the rule, logging, other drops, loopback accepts.
    (("iptables -A INPUT -i lo -j ACCEPT", "iptables -A INPUT -p tcp --dport 23 -j DROP",
      "iptables -A INPUT -m set --match-set blocklist src -j LOG --log-prefix banned",
      "iptables -A INPUT -m set --match-set blocklist src -m comment --comment 'ban -j list' -j DROP",
      "iptables -A INPUT -j ACCEPT", NO_FORWARDING), {SOURCE}),
])
def test_a_plain_drop_before_anything_that_lets_packets_through_is_offloadable(namespace, commands, fields):
    namespace.setup(BLOCKLIST, *commands)
    assert namespace.source("blocklist").verdict() == Verdict(frozenset(fields))


@pytest.mark.host
def test_an_ipv6_set_is_judged_by_ip6tables(namespace):
    namespace.setup("ipset create blocklist6 hash:net family inet6",
                    "ip6tables -A INPUT -m set --match-set blocklist6 src -j DROP",
                    "sysctl -w net.ipv6.conf.all.forwarding=1")
    now = [0.0]
    source = IpsetSource("blocklist6", namespace.prefix, rules_interval=30.0, clock=lambda: now[0])
    with pytest.raises(NotOffloadable, match="^ip6tables FORWARD has no rule dropping set blocklist6's members"):
        source.verdict()
    namespace.setup("ip6tables -A FORWARD -m set --match-set blocklist6 src -j DROP")
    now[0] = 29.0
    with pytest.raises(NotOffloadable, match="^ip6tables FORWARD"):
        source.verdict()  # the rules are read again only every rules_interval
    now[0] = 30.0
    assert source.verdict() == Verdict(frozenset({SOURCE}))


@pytest.mark.host
@pytest.mark.parametrize("commands, why", [
    ((NO_FORWARDING,), "no iptables or ip6tables rule uses set blocklist$"),
    (("iptables -A INPUT -m set ! --match-set blocklist src -j DROP", NO_FORWARDING),
     r"iptables INPUT rule 1 \(.*\) uses set blocklist but negates the match \(it drops what is not in the set\)$"),
    (("iptables -A INPUT -m set --match-set blocklist src -j REJECT", NO_FORWARDING),
     "uses set blocklist but rejects instead of dropping: the middlebox answers, the switch would drop silently$"),
    (("iptables -A INPUT -m set --match-set blocklist src -j ACCEPT", NO_FORWARDING),
     "uses set blocklist but ends in ACCEPT, not DROP$"),
    (("iptables -A INPUT -m set --match-set blocklist src,dst -j DROP", NO_FORWARDING),
     "uses set blocklist but matches the set by 'src,dst', two addresses; a switch filter matches one$"),
    (("iptables -A INPUT -p tcp --dport 22 -m set --match-set blocklist src -j DROP", NO_FORWARDING),
     "uses set blocklist but also matches '-p tcp -m tcp --dport 22', so the switch would drop more than it does$"),
    (("iptables -A INPUT -m set --match-set blocklist src --packets-gt 5 -j DROP", NO_FORWARDING),
     "but also matches '--packets-gt 5', so the switch"),
    (("iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT", DROP_SOURCES, NO_FORWARDING),
     r"iptables INPUT rule 1 \(-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\) accepts packets"
     " before any drop of set blocklist; the switch would drop those packets instead$"),
    (("iptables -A INPUT -p tcp --dport 23 -j REJECT", DROP_SOURCES, NO_FORWARDING),
     r"rule 1 \(.*\) rejects packets \(the middlebox answers them\) before any drop of set blocklist"),
    (("iptables -A INPUT ! -i lo -j ACCEPT", DROP_SOURCES, NO_FORWARDING), r"rule 1 \(.*\) accepts packets before"),
    (("iptables -A INPUT -p udp -j RETURN", DROP_SOURCES, NO_FORWARDING),
     r"rule 1 \(.*\) returns packets to the chain's policy before"),
    (("iptables -N bans", "iptables -A INPUT -j bans", "iptables -A bans -m set --match-set blocklist src -j DROP",
      NO_FORWARDING),
     r"rule 1 \(-A INPUT -j bans\) hands packets to bans, which may accept them before any drop"),
    (("iptables -N bans", "iptables -A bans -m set --match-set blocklist src -j DROP", NO_FORWARDING),
     r"iptables INPUT has no rule dropping set blocklist's members and its policy accepts them"
     r" \(the set is used in filter bans instead\)$"),
    ((DROP_SOURCES, FORWARDING), "^iptables FORWARD has no rule dropping set blocklist's members"),
    ((DROP_SOURCES, "iptables -A FORWARD -m set --match-set blocklist dst -j DROP", FORWARDING),
     "INPUT matches set blocklist by one address and FORWARD by the other;"
     " one switch filter cannot tell the two paths apart$"),
    (("iptables -P INPUT DROP", "iptables -A OUTPUT -m set --match-set blocklist dst -j DROP", NO_FORWARDING),
     "^INPUT drops every packet by policy, so set blocklist decides nothing$"),
])
def test_each_way_the_rules_differ_from_one_drop_is_refused_with_its_reason(namespace, commands, why):
    namespace.setup(BLOCKLIST, *commands)
    with pytest.raises(NotOffloadable, match=why):
        namespace.source("blocklist").verdict()


FAIL2BAN_START = "ipset -exist create f2b-sshd hash:ip timeout 0"  # iptables-ipset.conf, actionstart
FAIL2BAN_BAN = "ipset -exist add f2b-sshd 203.0.113.9 timeout 0"  # actionban, ipsettime = 0


@pytest.mark.host
def test_fail2ban_iptables_ipset_as_debian_12_ships_it_is_refused(namespace):
    """iptables-ipset.conf with iptables.conf's defaults: type oneport, port ssh, protocol
    tcp, blocktype REJECT --reject-with icmp-port-unreachable, inserted first in INPUT."""
    namespace.setup(FAIL2BAN_START, "iptables -w -I INPUT -p tcp --dport ssh -m set --match-set f2b-sshd src"
                                    " -j REJECT --reject-with icmp-port-unreachable", FAIL2BAN_BAN, NO_FORWARDING)
    source = namespace.source("f2b-sshd")
    with pytest.raises(NotOffloadable) as refused:
        source.verdict()
    assert str(refused.value) == (
        "iptables INPUT rule 1 (-A INPUT -p tcp -m tcp --dport 22 -m set --match-set f2b-sshd src -j REJECT"
        " --reject-with icmp-port-unreachable) uses set f2b-sshd but rejects instead of dropping: the middlebox"
        " answers, the switch would drop silently; it also matches '-p tcp -m tcp --dport 22', so the switch would"
        " drop more than it does")
    assert source.snapshot() == {"203.0.113.9": None}


@pytest.mark.host
def test_fail2ban_allports_with_blocktype_drop_and_protocol_all_is_offloadable(namespace):
    """iptables-ipset-proto6-allports.conf (type allports) with blocktype=DROP, protocol=all."""
    namespace.setup(FAIL2BAN_START, "iptables -w -I INPUT -p all -m set --match-set f2b-sshd src -j DROP",
                    "iptables -A INPUT -j ACCEPT", FAIL2BAN_BAN, NO_FORWARDING)
    assert namespace.source("f2b-sshd").verdict() == Verdict(frozenset({SOURCE}))


# --- the polled watch -------------------------------------------------------------------------

@pytest.mark.host
def test_the_watch_is_polled_and_reports_a_rule_edit_that_changes_the_verdict(namespace):
    namespace.setup(BLOCKLIST, DROP_SOURCES, NO_FORWARDING)
    now = [0.0]
    source = IpsetSource("blocklist", namespace.prefix, poll_interval=2.5, rules_interval=20.0, clock=lambda: now[0])
    assert source.verdict() == Verdict(frozenset({SOURCE}))
    watch = source.watch()
    assert (watch.fileno(), watch.poll_interval) == (None, 2.5)
    namespace.setup("iptables -I INPUT -m conntrack --ctstate ESTABLISHED -j ACCEPT")
    now[0] = 19.0
    assert watch.changes() == []  # not yet time to read the rules again
    now[0] = 20.0
    [resync] = watch.changes()
    assert isinstance(resync, Resync)
    assert resync.reason.startswith("the rules for ipset blocklist changed: iptables INPUT rule 1 (-A INPUT -m"
                                    " conntrack --ctstate ESTABLISHED -j ACCEPT) accepts packets")
    namespace.setup("iptables -D INPUT 1")
    now[0] = 40.0
    assert watch.changes() == [Resync("the rules for ipset blocklist now let it be offloaded, dropped by src")]
    now[0] = 70.0
    assert watch.changes() == []  # read again, and nothing that matters changed
    namespace.setup(FORWARDING)  # FORWARD now counts, and it accepts everything
    now[0] = 100.0
    assert watch.changes()[0].reason.startswith("the rules for ipset blocklist changed: iptables FORWARD has no rule")


@pytest.mark.host
def test_a_poll_runs_ipset_once_and_the_rules_tools_once_per_rules_interval(namespace, tmp_path):
    """What the follower does at each poll: the watch's changes, the verdict, the snapshot."""
    namespace.setup(BLOCKLIST, "ipset add blocklist 192.0.2.1", DROP_SOURCES, NO_FORWARDING)
    log = tmp_path / "ran"
    logging = (*namespace.prefix, "sh", "-c", f'echo "$1" >> {log}; exec "$@"', "sh")
    now = [0.0]
    source = IpsetSource("blocklist", logging, poll_interval=4.0, rules_interval=30.0, clock=lambda: now[0])
    watch = source.watch()
    for poll in range(10):  # 0 s to 36 s
        now[0] = 4.0 * poll
        assert watch.changes() == []
        assert source.verdict() == Verdict(frozenset({SOURCE}))
        assert source.snapshot() == {"192.0.2.1": None}
    ran = log.read_text().split()
    assert ran.count("ipset") == 10
    assert ran.count("iptables-save") == ran.count("cat") == 2  # at 0 s (the verdict) and 32 s (the watch)


def test_a_polled_watch_turns_a_failing_check_into_a_resync_and_stops_checking_once_closed():
    now, calls = [0.0], []

    def check() -> str | None:
        calls.append(now[0])
        raise SourceError("'iptables-save' failed with exit status 1: gone")

    watch = PolledWatch(1.0, check, check_interval=5.0, clock=lambda: now[0])
    now[0] = 5.0
    assert watch.changes() == [Resync("'iptables-save' failed with exit status 1: gone")]
    watch.close()
    now[0] = 50.0
    assert watch.changes() == [] and calls == [5.0]


# --- parsing without the tools ------------------------------------------------------------------

def test_an_element_option_ipset_never_printed_before_is_a_source_error():
    text = "create s hash:ip family inet hashsize 1024 maxelem 65536\nadd s 10.0.0.1 colour blue\n"
    with pytest.raises(SourceError, match="^ipset printed 'colour' for 10.0.0.1 in set s; not understood$"):
        parse_save(text, 0.0)


def test_a_set_used_only_by_ip6tables_is_judged_there_whatever_iptables_says():
    # iptables-save v1.8.9 (nf_tables) text, as the namespace tests above produce it.
    accepting = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                 "-A INPUT -j ACCEPT\nCOMMIT\n")
    dropping = accepting.replace("-A INPUT -j ACCEPT", "-A INPUT -m set --match-set v6 dst -j DROP")
    assert verdict_for(accepting, dropping, "v6", forwarding=False) == Verdict(frozenset({DESTINATION}))
    with pytest.raises(NotOffloadable, match="^no iptables or ip6tables rule uses set v6$"):
        verdict_for(accepting, accepting, "v6")


# --- 4. ipset verdict: address rewriting and set refreshing are not read ----------------------

IPTABLES_HEAD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"


def test_ipset_a_dnat_before_the_filter_refuses_a_set_dropped_by_destination():
    """nat PREROUTING runs before the filter: 203.0.113.10 DNATed to an internal server is
    matched by the destination set as 10.1.0.10, so the switch, which sees 203.0.113.10,
    must not drop by destination (as the nft adapter refuses any dnat)."""
    save = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
            "-A PREROUTING -d 203.0.113.10/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.0.10\n"
            "COMMIT\n" + IPTABLES_HEAD +
            "-A INPUT -m set --match-set bl dst -j DROP\n-A FORWARD -m set --match-set bl dst -j DROP\nCOMMIT\n")
    with pytest.raises(NotOffloadable, match="rewrites destination addresses before the filter"):
        verdict_for(save, "", "bl", forwarding=True)
    assert verdict_for(save.replace(" dst ", " src "), "", "bl") == Verdict(frozenset({SOURCE}))


def test_ipset_a_rule_that_refreshes_the_set_from_the_packet_path_is_refused():
    """``-j SET --add-set bl src --exist`` renews a ban while the attacker keeps sending:
    offloaded, its packets would never reach the guest to renew it, the ban would expire
    and the attacker be back (the nft adapter refuses ``update @set`` alike)."""
    save = (IPTABLES_HEAD +
            "-A INPUT -m set --match-set bl src -j SET --add-set bl src --exist --timeout 600\n"
            "-A INPUT -m set --match-set bl src -j DROP\nCOMMIT\n")
    with pytest.raises(NotOffloadable, match="changes set bl from the packet path"):
        verdict_for(save, "", "bl", forwarding=False)
