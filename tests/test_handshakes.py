"""controller/handshakes.py's HandshakingListener under a busy server: what waits for the
server stays bounded.  In-process: the REST server exactly as rest.serve composes it (eventlet.wsgi with a
connection pool), over a HandshakingListener; the clients are OS threads (no monkey
patching in the tests)."""

from __future__ import annotations

import os
import socket
import time
import ssl
import threading
from types import SimpleNamespace

import eventlet
from eventlet.green import ssl as green_ssl

from mbvisor.controller import rest
from mbvisor.controller.compat import hub
from mbvisor.controller.handshakes import MAX_HANDSHAKES, PER_PEER, HandshakingListener

from test_tls import pki  # noqa: F401 - the fixture

EXTRA = MAX_HANDSHAKES + 44


def _app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_handshaken_connections_waiting_for_a_busy_server_are_bounded(pki):
    """With every REST slot taken (here 2; in production 256 idle clients for 30 s each),
    connections that complete their handshake wait for the server in the listener: they
    count against the caps until the server takes them, so one address parks at most
    PER_PEER of them (each a descriptor); the rest wait in the kernel's backlog or are
    closed.  Found by a review: the ready queue was unbounded (299 parked)."""
    key, cert = pki["controller"]
    context = green_ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = HandshakingListener(eventlet.listen(("127.0.0.1", 0)), context, "REST")
    port = listener.getsockname()[1]
    settings = SimpleNamespace(rest_idle_timeout=30, rest_max_connections=2)
    server = hub.spawn(rest.serve, listener, _app, settings)
    client_context = ssl.create_default_context(cafile=str(pki["ca"][1]))
    held, failures = [], []

    def clients():
        try:
            for _ in range(2 + EXTRA):
                plain = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(client_context.wrap_socket(plain, server_hostname="127.0.0.1"))
        except Exception as error:  # noqa: BLE001
            failures.append(error)

    thread = threading.Thread(target=clients)
    thread.start()
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        eventlet.sleep(0.01)  # the clients' thread connects while this green thread lets the server run
    assert not thread.is_alive(), "the clients did not finish connecting within 60 s"
    deadline = time.monotonic() + 10
    while sum(listener.peers.values()) > listener.ready.qsize() and time.monotonic() < deadline:
        eventlet.sleep(0.01)  # the server's side of the last handshakes (yielding to the hub, bounded)
    try:
        # Beyond the caps connections are closed (one address's share) or wait in the backlog.
        assert all(isinstance(error, (ConnectionError, ssl.SSLError)) for error in failures), failures
        waiting = listener.ready.qsize()
        print(f"ready queue: {waiting}; descriptors: {len(os.listdir('/proc/self/fd'))}")
        assert waiting <= PER_PEER, (f"{waiting} handshaken connections from one address parked in the "
                                     f"listener, each a descriptor (MAX_HANDSHAKES {MAX_HANDSHAKES})")
    finally:
        for connection in held:
            connection.close()
        hub.kill(server)
        listener.close()
        while listener.ready.qsize():
            listener.ready.get()[0].close()
