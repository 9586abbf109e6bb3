#!/usr/bin/env python3
"""Build the middlebox guest's initramfs: busybox, the virtio-net modules, Python 3.11 and
the real ``mbctl`` (the project's ``guest/`` package), with an ``/init`` that brings the
network up and then serves a command loop on the second serial port.

    topologies/qemu/build-initramfs.py            # prints the image path (built or cached)
    topologies/qemu/build-initramfs.py --json     # {"initramfs": ..., "kernel": ..., "cached": ...}

Inputs (all from this Debian 12 machine; nothing is downloaded):

* ``/bin/busybox`` (package ``busybox-static``): the shell and every tool in the guest;
* ``/lib/modules/<V>/`` and ``/boot/vmlinuz-<V>`` (package ``linux-image-cloud-amd64``; the
  newest ``*-cloud-amd64`` version unless ``--kernel-version``): virtio_ring, virtio,
  virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci, failover, net_failover,
  virtio_net, loaded in that order with ``insmod``;
* ``/usr/bin/python3.11`` and the shared libraries ``ldd`` names, plus exactly the standard
  library modules ``mbctl`` imports (found by running mbctl's commands against a scratch
  region on this machine and recording ``sys.modules``), byte-compiled as unchecked-hash
  ``.pyc`` files so that the guest, under TCG emulation, never compiles anything;
* ``guest/`` (its ``*.py`` and ``follow/*.py``), installed as the package ``mbvisor.guest`` under ``/opt/mbvisor``;
* for a middlebox that forwards and NATs in its own kernel (``bench/dataplane.py``'s
  through-vm path): the netfilter modules of ``iptable_raw``, ``iptable_nat`` and ``xt_nat``
  with their dependencies (from ``modules.dep``), which ``/usr/bin/netfilter-up`` loads on
  demand (not at boot: the plain guest's packets pass no conntrack hook), and
  ``iptables``/``iptables-restore``/``iptables-save`` (package ``iptables``'s
  ``xtables-legacy-multi``, with the ``standard``, ``NAT``, ``tcp`` and ``udp`` extensions);
* for ``mbctl follow`` (``guest/follow/``): ``/usr/sbin/nft`` (package ``nftables``) and
  ``/usr/sbin/ipvsadm`` (package ``ipvsadm``) with the libraries ``ldd`` names, and the modules
  of nf_tables (with nft_ct) and of IPVS with every scheduler, with their dependencies, which
  ``/usr/bin/nftables-up`` and ``/usr/bin/ipvs-up`` load on demand like ``netfilter-up``.

The image is cached in ``$MBVISOR_CACHE`` (default ``/var/cache/mbvisor/initramfs`` for root,
else ``~/.cache/mbvisor/initramfs``) under a SHA-256 of every input (this script, the init
script, the guest package, busybox, the Python binary, the kernel's modules, and the sizes
and mtimes of the standard library's files), so a second run costs a few hashes (~0.1 s);
a change to any input builds a new image (~2.5 s, ~9.3 MB) and the three newest are kept.

The guest (see ``/init`` below and docs/qemu.md) reads its settings from the kernel command
line: ``mbv.ip=10.0.0.5/24`` (eth0's address), optional ``mbv.arp=IP,MAC;IP,MAC`` (permanent
neighbour entries) and ``mbv.name=NAME``.  It writes ``MBVISOR-READY`` on the console
(ttyS0) when eth0 is up, then serves the control loop on ttyS1: each request is one line
``<id> <base64 of a shell command>``; the answer is ``@@MBV-BEGIN <id>@@``, the command's
output (stdout and stderr), and ``@@MBV-END <id> <exit code>@@``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE.parent.parent / "guest"
BUSYBOX = Path("/bin/busybox")
PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
MODULES = ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
           "kernel/drivers/virtio/virtio_pci_modern_dev.ko", "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
           "kernel/drivers/virtio/virtio_pci.ko", "kernel/net/core/failover.ko",
           "kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko"]
NETFILTER = ["kernel/net/ipv4/netfilter/iptable_raw.ko", "kernel/net/ipv4/netfilter/iptable_nat.ko",
             "kernel/net/netfilter/xt_nat.ko"]          # plus their dependencies, loaded first
# mbctl follow's kernel side: nftables (nf_tables, with ct for "ct state" rules) and IPVS with
# every scheduler, loaded on demand by /usr/bin/nftables-up and /usr/bin/ipvs-up: the guest has
# no modprobe, so IPVS could not load a scheduler by itself when a service names it.
NFTABLES = ["kernel/net/netfilter/nf_tables.ko", "kernel/net/netfilter/nft_ct.ko"]
IPVS = ["kernel/net/netfilter/ipvs/ip_vs.ko", *(f"kernel/net/netfilter/ipvs/ip_vs_{scheduler}.ko" for scheduler in
        ("rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "mh", "dh", "lblc", "lblcr", "fo", "ovf"))]
MODULE_GROUPS = {"netfilter-up": NETFILTER, "nftables-up": NFTABLES, "ipvs-up": IPVS}
FOLLOW_TOOLS = {Path("/usr/sbin/nft"): "nftables", Path("/usr/sbin/ipvsadm"): "ipvsadm"}  # with their packages
XTABLES = Path("/usr/sbin/xtables-legacy-multi")        # package iptables
XTABLES_LIBDIR = Path("/usr/lib/x86_64-linux-gnu/xtables")
XTABLES_EXTENSIONS = ["libxt_standard.so", "libxt_NAT.so", "libxt_DNAT.so", "libxt_SNAT.so", "libxt_tcp.so",
                      "libxt_udp.so"]
FORMAT = 2          # bump to invalidate every cached image

INIT = r"""#!/bin/sh
# mbvisor middlebox guest init (generated by topologies/qemu/build-initramfs.py)
export PATH=/bin:/usr/bin:/usr/sbin PYTHONPATH=/opt/mbvisor PYTHONUTF8=1 PYTHONDONTWRITEBYTECODE=1 HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /tmp /run && mount -t tmpfs tmpfs /tmp
say() { echo "mbvisor-init: $*" > /dev/ttyS0; }
fatal() { say "FATAL: $*"; echo "MBVISOR-FAILED $*" > /dev/ttyS0; poweroff -f; }
for word in $(cat /proc/cmdline); do
  case "$word" in
    mbv.ip=*) MBV_IP=${word#mbv.ip=} ;;
    mbv.arp=*) MBV_ARP=${word#mbv.arp=} ;;
    mbv.name=*) MBV_NAME=${word#mbv.name=} ;;
  esac
done
for module in @MODULES@; do
  insmod "/lib/modules/$module" || fatal "insmod $module"
done
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ]; do
  n=$((n + 1)); [ $n -gt 500 ] && fatal "no eth0 after loading virtio_net"; usleep 10000
done
[ -n "$MBV_IP" ] && { ip addr add "$MBV_IP" dev eth0 || fatal "ip addr add $MBV_IP"; }
ip link set eth0 up || fatal "eth0 up"
for entry in $(echo "$MBV_ARP" | tr ';' ' '); do
  arp -i eth0 -s "${entry%%,*}" "${entry#*,}" || fatal "arp $entry"
done
for device in /sys/bus/pci/devices/*; do       # ivshmem: memory decoding on (mbctl also does it)
  if [ "$(cat $device/vendor)" = 0x1af4 ] && [ "$(cat $device/device)" = 0x1110 ]; then
    echo 1 > $device/enable; IVSHMEM=${device##*/}
  fi
done
say "name=$MBV_NAME ip=$MBV_IP mac=$(cat /sys/class/net/eth0/address) ivshmem=${IVSHMEM:-none}"
# The control loop: one request per line on ttyS1 ("<id> <base64 command>").  The port is
# held open and raw (no echo, no CR/LF mangling) before READY, so the host's first line is
# neither echoed nor flushed.
exec 3<>/dev/ttyS1
stty -F /dev/ttyS1 raw -echo 115200 || fatal "stty ttyS1"
echo "MBVISOR-READY" > /dev/ttyS0
while IFS= read -r line <&3; do
  id=${line%% *}
  echo "${line#* }" | base64 -d > /tmp/command 2>/dev/null || { echo "@@MBV-END $id 127@@" >&3; continue; }
  echo "@@MBV-BEGIN $id@@" >&3
  sh /tmp/command >&3 2>&3 </dev/null
  rc=$?
  echo "" >&3
  echo "@@MBV-END $id $rc@@" >&3
done
fatal "control loop ended"
"""

MODULES_UP = r"""#!/bin/sh
# Load @WHAT@, dependencies first (generated by topologies/qemu/build-initramfs.py).  Idempotent.
for module in @MODULES@; do
  name=${module##*/}; name=${name%.ko}
  [ -d "/sys/module/$name" ] && continue
  insmod "/lib/modules/$module" || { echo "@NAME@: insmod $module failed" >&2; exit 1; }
done
"""
MODULES_UP_WHAT = {"netfilter-up": "the netfilter modules iptables' raw and nat tables need",
                   "nftables-up": "nf_tables (nft, mbctl follow nft)",
                   "ipvs-up": "IPVS and its schedulers (ipvsadm, mbctl follow ipvs)"}


class BuildError(RuntimeError):
    pass


def default_cache() -> Path:
    if os.environ.get("MBVISOR_CACHE"):
        return Path(os.environ["MBVISOR_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/mbvisor/initramfs")
    return Path.home() / ".cache" / "mbvisor" / "initramfs"


def kernel_version(wanted: str | None) -> str:
    root = Path("/lib/modules")
    if wanted:
        candidates = [wanted]
    else:
        candidates = sorted((p.name for p in root.glob("*-cloud-amd64")) if root.is_dir() else [],
                            key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)])
    for version in reversed(candidates):
        if (root / version / MODULES[-1]).exists() and Path(f"/boot/vmlinuz-{version}").exists():
            return version
    raise BuildError("no cloud kernel found (/boot/vmlinuz-*-cloud-amd64 with virtio_net in /lib/modules): "
                     "apt-get install linux-image-cloud-amd64")


def module_order(version: str, wanted: list[str]) -> list[str]:
    """``wanted`` with every module they depend on (``modules.dep``), each after its
    dependencies: the order ``insmod`` needs, since the guest has no ``modprobe`` database."""
    root = Path("/lib/modules") / version
    depends = {}
    for line in (root / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        depends[module] = needs.split()
    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        if module not in depends:
            raise BuildError(f"{module} is not in {root / 'modules.dep'}")
        for dependency in depends[module]:
            visit(dependency)
        order.append(module)

    for module in wanted:
        visit(module)
    return order


def check_inputs() -> None:
    missing = [f"{path} (Debian package {package})" for path, package in
               ((BUSYBOX, "busybox-static"), (PYTHON, "python3.11"), (STDLIB / "os.py", "libpython3.11-stdlib"),
                (XTABLES, "iptables"), *((XTABLES_LIBDIR / name, "iptables") for name in XTABLES_EXTENSIONS),
                *FOLLOW_TOOLS.items())
               if not path.exists()]
    if missing:
        raise BuildError("cannot build the guest image, missing: " + ", ".join(missing))
    if subprocess.run([str(BUSYBOX), "--list"], capture_output=True).returncode != 0:
        raise BuildError(f"{BUSYBOX} does not run")


def sha_file(h, path: Path) -> None:
    h.update(str(path).encode() + b"\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def cache_key(version: str) -> str:
    h = hashlib.sha256(f"format {FORMAT} kernel {version}\n".encode())
    sha_file(h, Path(__file__).resolve())
    for path in guest_sources():
        sha_file(h, path)
    for path in (BUSYBOX, PYTHON, XTABLES, *(XTABLES_LIBDIR / name for name in XTABLES_EXTENSIONS), *FOLLOW_TOOLS):
        sha_file(h, path)
    for module in MODULES + module_order(version, [m for group in MODULE_GROUPS.values() for m in group]):
        sha_file(h, Path("/lib/modules") / version / module)
    for path in sorted([*STDLIB.glob("*.py"), *STDLIB.glob("*/*.py"), *(STDLIB / "lib-dynload").glob("*.so")]):
        info = path.stat()                      # a stdlib update changes sizes and mtimes
        h.update(f"{path} {info.st_size} {info.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def guest_sources() -> list[Path]:
    """Every Python file of the guest package, sub-packages (``follow/``) included."""
    return sorted(path for path in GUEST_DIR.rglob("*.py") if "__pycache__" not in path.parts)


# -- what Python needs --------------------------------------------------------------------

_CLOSURE = r"""
import atexit, contextlib, io, os, runpy, sys, tempfile
sys.path.insert(0, sys.argv[1])
out = sys.argv[2]
def dump():
    with open(out, "w") as f:
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if path:
                f.write(path + "\n")
atexit.register(dump)
import runpy, traceback, linecache, tokenize, warnings, encodings
region = os.path.join(tempfile.mkdtemp(), "region")
with open(region, "wb") as f:
    f.truncate(1 << 20)
from mbvisor.guest import mbctl
# the followers' modules (mbctl imports the adapters only when it follows), and what running
# their tools imports on the way (subprocess's pipes and text decoding)
from mbvisor.guest.follow import balancer, follower, ipset, ipvs, nft, source, sync
import subprocess
subprocess.run(["true"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=30)
mac = "52:54:00:00:00:01"
runs = [["--shm", region, "-r"], ["--shm", region, "--json", "-r"],
        ["--shm", region, "--timeout", "0.05", "register", "firewall", "--mac", mac, "--ip", "10.0.0.5"],
        ["--shm", region, "--json", "--timeout", "0.05", "filter", "add", "--mac", mac, "--layer", "ip",
         "--src", "10.0.0.0/24"],
        ["--shm", region, "--json", "--timeout", "0.05", "redirect", "--mac", mac, "--ip", "10.0.0.5",
         "--to", "10.0.0.11"],
        ["--shm", region, "--json", "--timeout", "0.05", "-w", "@X " + mac + "@"],
        ["--json", "--timeout", "0.05", "show", "ip", "--mac", mac], ["--help"], ["filter", "--bogus"],
        ["follow", "ipvs", "--help"], ["follow", "nft", "--help"]]
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            mbctl.main(argv)
        except SystemExit:
            pass
"""


def stdlib_files(staging_pkg: Path) -> set[Path]:
    """Standard-library files (``.py`` and extension ``.so``) that mbctl loads."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as listing:
        done = subprocess.run([str(PYTHON), "-I", "-c", _CLOSURE, str(staging_pkg), listing.name],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BuildError(f"finding mbctl's imports failed:\n{done.stderr}")
        paths = {Path(line) for line in listing.read().splitlines() if line}
    wanted = {p for p in paths if STDLIB in p.parents}
    wanted |= set((STDLIB / "encodings").glob("*.py"))     # codecs are looked up lazily
    wanted |= {STDLIB / name for name in ("os.py", "site.py", "_sitebuiltins.py", "runpy.py", "pkgutil.py")}
    # a package's __init__ for every module inside one
    for path in list(wanted):
        parent = path.parent
        while parent != STDLIB and STDLIB in parent.parents:
            wanted.add(parent / "__init__.py")
            parent = parent.parent
    return {p for p in wanted if p.exists()}


def shared_libraries(binaries: list[Path]) -> set[Path]:
    libraries: set[Path] = set()
    for binary in binaries:
        done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            found = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if found:
                libraries.add(Path(found.group(1)))
    return libraries


# -- the archive ----------------------------------------------------------------------------

class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks into its root file system."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0]
        self.inode += 1
        self.out.write(b"070701" + b"".join(b"%08X" % value for value in fields) + encoded)
        self.out.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self.names.discard("TRAILER!!!")
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def pyc_for(source: Path, guest_path: str) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, "out.pyc")
        py_compile.compile(str(source), cfile=target, dfile=guest_path, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        return Path(target).read_bytes()


def add_python_source(archive: Cpio, source: Path, guest_path: str) -> None:
    archive.file(guest_path, source.read_bytes())
    tag = sys.implementation.cache_tag          # the builder runs on Python 3.11 as well
    stem = Path(guest_path)
    archive.file(str(stem.parent / "__pycache__" / f"{stem.stem}.{tag}.pyc"), pyc_for(source, guest_path))


def add_xtables(archive: Cpio) -> None:
    """iptables (legacy: the guest kernel's ip_tables, no nf_tables) under its usual names,
    and the extensions the through-vm middlebox's rules use (their symlinks kept)."""
    archive.file(str(XTABLES), XTABLES.read_bytes(), 0o755)
    for name in ("iptables", "iptables-restore", "iptables-save"):
        archive.symlink(f"usr/bin/{name}", str(XTABLES))
    for name in XTABLES_EXTENSIONS:
        path = XTABLES_LIBDIR / name
        if path.is_symlink():
            archive.symlink(str(path), os.readlink(path))
        else:
            archive.file(str(path), path.read_bytes(), 0o644)


def build(version: str, output: Path) -> None:
    if sys.version_info[:2] != (3, 11):
        raise BuildError("run the builder with Python 3.11 (its .pyc files must match the guest's)")
    archive = Cpio()
    for name in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "usr/bin", "usr/sbin", "sbin"):
        archive.directory(name)
    archive.device("dev/console", 5, 1)
    archive.device("dev/null", 1, 3)
    archive.device("dev/ttyS0", 4, 64)
    archive.device("dev/ttyS1", 4, 65)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            archive.symlink(f"bin/{applet}", "busybox")
    archive.file("init", INIT.replace("@MODULES@", " ".join(MODULES)).encode(), 0o755)
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    for module in MODULES:
        archive.file(f"lib/modules/{module}", (Path("/lib/modules") / version / module).read_bytes())
    for name, wanted in MODULE_GROUPS.items():
        order = module_order(version, wanted)
        for module in order:
            archive.file(f"lib/modules/{module}", (Path("/lib/modules") / version / module).read_bytes())
        script = MODULES_UP.replace("@WHAT@", MODULES_UP_WHAT[name]).replace("@NAME@", name)
        archive.file(f"usr/bin/{name}", script.replace("@MODULES@", " ".join(order)).encode(), 0o755)
    add_xtables(archive)
    for tool in FOLLOW_TOOLS:
        archive.file(str(tool), tool.read_bytes(), 0o755)

    # the guest package, as mbvisor.guest
    with tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / "mbvisor"
        shutil.copytree(GUEST_DIR, package / "guest", ignore=shutil.ignore_patterns("__pycache__"))
        (package / "__init__.py").write_text("")
        files = stdlib_files(Path(scratch))
        for source in sorted((package).rglob("*.py")):
            add_python_source(archive, source, "/opt/mbvisor/" + str(source.relative_to(scratch)))
    archive.file("usr/bin/mbctl", b"#!/bin/sh\nexec python3 -m mbvisor.guest.mbctl \"$@\"\n", 0o755)

    # Python: the interpreter, the modules mbctl needs, their shared libraries
    archive.file(str(PYTHON), PYTHON.read_bytes(), 0o755)
    archive.symlink("usr/bin/python3", "python3.11")
    extensions = []
    for source in sorted(files):
        if source.suffix == ".py":
            add_python_source(archive, source, str(source))
        else:
            archive.file(str(source), source.read_bytes(), 0o755)
            extensions.append(source)
    xtables = [XTABLES, *(XTABLES_LIBDIR / name for name in XTABLES_EXTENSIONS)]
    for library in sorted(shared_libraries([PYTHON, BUSYBOX, *extensions, *xtables, *FOLLOW_TOOLS])):
        archive.file(str(library), library.resolve().read_bytes(), 0o755)
    data = gzip.compress(archive.finish(), compresslevel=6, mtime=0)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + f".{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, output)              # concurrent builders: last one wins, never a torn file


def prune(keep: Path, count: int = 3) -> None:
    """Keep the ``count`` most recent images in the cache directory (``keep`` among them)."""
    images = sorted(keep.parent.glob("mbvisor-guest-*.cpio.gz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in images if p != keep][count - 1:]:
        try:
            old.unlink()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel-version", help="a /lib/modules version (default: newest *-cloud-amd64)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where images are kept")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--json", action="store_true", help="print kernel, initramfs and cached as JSON")
    args = parser.parse_args(argv)
    try:
        check_inputs()
        version = kernel_version(args.kernel_version)
        key = cache_key(version)
        output = (args.cache_dir or default_cache()) / f"mbvisor-guest-{version}-{key}.cpio.gz"
        cached = output.exists() and not args.force
        if not cached:
            build(version, output)
            prune(output)
    except BuildError as error:
        print(f"build-initramfs: {error}", file=sys.stderr)
        return 1
    kernel = f"/boot/vmlinuz-{version}"
    if args.json:
        print(json.dumps({"initramfs": str(output), "kernel": kernel, "kernel_version": version,
                          "cached": cached, "size": output.stat().st_size}))
    else:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
