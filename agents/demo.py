"""The lab demo, as far as the product goes today: a middlebox's commands travel from
``mbctl`` through a shared-memory region to the host's reader and the answers come back.

Each step runs the real ``mbctl`` as a separate process (as a VM would) against a region
in /dev/shm served by ``mbvisor channel serve`` (the real ``ChannelReader`` with the echo
responder).  It prints what happens, a summary table, writes a JSON result, and removes
the region and the responder on exit or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

MAC = "52:34:56:00:12:22"

# (what the middlebox means, mbctl arguments, exit code the step must end with)
STORY = [
    ("register for firewall offload", ["register", "firewall", "--mac", MAC, "--ip", "10.0.0.5"], 0),
    ("drop an attacking subnet", ["filter", "add", "--mac", MAC, "--layer", "ip", "--src", "10.66.0.0/16"], 0),
    ("drop telnet", ["filter", "add", "--mac", MAC, "--layer", "transport", "--dst", "23", "--proto", "tcp"], 0),
    ("drop a spoofing MAC", ["filter", "add", "--mac", MAC, "--layer", "mac", "--src", "52:34:56:00:66:66"], 0),
    ("the report's form, two commands in one frame",
     ["-w", f"@A {MAC} I 12 s 10.1.0.0/16 d 10.0.0.5@@I {MAC}@"], 0),
    ("a typo is caught in the guest, nothing is sent", ["-w", f"@A {MAC} q 4 s 10.0.0.1@"], 3),
    ("the same typo forced through: the host refuses it", ["--raw", "-w", f"@A {MAC} q 4 s 10.0.0.1@"], 1),
    ("offload a load-balancer pool", ["redirect", "--mac", MAC, "--ip", "10.0.0.5", "--to", "10.0.0.11,10.0.0.12"], 0),
    ("ask for the IP filters", ["show", "ip", "--mac", MAC], 0),
    ("cancel: every offload goes", ["cancel", "--mac", MAC], 0),
]


@dataclass
class Step:
    purpose: str
    command: str
    exit_code: int
    expected_exit_code: int
    status: str
    answer: str
    round_trip_ms: float | None

    @property
    def as_expected(self) -> bool:
        return self.exit_code == self.expected_exit_code


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_mbctl(region: str, arguments: list[str]) -> tuple[int, dict]:
    command = [sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", region, "--json", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    lines = done.stdout.strip().splitlines()
    return done.returncode, json.loads(lines[-1]) if lines else {"error": done.stderr.strip()}


def run_story(region: str) -> list[Step]:
    steps = []
    for number, (purpose, arguments, expected) in enumerate(STORY, 1):
        shown = "mbctl " + shlex.join(arguments)
        say(f"step {number}/{len(STORY)}: {purpose}")
        print(f"    $ {shown}")
        code, answer = run_mbctl(region, arguments)
        text = answer.get("text", answer.get("error", ""))
        status = answer.get("status", "not sent" if code == 3 else "-")
        for line in text.splitlines():
            print(f"      {status:8} {line}")
        steps.append(Step(purpose, shown, code, expected, status, text, answer.get("round_trip_ms")))
    return steps


def print_summary(steps: list[Step]) -> None:
    print()
    print(f"{'#':>2}  {'purpose':48} {'exit':>4}  {'status':8} {'round trip':>10}  result")
    for number, step in enumerate(steps, 1):
        trip = f"{step.round_trip_ms:.2f} ms" if step.round_trip_ms is not None else "-"
        verdict = "as expected" if step.as_expected else f"UNEXPECTED (wanted exit {step.expected_exit_code})"
        print(f"{number:>2}  {step.purpose[:48]:48} {step.exit_code:>4}  {step.status:8} {trip:>10}  {verdict}")
    trips = [s.round_trip_ms for s in steps if s.round_trip_ms is not None]
    if trips:
        print(f"\n{len(trips)} commands answered through the ring; round trip median "
              f"{statistics.median(trips):.2f} ms, max {max(trips):.2f} ms (timed inside mbctl, from "
              "writing the slot to reading the answer; an idle host reader polls at most every 5 ms)")


def run_demo(output: str) -> int:
    region = f"/dev/shm/mbvisor-demo-{uuid.uuid4().hex[:8]}"
    responder = None
    try:
        say(f"creating the channel region {region} (1 MiB, as QEMU's ivshmem memory backend would)")
        subprocess.run([sys.executable, "-m", "mbvisor.agents.cli", "channel", "create", region],
                       check=True, capture_output=True)
        say("starting the host reader: mbvisor channel serve (real ChannelReader, echo responder)")
        responder = subprocess.Popen([sys.executable, "-m", "mbvisor.agents.cli", "channel", "serve", region],
                                     stderr=subprocess.DEVNULL)
        started = time.monotonic()
        steps = run_story(region)
        say("the channel as the guest sees it: mbctl -r")
        print(subprocess.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", region, "-r"],
                             capture_output=True, text=True).stdout)
        print_summary(steps)
        ok = all(step.as_expected for step in steps)
        result = {"ok": ok, "region": region, "seconds": round(time.monotonic() - started, 3),
                  "steps": [asdict(step) for step in steps]}
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
        say(f"result written to {output}: {'every step as expected' if ok else 'SOME STEPS UNEXPECTED'}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        if responder is not None:
            responder.terminate()
            responder.wait(timeout=10)
        if os.path.exists(region):
            os.unlink(region)
