"""The REST edge against a fake service: validation, status mapping, auth, views, logs,
and the real eventlet server's limits over TCP (port taken, backlog, idle connections)."""

from __future__ import annotations

import ast
import http.client
import json
import logging
import os
import queue
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import eventlet
import eventlet.hubs
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from webob import Request

from fakeswitch import wait_until
from mbvisor.controller import pacing
from mbvisor.controller import rest
from mbvisor.controller.flows import cookie_of
from mbvisor.controller.metrics import Metrics
from mbvisor.controller.model import Binding, State, apply
from mbvisor.controller.trust import Inventory, build_inventory
from mbvisor.controller.requests import (MAX_BATCH, Answer, BadRequest, CommandRequest, SwitchUnavailable,
                                         read_token_file, requests_from_body)
from mbvisor.guest.grammar import parse_command

TOKEN = "s3cret-token"
MAC = "52:34:56:00:12:22"
DPID = 0xA1
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COMMAND = {"dpid": "00000000000000a1", "port": 3, "command": f"R F {MAC} 10.0.0.5"}
CONTROLLER = Path(rest.__file__).parent


@dataclass
class FakeService:
    """The service's side of the contract, recording what the edge asked of it."""

    state: State = field(default_factory=lambda: apply(State(), Binding(DPID, 3),
                                                       parse_command(f"R F {MAC} 10.0.0.5")).state)
    metrics: Metrics = field(default_factory=Metrics)
    connected: set = field(default_factory=lambda: {DPID})
    answer: object = lambda request: Answer("OK", f"done: {request.command}")
    submitted: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    inventories: dict = field(default_factory=dict)

    def submit(self, requests: list[CommandRequest]) -> list[Answer]:
        self.submitted.append(requests)
        return [self.answer(request) for request in requests]

    def delete_middlebox(self, dpid: int, mac: str, anchor: bool = False) -> Answer:
        self.calls.append(("delete", dpid, mac) + (("anchor",) if anchor else ()))
        middlebox = self.state.find(dpid, mac)
        if middlebox is None:
            return Answer("REJECTED", f"no middlebox {mac} on {dpid:016x}", "not-found")
        return self.answer(CommandRequest(dpid, middlebox.port, f"X {mac}"))

    def inventory_of(self, dpid: int) -> Inventory:
        return self.inventories.get(dpid, Inventory())

    def set_inventory(self, dpid: int, entries) -> Inventory:
        self.calls.append(("set_inventory", dpid, entries))
        self.inventories[dpid] = build_inventory(entries)
        return self.inventories[dpid]

    def switch_views(self) -> list[dict]:
        return [{"dpid": dpid, "connected": dpid in self.connected, "connected_at": 1.0 if dpid in self.connected
                 else None, "synced": dpid in self.connected, "generation": 2, "applied_generation": 2,
                 "flows": 5 if dpid in self.connected else None, "groups": 0, "last_error": None}
                for dpid in (0xB2, DPID)]

    def _connected(self, dpid: int) -> None:
        if dpid not in self.connected:
            raise SwitchUnavailable(f"switch {dpid:016x} is not connected")

    def flow_statistics(self, dpid: int, cookie: int) -> list[dict]:
        self._connected(dpid)
        self.calls.append(("flow_statistics", dpid, cookie))
        return [{"table": 0, "priority": 3000, "match": {"eth_dst": MAC}, "actions": "drop", "packets": 7,
                 "bytes": 420, "cookie": f"{cookie:#018x}",
                 "text": f"cookie={cookie:#x}, table=0, priority=3000,dl_dst={MAC} actions=drop"}]

    def backend_states(self, dpid: int, mac: str) -> dict:
        return {"10.0.0.11": "up", "10.0.0.12": "down"}

    def handled_packets(self, dpid: int, mac: str) -> dict:
        self._connected(dpid)
        self.calls.append(("handled_packets", dpid, mac))
        return {"packets": 11, "bytes": 660}

    def refresh_metrics(self) -> None:
        self.metrics.handled.labels(f"{DPID:016x}", MAC).set(11)


def settings(token=TOKEN, **limits):
    return SimpleNamespace(token=token, rest_host="127.0.0.1", rest_port=0, **limits)


def call(api, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = Request.blank(path, method=method, headers=headers or {}, **({} if data is None else {"body": data}))
    return request.get_response(api)


@pytest.fixture
def service():
    return FakeService()


@pytest.fixture
def api(service):
    return rest.RestApi(service, settings())


# --- 1. malformed input: 400 naming the field, never 500, nothing applied -------------------

BAD_BODIES = [
    (b"[]", "body:"),
    (b"null", "body:"),
    (b"not json", "body: not valid JSON"),
    (b"", "body: not valid JSON"),
    (b"\xff\xfe{", "body: not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "body: not valid JSON"),
    (b'{"commands": "ab"}', "commands:"),
    (b'{"commands": ["ab"]}', "commands[0]:"),
    (b'{"commands": [], "dpid": 1}', "dpid: unknown field"),
    (json.dumps({**COMMAND, "port": "3"}).encode(), "port: must be an integer 1..4294967040"),
    (json.dumps({**COMMAND, "port": True}).encode(), "port: must be an integer"),
    (json.dumps({**COMMAND, "port": 0xFFFFFF01}).encode(), "port: must be an integer"),
    (json.dumps({**COMMAND, "dpid": "xyz"}).encode(), "dpid: must be"),
    (json.dumps({**COMMAND, "dpid": "1" * 17}).encode(), "dpid: must be"),
    (json.dumps({**COMMAND, "dpid": 2**64}).encode(), "dpid: must be"),
    (json.dumps({**COMMAND, "dpid": 1.5}).encode(), "dpid: must be"),
    (json.dumps({k: v for k, v in COMMAND.items() if k != "port"}).encode(), "port: required"),
    (json.dumps({**COMMAND, "command": 7}).encode(), "command: must be"),
    (json.dumps({**COMMAND, "command": "A" * 4097}).encode(), "command: must be command text of at most 4096"),
    (json.dumps({**COMMAND, "channel": "vm", "epoch": 1, "seq": 18446744073709551615}).encode(),
     "seq: must be an integer 0..9223372036854775807"),
    (json.dumps({**COMMAND, "channel": "vm", "epoch": 2**32, "seq": 1}).encode(), "epoch: must be an integer"),
    (json.dumps({**COMMAND, "channel": "", "epoch": 1, "seq": 1}).encode(), "channel: must be a string"),
    (json.dumps({**COMMAND, "channel": "c" * 257, "epoch": 1, "seq": 1}).encode(), "channel: must be a string"),
    (json.dumps({**COMMAND, "seq": 1}).encode(), "channel: required with seq"),
    (json.dumps({**COMMAND, "sequence": 1}).encode(), "sequence: unknown field"),
    (json.dumps({"commands": [COMMAND, {**COMMAND, "port": -1}]}).encode(), "commands[1].port: must be an integer"),
]


@pytest.mark.parametrize("raw, message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_a_malformed_body_is_400_naming_the_field_and_nothing_is_applied(api, service, raw, message):
    response = call(api, "POST", "/v1/commands", raw=raw, headers=AUTH)
    assert response.status_int == 400, response.text
    error = response.json["error"]
    assert error["code"] == "bad-request"
    assert error["message"].startswith(message)
    assert "'port'" not in error["message"] and "invalid literal" not in error["message"]
    assert len(error["message"]) < 300  # never echoes what the client sent
    assert service.submitted == []


def test_a_batch_too_long_is_refused_whole():
    with pytest.raises(BadRequest, match=r"^commands: must be a list of at most 200000"):
        requests_from_body({"commands": [COMMAND] * (MAX_BATCH + 1)})


def test_a_long_batch_is_checked_in_slices_that_let_other_requests_run(api, service, monkeypatch):
    yielded = []
    monkeypatch.setattr(pacing, "SLICE", 0)  # every command's check is a slice
    monkeypatch.setattr(pacing.hub, "sleep", yielded.append)
    assert call(api, "POST", "/v1/commands", {"commands": [COMMAND] * 10}, AUTH).status_int == 200
    assert yielded == [0] * 10 and len(service.submitted[0]) == 10


def test_valid_requests_reach_the_service_as_typed_requests(api, service):
    keyed = {**COMMAND, "dpid": "0xA1", "channel": "vm17", "epoch": 2**32 - 1, "seq": 2**63 - 1}
    response = call(api, "POST", "/v1/commands", {"commands": [keyed, {**COMMAND, "dpid": 161, "command": {"op": "X",
                                                                                                           "mac": MAC}}]},
                    headers=AUTH)
    assert response.status_int == 200
    first, second = service.submitted[0]
    assert first == CommandRequest(DPID, 3, COMMAND["command"], "vm17", 2**32 - 1, 2**63 - 1)
    assert first.key == ("vm17", 2**32 - 1, 2**63 - 1)
    assert second == CommandRequest(DPID, 3, {"op": "X", "mac": MAC}) and second.key is None


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(api):
    assert call(api, "GET", "/v1/nothing").status_int == 404
    assert call(api, "GET", "/v1/middleboxes/a1").status_int == 404
    wrong = call(api, "GET", "/v1/commands")
    assert wrong.status_int == 405 and wrong.headers["Allow"] == "POST"
    assert wrong.json["error"]["code"] == "method-not-allowed"
    put = call(api, "PUT", f"/v1/middleboxes/a1/{MAC}", headers=AUTH)
    assert put.status_int == 405 and put.headers["Allow"] == "DELETE, GET"


@pytest.mark.parametrize("method, path, field", [
    ("GET", f"/v1/middleboxes/nothex/{MAC}", "dpid"),
    ("GET", f"/v1/middleboxes/{'1' * 17}/{MAC}/flows", "dpid"),
    ("GET", "/v1/middleboxes/a1/52:34:56:00:12", "mac"),
    ("DELETE", "/v1/middleboxes/a1/zz:34:56:00:12:22", "mac"),
])
def test_a_bad_dpid_or_mac_in_the_path_is_400_naming_it(api, service, method, path, field):
    response = call(api, method, path, headers=AUTH)
    assert response.status_int == 400
    assert response.json["error"]["message"].startswith(f"{field}: must be")
    assert service.calls == []


def test_a_service_bug_is_500_without_its_text_and_the_log_is_clipped(service, caplog):
    def explode(request):
        raise RuntimeError("secret detail " + "x" * (1 << 20))
    service.answer = explode
    with caplog.at_level(logging.DEBUG, logger="mbvisor.rest"):
        response = call(rest.RestApi(service, settings()), "POST", "/v1/commands", COMMAND, AUTH)
    assert response.status_int == 500
    assert response.json == {"error": {"code": "internal", "message": "internal error; see the controller log"}}
    logged = "".join(record.getMessage() for record in caplog.records)
    assert "RuntimeError: secret detail" in logged and "explode" in logged  # the traceback is there
    assert len(logged) < 5000


# --- 2. status mapping ---------------------------------------------------------------------

@pytest.mark.parametrize("status, code, http", [
    ("OK", "ok", 200), ("SYNTAX", "syntax", 400), ("REJECTED", "limit", 409), ("REFUSED", "refused", 403),
    ("UNAVAILABLE", "switch-down", 503), ("INTERNAL", "internal", 500), ("REJECTED", "key-reused", 409),
    ("OK", "key-reused", 409), ("NEW-STATUS", "x", 500),
])
def test_a_single_command_is_answered_with_its_status_mapped_to_http(service, status, code, http):
    service.answer = lambda request: Answer(status, "text", code)
    response = call(rest.RestApi(service, settings()), "POST", "/v1/commands", COMMAND, AUTH)
    assert response.status_int == http
    assert response.json == {"status": status, "code": code, "text": "text", "replayed": False}


def test_a_valid_batch_is_200_with_an_answer_per_command_in_order(api, service):
    answers = iter([Answer("OK", "one"), Answer("SYNTAX", "two", "syntax"), Answer("REJECTED", "three", "key-reused")])
    service.answer = lambda request: next(answers)
    response = call(api, "POST", "/v1/commands", {"commands": [COMMAND] * 3}, AUTH)
    assert response.status_int == 200
    assert [(a["status"], a["text"]) for a in response.json["answers"]] == [
        ("OK", "one"), ("SYNTAX", "two"), ("REJECTED", "three")]
    assert call(api, "POST", "/v1/commands", {"commands": []}, AUTH).json == {"answers": []}


def test_a_batch_asking_for_failures_gets_only_those_with_their_index_and_the_counts(api, service):
    answers = iter([Answer("OK", "one"), Answer("SYNTAX", "two", "syntax"), Answer("OK", "three"),
                    Answer("REJECTED", "four", "limit")])
    service.answer = lambda request: next(answers)
    response = call(api, "POST", "/v1/commands", {"commands": [COMMAND] * 4, "answers": "failures"}, AUTH)
    assert response.status_int == 200
    assert response.json == {"count": 4, "ok": 2, "failures": [
        {"index": 1, "status": "SYNTAX", "code": "syntax", "text": "two", "replayed": False},
        {"index": 3, "status": "REJECTED", "code": "limit", "text": "four", "replayed": False}]}
    assert [len(requests) for requests in service.submitted] == [4]


@pytest.mark.parametrize("mode", ["none", "", None, 1, ["failures"], "FAILURES"])
def test_a_batch_asking_for_unknown_answers_is_refused_whole(api, service, mode):
    response = call(api, "POST", "/v1/commands", {"commands": [COMMAND], "answers": mode}, AUTH)
    assert response.status_int == 400
    assert response.json["error"]["message"].startswith("answers: must be one of all, failures")
    assert service.submitted == []


@given(st.lists(st.builds(Answer, st.sampled_from(["OK", "SYNTAX", "REJECTED", "UNAVAILABLE"]), st.text(),
                          st.sampled_from(["ok", "syntax", "limit", "key-reused"]), st.booleans()), max_size=20))
def test_a_batch_s_answers_are_the_json_of_their_bodies(answers):
    assert rest._answers_json(answers) == json.dumps({"answers": [rest._answer_body(a) for a in answers]})


def test_delete_maps_not_found_to_404_and_answers_like_a_command(api, service):
    gone = call(api, "DELETE", "/v1/middleboxes/a1/52:34:56:00:12:99", headers=AUTH)
    assert gone.status_int == 404 and gone.json["error"]["code"] == "not-found"
    done = call(api, "DELETE", f"/v1/middleboxes/00000000000000A1/{MAC.upper()}", headers=AUTH)
    assert done.status_int == 200 and done.json["status"] == "OK"
    assert service.calls[-1] == ("delete", DPID, MAC)  # canonical MAC, integer dpid
    call(api, "DELETE", f"/v1/middleboxes/a1/{MAC}?anchor=true", headers=AUTH)
    assert service.calls[-1] == ("delete", DPID, MAC, "anchor")
    calls = len(service.calls)
    bad = call(api, "DELETE", f"/v1/middleboxes/a1/{MAC}?anchor=yes", headers=AUTH)
    assert bad.status_int == 400 and "anchor" in bad.json["error"]["message"] and len(service.calls) == calls


# --- 3. auth -------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic " + TOKEN, TOKEN, "Bearer", "Bearer  ", "Bearer é"])
def test_a_write_without_the_token_is_401_with_www_authenticate(api, service, header):
    response = call(api, "POST", "/v1/commands", COMMAND, {} if header is None else {"Authorization": header})
    assert response.status_int == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert call(api, "DELETE", f"/v1/middleboxes/a1/{MAC}").status_int == 401
    assert service.submitted == [] and service.calls == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_accepted_in_any_case(api, scheme):
    assert call(api, "POST", "/v1/commands", COMMAND, {"Authorization": f"{scheme} {TOKEN}"}).status_int == 200


def test_the_token_is_compared_in_constant_time(api, monkeypatch):
    compared = []
    monkeypatch.setattr(rest.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)
    call(api, "POST", "/v1/commands", COMMAND, AUTH)
    assert compared == [(TOKEN.encode(), TOKEN.encode())]


def test_reads_are_open_and_no_token_leaves_writes_open(service):
    assert call(rest.RestApi(service, settings()), "GET", "/v1/health").status_int == 200
    assert call(rest.RestApi(service, settings(token=None)), "POST", "/v1/commands", COMMAND).status_int == 200


def test_white_space_around_the_token_is_not_part_of_it(service):
    api = rest.RestApi(service, settings(token=f" {TOKEN}\n"))
    assert call(api, "POST", "/v1/commands", COMMAND, AUTH).status_int == 200


@pytest.mark.parametrize("token", ["", "   ", "\n"])
def test_an_empty_token_is_refused_at_start(service, token):
    with pytest.raises(ValueError, match="token is empty"):
        rest.RestApi(service, settings(token=token))
    with pytest.raises(ValueError, match="token is empty"):
        rest.start_server(service, settings(token=token))


def test_read_token_file_strips_and_refuses_an_empty_file(tmp_path):
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert read_token_file(tmp_path / "token") == TOKEN
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(tmp_path / "empty")


# --- 4. body limit, 5. logs -----------------------------------------------------------------

def test_a_body_above_the_limit_is_413_without_being_read(api, service, monkeypatch):
    claimed = Request.blank("/v1/commands", method="POST", headers=AUTH, body=b"{}")
    claimed.content_length = rest.MAX_BODY + 1
    response = claimed.get_response(api)
    assert response.status_int == 413 and response.json["error"]["code"] == "too-large"
    monkeypatch.setattr(rest, "MAX_BODY", 100)
    streamed = Request.blank("/v1/commands", method="POST", headers={**AUTH, "Transfer-Encoding": "chunked"},
                             body=b" " * 101)
    del streamed.content_length  # a chunked body: only what was read counts
    assert streamed.get_response(api).status_int == 413
    assert service.submitted == []


def test_a_rejected_megabyte_command_writes_little_log(api, caplog):
    with caplog.at_level(logging.DEBUG):
        response = call(api, "POST", "/v1/commands", {**COMMAND, "command": "A" * (1 << 20)}, AUTH)
        call(api, "POST", "/v1/commands", {"x" * (1 << 20): 1}, AUTH)
        call(api, "GET", "/v1/" + "y" * (1 << 20))
    assert response.status_int == 400
    assert "(got 1048576)" in response.json["error"]["message"]
    assert caplog.records and sum(len(record.getMessage()) for record in caplog.records) < 2000


# --- 6. counters and views -------------------------------------------------------------------

def test_a_middlebox_counts_handled_packets_from_the_service(api, service):
    body = call(api, "GET", f"/v1/middleboxes/a1/{MAC}").json
    assert body["handled_in_switch"] == {"packets": 11, "bytes": 660}
    assert body["backends"] == {"10.0.0.11": "up", "10.0.0.12": "down"}
    assert body["dpid"] == "00000000000000a1" and body["cookie"] == f"{cookie_of(MAC):#018x}"
    assert service.calls == [("handled_packets", DPID, MAC)]  # no summing of flow statistics


def test_a_middlebox_is_described_with_its_filters_and_redirects_as_canonical_text(api, service):
    """The store keeps filters in rows of their own; the view still lists them all,
    sorted, with every field docs/openapi.yaml requires."""
    for text in (f"A {MAC} I 4 s 10.66.0.0/16", f"A {MAC} T 12 s 1000-1999 d 80"):
        service.state = apply(service.state, Binding(DPID, 3), parse_command(text)).state
    body = call(api, "GET", f"/v1/middleboxes/a1/{MAC}").json
    assert body["filters"] == [f"A {MAC} I 4 s 10.66.0.0/16", f"A {MAC} T 12 s 1000-1999 d 80"]
    listed = call(api, "GET", "/v1/middleboxes").json["middleboxes"][0]
    assert {"dpid", "mac", "port", "zone", "firewall_ip", "balancer_ip", "filters", "redirects", "cookie"} <= set(listed)
    assert listed["filters"] == body["filters"]


def test_flows_are_the_switch_view_and_503_when_it_is_disconnected(api, service):
    flows = call(api, "GET", f"/v1/middleboxes/a1/{MAC}/flows").json["flows"]
    assert flows[0]["actions"] == "drop" and service.calls == [("flow_statistics", DPID, cookie_of(MAC))]
    service.connected.clear()
    for path in (f"/v1/middleboxes/a1/{MAC}/flows", f"/v1/middleboxes/a1/{MAC}"):
        response = call(api, "GET", path)
        assert response.status_int == 503
        assert response.json["error"] == {"code": "switch-unavailable",
                                          "message": "switch 00000000000000a1 is not connected"}
    assert call(api, "GET", "/v1/middleboxes/a1/52:34:56:00:12:99").status_int == 404


def test_switches_list_disconnected_ones_with_hex_dpids_and_health_counts_connected(api, service):
    switches = call(api, "GET", "/v1/switches").json["switches"]
    assert [(s["dpid"], s["connected"]) for s in switches] == [("00000000000000a1", True), ("00000000000000b2", False)]
    assert switches[0] == {**service.switch_views()[1], "dpid": "00000000000000a1"}
    assert call(api, "GET", "/v1/health").json == {"status": "ok", "switches": 1, "middleboxes": 1}
    listed = call(api, "GET", "/v1/middleboxes").json["middleboxes"]
    assert [(m["dpid"], m["mac"], m["port"], m["firewall_ip"]) for m in listed] == [
        ("00000000000000a1", MAC, 3, "10.0.0.5")]


def test_metrics_are_refreshed_before_the_exposition(api):
    response = call(api, "GET", "/metrics")
    assert response.status_int == 200 and response.content_type == "text/plain"
    assert f'mbvisor_packets_handled_in_switch{{dpid="00000000000000a1",mac="{MAC}"}} 11.0' in response.text


def test_the_rest_edge_imports_nothing_of_the_service_or_the_app():
    def local_imports(name):
        tree = ast.parse((CONTROLLER / name).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert local_imports("rest.py") == {"compat", "flows", "handshakes", "pacing", "requests", "store"}
    assert local_imports("requests.py") == {"trust"}  # pure, like requests.py


# --- 4. the real server over TCP ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running(service, **limits):
    """``start_server`` in a thread of its own (its own eventlet hub), stopped through a pipe."""
    config = SimpleNamespace(**{**vars(settings()), "rest_port": free_port(), **limits})
    started, (stop_read, stop_write) = queue.Queue(), os.pipe()

    def run():
        try:
            server = rest.start_server(service, config)
        except Exception as error:  # handed to the test
            started.put(error)
            return
        started.put(None)
        eventlet.hubs.trampoline(stop_read, read=True)
        server.kill()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    error = started.get(timeout=10)
    try:
        if error is not None:
            raise error
        yield config.rest_port
    finally:
        os.write(stop_write, b"x")
        thread.join(timeout=10)
        os.close(stop_read)
        os.close(stop_write)


def get(port: int, path: str, timeout: float = 10.0, method="GET", body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, json.loads(response.read())
    finally:
        connection.close()


def test_the_real_server_answers_reads_and_writes_and_logs_short_access_lines(service, caplog):
    with caplog.at_level(logging.DEBUG, logger="mbvisor.rest"), running(service) as port:
        assert get(port, "/v1/health")[2]["status"] == "ok"
        status, _, answer = get(port, "/v1/commands", method="POST", body=json.dumps(COMMAND), headers=AUTH)
        assert (status, answer["status"]) == (200, "OK")
        status, headers, _ = get(port, "/v1/commands", method="POST", body=b"[]")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert get(port, "/v1/" + "y" * 6000)[0] == 404
    access = [record.getMessage() for record in caplog.records if '] "' in record.getMessage()]
    assert len(access) == 4 and all(len(line) < 300 for line in access)
    assert "(6" in access[-1] and "characters)" in access[-1]  # the long request line, clipped


def test_a_taken_rest_port_is_refused_naming_it(service):
    port = free_port()
    taken = eventlet.listen(("127.0.0.1", port), reuse_port=True)  # what os-ken's own listener does
    try:
        with pytest.raises(rest.PortInUse, match=f"REST port 127.0.0.1:{port} is already in use"):
            rest.listen("127.0.0.1", port)
        with pytest.raises(rest.PortInUse):
            with running(service, rest_port=port):
                pass
    finally:
        taken.close()


def test_the_backlog_queues_hundreds_of_connections():
    """With eventlet's backlog of 50 the 52nd connect would hang: nobody accepts here."""
    listener = rest.listen("127.0.0.1", 0)
    clients = []
    try:
        for _ in range(300):
            client = socket.create_connection(listener.getsockname(), timeout=2)
            clients.append(client)
    finally:
        for client in clients:
            client.close()
        listener.close()
    assert len(clients) == 300


def test_idle_connections_are_bounded_and_timed_out_so_the_api_stays_up(service):
    idle_timeout = 0.3
    with running(service, rest_max_connections=4, rest_idle_timeout=idle_timeout) as port:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        try:
            started = time.monotonic()
            status, _, body = get(port, "/v1/health", timeout=20)
            assert (status, body["status"]) == (200, "ok")
            # 20 idle connections ahead of it, 4 at a time, each dropped after the idle timeout
            assert time.monotonic() - started < 20 / 4 * idle_timeout + 5
            for client in idle:  # the server closed every one of them
                assert client.recv(1) == b""
        finally:
            for client in idle:
                client.close()


def test_an_oversized_body_is_answered_413_before_the_client_sends_it(service):
    with running(service) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                       + f"\r\nContent-Length: {1 << 30}\r\n\r\n{{".encode())
        head = client.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and "Connection: close" in head
    assert service.submitted == []


def test_key_fields_sent_as_null_are_left_out_and_a_half_key_is_refused():
    from mbvisor.controller.requests import BadRequest, requests_from_body

    command = {"dpid": "a1", "port": 5, "command": f"X {MAC}"}
    (request,) = requests_from_body({"commands": [{**command, "channel": None, "epoch": None, "seq": None}]})
    assert request.key is None  # docs/rest.md: null is the same as leaving it out
    with pytest.raises(BadRequest, match="seq: required with channel and epoch"):
        requests_from_body({"commands": [{**command, "channel": "c", "epoch": 1, "seq": None}]})


def test_an_inventory_address_that_is_no_text_is_refused():
    from mbvisor.controller.requests import BadRequest, inventory_from_body

    for address in (False, 0, 167772165):  # ipaddress would read each as an IPv4 address
        with pytest.raises(BadRequest, match="is not an IP address text"):
            inventory_from_body({"ports": [{"port": 3, "mac": MAC, "tenant": "blue", "ips": [address]}]})


# Batch items as a client might write them: each like the first, which names a switch
# and port, with at most one change: that switch and port spelt otherwise or of another
# JSON type, another command form, a key, a field left out or one too many.  A batch of
# them is read by requests_from_body, which checks an item naming the same place as the
# one before with a shortcut (requests.py, _names_same_place).
_FIRST = {"dpid": "a1", "port": 5, "command": f"X {MAC}"}
_CHANGES = st.one_of(
    st.just({}),
    st.builds(dict, dpid=st.sampled_from(["a1", "A1", "0xa1", 0xA1, 0xA2, 161.0, True, "zz", None])),
    st.builds(dict, port=st.sampled_from([5, 6, 5.0, True, "5", None])),
    st.builds(dict, command=st.sampled_from(["I " + MAC, "x" * 4097, {"op": "cancel", "mac": MAC}, 7, None])),
    st.builds(dict, channel=st.just("c"), epoch=st.just(1), seq=st.just(2)),
    st.builds(dict, extra=st.just(1)),
    st.sampled_from(["dpid", "port", "command"]))  # left out


def _changed(first: dict, change) -> dict:
    if isinstance(change, str):
        return {name: value for name, value in first.items() if name != change}
    return {**first, **change}


def _read_one_by_one(items):
    return [requests_from_body({"commands": [item]})[0] for item in items]


@hypothesis_settings(max_examples=1000)
@given(st.sampled_from(["a1", 0xA1]), st.lists(_CHANGES, max_size=4))
def test_a_batch_is_read_as_its_items_one_by_one(dpid, changes):
    """The shortcut for items naming the same switch and port as the one before reads
    exactly what reading each item alone reads, and refuses what it refuses."""
    items = [_changed({**_FIRST, "dpid": dpid}, change) for change in changes]
    try:
        expected = _read_one_by_one(items)
    except BadRequest as error:
        with pytest.raises(BadRequest) as raised:
            requests_from_body({"commands": items})
        assert raised.value.message == error.message
        return
    got = requests_from_body({"commands": items})
    assert got == expected
    assert [type(request) for request in got] == [CommandRequest] * len(items)
    assert [request.key for request in got] == [request.key for request in expected]


def test_an_ok_answer_made_in_bulk_is_the_named_tuple_s_own():
    from mbvisor.controller.requests import ok_answer

    made = ok_answer("added: A 52:34:56:00:12:22 I 4 s 10.0.0.1")
    assert made == Answer("OK", "added: A 52:34:56:00:12:22 I 4 s 10.0.0.1")
    assert type(made) is Answer and made.ok and made.code == "ok" and made.replayed is False


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_bulk_request_is_read_once_the_command_at_work_waits_on_its_switch(api, service, monkeypatch, chunked):
    """A body of BULK_BODY bytes or more waits while a command is carried out on the CPU
    (pacing.preparing), however it was sent; a smaller one is read at once."""
    monkeypatch.setattr(pacing, "PREPARE_DEFERRAL", 30.0)
    log, release = [], []
    service.answer = lambda request: (log.append(request.command), Answer("OK", "done"))[1]

    def command_at_work():
        with pacing.carrying():
            while not release:
                log.append("working")
                pacing.hub.sleep(0)
            with pacing.on_switch():
                log.append("on switch")

    def post(body: dict):
        data = json.dumps(body).encode()
        request = Request.blank("/v1/commands", method="POST", headers=AUTH, body=data)
        if chunked:  # as eventlet hands a chunked body: no length
            request.content_length = None
            request.headers["Transfer-Encoding"] = "chunked"
        return request.get_response(api)

    worker = pacing.hub.spawn(command_at_work)
    pacing.hub.sleep(0)
    try:
        started = time.monotonic()
        assert post({"commands": [{**COMMAND, "command": "small"}]}).status_int == 200
        assert time.monotonic() - started < 10 and "on switch" not in log  # read while the command works
        bulk = {"commands": [{**COMMAND, "command": "bulk"}] * 600}
        assert len(json.dumps(bulk)) >= rest.BULK_BODY
        pacing.hub.spawn(lambda: (wait_until(lambda: pacing._preparing, what="the bulk request waiting"),
                                  release.append(True)))
        assert post(bulk).status_int == 200
        assert log.index("bulk") > log.index("on switch")
    finally:
        release.append(True)
        worker.wait()
