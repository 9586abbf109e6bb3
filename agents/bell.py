"""The host's end of a channel's doorbell: the eventfd a guest's ring lands in.

The agent (and ``mbvisor channel serve --doorbell``) connects to the VM's ivshmem
server like any client and keeps the host peer's eventfd for vector 0
(guest/ivshmem.py): QEMU writes it when the guest writes the Doorbell register, so
the host can sleep in epoll until a command is published.  The connection stays open
only to read the server's notifications (peers coming and going) and to notice the
server's end.

A bell is trusted for nothing: a ring only makes the host look at the region, as its
periodic sweep would.  The server's region must be the channel's own (same device and
inode), else the rings would come from another VM.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading

from mbvisor.guest import ivshmem
from mbvisor.guest.ivshmem import DoorbellError


class HostBell:
    def __init__(self, path: str, connection: socket.socket, eventfd: int, memory: tuple[int, int]):
        self.path = path
        self.connection = connection
        self.eventfd = eventfd
        self.memory = memory  # (device, inode) of the region the server hands out

    @classmethod
    def connect(cls, path: str, timeout: float = 2.0) -> "HostBell":
        """DoorbellError if the server cannot be reached or does not speak the protocol."""
        setup = ivshmem.connect(path, timeout)
        eventfd = setup.peers[ivshmem.HOST_PEER][ivshmem.COMMAND_VECTOR]
        info = os.fstat(setup.shared_memory)
        setup.close_except(eventfd)
        if not _is_eventfd(eventfd):  # epoll would refuse a file, and a pipe cannot be read as one
            os.close(eventfd)
            setup.connection.close()
            raise DoorbellError(f"{path}: the server's host eventfd is not an eventfd")
        os.set_blocking(eventfd, False)
        return cls(path, setup.connection, eventfd, (info.st_dev, info.st_ino))

    def serves(self, region_stat: os.stat_result) -> bool:
        return self.memory == (region_stat.st_dev, region_stat.st_ino)

    def fileno(self) -> int:
        return self.eventfd

    def clear(self) -> int:
        """Rings since the last clear (0 if none), and the bell is quiet again.  OSError
        if it cannot be read (then it is no bell)."""
        try:
            return os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return 0

    def drain(self) -> bool:
        """Read the server's notifications; False once the server has gone."""
        return ivshmem.drain(self.connection)

    def close(self) -> None:
        if self.eventfd >= 0:
            os.close(self.eventfd)
            self.eventfd = -1
        self.connection.close()



def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def open_bell(path: str, directories: tuple[str, ...], timeout: float = 2.0) -> HostBell:
    """The bell behind ``path`` if it names a socket directly in one of ``directories``
    (as written: no symlink, no '..'); DoorbellError saying why not."""
    directory, name = os.path.split(path)
    if directory.rstrip("/") not in {d.rstrip("/") for d in directories} or name in ("", ".", ".."):
        raise DoorbellError(f"{path[:300]!r} is not in a doorbell directory ({', '.join(directories)}; "
                            "see --doorbell-dir)")
    try:
        info = os.lstat(path)
    except OSError as error:
        raise DoorbellError(f"doorbell {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise DoorbellError(f"doorbell {path} is not a socket")
    return HostBell.connect(path, timeout)


class Bells:
    """What the agent's poller sleeps on: every served channel's bell and its server
    connection (one-shot: a channel's worker re-arms them once it has looked, so a guest
    ringing without pause costs one wake per look, not one per ring), and a wake-up of
    its own (stop, channels added or gone)."""

    MASK = select.EPOLLIN | select.EPOLLONESHOT

    def __init__(self):
        self._epoll = select.epoll()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._owners: dict[int, object] = {}
        self._closing = threading.Lock()  # interrupt() never writes a closed (maybe reused) descriptor

    def add(self, bell: HostBell, owner) -> None:
        """OSError (nothing registered) if epoll refuses one of the bell's descriptors."""
        registered = []
        try:
            for fd in (bell.eventfd, bell.connection.fileno()):
                self._epoll.register(fd, self.MASK)
                registered.append(fd)
                self._owners[fd] = owner
        except (OSError, ValueError):
            for fd in registered:
                self._owners.pop(fd, None)
                self._epoll.unregister(fd)
            raise

    def rearm(self, bell: HostBell) -> None:
        for fd in (bell.eventfd, bell.connection.fileno()):
            try:
                self._epoll.modify(fd, self.MASK)
            except (FileNotFoundError, ValueError, OSError):
                pass  # removed meanwhile

    def remove(self, bell: HostBell) -> None:
        for fd in (bell.eventfd, bell.connection.fileno()):
            self._owners.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (FileNotFoundError, ValueError, OSError):
                pass

    def wait(self, timeout: float | None) -> list:
        """The owners whose bell rang or whose server spoke, after at most ``timeout`` s
        (None: until one does, or ``interrupt``)."""
        try:
            events = self._epoll.poll(-1 if timeout is None else max(0.0, timeout))
        except InterruptedError:
            return []
        owners: dict[int, object] = {}
        for fd, _ in events:
            if fd == self._wakeup:
                try:
                    os.eventfd_read(self._wakeup)
                except BlockingIOError:
                    pass
            elif (owner := self._owners.get(fd)) is not None:
                owners[id(owner)] = owner
        return list(owners.values())

    def interrupt(self) -> None:
        with self._closing:
            if self._wakeup >= 0:
                os.eventfd_write(self._wakeup, 1)

    def close(self) -> None:
        with self._closing:
            self._epoll.close()
            os.close(self._wakeup)
            self._wakeup = -1
