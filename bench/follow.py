#!/usr/bin/env python3
"""The follow benchmark: ``mbctl follow nft`` keeping the switch equal to a 10,000-element set.

Real parts only: an OVS bridge (netdev datapath, unique name) run by the real ``mbvisor
controller``, the real ``mbvisor agent`` serving the middlebox's region (``--bridge``: it
serves this run's bridge only, so other agents on the machine do not matter), a middlebox
namespace with a real nftables ruleset whose first prerouting rule is ``ip saddr
@blocklist drop`` (the verdict nft.py lets through), and the real ``mbctl follow nft``
process in that namespace, as a middlebox runs it.  Every figure is beside a baseline
measured in the same round where one makes sense:

* 10k offload: the follower started on the set already holding 10,000 elements, with
  none on the host, until its start line ("following ...") says the host holds every
  one, having sent each element once (a run in which the agent's rate limit declined a
  frame fails: it would time the limit, not the follower).  It starts burst/rate seconds
  (12 s) after the loader, which spent the channel's burst: the agent's bucket is full
  again whatever the loader left in it.  A frame is answered only after the controller confirmed the switch's bundle
  (docs/controller.md: one atomic bundle and a barrier per request), so that line means
  every flow is confirmed; the run checks it by counting the drop flows in ``ovs-ofctl
  dump-flows`` right after the line, and fails unless there are exactly 10,000.
  Baseline: the same 10,000 filters written through the same channel by a script, frames
  of as many commands as a slot holds (~96), one after the other, each waited for: what a
  hand-written loader does.  Chosen over the controller's REST batch because it crosses
  the same agent, rate limit and ring, so the ratio is the follower's own cost (reading
  nft, paging the host's list, diffing), not the channel's.
* propagation p50/p99: ``add element`` written to a running ``nft -i`` in the namespace
  (no process start in the figure) until the follower's ``--verbose`` line says the frame
  holding it was answered, i.e. the flow confirmed; each sample is then checked in
  ``dump-flows`` (not timed).  Baseline, interleaved with the samples: one ``A`` command
  (an IP filter of a shape the follower does not own) written into the same channel by
  ``ChannelWriter.request()`` and answered: the channel's own command -> confirmed time.
* idle CPU: the follower and its ``nft -j monitor`` child (utime+stime of both from
  /proc/PID/stat) over 60 s (``--quick``: 15 s, the follower run with ``--resync-every
  15``) after the churn.  The periodic re-sync of the 10,000-filter list (about 100 pages)
  is spaced by the follower so that it costs at most 0.05 % of a core on average
  (``sync.next_resync_after``: a 10,000-filter re-sync costs it 0.06-0.1 s of CPU, so it
  comes every 2-3 minutes), and then rarely falls in the window: what the window shows is
  the follower asleep.  Target: <= 0.1 % of a core.
* churn: 1,000 random adds and deletes written to ``nft -i`` as fast as it takes them,
  until the host's filters (REST) equal the set's elements (``nft -j list set``); the run
  fails unless they do.  Baseline: the time nft itself took to apply them.

    python bench/follow.py              # 2 rounds, about 4 minutes (mbvisor bench follow)
    python bench/follow.py --quick      # 1 round, about 60 s
    python bench/follow.py --rate 200 --burst 400 --quick   # the agent's default rate limit

The agent runs with ``--rate 1000 --burst 12000`` unless told otherwise: the operator's
setting for a middlebox that follows a list of 10,000 (docs/adapters.md); with the default
(200 commands/s, burst 400) a 10,000-element first sync takes about 50 s.
Needs root, Open vSwitch and nft (``make setup``).  Everything it creates (bridge,
namespace and its ruleset, processes, region, a state directory) is removed on exit,
including on Ctrl-C.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mbvisor.bench.benchlib import BenchError, compare, finish, measured, start
from mbvisor.guest import answers
from mbvisor.guest.follow import sync
from mbvisor.guest.follow.source import SOURCE
from mbvisor.guest.region import open_file
from mbvisor.guest.writer import ChannelWriter
from mbvisor.topologies.agent_run import AgentProcess, annotate, make_region
from mbvisor.topologies.controller_run import Controller, ControllerError
from mbvisor.topologies.netlab import Lab, NetlabError, require_host_tools

MAC = "52:34:56:00:16:01"
MIDDLEBOX_IP = "10.0.0.5"
FAMILY, TABLE, SET = "inet", "mbbench", "blocklist"
ELEMENTS = 10_000
OPERATOR_RATE, OPERATOR_BURST = 1000.0, 12000.0  # the agent's settings for a middlebox following 10k
ENVIRONMENT = {"MBVISOR_MAX_FILTERS": "12000", "MBVISOR_MAX_FLOWS": "60000"}  # room for 10k and the samples
TARGET_OFFLOAD_S = 2.0
TARGET_PROPAGATION_P99_MS = 50.0
TARGET_IDLE_CPU = 0.1
CHANNEL_SHAPE = "I 5 s {} p 17"  # the baseline's filter: two fields, never the follower's
START_TIMEOUT = 180.0
QUIET = 1.0  # churn: the follower sent nothing for this long, so the host's list may be compared
_SOURCE = re.compile(r"nw_src=(172\.[0-9./]+)")  # the pool's addresses only (not port security's)

PROFILES = {
    "default": dict(rounds=2, propagation=200, churn=1000, idle_seconds=60.0, resync_every=None),
    "quick": dict(rounds=1, propagation=60, churn=1000, idle_seconds=15.0, resync_every=15.0),
}

_T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[bench/follow {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, -int(-fraction * len(ordered) // 1)) - 1]


def element(index: int) -> str:
    """The index-th address of the benchmark's pool (172.16.0.0/12: never the lab's)."""
    return str(ipaddress.IPv4Address("172.16.0.0") + index)


# --------------------------------------------------------------------------- the middlebox's nftables

RULESET = f"""table {FAMILY} {TABLE} {{
    set {SET} {{ type ipv4_addr; }}
    set marker {{ type ipv4_addr; }}
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        ip saddr @{SET} drop
    }}
}}
"""


class Nft:
    """The middlebox's nftables: a running ``nft -i`` in its namespace takes changes with
    no process start each; ``sync()`` returns once it has applied everything written so
    far (it lists the tiny ``marker`` set and waits for the listing)."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.process = subprocess.Popen(["ip", "netns", "exec", namespace, "nft", "-i"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                                        start_new_session=True)
        self._output = b""

    def run(self, *arguments: str, input: str | None = None) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.namespace, "nft", *arguments], input=input,
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise BenchError(f"nft {' '.join(arguments)}: {done.stderr.strip()}")
        return done.stdout

    def write(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")

    def add(self, address: str) -> None:
        self.write(f"add element {FAMILY} {TABLE} {SET} {{ {address} }}")

    def delete(self, address: str) -> None:
        self.write(f"delete element {FAMILY} {TABLE} {SET} {{ {address} }}")

    def sync(self, timeout: float = 60.0) -> None:
        self.write(f"list set {FAMILY} {TABLE} marker")
        deadline = time.monotonic() + timeout
        while self._output.count(b"}") < 2:  # the set's block and the table's
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise BenchError(f"nft -i did not answer: {self._output[-300:]!r}")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            self._output += chunk
            if b"Error" in self._output:
                raise BenchError(f"nft -i: {self._output.decode(errors='replace')[-500:]}")
        self._output = b""

    def elements(self) -> set[str]:
        listed = json.loads(self.run("-j", "list", "set", FAMILY, TABLE, SET))
        found = next(item["set"] for item in listed["nftables"] if "set" in item).get("elem", [])
        return {str(value) for value in found}

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(5)
        self.process.stdout.close()


# --------------------------------------------------------------------------- the follower

class FollowerProcess:
    """``mbctl follow nft --verbose`` in the middlebox's namespace; its status lines are
    read by a thread and kept with the time each arrived."""

    def __init__(self, lab: Lab, middlebox, region: str, lock_dir: Path, resync_every: float | None):
        argv = [sys.executable, "-m", "mbvisor.guest.mbctl", "follow", "nft", "--set", FAMILY, TABLE, SET,
                "--shm", region, "--mac", MAC, "--lock-dir", str(lock_dir), "--verbose",
                *(["--resync-every", f"{resync_every:g}"] if resync_every else [])]
        self.started = time.perf_counter()
        self.process = middlebox.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.all: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.popen.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.all.append(line)
            self.lines.put((time.perf_counter(), line))

    def next_line(self, having: str, timeout: float) -> tuple[float, str]:
        """The arrival time and text of the next status line containing ``having``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"the follower printed no line with {having!r} within {timeout:g} s; "
                                 f"its last lines: {self.all[-5:]}")
            try:
                when, line = self.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not self.process.alive():
                    raise BenchError(f"the follower exited ({self.process.popen.poll()}): {self.all[-5:]}") from None
                continue
            if having in line:
                return when, line

    def drain(self) -> None:
        while True:
            try:
                self.lines.get_nowait()
            except queue.Empty:
                return

    def pids(self) -> list[int]:
        """The follower and its children (the ``nft -j monitor`` process)."""
        found, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as children:
                        pending += [int(child) for child in children.read().split()]
            except OSError:
                pass
        return found

    def stop(self) -> None:
        self.process.stop(timeout=10.0)
        self._reader.join(5.0)


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime+stime (clock ticks) of each process."""
    ticks = {}
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


# --------------------------------------------------------------------------- the lab

class Setup:
    """Controller, bridge, middlebox namespace with its ruleset, agent, region."""

    def __init__(self, lab: Lab, workdir: Path, rate: float, burst: float):
        self.lab, self.workdir = lab, workdir
        self.rate, self.burst = rate, burst
        self.agent: AgentProcess | None = None
        self.nft: Nft | None = None
        self.controller = Controller(workdir, environment=ENVIRONMENT)
        self.region = make_region("mbvisor-bench-follow")
        try:
            self._build(rate, burst)
        except BaseException:  # Ctrl-C included: what was made so far goes
            self.close()
            raise

    def _build(self, rate: float, burst: float) -> None:
        self.controller.start()
        self.bridge = self.lab.bridge(controller=self.controller.target, fail_mode="secure")
        self.middlebox = self.lab.host("mb", ip=f"{MIDDLEBOX_IP}/24", mac=MAC)
        self.controller.wait_switch(self.bridge.dpid)
        annotate(self.middlebox, self.region, "vm-follow")
        self.agent = AgentProcess(self.controller, self.workdir, bridges=(self.bridge.name,),
                                  options=("--rate", f"{rate:g}", "--burst", f"{burst:g}")).start()
        self.agent.wait_serving(f"vm-follow/{self.middlebox.port_name}")
        self.nft = Nft(self.middlebox.namespace)
        self.nft.run("-f", "-", input=RULESET)
        self.reset_host()

    def close(self) -> None:
        for part in (self.nft, self.agent, self.controller):
            if part is not None:
                try:
                    (part.close if isinstance(part, Nft) else part.stop)()
                except Exception as error:  # keep removing the rest
                    progress(f"stopping {type(part).__name__}: {error}")
        try:
            os.unlink(self.region)
        except FileNotFoundError:
            pass

    def reset_host(self) -> None:
        """The middlebox registered afresh, with no filter (through REST: no rate limit spent)."""
        deadline = time.monotonic() + 60
        for text in (f"X {MAC}", f"R F {MAC} {MIDDLEBOX_IP}"):
            while True:
                answer = self.controller.batch(self.bridge.dpid, self.middlebox.ofport, [text])[0]
                if answer["status"] == "OK" or answer["code"] == "not-registered":  # (X before the first R)
                    break
                if answer["status"] != "UNAVAILABLE" or time.monotonic() > deadline:  # (reconciling after X)
                    raise BenchError(f"{text}: {answer}")
                time.sleep(0.1)

    def host_filters(self) -> set[str]:
        status, body = self.controller.get(f"/v1/middleboxes/{self.bridge.dpid:016x}/{MAC}")
        if status != 200:
            raise BenchError(f"GET the middlebox: HTTP {status}: {body}")
        return {text for text in body["filters"] if sync.owned_entry(text, MAC)}

    def drop_flows(self, address: str | None = None) -> int:
        """How many source addresses the bridge's drop flows match (``address``: that one
        only).  A filter is several flows (to the middlebox's MAC, to its group-frame
        forms): counting addresses counts filters."""
        match = f"ip,nw_src={address}" if address else "ip"
        return len({found[1] for line in self.bridge.dump_flows(match, no_stats=True)
                    if "actions=drop" in line and (found := _SOURCE.search(line))})

    def fill(self, addresses: list[str]) -> None:
        """The set holds exactly ``addresses``."""
        self.nft.run("flush", "set", FAMILY, TABLE, SET)
        for first in range(0, len(addresses), 2000):
            chunk = ", ".join(addresses[first:first + 2000])
            self.nft.run("-f", "-", input=f"add element {FAMILY} {TABLE} {SET} {{ {chunk} }}\n")

    def writer(self):
        return open_file(self.region)


def expected(addresses) -> set[str]:
    return {sync.filter_text(MAC, SOURCE, address) for address in addresses}


# --------------------------------------------------------------------------- the phases

def loader_seconds(setup: Setup, addresses: list[str]) -> float:
    """The baseline of the 10k offload: the filters written through the channel in full
    frames, one after the other, each waited for (a rate-limited frame is sent again
    after 50 ms, as a careful script would)."""
    setup.reset_host()
    with setup.writer() as region:
        writer = ChannelWriter(region)
        max_commands, max_bytes = sync.frame_limits(writer.header().geometry)
        frames = sync.frames(MAC, [(SOURCE, a) for a in addresses], (), max_commands, max_bytes)
        started = time.perf_counter()
        for frame in frames:
            while True:
                records = answers.parse(writer.request(frame.text.encode(), timeout=30).text)
                if all(record.ok for record in records):
                    break
                refused = [record for record in records if not record.ok and not sync.passing(record)]
                if refused:
                    raise BenchError(f"the loader's frame was refused: {refused[0]}")
                time.sleep(0.05)
        seconds = time.perf_counter() - started
    flows = setup.drop_flows()
    if flows != len(addresses):
        raise BenchError(f"after the loader the bridge has {flows} drop flows, not {len(addresses)}")
    return seconds


def offload(setup: Setup, addresses: list[str], resync_every: float | None) -> tuple[FollowerProcess, float, str]:
    """The follower started on the full set with an empty host, until its start line;
    the flows counted right after it."""
    setup.reset_host()
    follower = FollowerProcess(setup.lab, setup.middlebox, setup.region, setup.workdir, resync_every)
    when, line = follower.next_line("following ", START_TIMEOUT)
    seconds = when - follower.started
    flows = setup.drop_flows()
    if flows != len(addresses) or f"{len(addresses)} element(s)" not in line or " 0 not offloaded" not in line:
        follower.stop()
        raise BenchError(f"the follower said {line!r} but the bridge has {flows} drop flows, not {len(addresses)}")
    if f"sent {len(addresses)} add(s)" not in line:  # some frames were declined and sent again: not its own speed
        follower.stop()
        raise BenchError(f"the follower was rate-limited or refused ({line!r}); give the agent a larger --burst")
    return follower, seconds, line


def propagation(setup: Setup, follower: FollowerProcess, samples: int, first: int,
                randomness: random.Random) -> tuple[list[float], list[float]]:
    """(follower ms, channel ms): each sample an ``add element`` until the follower's frame
    was answered, checked in the switch; each followed by the channel's baseline command."""
    follower.drain()
    through_follower, through_channel = [], []
    with setup.writer() as region:
        writer = ChannelWriter(region)
        for number in range(samples):
            address = element(first + number)
            time.sleep(randomness.uniform(0.02, 0.06))  # not back to back: each change alone
            started = time.perf_counter()
            setup.nft.add(address)
            when, line = follower.next_line("answered in", 10.0)
            if not line.startswith("mbctl follow: sent 1 add(s), 0 delete(s)"):
                raise BenchError(f"a single add element was sent as {line!r}")
            through_follower.append((when - started) * 1000)
            if setup.drop_flows(address) != 1:
                raise BenchError(f"the follower's frame for {address} was answered but its flow is not in the switch")
            time.sleep(randomness.uniform(0.02, 0.06))
            other = f"10.200.0.{number // 2 % 200 + 1}"  # added, then deleted by the next sample
            text = f"{'D' if number % 2 else 'A'} {MAC} {CHANNEL_SHAPE.format(other)}"
            started = time.perf_counter()
            response = writer.request(f"@{text}@".encode(), timeout=10)
            if number % 2 == 0:  # the adds only, like the follower's samples (a delete costs the controller more)
                through_channel.append((time.perf_counter() - started) * 1000)
            record = answers.parse(response.text)[0]
            if not record.ok:
                raise BenchError(f"the channel's baseline command {text!r} was answered {record}")
    return through_follower, through_channel


def churn(setup: Setup, follower: FollowerProcess, pool: list[str], changes: int,
          randomness: random.Random) -> tuple[float, float, int, int]:
    """(seconds until the last frame's answer, after which the host equals the set;
    seconds nft took; elements at the end; frames sent)."""
    follower.drain()
    present = setup.nft.elements()
    absent = [a for a in pool if a not in present]
    present_list = sorted(present)
    started = time.perf_counter()
    for _ in range(changes):
        if randomness.random() < 0.5 and present_list:
            address = present_list.pop(randomness.randrange(len(present_list)))
            setup.nft.delete(address)
            absent.append(address)
        else:
            address = absent.pop(randomness.randrange(len(absent)))
            setup.nft.add(address)
            present_list.append(address)
    setup.nft.sync()
    applied = time.perf_counter() - started
    want = expected(present_list)
    # The end is the last frame's answer (the flows confirmed) after which the host equals
    # the set.  The host's list is read only once the follower went quiet: reading 10,000
    # filters through REST over and over would load the controller the follower waits on.
    last_answer, frames, deadline = None, 0, time.monotonic() + 120
    while True:
        try:
            when, line = follower.lines.get(timeout=QUIET)
            if "answered in" in line:
                last_answer, frames = when, frames + 1
            continue
        except queue.Empty:
            pass
        if last_answer is not None and setup.host_filters() == want:
            break
        if time.monotonic() > deadline:
            raise BenchError("the host's filters did not become equal to the set within 120 s of the churn")
    seconds = last_answer - started
    progress(f"  churn: {frames} frame(s)")
    on_set = setup.nft.elements()
    if on_set != set(present_list) or setup.host_filters() != expected(on_set):
        raise BenchError("after the churn the host's filters are not the set's elements")
    if setup.drop_flows() != len(on_set):
        raise BenchError(f"after the churn the bridge has {setup.drop_flows()} drop flows, not {len(on_set)}")
    return seconds, applied, len(on_set), frames


def idle_cpu(follower: FollowerProcess, seconds: float) -> dict:
    """% of one core used by the follower and its children over ``seconds``."""
    hz = os.sysconf("SC_CLK_TCK")
    pids = follower.pids()
    if len(pids) < 2:
        raise BenchError(f"the follower has no nft monitor child (processes {pids})")
    before, wall = cpu_ticks(pids), time.perf_counter()
    time.sleep(seconds)
    after, wall = cpu_ticks(pids), time.perf_counter() - wall
    if sorted(follower.pids()) != sorted(pids):
        raise BenchError("the follower's processes changed during the idle window")
    used = {pid: (after[pid] - before[pid]) / hz for pid in pids}
    return {"percent": 100 * sum(used.values()) / wall,
            "follower_percent": 100 * used[follower.process.pid] / wall,
            "monitor_percent": 100 * sum(v for pid, v in used.items() if pid != follower.process.pid) / wall,
            "seconds": wall}


def one_round(setup: Setup, profile: dict, number: int) -> dict:
    randomness = random.Random(16 + number)
    addresses = [element(i) for i in range(ELEMENTS)]
    setup.fill(addresses)
    progress(f"round {number}: baseline loader, {ELEMENTS} filters in full frames")
    loader = loader_seconds(setup, addresses)
    progress(f"  loader {loader:.2f} s")
    refill = setup.burst / setup.rate
    progress(f"  waiting {refill:g} s: the loader spent the channel's burst, which refills at the agent's rate")
    time.sleep(refill)  # not observable from outside the agent; burst/rate fills it from empty
    follower, seconds, line = offload(setup, addresses, profile["resync_every"])
    try:
        progress(f"  follower {seconds:.2f} s: {line.removeprefix('mbctl follow: ')}")
        first = ELEMENTS + 100_000 * number
        via_follower, via_channel = propagation(setup, follower, profile["propagation"], first, randomness)
        progress(f"  propagation p50/p99 {percentile(via_follower, .5):.1f}/{percentile(via_follower, .99):.1f} ms; "
                 f"channel {percentile(via_channel, .5):.1f}/{percentile(via_channel, .99):.1f} ms")
        pool = [element(i) for i in range(ELEMENTS + 100_000 * number + 50_000,
                                          ELEMENTS + 100_000 * number + 50_000 + 2 * profile["churn"])]
        churned, applied, size, churn_frames = churn(setup, follower, pool + addresses[:profile["churn"]], profile["churn"],
                                       randomness)
        progress(f"  churn of {profile['churn']}: host equal to the set ({size} elements) after {churned:.2f} s "
                 f"(nft took {applied:.2f} s)")
        time.sleep(1.0)
        idle = idle_cpu(follower, profile["idle_seconds"])
        progress(f"  idle over {idle['seconds']:.0f} s: {idle['percent']:.3f} % of a core (follower "
                 f"{idle['follower_percent']:.3f}, nft monitor {idle['monitor_percent']:.3f})")
    finally:
        follower.stop()
    return {"loader_s": loader, "offload_s": seconds, "offload_line": line,
            "propagation_p50": percentile(via_follower, .5), "propagation_p99": percentile(via_follower, .99),
            "propagation_max": max(via_follower), "propagation_ms": [round(v, 2) for v in via_follower],
            "channel_ms": [round(v, 2) for v in via_channel],
            "channel_p50": percentile(via_channel, .5), "channel_p99": percentile(via_channel, .99),
            "churn_s": churned, "churn_nft_s": applied, "churn_frames": churn_frames, "churn_equal": 1.0, "elements_after_churn": size,
            "idle": idle}


def run(profile: dict, rounds: int, rate: float, burst: float) -> list[dict]:
    require_host_tools()
    if shutil.which("nft") is None:
        raise BenchError("nft is not installed (make setup)")
    workdir = Path(tempfile.mkdtemp(prefix="mbvisor-bench-follow-"))
    try:
        with Lab() as lab:
            setup = None
            try:
                setup = Setup(lab, workdir, rate, burst)
                progress(f"bridge {setup.bridge.name}, namespace {setup.middlebox.namespace}, controller pid "
                         f"{setup.controller.process.pid}, agent pid {setup.agent.process.pid} (--rate {rate:g} "
                         f"--burst {burst:g})")
                return [one_round(setup, profile, number) for number in range(1, rounds + 1)]
            finally:
                if setup is not None:
                    setup.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def rows(results: list[dict], profile: dict) -> list:
    def each(key):
        return [figures[key] for figures in results]

    window = f"{profile['idle_seconds']:g} s"
    return [
        compare(f"{ELEMENTS // 1000}k set offloaded from scratch", "s", "mbctl follow nft", each("offload_s"),
                "loader, full frames", each("loader_s"), target=("<=", TARGET_OFFLOAD_S), target_on="value"),
        compare("add element -> flow confirmed p50", "ms", "mbctl follow nft", each("propagation_p50"),
                "one A via the channel", each("channel_p50")),
        compare("add element -> flow confirmed p99", "ms", "mbctl follow nft", each("propagation_p99"),
                "one A via the channel", each("channel_p99"), target=("<=", TARGET_PROPAGATION_P99_MS),
                target_on="value"),
        compare(f"idle CPU over {window}", "% core", "follower + nft monitor",
                [figures["idle"]["percent"] for figures in results], target=("<=", TARGET_IDLE_CPU)),
        compare(f"idle CPU over {window}, monitor only", "% core", "nft -j monitor",
                [figures["idle"]["monitor_percent"] for figures in results]),
        compare(f"churn of {profile['churn']} changes", "s", "mbctl follow nft", each("churn_s"),
                "nft applying them", each("churn_nft_s")),
        compare("host equal to the set after churn", "1=yes", "mbctl follow nft", each("churn_equal"),
                target=(">=", 1.0)),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rate, burst = OPERATOR_RATE, OPERATOR_BURST
    for option in ("--rate", "--burst"):  # the agent's; not benchlib's common options
        if option in argv:
            at = argv.index(option)
            value = float(argv[at + 1])
            rate, burst = (value, burst) if option == "--rate" else (rate, value)
            del argv[at:at + 2]
    args, mode, when = start(__doc__.splitlines()[0] + " (also: --rate N --burst N for the agent)",
                             "1 round, 60 propagation samples, 15 s idle window with --resync-every 15", argv,
                             rounds=(PROFILES["default"]["rounds"], PROFILES["quick"]["rounds"]))
    profile = PROFILES[mode]
    progress(f"{mode} run, {args.rounds} round(s): {ELEMENTS} elements, {profile['propagation']} propagation samples, "
             f"churn {profile['churn']}, idle {profile['idle_seconds']:g} s; agent --rate {rate:g} --burst {burst:g}")
    started = time.perf_counter()
    status, results = measured(progress, lambda: run(profile, args.rounds, rate, burst),
                               failures=(NetlabError, ControllerError, OSError, subprocess.SubprocessError))
    if status is not None:
        return status
    seconds = time.perf_counter() - started
    progress(f"done in {seconds:.0f} s; everything it created is removed")
    return finish("follow", mode, when, args.rounds, rows(results, profile), args.json, progress,
                  seconds=round(seconds, 1),
                  params={**profile, "rounds": args.rounds, "elements": ELEMENTS, "agent_rate": rate,
                          "agent_burst": burst, "environment": ENVIRONMENT},
                  per_round=results)


if __name__ == "__main__":
    sys.exit(main())
