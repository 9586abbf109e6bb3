"""mbvisor's ivshmem server: what an ``ivshmem-doorbell`` QEMU device connects to.

Debian ships QEMU's ``ivshmem-doorbell`` device but no ``ivshmem-server``.  This one
serves one or more regions, each on its own UNIX socket, with the protocol of
guest/ivshmem.py.  The host is peer 0 of every region: its eventfds are made when the
server starts and live as long as it does, so the agent can restart at will (it
connects as a client and takes the host's eventfd from the setup like any peer) while
QEMU, which never reconnects to a server, keeps ringing the same eventfd; rings while
no agent runs stay counted in it, and the next agent wakes at once.

Each client (a QEMU device, an agent, a host-side writer) gets the lowest free ID from
1, the region, the host's and the other clients' eventfds, and eventfds of its own; the
others are told it connected and, when its connection ends, that it left.  A client
that does not read its notifications (its socket buffer full for SEND_TIMEOUT) is
dropped rather than allowed to stall the server.  At most ``max_clients`` per region.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
from dataclasses import dataclass, field

from mbvisor.guest.ivshmem import HOST_PEER, MAX_PEER, PROTOCOL_VERSION, SHARED_MEMORY, send_message
from mbvisor.guest.region import MIN_REGION_SIZE

log = logging.getLogger("mbvisor.ivshmem")
SEND_TIMEOUT = 1.0
DEFAULT_MAX_CLIENTS = 16


class ServerError(Exception):
    """The server cannot serve this region or socket (the message says why)."""


@dataclass
class Client:
    peer_id: int
    connection: socket.socket
    eventfds: list[int]


@dataclass
class Served:
    """One region and its socket."""

    region_path: str
    socket_path: str
    memory: int
    listener: socket.socket
    host_eventfds: list[int]
    clients: dict[int, Client] = field(default_factory=dict)


def _open_region(path: str) -> int:
    """The region's descriptor: a regular file large enough for a ring (never a symlink:
    QEMU maps whatever this names into the guest)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise ServerError(f"cannot open region {path}: {error.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size < MIN_REGION_SIZE:
        os.close(fd)
        raise ServerError(f"{path} is not a regular file of at least {MIN_REGION_SIZE} bytes")
    return fd


def _listen(path: str) -> socket.socket:
    """A listening socket at ``path``.  A socket file left by a server that died is
    replaced; anything else there (a file, a live server) is refused."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ServerError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a dead server's
        else:
            raise ServerError(f"another server already listens on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o077)  # only root (QEMU and the agent run as root) may connect
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.setblocking(False)
    return listener


def _eventfds(vectors: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]


class IvshmemServer:
    def __init__(self, pairs: list[tuple[str, str]], vectors: int = 1, max_clients: int = DEFAULT_MAX_CLIENTS):
        """``pairs``: (region file, socket path) to serve.  ServerError if one cannot be."""
        if not 1 <= vectors <= 64:
            raise ServerError("vectors must be between 1 and 64")
        self.vectors = vectors
        self.max_clients = min(max_clients, MAX_PEER)
        self.selector = selectors.DefaultSelector()
        self.served: list[Served] = []
        try:
            for region_path, socket_path in pairs:
                memory = _open_region(region_path)
                try:
                    listener = _listen(socket_path)
                except BaseException:
                    os.close(memory)
                    raise
                served = Served(region_path, socket_path, memory, listener, _eventfds(vectors))
                self.served.append(served)
                self.selector.register(listener, selectors.EVENT_READ, (served, None))
        except BaseException:
            self.close()
            raise

    def serve_forever(self, stop) -> None:
        """Until ``stop()`` is true (checked at least every half second)."""
        while not stop():
            self.step(0.5)

    def step(self, timeout: float | None) -> None:
        for key, _ in self.selector.select(timeout):
            served, client = key.data
            if client is None:
                self._accept(served)
            else:
                self._read(served, client)

    def _accept(self, served: Served) -> None:
        try:
            connection, _ = served.listener.accept()
        except BlockingIOError:
            return
        peer_id = next((i for i in range(1, self.max_clients + 1) if i not in served.clients), None)
        if peer_id is None:
            log.warning("%s: refusing a client: %d connected already", served.socket_path, self.max_clients)
            connection.close()
            return
        connection.settimeout(SEND_TIMEOUT)
        client = Client(peer_id, connection, _eventfds(self.vectors))
        try:
            send_message(connection, PROTOCOL_VERSION)
            send_message(connection, peer_id)
            send_message(connection, SHARED_MEMORY, served.memory)
            for fd in served.host_eventfds:
                send_message(connection, HOST_PEER, fd)
            for other in served.clients.values():
                for fd in other.eventfds:
                    send_message(connection, other.peer_id, fd)
            for fd in client.eventfds:
                send_message(connection, peer_id, fd)
        except OSError as error:  # a host-side writer leaves once it has the host's eventfd
            log.info("%s: client %d left during its setup (%s)", served.socket_path, peer_id, error)
            self._close_client(client)
            return
        for other in list(served.clients.values()):
            self._tell(served, other, peer_id, client.eventfds)
        served.clients[peer_id] = client
        self.selector.register(connection, selectors.EVENT_READ, (served, client))
        log.info("%s: client %d connected", served.socket_path, peer_id)

    def _tell(self, served: Served, client: Client, peer_id: int, eventfds: list[int] | None) -> None:
        """Tell ``client`` that ``peer_id`` connected (with its eventfds) or left (None);
        a client that cannot take it is dropped."""
        try:
            if eventfds is None:
                send_message(client.connection, peer_id)
            else:
                for fd in eventfds:
                    send_message(client.connection, peer_id, fd)
        except OSError as error:
            log.warning("%s: dropping client %d, which does not read its notifications (%s)",
                        served.socket_path, client.peer_id, error)
            self._drop(served, client)

    def _read(self, served: Served, client: Client) -> None:
        """Clients send nothing; readable means it left (or sent what it must not)."""
        try:
            client.connection.setblocking(False)
            data = client.connection.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            log.warning("%s: client %d sent data; the protocol is one-way: dropping it", served.socket_path,
                        client.peer_id)
        self._drop(served, client)

    def _drop(self, served: Served, client: Client) -> None:
        if served.clients.pop(client.peer_id, None) is None:
            return
        self.selector.unregister(client.connection)
        self._close_client(client)
        log.info("%s: client %d left", served.socket_path, client.peer_id)
        for other in list(served.clients.values()):
            self._tell(served, other, client.peer_id, None)

    @staticmethod
    def _close_client(client: Client) -> None:
        client.connection.close()
        for fd in client.eventfds:
            os.close(fd)
        client.eventfds = []

    def close(self) -> None:
        """Close everything and remove the sockets this server made."""
        for served in self.served:
            for client in list(served.clients.values()):
                self._close_client(client)
            served.clients.clear()
            served.listener.close()
            try:
                os.unlink(served.socket_path)
            except FileNotFoundError:
                pass
            for fd in [served.memory, *served.host_eventfds]:
                os.close(fd)
        self.served = []
        self.selector.close()
