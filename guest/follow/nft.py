"""Follow an nftables set: is offloading it safe, what is in it, and what changes.

The pure part reads the JSON of ``nft -j`` (libnftables schema, nftables 1.0.6) and is
tested on output captured from the real ``nft``; `NftSetSource` is the thin shell that runs
it.  What was seen with nftables 1.0.6 on Linux 6.18, and what the code relies on:

* ``nft -j monitor`` prints one JSON object per line, flushed per event:
  ``{"add"|"delete": {"element": {"family", "table", "name", "elem": {"set": [ELEMENT]}}}}``
  for element changes (one line per element, even when several are added at once), and
  ``{"add"|"delete": {"table"|"chain"|"rule"|"set": {...}}}`` for the rest.  An ELEMENT is
  ``"10.0.0.1"``, ``{"prefix": {"addr", "len"}}``, ``{"range": [low, high]}`` or
  ``{"elem": {"val": ELEMENT, "timeout": s, "expires": s}}`` (whole seconds, truncated: a
  1.5 s timeout reads 1, so a removal is scheduled early, never late; an element under the
  set's own timeout has ``expires`` only).  A rule's deletion is printed without its set
  lookups (nft cannot decode them any more): rule events only ever mean a `Resync`.
* ``flush set`` is not an event of its own: the monitor prints one element deletion per
  element.  ``auto-merge`` prints the deletion of the old element and the addition of the
  merged range.  Adding an element that is already there prints nothing.
* Expiry is NOT reported: an element added with ``timeout 1s`` left ``nft list set``
  after a second with no event on the monitor.  The follower removes it at ``expires_at``.
* Lost events are a ``# ERROR: We lost some netlink events!`` line on stdout (nftables'
  ``mnl_nft_event_listener``); they become a `Resync`.
* ``nft -j monitor`` joins the event group some milliseconds after it starts: `watch`
  returns only once /proc shows its socket in the group, or a change made between the
  start and the snapshot would be lost (a test that skipped this wait missed events).
* Listings drop implied matches: ``meta nfproto ipv4 reject`` reads as ``reject with icmp``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from .sync import PLAIN_IPV4
from .source import (
    DESTINATION,
    SOURCE,
    Change,
    NotOffloadable,
    Resync,
    SourceError,
    Verdict,
)

_FIELDS = {"saddr": SOURCE, "daddr": DESTINATION}
# For each address type, how rules name the other IP family: the protocols of its payload
# matches and reject types (``ip saddr``, ``reject with icmp``), and its ``meta nfproto``.
_OTHER_FAMILY = {
    "ipv4_addr": (frozenset({"ip6", "icmpv6"}), "ipv6"),
    "ipv6_addr": (frozenset({"ip", "icmp"}), "ipv4"),
}
_HOOKS_SEEN_BY_THE_SWITCH = ("prerouting", "input", "forward")
# Statements that neither end a chain nor change what a later lookup of the addresses sees
# (a mangle of a payload field does: it is checked first), and those that end it.
_HARMLESS = {"match", "counter", "log", "limit", "quota", "drop", "continue", "notrack", "meter", "set", "mangle"}
_ENDS_THE_CHAIN = {"accept": "an accept", "reject": "a reject", "vmap": "a verdict map",
                   "return": "a return to the policy", "queue": "a queue to userspace"}
_NFNLGRP_NFTABLES_BIT = 1 << (7 - 1)  # the multicast group nft monitor joins, in /proc/net/netlink
_SUBSCRIBE_TIMEOUT = 5.0


def _key(statement: dict) -> str:
    return next(iter(statement))


def _describe(expression: Any) -> str:
    """A short nft-like text for what a match or statement looks at (``tcp dport``, ``meta l4proto``)."""
    if isinstance(expression, dict) and len(expression) == 1:
        key, value = next(iter(expression.items()))
        if key == "match":
            return _describe(value["left"])
        if key == "payload":
            return f"{value.get('protocol', 'raw')} {value.get('field', 'payload')}"
        named = isinstance(value, dict) and isinstance(value.get("key"), str)
        return f"{key} {value['key']}" if named else key
    return str(expression)


def _walk(value: Any) -> Iterator[dict]:
    """Every JSON object inside `value` (a rule's expressions nest statements in maps)."""
    if isinstance(value, dict):
        yield value
        for inner in value.values():
            yield from _walk(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _walk(inner)


def _mentions(expressions: list, reference: str) -> bool:
    return any(reference in node.values() for node in _walk(expressions))


def _chain_ender(expressions: list) -> str | None:
    """What in a rule may end the chain for a packet other than dropping it, or None."""
    for statement in expressions:
        key = _key(statement)
        value = statement[key]
        if key in ("jump", "goto"):
            return f"a {key} to chain {value['target']}, which may accept"
        if key == "mangle" and "payload" in value["key"]:
            return f"a rewrite of {_describe(value['key'])}"
        if key in _ENDS_THE_CHAIN:
            return _ENDS_THE_CHAIN[key]
        if key not in _HARMLESS:
            return f"a `{key}` statement this check does not know"
    return None


def _objects(ruleset: dict, kind: str) -> list[dict]:
    try:
        return [item[kind] for item in ruleset["nftables"] if kind in item]
    except (KeyError, TypeError) as error:
        raise SourceError(f"not the JSON of nft -j: {error!r}") from None


def _drop_field(expressions: list, reference: str, where: str) -> tuple[str | None, str | None, bool]:
    """For a rule that uses the set: (the field it drops on, or why not; whether it ends the chain)."""
    lookups = [s for s in expressions if "match" in s and s["match"].get("right") == reference]
    verdict = _key(expressions[-1])
    if verdict == "reject" and lookups:
        return None, (f"{where} rejects these addresses, so the guest answers them with a TCP reset or an "
                      "ICMP error while the switch would drop them silently"), True
    if ender := _chain_ender(expressions):
        return None, f"{where} ({ender}) uses the set before any drop, so the switch would drop what it lets by", True
    if verdict != "drop" or not lookups:
        return None, None, False
    if any(lookup["match"]["op"] == "!=" for lookup in lookups):
        return None, f"{where} drops what is NOT in the set (!=), and the switch can only drop what is in it", False
    others = [s for s in expressions[:-1] if s not in lookups and _key(s) not in ("counter", "log")]
    if len(lookups) > 1 or others:
        extra = ", ".join(_describe(s) for s in (others or lookups[1:]))
        return None, (f"{where} also matches {extra}, so the switch, which would drop on the address alone, "
                      "would drop more"), False
    left = lookups[0]["match"]["left"]
    payload = left.get("payload", {}) if isinstance(left, dict) else {}
    if payload.get("protocol") in ("ip", "ip6") and payload.get("field") in _FIELDS:
        return _FIELDS[payload["field"]], None, False
    return None, (f"{where} looks the set up with {_describe(left)}, not the packet's own source or "
                  "destination address that the switch sees"), False


def _only_for(expressions: list, family: tuple[frozenset[str], str]) -> bool:
    """Whether a rule matches only packets of the given IP family: an inet chain holds IPv4
    and IPv6 rules side by side (fail2ban's does), and one family's cannot stop the other's.
    nft lists ``meta nfproto ipv4 reject`` as a bare ``reject with icmp``, hence the reject."""
    protocols, nfproto = family
    for statement in expressions:
        match = statement.get("match", {})
        left = match.get("left")
        if isinstance(left, dict) and left.get("payload", {}).get("protocol") in protocols:
            return True
        if left == {"meta": {"key": "nfproto"}} and match.get("op") == "==" and match.get("right") == nfproto:
            return True
        if (statement.get("reject") or {}).get("type") in protocols:
            return True
    return False


def _chain_fields(chain: str, rules: list[dict], reference: str, other_family: tuple[frozenset[str], str]
                  ) -> tuple[set[str], list[str]]:
    """The address fields a base chain drops the set's packets on, before anything that
    could let them through (an accept, a jump, a reject); and why it drops on no more."""
    fields: set[str] = set()
    reasons: list[str] = []
    for position, rule in enumerate(rules):
        if _only_for(rule["expr"], other_family):
            continue
        where = f"rule {rule.get('handle')} in chain {chain}"
        if _mentions(rule["expr"], reference):
            field, reason, ends = _drop_field(rule["expr"], reference, where)
            fields |= {field} if field else set()
            reasons += [reason] if reason else []
            if ends:
                break
        elif ender := _chain_ender(rule["expr"]):
            if not fields and any(_mentions(later["expr"], reference) for later in rules[position + 1:]):
                reasons.append(f"{where} ({ender}) comes before the drop, so some of these packets may be let "
                               "through or rejected there, while the switch would drop them all")
            break
    return fields, reasons


def _address_rewrites(expressions: list) -> set[str]:
    """The NAT statements of a rule (they change the addresses later rules see), a payload
    rewrite of an address (stateless NAT: ``ip saddr set ...``) counted as its kind."""
    keys = {_key(node) for node in _walk(expressions) if len(node) == 1} & {"dnat", "redirect", "snat"}
    for node in _walk(expressions):
        payload = node.get("mangle", {}).get("key", {}).get("payload", {}) if isinstance(node.get("mangle"), dict) \
            else {}
        if payload.get("protocol") in ("ip", "ip6") and payload.get("field") in _MANGLED_AS:
            keys.add(_MANGLED_AS[payload["field"]])
    return keys


_MANGLED_AS = {"daddr": "dnat", "saddr": "saddr set"}


def _nat_refusals(ruleset: dict) -> dict[str, str]:
    """Address fields that NAT rewrites before the filter sees them, with the reason: the
    switch matches the addresses as they arrive, before any rewrite."""
    hooks = {(c["family"], c["table"], c["name"]): c.get("hook") for c in _objects(ruleset, "chain")}
    refusals = {}
    for rule in _objects(ruleset, "rule"):
        keys = _address_rewrites(rule["expr"])
        where = f"chain {rule['chain']} of table {rule['family']} {rule['table']}"
        if keys & {"dnat", "redirect"}:
            refusals[DESTINATION] = (f"a dnat/redirect rule ({where}) rewrites destination addresses before the "
                                     "filter, so the switch, which sees them unrewritten, would drop other packets")
        if "snat" in keys and hooks.get((rule["family"], rule["table"], rule["chain"])) == "input":
            refusals[SOURCE] = (f"an snat rule on the input hook ({where}) rewrites source addresses before the "
                                "filter, so the switch, which sees them unrewritten, would drop other packets")
        if "saddr set" in keys:
            refusals[SOURCE] = (f"a rule ({where}) rewrites source addresses (ip saddr set), so the switch, which "
                                "sees them unrewritten, would drop other packets")
    return refusals


def _address_type(ruleset: dict, family: str, table: str, set_name: str) -> str:
    """The set's type, when it holds plain addresses and no rule adds to it from the packet path."""
    if family not in ("ip", "ip6", "inet"):
        raise NotOffloadable(f"family {family} is not ip, ip6 or inet, the only ones whose drops this check reads")
    found = [s for s in _objects(ruleset, "set") if (s["family"], s["table"], s["name"]) == (family, table, set_name)]
    if not found:
        raise NotOffloadable(f"set {family} {table} {set_name} was not found, so there is nothing to offload")
    set_type = found[0]["type"]
    if isinstance(set_type, list):
        raise NotOffloadable(f"its elements are concatenations of {' and '.join(set_type)}, and the switch would "
                             "drop every packet of the address, not only those with the other fields")
    if set_type not in _OTHER_FAMILY:
        raise NotOffloadable(f"its type is {set_type}, not ipv4_addr or ipv6_addr, and the switch filters addresses")
    for rule in _objects(ruleset, "rule"):
        for node in _walk(rule["expr"]) if (rule["family"], rule["table"]) == (family, table) else ():
            if isinstance(node.get("set"), dict) and node["set"].get("set") == f"@{set_name}":
                raise NotOffloadable(f"rule {rule.get('handle')} in chain {rule['chain']} updates the set from the "
                                     "packet path, and the packets the switch drops would no longer refresh it")
    return set_type


def verdict_for(ruleset: dict, family: str, table: str, set_name: str, *, forwarding: bool = True) -> Verdict:
    """Whether dropping the set's addresses at the switch keeps the guest firewall's
    behaviour; raises `NotOffloadable` with a one-sentence reason otherwise.

    The switch drops every packet towards the middlebox whose address is in the set: those
    addressed to it (the guest's input path) and those it routes (forward).  So the set
    must be dropped, silently and unconditionally, on both paths: by a base filter chain
    on ``prerouting`` (both) or on ``input`` and ``forward``.  A guest that routes nothing
    (``forwarding=False``, its caller's knowledge: ``ip_forward`` off) needs only input.
    Other base chains cannot undo a drop (an accept ends only its own chain), so only the
    chain of the drop is read, plus NAT anywhere (it changes the addresses the filter sees).
    Not read: a reject or queue in another base chain that runs before the drop's.
    """
    set_type = _address_type(ruleset, family, table, set_name)
    reference = f"@{set_name}"
    paths: dict[str, set[str]] = {"input": set(), "forward": set()}
    reasons: dict[str, list[str]] = {"input": [], "forward": []}
    elsewhere: list[str] = []
    rules = [r for r in _objects(ruleset, "rule") if (r["family"], r["table"]) == (family, table)]
    for chain in _objects(ruleset, "chain"):
        if (chain["family"], chain["table"]) != (family, table):
            continue
        chain_rules = [r for r in rules if r["chain"] == chain["name"]]
        if chain.get("type") == "filter" and chain.get("hook") in _HOOKS_SEEN_BY_THE_SWITCH:
            fields, why = _chain_fields(chain["name"], chain_rules, reference, _OTHER_FAMILY[set_type])
            for path in ("input", "forward") if chain["hook"] == "prerouting" else (chain["hook"],):
                paths[path] |= fields
                reasons[path] += why
        elif any(_mentions(r["expr"], reference) and _key(r["expr"][-1]) == "drop" for r in chain_rules):
            kind = f"a {chain['type']} chain on the {chain['hook']} hook" if "hook" in chain else "not a base chain"
            elsewhere.append(f"chain {chain['name']}, which drops it, is {kind}, so it drops only the packets that "
                             "reach it while the switch would drop them all")
    required = ("input", "forward") if forwarding else ("input",)
    for path in (path for path in required if not paths[path]):
        other = "forward" if path == "input" else "input"
        if not reasons[path] and paths[other]:
            victims = "the packets it forwards" if path == "forward" else "the packets addressed to it"
            raise NotOffloadable(f"it is dropped on the {other} path but not on the {path} path, so the switch "
                                 f"would also drop {victims}")
        raise NotOffloadable([*reasons[path], *elsewhere, *reasons[other],
                              "no rule drops the packets whose address is in it"][0])
    fields = set.intersection(*(paths[path] for path in required))
    if not fields:
        raise NotOffloadable("it is dropped by source address on one path and by destination on the other, so the "
                             "switch would drop both on both")
    nat = _nat_refusals(ruleset)
    if not fields - set(nat):
        raise NotOffloadable(nat[next(iter(fields))])
    return Verdict(frozenset(fields - set(nat)))


def _canonical(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """mbvisor's text for a network: a single address without its /32 or /128."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _networks(element: Any) -> list[tuple[str, float | None]]:
    """One set element as canonical networks (a range as the fewest CIDRs that cover it),
    each with the seconds until it expires (None: no timeout)."""
    expires = None
    if isinstance(element, dict) and "elem" in element:
        expires = element["elem"].get("expires")
        element = element["elem"]["val"]
    if isinstance(element, str) and PLAIN_IPV4.fullmatch(element):  # most elements: no parsing needed
        return [(element, None if expires is None else float(expires))]
    try:
        if isinstance(element, str):
            networks = [ipaddress.ip_network(element)]
        elif isinstance(element, dict) and "prefix" in element:
            networks = [ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}")]
        elif isinstance(element, dict) and "range" in element:
            low, high = (ipaddress.ip_address(end) for end in element["range"])
            networks = list(ipaddress.summarize_address_range(low, high))
        else:
            raise ValueError("not an address, a prefix or a range")
    except (ValueError, TypeError, KeyError) as error:
        raise SourceError(f"set element {element!r} not understood: {error}") from None
    return [(_canonical(network), None if expires is None else float(expires)) for network in networks]


def elements(set_json: dict, now: float | None = None) -> dict[str, float | None]:
    """The elements of ``nft -j list set``, each with its monotonic expiry time (or None)."""
    now = time.monotonic() if now is None else now
    sets = _objects(set_json, "set")
    if len(sets) != 1:
        raise SourceError(f"expected one set in the output of nft -j list set, found {len(sets)}")
    return {network: None if expires is None else now + expires
            for element in sets[0].get("elem", []) for network, expires in _networks(element)}


def parse_monitor_line(line: str, family: str, table: str, set_name: str, now: float) -> list[Change | Resync]:
    """What one line of ``nft -j monitor`` means for the followed set (see the module docstring)."""
    text = line.strip()
    if not text:
        return []
    if text.startswith("#"):  # nft's own remarks and errors, not JSON
        if "lost some netlink events" in text:
            return [Resync("nft monitor lost events")]
        if text.startswith("# ERROR"):
            raise SourceError(f"nft monitor: {text[2:]}")
        return []
    try:
        ((action, body),) = json.loads(text).items()
        ((kind, item),) = body.items()
        where = (item["family"], item["name"] if kind == "table" else item["table"])
    except (ValueError, AttributeError, TypeError, KeyError):
        raise SourceError(f"nft monitor printed a line that is not an event: {text[:200]}") from None
    if where != (family, table):
        if kind == "rule" and action == "add" and _address_rewrites(item.get("expr", [])):
            return [Resync(f"a NAT rule was added in table {where[0]} {where[1]}")]
        return []
    if kind in ("element", "set", "map") and item.get("name") != set_name:
        return []
    if kind == "element" and action in ("add", "delete"):
        try:
            listed = item["elem"]["set"]
        except (KeyError, TypeError):
            raise SourceError(f"nft monitor printed an element event not understood: {text[:200]}") from None
        adding = action == "add"
        return [Change(adding, network, now + expires if adding and expires is not None else None)
                for element in listed for network, expires in _networks(element)]
    return [Resync(f"nft reported '{action} {kind}' in table {family} {table}: the verdict or the set may differ")]


def _subscribed(pid: int) -> bool:
    """Whether process `pid` has a netlink socket in the nftables event group yet: only
    then is a change made after `watch()` returned sure to be reported."""
    try:
        sockets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        with open(f"/proc/{pid}/net/netlink") as table:
            rows = [line.split() for line in table.readlines()[1:]]
    except OSError:
        return False
    return any(row[1] == "12" and int(row[3], 16) & _NFNLGRP_NFTABLES_BIT and f"socket:[{row[9]}]" in sockets
               for row in rows)


class NftMonitorWatch:
    """A running ``nft -j monitor``: readable when it printed something."""

    poll_interval = None

    def __init__(self, process: subprocess.Popen, family: str, table: str, set_name: str):
        self._process = process
        self._family, self._table, self._set_name = family, table, set_name
        self._pending = b""
        os.set_blocking(process.stdout.fileno(), False)

    def fileno(self) -> int:
        return self._process.stdout.fileno()

    def changes(self) -> list[Change | Resync]:
        """The events read so far; once the monitor has ended and its last events were
        returned, a `SourceError` (a new watch is needed)."""
        ended = False
        while not ended:
            try:
                chunk = os.read(self.fileno(), 1 << 16)
            except BlockingIOError:
                break
            ended = not chunk
            self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        now = time.monotonic()
        items = [item for line in lines
                 for item in parse_monitor_line(line.decode(errors="replace"), self._family, self._table,
                                                self._set_name, now)]
        if ended and not items:
            raise SourceError(f"nft monitor ended (exit status {self._process.wait()}) {self._pending[-300:]!r}")
        return items

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()


def is_dormant(table_listing: str) -> bool:
    """Whether ``nft list table`` shows the table dormant (its chains on no hook).  Read
    from the text: nftables 1.0.6's JSON prints a table's flags wrongly."""
    return any(line.split()[:1] == ["flags"] and "dormant" in line.replace(",", " ").split()
               for line in table_listing.splitlines())


# Whether the guest routes packets of an address type: its kernel's forwarding switch.
_FORWARDING_SWITCHES = {"ipv4_addr": "/proc/sys/net/ipv4/ip_forward",
                        "ipv6_addr": "/proc/sys/net/ipv6/conf/all/forwarding"}


def guest_forwards(address_type: str, root: str = "") -> bool:
    """Whether this network namespace forwards packets of ``address_type`` (unreadable:
    taken as yes, the stricter verdict)."""
    try:
        with open(root + _FORWARDING_SWITCHES[address_type]) as switch:
            return switch.read().strip() != "0"
    except OSError:
        return True


class NftSetSource:
    """A set of the guest's nftables, read with the real ``nft``.  `nft` is its path or an
    argument prefix (``["ip", "netns", "exec", NS, "nft"]``) that must exec nft in place,
    so the monitor's process is nft itself; `forwarding`: see `verdict_for`, None to read
    this namespace's forwarding switch for the set's type at each verdict."""

    def __init__(self, family: str, table: str, set_name: str, *, nft: str | list[str] = "nft",
                 forwarding: bool | None = True):
        self.family, self.table, self.set_name = family, table, set_name
        self.description = f"nft set {family} {table} {set_name}"
        self._nft = [nft] if isinstance(nft, str) else list(nft)
        self._forwarding = forwarding

    def _json(self, *arguments: str) -> dict:
        text = self._text("-j", *arguments)
        try:
            return json.loads(text)
        except ValueError:
            raise SourceError(f"{self.description}: nft {' '.join(arguments)} printed no JSON") from None

    def _text(self, *arguments: str) -> str:
        command = [*self._nft, *arguments]
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SourceError(f"{self.description}: cannot run {command[0]}: {error}") from None
        if done.returncode != 0:
            message = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[0]
            raise SourceError(f"{self.description}: nft {' '.join(arguments)} failed: {message}")
        return done.stdout

    def verdict(self) -> Verdict:
        if is_dormant(self._text("list", "table", self.family, self.table)):
            raise NotOffloadable(f"table {self.family} {self.table} is dormant: its chains drop nothing, while the "
                                 "switch would drop the set")
        ruleset = self._json("list", "ruleset")
        forwarding = self._forwarding
        if forwarding is None:
            forwarding = guest_forwards(_address_type(ruleset, self.family, self.table, self.set_name))
        return verdict_for(ruleset, self.family, self.table, self.set_name, forwarding=forwarding)

    def snapshot(self) -> dict[str, float | None]:
        return elements(self._json("list", "set", self.family, self.table, self.set_name))

    def watch(self) -> NftMonitorWatch:
        """Start ``nft -j monitor`` and return once it is subscribed to the kernel's events."""
        try:
            process = subprocess.Popen([*self._nft, "-j", "monitor"], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        except OSError as error:
            raise SourceError(f"{self.description}: cannot run {self._nft[0]}: {error}") from None
        deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT
        while not _subscribed(process.pid):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output, _ = process.communicate()
                said = output.decode(errors="replace").strip().splitlines() or [f"exit status {process.returncode}"]
                raise SourceError(f"{self.description}: nft monitor did not start listening: {said[0]}")
            time.sleep(0.005)
        return NftMonitorWatch(process, self.family, self.table, self.set_name)
