"""``mbvisor``: the host-side command.

Sub-commands: ``controller`` (the OS-Ken app with its REST API), ``channel`` (create a
region, show its state, serve it with the echo responder) and ``demo`` (the lab story).
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

from .echo import answer_frame


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
    with open_host_region(args.name) as region:
        reader = ChannelReader(region)
        logging.getLogger("mbvisor").info("serving %s with the echo responder", region.path)
        serve(reader, answer_frame, stop)
        logging.getLogger("mbvisor").info("stopped after %d commands (%d corrupt)",
                                          reader.stats.commands, reader.stats.corrupt)
    return 0


def controller(args: argparse.Namespace) -> int:
    """Run the OS-Ken app (OpenFlow listener and REST API in one process)."""
    os.environ["MBVISOR_DB"] = str(args.db)
    os.environ["MBVISOR_REST_HOST"] = args.rest_host
    os.environ["MBVISOR_REST_PORT"] = str(args.rest_port)
    if args.token_file:
        os.environ["MBVISOR_TOKEN"] = Path(args.token_file).read_text().strip()
    from os_ken.cmd import manager

    manager.main(["--ofp-listen-host", args.ofp_host, "--ofp-tcp-listen-port", str(args.ofp_port),
                  "mbvisor.controller.app"])
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.output)


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
    serve_parser.set_defaults(handler=channel_serve)

    control = sub.add_parser("controller", help="the OS-Ken controller: OpenFlow, REST API and metrics")
    control.add_argument("--ofp-host", default="127.0.0.1", help="OpenFlow listen address (default 127.0.0.1)")
    control.add_argument("--ofp-port", type=int, default=6653, help="OpenFlow listen port (default 6653)")
    control.add_argument("--rest-host", default="127.0.0.1", help="REST listen address (default loopback)")
    control.add_argument("--rest-port", type=int, default=8181, help="REST port (default 8181)")
    control.add_argument("--db", default="/var/lib/mbvisor/controller.sqlite", help="desired-state database")
    control.add_argument("--token-file", help="file holding the bearer token required for writes")
    control.set_defaults(handler=controller)

    demo_parser = sub.add_parser("demo", help="the lab demo: mbctl -> channel -> host reader -> answer")
    demo_parser.add_argument("--output", default="results/demo.json", help="machine-readable result")
    demo_parser.set_defaults(handler=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.handler(args)
    except ChannelError as error:
        print(f"mbvisor: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
