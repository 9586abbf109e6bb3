"""TLS handshakes done apart from the servers that use the connections.

A server that handshakes in its accept loop, or in a connection slot of its pool, can be
held by clients that connect and never finish a handshake: os-ken's OpenFlow server had
no deadline at all (each stalled connection a descriptor for ever, until the process ran
out of them and its accept loop ended the controller), and the REST pool gave each one a
connection slot for its whole idle time-out.  Here a listening socket hands its server
only connections whose handshake is complete: each handshake runs in a green thread of
its own, within ``HANDSHAKE_TIMEOUT``; at most ``MAX_HANDSHAKES`` connections are
handshaking or waiting for the server to take them, at most ``PER_PEER`` of them from one
address (more from it are closed at once; more in all wait in the kernel's backlog), and an
accept that fails for want of descriptors is retried after a pause instead of ending the
server.
"""

from __future__ import annotations

import errno
import importlib
import logging
import ssl

import eventlet
from eventlet.green import ssl as green_ssl
from eventlet.queue import LightQueue

from mbvisor.guest.reader import FaultLog

from .compat import FRAMEWORK, hub

log = logging.getLogger("mbvisor.controller")

HANDSHAKE_TIMEOUT = 5.0  # seconds a client has to complete its handshake
MAX_HANDSHAKES = 256     # connections handshaking or handed over but not taken yet; more wait in the backlog
PER_PEER = 16            # ... of which from one address
SHORT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class HandshakingListener:
    """A listening socket whose ``accept`` returns only connections that completed their
    TLS handshake with ``context`` (a green ``ssl.SSLContext``), as ``(socket, address)``."""

    def __init__(self, sock, context, what: str):
        self.sock, self.context, self.what = sock, context, what
        self.family = sock.family
        self.ready: LightQueue = LightQueue()
        self.slots = eventlet.semaphore.Semaphore(MAX_HANDSHAKES)
        self.peers: dict[str, int] = {}
        self.faults = FaultLog(log)  # a client failing thousands of handshakes must not flood the log
        self.thread = hub.spawn(self._accept_loop)

    def accept(self):
        """A connection whose handshake is done; its slot (and its address's share) is
        given back only now, so connections that wait for a busy server count against
        the caps as handshakes do: the descriptors held here stay bounded."""
        secure, address = self.ready.get()
        self._release(address)
        return secure, address

    def _release(self, address) -> None:
        self.slots.release()
        self.peers[address[0]] -= 1
        if not self.peers[address[0]]:
            del self.peers[address[0]]

    def getsockname(self):
        return self.sock.getsockname()

    def close(self) -> None:
        hub.kill(self.thread)
        self.sock.close()

    def _accept_loop(self) -> None:
        while True:
            self.slots.acquire()
            try:
                connection, address = self.sock.accept()
            except OSError as error:
                self.slots.release()
                if error.errno not in SHORT_OF_DESCRIPTORS:
                    raise
                self.faults("descriptors", logging.ERROR, "%s: cannot accept (%s); again in 0.1 s", self.what, error)
                hub.sleep(0.1)
                continue
            peer = address[0]
            if self.peers.get(peer, 0) >= PER_PEER:
                self.slots.release()
                connection.close()
                self.faults(f"peer {peer}", logging.WARNING, "%s: %s has %d handshakes in progress; closed another",
                            self.what, peer, PER_PEER)
                continue
            self.peers[peer] = self.peers.get(peer, 0) + 1
            hub.spawn(self._handshake, connection, address)

    def _handshake(self, connection, address) -> None:
        secure, handed = None, False
        deadline = eventlet.Timeout(HANDSHAKE_TIMEOUT)
        try:
            secure = self.context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
            secure.do_handshake()
            self.ready.put((secure, address))
            handed = True
        except (eventlet.Timeout, OSError) as error:  # ssl.SSLError is an OSError
            if isinstance(error, eventlet.Timeout) and error is not deadline:
                raise
            self.faults(f"handshake {address[0]}", logging.INFO, "%s: TLS handshake with %s failed: %s", self.what,
                        address[0], "timed out" if error is deadline else error)
        finally:
            deadline.cancel()
            if not handed:
                (secure if secure is not None else connection).close()  # the TLS socket owns it once wrapped
                self._release(address)


class HandshakingStreamServer(hub.StreamServer):
    """The managers' OpenFlow server (``StreamServer``) with TLS handshakes done by a
    ``HandshakingListener``, and an accept loop that outlives a shortage of descriptors
    (plain TCP too): os-ken's ends there, and the controller with it."""

    def __init__(self, listen_info, handle=None, backlog=None, spawn="default", **ssl_args):
        super().__init__(listen_info, handle, backlog, spawn)
        if ssl_args:
            self.server = HandshakingListener(self.server, _openflow_context(ssl_args), "OpenFlow")

    def serve_forever(self):
        while True:
            try:
                sock, address = self.server.accept()
            except OSError as error:
                if error.errno not in SHORT_OF_DESCRIPTORS:
                    raise
                log.error("OpenFlow: cannot accept (%s); again in 0.1 s", error)
                hub.sleep(0.1)
                continue
            hub.spawn(self.handle, sock, address)


def _openflow_context(ssl_args: dict):
    """The TLS context the manager's options ask for (``--ctl-cert``, ``--ctl-privkey``,
    ``--ca-certs``, ``--ciphers``), green, TLS 1.2 at least."""
    context = green_ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(ssl_args["certfile"], ssl_args["keyfile"])
    if "cert_reqs" in ssl_args:
        context.verify_mode = ssl_args["cert_reqs"]
    if "ca_certs" in ssl_args:
        context.load_verify_locations(ssl_args["ca_certs"])
    if "ciphers" in ssl_args:
        context.set_ciphers(ssl_args["ciphers"])
    return context


def install_openflow_server() -> None:
    """The manager's OpenFlow controller serves through ``HandshakingStreamServer``: set
    before it starts listening (apps are made before the manager starts them)."""
    module = importlib.import_module(f"{FRAMEWORK}.controller.controller")
    module.StreamServer = HandshakingStreamServer
