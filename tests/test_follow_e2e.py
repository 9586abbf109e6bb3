"""``mbctl follow nft`` end to end, and fail2ban, with nothing simulated: an OVS bridge with
a client, an attacker and the middlebox "mb" (namespaces), the real controller and agent
processes, and inside mb's namespace a real nftables ruleset, the real ``mbctl follow`` as
a process, a real ``fail2ban-server`` of the test's own (its config, socket, pid file,
database and log in tmp_path: the machine's /etc/fail2ban/jail.local and /var/run/fail2ban
are never used) watching the log of a tiny login service.

What the host holds is read from the controller's REST view, what the guest's firewall
holds from ``nft -j``, what fail2ban did from ``fail2ban-client status``, and whether a
packet reached mb from mb's own rx counter; every wait is on such a condition with a
deadline.  The time from a ban to its flow is a benchmark's to measure, not asserted here.

fail2ban 1.0.2's ``nftables`` action keeps its bans in table ``inet f2b-table``, set
``addr-set-<jail>`` (``addr6-set-<jail>`` for IPv6), dropped by chain ``f2b-chain``."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest
from mbvisor.guest.follow import sync
from mbvisor.guest.follow.source import SOURCE
from mbvisor.topologies import netlab
from mbvisor.topologies.agent_run import AgentProcess, annotate, make_region
from mbvisor.topologies.controller_run import Controller
from mbvisor.topologies.netlab import wait_until

pytestmark = pytest.mark.host

MAC = "52:34:56:00:12:22"
MB_IP, CLIENT_IP, ATTACKER_IP = "10.0.0.5", "10.0.0.1", "10.0.0.66"
MB_COOKIE = (0x4D42 << 48) | int(MAC.replace(":", ""), 16)  # the controller's cookie for mb's flows
FILTER_LIMIT = 2000      # MBVISOR_MAX_FILTERS here: the churn's set stays far below, whatever the dice say
AGENT_RATE = ("--rate", "5000", "--burst", "10000")  # 1000 changes not paced by the product's 200/s
EXIT_NOT_FOLLOWED = 7    # mbctl's exit code: the list may not be offloaded (README)
LOGIN_PORT = 2222
JAIL = "mblogin"
BANTIME = 10             # seconds: long enough for the traffic checks while banned, short for the test
F2B_TABLE, F2B_SET = "f2b-table", f"addr-set-{JAIL}"
OFFLOADABLE_BANACTION = "nftables[type=custom, blocktype=drop, chain_hook=prerouting, actionstart_on_demand=false]"
MBCTL = str(Path(sys.executable).parent / "mbctl")  # the venv's: fail2ban's /bin/sh has its own PATH


# --- the lab ------------------------------------------------------------------------------


@dataclass
class Site:
    """The module's lab: the bridge, its three hosts, the controller and mb's channel."""

    lab: netlab.Lab
    bridge: netlab.Bridge
    controller: Controller
    client: netlab.Host
    attacker: netlab.Host
    mb: netlab.Host
    region: str

    def filters(self) -> set[str]:
        """mb's filters on the host, as the controller's REST view lists them."""
        status, body = self.controller.get(f"/v1/middleboxes/{self.bridge.dpid:016x}/{MAC}")
        return set(body["filters"]) if status == 200 else set()

    def wait_filters(self, expected: set[str], timeout: float = 60.0, what: str = "the host's filters") -> None:
        wait_until(lambda: self.filters() == expected, timeout=timeout, what=what)

    def nft(self, *arguments: str, script: str | None = None) -> str:
        """nft inside mb's namespace (its own ruleset, never the machine's)."""
        return self.mb.run(["nft", *arguments], input=script).stdout

    def channel_state(self) -> dict:
        """``mbctl status --json``: the ring's counters (published, answered, pending)."""
        done = self.mb.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", self.region, "--json", "status"])
        return json.loads(done.stdout)

    def dropped_from(self, address: str) -> int:
        """Packets mb's drop flows for a source ``address`` dropped in the switch."""
        return sum(flow.n_packets for flow in self.bridge.flows()
                   if flow.actions == "drop" and flow.cookie == MB_COOKIE and f"nw_src={address}" in flow.raw)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One lab for the module; the per-test state is reset by ``fresh``."""
    netlab.require_host_tools()
    state = tmp_path_factory.mktemp("follow-e2e")
    region = make_region()
    try:
        with netlab.Lab() as lab:
            controller = Controller(state, environment={"MBVISOR_MAX_FILTERS": str(FILTER_LIMIT)}).start()
            agent = None
            try:
                bridge = lab.bridge(controller=controller.target, fail_mode="secure")
                client = lab.host("client", ip=f"{CLIENT_IP}/24")
                attacker = lab.host("attacker", ip=f"{ATTACKER_IP}/24")
                mb = lab.host("mb", ip=f"{MB_IP}/24", mac=MAC)
                controller.wait_switch(bridge.dpid)
                lab.fill_arp([client, attacker, mb])
                annotate(mb, region, "vm-mb")
                agent = AgentProcess(controller, state, bridges=(bridge.name,), options=AGENT_RATE).start()
                agent.wait_serving(f"vm-mb/{mb.port_name}")
                yield Site(lab, bridge, controller, client, attacker, mb, region)
            finally:
                if agent is not None:
                    agent.stop()
                controller.stop()
    finally:
        os.unlink(region)


@pytest.fixture
def fresh(site):
    """mb registered as a firewall with no filters, through its own channel (``mbctl
    register`` in its namespace), and an empty nftables ruleset in its namespace."""
    site.controller.batch(site.bridge.dpid, site.mb.ofport, [f"X {MAC}"])
    site.nft("flush", "ruleset")
    site.mb.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", site.region, "register", "firewall",
                 "--mac", MAC, "--ip", MB_IP])
    assert site.filters() == set()
    yield site
    site.nft("flush", "ruleset")


def source_filter(address: str) -> str:
    return sync.filter_text(MAC, SOURCE, address)


# --- traffic ------------------------------------------------------------------------------


def reaches_mb(site: Site, sender: netlab.Host, count: int = 20) -> None:
    """``count`` datagrams from ``sender`` all arrive at mb's interface."""
    before = site.mb.rx_packets()
    assert sender.send_udp(site.mb, 9, count=count) == count
    wait_until(lambda: site.mb.rx_packets() - before >= count, timeout=10,
               what=f"{count} datagrams from {sender.name} reaching mb")


def dropped_in_switch(site: Site, sender: netlab.Host, count: int = 20) -> None:
    """``count`` datagrams from ``sender`` are counted by mb's drop flow and none reaches mb."""
    before, dropped = site.mb.rx_packets(), site.dropped_from(sender.ip)
    assert sender.send_udp(site.mb, 9, count=count) == count
    wait_until(lambda: site.dropped_from(sender.ip) - dropped >= count, timeout=10,
               what=f"{count} datagrams from {sender.name} dropped in the switch")
    assert site.mb.rx_packets() == before


# A login service of the middlebox: one line "user password" per connection; a wrong
# password is logged as fail2ban's filter expects it (fail2ban reads the date in front).
LOGIN_SERVICE = r"""
import socket, sys, time
port, log_path = int(sys.argv[1]), sys.argv[2]
server = socket.create_server(("0.0.0.0", port))
while True:
    connection, (address, _) = server.accept()
    with connection:
        connection.settimeout(5)
        try:
            words = connection.makefile("r").readline().split()
        except OSError:
            continue
        if len(words) == 2 and words[1] == "secret":
            connection.sendall(b"welcome\n")
        elif words:
            with open(log_path, "a") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} Failed login for {words[0]} from {address}\n")
            connection.sendall(b"denied\n")
"""

LOGIN = r"""
import socket, sys
address, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    with socket.create_connection((address, port), timeout=3) as connection:
        connection.sendall(f"{user} {password}\n".encode())
        print(connection.makefile("r").readline().strip() or "closed")
except OSError as error:
    print(f"error: {error}")
"""


def login(site: Site, host: netlab.Host, user: str, password: str) -> str:
    """What mb's login service answered ``host``: welcome, denied, or an error."""
    return host.python(LOGIN, site.mb.ip, LOGIN_PORT, user, password).stdout.strip().splitlines()[-1]


@pytest.fixture
def login_service(fresh, tmp_path):
    """The login service running in mb; its log file's path (what fail2ban watches)."""
    log = tmp_path / "login.log"
    log.touch()
    process = fresh.mb.popen([sys.executable, "-I", "-c", LOGIN_SERVICE, str(LOGIN_PORT), str(log)])
    try:
        fresh.mb.wait_listening(LOGIN_PORT, process=process)
        yield log
    finally:
        process.stop()


# --- fail2ban -------------------------------------------------------------------------------


class Fail2ban:
    """A ``fail2ban-server`` in mb's namespace with a configuration directory of its own:
    fail2ban.conf (log, socket, pid file, database in ``directory``), the jail ``mblogin``
    on the login service's log, a filter for it, and the actions it uses copied in."""

    def __init__(self, host: netlab.Host, directory: Path, logpath: Path, action: str):
        self.host, self.directory = host, directory
        self.conf = directory / "fail2ban"
        self.socket, self.log = directory / "fail2ban.sock", directory / "fail2ban.log"
        (self.conf / "filter.d").mkdir(parents=True)
        (self.conf / "action.d").mkdir()
        shutil.copy("/etc/fail2ban/action.d/nftables.conf", self.conf / "action.d")
        shutil.copy(str(files("mbvisor.guest.follow") / "fail2ban" / "mbvisor.conf"), self.conf / "action.d")
        (self.conf / "fail2ban.conf").write_text(
            "[Definition]\nloglevel = INFO\n"
            f"logtarget = {self.log}\nsyslogsocket = auto\nsocket = {self.socket}\n"
            f"pidfile = {directory / 'fail2ban.pid'}\ndbfile = {directory / 'fail2ban.sqlite3'}\n"
            "dbpurgeage = 1d\nallowipv6 = auto\n")
        (self.conf / "filter.d" / f"{JAIL}.conf").write_text(
            "[Definition]\nfailregex = ^\\s*Failed login for \\S+ from <HOST>\\s*$\n")
        (self.conf / "jail.conf").write_text(
            "[DEFAULT]\nbackend = polling\nignoreip = 127.0.0.1/8\n\n"
            f"[{JAIL}]\nenabled = true\nfilter = {JAIL}\nlogpath = {logpath}\nport = {LOGIN_PORT}\n"
            f"maxretry = 3\nfindtime = 60\nbantime = {BANTIME}\naction = {action}\n")
        self.process = host.popen(["fail2ban-server", "-c", self.conf, "-s", self.socket,
                                   "-p", directory / "fail2ban.pid", "-x", "-f"])
        try:  # the jail list, not the jail's status: asking for a jail not made yet logs an ERROR
            wait_until(lambda: re.search(rf"Jail list:.*\b{JAIL}\b", self.client("status", check=False).stdout or ""),
                       timeout=30, what=f"fail2ban's jail {JAIL} started ({self.log})")
        except BaseException:
            self.stop()
            raise

    def client(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return netlab.run(["fail2ban-client", "-c", self.conf, "-s", self.socket, *arguments], check=check)

    def banned(self) -> list[str]:
        """The jail's banned addresses, as ``fail2ban-client status`` lists them."""
        status = self.client("status", JAIL).stdout
        listed = re.search(r"Banned IP list:\s*(.*)$", status, re.MULTILINE)
        assert listed, status
        return listed[1].split()

    def wait_nftables_rule(self) -> str:
        """The chain of fail2ban's nftables action once it drops or rejects the jail's set: its
        actionstart runs after the jail reports started, and a follower started before it
        would find no set (exit 7)."""
        def listed() -> str | None:
            done = self.host.run(["nft", "list", "chain", "inet", F2B_TABLE, "f2b-chain"], check=False)
            return done.stdout if done.returncode == 0 and f"@{F2B_SET} " in done.stdout else None
        return wait_until(listed, timeout=30, what=f"fail2ban's nftables action started ({self.log})")

    def logged(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.alive():
            self.client("stop", check=False)
        self.process.stop()


@pytest.fixture
def fail2ban(fresh, login_service, tmp_path):
    """``fail2ban(action)`` starts fail2ban with the jail's ``action``; stopped afterwards."""
    started: list[Fail2ban] = []

    def start(action: str) -> Fail2ban:
        started.append(Fail2ban(fresh.mb, tmp_path / f"f2b-{len(started)}", login_service, action))
        return started[-1]

    yield start
    for server in started:
        server.stop()


# --- the follower ----------------------------------------------------------------------------


class FollowerProcess:
    """``mbctl follow nft`` run by the guest's Python inside mb's namespace (its output in
    the lab's log of the process)."""

    def __init__(self, site: Site, sets: list[tuple[str, str, str]], lock_dir: Path):
        arguments = [argument for followed in sets for argument in ("--set", *followed)]
        self.process = site.mb.popen([sys.executable, "-m", "mbvisor.guest.mbctl", "follow", "nft", *arguments,
                                      "--shm", site.region, "--mac", MAC, "--lock-dir", lock_dir, "--verbose"])
        self.descriptions = [f"nft set {' '.join(followed)}" for followed in sets]

    def output(self) -> str:
        return self.process.output()

    def wait_started(self, timeout: float = 60.0) -> str:
        """The status line of its first complete sync."""
        def started() -> str | None:
            self.process.check_alive()
            return next((line for line in self.output().splitlines() if line.startswith("mbctl follow: following ")),
                        None)
        line = wait_until(started, timeout=timeout, what=f"the follower's first sync ({self.process.log_path})")
        assert all(f"{description} (source)" in line for description in self.descriptions), line
        return line

    def sent_in_frames(self) -> tuple[int, int]:
        """Adds and deletes of every frame it sent (its --verbose lines)."""
        frames = re.findall(r"sent ([0-9]+) add\(s\), ([0-9]+) delete\(s\)", self.output())
        return sum(int(adds) for adds, _ in frames), sum(int(deletes) for _, deletes in frames)

    def terminate(self) -> int:
        """SIGTERM to the follower alone (it ends its nft monitor itself); its exit code."""
        if self.process.alive():
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.popen.wait(timeout=30)
        finally:
            self.process.stop()

    def kill(self) -> None:
        """kill -9, the follower alone: its nft monitor is orphaned, as after a crash."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.popen.wait(timeout=30)


@pytest.fixture
def follow(fresh, tmp_path):
    """``follow(sets)`` starts a follower; every one still running is stopped afterwards."""
    started: list[FollowerProcess] = []

    def start(sets: list[tuple[str, str, str]]) -> FollowerProcess:
        started.append(FollowerProcess(fresh, sets, tmp_path / "lock"))
        return started[-1]

    yield start
    for follower in started:
        follower.process.stop()


# --- a. fail2ban's offloadable set followed -----------------------------------------------------


def test_a_fail2ban_ban_is_dropped_in_the_switch_and_its_unban_lets_the_attacker_back(
        fresh, fail2ban, follow):
    site = fresh
    jail = fail2ban(OFFLOADABLE_BANACTION)
    assert f"@{F2B_SET} drop" in jail.wait_nftables_rule()
    follower = follow([("inet", F2B_TABLE, F2B_SET)])
    assert "0 element(s)" in follower.wait_started()
    assert site.filters() == set()
    assert login(site, site.client, "alice", "secret") == "welcome"
    reaches_mb(site, site.attacker)

    for attempt in range(3):
        assert login(site, site.attacker, "root", f"guess{attempt}") == "denied"
    wait_until(lambda: jail.banned() == [ATTACKER_IP], timeout=30,
               what=f"fail2ban to ban the attacker ({jail.log})")
    assert listed_elements(site, "inet", F2B_TABLE, F2B_SET) == {ATTACKER_IP}  # the guest's own ban
    site.wait_filters({source_filter(ATTACKER_IP)}, timeout=10, what="the ban offloaded to the host")

    dropped_in_switch(site, site.attacker)
    reaches_mb(site, site.client)
    assert login(site, site.client, "alice", "secret") == "welcome"
    assert jail.banned() == [ATTACKER_IP], "the checks above outlasted the ban: raise BANTIME"

    wait_until(lambda: jail.banned() == [], timeout=BANTIME + 30, what="fail2ban to unban the attacker")
    site.wait_filters(set(), timeout=10, what="the unban offloaded to the host")
    reaches_mb(site, site.attacker)
    assert site.attacker.tcp_connect(site.mb, LOGIN_PORT) == "open"
    assert follower.terminate() == 0, follower.output()
    assert "not offloaded:" not in follower.output()


def test_a_fail2ban_restart_and_stop_are_followed(fresh, fail2ban, follow):
    """fail2ban deletes its table when a jail stops and creates it anew when it starts: the
    follower must follow the new set, and withdraw the filters while there is none."""
    site = fresh
    jail = fail2ban(OFFLOADABLE_BANACTION)
    jail.wait_nftables_rule()
    follower = follow([("inet", F2B_TABLE, F2B_SET)])
    follower.wait_started()
    jail.client("set", JAIL, "banip", "192.0.2.77")
    site.wait_filters({source_filter("192.0.2.77")}, timeout=10, what="a manual ban offloaded")

    jail.client("restart", JAIL)
    jail.wait_nftables_rule()
    jail.client("set", JAIL, "banip", "192.0.2.88")
    wait_until(lambda: source_filter("192.0.2.88") in site.filters(), timeout=45,
               what=f"a ban after the jail's restart offloaded ({follower.process.log_path})")
    site.wait_filters({source_filter(a) for a in listed_elements(site, "inet", F2B_TABLE, F2B_SET)}, timeout=10,
                      what="the host equal to the new set")

    jail.client("stop", JAIL)
    site.wait_filters(set(), timeout=30, what=f"the filters withdrawn with the set ({follower.process.log_path})")
    assert follower.process.alive(), follower.output()


# --- b. a thousand changes made with the real nft ----------------------------------------------


CHURN_RULESET = """
table inet filter {
    set blocklist4 { type ipv4_addr; flags interval; }
    set blocklist6 { type ipv6_addr; flags interval; }
    chain prerouting {
        type filter hook prerouting priority -150; policy accept;
        ip saddr @blocklist4 drop
        ip6 saddr @blocklist6 drop
    }
}
"""
CHURN_SETS = [("inet", "filter", "blocklist4"), ("inet", "filter", "blocklist6")]


def churn_pool() -> list[str]:
    """Elements that never overlap (an interval set without auto-merge refuses overlaps):
    IPv4 and IPv6 addresses, and IPv4 /24 and IPv6 /64 prefixes elsewhere."""
    return ([f"10.100.{i // 250}.{i % 250 + 1}" for i in range(300)] + [f"10.200.{i}.0/24" for i in range(100)]
            + [f"2001:db8:1::{i + 1:x}" for i in range(200)] + [f"2001:db8:2:{i:x}::/64" for i in range(100)])


def set_of(element: str) -> str:
    return "blocklist6" if ":" in element else "blocklist4"


def nft_statement(adding: bool, element: str) -> str:
    return f"{'add' if adding else 'delete'} element inet filter {set_of(element)} {{ {element} }}"


def canonical(element: str) -> str:
    """An address or network in the grammar's spelling (a single address without /32, /128)."""
    network = ipaddress.ip_network(element)
    return str(network.network_address) if network.prefixlen == network.max_prefixlen else str(network)


def listed_elements(site: Site, family: str, table: str, set_name: str) -> set[str]:
    """The set's elements as ``nft -j list set`` gives them, in the grammar's spelling."""
    listing = json.loads(site.nft("-j", "list", "set", family, table, set_name))
    (found,) = [item["set"] for item in listing["nftables"] if "set" in item]
    values = [e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e for e in found.get("elem", [])]
    return {canonical(f"{v['prefix']['addr']}/{v['prefix']['len']}" if isinstance(v, dict) else v) for v in values}


def guest_filters(site: Site) -> set[str]:
    """The filters the host should hold: one per element of the guest's sets."""
    return {source_filter(network) for followed in CHURN_SETS for network in listed_elements(site, *followed)}


class Churn:
    """Random adds and deletes of the pool's elements with the real nft, one command each
    or (``batch``) several in one ``nft -f`` transaction; ``present`` is the test's model."""

    def __init__(self, site: Site, seed: int, initial: int = 0):
        self.site, self.randomness = site, random.Random(seed)
        self.pool = churn_pool()
        self.present: set[str] = set(self.randomness.sample(self.pool, initial))
        self.operations = 0
        if self.present:
            site.nft("-f", "-", script="".join(f"{nft_statement(True, e)}\n" for e in sorted(self.present)))

    def _pick(self) -> tuple[bool, str]:
        if self.present and self.randomness.random() < 0.45:
            return False, self.randomness.choice(sorted(self.present))
        return True, self.randomness.choice([e for e in self.pool if e not in self.present])

    def one(self) -> None:
        adding, element = self._pick()
        self.site.nft(*nft_statement(adding, element).split())
        (self.present.add if adding else self.present.discard)(element)
        self.operations += 1

    def batch(self, size: int) -> None:
        statements = []
        for _ in range(size):
            adding, element = self._pick()
            statements.append(nft_statement(adding, element))
            (self.present.add if adding else self.present.discard)(element)
        self.site.nft("-f", "-", script="\n".join(statements) + "\n")
        self.operations += size

    def run(self, operations: int, batches: int = 0, batch_size: int = 50) -> None:
        """``operations`` in all; ``batches`` of them in ``nft -f`` transactions, spread out."""
        singles = operations - batches * batch_size
        batch_after = {singles * (number + 1) // (batches + 1) for number in range(batches)}
        for number in range(singles):
            if number in batch_after:
                self.batch(batch_size)
            self.one()

    def expected(self) -> set[str]:
        return {source_filter(canonical(element)) for element in self.present}


def test_b_a_thousand_nft_changes_leave_the_hosts_filters_equal_to_the_sets(fresh, follow):
    site = fresh
    site.nft("-f", "-", script=CHURN_RULESET)
    churn = Churn(site, seed=16, initial=100)
    follower = follow(CHURN_SETS)
    assert "100 element(s)" in follower.wait_started()
    site.wait_filters(guest_filters(site), what="the first sync")

    churn.run(1000, batches=6)
    assert churn.operations == 1000
    assert guest_filters(site) == churn.expected()  # nft holds what the test did (the model is right)
    site.wait_filters(guest_filters(site), timeout=60, what="the host to follow 1000 nft changes")
    assert any(":" in text for text in site.filters()) and any("/24" in text for text in site.filters())
    assert "not offloaded:" not in follower.output()
    assert follower.terminate() == 0, follower.output()
    assert site.filters() == guest_filters(site)  # stopped: the filters stay on the host


# --- c. kill -9 mid-stream, changes while down, restart -----------------------------------------


def test_c_a_follower_killed_mid_stream_and_restarted_sends_nothing_twice(fresh, follow):
    site = fresh
    site.nft("-f", "-", script=CHURN_RULESET)
    churn = Churn(site, seed=17, initial=50)
    first = follow(CHURN_SETS)
    first.wait_started()

    stop_churning = threading.Event()
    failures: list[BaseException] = []

    def keep_changing() -> None:
        try:
            while not stop_churning.is_set():
                churn.one()
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)

    changer = threading.Thread(target=keep_changing, daemon=True)
    changer.start()
    try:
        wait_until(lambda: churn.operations >= 150 or failures, timeout=60, what="150 changes under way")
        first.kill()  # mid-stream: the changes go on
        wait_until(lambda: churn.operations >= 250 or failures, timeout=60, what="changes while it is down")
    finally:
        stop_churning.set()
        changer.join(timeout=60)
    assert not failures, failures
    churn.run(50, batches=1, batch_size=20)  # and a transaction too, while it is down

    # What the host holds now is what the killed follower left: the ring drained, nobody
    # else changes it.  The new follower must send exactly the difference.
    wait_until(lambda: site.channel_state()["pending"] == 0, timeout=30, what="the ring drained")
    left = site.filters()
    wanted = guest_filters(site)
    assert wanted == churn.expected() and left != wanted  # there is something to repair

    second = follow(CHURN_SETS)
    started = second.wait_started()
    site.wait_filters(wanted, timeout=30, what="the host after the restart")
    adds, deletes = map(int, re.search(r"sent ([0-9]+) add\(s\) and ([0-9]+) delete\(s\)", started).groups())
    assert (adds, deletes) == (len(wanted - left), len(left - wanted)), second.output()
    assert second.sent_in_frames() == (adds, deletes), second.output()
    assert second.terminate() == 0, second.output()


# --- d. fail2ban's default action may not be offloaded ------------------------------------------


def test_d_the_default_fail2ban_nftables_action_is_refused_and_nothing_is_sent(fresh, fail2ban, tmp_path):
    site = fresh
    jail = fail2ban("nftables[actionstart_on_demand=false]")  # type=multiport, port=2222, blocktype=reject
    rule = jail.wait_nftables_rule()
    assert f"@{F2B_SET} reject" in rule, rule
    published = site.channel_state()["published"]
    done = site.mb.run([sys.executable, "-m", "mbvisor.guest.mbctl", "follow", "nft", "--set", "inet", F2B_TABLE,
                        F2B_SET, "--shm", site.region, "--mac", MAC, "--lock-dir", tmp_path / "lock"],
                       check=False, timeout=60)
    assert done.returncode == EXIT_NOT_FOLLOWED, done
    assert f"nft set inet {F2B_TABLE} {F2B_SET}" in done.stderr and "rejects these addresses" in done.stderr
    assert site.channel_state()["published"] == published  # not even a query was sent
    assert site.filters() == set()


# --- the mbvisor fail2ban action ------------------------------------------------------------------


def banned_with_the_mbvisor_action(site: Site, fail2ban) -> Fail2ban:
    """A jail with the mbvisor action beside the usual banaction (as its header says: the
    guest still drops on its own), after the attacker's three failed logins: banned, and
    the ban on the host."""
    jail = fail2ban(f'nftables[actionstart_on_demand=false]\n'
                    f'         mbvisor[shm="{site.region}", mac="{MAC}", mbctl="{MBCTL}"]')
    for attempt in range(3):
        assert login(site, site.attacker, "root", f"guess{attempt}") == "denied"
    wait_until(lambda: jail.banned() == [ATTACKER_IP], timeout=30, what=f"fail2ban to ban ({jail.log})")
    site.wait_filters({source_filter(ATTACKER_IP)}, timeout=10, what=f"the ban on the host ({jail.log})")
    return jail


def test_the_mbvisor_action_offloads_a_ban_and_withdraws_it_at_the_unban(fresh, fail2ban):
    site = fresh
    jail = banned_with_the_mbvisor_action(site, fail2ban)
    assert listed_elements(site, "inet", F2B_TABLE, F2B_SET) == {ATTACKER_IP}  # the guest's own ban too
    dropped_in_switch(site, site.attacker)
    wait_until(lambda: jail.banned() == [], timeout=BANTIME + 30, what="fail2ban to unban")
    site.wait_filters(set(), timeout=10, what=f"the unban on the host ({jail.log})")
    reaches_mb(site, site.attacker)
    assert "ERROR" not in jail.logged(), jail.logged()


def test_an_unban_whose_filter_the_host_no_longer_holds_is_done_without_an_error(fresh, fail2ban):
    """An operator deleted the ban's filter meanwhile: the host answers no-such-filter,
    which for an unban means done (fail2ban never repeats a failed unban, so an error here
    would only be noise)."""
    site = fresh
    jail = banned_with_the_mbvisor_action(site, fail2ban)
    site.mb.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", site.region, "filter", "del", "--mac", MAC,
                 "--layer", "ip", "--src", ATTACKER_IP])
    site.wait_filters(set(), timeout=10, what="the operator's delete")
    jail.client("set", JAIL, "unbanip", ATTACKER_IP)
    wait_until(lambda: jail.banned() == [], timeout=30, what="fail2ban to unban")
    wait_until(lambda: "Unban" in jail.logged(), timeout=10, what=f"the unban logged ({jail.log})")
    assert "ERROR" not in jail.logged(), jail.logged()


# --- element timeouts: nft does not report an expiry, the follower keeps the time -----------------


def test_an_element_that_times_out_in_the_guest_leaves_the_switch_within_a_second(fresh, follow):
    site = fresh
    site.nft("-f", "-", script="""
table inet filter {
    set blocklist4 { type ipv4_addr; flags timeout; }
    chain prerouting { type filter hook prerouting priority -150; policy accept; ip saddr @blocklist4 drop; }
}
""")
    follower = follow([("inet", "filter", "blocklist4")])
    follower.wait_started()
    site.nft("add", "element", "inet", "filter", "blocklist4", "{ 10.0.0.66 timeout 3s, 10.0.0.67 }")
    site.wait_filters({source_filter("10.0.0.66"), source_filter("10.0.0.67")}, timeout=10, what="both offloaded")
    dropped_in_switch(site, site.attacker)
    wait_until(lambda: listed_elements(site, "inet", "filter", "blocklist4") == {"10.0.0.67"}, timeout=10,
               what="the element to time out in the guest")
    # No monitor event says so (nft.py): the follower removes it at the deadline it read.
    site.wait_filters({source_filter("10.0.0.67")}, timeout=10, what="the expired element to leave the host")
    reaches_mb(site, site.attacker)
    assert follower.process.alive(), follower.output()


# --- e. an ipset followed through the real agent ------------------------------------------------


def test_an_ipset_ban_is_dropped_in_the_switch_and_its_removal_lets_the_attacker_back(fresh, tmp_path):
    """``mbctl follow ipset`` as a process in mb's namespace, its set matched by mb's own
    iptables drops (INPUT and FORWARD): an address added with ``ipset add`` is dropped in the switch (the
    packets never reach mb), and ``ipset del`` lets it back, both within a poll or two."""
    site = fresh
    name = "mbban"
    site.mb.run(["ipset", "create", name, "hash:net"])
    try:
        for chain in ("INPUT", "FORWARD"):  # the lab's mb forwards: both paths drop the members
            site.mb.run(["iptables", "-I", chain, "-m", "set", "--match-set", name, "src", "-j", "DROP"])
        process = site.mb.popen([sys.executable, "-m", "mbvisor.guest.mbctl", "follow", "ipset", "--set", name,
                                 "--shm", site.region, "--mac", MAC, "--lock-dir", str(tmp_path / "lock"),
                                 "--verbose"])
        try:
            wait_until(lambda: process.check_alive() or "mbctl follow: following " in process.output(), timeout=60,
                       what="the ipset follower's first sync")
            reaches_mb(site, site.attacker)
            site.mb.run(["ipset", "add", name, ATTACKER_IP])
            site.mb.run(["ipset", "add", name, "10.99.0.0/16"])
            site.wait_filters({source_filter(ATTACKER_IP), source_filter("10.99.0.0/16")}, timeout=15,
                              what="the ipset's members offloaded")
            dropped_in_switch(site, site.attacker)
            reaches_mb(site, site.client)
            site.mb.run(["ipset", "del", name, ATTACKER_IP])
            site.wait_filters({source_filter("10.99.0.0/16")}, timeout=15, what="the removed member withdrawn")
            reaches_mb(site, site.attacker)
            assert process.alive(), process.output()
        finally:
            process.stop()
    finally:
        site.mb.run(["iptables", "-F", "INPUT"])
        site.mb.run(["iptables", "-F", "FORWARD"])
        site.mb.run(["ipset", "destroy", name])
