"""The OS-Ken application: the thin shell that moves OpenFlow events in and out.

Every decision lives elsewhere: the service (``service.Controller``) owns the desired
state and the commands, each switch's reconciler (``reconciler``) its flows, the REST
layer (``rest``) the API.  This shell only starts them and hands each switch event to
the service.  Loads under ``osken-manager`` and ``ryu-manager`` alike (see ``compat``).
"""

from __future__ import annotations

import errno
import gc
import logging
import socket

from .compat import (CONF, CONFIG_DISPATCHER, DEAD_DISPATCHER, FRAMEWORK, MAIN_DISPATCHER, OSKenApp, ofp_event,
                     ofproto_v1_3, set_ev_cls)
from .handshakes import install_openflow_server
from .rest import PortInUse, TlsSetupError, start_server
from .service import Controller, Settings

log = logging.getLogger("mbvisor.controller")
OFP_PORT = 6653  # where the managers listen (and 6633) when given no port
GC_YOUNG, GC_OLDER = 50_000, 20  # container allocations per young collection; collections per older one
REPLIES = [ofp_event.EventOFPFlowStatsReply, ofp_event.EventOFPAggregateStatsReply, ofp_event.EventOFPGroupDescStatsReply,
           ofp_event.EventOFPPortDescStatsReply, ofp_event.EventOFPBarrierReply, ofp_event.EventOFPErrorMsg]


def refuse_taken_port(host: str, port: int, what: str) -> None:
    """Exit with a clear message if ``port`` is taken.  The managers listen with
    SO_REUSEPORT, so a second controller would otherwise start silently and the kernel
    would split switches and requests between two processes with two databases."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise SystemExit(f"mbvisor controller: {what} port {host or '0.0.0.0'}:{port} is already in use "
                             "(another controller running?); not starting") from None
        raise
    finally:
        probe.close()


def quiet_collector() -> None:
    """Python's cyclic garbage collector walks every live container object in a full
    collection: with 100k filters installed that is ~250k objects and ~100 ms during which
    nothing else runs (no REST answer, no echo reply), and a bulk install that keeps
    creating long-lived objects set one off every few hundred milliseconds.  What was
    loaded at start (the frameworks, the stored state) is frozen out of collections, and
    the young generations are collected ~70 times less often.  The controller's state is
    freed by reference counting; only garbage in cycles waits longer."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, GC_OLDER, GC_OLDER)


class MbvisorController(OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        tls = CONF.ctl_cert is not None and CONF.ctl_privkey is not None  # then the manager listens with TLS only
        port = (CONF.ofp_ssl_listen_port if tls else CONF.ofp_tcp_listen_port) or OFP_PORT  # the manager's default
        refuse_taken_port(CONF.ofp_listen_host or "", port, "OpenFlow TLS" if tls else "OpenFlow")
        install_openflow_server()
        try:
            settings = Settings.from_environment()
            self.service = Controller(settings)
            self.rest_server = start_server(self.service, settings)
        except (ValueError, PortInUse, TlsSetupError) as error:
            raise SystemExit(f"mbvisor controller: {error}") from None
        self.service.start()
        quiet_collector()
        placement = settings.placement
        log.info("mbvisor controller running on %s; tables %d..%d, the rest to %s", FRAMEWORK,
                 placement.tables.start, placement.tables.stop - 1,
                 "NORMAL" if placement.next_table is None else f"table {placement.next_table}")

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _switch_features(self, ev):
        self.service.switch_connected(ev.msg.datapath)

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    def _switch_gone(self, ev):
        self.service.switch_disconnected(ev.datapath)

    @set_ev_cls(REPLIES, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    def _reply(self, ev):
        self.service.receive(ev.msg)

    @set_ev_cls(ofp_event.EventOFPPortStatus, MAIN_DISPATCHER)
    def _port_status(self, ev):
        message = ev.msg
        if message.reason == message.datapath.ofproto.OFPPR_DELETE:
            self.service.port_deleted(message.datapath.id, message.desc.port_no)

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev):
        self.service.packet_in(ev.msg)
