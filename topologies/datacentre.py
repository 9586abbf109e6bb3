"""A data centre on one machine: several hypervisors and one controller (issue 15's lab).

    from mbvisor.topologies.datacentre import DataCentre

    with DataCentre(hypervisors=3) as dc:              # unique prefix such as "mbx3f2a"
        a = dc.add_vm(0)                               # annotated VM on hypervisor 0
        b = dc.add_vm(2, channel=True)                 # ... with a channel region its agent serves
        dc.lab.fill_arp()
        assert a.ping(b) == 3                          # across hypervisor 1's bridge
        dc.bridge(0).dump_flows()                      # hypervisor 0's own switch
        dc.hypervisors[2].crash_and_restart_vswitchd()
    # every process, namespace, veth, directory and region it made is gone here

Each hypervisor is what a KVM host running mbvisor has, in miniature:

* a network namespace ``<prefix>-hv<i>`` in which its own ``ovs-vswitchd`` forwards real
  packets on the userspace (``netdev``) datapath (in the root namespace it could not: the
  machine's own switch holds the ``ovs-netdev`` tap there);
* its own ``ovsdb-server`` (root namespace, sockets in the hypervisor's directory): its
  :class:`~netlab.Bridge` runs ``ovs-vsctl --db=unix:<dir>/db.sock`` and ``ovs-ofctl ...
  unix:<dir>/<bridge>.mgmt``, never the machine's switch; one bridge ``<prefix>b<i>``,
  ``fail-mode=secure``, datapath id :func:`~netlab.datapath_id_for` (prefix, i);
* its own agent (``mbvisor agent --ovsdb unix:<dir>/db.sock``);
* a management link over which its vswitchd reaches the controller by TCP: a veth from
  its ``mgmt`` (``10.254.X.<i+2>/24``) to a port ``<prefix>m<i>`` of a Linux bridge
  ``<prefix>ctl`` in the root namespace, the management network, whose own address
  ``10.254.X.1`` is the only one the controller listens on for OpenFlow (X: a /24 no
  root-namespace address or route touches; nothing outside reaches it).

The underlay chains the hypervisors: a veth between hypervisor i and i+1, a port ``ul<j>``
(ofport 1000 + j, towards hypervisor j) on each bridge, annotated ``mbvisor-underlay`` with
the datapath ids of the hypervisors beyond it (a balancer that migrated away from its
backends sends their traffic back through it).  mbvisor's table misses hand frames to
NORMAL, which learns and floods across the chain (no loop: a chain has none).

A VM is a namespace ``<prefix>-<name>`` whose ``eth0`` is a veth to port ``tap<n>`` (ofport
n, the n-th VM of its hypervisor) annotated as an operator would (``attached-mac``,
``vm-id``, ``mbvisor-tenant``, ``mbvisor-ips``, and ``mbvisor-channel`` with a channel):
the controller runs the trust model (``annotations``), so commands are accepted only for a
port the hypervisor's agent published.  Defaults: ``10.0.<i+1>.<n>/16``, one tenant.

Everything is made under one :class:`~netlab.Lab`'s prefix and removed at close, also
when the build fails halfway.  Nothing the lab did not make is touched.  The machine's
own Open vSwitch carries nothing of it, but its database must answer: a Lab reserves its
prefix by listing the machine's bridges (:func:`netlab.leftovers`).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .agent_run import AgentProcess, make_region
from .controller_run import Controller, ControllerError
from .netlab import (Bridge, Host, HostToolsMissing, Lab, NetlabError, datapath_id_for, run, start_daemon,
                     stop_daemon, wait_until)

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
MANAGEMENT = ipaddress.IPv4Network("10.254.0.0/16")  # a /24 of it per data centre
MAX_HYPERVISORS = 253  # .2 to .254 of the /24 (.1 is the controller's)
UNDERLAY_OFPORT = 1000
DEFAULT_TENANT = "blue"
TOOLS = {"ip": "iproute2", "ethtool": "ethtool", "sysctl": "procps", "ovsdb-tool": "openvswitch-switch",
         "ovsdb-server": "openvswitch-switch", "ovs-vswitchd": "openvswitch-switch",
         "ovs-vsctl": "openvswitch-switch", "ovs-ofctl": "openvswitch-switch"}


def say(text: str) -> None:
    """Progress of the long steps, on stderr (pytest shows it with a failure)."""
    print(f"[datacentre] {text}", file=sys.stderr, flush=True)


def require_tools() -> None:
    """Raise :class:`HostToolsMissing` naming all this machine lacks: root, commands, the
    schema the hypervisors' databases are made from, and the machine's ovsdb-server (the
    Lab's prefix reservation lists its bridges); unlike :func:`netlab.require_host_tools`,
    no running ovs-vswitchd: each hypervisor starts its own."""
    problems = [f"not root (euid {os.geteuid()}): namespaces need root"] if os.geteuid() else []
    missing = [f"{tool} (Debian package {package})" for tool, package in TOOLS.items() if not shutil.which(tool)]
    if missing:
        problems.append("missing commands: " + ", ".join(missing))
    if not SCHEMA.exists():
        problems.append(f"no Open vSwitch schema at {SCHEMA}")
    if shutil.which("ovs-vsctl") and run(["ovs-vsctl", "--timeout=5", "show"], check=False).returncode:
        problems.append("the machine's ovsdb-server does not answer (start Open vSwitch: `make setup`)")
    if problems:
        raise HostToolsMissing("the data centre cannot be built:\n  - " + "\n  - ".join(problems))


def free_management_network(prefix: str) -> ipaddress.IPv4Network:
    """A /24 of 10.254.0.0/16 that no root-namespace address or route overlaps, tried from
    one the prefix picks (two labs at once start at different places)."""
    used = [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in json.loads(run(["ip", "-j", "-4", "addr"]).stdout) for a in link.get("addr_info", [])]
    used += [ipaddress.ip_network(r["dst"], strict=False)
             for r in json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout)
             if r.get("dst", "default") != "default"]
    candidates = list(MANAGEMENT.subnets(new_prefix=24))
    start = int(prefix[-4:], 16) % len(candidates)
    for network in candidates[start:] + candidates[:start]:
        if not any(network.overlaps(other) for other in used):
            return network
    raise NetlabError(f"every /24 of {MANAGEMENT} is in use in the root namespace")


class VM(Host):
    """A :class:`~netlab.Host` on a hypervisor: ``eth0`` is a veth to a ``tap<n>`` port of
    its bridge; ``vm_id``, ``tenant`` and ``region`` (its channel, or None) are its
    annotations."""

    def __init__(self, hypervisor: Hypervisor, name: str, port: str, mac: str,
                 interface: ipaddress.IPv4Interface):
        lab = hypervisor.lab
        super().__init__(lab, name, f"{lab.prefix}-{name}", port, mac, interface, hypervisor.bridge)
        self.hypervisor = hypervisor
        self.vm_id: str | None = None
        self.tenant: str | None = None
        self.region: str | None = None


class Hypervisor:
    """One host of the data centre (see the module's description)."""

    def __init__(self, lab: Lab, index: int, address: ipaddress.IPv4Interface):
        self.lab, self.index = lab, index
        self.namespace = f"{lab.prefix}-hv{index}"
        self.directory = Path(lab.workdir) / f"hv{index}"
        self.link = f"{lab.prefix}m{index}"   # the management veth's end on the management bridge
        self.address = address                # its ``mgmt`` interface's
        self.dpid = datapath_id_for(lab.prefix, index)
        name = f"{lab.prefix}b{index}"
        self.db = f"unix:{self.directory / 'db.sock'}"
        self.bridge = Bridge(lab, name, self.dpid, "OpenFlow13", owned=False, db=self.db,
                             ofctl_target=f"unix:{self.directory / name}.mgmt")
        self.agent: AgentProcess | None = None
        self.vms: list[VM] = []
        self._ovsdb: subprocess.Popen | None = None
        self._vswitchd: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<Hypervisor {self.index} {self.namespace} {self.bridge.name} dpid={self.dpid:016x}>"

    @property
    def vswitchd_pid(self) -> int | None:
        return self._vswitchd.pid if self._vswitchd is not None else None

    def pids(self) -> list[int]:
        """Its processes (ovsdb-server, ovs-vswitchd, agent) still running."""
        processes = (self._ovsdb, self._vswitchd, self.agent.process if self.agent else None)
        return [p.pid for p in processes if p is not None and p.poll() is None]

    def in_namespace(self, *argv: str) -> str:
        return run(["ip", "netns", "exec", self.namespace, *argv], where=f" (hypervisor {self.index})").stdout

    def build(self, controller: Controller, management: str, target: str) -> None:
        """Everything of the hypervisor; ``management``: the bridge its management link joins."""
        self.directory.mkdir()
        self._make_namespace(self.namespace)
        self._management(management)
        self._start_ovsdb()
        self.start_vswitchd()
        self.bridge.vsctl("add-br", self.bridge.name, "--", "set", "bridge", self.bridge.name,
                          "datapath_type=netdev", "fail_mode=secure", "protocols=OpenFlow13",
                          f"other-config:datapath-id={self.dpid:016x}", "other-config:disable-in-band=true")
        wait_until(lambda: self.bridge.read_dpid() == self.dpid, 10, f"{self.bridge.name} to take its datapath id")
        self.bridge.set_controller(target)
        self.agent = AgentProcess(controller, self.directory, bridges=(self.bridge.name,),
                                  options=("--ovsdb", f"unix:{self.directory / 'db.sock'}"))
        self.agent.start()
        wait_until(lambda: self.agent.status().get("ovsdb", {}).get("connected") or not self.agent.alive(),
                   20, f"the agent of hypervisor {self.index} to follow its ovsdb-server (log {self.agent.log})")
        if not self.agent.alive():
            raise NetlabError(f"the agent of hypervisor {self.index} exited: {self.agent.log.read_text()[-500:]}")

    def _make_namespace(self, namespace: str) -> None:
        """A namespace the lab removes; no IPv6 in it, so no chatter reaches a bridge or VM."""
        run(["ip", "netns", "add", namespace])
        self.lab.adopt(namespaces=[namespace])
        run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1"])
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def _management(self, management: str) -> None:
        run(["ip", "link", "add", self.link, "type", "veth", "peer", "name", "mgmt", "netns", self.namespace])
        self.lab.adopt(links=[self.link])
        run(["ip", "link", "set", self.link, "master", management, "up"])
        run(["ip", "-n", self.namespace, "addr", "add", str(self.address), "dev", "mgmt"])
        run(["ip", "-n", self.namespace, "link", "set", "mgmt", "up"])

    def _start_ovsdb(self) -> None:
        d = self.directory
        run(["ovsdb-tool", "create", d / "conf.db", SCHEMA])
        self._ovsdb = start_daemon("ovsdb-server", ["ovsdb-server", d / "conf.db", f"--remote=punix:{d / 'db.sock'}",
                                               f"--unixctl={d / 'ovsdb-server.ctl'}",
                                               f"--log-file={d / 'ovsdb-server.log'}"], d, d / "db.sock")
        self.bridge.vsctl("--no-wait", "init")

    def start_vswitchd(self) -> None:
        """ovs-vswitchd in the hypervisor's namespace (its ``.mgmt`` sockets in its
        directory); its bridge and ports come from the database, its flows from the controller."""
        d = self.directory
        self._vswitchd = start_daemon(
            "ovs-vswitchd", ["ip", "netns", "exec", self.namespace, "ovs-vswitchd", self.db, "--disable-system",
                             f"--unixctl={d / 'ovs-vswitchd.ctl'}", f"--log-file={d / 'ovs-vswitchd.log'}"],
            d, d / "ovs-vswitchd.ctl", environment={"OVS_RUNDIR": str(d)})

    def kill_vswitchd(self) -> None:
        """SIGKILL ovs-vswitchd: what a crash does (the controller sees the switch go)."""
        self._vswitchd.kill()
        self._vswitchd.wait(10)

    def crash_and_restart_vswitchd(self) -> None:
        """A crash and its supervisor: a new ovs-vswitchd on the same database."""
        self.kill_vswitchd()
        self.start_vswitchd()

    def plug(self, name: str, ip: ipaddress.IPv4Interface, mac: str) -> VM:
        """A VM namespace whose ``eth0`` is a veth to a new port ``tap<n>`` (ofport n)."""
        number = len(self.vms) + 1
        vm = VM(self, name, f"tap{number}", mac, ip)
        self._make_namespace(vm.namespace)
        run(["ip", "-n", self.namespace, "link", "add", vm.port_name, "type", "veth", "peer", "name", "eth0",
             "netns", vm.namespace])
        # OVS forwards frames with unfinished checksums the receiver drops, and GRO breaks TCP (netlab.py).
        self.in_namespace("ethtool", "-K", vm.port_name, "tx", "off", "gro", "off")
        run(["ip", "-n", self.namespace, "link", "set", vm.port_name, "up"])
        vm.run(["ethtool", "-K", "eth0", "tx", "off"])
        vm.run(["ip", "link", "set", "eth0", "address", mac])
        vm.run(["ip", "addr", "add", str(ip), "dev", "eth0"])
        vm.run(["ip", "link", "set", "eth0", "up"])
        self._add_port(vm.port_name, number)
        vm.ofport = number
        self.vms.append(vm)
        self.bridge.hosts.append(vm)
        return vm

    def link_to(self, other: Hypervisor, mine_leads_to, theirs_leads_to) -> None:
        """The underlay between this hypervisor and ``other``: a veth, a port on each bridge,
        annotated (``mbvisor-underlay``) with the datapath ids of the hypervisors beyond it."""
        mine, theirs = f"ul{other.index}", f"ul{self.index}"
        run(["ip", "-n", self.namespace, "link", "add", mine, "type", "veth", "peer", "name", theirs,
             "netns", other.namespace])
        for hypervisor, port, peer, beyond in ((self, mine, other, mine_leads_to),
                                               (other, theirs, self, theirs_leads_to)):
            hypervisor.in_namespace("ethtool", "-K", port, "tx", "off", "gro", "off")
            run(["ip", "-n", hypervisor.namespace, "link", "set", port, "up"])
            hypervisor._add_port(port, UNDERLAY_OFPORT + peer.index,
                                 f'external_ids:mbvisor-underlay="{",".join(f"{d:016x}" for d in beyond)}"')

    def _add_port(self, port: str, ofport: int, *settings: str) -> None:
        self.bridge.vsctl("add-port", self.bridge.name, port, "--", "set", "interface", port,
                          f"ofport_request={ofport}", *settings)
        if self.bridge.ofport(port) != ofport:
            raise NetlabError(f"{port} on {self.bridge.name} did not get ofport {ofport}")

    def stop(self) -> None:
        """Its agent, then its switch's daemons, each even if another could not be stopped;
        idempotent."""
        try:
            self._stop_agent()
        finally:
            try:
                stop_daemon(self._vswitchd)
            finally:
                stop_daemon(self._ovsdb)

    def _stop_agent(self) -> None:
        if self.agent is None:
            return
        try:
            self.agent.stop()
        except subprocess.TimeoutExpired:
            self.agent.stop(signal.SIGKILL)


class DataCentre:
    """``with DataCentre(hypervisors=3, hosts_per_hypervisor=2) as dc:`` (see the module).

    ``channels``: the VMs it makes itself get a channel region their agent serves;
    ``controller_environment``: more for the controller (``MBVISOR_AUDIT_INTERVAL``, ...);
    ``progress``: where the long steps are told (``None``: nowhere).
    """

    def __init__(self, hypervisors: int = 2, hosts_per_hypervisor: int = 0, *, channels: bool = False,
                 controller_environment: dict[str, str] | None = None,
                 progress: Callable[[str], None] | None = say):
        if not 1 <= hypervisors <= MAX_HYPERVISORS:
            raise ValueError(f"a data centre has 1 to {MAX_HYPERVISORS} hypervisors, not {hypervisors}")
        self.size, self.hosts_per_hypervisor, self.channels = hypervisors, hosts_per_hypervisor, channels
        self.controller_environment = controller_environment or {}
        self.say = progress or (lambda text: None)
        self.lab: Lab | None = None
        self.controller: Controller | None = None
        self.controller_address: str | None = None
        self.hypervisors: list[Hypervisor] = []
        self.vms: dict[str, VM] = {}
        self._regions: list[str] = []

    def __repr__(self) -> str:
        return f"<DataCentre {self.prefix}: {len(self.hypervisors)} hypervisor(s), {len(self.vms)} VM(s)>"

    @property
    def prefix(self) -> str | None:
        return self.lab.prefix if self.lab else None

    @property
    def openflow_target(self) -> str:
        """What every hypervisor's bridge is pointed at."""
        return f"tcp:{self.controller_address}:{self.controller.ofp_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.controller.rest_port}"

    def bridge(self, hypervisor: int) -> Bridge:
        return self.hypervisors[hypervisor].bridge

    # -- building
    def __enter__(self) -> DataCentre:
        require_tools()
        self.lab = Lab()
        try:
            self._build()
        except BaseException as error:
            if isinstance(error, Exception):
                error.add_note(self._log_tails())
            self._close_after(error)
            raise
        return self

    def _log_tails(self, lines: int = 8) -> str:
        """The end of the controller's and agents' logs: they go with the lab's directory,
        and a failed build is diagnosed from them."""
        logs = sorted(Path(self.lab.workdir).glob("*/*.log"))
        return "\n".join(f"--- {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in logs if log.name in ("controller.log", "agent.log"))

    def _build(self) -> None:
        started = time.monotonic()
        network = free_management_network(self.prefix)
        self.controller_address = str(network[1])
        management = self._management_bridge(network)
        self.say(f"lab {self.prefix}: starting the controller (OpenFlow on {self.controller_address}, "
                 "REST on 127.0.0.1)")
        state = Path(self.lab.workdir) / "controller"
        state.mkdir()
        self.controller = Controller(state, trust="annotations", environment=self.controller_environment,
                                     arguments=("--ofp-host", self.controller_address))
        self.controller.start()  # held before it starts: a start that fails half-way is stopped at close
        for index in range(self.size):
            self.say(f"hypervisor {index}: namespace, ovsdb-server, ovs-vswitchd, bridge, agent")
            address = ipaddress.IPv4Interface(f"{network[index + 2]}/{network.prefixlen}")
            hypervisor = Hypervisor(self.lab, index, address)
            self.hypervisors.append(hypervisor)
            hypervisor.build(self.controller, management, self.openflow_target)
        for left, right in zip(self.hypervisors, self.hypervisors[1:]):
            left.link_to(right, [h.dpid for h in self.hypervisors[right.index:]],
                         [h.dpid for h in self.hypervisors[:left.index + 1]])
        self.say(f"underlay: {' - '.join(f'hv{h.index}' for h in self.hypervisors)}; waiting for the switches")
        for hypervisor in self.hypervisors:
            self.wait_synced(hypervisor.index)
            self._wait_underlay_published(hypervisor)
        for index in range(self.size):
            for _ in range(self.hosts_per_hypervisor):
                self.add_vm(index, channel=self.channels)
            if self.hosts_per_hypervisor:
                self.say(f"hypervisor {index}: {self.hosts_per_hypervisor} VM(s) annotated and published")
        self.say(f"lab {self.prefix} ready in {time.monotonic() - started:.1f} s")

    def _management_bridge(self, network: ipaddress.IPv4Network) -> str:
        """The management network: a Linux bridge of ours holding the controller's OpenFlow
        address, which every hypervisor's management link joins (no other interface has it)."""
        link = f"{self.prefix}ctl"
        run(["ip", "link", "add", link, "type", "bridge"])
        self.lab.adopt(links=[link])
        run(["ip", "addr", "add", f"{self.controller_address}/{network.prefixlen}", "dev", link])
        run(["ip", "link", "set", link, "up"])
        return link

    def add_vm(self, hypervisor: int, name: str | None = None, ip: str | None = None, mac: str | None = None,
               tenant: str = DEFAULT_TENANT, channel: bool = False) -> VM:
        """A VM on hypervisor ``hypervisor``, annotated (``vm-id`` = its name), returned once
        the controller holds its port from the hypervisor's agent (and, with ``channel``, the
        agent serves its new region), so a command for it can be accepted at once."""
        where = self.hypervisors[hypervisor]
        number = len(where.vms) + 1
        name = name or f"vm{hypervisor}-{number}"
        if name in self.vms:
            raise ValueError(f"lab {self.prefix} already has a VM {name!r}")
        digits = self.prefix[-4:]
        vm = where.plug(name, ipaddress.IPv4Interface(ip or f"10.0.{hypervisor + 1}.{number}/16"),
                        (mac or f"02:{digits[:2]}:{digits[2:]}:{hypervisor + 1:02x}:00:{number:02x}").lower())
        self.vms[name] = self.lab.hosts[name] = vm
        if channel:
            vm.region = make_region(f"{self.prefix}-{name}")
            self._regions.append(vm.region)
        vm.vm_id, vm.tenant = name, tenant
        vm.annotate(tenant, vm_id=name, channel=vm.region)
        self._wait_published(vm)
        if vm.region:
            where.agent.wait_serving(f"{name}/{vm.port_name}")
        return vm

    def _wait_underlay_published(self, hypervisor: Hypervisor) -> None:
        path = f"/v1/switches/{hypervisor.dpid:016x}/ports"
        links = len([h for h in self.hypervisors if abs(h.index - hypervisor.index) == 1])

        def published() -> bool:
            return len(self.controller.get(path)[1].get("underlay", [])) == links
        wait_until(published, 20, f"the agent of hypervisor {hypervisor.index} to publish its underlay ports",
                   interval=0.05)

    def _wait_published(self, vm: VM) -> None:
        path = f"/v1/switches/{vm.hypervisor.dpid:016x}/ports"

        def published() -> bool:
            body = self.controller.get(path)[1]
            refused = [r["reason"] for r in body["refused"] if r["port"] == vm.ofport]
            if refused:
                raise NetlabError(f"the controller refuses {vm.name}'s port: {refused[0]}")
            return any(p["port"] == vm.ofport and p["mac"] == vm.mac for p in body["ports"])
        wait_until(published, 20, f"the agent of hypervisor {vm.hypervisor.index} to publish {vm.name}'s port",
                   interval=0.05)

    # -- the controller's view
    def switch_view(self, hypervisor: int) -> dict | None:
        """The controller's ``/v1/switches`` entry for the hypervisor's switch (None until it
        first connected)."""
        dpid = f"{self.hypervisors[hypervisor].dpid:016x}"
        return next((s for s in self.controller.get("/v1/switches")[1]["switches"] if s["dpid"] == dpid), None)

    def wait_synced(self, hypervisor: int, after: float = 0.0, timeout: float = 30.0) -> dict:
        """Wait until the controller holds the switch connected (since Unix time ``after``)
        and reconciled; return its view."""
        def synced() -> dict | None:
            view = self.switch_view(hypervisor)
            return view if view and view["connected"] and view["synced"] and view["connected_at"] > after else None
        return wait_until(synced, timeout, f"hypervisor {hypervisor}'s switch connected and reconciled",
                          interval=0.05)

    def describe(self) -> str:
        """How to reach everything: for ``mbvisor lab`` and docs/datacentre.md."""
        token = self.controller.state_dir / "token"
        lines = [(f"lab {self.prefix}: {len(self.hypervisors)} hypervisor(s), {len(self.vms)} VM(s), "
                  f"work directory {self.lab.workdir}"),
                 f"controller  REST {self.rest_url}  token file {token}  OpenFlow {self.openflow_target}",
                 f"            log {self.controller.log}",
                 f"  curl -H \"Authorization: Bearer $(cat {token})\" {self.rest_url}/v1/switches"]
        for h in self.hypervisors:
            lines += [f"hypervisor {h.index}  namespace {h.namespace}  bridge {h.bridge.name}  dpid {h.dpid:016x}",
                      f"  ovs-vsctl --db={h.db} show",
                      f"  ovs-ofctl -O OpenFlow13 dump-flows {h.bridge.ofctl_target}",
                      f"  mbvisor agent-status --status-file {h.agent.status_file}"]
            lines += [f"  VM {vm.name:10} ip netns exec {vm.namespace} ...  {vm.cidr}  {vm.mac}  port {vm.port_name} "
                      f"(ofport {vm.ofport})" + (f"  channel {vm.region}" if vm.region else "") for vm in h.vms]
        lines.append("underlay " + " - ".join(f"hv{h.index}" for h in self.hypervisors)
                     + f" (veth pairs; on each bridge, port ul<j> (ofport {UNDERLAY_OFPORT}+j) leads to hypervisor j)")
        return "\n".join(lines)

    # -- teardown
    def pids(self) -> list[int]:
        """Every process of the lab's own still running (controller, daemons, agents)."""
        controller = self.controller.process if self.controller else None
        own = [controller.pid] if controller is not None and controller.poll() is None else []
        return own + [pid for h in self.hypervisors for pid in h.pids()]

    def close(self) -> None:
        """Stop every process, then remove everything the lab made; idempotent.  Raises
        :class:`NetlabError` listing what could not be removed (after trying everything)."""
        errors: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as error:
                errors.append(f"{what}: {error}")

        for hypervisor in self.hypervisors:
            attempt(f"stop hypervisor {hypervisor.index}", hypervisor.stop)
        if self.controller is not None:
            attempt("stop the controller", self.controller.stop)
        for region in map(Path, self._regions):
            attempt(f"remove {region}", functools.partial(region.unlink, missing_ok=True))
        self._regions.clear()
        if self.lab is not None:
            attempt(f"remove lab {self.prefix}", self.lab.close)
        if errors:
            raise NetlabError(f"data centre {self.prefix}: cleanup incomplete:\n  - " + "\n  - ".join(errors))

    def _close_after(self, error: BaseException) -> None:
        try:
            self.close()
        except Exception as cleanup:  # do not hide the error that ended the block
            error.add_note(f"datacentre: cleanup after this error also failed: {cleanup}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self._close_after(exc)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def run_lab(hypervisors: int, hosts_per_hypervisor: int) -> int:
    """``mbvisor lab``: build a data centre (every VM with a channel), print how to reach it,
    stay up until Ctrl-C or SIGTERM, then remove everything."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with DataCentre(hypervisors, hosts_per_hypervisor, channels=True) as dc:
            print(dc.describe(), flush=True)
            say("up; Ctrl-C (or SIGTERM) stops it and removes everything it made")
            while True:
                signal.pause()
    except KeyboardInterrupt:
        say("stopped; everything the lab made was removed")
        return 0
    except (NetlabError, ControllerError) as error:
        print(f"mbvisor lab: {error}", *getattr(error, "__notes__", ()), sep="\n", file=sys.stderr)
        return 1
