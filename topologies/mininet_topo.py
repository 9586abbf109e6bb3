"""Mininet topologies for mbvisor: a switch with a client, an attacker, a backend and N
middlebox hosts whose channels the host agent finds in Open vSwitch.

For ``mn`` (Debian's mininet 2.3.0 runs with the system ``/usr/bin/python3``)::

    mn --custom topologies/mininet_topo.py --topo mbvisor,2 \\
       --switch ovs,datapath=user,protocols=OpenFlow13 \\
       --controller remote,ip=127.0.0.1,port=6653 --nolistenport

or, safer on a shared host, the same through this file (``mn`` without its global
clean-up on errors, see docs/mininet.md)::

    /usr/bin/python3 topologies/mininet_topo.py --topo mbvisor,2 \\
       --switch ovs,datapath=user,protocols=OpenFlow13 --controller remote,port=6653

Topology parameters: ``mbvisor[,N][,switch=NAME][,dpid=HEX]``.  N middleboxes (default 1);
the switch is ``mbs`` + 4 random hex digits unless named (unique names keep concurrent
labs apart: Mininet deletes interfaces named like the ones it is about to create), and its
datapath id is derived from its name unless given.

Hosts (fixed addresses):

======== ============ =====================
host     IP           MAC
======== ============ =====================
client   10.0.0.1     52:34:56:00:00:01
attacker 10.0.0.66    52:34:56:00:00:66
backend  10.0.0.11    52:34:56:00:00:11
mb1..mbN 10.0.0.5..   52:34:56:00:12:22..
======== ============ =====================

Every host is a :class:`MbvisorHost`: IPv6 off (no router solicitations or MLD reports
in the counters) and TX checksum offload off on both ends of its link, because OVS's
userspace datapath forwards frames with unfinished TCP/UDP checksums otherwise.

After ``net.start()``, :func:`post_start` re-applies the offload settings (checking each
command) and :func:`annotate_middleboxes` creates one channel region per middlebox
(``/dev/shm/mbvisor-mn-<switch>-<host>``) and sets ``external_ids:mbvisor-channel``,
``attached-mac`` and ``vm-id`` on the switch-side interface, as a QEMU launch script
would, and on every host's interface the operator's trust annotations:
``mbvisor-tenant`` (middleboxes and the backend are tenant ``mbvisor``, so the backend
can be a redirect's; client and attacker are each their own) and ``mbvisor-ips`` (the
host's address).  In the ``mn`` CLI this happens by itself when the CLI starts (and is undone when
it ends); the ``mbvisor`` CLI command does it by hand: ``mbvisor annotate [DIR]``,
``mbvisor status``, ``mbvisor clear``.

Only Mininet and the standard library are imported here: the file runs under the system
Python, where the mbvisor virtual environment's packages are not importable.
"""

import hashlib
import os
import re
import secrets
import subprocess
import sys

import mininet
from mininet.cli import CLI as _MininetCLI
from mininet.log import error as _error
from mininet.log import info as _info
from mininet.node import Host
from mininet.topo import Topo

MBVISOR_REGION_SIZE = 1 << 20            # what `mbvisor channel create` makes (QEMU: size=1M)
MBVISOR_SUBNET = "10.0.0.0/24"
MBVISOR_IPS = {"client": "10.0.0.1", "attacker": "10.0.0.66", "backend": "10.0.0.11"}
MBVISOR_MACS = {"client": "52:34:56:00:00:01", "attacker": "52:34:56:00:00:66",
                "backend": "52:34:56:00:00:11"}
MBVISOR_MAX_MIDDLEBOXES = 50
MBVISOR_TENANTS = {"client": "client", "attacker": "attacker", "backend": "mbvisor", "middlebox": "mbvisor"}
ANNOTATION_KEYS = ("mbvisor-channel", "attached-mac", "vm-id", "mbvisor-tenant", "mbvisor-ips")

# Switches built by this process (the scoped clean-up of the `python3 mininet_topo.py` way
# of running mn).  Kept on the mininet package because `mn --custom` executes this file as
# a second copy besides the imported one.
_CREATED = mininet.__dict__.setdefault("mbvisor_switches", set())


def middlebox_address(index):
    """(IP, MAC) of middlebox ``index`` (1-based): 10.0.0.5, 52:34:56:00:12:22, ..."""
    return "10.0.0.%d" % (4 + index), "52:34:56:00:12:%02x" % (0x21 + index)


def dpid_for(switch):
    """A datapath id derived from the switch name: 4d42 6d6e <8 hex of sha1(name)>."""
    return "4d426d6e" + hashlib.sha1(switch.encode()).hexdigest()[:8]


def region_path(switch, host, region_dir="/dev/shm"):
    return os.path.join(region_dir, "mbvisor-mn-%s-%s" % (switch, host))


class MbvisorHost(Host):
    """A host for OVS's userspace datapath: IPv6 off, TX checksum offload off on both ends
    of its links (the switch end also without GRO, which breaks TCP there)."""

    def config(self, **params):
        self.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
                 " net.ipv6.conf.lo.disable_ipv6=1")
        for intf in self.intfList():
            peer = _peer(intf)
            if peer is not None and not peer.node.inNamespace:
                # the switch end lives in the root namespace: no IPv6 chatter towards us
                _run(["sysctl", "-qw", "net.ipv6.conf.%s.disable_ipv6=1" % peer.name])
        result = super().config(**params)
        self.mbvisor_offload = disable_tx_offload_for(self)
        return result


class MbvisorTopo(Topo):
    """``--topo mbvisor[,N][,switch=NAME][,dpid=HEX]``"""

    def build(self, n=1, switch=None, dpid=None):
        n = int(n)
        if not 1 <= n <= MBVISOR_MAX_MIDDLEBOXES:
            raise ValueError("mbvisor topology: 1 to %d middleboxes, not %d" % (MBVISOR_MAX_MIDDLEBOXES, n))
        switch = switch or "mbs" + secrets.token_hex(2)
        longest = "%s-eth%d" % (switch, n + 3)
        if len(longest) > 15 or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", switch):
            raise ValueError("mbvisor topology: switch name %r is not usable (letters/digits, "
                             "and %r must fit in 15 characters)" % (switch, longest))
        dpid = ("%016x" % int(str(dpid).replace(":", ""), 16)) if dpid else dpid_for(switch)
        _CREATED.add(switch)
        self.mbvisor = {"switch": switch, "dpid": dpid, "middleboxes": []}
        s = self.addSwitch(switch, dpid=dpid)
        for name in ("client", "attacker", "backend"):
            self.addHost(name, cls=MbvisorHost, ip=MBVISOR_IPS[name] + "/24", mac=MBVISOR_MACS[name],
                         mbvisor=name)
            self.addLink(name, s)
        for index in range(1, n + 1):
            ip, mac = middlebox_address(index)
            name = "mb%d" % index
            self.addHost(name, cls=MbvisorHost, ip=ip + "/24", mac=mac, mbvisor="middlebox")
            self.addLink(name, s)
            self.mbvisor["middleboxes"].append(name)


topos = {"mbvisor": MbvisorTopo}


# --- after net.start() -------------------------------------------------------------------

def _run(argv):
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    return done.returncode, done.stdout.strip()


def _peer(intf):
    link = getattr(intf, "link", None)
    if link is None:
        return None
    return link.intf2 if link.intf1 is intf else link.intf1


def _tx_checksumming(node, name):
    out, _, code = node.pexec("ethtool", "-k", name)
    match = re.search(r"^tx-checksumming: (\w+)", out, re.M)
    return match.group(1) if code == 0 and match else "unknown"


def disable_tx_offload_for(host):
    """``ethtool -K <intf> tx off`` on the host's interfaces and their switch ends (+ ``gro
    off`` there); returns one record per interface with the command's outcome."""
    records = []
    for intf in host.intfList():
        peer = _peer(intf)
        if peer is None:
            continue
        for node, name, extra in ((host, intf.name, []), (peer.node, peer.name, ["gro", "off"])):
            argv = ["ethtool", "-K", name, "tx", "off", *extra]
            out, err, code = node.pexec(*argv)
            state = _tx_checksumming(node, name)
            records.append({"node": node.name, "interface": name, "command": " ".join(argv),
                            "exit": code, "tx_checksumming": state, "ok": code == 0 and state == "off",
                            "output": (out + err).strip()[-200:]})
    return records


def disable_tx_offload(net):
    return [record for host in net.hosts for record in disable_tx_offload_for(host)]


def _middleboxes(net):
    return [h for h in net.hosts if h.params.get("mbvisor") == "middlebox"]


def _vsctl(*args):
    code, out = _run(["ovs-vsctl", "--timeout=10", *args])
    if code != 0:
        raise RuntimeError("ovs-vsctl %s: %s" % (" ".join(args), out))
    return out


def _identity(host, switch):
    """The operator's annotations of a host's switch-side interface (``vm-id``: unique per
    switch, as the channel names need)."""
    intf = host.defaultIntf()
    return ["external_ids:attached-mac=%s" % intf.MAC(), "external_ids:vm-id=%s-%s" % (switch, host.name),
            "external_ids:mbvisor-tenant=%s" % MBVISOR_TENANTS[host.params.get("mbvisor")],
            'external_ids:mbvisor-ips="%s"' % host.IP()]


def annotate_middleboxes(net, region_dir="/dev/shm"):
    """What a QEMU launch script does for each middlebox: a fresh 1 MiB channel region and
    the switch-side interface's ``external_ids``; the other hosts get their trust
    annotations (no channel).  Returns one record per middlebox."""
    for host in net.hosts:
        peer = _peer(host.defaultIntf())
        if host.params.get("mbvisor") in ("client", "attacker", "backend") and peer is not None:
            _vsctl("set", "Interface", peer.name, *_identity(host, peer.node.name))
    records = []
    for host in _middleboxes(net):
        intf = host.defaultIntf()
        peer = _peer(intf)
        switch = peer.node.name
        region = region_path(switch, host.name, region_dir)
        fd = os.open(region, os.O_RDWR | os.O_CREAT, 0o600)
        try:                                   # zeroed: the guest initialises it
            os.ftruncate(fd, 0)
            os.ftruncate(fd, MBVISOR_REGION_SIZE)
        finally:
            os.close(fd)
        vm_id = "%s-%s" % (switch, host.name)
        _vsctl("set", "Interface", peer.name, "external_ids:mbvisor-channel=%s" % region, *_identity(host, switch))
        ofport = _vsctl("get", "Interface", peer.name, "ofport")
        records.append({"host": host.name, "ip": host.IP(), "mac": intf.MAC(), "host_interface": intf.name,
                        "interface": peer.name, "switch": switch, "ofport": int(ofport) if ofport.isdigit() else ofport,
                        "region": region, "vm_id": vm_id, "channel": "%s/%s" % (vm_id, peer.name)})
    net.mbvisor_regions = sorted({*getattr(net, "mbvisor_regions", []), *[r["region"] for r in records]})
    return records


def clear_annotations(net):
    """Undo :func:`annotate_middleboxes`: external_ids removed, regions deleted."""
    for host in net.hosts:
        peer = _peer(host.defaultIntf())
        if host.params.get("mbvisor") and peer is not None:
            _run(["ovs-vsctl", "--timeout=10", "--if-exists", "remove", "Interface", peer.name, "external_ids",
                  *ANNOTATION_KEYS])
    for region in getattr(net, "mbvisor_regions", []):
        if os.path.exists(region):
            os.unlink(region)
    net.mbvisor_regions = []


def post_start(net, region_dir="/dev/shm"):
    """The topology's post-start hook: offloads off (checked) and middleboxes annotated."""
    offload = disable_tx_offload(net)
    return {"offload": offload, "offload_ok": all(r["ok"] for r in offload),
            "middleboxes": annotate_middleboxes(net, region_dir)}


def describe(net, records=None):
    """Human-readable lines: where each middlebox's channel is and how to use it."""
    records = records if records is not None else [
        {"host": h.name, "ip": h.IP(), "mac": h.MAC(), "interface": _peer(h.defaultIntf()).name,
         "region": region_path(_peer(h.defaultIntf()).node.name, h.name)} for h in _middleboxes(net)]
    lines = ["%-6s %-10s %-17s %-14s %s" % ("host", "ip", "mac", "switch port", "channel region")]
    for r in records:
        lines.append("%-6s %-10s %-17s %-14s %s" % (r["host"], r["ip"], r["mac"], r["interface"], r["region"]))
    if records:
        switches = sorted({_peer(h.defaultIntf()).node.name for h in _middleboxes(net)})
        r = records[0]
        lines += ["agent:  .venv/bin/mbvisor agent %s" % " ".join("--bridge %s" % s for s in switches),
                  "guest:  %s .venv/bin/mbctl --shm %s register firewall --mac %s --ip %s"
                  % (r["host"], r["region"], r["mac"], r["ip"]),
                  "        %s .venv/bin/mbctl --shm %s filter add --mac %s --layer ip --src %s"
                  % (r["host"], r["region"], r["mac"], MBVISOR_IPS["attacker"])]
    return lines


# --- the mn CLI ----------------------------------------------------------------------------

def _do_mbvisor(self, line):
    """mbvisor [annotate [DIR] | status | clear]: channels of the middlebox hosts
    (annotate: offloads off, regions in DIR (default /dev/shm) and OVS external_ids)."""
    words = line.split()
    action = words[0] if words else "annotate"
    try:
        if action == "annotate":
            result = post_start(self.mn, words[1] if len(words) > 1 else "/dev/shm")
            bad = [r for r in result["offload"] if not r["ok"]]
            for r in bad:
                _error("offload: %s on %s failed: %s\n" % (r["command"], r["node"], r["output"]))
            _info("\n".join(describe(self.mn, result["middleboxes"])) + "\n")
        elif action == "status":
            for host in _middleboxes(self.mn):
                peer = _peer(host.defaultIntf())
                _info("%s %s %s\n" % (host.name, peer.name,
                                      _run(["ovs-vsctl", "get", "Interface", peer.name, "external_ids"])[1]))
        elif action == "clear":
            clear_annotations(self.mn)
            _info("annotations and regions removed\n")
        else:
            _error("usage: mbvisor [annotate [DIR] | status | clear]\n")
    except Exception as problem:  # the CLI must survive a failed command
        _error("mbvisor %s: %s\n" % (action, problem))


_MininetCLI.do_mbvisor = _do_mbvisor


class MbvisorCLI(_MininetCLI):
    """Mininet's CLI; on an mbvisor network it annotates the middleboxes when the
    interactive CLI starts and removes the annotations and regions when it ends."""

    def __init__(self, mininet, stdin=sys.stdin, script=None, **kwargs):
        hook = script is None and bool(_middleboxes(mininet)) and not getattr(mininet, "mbvisor_regions", None)
        if hook:
            self.mn = mininet
            _do_mbvisor(self, "annotate")
            _info("*** mbvisor: middleboxes annotated; `mbvisor clear` undoes it, `help mbvisor`\n")
        try:
            super().__init__(mininet, stdin=stdin, script=script, **kwargs)
        finally:
            if hook:
                clear_annotations(mininet)


# `mn --custom` takes module-level names as its settings: `CLI` replaces its CLI class.
CLI = MbvisorCLI


# --- `python3 mininet_topo.py ARGS`: mn with this file, without mn's global clean-up -------

def _scoped_cleanup():
    """Instead of `mn -c` (which removes EVERY OVS bridge and `*-ethN` link on the machine
    and kills every Mininet and ryu-manager process): only this run's switches, links and
    regions."""
    for switch in sorted(_CREATED):
        _run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", switch])
        code, out = _run(["ip", "-o", "link", "show"])
        for name in re.findall(r"^\d+: (%s-eth\d+)[@:]" % re.escape(switch), out, re.M):
            _run(["ip", "link", "del", name])
        prefix = "mbvisor-mn-%s-" % switch
        for entry in os.listdir("/dev/shm"):
            if entry.startswith(prefix):
                os.unlink(os.path.join("/dev/shm", entry))
    done = ", ".join(sorted(_CREATED)) or "nothing (this run had built no switch)"
    _info("*** mbvisor: cleaned up only %s (no global `mn -c`)\n" % done)


def _run_mn(argv):
    import runpy

    import mininet.clean

    mininet.clean.cleanup = mininet.clean.Cleanup.cleanup = _scoped_cleanup
    if "-c" in argv or "--clean" in argv:
        raise SystemExit("mininet_topo.py: `-c` would clean up the whole machine; "
                         "remove your bridge by name (ovs-vsctl del-br mbsXXXX) instead")
    sys.argv = ["mn", "--custom", os.path.abspath(__file__), *argv]
    runpy.run_path("/usr/bin/mn", run_name="__main__")


if __name__ == "__main__":
    _run_mn(sys.argv[1:])
