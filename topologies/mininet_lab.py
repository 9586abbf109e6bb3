"""The mbvisor story on a Mininet network, with the real controller and agent.

    /usr/bin/python3 topologies/mininet_lab.py [--middleboxes N] [--switch NAME] [--python VENV_PYTHON]

Runs with the system Python (where Debian's mininet lives); everything of mbvisor runs as
a process of the project's virtual environment (``--python``, default ``$MBVISOR_PYTHON``
or ``.venv/bin/python``):

1. the real controller (``python -m mbvisor.agents.cli controller``) on free ports;
2. the ``mbvisor`` topology (mininet_topo.py) with a RemoteController on that port, OVS's
   userspace datapath, OpenFlow 1.3; static ARP;
3. the post-start hook: TX checksum offload off (checked), middleboxes annotated;
4. the real agent limited to this switch (``--bridge``);
5. attack (attacker -> mb1) and client (client -> mb1) UDP traffic, counted at mb1-eth0
   and by a UDP receiver in mb1;
6. in mb1, ``mbctl`` registers a firewall and adds a filter for the attacker's address;
7. the same traffic again: the attack is dropped in the switch, the client's still arrives.

It prints a before/after table and one machine-readable line ``RESULT {json}`` (also
written to ``--result FILE``), and removes everything it created (agent, Mininet network,
controller, regions, temporary state) on exit, error, Ctrl-C or SIGTERM.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

try:
    from mininet.log import setLogLevel
    from mininet.net import Mininet
    from mininet.node import OVSSwitch, RemoteController
except ImportError:  # pragma: no cover - depends on the machine
    sys.stderr.write("mininet_lab: Mininet is not importable by %s; install it with "
                     "`apt-get install -y mininet` and run this with /usr/bin/python3\n" % sys.executable)
    sys.exit(2)

sys.path.insert(0, HERE)
import mininet_topo  # noqa: E402  (next to this file)

ATTACK_PORT, CLIENT_PORT = 9, 7000

SENDER = r"""
import socket, sys, time
dst, port, count, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(b"mbvisor %06d " % i + b"x" * 50, (dst, port))
    time.sleep(gap)
print(count)
"""

RECEIVER = r"""
import socket, sys, time
port, expected, wait = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
s.settimeout(0.1)
print("ready", flush=True)
got, deadline = 0, time.time() + wait
while time.time() < deadline and (expected == 0 or got < expected):
    try:
        s.recv(2048)
        got += 1
    except socket.timeout:
        pass
print(got, flush=True)
"""


class LabError(RuntimeError):
    pass


def log(text):
    print(text, flush=True)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout, what, interval=0.1):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise LabError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def http_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"null")


def default_python():
    return os.environ.get("MBVISOR_PYTHON") or os.path.join(REPO, ".venv", "bin", "python")


class Lab:
    """Everything the run creates, so that :meth:`close` removes exactly that."""

    def __init__(self, args):
        self.args = args
        self.python = args.python
        self.switch = args.switch or "mbs" + secrets.token_hex(2)
        self.own_state = args.state_dir is None
        self.state = args.state_dir or tempfile.mkdtemp(prefix="mbvisor-mn-")
        os.makedirs(self.state, exist_ok=True)
        self.ofp_port, self.rest_port = free_port(), free_port()
        self.controller = self.agent = self.net = None
        self.regions = []
        self.pids = {}
        self.result = {"ok": False, "switch": self.switch, "error": None, "timings": {}}
        self.t0 = time.time()

    # bookkeeping -------------------------------------------------------------------------
    def mark(self, name):
        self.result["timings"][name] = round(time.time() - self.t0, 2)

    def record_pid(self, name, pid):
        """pids.json: what a caller may kill if this process itself is killed (-9)."""
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            cmdline = ""
        self.pids[name] = {"pid": pid, "cmdline": cmdline}
        self.save_pids()

    def save_pids(self):
        with open(os.path.join(self.state, "pids.json"), "w") as f:
            json.dump({"switch": self.switch, "pids": self.pids, "regions": self.regions}, f)

    # processes ---------------------------------------------------------------------------
    def spawn(self, name, argv):
        logfile = open(os.path.join(self.state, name + ".log"), "ab")
        process = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=REPO)
        logfile.close()
        self.record_pid(name, process.pid)
        return process

    def start_controller(self):
        token = os.path.join(self.state, "token")
        with open(token, "w") as f:
            f.write(secrets.token_hex(16))
        self.controller = self.spawn("controller", [
            self.python, "-m", "mbvisor.agents.cli", "controller", "--ofp-port", str(self.ofp_port),
            "--rest-port", str(self.rest_port), "--db", os.path.join(self.state, "controller.sqlite"),
            "--token-file", token])

        def healthy():
            if self.controller.poll() is not None:
                raise LabError("controller exited with %s:\n%s" % (self.controller.returncode, self.tail("controller")))
            try:
                return http_json("http://127.0.0.1:%d/v1/health" % self.rest_port)[0] == 200
            except OSError:
                return False

        wait_until(healthy, 30, "the controller's REST API on port %d" % self.rest_port)

    def start_agent(self):
        self.agent = self.spawn("agent", [
            self.python, "-m", "mbvisor.agents.cli", "agent", "--controller",
            "http://127.0.0.1:%d" % self.rest_port, "--token-file", os.path.join(self.state, "token"),
            "--status-file", os.path.join(self.state, "agent-status.json"), "--discovery-interval", "0.3",
            "--bridge", self.switch])

    def agent_channels(self):
        if self.agent.poll() is not None:
            raise LabError("agent exited with %s:\n%s" % (self.agent.returncode, self.tail("agent")))
        try:
            with open(os.path.join(self.state, "agent-status.json")) as f:
                return {c["channel"]: c for c in json.load(f)["channels"]}
        except (OSError, ValueError, KeyError):
            return {}

    def tail(self, name, lines=30):
        try:
            with open(os.path.join(self.state, name + ".log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # network -----------------------------------------------------------------------------
    def build(self):
        topo = mininet_topo.MbvisorTopo(n=self.args.middleboxes, switch=self.switch, dpid=self.args.dpid)
        self.dpid = topo.mbvisor["dpid"]
        self.result["dpid"] = self.dpid
        switch_class = partial(OVSSwitch, datapath="user", protocols="OpenFlow13")
        self.net = Mininet(topo=topo, switch=switch_class, controller=None, build=False, autoSetMacs=False,
                           autoStaticArp=False, listenPort=None)
        self.net.addController(RemoteController("c0", ip="127.0.0.1", port=self.ofp_port))
        self.net.build()
        for node in self.net.hosts + self.net.controllers:
            self.record_pid("mininet:" + node.name, node.pid)
        self.net.staticArp()
        self.net.start()
        for node in self.net.switches:
            self.record_pid("mininet:" + node.name, node.pid)

    def switch_synced(self):
        if self.controller.poll() is not None:
            raise LabError("controller exited with %s:\n%s" % (self.controller.returncode, self.tail("controller")))
        try:
            switches = http_json("http://127.0.0.1:%d/v1/switches" % self.rest_port)[1]["switches"]
        except (OSError, ValueError, KeyError, TypeError):
            return False  # busy or restarting: ask again
        return any(s["dpid"] == self.dpid and s["synced"] for s in switches)

    # measuring ---------------------------------------------------------------------------
    @staticmethod
    def rx_packets(host, name):
        for line in host.cmd("cat /proc/net/dev").splitlines():
            if line.strip().startswith(name + ":"):
                return int(line.split(":", 1)[1].split()[1])
        raise LabError("%s has no interface %s" % (host.name, name))

    def drops(self):
        out = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", self.switch], capture_output=True,
                             text=True, timeout=30).stdout
        return sum(int(m.group(1)) for line in out.splitlines() if re.search(r"actions=drop\b", line)
                   for m in [re.search(r"n_packets=(\d+)", line)] if m)

    def flow(self, src, dst, port, expect_arrival):
        """``src`` sends UDP to ``dst``; returns what reached dst's interface and its socket."""
        count = self.args.packets
        intf = dst.defaultIntf().name
        receiver = dst.popen([sys.executable, "-c", RECEIVER, str(port), str(count if expect_arrival else 0),
                              str(self.args.wait)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = receiver.stdout.readline().decode().strip()
            if line != "ready":
                raise LabError("UDP receiver in %s did not start: %r %s" % (dst.name, line, receiver.stderr.read()))
            rx0, drops0 = self.rx_packets(dst, intf), self.drops()
            out, err, code = src.pexec(sys.executable, "-c", SENDER, dst.IP(), str(port), str(count),
                                       str(self.args.gap))
            sent = (out + err).strip()
            out, err = receiver.communicate(timeout=self.args.wait + 10)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        if sent.splitlines()[-1:] != [str(count)]:
            raise LabError("sender in %s failed: %s" % (src.name, sent))
        time.sleep(0.2)  # the last frames' counters
        return {"sent": count, "reached": self.rx_packets(dst, intf) - rx0,
                "received_by_app": int(out.decode().split()[-1]), "dropped_in_switch": self.drops() - drops0}

    def mbctl(self, host, region, *arguments):
        out, err, code = host.pexec(self.python, "-m", "mbvisor.guest.mbctl", "--shm", region, "--json",
                                    "--timeout", "10", *arguments)
        answer = None
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                answer = json.loads(line)
                break
        return {"command": "mbctl " + " ".join(arguments), "exit": code, "answer": answer,
                "stderr": err.strip()[-300:]}

    # the story ---------------------------------------------------------------------------
    def run(self):
        log("*** mbvisor on Mininet: switch %s, state in %s" % (self.switch, self.state))
        self.start_controller()
        self.mark("controller_up")
        log("*** controller: OpenFlow 127.0.0.1:%d, REST 127.0.0.1:%d" % (self.ofp_port, self.rest_port))
        self.build()
        self.mark("network_up")
        wait_until(self.switch_synced, 30, "switch %s (dpid %s) connected and reconciled" % (self.switch, self.dpid))
        self.mark("switch_synced")
        hook = mininet_topo.post_start(self.net, self.args.region_dir)
        self.regions = [m["region"] for m in hook["middleboxes"]]
        self.save_pids()
        self.result["offload"] = {"ok": hook["offload_ok"], "commands": hook["offload"]}
        self.result["middleboxes"] = hook["middleboxes"]
        if not hook["offload_ok"]:
            raise LabError("TX checksum offload could not be turned off: %s"
                           % [r for r in hook["offload"] if not r["ok"]])
        log("*** post-start hook: TX checksum offload off on %d interfaces; channels:" % len(hook["offload"]))
        for line in mininet_topo.describe(self.net, hook["middleboxes"])[:1 + len(hook["middleboxes"])]:
            log("    " + line)
        self.start_agent()
        wanted = {m["channel"] for m in hook["middleboxes"]}
        wait_until(lambda: wanted <= set(self.agent_channels()), 20, "the agent serving %s" % sorted(wanted))
        self.mark("agent_serving")
        log("*** agent serves %s" % ", ".join(sorted(wanted)))

        net = self.net
        client, attacker, mb = net.get("client"), net.get("attacker"), net.get("mb1")
        box = hook["middleboxes"][0]
        before = {"attack": self.flow(attacker, mb, ATTACK_PORT, True),
                  "client": self.flow(client, mb, CLIENT_PORT, True)}
        self.mark("traffic_before")
        log("*** before: attack %(reached)d/%(sent)d packets reached mb1" % before["attack"])

        self.result["mbctl"] = [
            self.mbctl(mb, box["region"], "register", "firewall", "--mac", box["mac"], "--ip", box["ip"]),
            self.mbctl(mb, box["region"], "filter", "add", "--mac", box["mac"], "--layer", "ip",
                       "--src", attacker.IP())]
        for step in self.result["mbctl"]:
            status = (step["answer"] or {}).get("status")
            log("*** in mb1: %s -> exit %d %s" % (step["command"], step["exit"], status))
            if step["exit"] != 0:
                raise LabError("%s failed: %s" % (step["command"], step["answer"]))
        self.mark("offloaded")

        after = {"attack": self.flow(attacker, mb, ATTACK_PORT, False),
                 "client": self.flow(client, mb, CLIENT_PORT, True)}
        self.mark("traffic_after")
        self.result.update(before=before, after=after)
        self.result["agent_channel"] = self.agent_channels().get(box["channel"])
        self.report(before, after)
        # the userspace datapath may lose a frame on a busy machine: the client's traffic counts
        # as arriving when 90 % of it reaches mb1's socket; the attack must not reach mb1 at all
        self.result["ok"] = (before["attack"]["reached"] > 0 and after["attack"]["reached"] == 0
                             and after["client"]["received_by_app"] >= 0.9 * self.args.packets)

    def report(self, before, after):
        rows = [("attack packets sent", "attack", "sent"),
                ("attack packets reaching mb1-eth0", "attack", "reached"),
                ("attack datagrams received in mb1", "attack", "received_by_app"),
                ("attack packets dropped in the switch", "attack", "dropped_in_switch"),
                ("client packets sent", "client", "sent"),
                ("client packets reaching mb1-eth0", "client", "reached"),
                ("client datagrams received in mb1", "client", "received_by_app")]
        log("")
        log("%-40s %15s %15s" % ("", "before offload", "after offload"))
        for label, flow, key in rows:
            log("%-40s %15d %15d" % (label, before[flow][key], after[flow][key]))
        log("")

    # clean-up ----------------------------------------------------------------------------
    def close(self):
        problems = []

        def attempt(what, action):
            try:
                action()
            except BaseException as problem:  # keep cleaning up
                problems.append("%s: %s" % (what, problem))

        for name in ("agent", "controller"):
            process = getattr(self, name)
            if process is not None:
                attempt(name, lambda p=process: stop_group(p))
        if self.net is not None:
            for node in self.net.hosts + self.net.switches + self.net.controllers:
                attempt("interrupt " + node.name, lambda n=node: settle(n))
            attempt("net.stop", self.net.stop)
            for node in self.net.controllers:   # RemoteController.stop() leaves its shell
                attempt("terminate " + node.name, node.terminate)
        for region in self.regions:
            attempt("region " + region, lambda r=region: os.path.exists(r) and os.unlink(r))
        self.result["leftovers"] = leftovers(self.switch, self.args.region_dir,
                                             [p["pid"] for n, p in self.pids.items() if n.startswith("mininet:")]
                                             + [p["pid"] for n, p in self.pids.items() if n in ("agent", "controller")])
        self.result["cleanup_problems"] = problems
        if self.own_state and not self.args.keep_state:
            shutil.rmtree(self.state, ignore_errors=True)


def stop_group(process, timeout=10):
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def settle(node, timeout=3.0):
    """A node interrupted in the middle of cmd() (Ctrl-C): finish that command first."""
    if not getattr(node, "waiting", False) or not node.shell:
        return
    node.sendInt()
    deadline = time.time() + timeout
    while node.waiting and time.time() < deadline:
        node.monitor(timeoutms=100)
    node.waiting = False


def leftovers(switch, region_dir, pids):
    """What of this run still exists: its bridge, its `<switch>-ethN` links, its regions,
    its processes (Mininet shells, agent, controller)."""
    found = {}
    bridges = subprocess.run(["ovs-vsctl", "--timeout=10", "list-br"], capture_output=True, text=True).stdout.split()
    if switch in bridges:
        found["bridge"] = [switch]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = re.findall(r"^\d+: (%s(?:-eth\d+)?)[@:]" % re.escape(switch), links, re.M)
    if names:
        found["links"] = names
    regions = [e for e in os.listdir(region_dir) if e.startswith("mbvisor-mn-%s-" % switch)]
    if regions:
        found["regions"] = regions
    alive = [pid for pid in pids if os.path.exists("/proc/%d" % pid) and not _zombie(pid)]
    if alive:
        found["processes"] = alive
    return found


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def parse_args(argv):
    parser = argparse.ArgumentParser(description="mbvisor on a Mininet network (controller, agent, mbctl).")
    parser.add_argument("--middleboxes", type=int, default=1, help="middlebox hosts (default 1)")
    parser.add_argument("--switch", help="switch name (default mbs + 4 random hex digits)")
    parser.add_argument("--dpid", help="datapath id in hex (default: derived from the switch name)")
    parser.add_argument("--python", default=default_python(),
                        help="the mbvisor virtual environment's python (default $MBVISOR_PYTHON or .venv/bin/python)")
    parser.add_argument("--packets", type=int, default=200, help="packets per flow and phase (default 200)")
    parser.add_argument("--gap", type=float, default=0.001, help="seconds between packets (default 0.001)")
    parser.add_argument("--wait", type=float, default=3.0, help="seconds a receiver waits (default 3)")
    parser.add_argument("--region-dir", default="/dev/shm", help="where channel regions go (default /dev/shm)")
    parser.add_argument("--state-dir", help="logs, token, database, pids.json (default: a temporary directory)")
    parser.add_argument("--keep-state", action="store_true", help="keep the temporary state directory")
    parser.add_argument("--result", help="also write the JSON result to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="Mininet's info messages")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if os.geteuid() != 0:
        sys.stderr.write("mininet_lab: run as root (Mininet and Open vSwitch)\n")
        return 2
    if not os.access(args.python, os.X_OK):
        sys.stderr.write("mininet_lab: no mbvisor python at %s (make setup, or --python /path/to/venv/bin/python)\n"
                         % args.python)
        return 2
    setLogLevel("info" if args.verbose else "warning")

    def on_sigterm(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    lab = Lab(args)
    try:
        lab.run()
    except KeyboardInterrupt:
        lab.result["error"] = "interrupted"
        log("*** interrupted; cleaning up")
    except Exception as problem:
        lab.result["error"] = "%s: %s" % (type(problem).__name__, problem)
        traceback.print_exc()
        for name in ("controller", "agent"):
            sys.stderr.write("--- %s log (last lines) ---\n%s\n" % (name, lab.tail(name)))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lab.close()
        lab.mark("cleaned_up")
    result = lab.result
    if result["leftovers"]:
        result["ok"] = False
        log("*** LEFTOVERS: %s" % result["leftovers"])
    log("*** %s in %.1f s" % ("OK" if result["ok"] else "FAILED", time.time() - lab.t0))
    line = json.dumps(result, sort_keys=True)
    if args.result:
        with open(args.result, "w") as f:
            f.write(line + "\n")
    print("RESULT " + line, flush=True)
    if result["error"] == "interrupted":
        return 130
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
