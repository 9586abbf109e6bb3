"""The controller shell against a real OVS bridge, tried as a demanding operator would:
reconnections, a second controller, another application clearing the tables, ports that
go, one very large request, and kill -9 of the controller in the middle of work."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import subprocess
import threading

import pytest

from mbvisor.topologies.controller_run import Controller, ControllerError
from mbvisor.topologies.netlab import wait_until

pytestmark = pytest.mark.host

MAC = "52:34:56:00:12:22"


@contextlib.contextmanager
def controlled(lab, tmp_path, **options):
    """A running controller and a fail-mode=secure bridge it has reconciled; the controller
    is stopped afterwards, also when the test fails."""
    controller = Controller(tmp_path, **options).start()
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        controller.wait_switch(bridge.dpid)
        yield controller, bridge
    finally:
        controller.stop()


def filter_flows(bridge) -> list[str]:
    """One flow per IP filter: the form addressed to the middlebox's MAC (each filter also
    has a group-frame form, and each middlebox two double-tagged drops: filters.py)."""
    return [line for line in bridge.dump_flows(no_stats=True)
            if "priority=3000" in line and "nw_src=" in line and "dl_dst=01:00:00:00:00:00/" not in line]


def mac_of(index: int) -> str:
    return f"52:34:57:{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"


def filters_batch(dpid: int, middleboxes: int, per_middlebox: int, channel: str | None = None) -> list[dict]:
    """Registrations and filters for ``middleboxes`` middleboxes (each on its own port)."""
    commands = []
    for m in range(middleboxes):
        mac = mac_of(m)
        commands.append(f"R F {mac} 10.{m // 250}.{m % 250}.1|{m + 1}")
        commands += [f"A {mac} I 4 s 172.{16 + f // 65536}.{f // 256 % 256}.{f % 256}|{m + 1}"
                     for f in range(per_middlebox)]
    body = []
    for seq, item in enumerate(commands):
        text, port = item.split("|")
        entry = {"dpid": f"{dpid:016x}", "port": int(port), "command": text}
        if channel:  # one channel per middlebox, as the agent keys them
            entry.update(channel=f"{channel}{port}/eth0", epoch=1, seq=seq)
        body.append(entry)
    return body


def _kill_openflow_connection(controller: Controller) -> None:
    """The switch's side of the TCP connection is destroyed: a real disconnect, with no
    change to the bridge's configuration (removing the controller record would let OVS
    flush the tables itself)."""
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{controller.ofp_port}"], check=True,
                   capture_output=True)


@pytest.mark.parametrize("how", ["switch reconnects", "controller killed and restarted"])
def test_reconnect_with_unchanged_state_loses_no_flow(lab, tmp_path, how):
    """A fail-mode=secure bridge that reconnects keeps every flow the whole time, and its
    first reconciliation is done within a second of the connection."""
    with controlled(lab, tmp_path) as (controller, bridge):
        controller.ok(bridge.dpid, 1, f"R F {MAC} 10.0.0.5")
        controller.batch(bridge.dpid, 1, [f"A {MAC} I 4 s 10.1.{n}.0/24" for n in range(200)])
        full = sorted(bridge.dump_flows(no_stats=True))
        seen_counts: list[int] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen_counts.append(len(bridge.dump_flows(no_stats=True)))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            before = len(controller.reconciliations())
            if how == "switch reconnects":
                _kill_openflow_connection(controller)
            else:
                controller.stop(signal.SIGKILL)
                controller.start()
            wait_until(lambda: len(controller.reconciliations()) > before, timeout=20, what="a new reconciliation")
        finally:
            stop.set()
            watcher.join()
        assert len(seen_counts) > 1 and min(seen_counts) == len(full)
        assert sorted(bridge.dump_flows(no_stats=True)) == full
        line = controller.reconciliations()[-1]
        assert line.endswith("+0 ~0 -0 flows, +0 ~0 -0 groups")
        assert float(re.search(r"reconciled ([0-9.]+) s after connecting", line).group(1)) < 1.0


def test_a_second_controller_on_the_same_ports_refuses_to_start(tmp_path):
    """The managers listen with SO_REUSEPORT: without the check a second controller would
    start silently and the kernel would split switches and requests between the two."""
    first = Controller(tmp_path).start()
    try:
        (tmp_path / "second").mkdir()
        second = Controller(tmp_path / "second", ofp_port=first.ofp_port, rest_port=first.rest_port)
        try:
            second.start()  # its health check may be answered by the first: wait for its exit
        except ControllerError:
            pass
        assert second.process.wait(timeout=20) != 0
        assert f"OpenFlow port 127.0.0.1:{first.ofp_port} is already in use" in second.log.read_text()
        assert first.get("/v1/health")[0] == 200 and first.process.poll() is None
    finally:
        first.stop()


def test_the_audit_repairs_flows_another_application_removed(lab, tmp_path):
    with controlled(lab, tmp_path, environment={"MBVISOR_AUDIT_INTERVAL": "0.5"}) as (controller, bridge):
        controller.ok(bridge.dpid, 1, f"R F {MAC} 10.0.0.5")
        controller.ok(bridge.dpid, 1, f"A {MAC} I 4 s 10.0.0.66")
        full = sorted(bridge.dump_flows(no_stats=True))
        bridge.del_flows()  # another application wipes the tables
        wait_until(lambda: sorted(bridge.dump_flows(no_stats=True)) == full, timeout=10,
                   what="the audit to restore the flows")
        assert "flows changed by someone else; repaired" in controller.log.read_text()
        status, answer = controller.command(bridge.dpid, 1, f"A {MAC} I 4 s 10.0.0.66")
        assert status == 200 and "already present" in answer["text"] and filter_flows(bridge)


def test_a_deleted_port_retires_its_middleboxes_durably(lab, tmp_path):
    with controlled(lab, tmp_path) as (controller, bridge):
        vm = lab.host("vm", ip="10.0.0.5/24", mac=MAC)
        controller.ok(bridge.dpid, vm.ofport, f"R F {MAC} 10.0.0.5")
        controller.ok(bridge.dpid, vm.ofport, f"A {MAC} I 4 s 10.0.0.66")
        assert filter_flows(bridge)
        bridge.vsctl("del-port", bridge.name, vm.port_name)
        wait_until(lambda: not filter_flows(bridge), timeout=10, what="the departed VM's filters removed")
        assert controller.get("/v1/middleboxes")[1]["middleboxes"] == []
        controller.stop()
        controller.start()
        assert controller.get("/v1/middleboxes")[1]["middleboxes"] == []


def test_a_100k_command_request_succeeds_while_the_switch_and_rest_stay_responsive(lab, tmp_path):
    """100 middleboxes x 1,000 filters in one request: every command OK, the switch never
    disconnects (its inactivity probe is answered meanwhile), and the REST API answers
    other clients while the request is being worked on."""
    with controlled(lab, tmp_path) as (controller, bridge):
        body = {"commands": filters_batch(bridge.dpid, 100, 1000)}
        result = {}

        def post():
            result["answer"] = controller.request("POST", "/v1/commands", body, timeout=600)

        poster = threading.Thread(target=post)
        poster.start()
        answered_meanwhile = 0
        while poster.is_alive():
            if controller.get("/v1/health")[0] == 200 and poster.is_alive():
                answered_meanwhile += 1
        poster.join()
        status, answers = result["answer"]
        assert status == 200
        assert {a["status"] for a in answers["answers"]} == {"OK"}
        assert answered_meanwhile > 0
        assert len(filter_flows(bridge)) == 100_000
        assert "disconnected" not in controller.log.read_text()
        assert len(controller.reconciliations()) == 1


def _post_in_background(controller: Controller, body: dict) -> None:
    """Send the request and return once it is on the wire (the answer is never read)."""
    connection = http.client.HTTPConnection("127.0.0.1", controller.rest_port, timeout=60)
    payload = json.dumps(body).encode()
    connection.request("POST", "/v1/commands", payload, {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {controller.token}"})


def _stored_filters(controller: Controller) -> int:
    return sum(len(mb["filters"]) for mb in controller.get("/v1/middleboxes")[1]["middleboxes"])


def test_kill_9_during_a_10k_filter_batch_leaves_switch_equal_to_store_and_retries_replay(lab, tmp_path):
    with controlled(lab, tmp_path) as (controller, bridge):
        commands = filters_batch(bridge.dpid, 10, 1000, channel="vm")
        _post_in_background(controller, {"commands": commands})
        controller.stop(signal.SIGKILL)
        controller.start()
        controller.wait_switch(bridge.dpid)
        assert len(filter_flows(bridge)) == _stored_filters(controller)  # all or nothing
        status, body = controller.request("POST", "/v1/commands", {"commands": commands}, timeout=300)
        assert status == 200 and {a["status"] for a in body["answers"]} == {"OK"}, body["answers"][-1]
        assert len(filter_flows(bridge)) == _stored_filters(controller) == 10_000
        status, again = controller.request("POST", "/v1/commands", {"commands": commands}, timeout=300)
        assert all(a["replayed"] for a in again["answers"]) and len(filter_flows(bridge)) == 10_000


def test_kill_9_during_a_stream_of_1000_commands_then_retries_replay(lab, tmp_path):
    with controlled(lab, tmp_path) as (controller, bridge):
        texts = [f"R F {MAC} 10.0.0.5"] + [f"A {MAC} I 4 s 10.{n // 256}.{n % 256}.0/24" for n in range(999)]
        answered = []
        for seq, text in enumerate(texts[:300]):
            answered.append(controller.command(bridge.dpid, 1, text, ("vm/eth0", 7, seq)))
        _post_in_background(controller, {"dpid": f"{bridge.dpid:016x}", "port": 1, "command": texts[300],
                                         "channel": "vm/eth0", "epoch": 7, "seq": 300})
        controller.stop(signal.SIGKILL)
        controller.start()
        controller.wait_switch(bridge.dpid)
        assert len(filter_flows(bridge)) == _stored_filters(controller) in (299, 300)
        replays = [controller.command(bridge.dpid, 1, text, ("vm/eth0", 7, seq)) for seq, text in enumerate(texts)]
        assert all(status == 200 and body["status"] == "OK" for status, body in replays)
        assert all(body["replayed"] for _, body in replays[:300])
        assert not any(body["replayed"] for _, body in replays[301:])
        assert len(filter_flows(bridge)) == _stored_filters(controller) == 999


def test_every_log_line_is_written_once(tmp_path):
    controller = Controller(tmp_path).start()
    controller.stop()
    lines = controller.log.read_text().splitlines()
    assert sum("REST API on" in line for line in lines) == 1
    assert sum("loaded 0 middlebox(es)" in line for line in lines) == 1


def test_a_switch_that_never_connected_is_unavailable_and_nothing_changes(tmp_path):
    controller = Controller(tmp_path).start()
    try:
        status, answer = controller.command(0xABC, 1, f"R F {MAC} 10.0.0.5")
        assert status == 503 and answer["status"] == "UNAVAILABLE"
        assert controller.get("/v1/middleboxes")[1]["middleboxes"] == []
    finally:
        controller.stop()
