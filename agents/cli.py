"""``mbvisor``: the host-side command.

Sub-commands: ``controller`` (the OS-Ken app with its REST API), ``agent`` and
``agent-status`` (the per-host agent), ``channel`` (create a region, show its state,
serve it with the echo responder), ``ivshmem-server`` (what ``ivshmem-doorbell`` QEMU
devices connect to), ``demo`` (the lab story) and ``lab`` (a data centre of hypervisors).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from mbvisor.guest import ring
from mbvisor.guest.channel_errors import ChannelError
from mbvisor.guest.reader import ChannelReader, serve
from mbvisor.guest.region import DEFAULT_REGION_SIZE, open_file, open_shm

from .bell import HostBell
from .echo import answer_frame

DEFAULT_AGENT_STATUS = "/run/mbvisor/agent-status.json"

# What the controller process is started with unless the caller chose otherwise: eventlet
# 0.33 without its green DNS resolver (which loads dnspython twice, requests and
# cryptography; the controller resolves no names while it runs) and setuptools' distutils
# shim off (eventlet imports distutils, which the shim makes load all of setuptools and
# pkg_resources).  Together ~29 MB of the controller's resident memory (docs/controller.md).
LEAN_CONTROLLER_ENVIRONMENT = {"EVENTLET_NO_GREENDNS": "yes", "SETUPTOOLS_USE_DISTUTILS": "stdlib"}


def open_host_region(name: str, create_size: int | None = None):
    """A region by path (contains '/') or by POSIX shared-memory name (QEMU's mem-path)."""
    if "/" in name and not name.startswith("/dev/shm/"):
        return open_file(name, create_size=create_size)
    return open_shm(name, create_size=create_size)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def channel_create(args: argparse.Namespace) -> int:
    with open_host_region(args.name, create_size=args.size) as region:
        print(f"{region.path}: {region.size} bytes; the guest initialises it with its first command")
    return 0


def channel_status(args: argparse.Namespace) -> int:
    with open_host_region(args.name) as region:
        state = {"region": region.path, **ring.describe(region.buf, region.size)}
    print(json.dumps(state) if args.json else ring.format_description(state))
    return 0 if state["state"] != "unusable" else 1


def channel_serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    bell = HostBell.connect(args.doorbell) if args.doorbell else None
    with open_host_region(args.name) as region:
        reader = ChannelReader(region)
        if bell is not None and not bell.serves(os.fstat(region.fd)):
            bell.close()
            raise ChannelError(f"the doorbell server at {args.doorbell} serves another region than {region.path}")
        logging.getLogger("mbvisor").info("serving %s with the echo responder%s", region.path,
                                          " (woken by its doorbell)" if bell else "")
        try:
            serve(reader, answer_frame, stop, bell=bell)
        finally:
            if bell is not None:
                bell.close()
        logging.getLogger("mbvisor").info("stopped after %d commands (%d corrupt)",
                                          reader.stats.commands, reader.stats.corrupt)
    return 0


def ivshmem_server(args: argparse.Namespace) -> int:
    """Serve regions to ivshmem-doorbell devices until SIGTERM/SIGINT."""
    from .ivshmem_server import IvshmemServer, ServerError

    pairs = []
    for text in args.serve:
        region, separator, path = text.partition("=")
        if not separator or not region or not path:
            print(f"mbvisor: {text!r} is not REGION=SOCKET", file=sys.stderr)
            return 2
        pairs.append((region, path))
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stopped.set())
    try:
        server = IvshmemServer(pairs, vectors=args.vectors, max_clients=args.max_clients)
    except ServerError as error:
        print(f"mbvisor: {error}", file=sys.stderr)
        return 1
    try:
        logging.getLogger("mbvisor").info("ivshmem server: %s", ", ".join(f"{r} on {p}" for r, p in pairs))
        server.serve_forever(stopped.is_set)
    finally:
        server.close()
    return 0


def controller(args: argparse.Namespace) -> int:
    """Run the OS-Ken app (OpenFlow listener and REST API in one process)."""
    os.environ["MBVISOR_DB"] = str(args.db)
    os.environ["MBVISOR_REST_HOST"] = args.rest_host
    os.environ["MBVISOR_REST_PORT"] = str(args.rest_port)
    if args.token_file:
        os.environ["MBVISOR_TOKEN_FILE"] = str(args.token_file)  # read (and refused if empty) by the app
    from mbvisor.controller.placement import placement_from

    offset, next_table = str(args.table_offset), "" if args.next_table is None else str(args.next_table)
    try:
        placement_from(offset, next_table)
    except ValueError as error:
        raise SystemExit(f"mbvisor controller: {error}") from None
    os.environ["MBVISOR_TABLE_OFFSET"], os.environ["MBVISOR_NEXT_TABLE"] = offset, next_table
    listening = _openflow_listening(args)
    from os_ken.cmd import manager

    for handler in logging.root.handlers[:]:  # the manager installs its own: one line per record
        logging.root.removeHandler(handler)

    manager.main(["--ofp-listen-host", args.ofp_host, *listening, "mbvisor.controller.app", *args.app])
    return 0


def _openflow_listening(args: argparse.Namespace) -> list[str]:
    """The manager's OpenFlow options; with a certificate, TLS only, on the same port
    (the REST API reads the same files from the environment)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("mbvisor controller: --tls-cert and --tls-key go together")
    if args.tls_switch_ca and not args.tls_cert:
        raise SystemExit("mbvisor controller: --tls-switch-ca needs --tls-cert and --tls-key")
    if args.tls_any_switch_id and not args.tls_switch_ca:
        raise SystemExit("mbvisor controller: --tls-any-switch-id needs --tls-switch-ca")
    if args.tls_any_switch_id:
        os.environ["MBVISOR_TLS_SWITCH_IDS"] = "any"
    if args.tls_cert is None:
        return ["--ofp-tcp-listen-port", str(args.ofp_port)]
    for path in filter(None, (args.tls_cert, args.tls_key, args.tls_switch_ca)):
        if not os.access(path, os.R_OK):
            raise SystemExit(f"mbvisor controller: cannot read {path}")
    os.environ["MBVISOR_TLS_CERT"], os.environ["MBVISOR_TLS_KEY"] = str(args.tls_cert), str(args.tls_key)
    return ["--ofp-ssl-listen-port", str(args.ofp_port), "--ctl-cert", str(args.tls_cert),
            "--ctl-privkey", str(args.tls_key), *(["--ca-certs", str(args.tls_switch_ca)] if args.tls_switch_ca else [])]


def agent(args: argparse.Namespace) -> int:
    """Serve every VM channel on this host until SIGTERM/SIGINT."""
    from .agent import Agent, AgentSettings
    from .controller_client import ControllerClient
    from .discovery import load_static

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    if args.controller_ca and not os.access(args.controller_ca, os.R_OK):
        raise SystemExit(f"mbvisor agent: cannot read the controller's CA {args.controller_ca}")
    status_file = Path(args.status_file)
    status_file.parent.mkdir(parents=True, exist_ok=True)
    settings = AgentSettings(rate=args.rate, burst=args.burst, discovery_interval=args.discovery_interval,
                             status_file=status_file, forward_deadline=args.forward_deadline,
                             channel_dirs=tuple(args.channel_dir or AgentSettings.channel_dirs),
                             doorbell_dirs=tuple(args.doorbell_dir or AgentSettings.doorbell_dirs),
                             bell_sweep=args.bell_sweep,
                             inventory_refresh=args.inventory_refresh)
    bridges = frozenset(args.bridge or ())
    follower = None
    if args.static:
        discover, changes = (lambda: load_static(args.static)), None
    else:
        from .ovsdb_follow import OvsdbFollower
        follower = OvsdbFollower(remote=args.ovsdb, bridges=bridges).start()
        discover, changes = follower.scan, follower.changes
        follower.changes.wait(5)  # the first replica, so the first round finds the VMs already there
    the_agent = Agent(discover, ControllerClient(args.controller, token, ca_file=args.controller_ca), settings, changes,
                      follower.status if follower is not None else None)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: the_agent.stop.set())
    logging.getLogger("mbvisor").info("agent: controller %s, channels from %s", args.controller,
                                      args.static or "Open vSwitch")
    try:
        the_agent.run()
    finally:
        if follower is not None:
            follower.close()
    return 0


def agent_status(args: argparse.Namespace) -> int:
    try:
        state = json.loads(Path(args.status_file).read_text())
    except FileNotFoundError:
        print(f"mbvisor: no agent status at {args.status_file} (is the agent running?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=1))
        return 0
    print(f"agent pid {state['pid']}, controller {state['controller']}, {len(state['channels'])} channel(s)")
    if state.get("ovsdb"):
        ovsdb = state["ovsdb"]
        print(f"Open vSwitch at {ovsdb['remote']}: " + ("followed" if ovsdb["connected"] else
                                                        "NOT REACHED; the last view of the VMs stands"))
    print(f"{'channel':28} {'dpid':16} {'port':>4} {'macs':17} {'answered':>8} {'pending':>7} "
          f"{'fwd':>6} {'refused':>7} {'limited':>7} {'corrupt':>7}  state")
    for c in state["channels"]:
        condition = c["problem"] or ("waiting for controller" if c["waiting_for_controller"] else "ok")
        print(f"{c['channel'][:28]:28} {c['dpid']:16} {c['port']:>4} {','.join(c['macs'])[:17]:17} "
              f"{c['answered']:>8} {c['pending']:>7} {c['forwarded']:>6} {c['refused']:>7} "
              f"{c['rate_limited']:>7} {c['corrupt']:>7}  {condition}")
    for c in state["channels"]:
        if c.get("doorbell"):
            print(f"channel {c['channel']}: " + ("woken by its doorbell" if c["woken_by"] == "doorbell" else
                                                 f"polled, its doorbell not used: {c['doorbell_problem']}"))
    for removal in state.get("pending_removals", []):
        print(f"offloads of departed VM {removal['vm_id']} ({removal['mac']} on {removal['dpid']}) not removed yet; "
              f"{removal['attempts']} attempt(s) so far")
    for refused in state.get("refused_interfaces", []):
        print(f"interface {refused['interface']} on {refused['bridge']} not trusted: {refused['reason']}")
    for lane in state.get("lanes", []):
        print(f"commands for {lane['dpid']}: {lane['commands']} in {lane['frames']} frame(s) in {lane['requests']} "
              f"request(s); {lane['split']} batch(es) failed as a whole and were asked again frame by frame")
    for inventory in state.get("inventories", []):
        print(f"inventory of {inventory['bridge']} ({inventory['dpid']}): {inventory['ports']} port(s), "
              f"{inventory['state']}" + (f" ({inventory['attempts']} failed attempt(s): {inventory['error']})"
                                         if inventory["attempts"] else ""))
        for refused in inventory["refused"]:
            print(f"  the controller refuses port {refused.get('port')} ({refused.get('interface')}): "
                  f"{refused.get('reason')}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.output)


def lab(args: argparse.Namespace) -> int:
    from mbvisor.topologies.datacentre import run_lab

    return run_lab(args.hypervisors, args.hosts_per_hypervisor)


BENCHMARKS = ("wakeups", "latency", "throughput", "control", "scale", "datacentre", "follow", "all", "report",
              "channel", "controller", "agent")


def bench(args: argparse.Namespace) -> int:
    """Run ``mbvisor.bench.<name>.main`` with the remaining arguments (its own --help)."""
    import importlib

    module = importlib.import_module(f"mbvisor.bench.{'suite' if args.name == 'all' else args.name}")
    sys.argv[0] = f"mbvisor bench {args.name}"     # the benchmark's own usage line names itself
    return module.main(args.arguments)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbvisor", description="mbvisor host tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    channel = sub.add_parser("channel", help="a VM's shared-memory channel")
    channel_sub = channel.add_subparsers(dest="channel_command", required=True, metavar="create|status|serve")
    create = channel_sub.add_parser("create", help="create a region (POSIX shm NAME or a file PATH)")
    create.add_argument("name")
    create.add_argument("--size", type=parse_size, default=DEFAULT_REGION_SIZE, help="default 1M")
    create.set_defaults(handler=channel_create)
    status = channel_sub.add_parser("status", help="show a region's counters and last answers")
    status.add_argument("name")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=channel_status)
    serve_parser = channel_sub.add_parser(
        "serve", help="answer a region's commands with the echo responder (validates, offloads nothing)")
    serve_parser.add_argument("name")
    serve_parser.add_argument("--doorbell", metavar="SOCKET",
                              help="sleep until the guest rings, through this ivshmem server's socket "
                                   "(default: poll the region)")
    serve_parser.set_defaults(handler=channel_serve)

    server = sub.add_parser("ivshmem-server", help="serve regions to QEMU ivshmem-doorbell devices (and the agent)")
    server.add_argument("serve", nargs="+", metavar="REGION=SOCKET",
                        help="a region file (e.g. /dev/shm/NAME) and the UNIX socket to serve it on")
    server.add_argument("--vectors", type=int, default=1, help="interrupt vectors per peer (default 1)")
    server.add_argument("--max-clients", type=int, default=16, help="clients per region (default 16)")
    server.set_defaults(handler=ivshmem_server)

    control = sub.add_parser("controller", help="the OS-Ken controller: OpenFlow, REST API and metrics")
    control.add_argument("--ofp-host", default="127.0.0.1", help="OpenFlow listen address (default 127.0.0.1)")
    control.add_argument("--ofp-port", type=int, default=6653, help="OpenFlow listen port (default 6653)")
    control.add_argument("--rest-host", default="127.0.0.1", help="REST listen address (default loopback)")
    control.add_argument("--rest-port", type=int, default=8181, help="REST port (default 8181)")
    control.add_argument("--db", default="/var/lib/mbvisor/controller.sqlite", help="desired-state database")
    control.add_argument("--token-file", help="file holding the bearer token required for writes")
    control.add_argument("--table-offset", type=int, default=0, metavar="N",
                         help="mbvisor's tables are N..N+4 (default 0; docs/controller.md, 'Beside other apps')")
    control.add_argument("--next-table", type=int, metavar="T",
                         help="hand what mbvisor lets through to table T (another app's) instead of NORMAL "
                              "(default: NORMAL)")
    control.add_argument("--tls-cert", metavar="PEM",
                         help="serve REST over HTTPS and OpenFlow over TLS (only) with this certificate (chain); "
                              "with --tls-key (default: plain TCP; docs/datacentre.md)")
    control.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    control.add_argument("--tls-switch-ca", metavar="PEM",
                         help="accept only switches whose TLS certificate this CA signed and names the "
                              "datapath id they announce (a subjectAltName URI urn:mbvisor:dpid:<16 hex digits>; "
                              "default: any switch that completes the handshake)")
    control.add_argument("--tls-any-switch-id", action="store_true",
                         help="with --tls-switch-ca: let a switch announce any datapath id (certificates that "
                              "name none; any of them can then take another switch's place)")
    control.add_argument("--app", action="append", default=[], metavar="MODULE",
                         help="another OS-Ken app to run in the same process, e.g. os_ken.app.ofctl_rest "
                              "(repeatable)")
    control.set_defaults(handler=controller)

    agent_parser = sub.add_parser("agent", help="serve every VM channel on this host (forwards to the controller)")
    agent_parser.add_argument("--controller", default="http://127.0.0.1:8181", help="controller REST URL")
    agent_parser.add_argument("--token-file", help="file holding the controller's bearer token")
    agent_parser.add_argument("--controller-ca", metavar="PEM",
                              help="verify an https:// controller with this CA (default: the system's CAs)")
    agent_parser.add_argument("--static", metavar="FILE", help="channels from a JSON file instead of Open vSwitch")
    agent_parser.add_argument("--ovsdb", metavar="REMOTE",
                              help="the Open vSwitch database to follow, e.g. unix:/run/openvswitch/db.sock "
                                   "(default: where ovs-vsctl looks, $OVS_RUNDIR/db.sock)")
    agent_parser.add_argument("--bridge", action="append", metavar="NAME",
                              help="serve only VMs on this bridge (repeatable; default: every bridge)")
    agent_parser.add_argument("--status-file", default=DEFAULT_AGENT_STATUS, help="where the agent writes its status")
    agent_parser.add_argument("--rate", type=float, default=200.0, help="commands/s per channel (default 200)")
    agent_parser.add_argument("--burst", type=float, default=400.0, help="burst per channel (default 400)")
    agent_parser.add_argument("--discovery-interval", type=float, default=2.0, help="seconds between OVS scans")
    agent_parser.add_argument("--forward-deadline", type=float, default=30.0, metavar="S",
                              help="how long a command is retried while the controller or switch is unavailable, "
                                   "before the guest is answered UNAVAILABLE (default 30)")
    agent_parser.add_argument("--inventory-refresh", type=float, default=60.0, metavar="S",
                              help="an inventory the controller accepted is published again every S seconds "
                                   "(default 60), so a controller restarted from an older database learns it")
    agent_parser.add_argument("--channel-dir", action="append", metavar="DIR",
                              help="directory where channel regions may be (repeatable; default /dev/shm)")
    agent_parser.add_argument("--doorbell-dir", action="append", metavar="DIR",
                              help="directory where ivshmem server sockets may be (repeatable; default "
                                   "/run/mbvisor/ivshmem)")
    agent_parser.add_argument("--bell-sweep", type=float, default=1.0, metavar="S",
                              help="a channel with a doorbell is looked at this often without a ring (default 1)")
    agent_parser.set_defaults(handler=agent)
    status_parser = sub.add_parser("agent-status", help="the running agent's channels, counters and state")
    status_parser.add_argument("--status-file", default=DEFAULT_AGENT_STATUS)
    status_parser.add_argument("--json", action="store_true")
    status_parser.set_defaults(handler=agent_status)

    demo_parser = sub.add_parser("demo", help="the lab demo: mbctl -> channel -> host reader -> answer")
    demo_parser.add_argument("--output", default="results/demo.json", help="machine-readable result")
    demo_parser.set_defaults(handler=demo)

    lab_parser = sub.add_parser("lab", help="a data centre on this machine: hypervisors in namespaces, each with "
                                            "its own Open vSwitch and agent, one controller (docs/datacentre.md)")
    lab_parser.add_argument("--hypervisors", type=int, default=2, metavar="N", help="default 2")
    lab_parser.add_argument("--hosts-per-hypervisor", type=int, default=2, metavar="M",
                            help="VMs (namespaces, annotated, each with a channel) per hypervisor (default 2)")
    lab_parser.set_defaults(handler=lab)

    bench_parser = sub.add_parser(
        "bench", help="benchmarks: " + ", ".join(BENCHMARKS) + " (docs/benchmarks.md)",
        description="Run one benchmark; arguments after NAME go to it (try: mbvisor bench NAME --help).")
    bench_parser.add_argument("name", choices=BENCHMARKS, metavar="NAME", help=" | ".join(BENCHMARKS))
    bench_parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bench_parser.set_defaults(handler=bench)
    return parser


def relaunch_lean() -> None:
    """Replace this process (same pid, same command line with the interpreter's own
    options) by one started with ``LEAN_CONTROLLER_ENVIRONMENT``, unless every variable
    is already set: both are read when the interpreter starts or eventlet is first
    imported, too early to set them here."""
    missing = {name: value for name, value in LEAN_CONTROLLER_ENVIRONMENT.items() if name not in os.environ}
    if missing:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **missing})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.handler is controller:
        relaunch_lean()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.handler(args)
    except ChannelError as error:
        print(f"mbvisor: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
