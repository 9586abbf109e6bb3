"""Prometheus metrics of the controller, in a registry of its own (one per app instance)."""

from __future__ import annotations

from gc import get_freeze_count
from time import monotonic

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


FROZEN_COUNT_AGE = 300.0  # seconds a count of the frozen objects is reported before another


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

        self.backends = Gauge("mbvisor_backend_up", "1 while a backend in use answers health checks",
                              ["dpid", "backend"], registry=self.registry)
        self.refused_switches = Counter("mbvisor_switches_refused", "Switch connections refused for announcing a "
                                        "datapath id their TLS certificate does not name", registry=self.registry)
        self.inventory = Gauge("mbvisor_annotated_ports", "Annotated VM ports the controller enforces, "
                               "and those refused for a duplicated identity", ["dpid", "state"], registry=self.registry)
        # The collector's frozen objects (app.quiet_collector): the state grows them as it
        # grows; growth while the state does not is garbage in cycles frozen for good.
        self.frozen = Gauge("mbvisor_gc_frozen_objects", "Objects frozen out of Python's cyclic garbage collector "
                            f"(counted at most every {FROZEN_COUNT_AGE:g} s)", registry=self.registry)
        self.frozen.set_function(self._frozen_count)
        self._frozen = (float("-inf"), 0)  # (monotonic time, count)

    def _frozen_count(self) -> int:
        """``gc.get_freeze_count`` walks every frozen object (5.6 ms for 700,000, holding
        the loop): counted again only once the last count is FROZEN_COUNT_AGE old."""
        counted_at, count = self._frozen
        now = monotonic()
        if now - counted_at >= FROZEN_COUNT_AGE:
            count = get_freeze_count()
            self._frozen = (now, count)
        return count

    def backend_up(self, dpid: int, backend: str, up: bool) -> None:
        self.backends.labels(f"{dpid:016x}", backend).set(1 if up else 0)

    def forget_backends(self, dpid: int, in_use: set[str]) -> None:
        """Only backends still in use keep a series."""
        name = f"{dpid:016x}"
        for labels in list(self.backends._metrics):
            if labels[0] == name and labels[1] not in in_use:
                self.backends.remove(*labels)

    def annotated_ports(self, dpid: int, accepted: int, refused: int) -> None:
        self.inventory.labels(f"{dpid:016x}", "accepted").set(accepted)
        self.inventory.labels(f"{dpid:016x}", "refused").set(refused)

    def command(self, status: str, count: int = 1) -> None:
        self.commands.labels(status).inc(count)

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
