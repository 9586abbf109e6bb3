"""QEMU's ivshmem client-server protocol (QEMU docs/specs/ivshmem-spec.rst), both ends.

An ``ivshmem-doorbell`` device gets its shared memory and its eventfds from a server on
a UNIX socket.  The connection is one-way: every message is one little-endian signed
64-bit number, some with one file descriptor (SCM_RIGHTS).  On connect the server sends
the protocol version (0), the client's own peer ID, ``-1`` with the shared memory's
descriptor, then for every other peer its ID once per interrupt vector, each time with
the eventfd that interrupts that peer on that vector, and last the client's own ID once
per vector with the eventfds it is interrupted through.  Later messages are a peer's ID
with descriptors (a peer connected) or without (it left).

mbvisor's convention (docs/protocol.md, "Doorbell"): the host is peer ``HOST_PEER`` (0)
and listens on vector ``COMMAND_VECTOR`` (0); guests are peers 1 and up.  A guest
writes ``HOST_PEER << 16 | COMMAND_VECTOR`` into its device's Doorbell register after
publishing a command, and QEMU writes the host's eventfd.  A host-side writer (tests,
benchmarks, ``mbctl --shm PATH --doorbell SOCKET``) connects like QEMU does and writes
the same eventfd itself.

Standard library only: the guest side imports this module.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass, field

from .channel_errors import ChannelError

PROTOCOL_VERSION = 0
HOST_PEER = 0
COMMAND_VECTOR = 0
SHARED_MEMORY = -1          # the number that comes with the shared memory's descriptor
MAX_PEER = 0xFFFF           # the Doorbell register has 16 bits for a peer
_MESSAGE = struct.Struct("<q")
MAX_SETUP_MESSAGES = 4096   # a client stops reading a setup longer than any server sends


class DoorbellError(ChannelError):
    """The doorbell's server could not be reached or spoke something else."""


def send_message(connection: socket.socket, number: int, fd: int | None = None) -> None:
    """One message, with ``fd`` if given (the caller keeps its own copy open)."""
    data = _MESSAGE.pack(number)
    if fd is None:
        connection.sendall(data)
    else:
        socket.send_fds(connection, [data], [fd])


class CutMessage(OSError):
    """The stream ended or stalled in the middle of a message: it is out of step."""


def receive_message(connection: socket.socket, deadline: float | None = None) -> tuple[int, int | None] | None:
    """(number, descriptor or None), or None at the end of the stream.  Extra
    descriptors (no server sends more than one per message) are closed.  A message
    that stops part-way (the stream may cut one; its descriptor came with the first
    byte) is waited for until ``deadline`` (monotonic; None: the socket's own time-out
    each read), then CutMessage, and its descriptor closed either way."""
    data, fds, _, _ = socket.recv_fds(connection, _MESSAGE.size, 4)
    try:
        while data and len(data) < _MESSAGE.size:
            if deadline is not None:
                connection.settimeout(max(0.001, deadline - time.monotonic()))
            more, extra, _, _ = socket.recv_fds(connection, _MESSAGE.size - len(data), 4)
            fds += extra
            if not more:
                raise CutMessage("the stream ended inside a message")
            data += more
    except BaseException as error:
        for fd in fds:
            os.close(fd)
        if isinstance(error, (BlockingIOError, TimeoutError)):
            raise CutMessage("the stream stopped inside a message") from None
        raise
    for extra in fds[1:]:
        os.close(extra)
    return (_MESSAGE.unpack(data)[0], fds[0] if fds else None) if data else None


@dataclass
class ClientSetup:
    """What a server tells a new client: its ID, the shared memory, and the eventfds
    that interrupt each other peer (by vector) and that interrupt it."""

    connection: socket.socket
    peer_id: int
    shared_memory: int
    peers: dict[int, list[int]] = field(default_factory=dict)
    own: list[int] = field(default_factory=list)

    def close_except(self, *keep: int) -> None:
        """Close every descriptor received but ``keep`` (and the connection stays open)."""
        for fd in [self.shared_memory, *self.own, *(fd for fds in self.peers.values() for fd in fds)]:
            if fd not in keep:
                os.close(fd)


def connect(path: str, timeout: float = 2.0) -> ClientSetup:
    """Connect to an ivshmem server as QEMU does and read the setup up to the host
    peer's eventfds (``peers[HOST_PEER]``); DoorbellError if it fails or takes longer
    than ``timeout``.  Messages after the host's (other peers, the client's own vectors)
    are read later by ``drain``."""
    deadline = time.monotonic() + timeout
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    received: list[int] = []
    try:
        connection.settimeout(timeout)
        try:
            connection.connect(path)
        except OSError as error:
            raise DoorbellError(f"cannot connect to the doorbell server at {path}: {error.strerror or error}") from None
        version, version_fd = _next(connection, deadline, path, received)
        if version != PROTOCOL_VERSION or version_fd is not None:
            raise DoorbellError(f"{path}: ivshmem protocol version {version}, only {PROTOCOL_VERSION} is known")
        peer_id, stray = _next(connection, deadline, path, received)
        if stray is not None:  # no descriptor belongs with the ID: not kept
            os.close(received.pop())
        if not 0 < peer_id <= MAX_PEER:
            raise DoorbellError(f"{path}: peer ID {peer_id} is not a guest's (1 to {MAX_PEER}; the host is "
                                f"{HOST_PEER}): not an mbvisor doorbell server")
        marker, memory = _next(connection, deadline, path, received)
        if marker != SHARED_MEMORY or memory is None:
            raise DoorbellError(f"{path}: expected the shared memory, got message {marker}")
        setup = ClientSetup(connection, peer_id, memory)
        for _ in range(MAX_SETUP_MESSAGES):
            if HOST_PEER in setup.peers:
                connection.settimeout(None)
                return setup
            number, fd = _next(connection, deadline, path, received)
            if fd is None or not 0 <= number <= MAX_PEER:
                raise DoorbellError(f"{path}: unexpected message {number} during the setup")
            (setup.own if number == peer_id else setup.peers.setdefault(number, [])).append(fd)
        raise DoorbellError(f"{path}: no eventfd of the host (peer {HOST_PEER}) in the setup")
    except BaseException:
        for fd in received:
            os.close(fd)
        connection.close()
        raise


def _next(connection: socket.socket, deadline: float, path: str, received: list[int]) -> tuple[int, int | None]:
    connection.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        message = receive_message(connection, deadline)
    except (TimeoutError, CutMessage):
        raise DoorbellError(f"{path}: the doorbell server did not finish its setup in time") from None
    except OSError as error:
        raise DoorbellError(f"{path}: {error.strerror or error}") from None
    if message is None:
        raise DoorbellError(f"{path}: the doorbell server closed the connection during the setup")
    if message[1] is not None:
        received.append(message[1])
    return message


MAX_DRAINED = 64  # notifications read per call: a server that floods cannot hold its reader


def drain(connection: socket.socket) -> bool:
    """Read (and close the descriptors of) the notifications waiting on a client's
    connection, at most MAX_DRAINED, without blocking; False once the server has gone
    or sent a message cut short (the stream is out of step from then on)."""
    connection.setblocking(False)
    try:
        for _ in range(MAX_DRAINED):
            try:
                message = receive_message(connection)
            except BlockingIOError:
                return True
            except OSError:  # CutMessage among them
                return False
            if message is None:
                return False
            if message[1] is not None:
                os.close(message[1])
        return True
    finally:
        connection.setblocking(True)


def ring_eventfd(fd: int) -> None:
    """What QEMU does for a guest's Doorbell write: add one to the peer's eventfd."""
    os.eventfd_write(fd, 1)
