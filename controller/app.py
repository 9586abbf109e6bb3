"""The OS-Ken application: the thin shell around the pure core.

It moves data in and out and nothing more: commands arrive from the REST layer
(``service.Core`` applies them), ``compile_middlebox``/``compile_switch`` give the flows,
``reconcile`` the difference against what the switch holds; this shell sends that
difference followed by a barrier and reports the switch's errors for exactly those
messages.  On every switch (re)connection it reads the switch's flows and groups and
reconciles the whole switch, so flows nobody changed are left alone.

Loads under ``osken-manager`` and ``ryu-manager`` alike (see ``compat``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .compat import (CONFIG_DISPATCHER, DEAD_DISPATCHER, FRAMEWORK, MAIN_DISPATCHER, OSKenApp, arp, ether,
                     ethernet, hub, ofp_event, ofproto_v1_3, packet, set_ev_cls)
from .flows import (BASE_COOKIE, COOKIE_TAG, COOKIE_TAG_MASK, RESOLVER_MAC, Flow, Group, Neighbour, SwitchConfig, compile_middlebox,
                    compile_switch, cookie_of, owned_groups)
from .model import State
from .ofmessages import encode_action, encoded_actions, flow_mod, group_mod, instructions, normal_match
from .reconcile import Changes, reconcile
from .service import Answer, CommandRequest, Core, Settings

log = logging.getLogger("mbvisor.controller")
CONFIRM_TIMEOUT = 5.0
ARP_TIMEOUT = 2.0
ARP_REFRESH = 30.0


@dataclass
class Batch:
    """Messages sent together and the barrier that confirms them."""

    xids: set[int]
    done: object  # hub.Event
    errors: list[str] = field(default_factory=list)


@dataclass
class Switch:
    """A connected switch and what we know it holds: flows by cookie and identity (so one
    middlebox's flows are found without scanning the switch), their actions as wire
    bytes, and groups as the wire bytes of their buckets."""

    datapath: object
    connected_at: float
    synced: object  # hub.Event: set once the first reconciliation is done
    flows: dict = field(default_factory=dict)  # cookie -> identity -> Flow
    groups: dict = field(default_factory=dict)

    def all_flows(self) -> list[Flow]:
        return [flow for by_identity in self.flows.values() for flow in by_identity.values()]

    def flows_of(self, cookie: int) -> list[Flow]:
        return list(self.flows.get(cookie, {}).values())

    def flow_count(self) -> int:
        return sum(len(by_identity) for by_identity in self.flows.values())

    def holds(self, flow: Flow) -> None:
        self.flows.setdefault(flow.cookie, {})[_identity(flow)] = flow

    def lost(self, flow: Flow) -> None:
        by_identity = self.flows.get(flow.cookie, {})
        by_identity.pop(_identity(flow), None)
        if not by_identity:
            self.flows.pop(flow.cookie, None)


def _identity(flow: Flow) -> tuple:
    return (flow.table, flow.priority, flow.match)


def _wire_buckets(buckets) -> bytes:
    """Groups carry no cookie and come back as objects: compare their encoded buckets."""
    out = bytearray()
    for bucket in buckets:
        for action in bucket:
            buf = bytearray()
            action.serialize(buf, 0)
            out += buf
        out += b"|"
    return bytes(out)


class MbvisorController(OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches: dict[int, Switch] = {}
        self.neighbours: dict[int, dict[str, Neighbour]] = {}
        self.batches: dict[tuple[int, int], Batch] = {}
        self.replies: dict[tuple[int, int], tuple[list, object]] = {}
        self.lock = hub.BoundedSemaphore(1)
        log.info("mbvisor controller running on %s", FRAMEWORK)
        self.core = Core(Settings.from_environment(), self)
        self.core.start_rest()
        hub.spawn(self._refresh_neighbours)

    # --- commands (called by the REST layer) ------------------------------------------

    def execute(self, request: CommandRequest) -> Answer:
        """Apply one command; answered once the switch confirmed its flows."""
        return self.execute_all([request])[0]

    def execute_all(self, requests: list[CommandRequest]) -> list[Answer]:
        """Apply commands in order, their flows confirmed together (see Core.execute_all)."""
        with self.lock:
            return self.core.execute_all(requests)

    def install(self, before: State, after: State, touched: set[tuple[int, str]]) -> list[str]:
        """Bring the flows and groups of the touched (dpid, MAC) middleboxes from ``before`` to
        ``after``: per switch, all their changes and one barrier.  Returns the errors."""
        errors = []
        for dpid in sorted({dpid for dpid, _ in touched}):
            switch = self.switches.get(dpid)
            if switch is None:
                errors.append(f"switch {dpid:016x} is not connected")
                continue
            switch.synced.wait(timeout=CONFIRM_TIMEOUT)
            changes = Changes()
            for mac in sorted(mac for d, mac in touched if d == dpid):
                needed = self._middlebox_changes(switch, before, after, mac)
                if isinstance(needed, str):
                    errors.append(needed)
                else:
                    changes = changes + needed
            if not errors:
                errors += self._send(switch, changes)
        return errors

    def _middlebox_changes(self, switch: Switch, before: State, after: State, mac: str) -> Changes | str:
        dpid = switch.datapath.id
        wanted = after.find(dpid, mac)
        middlebox = wanted or before.find(dpid, mac)
        desired = (compile_middlebox(wanted, self.neighbours.get(dpid, {})) if wanted
                   else SwitchConfig(frozenset(), frozenset()))
        if desired.unresolved:
            return f"backend {', '.join(desired.unresolved)} did not answer ARP"
        cookie = cookie_of(mac)
        installed = switch.flows_of(cookie)
        groups = set(owned_groups(middlebox)) if middlebox else set()
        return self._diff(switch, desired, installed, groups)

    def resync(self, dpid: int) -> None:
        """After a failure half-way: make the switch match the desired state again."""
        if dpid in self.switches:
            self.sync_switch(dpid)

    def _flow_stats(self, dpid: int, cookie: int, mask: int) -> list:
        switch = self.switches.get(dpid)
        if switch is None:
            return []
        datapath = switch.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        return self._request(datapath, parser.OFPFlowStatsRequest(
            datapath, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY, cookie, mask, parser.OFPMatch()))

    def handled_packets(self, dpid: int) -> dict[int, int]:
        """Packets each middlebox's flows handled on ``dpid``, by cookie (one request)."""
        totals: dict[int, int] = {}
        for stat in self._flow_stats(dpid, COOKIE_TAG, COOKIE_TAG_MASK):
            if stat.cookie != BASE_COOKIE:
                totals[stat.cookie] = totals.get(stat.cookie, 0) + stat.packet_count
        return totals

    def flow_statistics(self, dpid: int, cookie: int) -> list[dict]:
        """The switch's own view of a middlebox's flows, with counters."""
        stats = self._flow_stats(dpid, cookie, 0xFFFFFFFFFFFFFFFF)
        return [{"table": s.table_id, "priority": s.priority, "match": dict(normal_match(s.match.items())),
                 "packets": s.packet_count, "bytes": s.byte_count, "cookie": f"{s.cookie:#018x}",
                 "actions": [str(i) for i in s.instructions]} for s in stats]

    # --- switch life cycle -----------------------------------------------------------

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _switch_features(self, ev):
        datapath = ev.msg.datapath
        self.switches[datapath.id] = Switch(datapath, time.time(), hub.Event())
        self.core.metrics.switch_connected(datapath.id, True)
        log.info("switch %016x connected", datapath.id)
        hub.spawn(self._initial_sync, datapath.id)

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    def _switch_gone(self, ev):
        datapath = ev.datapath
        switch = self.switches.get(datapath.id)
        if switch is not None and switch.datapath is datapath:
            del self.switches[datapath.id]
            self.core.metrics.switch_connected(datapath.id, False)
            log.info("switch %016x disconnected", datapath.id)
        for (dpid, _), batch in list(self.batches.items()):
            if dpid == datapath.id:
                batch.errors.append("switch disconnected")
                batch.done.set()

    def _initial_sync(self, dpid: int) -> None:
        try:
            with self.lock:
                self.sync_switch(dpid)
        except Exception:
            log.exception("switch %016x: reconciliation failed", dpid)
        finally:
            if dpid in self.switches:
                self.switches[dpid].synced.set()

    def sync_switch(self, dpid: int) -> Changes:
        """Read what the switch holds and send only the difference to the desired state."""
        switch = self.switches[dpid]
        self._read_switch(switch)
        state = self.core.state
        for middlebox in state.on(dpid):
            backends = {b for r in middlebox.redirects for b in r.backends}
            self.resolve(dpid, backends)
        desired = compile_switch(state, dpid, self.neighbours.get(dpid, {}))
        changes = self._diff(switch, desired, switch.all_flows(), set(switch.groups))
        errors = self._send(switch, changes)
        log.info("switch %016x reconciled: %s%s", dpid, changes.summary(), f"; errors: {errors}" if errors else "")
        return changes

    def _read_switch(self, switch: Switch) -> None:
        datapath = switch.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        stats = self._request(datapath, parser.OFPFlowStatsRequest(
            datapath, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY, COOKIE_TAG, COOKIE_TAG_MASK, parser.OFPMatch()))
        switch.flows = {}
        for stat in stats:
            flow = Flow(stat.table_id, stat.priority, normal_match(stat.match.items()),
                        (("wire", encoded_actions(datapath, stat.instructions)),), stat.cookie)
            switch.holds(flow)
        descriptions = self._request(datapath, parser.OFPGroupDescStatsRequest(datapath, 0))
        switch.groups = {d.group_id: _wire_buckets([b.actions for b in d.buckets]) for d in descriptions}

    def _diff(self, switch: Switch, desired: SwitchConfig, installed, managed_groups: set[int]) -> Changes:
        datapath = switch.datapath

        def same_flow(want: Flow, have: Flow) -> bool:
            wire = encoded_actions(datapath, instructions(datapath, want.actions))
            return want.cookie == have.cookie and wire == have.actions[0][1]

        def same_group(want: Group, have: Group) -> bool:
            return self._group_wire(datapath, want) == switch.groups.get(have.group_id)

        present_groups = [Group(i, ()) for i in switch.groups if i in managed_groups]
        return reconcile(desired, installed, present_groups, managed_groups, same_flow, same_group)

    @staticmethod
    def _group_wire(datapath, group: Group) -> bytes:
        return _wire_buckets([[encode_action(datapath, a) for a in bucket] for bucket in group.buckets])

    # --- sending with confirmation ---------------------------------------------------

    def _send(self, switch: Switch, changes: Changes) -> list[str]:
        """Send the changes in a safe order (groups before the flows that use them), then a
        barrier; returns the errors the switch reported for these messages."""
        if changes.empty:
            return []
        datapath = switch.datapath
        messages = ([group_mod(datapath, g, "add") for g in changes.add_groups]
                    + [group_mod(datapath, g, "modify") for g in changes.modify_groups]
                    + [flow_mod(datapath, f, "add") for f in changes.add_flows]
                    + [flow_mod(datapath, f, "modify") for f in changes.modify_flows]
                    + [flow_mod(datapath, f, "delete") for f in changes.delete_flows]
                    + [group_mod(datapath, i, "delete") for i in changes.delete_groups])
        batch = Batch(set(), hub.Event())
        for message in messages:
            datapath.set_xid(message)
            batch.xids.add(message.xid)
            datapath.send_msg(message)
        barrier = datapath.ofproto_parser.OFPBarrierRequest(datapath)
        datapath.set_xid(barrier)
        self.batches[(datapath.id, barrier.xid)] = batch
        datapath.send_msg(barrier)
        confirmed = batch.done.wait(timeout=CONFIRM_TIMEOUT)
        self.batches.pop((datapath.id, barrier.xid), None)
        if not confirmed:
            batch.errors.append(f"switch did not confirm within {CONFIRM_TIMEOUT:g} s")
        self.core.metrics.openflow_errors(len(batch.errors))
        self._record(switch, changes)
        self.core.metrics.flows.labels(f"{datapath.id:016x}").set(switch.flow_count())
        return batch.errors

    def _record(self, switch: Switch, changes: Changes) -> None:
        """What the switch now holds as far as we know (re-read at every reconnection)."""
        datapath = switch.datapath
        for flow in changes.add_flows + changes.modify_flows:
            wire = encoded_actions(datapath, instructions(datapath, flow.actions))
            switch.holds(Flow(flow.table, flow.priority, flow.match, (("wire", wire),), flow.cookie))
        for flow in changes.delete_flows:
            switch.lost(flow)
        for group in changes.add_groups + changes.modify_groups:
            switch.groups[group.group_id] = self._group_wire(datapath, group)
        for group_id in changes.delete_groups:
            switch.groups.pop(group_id, None)

    def _request(self, datapath, request) -> list:
        """A multipart request; the bodies of all its replies, joined."""
        datapath.set_xid(request)
        key = (datapath.id, request.xid)
        body, done = [], hub.Event()
        self.replies[key] = (body, done)
        datapath.send_msg(request)
        answered = done.wait(timeout=CONFIRM_TIMEOUT)
        self.replies.pop(key, None)
        if not answered:
            raise TimeoutError(f"switch {datapath.id:016x} did not answer {type(request).__name__}")
        return body

    @set_ev_cls([ofp_event.EventOFPFlowStatsReply, ofp_event.EventOFPGroupDescStatsReply], MAIN_DISPATCHER)
    def _multipart_reply(self, ev):
        message = ev.msg
        waiting = self.replies.get((message.datapath.id, message.xid))
        if waiting is None:
            return
        body, done = waiting
        body.extend(message.body)
        if not message.flags & message.datapath.ofproto.OFPMPF_REPLY_MORE:
            done.set()

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def _barrier_reply(self, ev):
        batch = self.batches.get((ev.msg.datapath.id, ev.msg.xid))
        if batch is not None:
            batch.done.set()

    @set_ev_cls(ofp_event.EventOFPErrorMsg, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    def _error(self, ev):
        message = ev.msg
        text = f"OpenFlow error type {message.type} code {message.code}"
        for (dpid, _), batch in self.batches.items():
            if dpid == message.datapath.id and message.xid in batch.xids:
                batch.errors.append(text)
                return
        log.warning("switch %016x: %s for xid %d (no command waiting)", message.datapath.id, text, message.xid)

    # --- backend MAC resolution --------------------------------------------------------

    def resolve(self, dpid: int, addresses) -> None:
        """Learn the MACs of ``addresses`` by ARP from the switch, waiting up to ARP_TIMEOUT."""
        known = self.neighbours.setdefault(dpid, {})
        missing = {a for a in addresses if a not in known and ":" not in a}
        deadline = time.monotonic() + ARP_TIMEOUT
        while missing and time.monotonic() < deadline and dpid in self.switches:
            for address in missing:
                self._send_arp_probe(self.switches[dpid].datapath, address)
            for _ in range(20):
                hub.sleep(0.025)
                missing = {a for a in missing if a not in known}
                if not missing:
                    return

    def _send_arp_probe(self, datapath, address: str) -> None:
        """An ARP probe (sender 0.0.0.0, RFC 5227): answered, but cached by nobody."""
        frame = packet.Packet()
        frame.add_protocol(ethernet.ethernet(dst="ff:ff:ff:ff:ff:ff", src=RESOLVER_MAC, ethertype=ether.ETH_TYPE_ARP))
        frame.add_protocol(arp.arp(opcode=arp.ARP_REQUEST, src_mac=RESOLVER_MAC, src_ip="0.0.0.0",
                                   dst_mac="00:00:00:00:00:00", dst_ip=address))
        frame.serialize()
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        datapath.send_msg(parser.OFPPacketOut(datapath, ofp.OFP_NO_BUFFER, ofp.OFPP_CONTROLLER,
                                              [parser.OFPActionOutput(ofp.OFPP_FLOOD)], frame.data))

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev):
        reply = packet.Packet(ev.msg.data).get_protocol(arp.arp)
        if reply is None or reply.opcode != arp.ARP_REPLY or reply.dst_mac != RESOLVER_MAC:
            return
        dpid = ev.msg.datapath.id
        known = self.neighbours.setdefault(dpid, {})
        previous = known.get(reply.src_ip)
        known[reply.src_ip] = Neighbour(reply.src_mac, ev.msg.match["in_port"])
        if previous is not None and previous != known[reply.src_ip]:
            log.info("switch %016x: backend %s moved from %s to %s", dpid, reply.src_ip, previous,
                     known[reply.src_ip])
            hub.spawn(self._reinstall_users_of, dpid, reply.src_ip)

    def _reinstall_users_of(self, dpid: int, backend: str) -> None:
        with self.lock:
            state = self.core.state
            users = {(dpid, mb.mac) for mb in state.on(dpid) if any(backend in r.backends for r in mb.redirects)}
            self.install(state, state, users)

    def _refresh_neighbours(self) -> None:
        """Backends may move (a VM migrates, a NIC is replaced): ask again now and then."""
        while True:
            hub.sleep(ARP_REFRESH)
            for dpid in list(self.switches):
                backends = {b for mb in self.core.state.on(dpid) for r in mb.redirects for b in r.backends}
                for address in backends:
                    if dpid in self.switches:
                        self._send_arp_probe(self.switches[dpid].datapath, address)
