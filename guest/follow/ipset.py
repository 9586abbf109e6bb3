"""Following an ipset the guest's iptables rules drop (fail2ban's ``iptables-ipset`` shape).

Only ``hash:ip`` and ``hash:net`` sets hold what one switch filter drops: an address or a
network.  A ``nomatch`` element (an exception carved out of a network) cannot be one drop
filter, and a ``bitmask`` makes a member a non-contiguous pattern, so both are refused.

The verdict reads ``iptables-save`` (``ip6tables-save`` for an inet6 set; the kernel refuses a
set in the other family's rules).  The switch drops every packet sent to the middlebox whose
address is in the set, whichever path it would take inside, so each of the filter table's
INPUT and FORWARD chains must drop the set's members before anything could let them through:

* the set's drop, ``-m set --match-set NAME src -j DROP`` (or ``dst``) with no other match
  but a comment, must come before any rule that accepts, rejects, returns or jumps.  Rules
  that only log or drop other packets may come first, and so may ``-i lo`` rules (loopback
  traffic never crosses the switch);
* a chain with policy DROP in which nothing is let through before its end drops the members
  anyway and needs no rule;
* FORWARD counts only when the guest forwards (``net.ipv4.ip_forward``, or
  ``net.ipv6.conf.all.forwarding``): otherwise the kernel drops what is not for the guest.

Both chains must match the same address field: one switch filter cannot tell the paths apart.

ipset has no change notification, so the watch is polled.  What one poll costs (this machine:
kernel 6.18, ipset 7.17, iptables 1.8.9; CPU of the follower plus its children, measured with
``time.process_time`` and ``resource.getrusage(RUSAGE_CHILDREN)``):

* ``ipset save NAME`` and parsing it, 2 elements: 1.2 ms in a tight loop (0.3 in the follower,
  the rest in ipset; a fork and exec of ``/bin/true`` alone is 0.95 ms), about 2 ms when
  the follower wakes from sleep with cold caches.  10,000 elements: 22 ms (13 of them
  parsing), so a set of n elements costs about 2 ms + 2 us * n a poll.
* ``ipset list -t NAME`` (the header and its "Number of entries"): 1.4 ms, no cheaper than
  saving a small set, and blind to one element replacing another: ipset keeps no generation.
* the verdict's check, ``iptables-save`` and the forwarding switch: 3.7 ms, so it runs only
  every ``rules_interval``, to notice an edit of the rules that changes the verdict.

Reading the set over netlink in-process would save the fork and exec, but needs a netlink
attribute parser of our own and would not run in another namespace through ``argv_prefix``.
Idle, a loop that sleeps ``poll_interval`` then does what the follower does at a poll (the
watch's changes, the verdict, the snapshot: one ``ipset save``) on a 2-element set measured
0.136 % of a core with a 2 s poll and a 15 s rule check, and 0.065 % with 4 s and 30 s (180 s
each): the defaults, under the 0.1 % the follower may take when idle.
A ban reaches the switch within 4 s.  For a large set, lengthen ``poll_interval`` (10,000
elements need about 25 s for the same budget).
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import time
from typing import Callable, NamedTuple, Sequence

from .. import fields as kinds
from ..errors import InvalidValueError
from .source import DESTINATION, SOURCE, NotOffloadable, Resync, SourceError, Verdict

DEFAULT_POLL_INTERVAL = 4.0
DEFAULT_RULES_INTERVAL = 30.0
OFFLOADABLE_TYPES = ("hash:ip", "hash:net")
DIRECTIONS = {"src": SOURCE, "dst": DESTINATION}
# Targets that let a packet continue to the next rule: ordering around them changes nothing.
CONTINUING_TARGETS = frozenset({None, "LOG", "NFLOG", "TCPMSS", "MARK", "CONNMARK", "SET", "AUDIT"})
# Per-element extensions ipset prints that do not change membership, each with its value.
_ELEMENT_VALUES = frozenset({"packets", "bytes", "skbmark", "skbprio", "skbqueue"})
_QUOTED = re.compile(r'"[^"]*"')  # ipset forbids '"' inside a comment


class SetHeader(NamedTuple):
    """The ``create`` line of ``ipset save``: what the set's elements mean."""

    name: str
    type: str
    family: str  # "inet" or "inet6"
    netmask: int | None  # hash:ip with netmask: each element stands for its whole network


def read_header(save_text: str) -> SetHeader:
    """Raises NotOffloadable for a set whose elements are not addresses or networks."""
    for line in save_text.splitlines():
        words = line.split()
        if words[:1] != ["create"] or len(words) < 3:
            continue
        name, set_type, options = words[1], words[2], words[3:]
        if set_type not in OFFLOADABLE_TYPES:
            raise NotOffloadable(f"set {name} is {set_type}; only hash:ip and hash:net sets hold plain"
                                 " addresses or networks that a switch filter can drop")
        if "bitmask" in options:
            raise NotOffloadable(f"set {name} has a bitmask, so its members are not networks"
                                 " that a switch filter can match")
        family = options[options.index("family") + 1] if "family" in options else "inet"
        netmask = int(options[options.index("netmask") + 1]) if "netmask" in options else None
        return SetHeader(name, set_type, family, netmask)
    raise SourceError("ipset printed no 'create' line for the set")


def parse_save(save_text: str, now: float) -> dict[str, float | None]:
    """``ipset save NAME`` to {canonical address or network: monotonic expiry or None}.
    ``now`` is the monotonic time the text was read: ipset prints the whole seconds left, so
    an element may leave the switch up to a second early, while the middlebox still drops it."""
    header = read_header(save_text)
    full_length = 32 if header.family == "inet" else 128
    suffix = "" if header.netmask in (None, full_length) else f"/{header.netmask}"
    networks: dict[str, float | None] = {}
    for line in save_text.splitlines():
        if not line.startswith("add "):
            continue
        words = (_QUOTED.sub("", line) if '"' in line else line).split()
        element, options = words[2], words[3:]
        expires_at = None
        index = 0
        while index < len(options):
            option = options[index]
            if option == "nomatch":
                raise NotOffloadable(f"set {header.name} has the nomatch element {element}: an exception"
                                     " inside a network cannot be one switch drop filter")
            if option == "timeout":
                seconds = int(options[index + 1])
                expires_at = now + seconds if seconds else None
            elif option not in _ELEMENT_VALUES and option != "comment":
                raise SourceError(f"ipset printed '{option}' for {element} in set {header.name}; not understood")
            index += 1 if option == "comment" else 2  # the comment's quoted text was removed
        try:
            networks[_canonical(element + suffix)] = expires_at
        except InvalidValueError as error:
            raise SourceError(f"set {header.name} holds '{element}': {error}") from None
    return networks


@functools.lru_cache(maxsize=65536)  # ipset's default maxelem; a poll re-reads the same elements
def _canonical(element: str) -> str:
    return kinds.IP_ENDPOINT.parse(element)


class _Rule(NamedTuple):
    number: int  # position in its chain, from 1, as `iptables -L --line-numbers` counts
    text: str
    matches: list[str]
    target: str | None
    uses_set: bool
    updates_set: bool  # -j SET --add-set/--del-set of the set: changed from the packet path


def _read_rules(save_text: str, set_name: str) -> tuple[dict[str, str], dict[tuple[str, str], list[_Rule]]]:
    """The filter table's chain policies, and every table's rules by (table, chain)."""
    policies: dict[str, str] = {}
    rules: dict[tuple[str, str], list[_Rule]] = {}
    table = ""
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and table == "filter":
            name, policy = line[1:].split()[:2]
            policies[name] = policy
        elif line.startswith("-A "):
            words = shlex.split(line)
            body = words[2:]
            target_at = next((i for i, word in enumerate(body) if word in ("-j", "-g")
                              and (i == 0 or body[i - 1] != "--comment")), len(body))
            target = body[target_at + 1] if target_at < len(body) - 1 else None
            uses_set = any(word == "--match-set" and body[i + 1] == set_name for i, word in enumerate(body[:-1]))
            updates_set = any(word in ("--add-set", "--del-set") and body[i + 1] == set_name
                              for i, word in enumerate(body[:-1]))
            chain_rules = rules.setdefault((table, words[1]), [])
            chain_rules.append(_Rule(len(chain_rules) + 1, line, body[:target_at], target, uses_set, updates_set))
    return policies, rules


def _without_comment(matches: list[str]) -> list[str]:
    if "--comment" not in matches:
        return matches
    at = matches.index("--comment") - 2  # "-m comment --comment TEXT"
    return matches[:at] + matches[at + 4:]


def _only_loopback(matches: list[str]) -> bool:
    at = matches.index("-i") if "-i" in matches else -1
    return at >= 0 and matches[at + 1] == "lo" and (at == 0 or matches[at - 1] != "!")


def _drop_direction(rule: _Rule, set_name: str, where: str) -> str:
    """The field the set's drop matches; NotOffloadable (naming every problem) if it is
    not a plain drop of the set's members."""
    matches = _without_comment(rule.matches)
    at = matches.index("--match-set")
    flags = matches[at + 2] if at + 2 < len(matches) else ""
    negated = matches[at - 1] == "!"
    others = matches[:at - (3 if negated else 2)] + matches[at + 3:]  # all but "-m set [!] --match-set NAME FLAGS"
    problems = []
    if negated:
        problems.append("negates the match (it drops what is not in the set)")
    if flags not in DIRECTIONS:
        problems.append(f"matches the set by '{flags}', two addresses; a switch filter matches one")
    if rule.target == "REJECT":
        problems.append("rejects instead of dropping: the middlebox answers, the switch would drop silently")
    elif rule.target != "DROP":
        problems.append(f"ends in {rule.target}, not DROP")
    if others:
        problems.append(f"also matches '{' '.join(others)}', so the switch would drop more than it does")
    if problems:
        raise NotOffloadable(f"{where} rule {rule.number} ({rule.text}) uses set {set_name} but "
                             + "; it ".join(problems))
    return DIRECTIONS[flags]


def _what_it_does(target: str | None) -> str:
    if target == "ACCEPT":
        return "accepts packets"
    if target == "REJECT":
        return "rejects packets (the middlebox answers them)"
    if target == "RETURN":
        return "returns packets to the chain's policy"
    return f"hands packets to {target}, which may accept them"


def _chain_direction(where: str, policy: str | None, rules: list[_Rule], set_name: str, elsewhere: str) -> str | None:
    """The field by which the chain drops the set's members; None if its policy does."""
    for rule in rules:
        if rule.uses_set and rule.target not in CONTINUING_TARGETS:
            return _drop_direction(rule, set_name, where)
        if rule.target in CONTINUING_TARGETS or rule.target == "DROP" or _only_loopback(rule.matches):
            continue
        raise NotOffloadable(f"{where} rule {rule.number} ({rule.text}) {_what_it_does(rule.target)} before any"
                             f" drop of set {set_name}; the switch would drop those packets instead")
    if policy == "DROP":
        return None
    raise NotOffloadable(f"{where} has no rule dropping set {set_name}'s members and its policy accepts them"
                         + elsewhere)


# nat PREROUTING runs before the filter table: what these targets rewrite, the filter sees rewritten.
_REWRITES_BEFORE_FILTER = {"DNAT": DESTINATION, "REDIRECT": DESTINATION, "NETMAP": DESTINATION}


def _check_packet_path(tool: str, rules: dict[tuple[str, str], list[_Rule]], set_name: str) -> set[str]:
    """NotOffloadable if a rule changes the set from the packet path; else the fields that
    NAT rewrites before the filter sees them."""
    rewritten = set()
    for (table, chain), chain_rules in rules.items():
        for rule in chain_rules:
            if rule.updates_set:
                raise NotOffloadable(f"{tool} {table} {chain} rule {rule.number} ({rule.text}) changes set {set_name}"
                                     " from the packet path, and the packets the switch drops would no longer "
                                     "refresh it")
            if table == "nat" and chain == "PREROUTING" and rule.target in _REWRITES_BEFORE_FILTER:
                rewritten.add(_REWRITES_BEFORE_FILTER[rule.target])
    return rewritten


def verdict_for(iptables_save_text: str, ip6tables_save_text: str, set_name: str, forwarding: bool = True) -> Verdict:
    """Whether dropping the set's members at the switch keeps what the rules do (the module
    docstring has the rules).  ``forwarding``: the guest routes packets of the set's family,
    so its FORWARD chain counts too."""
    chains = ("INPUT", "FORWARD") if forwarding else ("INPUT",)
    directions: set[str] = set()
    rewritten: set[str] = set()
    used = False
    for tool, text in (("iptables", iptables_save_text), ("ip6tables", ip6tables_save_text)):
        policies, rules = _read_rules(text, set_name)
        places = [f"{table} {chain}" for (table, chain), chain_rules in rules.items()
                  if any(rule.uses_set or rule.updates_set for rule in chain_rules)]
        if not places:
            continue  # a set of the other family: the kernel refuses it in these rules
        used = True
        rewritten |= _check_packet_path(tool, rules, set_name)
        others = [place for place in places if place not in {f"filter {chain}" for chain in chains}]
        elsewhere = f" (the set is used in {', '.join(others)} instead)" if others else ""
        for chain in chains:
            direction = _chain_direction(f"{tool} {chain}", policies.get(chain), rules.get(("filter", chain), []),
                                         set_name, elsewhere)
            if direction is not None:
                directions.add(direction)
    if not used:
        raise NotOffloadable(f"no iptables or ip6tables rule uses set {set_name}")
    if not directions:
        raise NotOffloadable(f"{' and '.join(chains)} {'drop' if forwarding else 'drops'} every packet by policy,"
                             f" so set {set_name} decides nothing")
    if len(directions) > 1:
        raise NotOffloadable(f"INPUT matches set {set_name} by one address and FORWARD by the other;"
                             " one switch filter cannot tell the two paths apart")
    if directions & rewritten:
        raise NotOffloadable(f"a nat PREROUTING rule ({', '.join(sorted(t for t in _REWRITES_BEFORE_FILTER))}) rewrites "
                             f"destination addresses before the filter matches set {set_name} by them, so the switch, "
                             "which sees them unrewritten, would drop other packets")
    return Verdict(frozenset(directions))


def run_tool(argv: Sequence[str]) -> str:
    """A tool's standard output; SourceError with its own words when it fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=30)
    except FileNotFoundError:
        raise SourceError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"'{' '.join(argv)}' did not finish in 30 s") from None
    if done.returncode != 0:
        said = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip()) or "nothing"
        raise SourceError(f"'{' '.join(argv)}' failed with exit status {done.returncode}: {said}")
    return done.stdout


class PolledWatch:
    """The watch of a tool without change events: no descriptor; every ``poll_interval`` the
    follower calls ``changes()`` and then takes a new snapshot.  ``check`` (run by ``changes()``
    at most every ``check_interval`` seconds) returns why the verdict may no longer hold, or
    None; a reason becomes a `Resync`."""

    def __init__(self, poll_interval: float, check: Callable[[], str | None] | None = None,
                 check_interval: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.poll_interval = poll_interval
        self._check, self._check_interval, self._clock = check, check_interval, clock
        self._checked_at = clock()

    def fileno(self) -> None:
        return None

    def changes(self) -> list[Resync]:
        if self._check is None or self._clock() - self._checked_at < self._check_interval:
            return []
        self._checked_at = self._clock()
        try:
            reason = self._check()
        except SourceError as error:
            reason = str(error)
        return [Resync(reason)] if reason else []

    def close(self) -> None:
        self._check = None


class IpsetSource:
    """One ipset, read with the real ``ipset`` and ``iptables-save`` (``argv_prefix``, e.g.
    ``("ip", "netns", "exec", "lab")``, runs them elsewhere).

    The follower judges and reads a polled source at every poll (``verdict()`` then
    ``snapshot()``), so a poll costs one ``ipset save``: the snapshot returns the set the
    verdict just judged, and the rules are read again only every ``rules_interval`` (by the
    verdict or by the watch's check, whichever comes first; the check reports a change that
    matters as a Resync, for a follower that judges only then)."""

    def __init__(self, set_name: str, argv_prefix: Sequence[str] = (), poll_interval: float = DEFAULT_POLL_INTERVAL,
                 rules_interval: float = DEFAULT_RULES_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.set_name, self.description = set_name, f"ipset {set_name}"
        self._prefix, self._clock = tuple(argv_prefix), clock
        self.poll_interval, self.rules_interval = poll_interval, rules_interval
        self._judged: str | None = None  # the `ipset save` text the last verdict read, for the next snapshot
        self._rules: tuple[str, float, Verdict | NotOffloadable] | None = None  # family, read at, outcome

    def verdict(self) -> Verdict:
        self._judged = save_text = self._save()
        parse_save(save_text, self._clock())  # the set's type and elements (nomatch) can refuse it
        outcome = self._rules_outcome(read_header(save_text).family)
        if isinstance(outcome, NotOffloadable):
            raise NotOffloadable(str(outcome))
        return outcome

    def snapshot(self) -> dict[str, float | None]:
        """A set the verdict just refused offloads nothing: {}.  Read afresh, a set that can no
        longer be offloaded (re-created as another type, a nomatch element added) is a
        SourceError: the follower starts again, and its verdict says why."""
        judged, self._judged = self._judged, None
        try:
            return parse_save(judged or self._save(), self._clock())
        except NotOffloadable as error:
            if judged is not None:
                return {}
            raise SourceError(f"{self.description} changed: {error}") from None

    def watch(self) -> PolledWatch:
        return PolledWatch(self.poll_interval, self._rules_changed, self.rules_interval, self._clock)

    def _save(self) -> str:
        return run_tool((*self._prefix, "ipset", "save", self.set_name))

    def _rules_outcome(self, family: str, again: bool = False) -> Verdict | NotOffloadable:
        """The rules' verdict, read again when ``again`` or older than ``rules_interval``."""
        if again or self._rules is None or self._rules[0] != family or \
                self._clock() - self._rules[1] >= self.rules_interval:
            tool, switch = (("iptables-save", "/proc/sys/net/ipv4/ip_forward") if family == "inet" else
                            ("ip6tables-save", "/proc/sys/net/ipv6/conf/all/forwarding"))
            read_at = self._clock()
            rules = run_tool((*self._prefix, tool))
            forwarding = run_tool((*self._prefix, "cat", switch)).strip() != "0"
            try:
                outcome: Verdict | NotOffloadable = verdict_for(*((rules, "") if family == "inet" else ("", rules)),
                                                                self.set_name, forwarding=forwarding)
            except NotOffloadable as refusal:
                outcome = refusal
            self._rules = (family, read_at, outcome)
        return self._rules[2]

    def _rules_changed(self) -> str | None:
        """Why the verdict changed since the rules were last read, or None."""
        if self._rules is None:
            return None
        before = self._rules[2]
        after = self._rules_outcome(self._rules[0], again=True)
        if (type(after), str(after)) == (type(before), str(before)):
            return None
        if isinstance(after, NotOffloadable):
            return f"the rules for {self.description} changed: {after}"
        return f"the rules for {self.description} now let it be offloaded, dropped by {'/'.join(sorted(after.fields))}"
