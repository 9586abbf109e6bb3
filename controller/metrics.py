"""Prometheus metrics of the controller, in a registry of its own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commands = Counter("mbvisor_commands", "Commands handled, by answer status", ["status"],
                                registry=self.registry)
        self.switches = Gauge("mbvisor_switch_connected", "1 while the switch is connected", ["dpid"],
                              registry=self.registry)
        self.errors = Counter("mbvisor_openflow_errors", "OpenFlow errors reported by switches",
                              registry=self.registry)
        self.flows = Gauge("mbvisor_flows_installed", "Flows mbvisor holds on the switch", ["dpid"],
                           registry=self.registry)
        self.handled = Gauge("mbvisor_packets_handled_in_switch",
                             "Packets the middlebox would otherwise have received, dropped or redirected in the switch (each counted once)",
                             ["dpid", "mac"], registry=self.registry)

    def command(self, status: str) -> None:
        self.commands.labels(status).inc()

    def switch_connected(self, dpid: int, connected: bool) -> None:
        self.switches.labels(f"{dpid:016x}").set(1 if connected else 0)

    def switch_gone(self, dpid: int) -> None:
        """A disconnected switch's flow count is unknown, not its last value."""
        try:
            self.flows.remove(f"{dpid:016x}")
        except KeyError:
            pass

    def flows_installed(self, dpid: int, count: int) -> None:
        self.flows.labels(f"{dpid:016x}").set(count)

    def set_handled(self, rows: dict[tuple[int, str], int]) -> None:
        """Exactly one series per existing middlebox: a deleted one's series goes with it."""
        self.handled.clear()
        for (dpid, mac), packets in sorted(rows.items()):
            self.handled.labels(f"{dpid:016x}", mac).set(packets)

    def openflow_errors(self, count: int) -> None:
        if count:
            self.errors.inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
