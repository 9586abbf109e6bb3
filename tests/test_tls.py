"""TLS between the parts of a data centre (docs/datacentre.md): the REST API over HTTPS,
OpenFlow over TLS with switches that must show a certificate of the operator's CA, and the
agent's client verifying the controller.  Real ``openssl`` certificates, the real
controller process, a private ``ovs-vswitchd`` configured with ``ovs-vsctl set-ssl``.

Each promise is tried from the side that would break it: a client without the CA, plain
HTTP on the HTTPS port, connections that never finish their handshake, a switch whose
certificate another CA signed, and a controller started with half a configuration."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

from mbvisor.agents.controller_client import ControllerClient, ControllerUnavailable
from mbvisor.controller.switchid import DPID_URI
from mbvisor.topologies import netlab
from mbvisor.topologies.controller_run import Controller, free_port
from mbvisor.topologies.netlab import wait_until
from mbvisor.topologies.private_switch import PrivateSwitch

MB_MAC, MB_IP = "02:00:00:00:0c:01", "10.12.0.1"
CANARY_MAC, CANARY_IP = "02:00:00:00:0c:02", "10.12.0.2"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _authority(directory, name: str):
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}")
    return key, cert


def _signed(directory, name: str, authority, names: str | None = None):
    """A certificate for ``name`` signed by ``authority`` (key, cert); ``names``: its
    subjectAltName (what a client checks against the host it dialled)."""
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={names}\n" if names else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(authority[1]), "-CAkey", str(authority[0]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions))
    return key, cert


SWITCH_DPID, OTHER_DPID = 0x00004D42_7E5C_0001, 0x00004D42_7E5C_0002


def _names_dpid(dpid: int) -> str:
    return f"URI:{DPID_URI}{dpid:016x}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The operator's CA, the controller's certificate (for 127.0.0.1), a switch's (naming
    the datapath id SWITCH_DPID), one naming OTHER_DPID, one naming none, and a switch
    certificate from a CA the controller does not trust."""
    directory = tmp_path_factory.mktemp("pki")
    ca = _authority(directory, "operator-ca")
    return {"ca": ca, "controller": _signed(directory, "controller", ca, "IP:127.0.0.1,DNS:localhost"),
            "switch": _signed(directory, "switch", ca, f"DNS:hv1.example,{_names_dpid(SWITCH_DPID)}"),
            "other": _signed(directory, "other-switch", ca, _names_dpid(OTHER_DPID)),
            "no-id": _signed(directory, "switch-without-id", ca),
            "rogue": _signed(directory, "rogue-switch", _authority(directory, "rogue-ca"), _names_dpid(SWITCH_DPID))}


@pytest.fixture(scope="module")
def controller(pki, tmp_path_factory):
    key, cert = pki["controller"]
    running = Controller(tmp_path_factory.mktemp("tls-controller"), tls_ca=pki["ca"][1],
                         environment={"MBVISOR_REST_IDLE_TIMEOUT": "2"},
                         arguments=("--tls-cert", str(cert), "--tls-key", str(key),
                                    "--tls-switch-ca", str(pki["ca"][1])))
    running.start()
    yield running
    running.stop()


def test_rest_is_served_over_https_and_verified_with_the_operators_ca(controller):
    status, body = controller.get("/v1/health")
    assert status == 200 and body["status"] == "ok"
    assert controller.url.startswith("https://")
    assert "REST API on https://" in controller.log.read_text()


def test_an_agent_verifies_the_controller_with_the_given_ca_and_refuses_it_without(controller, pki):
    trusting = ControllerClient(controller.url, controller.token, timeout=5, ca_file=str(pki["ca"][1]))
    (answer,) = trusting.execute([{"dpid": "00000000000000c1", "port": 1, "command": f"I {MB_MAC}"}])
    assert answer["status"] == "REJECTED" and MB_MAC in answer["text"]  # the controller's own answer: no such MB
    doubting = ControllerClient(controller.url, controller.token, timeout=5)  # the system's CAs only
    with pytest.raises(ControllerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        doubting.execute([{"dpid": "00000000000000c1", "port": 1, "command": f"I {MB_MAC}"}])


def test_plain_http_and_stalled_handshakes_cost_only_their_own_connections(controller):
    """Five connections that never start a handshake and one speaking plain HTTP: an HTTPS
    client is served meanwhile (handshakes are not done in the accept loop), and each of
    them is closed after the idle time-out (2 s here)."""
    stalled = [socket.create_connection(("127.0.0.1", controller.rest_port), timeout=10) for _ in range(5)]
    plain = socket.create_connection(("127.0.0.1", controller.rest_port), timeout=10)
    plain.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        started = time.monotonic()
        assert controller.request("GET", "/v1/health", timeout=1.5)[0] == 200
        assert time.monotonic() - started < 1.5
        assert _reply(plain)[:4] != b"HTTP"  # never answered in clear (a TLS alert, a reset or nothing)
        for connection in stalled:
            connection.settimeout(10)
            assert connection.recv(1) == b""  # closed by the server, within its time-out
    finally:
        for connection in [*stalled, plain]:
            connection.close()
    assert "TLS handshake with 127.0.0.1 failed" in controller.log.read_text()


def _reply(connection) -> bytes:
    try:
        return connection.recv(4096)
    except ConnectionResetError:
        return b""


def _use_certificate(key, cert, ca) -> None:
    netlab.run(["ovs-vsctl", "set-ssl", str(key), str(cert), str(ca)])


def _connected_dpids(controller) -> set[str]:
    return {s["dpid"] for s in controller.get("/v1/switches")[1]["switches"] if s["connected"]}


def _ssl_errors(bridge) -> str:
    return bridge.vsctl("--columns=status", "list", "controller")


def _filtered_middlebox(controller, lab, bridge, source: str) -> int:
    """A middlebox on a new host's port of ``bridge`` registered and filtering ``source``
    through the TLS session, its flow on the switch; the port."""
    port = bridge.ofport(lab.host("vm").port_name)
    controller.ok(bridge.dpid, port, f"R F {MB_MAC} {MB_IP}")
    controller.ok(bridge.dpid, port, f"A {MB_MAC} I 4 s {source}")
    wait_until(lambda: any(f"nw_src={source}" in line for line in bridge.dump_flows()), timeout=10,
               what="the filter's flow on the switch")
    return port


@pytest.mark.host  # a private ovs-vswitchd and a namespace host
def test_a_switch_connects_over_tls_only_with_a_certificate_of_the_operators_ca(controller, pki):
    """First with a certificate another CA signed: the switch reports the handshake
    failing and the controller never lists it.  Then, with the operator's certificate,
    the same switch connects and a command's flow is installed through the TLS session."""
    with PrivateSwitch(), netlab.Lab() as lab:
        _use_certificate(*pki["rogue"], pki["ca"][1])
        bridge = lab.bridge(controller=controller.target, fail_mode="secure", dpid=SWITCH_DPID)
        dpid = f"{bridge.dpid:016x}"
        wait_until(lambda: "last_error" in _ssl_errors(bridge), timeout=20,
                   what="the switch to report its refused TLS session")
        assert dpid not in _connected_dpids(controller)
        _use_certificate(*pki["switch"], pki["ca"][1])
        bridge.set_controller(None)
        bridge.set_controller(controller.target)
        controller.wait_switch(bridge.dpid)
        _filtered_middlebox(controller, lab, bridge, "10.66.0.9")
        assert bridge.vsctl("get", "controller", ".", "target").strip('"\n') == controller.target


class OpenFlowPeer:
    """A TLS client speaking just enough OpenFlow 1.3 to announce ``dpid`` (hello, a
    features reply, echo replies), reading in a thread until the controller closes the
    connection (``closed``) or ``stop``: a switch as an impostor would build it.  With
    ``deleting``, its features reply comes in one write with an unsolicited (empty) port
    description reply, which moves an accepted connection on to MAIN_DISPATCHER, and a
    port status deleting that port number."""

    def __init__(self, controller, key, cert, ca, dpid: int, deleting: int | None = None):
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        raw = socket.create_connection(("127.0.0.1", controller.ofp_port), timeout=10)
        self.connection = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.dpid, self.deleting, self.closed, self.stopping = dpid, deleting, threading.Event(), False
        self.connection.sendall(struct.pack("!BBHI", 4, 0, 8, 1))  # OFPT_HELLO
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        buffer = b""
        try:
            while not self.stopping:
                try:
                    data = self.connection.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                buffer += data
                while len(buffer) >= 8:
                    version, kind, length, xid = struct.unpack_from("!BBHI", buffer)
                    if len(buffer) < length:
                        break
                    body, buffer = buffer[8:length], buffer[length:]
                    if kind == 5:    # FEATURES_REQUEST -> FEATURES_REPLY
                        self.connection.sendall(struct.pack("!BBHIQIBB2xII", 4, 6, 32, xid, self.dpid, 0, 254, 0, 0, 0)
                                                + self._port_deleted())
                    elif kind == 2:  # ECHO_REQUEST -> ECHO_REPLY
                        self.connection.sendall(struct.pack("!BBHI", 4, 3, 8 + len(body), xid) + body)
        except OSError:
            pass
        finally:
            self.closed.set()

    def _port_deleted(self) -> bytes:
        if self.deleting is None:
            return b""
        port_description = struct.pack("!BBHIHH4x", 4, 19, 16, 99, 13, 0)   # MULTIPART_REPLY, OFPMP_PORT_DESC
        port = struct.pack("!I4x6s2x16sIIIIIIII", self.deleting, b"\x02" * 6, b"vm".ljust(16, b"\0"), *[0] * 8)
        return port_description + struct.pack("!BBHIB7x", 4, 12, 80, 100, 1) + port  # PORT_STATUS, OFPPR_DELETE

    def stop(self) -> None:
        self.stopping = True
        try:
            self.connection.close()
        finally:
            self.thread.join(10)


def _refused_count(controller) -> float:
    return next(float(line.split()[-1]) for line in controller.metrics().splitlines()
                if line.startswith("mbvisor_switches_refused_total"))


def _impostors_leave_the_real_switch_alone(controller, pki, impostors) -> None:
    """The real switch (its certificate names its id) holds a middlebox's flows on one
    host's port and a canary middlebox on another's; each impostor (a valid certificate of
    the operator's CA) announces the real switch's id and, in the same write, deletes the
    middlebox's port.  Each is closed; then the canary's port goes from the real bridge and
    its retirement (an event after the impostors' in the app's queue) is waited for: the
    middlebox, its flows and the real switch's connection are untouched, and its next
    command is confirmed through its own connection."""
    with PrivateSwitch(), netlab.Lab() as lab:
        _use_certificate(*pki["switch"], pki["ca"][1])
        bridge = lab.bridge(controller=controller.target, fail_mode="secure", dpid=SWITCH_DPID)
        controller.wait_switch(bridge.dpid)
        port = _filtered_middlebox(controller, lab, bridge, "10.66.0.10")
        canary = lab.host("canary")
        controller.ok(bridge.dpid, bridge.ofport(canary.port_name), f"R F {CANARY_MAC} {CANARY_IP}")
        flows = sorted(line for line in bridge.dump_flows(no_stats=True) if CANARY_MAC not in line)
        refused = _refused_count(controller)
        connected_at = _switch(controller)["connected_at"]
        for impostor in impostors:
            peer = OpenFlowPeer(controller, *pki[impostor], pki["ca"][1], SWITCH_DPID, deleting=port)
            try:
                assert peer.closed.wait(15), f"the controller kept the {impostor} peer's connection"
            finally:
                peer.stop()
        assert _refused_count(controller) == refused + len(impostors)
        bridge.vsctl("del-port", bridge.name, canary.port_name)
        wait_until(lambda: controller.get(f"/v1/middleboxes/{SWITCH_DPID:016x}/{CANARY_MAC}")[0] == 404, timeout=15,
                   what="the canary's port going, after the impostors' events")
        status, middlebox = controller.get(f"/v1/middleboxes/{SWITCH_DPID:016x}/{MB_MAC}")
        assert status == 200, ("an impostor's port status retired the real switch's middlebox", middlebox)
        view = _switch(controller)
        assert view["connected"] and view["connected_at"] == connected_at, view
        assert sorted(line for line in bridge.dump_flows(no_stats=True) if CANARY_MAC not in line) == flows
        controller.ok(bridge.dpid, port, f"A {MB_MAC} I 4 s 10.66.0.11")
        wait_until(lambda: any("nw_src=10.66.0.11" in line for line in bridge.dump_flows()), timeout=10,
                   what="the next filter's flow through the real switch's connection")


def _switch(controller) -> dict:
    return next(s for s in controller.get("/v1/switches")[1]["switches"] if s["dpid"] == f"{SWITCH_DPID:016x}")


@pytest.mark.host  # a private ovs-vswitchd and namespace hosts
def test_a_switch_announcing_a_datapath_id_its_certificate_does_not_name_is_refused(controller, pki):
    """docs/security.md: with a switch CA, a certificate names the datapath ids its switch
    may announce; a peer with another valid certificate, then one naming no id, are each
    refused (logged, counted) and change nothing of the real switch's."""
    _impostors_leave_the_real_switch_alone(controller, pki, ("other", "no-id"))
    log = controller.log.read_text()
    assert f"announces datapath id {SWITCH_DPID:016x}, but its certificate names {OTHER_DPID:016x} only" in log
    assert f"announces datapath id {SWITCH_DPID:016x}, but its certificate names no datapath id" in log


@pytest.mark.host
def test_beside_an_app_that_loads_dpset_an_impostor_does_not_disconnect_the_real_switch(pki, tmp_path):
    """ofctl_rest loads os-ken's DPSet, which closes an older connection announcing the same
    id once a newer one reaches MAIN_DISPATCHER (a review found the real switch
    disconnected by an impostor this way): a refused connection never gets there."""
    key, cert = pki["controller"]
    ofp_port = free_port()
    beside = Controller(tmp_path, tls_ca=pki["ca"][1], launcher="ryu-manager", ofp_port=ofp_port,
                        apps=("ryu.app.ofctl_rest",),
                        environment={"MBVISOR_TLS_CERT": str(cert), "MBVISOR_TLS_KEY": str(key)},
                        arguments=("--ofp-ssl-listen-port", str(ofp_port), "--ctl-cert", str(cert),
                                   "--ctl-privkey", str(key), "--ca-certs", str(pki["ca"][1]),
                                   "--wsapi-port", str(free_port())))
    beside.start()
    try:
        _impostors_leave_the_real_switch_alone(beside, pki, ("other",))
        assert "Multiple connections" not in beside.log.read_text()
    finally:
        beside.stop()


def test_any_datapath_id_is_accepted_only_when_the_operator_says_so(pki, tmp_path):
    """``--tls-any-switch-id``: a certificate naming no id is accepted (as before the
    check), and the start warns that any switch may take another's place."""
    key, cert = pki["controller"]
    loose = Controller(tmp_path, tls_ca=pki["ca"][1],
                       arguments=("--tls-cert", str(cert), "--tls-key", str(key), "--tls-switch-ca", str(pki["ca"][1]),
                                  "--tls-any-switch-id"))
    loose.start()
    try:
        assert "MBVISOR_TLS_SWITCH_IDS=any: any switch the switch CA signed may announce any datapath id" in \
            loose.log.read_text()
        peer = OpenFlowPeer(loose, *pki["no-id"], pki["ca"][1], OTHER_DPID)
        try:
            wait_until(lambda: any(s["dpid"] == f"{OTHER_DPID:016x}" and s["connected"]
                                   for s in loose.get("/v1/switches")[1]["switches"]), timeout=15,
                       what="the switch without an id in its certificate to be accepted")
            assert not peer.closed.is_set() and _refused_count(loose) == 0
        finally:
            peer.stop()
    finally:
        loose.stop()


@pytest.mark.parametrize("arguments, reason", [
    (("--tls-cert", "/etc/hostname"), "--tls-cert and --tls-key go together"),
    (("--tls-switch-ca", "/etc/hostname"), "--tls-switch-ca needs --tls-cert and --tls-key"),
    (("--tls-cert", "/etc/hostname", "--tls-key", "/etc/hostname", "--tls-any-switch-id"),
     "--tls-any-switch-id needs --tls-switch-ca"),
    (("--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"), "cannot read /nonexistent.pem"),
])
def test_half_a_tls_configuration_stops_the_start_with_the_reason(arguments, reason, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mbvisor.agents.cli", "controller", "--db",
                             str(tmp_path / "c.sqlite"), "--rest-port", "0", *arguments],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and reason in result.stderr


def test_a_certificate_that_does_not_load_stops_the_start_with_the_reason(pki, tmp_path):
    """A key that is not the certificate's: refused at start, not at the first client."""
    key, cert = pki["switch"][0], pki["controller"][1]
    result = subprocess.run([sys.executable, "-m", "mbvisor.agents.cli", "controller", "--db",
                             str(tmp_path / "c.sqlite"), "--ofp-port", str(free_port()),
                             "--rest-port", str(free_port()), "--tls-cert", str(cert), "--tls-key", str(key)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"cannot load the TLS certificate {cert}" in result.stdout + result.stderr


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True)])
def test_rest_beyond_loopback_without_tls_is_said_loudly(host, warned, tmp_path):
    """Tokens would cross the network in clear: the start says so (only listening here,
    no traffic leaves the machine)."""
    log = tmp_path / "controller.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "mbvisor.agents.cli", "controller", "--db",
                                    str(tmp_path / "c.sqlite"), "--ofp-port", str(free_port()),
                                    "--rest-host", host, "--rest-port", str(free_port())],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "mbvisor controller running" in log.read_text() or process.poll() is not None,
                   timeout=30, what="the controller's start")
    finally:
        process.kill()
        process.wait(10)
    text = log.read_text()
    assert "REST API on http://" in text
    assert ("without TLS: tokens and commands cross the network in clear" in text) is warned
