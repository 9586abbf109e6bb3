"""Opening the shared-memory region that carries a channel.

Three ways to reach the same bytes:

* in a guest, the ivshmem-plain PCI device (vendor 0x1af4, device 0x1110): its BAR2
  is the region and ``/sys/bus/pci/devices/<bdf>/resource2`` can be mmap'ed by root
  without a driver;
* on the host, the POSIX shared-memory object QEMU's memory backend uses
  (``mem-path=/dev/shm/NAME`` is the object ``/NAME``), opened with ``posix_ipc``;
* anywhere, a plain file (``/dev/shm/NAME`` in lab runs without a VM).

The host never touches a guest's region through a mapping: anything with write access
to the file (the QEMU process) can truncate it, and touching a mapping past the new end
kills the whole process with SIGBUS, i.e. every VM's channel at once.  ``RegionIO`` reads
and writes with ``pread``/``pwrite`` instead, where a truncated file is a short read (an
error for that channel alone); ``open_channel_file`` opens a host-side region without
mapping it and without following symlinks.

Only the standard library is needed here, except ``open_shm`` which imports
``posix_ipc`` when called (it is a host-side dependency, absent in minimal guests).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import ring
from .channel_errors import BadRegion, ChannelError, DeviceNotFound, RegionTooSmall
from .doorbell import DeviceDoorbell, EventDoorbell

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
PCI_DEVICES = Path("/sys/bus/pci/devices")
DEFAULT_REGION_SIZE = 1 << 20
MIN_REGION_SIZE = ring.Geometry(ring.MIN_SLOT_COUNT).region_size
NAME_MAX = 255
_COUNTERS = struct.Struct("<IQ")  # guest epoch, publish: adjacent in the header


class RegionShrunk(BadRegion):
    """The region's file is shorter than when it was opened: truncated under the reader."""


@dataclass
class Region:
    """A mapped region plus the descriptor writers lock on (flock serialises writers)."""

    path: str
    buf: mmap.mmap
    fd: int
    size: int = field(init=False)
    doorbell: "DeviceDoorbell | EventDoorbell | None" = None  # rung after each publish (guest/doorbell.py)

    def __post_init__(self) -> None:
        self.size = len(self.buf)

    def ring(self) -> None:
        """Tell the host a command is published, if it can hear it (else it looks anyway)."""
        if self.doorbell is not None:
            self.doorbell.ring()

    def close(self) -> None:
        if self.doorbell is not None:
            self.doorbell.close()
            self.doorbell = None
        try:
            self.buf.close()
        except BufferError:
            pass  # a memoryview is still alive; the mapping goes with the process
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class RegionFile:
    """A region the host reaches only through its descriptor (see ``RegionIO``): what the
    agent serves, so nothing in the agent can fault on a truncated file."""

    path: str
    fd: int
    size: int

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the open file: a file replaced under the same path differs."""
        info = os.fstat(self.fd)
        return info.st_dev, info.st_ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class RegionIO:
    """SIGBUS-proof access to a region for the host: ``load`` copies a range of the file
    into ``buf`` (a private image of the region that the ``ring`` functions decode), and
    ``store`` writes a range of ``buf`` back.  A short read means the file was truncated
    and raises ``RegionShrunk``; a mapping would have killed the process instead.  Reads
    and writes go through the page cache that the guest's mapping shares, so both sides see
    each other's bytes as with a shared mapping."""

    fd: int
    size: int
    buf: bytearray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The image needs no more than the largest ring: a huge (or sparse) region file must
        # not make the host allocate its size.
        self.buf = bytearray(min(self.size, ring.LARGEST_RING))

    def load(self, offset: int, length: int) -> None:
        got = os.preadv(self.fd, [memoryview(self.buf)[offset:offset + length]], offset)
        if got < length:
            raise RegionShrunk(f"region file shrank below {offset + length} bytes "
                               f"(it had {self.size} when opened): truncated under the host")

    def store(self, offset: int, length: int) -> None:
        os.pwrite(self.fd, memoryview(self.buf)[offset:offset + length], offset)


def read_counters(fd: int) -> tuple[int, int] | None:
    """(guest epoch, publish) read straight from the file, or None if it is too short to
    hold them: what a poller needs, without any state to share with the region's reader."""
    data = os.pread(fd, _COUNTERS.size, ring.OFFSET_GUEST_EPOCH)
    return _COUNTERS.unpack(data) if len(data) == _COUNTERS.size else None


def _encoded_length(name: str) -> int:
    """Bytes of ``name`` on disk; a name no file system could hold counts as too long."""
    try:
        return len(os.fsencode(name))
    except UnicodeEncodeError:
        return NAME_MAX + 1


def open_channel_file(directory: str, name: str) -> RegionFile:
    """Open ``directory/name`` read-write for the host, unmapped: ``name`` must be one path
    component naming a regular file; a symlink (even a loop), a directory, a FIFO or a
    device is refused, since a path written into OVS by anyone must not make the host
    write into some other file.  The directory itself is the operator's choice."""
    path = os.path.join(directory, name)
    if not name or name in (".", "..") or "/" in name or "\0" in name or _encoded_length(name) > NAME_MAX:
        raise BadRegion(f"{path!r}: not a file name of 1..{NAME_MAX} bytes in {directory}")
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise ChannelError(f"channel directory {directory}: {error.strerror}") from None
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                     dir_fd=directory_fd)
    except FileNotFoundError:
        raise DeviceNotFound(f"channel region {path} does not exist") from None
    except OSError as error:
        raise BadRegion(f"{path}: {_open_refusal(error)}") from None
    finally:
        os.close(directory_fd)
    return _checked_file(fd, path)


def _open_refusal(error: OSError) -> str:
    """Why the kernel would not open a channel path, in the operator's words."""
    reasons = {errno.ELOOP: "is a symlink (symlinks are never followed)",
               errno.EISDIR: "is a directory, not a region file",
               errno.EACCES: "no permission to open it read-write (run as root?)",
               errno.ENAMETOOLONG: "name too long"}
    return reasons.get(error.errno, error.strerror or str(error))


def _checked_file(fd: int, path: str) -> RegionFile:
    """Keep ``fd`` only if it is a regular file big enough for a ring."""
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = BadRegion(f"{path} is not a regular file")
    elif info.st_size < MIN_REGION_SIZE:
        problem = _too_small(path, info.st_size)
    if problem:
        os.close(fd)
        raise problem
    return RegionFile(path, fd, info.st_size)


def _too_small(path: str, size: int) -> RegionTooSmall:
    return RegionTooSmall(f"{path} has {size} bytes; a channel region needs at least "
                          f"{MIN_REGION_SIZE} (QEMU: size=1M)")


def _map(fd: int, size: int, path: str) -> Region:
    if size < MIN_REGION_SIZE:
        os.close(fd)
        raise _too_small(path, size)
    return Region(path, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), fd)


def open_file(path: str | os.PathLike, *, create_size: int | None = None) -> Region:
    """Map a file; with ``create_size``, create it (or grow it) to that size first."""
    path = os.fspath(path)
    flags = os.O_RDWR | (os.O_CREAT if create_size else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise DeviceNotFound(f"channel region {path} does not exist") from None
    except PermissionError:
        raise ChannelError(f"no permission to open {path} read-write (run as root?)") from None
    size = os.fstat(fd).st_size
    if create_size and size < create_size:
        os.ftruncate(fd, create_size)
        size = create_size
    return _map(fd, size, path)


def shm_name(name: str) -> str:
    """The POSIX object name for what a user may give as NAME, /NAME or /dev/shm/NAME."""
    base = name.removeprefix("/dev/shm/").lstrip("/")
    if not base or "/" in base:
        raise ChannelError(f"{name!r} is not a POSIX shared-memory name; expected NAME or /dev/shm/NAME")
    return "/" + base


def open_shm(name: str, *, create_size: int | None = None) -> Region:
    """Open (or create) the POSIX shared-memory object QEMU's memory backend maps."""
    import posix_ipc  # host-side only; a minimal guest never calls this

    object_name = shm_name(name)
    try:
        shm = posix_ipc.SharedMemory(object_name, posix_ipc.O_CREAT if create_size else 0,
                                     mode=0o600, size=0)
    except posix_ipc.ExistentialError:
        raise DeviceNotFound(f"shared-memory object {object_name} does not exist "
                             f"(is the VM started with mem-path=/dev/shm{object_name}?)") from None
    except posix_ipc.PermissionsError:
        raise ChannelError(f"no permission to open shared-memory object {object_name}") from None
    fd = shm.fd
    size = os.fstat(fd).st_size
    if create_size and size < create_size:
        os.ftruncate(fd, create_size)
        size = create_size
    return _map(fd, size, "/dev/shm" + object_name)


def ivshmem_devices(pci_root: Path | None = None) -> list[Path]:
    """PCI functions that are ivshmem devices, sorted by address."""
    found = []
    for device in sorted((pci_root or PCI_DEVICES).glob("*")):
        try:
            vendor = int((device / "vendor").read_text(), 16)
            product = int((device / "device").read_text(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, product) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE):
            found.append(device)
    return found


def open_device(bdf: str | None = None, pci_root: Path | None = None) -> Region:
    """Map BAR2 of the ivshmem device (the only one, or the one at ``bdf``)."""
    pci_root = pci_root or PCI_DEVICES
    devices = ivshmem_devices(pci_root)
    if bdf:
        devices = [d for d in devices if d.name == bdf or d.name.endswith(":" + bdf)]  # the domain may be left out
    if not devices:
        wanted = f" at {bdf}" if bdf else ""
        raise DeviceNotFound(
            f"no ivshmem device (PCI 1af4:1110){wanted} found under {pci_root}; start the VM with "
            "'-device ivshmem-plain,memdev=…' or pass --shm PATH")
    if len(devices) > 1:
        names = ", ".join(d.name for d in devices)
        raise ChannelError(f"several ivshmem devices ({names}); choose one with --device BDF")
    device = devices[0]
    _enable(device)
    try:
        fd = os.open(device / "resource2", os.O_RDWR)
    except OSError as error:
        raise ChannelError(f"cannot open {device}/resource2: {error.strerror} (root needed)") from None
    region = _map(fd, os.fstat(fd).st_size, str(device / "resource2"))
    region.doorbell = DeviceDoorbell.of(device)
    return region


def _enable(device: Path) -> None:
    """Turn on memory decoding of the device, which the kernel leaves off without a driver."""
    enable = device / "enable"
    try:
        if enable.read_text().strip() == "0":
            enable.write_text("1")
    except OSError:
        pass  # already enabled by firmware, or not ours to change; mmap will tell


def open_region(*, shm: str | None = None, device: str | None = None, doorbell: str | None = None) -> Region:
    """What ``mbctl`` opens: a given file or shm name (rung through the ivshmem server
    at ``doorbell``, if given), else the ivshmem device (rung through its own doorbell,
    if it has one)."""
    if shm:
        path = shm if "/" in shm else "/dev/shm/" + shm
        region = open_file(path)
        if doorbell:
            try:
                region.doorbell = EventDoorbell.connect(doorbell, region.fd)
            except BaseException:
                region.close()
                raise
        return region
    return open_device(device)
