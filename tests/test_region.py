"""Finding and mapping the ivshmem device, on a sysfs tree laid out like the kernel's."""

from pathlib import Path

import pytest

from mbvisor.guest.channel_errors import ChannelError, DeviceNotFound
from mbvisor.guest.region import ivshmem_devices, open_device, shm_name


def pci_function(root: Path, bdf: str, vendor: str, device: str, bar2: int | None = None) -> Path:
    function = root / bdf
    function.mkdir()
    (function / "vendor").write_text(vendor + "\n")
    (function / "device").write_text(device + "\n")
    (function / "enable").write_text("0\n")
    if bar2:
        (function / "resource2").write_bytes(bytes(bar2))
    return function


def test_the_ivshmem_function_is_found_enabled_and_mapped(tmp_path):
    pci_function(tmp_path, "0000:00:02.0", "0x1af4", "0x1000")  # virtio-net: not ours
    ivshmem = pci_function(tmp_path, "0000:00:04.0", "0x1af4", "0x1110", bar2=1 << 20)
    assert ivshmem_devices(tmp_path) == [ivshmem]
    with open_device(pci_root=tmp_path) as region:
        assert region.size == 1 << 20
        region.buf[0:4] = b"MBVR"
    assert (ivshmem / "resource2").read_bytes()[:4] == b"MBVR"
    assert (ivshmem / "enable").read_text() == "1"


def test_several_devices_need_a_choice(tmp_path):
    for bdf in ("0000:00:04.0", "0000:00:05.0"):
        pci_function(tmp_path, bdf, "0x1af4", "0x1110", bar2=1 << 20)
    with pytest.raises(ChannelError, match="several ivshmem devices .* --device"):
        open_device(pci_root=tmp_path)
    with open_device("00:05.0", pci_root=tmp_path) as region:
        assert region.path.endswith("0000:00:05.0/resource2")
    with pytest.raises(DeviceNotFound):  # a name is matched at a ':' boundary, not as any ending
        open_device("5.0", pci_root=tmp_path)


def test_no_device_says_how_to_add_one(tmp_path):
    with pytest.raises(DeviceNotFound, match="ivshmem-plain"):
        open_device(pci_root=tmp_path)


@pytest.mark.parametrize("given, name", [("mb0", "/mb0"), ("/mb0", "/mb0"), ("/dev/shm/mb0", "/mb0")])
def test_shm_names(given, name):
    assert shm_name(given) == name


@pytest.mark.parametrize("given", ["", "/dev/shm/", "a/b"])
def test_bad_shm_names(given):
    with pytest.raises(ChannelError, match="not a POSIX shared-memory name"):
        shm_name(given)
