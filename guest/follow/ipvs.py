"""Following IPVS: virtual services on the middlebox's address become one switch redirect.

A redirect (``R L <mac> <ip> 0 * <backends>``, controller/flows.py) sends every new
connection to the middlebox's address to one backend chosen by a hash of the connection (an
OpenFlow select group, one bucket of weight 1 per live backend), and commits it to conntrack
with destination NAT to that backend's *address*: the port is never rewritten, and replies
are translated back.  That is IPVS masquerading (``-m``) with equal shares and no port change,
so the plan refuses every service whose behaviour would change, each with its reason:

* a firewall-mark service (which packets carry the mark is up to rules the follower does not
  read), or a service on another address than the middlebox's;
* persistence (``-p``; the switch picks per connection, not per client), one-packet
  scheduling (``-o``; the switch keeps a flow on one backend);
* forwarding other than masquerading: direct routing and local real servers (``-g``) and
  tunnels (``-i``) deliver the packet unchanged or encapsulated, the switch rewrites it;
* a real server on another port than the service's (port translation);
* a real server of weight 0 (quiesced: IPVS sends it no new connection, the switch would), or
  unequal weights under a scheduler that uses them (the switch spreads evenly; rr and lc
  ignore weights other than 0, so they may differ there);
* schedulers: the switch's choice is a hash per connection, close to what rr, wrr, lc, wlc,
  sed and nq do with equal weights, and what sh and mh do with their ``-port`` flag (source
  address *and* port hashed).  sh and mh without it keep a client on one server; dh, lblc
  and lblcr choose by destination (one server per address); fo and ovf fill the
  highest-weight server first; any other scheduler is unknown here: all refused;
* no real server, more than 64 (``R L``'s limit), or a real server of the other family.

A redirect takes *all* of an address's traffic, every protocol and port, while an IPVS service
takes one protocol and port; what IPVS leaves alone on that address (an ssh port, a ping)
would reach the pool instead of the middlebox.  The follower therefore only redirects the
address the operator names as the balancer's (``middlebox_ip``, the address ``R L``
registers), stating that it serves the balanced services alone; and, being conservative, it
redirects that address only if *every* service on it can be offloaded and all of them share
one pool (one redirect per address).  Otherwise each service there is refused and the
traffic stays with the middlebox.

IPVS's thresholds (``-x``/``-y``) do not appear in ``ipvsadm -Sn``, so they cannot be checked.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple, Sequence

from .. import fields as kinds
from ..commands import MAX_BACKENDS, RegisterLoadBalancer, check_load_balancer
from ..errors import InvalidValueError
from .ipset import DEFAULT_POLL_INTERVAL, PolledWatch, run_tool
from .source import SourceError

MASQUERADING, DIRECT_ROUTING, TUNNEL, LOCAL = "masquerading", "direct routing", "tunnelling", "local delivery"
_SAVE_FORWARDING = {"-m": MASQUERADING, "-g": DIRECT_ROUTING, "-i": TUNNEL}
_PROC_FORWARDING = {"Masq": MASQUERADING, "Route": DIRECT_ROUTING, "Tunnel": TUNNEL, "Local": LOCAL}
_SAVE_PROTOCOLS = {"-t": "TCP", "-u": "UDP", "--sctp-service": "SCTP"}
# What ipvsadm -Sn prints after a service or real server: options with a value, and flags.
_SERVICE_OPTIONS = ({"-s", "-p", "-M", "--pe", "-b"}, {"-o"})
_SERVER_OPTIONS = ({"-r", "-w", "--tun-type", "--tun-port"},
                   {"-m", "-g", "-i", "--tun-nocsum", "--tun-csum", "--tun-remcsum"})

SPREADING_SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "sed", "nq"})
HASHING_SCHEDULERS = frozenset({"sh", "mh"})  # per connection only with the "<name>-port" flag
WEIGHT_BLIND_SCHEDULERS = frozenset({"rr", "lc"})  # weights other than 0 change nothing
_REFUSED_SCHEDULERS = {
    "dh": "chooses by destination address, so one server takes all of an address's connections",
    "lblc": "chooses by destination address, so one server takes all of an address's connections",
    "lblcr": "chooses by destination address, so few servers take all of an address's connections",
    "fo": "sends every new connection to the highest-weight server (failover)",
    "ovf": "fills the highest-weight server first (overflow)",
}


class RealServer(NamedTuple):
    address: str  # canonical
    port: int
    forwarding: str  # MASQUERADING, DIRECT_ROUTING, TUNNEL or LOCAL
    weight: int


class VirtualService(NamedTuple):
    protocol: str  # "TCP", "UDP", "SCTP"; "FWM" for a firewall-mark service
    address: str | None  # the virtual address, canonical; None for a firewall mark
    port: int
    fwmark: int | None
    scheduler: str
    persistent: bool = False
    one_packet: bool = False
    scheduler_flags: frozenset[str] = frozenset()
    real_servers: tuple[RealServer, ...] = ()

    def describe(self) -> str:
        if self.fwmark is not None:
            return f"FWM {self.fwmark}"
        host = f"[{self.address}]" if ":" in (self.address or "") else self.address
        return f"{self.protocol} {host}:{self.port}"


class Refusal(NamedTuple):
    service: str  # as VirtualService.describe() names it
    reason: str

    def __str__(self) -> str:
        return f"{self.service} {self.reason}"


class Redirect(NamedTuple):
    """All traffic to ``ip`` goes to ``backends`` (a type 0 ``R L``)."""

    ip: str
    backends: tuple[str, ...]

    def command(self, mac: str) -> RegisterLoadBalancer:
        command = RegisterLoadBalancer(kinds.MAC_ADDRESS.parse(mac), self.ip, 0, None, self.backends)
        check_load_balancer(command)
        return command


def _address(text: str, what: str) -> str:
    try:
        return kinds.IP_ADDRESS.parse(text)
    except InvalidValueError:
        raise SourceError(f"'{text}' is not a numeric {what}; read IPVS with ipvsadm -Sn") from None


def _address_and_port(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise SourceError(f"'{text}' has no numeric port; read IPVS with ipvsadm -Sn")
    return _address(host.removeprefix("[").removesuffix("]"), what), int(port)


def _options(words: list[str], known: tuple[set[str], set[str]], line: str) -> dict[str, str]:
    """{option: value} ("" for a flag); SourceError for anything ipvsadm 1.31 does not print."""
    valued, flags = known
    options, index = {}, 0
    while index < len(words):
        option = words[index]
        if option in flags:
            options[option], index = "", index + 1
        elif option in valued and index + 1 < len(words):
            options[option], index = words[index + 1], index + 2
        else:
            raise SourceError(f"ipvsadm printed '{option}' in '{line}'; not understood")
    return options


def parse_ipvsadm_save(text: str) -> list[VirtualService]:
    """``ipvsadm -Sn`` (ipvsadm 1.31, print_service_entry with FMT_RULE): one ``-A`` line
    per service, then one ``-a`` line per real server of it."""
    services: dict[str, VirtualService] = {}
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] not in ("-A", "-a") or len(words) < 3 or words[1] not in ("-f", *_SAVE_PROTOCOLS):
            raise SourceError(f"ipvsadm printed '{line}'; not understood")
        spec_length = 3 if words[1] == "-f" and words[3:4] == ["-6"] else 2
        key, rest = " ".join(words[1:1 + spec_length]), words[1 + spec_length:]
        if words[0] == "-A":
            options = _options(rest, _SERVICE_OPTIONS, line)
            if words[1] == "-f":
                address, port, protocol, fwmark = None, 0, "FWM", int(words[2])
            else:
                (address, port), fwmark = _address_and_port(words[2], "virtual address"), None
                protocol = _SAVE_PROTOCOLS[words[1]]
            flags = frozenset(options["-b"].split(",")) if "-b" in options else frozenset()
            services[key] = VirtualService(protocol, address, port, fwmark, options.get("-s", ""),
                                           "-p" in options, "-o" in options, flags)
        elif key not in services:
            raise SourceError(f"ipvsadm listed a real server of '{key}' before the service")
        else:
            options = _options(rest, _SERVER_OPTIONS, line)
            address, port = _address_and_port(options.get("-r", ""), "real server address")
            forwarding = next((_SAVE_FORWARDING[option] for option in options if option in _SAVE_FORWARDING), "")
            server = RealServer(address, port, forwarding, int(options.get("-w", "1")))
            services[key] = services[key]._replace(real_servers=services[key].real_servers + (server,))
    return list(services.values())


def _proc_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        return _address(host[1:-1], "address"), int(port, 16)
    return str(ipaddress.IPv4Address(int(host, 16))), int(port, 16)


def parse_proc_ip_vs(text: str) -> list[VirtualService]:
    """/proc/net/ip_vs (net/netfilter/ipvs/ip_vs_ctl.c, ip_vs_info_seq_show): hexadecimal
    addresses and ports; it shows neither scheduler flags nor persistence engines, so sh and mh
    read here look flagless and are refused."""
    services: list[VirtualService] = []
    for line in text.splitlines()[3:]:  # a version line and two column headings
        words = line.split()
        if not words:
            continue
        if words[0] == "->":
            if not services:
                raise SourceError("/proc/net/ip_vs listed a real server before any service")
            address, port = _proc_address(words[1])
            server = RealServer(address, port, _PROC_FORWARDING.get(words[2], words[2]), int(words[3]))
            services[-1] = services[-1]._replace(real_servers=services[-1].real_servers + (server,))
        elif words[0] == "FWM":
            services.append(VirtualService("FWM", None, 0, int(words[1], 16), words[2],
                                           "persistent" in words, "ops" in words))
        else:
            address, port = _proc_address(words[1])
            services.append(VirtualService(words[0], address, port, None, words[2],
                                           "persistent" in words, "ops" in words))
    return services


def _problems(service: VirtualService) -> list[str]:
    """Why this one service, on the middlebox's address, cannot become the redirect."""
    problems = []
    servers, scheduler = service.real_servers, service.scheduler
    if not servers:
        problems.append("has no real server")
    if len(servers) > MAX_BACKENDS:
        problems.append(f"has {len(servers)} real servers; a redirect takes at most {MAX_BACKENDS}")
    if service.persistent:
        problems.append("is persistent (-p): IPVS keeps a client on one real server, the switch chooses per connection")
    if service.one_packet:
        problems.append("schedules each datagram apart (-o): the switch keeps a flow on one backend")
    if scheduler in _REFUSED_SCHEDULERS:
        problems.append(f"uses scheduler {scheduler}, which {_REFUSED_SCHEDULERS[scheduler]}; the switch spreads"
                        " connections by hash")
    elif scheduler in HASHING_SCHEDULERS and f"{scheduler}-port" not in service.scheduler_flags:
        problems.append(f"uses scheduler {scheduler} without {scheduler}-port, which keeps a client on one server;"
                        " the switch hashes each connection")
    elif scheduler not in SPREADING_SCHEDULERS | HASHING_SCHEDULERS:
        problems.append(f"uses scheduler '{scheduler}', unknown to the follower")
    for server in servers:
        where = f"real server {server.address}:{server.port}"
        if server.forwarding != MASQUERADING:
            problems.append(f"reaches {where} by {server.forwarding or 'an unknown method'}; the switch can only"
                            " rewrite the destination address, as masquerading (-m) does")
        if server.port != service.port:
            problems.append(f"translates port {service.port} to {where}; the switch's redirect rewrites the address,"
                            " never the port")
        if kinds.ip_family(server.address) != kinds.ip_family(service.address):
            problems.append(f"mixes families with {where}; a redirect keeps one family")
        if server.weight <= 0:
            problems.append(f"quiesces {where} (weight {server.weight}): IPVS sends it no new connection,"
                            " the switch still would")
    weights = sorted({server.weight for server in servers})
    if len(weights) > 1 and scheduler not in WEIGHT_BLIND_SCHEDULERS and min(weights) > 0:
        problems.append(f"weighs its real servers unequally ({', '.join(map(str, weights))});"
                        " the switch spreads connections evenly")
    return problems


def plan(services: Sequence[VirtualService], middlebox_ip: str) -> tuple[list[Redirect], list[Refusal]]:
    """The redirect of the middlebox's address, if its services allow one, and every refusal
    (the module docstring has the rules)."""
    middlebox_ip = kinds.IP_ADDRESS.parse(middlebox_ip)
    refusals: list[Refusal] = []
    on_address: list[VirtualService] = []
    for service in services:
        if service.fwmark is not None:
            refusals.append(Refusal(service.describe(), "is a firewall-mark service: which packets it takes is up to"
                                                        " firewall rules the follower does not read"))
        elif service.address != middlebox_ip:
            refusals.append(Refusal(service.describe(), f"is not on the middlebox's address {middlebox_ip},"
                                                        " the only one redirected"))
        else:
            on_address.append(service)
    if not on_address:
        return [], refusals
    problems = {service: _problems(service) for service in on_address}
    pools = {frozenset(server.address for server in service.real_servers) for service in on_address}
    if len(pools) > 1:
        for service in on_address:
            problems[service].append("shares the address with services of another pool; one address gets one redirect")
    if any(problems.values()):
        for service in on_address:
            reasons = problems[service] or [f"shares the address with a service that cannot be offloaded, and the"
                                             f" redirect would take all of {middlebox_ip}'s traffic"]
            refusals.extend(Refusal(service.describe(), reason) for reason in reasons)
        return [], refusals
    pool = sorted(pools.pop(), key=ipaddress.ip_address)
    return [Redirect(middlebox_ip, tuple(pool))], refusals


class Balancing(NamedTuple):
    """What IPVS asks of the switch now: {virtual address: backends} and what was refused."""

    redirects: dict[str, tuple[str, ...]]
    refusals: tuple[Refusal, ...]


class IpvsSource:
    """The guest's IPVS services, read with ``ipvsadm -Sn`` (``argv_prefix`` runs it elsewhere;
    ``command`` may read /proc/net/ip_vs instead, which needs no CAP_NET_ADMIN).

    Not a `source.Source`: IPVS yields redirects, not a list of addresses to drop.  Its own
    interface is ``snapshot()`` -> `Balancing` (raising SourceError when IPVS cannot be read)
    and ``watch()``, a polled watch (IPVS has no change notification) after which the follower
    takes a new snapshot and sends the redirect again only if it changed.  The poll's cost
    could not be measured here (this kernel has no IPVS); ``ipvsadm -Sn`` is, like ``ipset
    save``, one fork and exec of a small netlink client, so the same default interval."""

    def __init__(self, middlebox_ip: str, argv_prefix: Sequence[str] = (),
                 poll_interval: float = DEFAULT_POLL_INTERVAL, command: Sequence[str] = ("ipvsadm", "-Sn")) -> None:
        self.middlebox_ip, self.poll_interval = middlebox_ip, poll_interval
        self._argv = (*argv_prefix, *command)
        self.description = f"IPVS services on {middlebox_ip}"

    def snapshot(self) -> Balancing:
        try:
            text = run_tool(self._argv)
        except SourceError as error:
            raise SourceError(f"IPVS could not be read: {error}") from None
        parse = parse_proc_ip_vs if text.startswith("IP Virtual Server version") else parse_ipvsadm_save
        redirects, refusals = plan(parse(text), self.middlebox_ip)
        return Balancing({redirect.ip: redirect.backends for redirect in redirects}, tuple(refusals))

    def watch(self) -> PolledWatch:
        return PolledWatch(self.poll_interval)
