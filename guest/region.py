"""Opening the shared-memory region that carries a channel.

Three ways to reach the same bytes:

* in a guest, the ivshmem-plain PCI device (vendor 0x1af4, device 0x1110): its BAR2
  is the region and ``/sys/bus/pci/devices/<bdf>/resource2`` can be mmap'ed by root
  without a driver;
* on the host, the POSIX shared-memory object QEMU's memory backend uses
  (``mem-path=/dev/shm/NAME`` is the object ``/NAME``), opened with ``posix_ipc``;
* anywhere, a plain file (``/dev/shm/NAME`` in lab runs without a VM).

Only the standard library is needed here, except ``open_shm`` which imports
``posix_ipc`` when called (it is a host-side dependency, absent in minimal guests).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import ring
from .channel_errors import ChannelError, DeviceNotFound, RegionTooSmall

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
PCI_DEVICES = Path("/sys/bus/pci/devices")
DEFAULT_REGION_SIZE = 1 << 20
MIN_REGION_SIZE = ring.Geometry(ring.MIN_SLOT_COUNT).region_size


@dataclass
class Region:
    """A mapped region plus the descriptor writers lock on (flock serialises writers)."""

    path: str
    buf: mmap.mmap
    fd: int
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.buf)

    def close(self) -> None:
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


def _map(fd: int, size: int, path: str) -> Region:
    if size < MIN_REGION_SIZE:
        os.close(fd)
        raise RegionTooSmall(f"{path} has {size} bytes; a channel region needs at least "
                             f"{MIN_REGION_SIZE} (QEMU: size=1M)")
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
        devices = [d for d in devices if d.name == bdf or d.name.endswith(bdf)]
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
    return _map(fd, os.fstat(fd).st_size, str(device / "resource2"))


def _enable(device: Path) -> None:
    """Turn on memory decoding of the device, which the kernel leaves off without a driver."""
    enable = device / "enable"
    try:
        if enable.read_text().strip() == "0":
            enable.write_text("1")
    except OSError:
        pass  # already enabled by firmware, or not ours to change; mmap will tell


def open_region(*, shm: str | None = None, device: str | None = None) -> Region:
    """What ``mbctl`` opens: a given file or shm name, else the ivshmem device."""
    if shm:
        path = shm if "/" in shm else "/dev/shm/" + shm
        return open_file(path)
    return open_device(device)
