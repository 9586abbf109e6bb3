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

from .compat import (CONF, CONFIG_DISPATCHER, DEAD_DISPATCHER, FRAMEWORK, MAIN_DISPATCHER, OSKenApp,
                     lookup_service_brick, ofp_event, ofproto_v1_3, set_ev_cls, set_ev_handler)
from .handshakes import install_openflow_server
from .rest import PortInUse, TlsSetupError, start_server
from .service import Controller, Settings
from .switchid import CERTIFICATE, refusal

log = logging.getLogger("mbvisor.controller")
OFP_PORT = 6653  # where the managers listen (and 6633) when given no port
GC_YOUNG, GC_MIDDLE = 5_000, 1  # container allocations per young collection; young ones per middle one
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


def peer_certificate(datapath) -> dict | None:
    """The switch's TLS certificate as ``ssl`` parses it; None on a plain connection."""
    read = getattr(datapath.socket, "getpeercert", None)
    try:
        return read() if read is not None else None
    except (ValueError, OSError):  # no handshake, or the connection is gone
        return None


def quiet_collector() -> None:
    """Python's cyclic garbage collector stops everything while it walks a generation:
    no REST answer, no echo reply, no other switch's command.  The controller's state is
    large (~250k objects at 100k filters) and is freed by reference counting: measured
    through the control and data-centre benchmarks, its commands, bulk installs and
    reconciliations leave no garbage in cycles.  So what was loaded at start, and every
    object alive at a collection of the middle generation (every third collection: a held
    flow, a middlebox), is frozen out of collections: no collection ever walks the state,
    and the longest is ~30k young objects (a few ms).  Before, the young generation was
    let grow to 50,000 objects and the middle one to a million: a restarted switch's
    reconciliation set off 20-40 ms and 280 ms pauses that every other switch's commands
    waited out (background work also makes these collections early, at its own rests:
    pacing.collect_ahead).  The price: garbage in cycles alive at a middle collection is
    never freed (/metrics: mbvisor_gc_frozen_objects).  Measured (every collection logged
    through a bench run): none from commands and bulk installs; one data-centre run of two
    left 75 objects (an eventlet timeout's traceback and frames) while a switch was down."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, GC_MIDDLE, GC_MIDDLE)
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


def _freeze_survivors(phase: str, info: dict) -> None:
    """After a collection of the middle generation, its survivors (now the oldest) are
    frozen: the oldest generation stays empty and is never walked."""
    if phase == "stop" and info["generation"] >= 1:
        gc.freeze()


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
        # With a switch CA, a switch announces only the datapath ids its certificate names
        # (switchid.py); the manager's TLS options are os-ken's own.
        switch_ca = tls and CONF.ca_certs is not None
        self.checks_switch_ids = switch_ca and settings.switch_ids == CERTIFICATE
        if switch_ca and not self.checks_switch_ids:
            log.warning("MBVISOR_TLS_SWITCH_IDS=any: any switch the switch CA signed may announce any datapath id, "
                        "and take another hypervisor's place and its middleboxes' flows")
        quiet_collector()
        placement = settings.placement
        log.info("mbvisor controller running on %s; tables %d..%d, the rest to %s", FRAMEWORK,
                 placement.tables.start, placement.tables.stop - 1,
                 "NORMAL" if placement.next_table is None else f"table {placement.next_table}")

    def start(self):
        """A switch is taken on inside os-ken's own receive loop (``_accept``), registered
        on its ofp_event service: the manager starts its OpenFlow server only after every
        app's start."""
        thread = super().start()
        brick = lookup_service_brick("ofp_event")
        if brick is None:
            raise SystemExit("mbvisor controller: os-ken's OpenFlow handler (ofp_event) is not loaded")
        # not a method with ``callers`` of its own: this app would run it again from its queue
        accept = set_ev_handler(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)(lambda ev: self._accept(ev))
        brick.register_handler(ofp_event.EventOFPSwitchFeatures, accept)
        return thread

    def _accept(self, ev) -> None:
        """A switch's features reply, run by os-ken's receive loop right after its own
        features handler set the connection's datapath id, before the loop reads the
        switch's next message.  Here, not from this app's queue: there the event could come
        before the id was set (the loop hands it to every app first, and waits on any app
        whose queue is full), and a switch refused for its identity (with a switch CA,
        ``switchid.py``) must be closed before it reaches MAIN_DISPATCHER, where other apps
        act on it (os-ken's DPSet, loaded by ofctl_rest, closes the older connection with
        the same id: the real switch's) and this app's port-status and packet-in handlers
        would act on the id it announced.  Anything unexpected closes the connection (the
        switch connects again) rather than leave it half taken on."""
        datapath = ev.msg.datapath
        try:
            if self.checks_switch_ids:
                found = refusal(datapath.id, peer_certificate(datapath))
                if found is not None:
                    self.service.refuse_switch(datapath, found)
                    return
            self.service.switch_connected(datapath)
        except Exception:
            log.exception("switch %s: taking on its connection failed; closed", getattr(datapath, "address", "?"))
            datapath.close()

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
        elif message.reason == message.datapath.ofproto.OFPPR_ADD:
            self.service.port_added(message.datapath.id, message.desc.port_no)

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev):
        self.service.packet_in(ev.msg)
