"""Ringing the host after publishing a command, so an idle host can sleep.

Inside a VM with an ``ivshmem-doorbell`` device, a write of ``HOST_PEER << 16 |
COMMAND_VECTOR`` into the Doorbell register (BAR0, offset 12) makes QEMU write the
host's eventfd.  An ``ivshmem-plain`` device has no doorbell (its IVPosition register
reads 0, as the host's own ID would; guests are peers 1 and up, so a positive
IVPosition is how a guest knows its ring is heard).  On the host, a writer given the
ivshmem server's socket writes the host's eventfd directly (tests, benchmarks).

A ring is only a hint: the host also looks at every region at least once a second, so
a ring lost (a doorbell not set up yet, a migration) costs latency, never a command.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from . import ivshmem

REGISTERS_SIZE = 256
IVPOSITION = 8 // 4      # index of the 32-bit register
DOORBELL = 12 // 4
HOST_COMMAND_BELL = ivshmem.HOST_PEER << 16 | ivshmem.COMMAND_VECTOR


class DeviceDoorbell:
    """BAR0 of an ivshmem-doorbell device, mapped through sysfs (root, no driver)."""

    def __init__(self, registers: mmap.mmap):
        self._registers = registers
        self._words = memoryview(registers).cast("i")  # 32-bit accesses, as the device requires

    @classmethod
    def of(cls, device: Path) -> "DeviceDoorbell | None":
        """The device's doorbell, or None if it has none (ivshmem-plain) or BAR0 cannot be
        mapped: the host then finds commands by looking, a little later."""
        try:
            fd = os.open(device / "resource0", os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            registers = mmap.mmap(fd, REGISTERS_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        bell = cls(registers)
        if bell.position() < 1:
            bell.close()
            return None
        return bell

    def position(self) -> int:
        """This guest's peer ID (IVPosition): 0 without a doorbell (QEMU before 2.6 could
        read -1 for a while)."""
        return self._words[IVPOSITION]

    def ring(self) -> None:
        self._words[DOORBELL] = HOST_COMMAND_BELL

    def close(self) -> None:
        self._words.release()
        self._registers.close()


class EventDoorbell:
    """The host's eventfd taken from an ivshmem server, for writers running on the host."""

    def __init__(self, eventfd: int):
        self._eventfd = eventfd

    @classmethod
    def connect(cls, path: str, region_fd: int, timeout: float = 2.0) -> "EventDoorbell":
        """The bell of the server at ``path``, which must serve the region open at
        ``region_fd``; DoorbellError if it cannot be reached, speaks something else or
        serves another region (its rings would wake another VM's host side)."""
        setup = ivshmem.connect(path, timeout)
        eventfd = setup.peers[ivshmem.HOST_PEER][ivshmem.COMMAND_VECTOR]
        served, own = os.fstat(setup.shared_memory), os.fstat(region_fd)
        setup.close_except(eventfd)
        setup.connection.close()  # the eventfd is all a writer needs
        if (served.st_dev, served.st_ino) != (own.st_dev, own.st_ino):
            os.close(eventfd)
            raise ivshmem.DoorbellError(f"the doorbell server at {path} serves another region")
        return cls(eventfd)

    def ring(self) -> None:
        ivshmem.ring_eventfd(self._eventfd)

    def close(self) -> None:
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1
