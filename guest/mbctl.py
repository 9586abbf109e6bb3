"""``mbctl``: the middlebox's tool for telling the hypervisor what it may offload.

Compatible with the report's helper (``-w "@...@"`` writes, ``-r`` reads) and with
readable sub-commands that build the same grammar.  Every command is checked locally
before it enters the ring, then the tool waits for the host's answer and exits with a
code that says what happened (see ``EXIT_CODES``), so scripts in the middlebox can act
on the outcome.  Standard library only: it runs inside a minimal VM image.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import answers, ring
from .channel_errors import AnswerLost, ChannelBusy, ChannelError, CommandTooLong, ResponseTimeout, RingFull
from .errors import CommandError
from .follow.balancer import DEFAULT_RESEND_EVERY, BalancerFollower
from .follow.follower import DEFAULT_LOCK_DIR, DEFAULT_RESYNC_EVERY, Follower, FollowError, LockError
from .follow.source import NotOffloadable, SourceError
from .grammar import format_frame, parse_frame
from .region import open_region
from .writer import ChannelWriter

EXIT_OK = 0
EXIT_HOST_ERROR = 1
EXIT_USAGE = 2
EXIT_INVALID_COMMAND = 3
EXIT_TIMEOUT = 4
EXIT_CHANNEL = 5
EXIT_RING_FULL = 6
EXIT_NOT_FOLLOWED = 7
EXIT_CODES = {
    EXIT_OK: "the host applied the command(s)",
    EXIT_HOST_ERROR: "the host answered with an error (refused, rejected, corrupt, ...)",
    EXIT_USAGE: "wrong arguments",
    EXIT_INVALID_COMMAND: "the command is not valid grammar; nothing was sent",
    EXIT_TIMEOUT: "no answer in time (the command stays pending in the ring), or its answer was lost",
    EXIT_CHANNEL: "no usable channel: device missing, foreign or too small region, re-initialised",
    EXIT_RING_FULL: "no slot (or the channel's lock) came free before the timeout; nothing was sent",
    EXIT_NOT_FOLLOWED: "follow: the list may not be offloaded, cannot be read, or is followed already; "
                       "nothing was sent",
}

LAYERS = {"ip": "I", "mac": "M", "transport": "T"}
FIELDS = (("src", "s"), ("dst", "d"), ("tos", "t"), ("proto", "p"))
MASK_BITS = {"d": 8, "s": 4, "t": 2, "p": 1}


def default_mac(net: Path = Path("/sys/class/net")) -> str | None:
    """The VM's own MAC when it has exactly one network interface besides loopback."""
    if os.environ.get("MBCTL_MAC"):
        return os.environ["MBCTL_MAC"]
    addresses = []
    for interface in sorted(net.glob("*")):
        try:
            address = (interface / "address").read_text().strip()
        except OSError:
            continue
        if interface.name != "lo" and address and address != "00:00:00:00:00:00":
            addresses.append(address)
    return addresses[0] if len(addresses) == 1 else None


def filter_text(args: argparse.Namespace, letter: str) -> str:
    """``A``/``D`` text from --src/--dst/--tos/--proto (values) or --fields (letters only)."""
    parts = [letter, args.mac, LAYERS[args.layer]]
    if getattr(args, "fields", None):
        letters = [dict(FIELDS).get(name.strip(), name.strip()) for name in args.fields.split(",")]
        fields = [(given, None) for given in letters]
    else:
        fields = [(short, getattr(args, name)) for name, short in FIELDS if getattr(args, name) is not None]
    mask = sum(MASK_BITS.get(short, 0) for short, _ in fields)
    parts.append(str(mask))
    for short, value in fields:
        parts += [short] if value is None else [short, value]
    return " ".join(parts)


def command_text(args: argparse.Namespace) -> str:
    """The grammar text a sub-command stands for (validated by the parser afterwards)."""
    action = args.action
    if action == "write":
        return args.write
    if action == "register":
        return f"R F {args.mac} {args.ip}"
    if action == "redirect":
        if args.source:
            return f"R L {args.mac} {args.ip} 1 {args.source} {args.to}"
        return f"R L {args.mac} {args.ip} 0 * {args.to}"
    if action == "filter":
        return filter_text(args, "A" if args.filter_action == "add" else "D")
    if action == "show":
        return f"{LAYERS[args.layer]} {args.mac}" + (f" {args.skip}" if args.skip is not None else "")
    if action == "cancel":
        return f"X {args.mac}" + (f" L {args.redirect}" if args.redirect else "")
    raise AssertionError(action)


# What each filter option means in each layer (docs/grammar.md, "Field values").
FIELD_HELP = {
    "src": "source: --layer ip: address or CIDR; mac: MAC address; transport: port or range lo-hi",
    "dst": "destination: --layer ip: address or CIDR; mac: MAC address (the middlebox's own only); "
           "transport: port or range lo-hi",
    "tos": "--layer ip and transport: DSCP 0-63 or a name (ef, af11, cs1, ...); mac: VLAN PCP 0-7",
    "proto": "--layer ip: IP protocol number or name (tcp, udp, icmp, ...); mac: EtherType (0x0800, ipv4, "
             "arp, vlan, ...); transport: tcp, udp or sctp",
}


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """The options that may come before or after the sub-command: given with their
    defaults to the main parser, and again without defaults (SUPPRESS) to every
    sub-command, so a value given before the sub-command is not reset by it."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    where = options.add_mutually_exclusive_group()
    where.add_argument("--device", metavar="BDF", default=default(None),
                       help="ivshmem PCI device, e.g. 00:04.0 (default: the only one)")
    where.add_argument("--shm", metavar="PATH", default=default(None),
                       help="region file instead of the device, e.g. /dev/shm/mb0 (default: the device)")
    options.add_argument("--doorbell", metavar="SOCKET", default=default(None),
                         help="with --shm: ring the host through this ivshmem server's socket after sending "
                              "(a device rings by itself when it is an ivshmem-doorbell)")
    options.add_argument("--timeout", type=float, default=default(5.0), metavar="S",
                         help="seconds for everything: the channel's lock, a free slot and the answer "
                              "(default 5); nothing is sent once they have passed")
    options.add_argument("--json", action="store_true", default=default(False),
                         help="print the answer as JSON (default: text, one line per command)")
    return options


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="mbctl", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog, allow_abbrev=False,
        parents=[_global_options(defaults=True)],
        description="Offload firewall filters and load-balancer redirects to the hypervisor "
                    "through the ivshmem channel, and show what the host answered.  The options "
                    "--device, --shm, --doorbell, --timeout and --json may come before or after the command.")
    parser.add_argument("-w", "--write", metavar="TEXT",
                        help='send command(s) in the report\'s form, e.g. "@R F 52:34:56:00:12:22 10.0.0.5@"')
    parser.add_argument("-r", "--read", action="store_true", help="show the channel's state and last answers")
    parser.add_argument("--raw", action="store_true", help="with -w: send the text unchecked (testing the host)")
    sub = parser.add_subparsers(dest="action", metavar="COMMAND")
    shared = _global_options(defaults=False)

    def command(parent, name: str, help: str, mac: bool = True, **options) -> argparse.ArgumentParser:
        made = parent.add_parser(name, help=help, parents=[shared], allow_abbrev=False, **options)
        if mac:
            made.add_argument("--mac", default=default_mac(),
                              help="the middlebox's MAC (default: $MBCTL_MAC or the VM's only NIC)")
        return made

    register = command(sub, "register", "register this middlebox for firewall offload")
    register.add_argument("service", choices=["firewall"])
    register.add_argument("--ip", required=True, help="the middlebox's IP address")

    redirect = command(sub, "redirect", "offload a load-balancer decision (R L)")
    redirect.add_argument("--ip", required=True, help="the address clients use (the middlebox's)")
    redirect.add_argument("--to", required=True, metavar="BACKEND[,BACKEND...]",
                          help="backend address, or a comma-separated pool")
    redirect.add_argument("--from", dest="source", metavar="SRC",
                          help="only traffic from this source (type 1; default: all traffic, type 0)")

    filters = sub.add_parser("filter", help="add or delete a firewall filter (A / D)", parents=[shared],
                             allow_abbrev=False)
    filter_sub = filters.add_subparsers(dest="filter_action", required=True, metavar="add|del")
    for name in ("add", "del"):
        filter_command = command(filter_sub, name, f"{name} a deny filter")
        filter_command.add_argument("--layer", required=True, choices=sorted(LAYERS),
                                    help="which headers the filter looks at (I, M or T in the grammar)")
        for field, _ in FIELDS:
            filter_command.add_argument(f"--{field}", metavar="VALUE", help=FIELD_HELP[field] + " (default: any)")
        if name == "del":
            filter_command.add_argument("--fields", metavar="src,dst,...",
                                        help="delete every filter of the layer using exactly these fields")

    show = command(sub, "show", "ask for the current filters of a layer")
    show.add_argument("layer", choices=sorted(LAYERS))
    show.add_argument("--skip", metavar="K",
                      help="leave out the first K filters of the sorted list (the answer still counts them): "
                           "an answer holds about 100 filters, so read a longer list page by page")
    cancel = command(sub, "cancel", "cancel the registration; every offload goes (X)")
    cancel.add_argument("--redirect", nargs="?", const="*", metavar="SRC",
                        help="withdraw only the redirect made for SRC (without SRC: the one for all traffic, "
                             "type 0); the firewall and other redirects stay (X <mac> L <src>)")
    _follow_commands(sub, command, shared)
    command(sub, "status", "same as -r", mac=False)
    command(sub, "init", "re-initialise the channel (new epoch; pending commands are dropped)", mac=False)
    return parser


FOLLOW_DESCRIPTION = """\
Keep the host's filters equal to a blocklist the middlebox already keeps: every element of
the followed sets becomes an IP filter (A <mac> I 4 s <network> for a set the drop rule
matches on the source, I 8 d on the destination), added and deleted as the set changes,
removed when an element times out.  The sets are read with the guest's own tool, and only
a set whose drop rule makes offloading safe is followed (else nothing is sent, exit 7).

The follower owns every IP filter of the middlebox with exactly one address field (mask 4
or 8): one added by hand is deleted if no followed set holds it.  Other filters are never
touched.  It checks the host's list every --resync-every seconds and repairs what someone
else changed.  On SIGTERM or SIGINT it stops; the filters stay on the host (the switch
keeps dropping what the middlebox would drop) unless --remove-on-exit.  One follower per
middlebox.  See docs/adapters.md."""


FORWARDING = {"auto": None, "yes": True, "no": False}  # follow nft --forwarding: NftSetSource's forwarding


def _follow_commands(sub, command, shared) -> None:
    """``follow nft`` and ``follow ipset`` with the options they share."""
    described = {"description": FOLLOW_DESCRIPTION, "formatter_class": argparse.RawDescriptionHelpFormatter}
    follow = sub.add_parser("follow", parents=[shared], allow_abbrev=False, **described,
                            help="keep the host's filters equal to an nftables set or an ipset, or its redirect to IPVS")
    tools = follow.add_subparsers(dest="tool", required=True, metavar="nft|ipset|ipvs")
    nft = command(tools, "nft", "follow nftables sets", **described)
    nft.add_argument("--set", dest="sets", nargs=3, action="append", required=True,
                     metavar=("FAMILY", "TABLE", "SET"), help="an nftables set, e.g. --set inet filter blocklist; "
                                                              "give --set again to follow several")
    nft.add_argument("--forwarding", choices=sorted(FORWARDING), default="auto",
                     help="whether the guest routes packets, so that the set must be dropped on the forward "
                          "path as well as the input path: auto (default) reads the kernel's switch "
                          "(net.ipv4.ip_forward, net.ipv6.conf.all.forwarding) at each verdict")
    ipset = command(tools, "ipset", "follow ipsets (hash:ip, hash:net)", **described)
    ipset.add_argument("--set", dest="sets", action="append", required=True, metavar="NAME",
                       help="an ipset; give --set again to follow several")
    for tool in (nft, ipset):
        tool.add_argument("--resync-every", type=float, default=DEFAULT_RESYNC_EVERY, metavar="S",
                          help=f"compare with the host's whole list this often (default {DEFAULT_RESYNC_EVERY:g})")
        tool.add_argument("--once", action="store_true", help="sync once and exit (exit 1 if the host refused "
                                                              "an element)")
        tool.add_argument("--remove-on-exit", action="store_true",
                          help="delete the follower's filters from the host when it stops (default: they stay)")
        tool.add_argument("--verbose", action="store_true", help="a status line for every frame sent")
        tool.add_argument("--lock-dir", default=DEFAULT_LOCK_DIR, metavar="DIR",
                          help=f"where the one-follower-per-middlebox lock is (default {DEFAULT_LOCK_DIR})")
    _follow_ipvs_command(tools, command)


FOLLOW_IPVS_DESCRIPTION = """\
Keep the host's redirect of the middlebox's address equal to the IPVS services on it: when
every service on --ip can be offloaded (masquerading, equal shares, no persistence, the
port unchanged, one pool; see docs/adapters.md) the pool is registered with
R L <mac> <ip> 0 * <pool>, and registered again when the pool changes.  Every other service
is reported once, with the reason, and left to IPVS.  When IPVS may no longer be offloaded
(or has no service on --ip), the redirect is withdrawn with X <mac> L *, which keeps the
middlebox's firewall registration and filters; nothing else is ever sent.
--ip states that the balanced services are all the address serves: the redirect takes every
packet to it."""


def _follow_ipvs_command(tools, command) -> None:
    """``follow ipvs``: its own options (a redirect is no list of filters)."""
    ipvs = command(tools, "ipvs", "follow IPVS virtual services (a load-balancer redirect)",
                   description=FOLLOW_IPVS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ipvs.add_argument("--ip", required=True, help="the middlebox's address, the one its IPVS services are on")
    ipvs.add_argument("--poll-interval", type=float, metavar="S",
                      help="read IPVS this often (IPVS has no change events; default: the adapter's, 4 s)")
    ipvs.add_argument("--resync-every", type=float, default=DEFAULT_RESEND_EVERY, metavar="S",
                      help="register the redirect again this often, which repairs a host that lost it (default "
                           f"{DEFAULT_RESEND_EVERY:g}; the host cannot be asked for its redirects)")
    ipvs.add_argument("--once", action="store_true", help="sync once and exit (exit 1 if a service is not "
                                                          "offloaded or the redirect could not be withdrawn)")
    ipvs.add_argument("--verbose", action="store_true", help="a status line for every frame sent")
    ipvs.add_argument("--lock-dir", default=DEFAULT_LOCK_DIR, metavar="DIR",
                      help=f"where the one-follower-per-middlebox lock is (default {DEFAULT_LOCK_DIR})")


def follow_ipvs(writer: ChannelWriter, args: argparse.Namespace) -> int:
    """Run the IPVS follower until SIGTERM or SIGINT (or one sync, with --once).  The adapter
    is imported only here: it needs ipvsadm in the guest."""
    from .follow.ipvs import IpvsSource

    if args.poll_interval is not None and not args.poll_interval > 0:
        return fail("--poll-interval must be a number of seconds above 0", EXIT_USAGE, args)
    try:
        polling = {} if args.poll_interval is None else {"poll_interval": args.poll_interval}
        source = IpvsSource(args.ip, **polling)
        follower = BalancerFollower(writer, args.mac, source, resend_every=args.resync_every, timeout=args.timeout,
                                    verbose=args.verbose, lock_dir=args.lock_dir)
    except CommandError as error:
        return fail(f"follow: {error.detail}", EXIT_USAGE, args)
    return run_follower(follower, args)


def follow_sources(args: argparse.Namespace) -> list:
    """The adapters, imported only when followed: each needs its own tool in the guest."""
    if args.tool == "nft":
        from .follow.nft import NftSetSource
        return [NftSetSource(family, table, name, forwarding=FORWARDING[args.forwarding])
                for family, table, name in args.sets]
    from .follow.ipset import IpsetSource
    return [IpsetSource(name) for name in args.sets]


def follow(writer: ChannelWriter, args: argparse.Namespace) -> int:
    """Run a follower of nftables sets or ipsets."""
    try:
        follower = Follower(writer, args.mac, follow_sources(args), resync_every=args.resync_every,
                            timeout=args.timeout, verbose=args.verbose, remove_on_exit=args.remove_on_exit,
                            lock_dir=args.lock_dir)
    except CommandError as error:
        return fail(f"follow: {error.detail}", EXIT_USAGE, args)
    return run_follower(follower, args)


def run_follower(follower: Follower | BalancerFollower, args: argparse.Namespace) -> int:
    """Run ``follower`` until SIGTERM or SIGINT (or one sync, with --once): exit 7 if what
    it follows may not be offloaded, cannot be read or is followed already; 1 if the host
    refused it (or, with --once, something was left out)."""
    previous = {sig: signal.signal(sig, lambda *_: follower.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with follower:
            left_out = follower.run(once=args.once)
    except (NotOffloadable, SourceError, LockError) as error:
        return fail(f"follow: {error}", EXIT_NOT_FOLLOWED, args)
    except FollowError as error:
        return fail(f"follow: {error}", EXIT_HOST_ERROR, args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_HOST_ERROR if args.once and left_out else EXIT_OK


def send(writer: ChannelWriter, text: str, args: argparse.Namespace) -> int:
    if args.raw:
        payload = text.encode("utf-8", "surrogateescape")
    else:
        try:
            payload = format_frame(parse_frame(text)).encode()
        except CommandError as error:
            return fail(f"invalid command: {error}", EXIT_INVALID_COMMAND, args)
    started = time.monotonic()
    response = writer.request(payload, args.timeout)
    elapsed_ms = (time.monotonic() - started) * 1000
    try:
        records = answers.parse(response.text)
    except answers.AnswerFormatError:  # a host that does not answer in records: show its text
        records = None
    if args.json:
        print(json.dumps({"seq": response.seq, "epoch": response.epoch, "status": response.status_name,
                          "code": response.status, "text": response.text, "truncated": response.truncated,
                          "answers": None if records is None else [
                              {"status": r.status, "code": r.code, "text": "\n".join(r.lines)} for r in records],
                          "round_trip_ms": round(elapsed_ms, 3)}))
    elif records is None:
        stream = sys.stdout if response.ok else sys.stderr
        prefix = "" if response.ok else f"mbctl: host answered {response.status_name}: "
        print(prefix + response.text + (" [answer truncated]" if response.truncated else ""), file=stream)
    else:
        print_answers(records)
    return EXIT_OK if response.ok else EXIT_HOST_ERROR


def print_answers(records: list) -> None:
    """One line per command (and a query's result under it): successes on stdout,
    failures on stderr with their status and code."""
    for record in records:
        if record.ok:
            for line in record.lines or ("ok",):
                print(line)
        else:
            detail = f": {record.message}" if record.message else ""
            print(f"mbctl: {record.status} {record.code}{detail}", file=sys.stderr)
            for line in record.lines[1:]:
                print(f"  {line}", file=sys.stderr)


def show_status(region, args: argparse.Namespace) -> int:
    state = {"region": region.path, **ring.describe(region.buf, region.size)}
    print(json.dumps(state) if args.json else ring.format_description(state))
    return EXIT_OK if state["state"] != "unusable" else EXIT_CHANNEL


def fail(message: str, code: int, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"error": message, "exit_code": code}))
    print(f"mbctl: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    if args.write:
        args.action = "write"
    if args.read or args.action == "status":
        args.action = "status"
    if not args.action:
        return fail("nothing to do; give -w TEXT, -r or a command (see --help)", EXIT_USAGE, args)
    if args.shm and args.device:  # one given before the command, the other after it
        return fail("--device and --shm name two channels; give one", EXIT_USAGE, args)
    if args.action == "follow" and args.json:
        return fail("follow writes status lines on stderr; --json is not for it", EXIT_USAGE, args)
    if args.action == "follow" and not args.resync_every > 0:
        return fail("--resync-every must be a number of seconds above 0", EXIT_USAGE, args)
    if args.action not in ("write", "status", "init") and not args.mac:
        return fail("no --mac given and the VM's MAC could not be guessed (set MBCTL_MAC)", EXIT_USAGE, args)
    try:
        if args.doorbell and not args.shm:
            return fail("--doorbell goes with --shm (a device rings through its own doorbell)", EXIT_USAGE, args)
        with open_region(shm=args.shm, device=args.device, doorbell=args.doorbell) as region:
            if args.action == "status":
                return show_status(region, args)
            writer = ChannelWriter(region)
            if args.action == "follow":
                return (follow_ipvs if args.tool == "ipvs" else follow)(writer, args)
            if args.action == "init":
                epoch = writer.initialise(timeout=args.timeout)
                print(json.dumps({"epoch": f"{epoch:#010x}"}) if args.json else
                      f"channel re-initialised, epoch {epoch:#010x}")
                return EXIT_OK
            return send(writer, command_text(args), args)
    except (ResponseTimeout, AnswerLost) as error:
        return fail(str(error), EXIT_TIMEOUT, args)
    except CommandTooLong as error:
        return fail(str(error), EXIT_INVALID_COMMAND, args)
    except (RingFull, ChannelBusy) as error:
        return fail(str(error), EXIT_RING_FULL, args)
    except ChannelError as error:
        return fail(str(error), EXIT_CHANNEL, args)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
