"""TLS where a network attacker would push it (controller/handshakes.py): connections that
never finish a handshake on the OpenFlow and REST ports, enough of them to exhaust the
controller's descriptors, a client with an unusable CA, and the app under a manager given
no port.  Each was a bug found by a review (each test failed before its fix).  Loopback
only; the real controller process."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mbvisor.agents.controller_client import ControllerClient, ControllerUnavailable
from mbvisor.controller.handshakes import HANDSHAKE_TIMEOUT
from mbvisor.topologies.controller_run import Controller, free_port
from mbvisor.topologies.netlab import wait_until

from test_tls import pki  # noqa: F401 - the fixture

# The first bytes of a TLS ClientHello record: the server waits for the rest for ever.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def _tls_controller(pki, directory: Path, **environment) -> Controller:
    key, cert = pki["controller"]
    return Controller(directory, tls_ca=pki["ca"][1],
                      environment={"MBVISOR_REST_IDLE_TIMEOUT": "2", **environment},
                      arguments=("--tls-cert", str(cert), "--tls-key", str(key),
                                 "--tls-switch-ca", str(pki["ca"][1]))).start()


def _still_open(connection: socket.socket) -> bool:
    connection.settimeout(0.3)
    try:
        return connection.recv(1) != b""
    except socket.timeout:
        return True
    except ConnectionError:
        return False


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stalled(port: int, count: int) -> list[socket.socket]:
    connections = []
    for index in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        if index % 2:
            connection.sendall(PARTIAL_HELLO)
        connections.append(connection)
    return connections


def test_stalled_handshakes_on_the_openflow_tls_port_are_closed(pki, tmp_path):
    """REST closes a connection whose handshake has not finished within the idle time-out
    (2 s here)."""
    controller = _tls_controller(pki, tmp_path)
    connections = []
    try:
        before = _descriptors(controller.process.pid)
        connections = _stalled(controller.ofp_port, 10)
        wait_until(lambda: not any(_still_open(c) for c in connections), timeout=HANDSHAKE_TIMEOUT + 10,
                   what="the stalled OpenFlow handshakes closed")
        wait_until(lambda: _descriptors(controller.process.pid) <= before, timeout=5, what="their descriptors freed")
    finally:
        for connection in connections:
            connection.close()
        controller.stop()


def test_openflow_handshakes_cannot_stop_the_controller(pki, tmp_path):
    """A peer without a certificate opens connections to the OpenFlow TLS port (exposed
    beyond loopback: that is what TLS is for) and never finishes a handshake.  The
    controller runs with systemd's default descriptor limit (1024 soft; the unit sets no
    LimitNOFILE).  REST must still answer and the process must live."""
    controller = _tls_controller(pki, tmp_path)
    connections = []
    pid = controller.process.pid
    try:
        assert controller.get("/v1/health")[0] == 200
        subprocess.run(["prlimit", f"--pid={pid}", "--nofile=1024:"], check=True)
        for _ in range(1100):
            try:
                connections.append(socket.create_connection(("127.0.0.1", controller.ofp_port), timeout=5))
            except OSError:
                break
        assert len(connections) > 1024  # more than the controller may hold descriptors

        def healthy() -> bool:
            assert controller.process.poll() is None, f"the controller exited with {controller.process.poll()}"
            try:
                return controller.request("GET", "/v1/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(healthy, timeout=HANDSHAKE_TIMEOUT + 20, what="REST answering while the handshakes stall")
        for connection in connections:
            connection.close()
        connections = []
        wait_until(lambda: _descriptors(pid) < 100, timeout=HANDSHAKE_TIMEOUT + 10, what="the descriptors freed")
        assert controller.process.poll() is None
    finally:
        for connection in connections:
            connection.close()
        controller.stop()


def test_stalled_rest_handshakes_do_not_hold_the_rest_port(pki, tmp_path):
    """docs/security.md: a network attacker (TLS on) cannot "hold the REST port with
    stalled or plain-HTTP handshakes".  With the connection limit at 4 (256 by default),
    4 connections that never finish their handshake hold every slot for the whole idle
    time-out, and reopened, for ever."""
    controller = _tls_controller(pki, tmp_path, MBVISOR_REST_MAX_CONNECTIONS="4", MBVISOR_REST_IDLE_TIMEOUT="6")
    connections = []
    try:
        connections = _stalled(controller.rest_port, 4)  # accepted before the client below (in order)
        started = time.monotonic()
        try:
            status = controller.request("GET", "/v1/health", timeout=3)[0]
        except OSError as error:
            status = f"no answer in {time.monotonic() - started:.1f} s: {error!r}"
        assert status == 200, f"an HTTPS client while 4 handshakes stall: {status}"
    finally:
        for connection in connections:
            connection.close()
        controller.stop()


def test_an_unreadable_controller_ca_is_a_controller_problem_not_an_agent_crash(tmp_path):
    """The agent takes --controller-ca without checking it at start; the client then raises
    a bare FileNotFoundError (neither ControllerUnavailable nor ControllerFailed, the two
    the agent handles) at the first command."""
    client = ControllerClient("https://127.0.0.1:9", "token", timeout=1, ca_file=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(ControllerUnavailable):
        client.execute([{"dpid": "00000000000000c1", "port": 1, "command": "I 02:00:00:00:00:01"}])


@pytest.mark.parametrize("tls", [False, True])
def test_the_app_starts_under_osken_manager_without_a_port_flag(pki, tmp_path, tls):
    """docs/controller.md runs ``osken-manager mbvisor.controller.app`` and, for TLS under
    a manager, "give the manager's own TLS flags".  Without a listen-port flag os-ken
    listens on its defaults (6653 and 6633): the app checks the one it will use."""
    import sys
    key, cert = pki["controller"]
    flags = ["--ctl-cert", str(cert), "--ctl-privkey", str(key)] if tls else []
    manager = Path(sys.executable).parent / "osken-manager"
    rest_port = free_port()
    log = tmp_path / "manager.log"
    environment = {**os.environ, "MBVISOR_DB": str(tmp_path / "c.sqlite"), "MBVISOR_REST_PORT": str(rest_port),
                   **({"MBVISOR_TLS_CERT": str(cert), "MBVISOR_TLS_KEY": str(key)} if tls else {})}
    with open(log, "wb") as output:
        process = subprocess.Popen([str(manager), "--ofp-listen-host", "127.0.0.1", *flags, "mbvisor.controller.app"],
                                   stdout=output, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_until(lambda: "mbvisor controller running" in log.read_text() or process.poll() is not None,
                   timeout=30, what="the manager's start")
        text = log.read_text()
        assert "TypeError" not in text, text[-600:]
        assert "mbvisor controller running" in text or "6653 is already in use" in text, text[-600:]
    finally:
        process.kill()
        process.wait(10)
