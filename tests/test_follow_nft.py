"""guest/follow/nft.py against the real nft: every ruleset, set listing and monitor event
here is made by nft in a network namespace of the test's own (never the machine's ruleset),
and the fail2ban rulesets by fail2ban's own action code (the system Python's fail2ban)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

import pytest
from mbvisor.guest import fields
from mbvisor.guest.follow.nft import (
    NftMonitorWatch,
    NftSetSource,
    elements,
    guest_forwards,
    parse_monitor_line,
    verdict_for,
)
from mbvisor.guest.follow.source import (
    DESTINATION,
    SOURCE,
    Change,
    NotOffloadable,
    Resync,
    SourceError,
    Verdict,
)



class Namespace:
    """A network namespace with its own, initially empty, nftables ruleset."""

    def __init__(self, name: str):
        self.name = name
        self.nft_argv = ["ip", "netns", "exec", name, "nft"]

    def nft(self, *arguments: str, script: str | None = None) -> str:
        done = subprocess.run([*self.nft_argv, *arguments], check=False, input=script, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, f"nft {' '.join(arguments)}: {done.stderr}"
        return done.stdout

    def load(self, script: str) -> None:
        self.nft("-f", "-", script=script)

    def ruleset(self) -> dict:
        return json.loads(self.nft("-j", "list", "ruleset"))

    def source(self, family: str, table: str, set_name: str, **options) -> NftSetSource:
        return NftSetSource(family, table, set_name, nft=self.nft_argv, **options)


@pytest.fixture
def netns(netns_name):
    return Namespace(netns_name)


def collect(watch, count: int, timeout: float = 10.0) -> list:
    """At least `count` items from the watch, waiting on its descriptor (fails at the deadline)."""
    items: list = []
    deadline = time.monotonic() + timeout
    while len(items) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {items} of {count} items before the deadline"
        readable, _, _ = select.select([watch], [], [], remaining)
        if readable:
            items += watch.changes()
    return items


def refusal(ruleset: dict, family: str, table: str, set_name: str, **options) -> str:
    with pytest.raises(NotOffloadable) as refused:
        verdict_for(ruleset, family, table, set_name, **options)
    reason = str(refused.value)
    assert ". " not in reason and "\n" not in reason, f"not one sentence: {reason}"
    return reason


def table(*chains: str, sets: str = "set s { type ipv4_addr; flags interval; }", family: str = "inet") -> str:
    """A table `t` with set(s) and chains, each given as "NAME: HEADER; RULE; RULE"."""
    bodies = []
    for chain in chains:
        name, _, body = chain.partition(":")
        bodies.append(f"chain {name} {{\n" + "\n".join(body.split(";")) + "\n}")
    return f"table {family} t {{\n{sets}\n" + "\n".join(bodies) + "\n}\n"


INPUT = "input: type filter hook input priority 0"
FORWARD = "forward: type filter hook forward priority 0"
NAT = "table ip nat {\nchain pre {\ntype nat hook prerouting priority -100\ntcp dport 80 dnat to 10.0.0.9\n}\n}\n"


def _both(*rules: str) -> tuple[str, str]:
    """The same rules in an input and a forward chain (so only the rules decide)."""
    return (f"{INPUT}; " + "; ".join(rules), f"{FORWARD}; " + "; ".join(rules))


# --- verdicts ---------------------------------------------------------------------------------

@pytest.mark.host
def test_a_source_drop_on_input_and_forward_is_offloaded_with_its_counter_and_log(netns):
    netns.load(table(f"{INPUT}; ip saddr @s counter drop", f"{FORWARD}; ip saddr @s log prefix \"bl \" drop"))
    assert verdict_for(netns.ruleset(), "inet", "t", "s") == Verdict(frozenset({SOURCE}))
    assert netns.source("inet", "t", "s").verdict() == Verdict(frozenset({SOURCE}))


@pytest.mark.host
def test_an_ipv6_destination_drop_in_an_ip6_prerouting_chain_covers_both_paths(netns):
    netns.load(table("pre: type filter hook prerouting priority -150; ip6 daddr @s6 drop",
                     sets="set s6 { type ipv6_addr; }", family="ip6"))
    assert verdict_for(netns.ruleset(), "ip6", "t", "s6") == Verdict(frozenset({DESTINATION}))


@pytest.mark.host
def test_a_set_dropped_by_source_and_destination_offloads_both_unless_dnat_rewrites_destinations(netns):
    netns.load(table(f"{INPUT}; ip saddr @s drop; ip daddr @s drop", f"{FORWARD}; ip daddr @s drop; ip saddr @s drop",
                     family="ip"))
    assert verdict_for(netns.ruleset(), "ip", "t", "s") == Verdict(frozenset({SOURCE, DESTINATION}))
    netns.load(NAT)
    assert verdict_for(netns.ruleset(), "ip", "t", "s") == Verdict(frozenset({SOURCE}))


@pytest.mark.host
def test_rules_of_the_other_ip_family_cannot_stop_the_sets_packets(netns):
    ipv4_only = ("ip saddr 192.0.2.0/24 accept", "meta nfproto ipv4 reject", "icmp type echo-request accept")
    netns.load(table(*_both(*ipv4_only, "ip6 saddr @s6 drop"),
                     sets="set s6 { type ipv6_addr; }"))
    assert verdict_for(netns.ruleset(), "inet", "t", "s6") == Verdict(frozenset({SOURCE}))
    netns.nft("insert", "rule", "inet", "t", "forward", "ip6 saddr 2001:db8::/32 accept")
    assert "(an accept) comes before the drop" in refusal(netns.ruleset(), "inet", "t", "s6")


@pytest.mark.host
def test_a_guest_that_forwards_nothing_needs_the_drop_on_input_only(netns):
    netns.load(table(f"{INPUT}; ip saddr @s drop"))
    assert verdict_for(netns.ruleset(), "inet", "t", "s", forwarding=False) == Verdict(frozenset({SOURCE}))
    assert "not on the forward path" in refusal(netns.ruleset(), "inet", "t", "s")
    netns.nft("flush", "ruleset")
    netns.load(table(f"{FORWARD}; ip saddr @s drop"))
    assert "addressed to it" in refusal(netns.ruleset(), "inet", "t", "s", forwarding=False)


def _verdict_inside(netns, forwarding: str) -> str:
    """``mbctl follow nft``'s source judged inside the namespace with the guest's
    ip_forward set to ``forwarding``, as the follower judges it there (None: read it)."""
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw", f"net.ipv4.ip_forward={forwarding}"],
                   check=True, timeout=30)
    program = ("from mbvisor.guest.follow.nft import NftSetSource\n"
               "from mbvisor.guest.follow.source import NotOffloadable\n"
               "try:\n    print(NftSetSource('inet', 't', 's', forwarding=None).verdict())\n"
               "except NotOffloadable as refusal:\n    print('refused:', refusal)\n")
    done = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", program], check=True,
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


@pytest.mark.host
def test_the_guest_s_own_forwarding_switch_decides_whether_the_forward_path_must_drop(netns):
    netns.load(table(f"{INPUT}; ip saddr @s drop"))
    assert _verdict_inside(netns, "0") == str(Verdict(frozenset({SOURCE})))
    assert "not on the forward path" in _verdict_inside(netns, "1")


def test_an_unreadable_forwarding_switch_counts_as_forwarding(tmp_path):
    (tmp_path / "proc/sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "proc/sys/net/ipv4/ip_forward").write_text("0\n")
    assert guest_forwards("ipv4_addr", str(tmp_path)) is False
    assert guest_forwards("ipv6_addr", str(tmp_path)) is True  # no such file: the stricter verdict


REFUSALS = {
    "set missing": (table(*_both("ip saddr @s drop")), "nosuch", "was not found"),
    "concatenation": (table(*_both("ip saddr . tcp dport @c drop"), sets="set c { type ipv4_addr . inet_service; }"),
                      "c", "concatenations of ipv4_addr and inet_service"),
    "ports": (table(*_both("tcp dport @p drop"), sets="set p { type inet_service; }"), "p", "type is inet_service"),
    "no drop rule": (table(*_both("ip saddr @s counter")), "s", "no rule drops"),
    "also tcp dport 22": (table(*_both("tcp dport 22 ip saddr @s drop")), "s", "also matches tcp dport"),
    "accept first": (table(f"{INPUT}; ct state established,related accept; ip saddr @s drop",
                           f"{FORWARD}; ip saddr @s drop"),
                     "s", "(an accept) comes before the drop"),
    "jump first": (table(f"{INPUT}; jump other; ip saddr @s drop", f"{FORWARD}; ip saddr @s drop", "other: "),
                   "s", "(a jump to chain other, which may accept) comes before"),
    "goto first": (table(*_both("goto other", "ip saddr @s drop"), "other: "), "s", "(a goto to chain other"),
    "reject first": (table(*_both("tcp dport 23 reject", "ip saddr @s drop")), "s", "(a reject) comes before"),
    "reject verdict": (table(*_both("ip saddr @s reject")), "s", "rejects these addresses"),
    "verdict map first": (table(*_both("ip saddr vmap { 192.0.2.1 : accept }", "ip saddr @s drop")), "s",
                          "(a verdict map) comes before"),
    "rewrite first": (table(*_both("ip saddr set 192.0.2.9", "ip saddr @s drop")), "s", "(a rewrite of ip saddr)"),
    "return first": (table(*_both("return", "ip saddr @s drop")), "s", "(a return to the policy)"),
    "input only": (table(f"{INPUT}; ip saddr @s drop"), "s", "dropped on the input path but not on the forward path"),
    "forward only": (table(f"{FORWARD}; ip saddr @s drop"), "s", "not on the input path"),
    "update from the packet path": (
        table(*_both("tcp dport 22 update @d { ip saddr }", "ip saddr @d drop"),
              sets="set d { type ipv4_addr; flags dynamic, timeout; timeout 1m; }"), "d", "updates the set"),
    "add from the packet path": (table(*_both("ip saddr @s drop"), "other: tcp dport 22 add @s { ip saddr }",
                                       sets="set s { type ipv4_addr; flags dynamic; }"),
                                 "s", "updates the set from the packet path"),
    "negated": (table(*_both("ip saddr != @s drop")), "s", "NOT in the set"),
    "conntrack address": (table(*_both("ct original ip saddr @s drop")), "s", "looks the set up with ct ip saddr"),
    "only in a jumped-to chain": (table(*_both("jump blocklist"), "blocklist: ip saddr @s drop"), "s",
                                  "is not a base chain"),
    "only on output": (table("out: type filter hook output priority 0; ip daddr @s drop"), "s",
                       "a filter chain on the output hook"),
    "dnat": (table(*_both("ip daddr @s drop"), "nat: type nat hook prerouting priority -100; dnat ip to 10.0.0.9"),
             "s", "dnat/redirect rule"),
    "snat on input": (table(*_both("ip saddr @s drop"), "in: type nat hook input priority 100; snat ip to 10.9.9.9"),
                      "s", "snat rule on the input hook"),
}


@pytest.mark.host
@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_each_refusal_names_its_reason(netns, case):
    script, set_name, expected = REFUSALS[case]
    netns.load(script)
    assert expected in refusal(netns.ruleset(), "inet", "t", set_name)


@pytest.mark.host
def test_the_source_refuses_through_the_real_nft_too(netns):
    netns.load(table(f"{INPUT}; ip saddr @s reject"))
    with pytest.raises(NotOffloadable, match="rejects these addresses"):
        netns.source("inet", "t", "s").verdict()


def test_families_other_than_ip_ip6_and_inet_are_refused():
    assert "not ip, ip6 or inet" in refusal({"nftables": []}, "netdev", "t", "s")


# --- elements ---------------------------------------------------------------------------------

@pytest.mark.host
def test_addresses_prefixes_and_ranges_become_canonical_networks(netns):
    netns.load(table(sets="set s { type ipv4_addr; flags interval; elements = { 10.0.0.1, 10.1.0.0/24, "
                          "10.2.0.5-10.2.0.20 } }\n"
                          "set s6 { type ipv6_addr; flags interval; elements = { 2001:db8::1, 2001:db8:1::/48, "
                          "2001:db8:2::1-2001:db8:2::4 } }"))
    found = elements(json.loads(netns.nft("-j", "list", "set", "inet", "t", "s")), now=0.0)
    assert found == dict.fromkeys(["10.0.0.1", "10.1.0.0/24", "10.2.0.5", "10.2.0.6/31", "10.2.0.8/29",
                                   "10.2.0.16/30", "10.2.0.20"])
    found6 = netns.source("inet", "t", "s6").snapshot()
    assert found6 == dict.fromkeys(["2001:db8::1", "2001:db8:1::/48", "2001:db8:2::1", "2001:db8:2::2/127",
                                    "2001:db8:2::4"])
    for network in [*found, *found6]:
        assert fields.IP_ENDPOINT.parse(network) == network


@pytest.mark.host
def test_elements_with_a_timeout_carry_their_expiry(netns):
    netns.load(table(sets="set s { type ipv4_addr; flags timeout; timeout 10m; elements = { 10.0.0.1 timeout 1h, "
                          "10.0.0.2 } }\nset n { type ipv4_addr; flags timeout; elements = { 10.0.0.3 } }"))
    found = elements(json.loads(netns.nft("-j", "list", "set", "inet", "t", "s")), now=1000.0)
    assert 1000 + 3590 <= found["10.0.0.1"] <= 1000 + 3600
    assert 1000 + 590 <= found["10.0.0.2"] <= 1000 + 600  # the set's own timeout
    assert netns.source("inet", "t", "n").snapshot() == {"10.0.0.3": None}


def test_an_element_that_is_no_address_is_not_understood():
    listed = {"nftables": [{"set": {"family": "inet", "name": "p", "table": "t", "type": "inet_service",
                                    "elem": [22]}}]}
    with pytest.raises(SourceError, match="22 not understood"):
        elements(listed)


# --- the monitor ------------------------------------------------------------------------------

@pytest.fixture
def watched(netns):
    """A watch on set inet t s (not used by any rule, so it can be deleted) and the namespace."""
    netns.load(table(f"{INPUT}; ip saddr @s drop", sets="set s { type ipv4_addr; flags interval, timeout; }\n"
                                                      "set other { type ipv4_addr; }"))
    watch = netns.source("inet", "t", "s").watch()
    yield watch, netns
    watch.close()


@pytest.mark.host
def test_element_additions_and_deletions_are_changes(watched):
    watch, netns = watched
    assert watch.poll_interval is None
    netns.nft("add", "element", "inet", "t", "s", "{ 10.9.0.1, 10.9.1.0/24, 10.9.2.4-10.9.2.7 }")
    assert collect(watch, 3) == [Change(True, "10.9.0.1"), Change(True, "10.9.1.0/24"), Change(True, "10.9.2.4/30")]
    netns.nft("delete", "element", "inet", "t", "s", "{ 10.9.1.0/24 }")
    assert collect(watch, 1) == [Change(False, "10.9.1.0/24")]
    before = time.monotonic()
    netns.nft("add", "element", "inet", "t", "s", "{ 10.9.3.3 timeout 30s }")
    (added,) = collect(watch, 1)
    assert added.adding and added.network == "10.9.3.3" and before + 29 <= added.expires_at <= time.monotonic() + 30


@pytest.mark.host
def test_a_flush_is_one_deletion_per_element(watched):
    watch, netns = watched
    netns.nft("add", "element", "inet", "t", "s", "{ 10.9.0.1, 10.9.1.0/24 }")
    collect(watch, 2)
    netns.nft("flush", "set", "inet", "t", "s")
    assert sorted(collect(watch, 2)) == [Change(False, "10.9.0.1"), Change(False, "10.9.1.0/24")]


@pytest.mark.host
def test_other_sets_and_tables_are_ignored(watched):
    watch, netns = watched
    netns.nft("add", "element", "inet", "t", "other", "{ 10.8.0.1 }")
    netns.load(table(sets="set s { type ipv4_addr; elements = { 10.8.0.2 } }", family="ip"))  # same names
    netns.nft("add", "element", "inet", "t", "s", "{ 10.9.9.9 }")  # the sentinel: events arrive in order
    assert collect(watch, 1) == [Change(True, "10.9.9.9")]


@pytest.mark.host
def test_rules_and_the_set_itself_changing_mean_a_resync(watched):
    watch, netns = watched
    netns.nft("add", "rule", "inet", "t", "input", "tcp dport 22 accept")
    netns.nft("delete", "set", "inet", "t", "other")  # another set: ignored
    netns.load(table(f"{FORWARD}; ip saddr @s2 drop", sets="set s2 { type ipv4_addr; }").replace("inet t", "inet u"))
    netns.nft("flush", "chain", "inet", "t", "input")  # deletes its two rules
    reported = [item.reason for item in collect(watch, 3)]
    assert reported == [f"nft reported '{event}' in table inet t: the verdict or the set may differ"
                        for event in ("add rule", "delete rule", "delete rule")]
    netns.nft("delete", "set", "inet", "t", "s")
    netns.nft("add", "set", "inet", "t", "s", "{ type ipv4_addr; }")
    assert [item.reason.split("'")[1] for item in collect(watch, 2)] == ["delete set", "add set"]


@pytest.mark.host
def test_a_nat_rule_in_another_table_means_a_resync(watched):
    watch, netns = watched
    netns.load(NAT)
    netns.nft("add", "element", "inet", "t", "s", "{ 10.9.9.9 }")
    assert collect(watch, 2) == [Resync("a NAT rule was added in table ip nat"), Change(True, "10.9.9.9")]


@pytest.mark.host
def test_what_the_monitor_says_when_an_element_expires(watched):
    """Linux 6.18 says nothing (the module docstring): the follower schedules the removal."""
    watch, netns = watched
    source = netns.source("inet", "t", "s")
    netns.nft("add", "element", "inet", "t", "s", "{ 10.9.7.7 timeout 2s }")
    assert collect(watch, 1)[0].network == "10.9.7.7"
    assert source.snapshot()["10.9.7.7"] <= time.monotonic() + 2
    seen, deadline = [], time.monotonic() + 10
    while "10.9.7.7" in source.snapshot():
        assert time.monotonic() < deadline, "the element did not expire"
        if select.select([watch], [], [], 0.1)[0]:
            seen += watch.changes()
    netns.nft("add", "element", "inet", "t", "s", "{ 10.9.9.9 }")
    seen += collect(watch, 1)
    assert seen in ([Change(True, "10.9.9.9")], [Change(False, "10.9.7.7"), Change(True, "10.9.9.9")])


def test_a_monitor_stream_is_read_in_whole_lines_and_its_end_is_an_error():
    event = {"add": {"element": {"family": "inet", "table": "t", "name": "s", "elem": {"set": ["10.0.0.1"]}}}}
    line = json.dumps(event)
    script = f"printf '%s' '{line[:20]}'; sleep 0.2; printf '%s\\n' '{line[20:]}'"
    writer = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, bufsize=0)
    watch = NftMonitorWatch(writer, "inet", "t", "s")
    try:
        assert collect(watch, 1) == [Change(True, "10.0.0.1")]
        with pytest.raises(SourceError, match="nft monitor ended"):
            collect(watch, 1)
    finally:
        watch.close()


@pytest.mark.parametrize(("line", "expected"), [
    ("", []),
    ("# Cannot set up netlink receive socket buffer size to 16777216 bytes, falling back to 212992 bytes", []),
    ("# ERROR: We lost some netlink events!", [Resync("nft monitor lost events")]),
])
def test_nft_remarks_in_the_monitor(line, expected):
    assert parse_monitor_line(line, "inet", "t", "s", 0.0) == expected


@pytest.mark.parametrize("line", ["Error: Operation not permitted", "# ERROR: No buffer space available",
                                  '{"add": {"element": {"family": "inet", "table": "t", "name": "s"}}}', "[1, 2]"])
def test_monitor_lines_not_understood_are_errors(line):
    with pytest.raises(SourceError):
        parse_monitor_line(line, "inet", "t", "s", 0.0)


# --- the shell's errors -----------------------------------------------------------------------

@pytest.mark.host
def test_a_missing_nft_a_missing_set_and_a_monitor_that_cannot_start_are_source_errors(netns):
    with pytest.raises(SourceError, match="cannot run /nonexistent/nft"):
        NftSetSource("inet", "t", "s", nft="/nonexistent/nft").snapshot()
    with pytest.raises(SourceError, match="list set inet t s failed: Error: No such file or directory"):
        netns.source("inet", "t", "s").snapshot()
    with pytest.raises(SourceError, match="nft monitor did not start listening"):
        NftSetSource("inet", "t", "s", nft=["false"]).watch()


# --- fail2ban ---------------------------------------------------------------------------------

# fail2ban's own action code, run by the system Python that has fail2ban: it starts the action
# (table, chain, sets and rules) and bans the addresses, with the namespace's nft.
FAIL2BAN = r"""
import json, sys
from fail2ban.client.actionreader import ActionReader
from fail2ban.server.action import CommandAction
from fail2ban.server.actions import Actions
from fail2ban.server.ipdns import IPAddr
from fail2ban.server.ticket import BanTicket
action_file, nft, options, addresses = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
reader = ActionReader(action_file, "sshd", {**options, "nftables": nft}, share_config={}, basedir="/etc/fail2ban")
assert reader.read(), action_file
reader.getOptions({})
((_, _, _, name, settings),) = [command for command in reader.convert() if command[0] == "multi-set"]
action = CommandAction(None, name)
for key, value in settings:
    action[key] = value
action.start()
for address in addresses:
    action.ban(Actions.ActionInfo(BanTicket(IPAddr(address))))
"""

FAIL2BAN_CASES = {
    "nftables (default: ssh port, reject)": ("nftables", {}, "rejects these addresses"),
    "nftables, blocktype=drop": ("nftables", {"blocktype": "drop"}, "also matches tcp dport"),
    "nftables-allports, blocktype=drop": ("nftables-allports", {"blocktype": "drop"}, "also matches meta l4proto"),
    "nftables, type=custom, blocktype=drop": ("nftables", {"type": "custom", "blocktype": "drop"},
                                              "not on the forward path"),
    "nftables, type=custom, blocktype=drop, chain_hook=prerouting": (
        "nftables", {"type": "custom", "blocktype": "drop", "chain_hook": "prerouting"}, None),
}


@pytest.mark.host
@pytest.mark.parametrize("case", FAIL2BAN_CASES, ids=list(FAIL2BAN_CASES))
def test_fail2ban_rulesets(netns, case):
    action_file, options, expected = FAIL2BAN_CASES[case]
    subprocess.run(["/usr/bin/python3", "-c", FAIL2BAN, action_file, " ".join(netns.nft_argv), json.dumps(options),
                    "192.0.2.1", "2001:db8::1"], check=True, timeout=60)
    ruleset = netns.ruleset()
    for set_name, banned in (("addr-set-sshd", "192.0.2.1"), ("addr6-set-sshd", "2001:db8::1")):
        assert netns.source("inet", "f2b-table", set_name).snapshot() == {banned: None}
        if expected is None:
            assert verdict_for(ruleset, "inet", "f2b-table", set_name) == Verdict(frozenset({SOURCE}))
        else:
            assert expected in refusal(ruleset, "inet", "f2b-table", set_name)
    if options.get("type") == "custom":  # on the input hook: offloadable where the guest forwards nothing
        offloaded = verdict_for(ruleset, "inet", "f2b-table", "addr-set-sshd", forwarding=False)
        assert offloaded == Verdict(frozenset({SOURCE}))


# --- rulesets whose drops the guest does not make as the switch would --------------------------

@pytest.mark.host
def test_nft_a_dormant_table_drops_nothing_so_its_set_is_not_offloaded(netns):
    """``flags dormant``: the table's chains are on no hook and the guest drops nothing, so
    the switch must not drop the set either.  (nft 1.0.6's JSON prints the table's flags
    wrongly: the text listing is read for them.)"""
    netns.load("""table inet filter {
        flags dormant
        set bl { type ipv4_addr; flags interval; }
        chain prerouting { type filter hook prerouting priority -150; policy accept; ip saddr @bl drop; }
    }""")
    source = netns.source("inet", "filter", "bl", forwarding=True)
    with pytest.raises(NotOffloadable, match="is dormant"):
        source.verdict()


@pytest.mark.host
def test_nft_an_address_rewritten_by_an_earlier_chain_is_not_offloaded(netns):
    """Stateless NAT (``ip saddr set``) in a chain before the drop's changes the address the
    drop looks up: the guest lets 10.66.0.1 through as 192.0.2.1, so the switch, which sees
    10.66.0.1, must not drop it."""
    netns.load("""table ip t {
        set bl { type ipv4_addr; flags interval; elements = { 10.66.0.1 } }
        chain early { type filter hook prerouting priority -300; policy accept; ip saddr 10.66.0.1 ip saddr set 192.0.2.1; }
        chain prerouting { type filter hook prerouting priority -150; policy accept; ip saddr @bl drop; }
    }""")
    with pytest.raises(NotOffloadable, match="rewrites source addresses"):
        verdict_for(netns.ruleset(), "ip", "t", "bl", forwarding=True)


# --- CrowdSec's firewall bouncer (nftables mode) ---------------------------------------------

CROWDSEC_PREROUTING = """
table ip crowdsec {
    set crowdsec-blacklists { type ipv4_addr; flags timeout; }
    chain mbvisor-prerouting { type filter hook prerouting priority -150; policy accept;
        ip saddr @crowdsec-blacklists drop
    }
}
table ip6 crowdsec6 {
    set crowdsec6-blacklists { type ipv6_addr; flags timeout; }
    chain mbvisor-prerouting { type filter hook prerouting priority -150; policy accept;
        ip6 saddr @crowdsec6-blacklists drop
    }
}
"""
CROWDSEC_OWN = """
table ip crowdsec {
    set crowdsec-blacklists { type ipv4_addr; flags timeout; }
    chain crowdsec-chain { type filter hook input priority 0; policy accept; ip saddr @crowdsec-blacklists drop; }
}
"""


@pytest.mark.host
def test_crowdsecs_sets_with_the_documented_prerouting_drops_are_offloaded_with_their_timeouts(netns):
    """docs/adapters.md's CrowdSec recipe (``set-only: true``, drops on prerouting in the
    sets' own tables): both families offloaded, a decision's timeout carried as expiry."""
    netns.load(CROWDSEC_PREROUTING)
    assert verdict_for(netns.ruleset(), "ip", "crowdsec", "crowdsec-blacklists") == Verdict(frozenset({SOURCE}))
    assert verdict_for(netns.ruleset(), "ip6", "crowdsec6", "crowdsec6-blacklists") == Verdict(frozenset({SOURCE}))
    netns.nft("add", "element", "ip", "crowdsec", "crowdsec-blacklists", "{ 192.0.2.66 timeout 4h }")
    (address, expires_at), = netns.source("ip", "crowdsec", "crowdsec-blacklists").snapshot().items()
    assert address == "192.0.2.66" and 3 * 3600 < expires_at - time.monotonic() <= 4 * 3600


@pytest.mark.host
def test_the_bouncers_own_input_chain_is_offloaded_only_in_a_guest_that_forwards_nothing(netns):
    netns.load(CROWDSEC_OWN)
    assert "not on the forward path" in refusal(netns.ruleset(), "ip", "crowdsec", "crowdsec-blacklists")
    assert verdict_for(netns.ruleset(), "ip", "crowdsec", "crowdsec-blacklists",
                       forwarding=False) == Verdict(frozenset({SOURCE}))
