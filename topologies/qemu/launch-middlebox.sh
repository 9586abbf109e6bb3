#!/usr/bin/env bash
# Launch a middlebox VM with an mbvisor channel, attached to an Open vSwitch bridge.
#
#   launch-middlebox.sh BRIDGE NAME MAC KERNEL INITRAMFS [EXTRA_APPEND]
#
#   BRIDGE       an existing OVS bridge (any datapath; tested with datapath_type=netdev)
#   NAME         the VM's name: [A-Za-z0-9_-]+; also its vm-id and its region /dev/shm/NAME
#   MAC          the virtio NIC's MAC, e.g. 52:54:00:12:34:56
#   KERNEL       e.g. /boot/vmlinuz-6.1.0-56-cloud-amd64 (Debian linux-image-cloud-amd64)
#   INITRAMFS    e.g. the image topologies/qemu/build-initramfs.py prints
#   EXTRA_APPEND appended to the kernel command line; the mbvisor guest image reads
#                mbv.ip=10.0.0.5/24, mbv.arp=IP,MAC;IP,MAC and mbv.name=NAME from it
#
# What it does, in this order:
#   1. creates the channel region /dev/shm/NAME (1 MiB, zero-filled: the guest formats it);
#   2. creates a tap device (IPv6 off on it, so the host sends nothing into the guest) and
#      adds it to BRIDGE with, in the same OVS transaction, the annotation the mbvisor agent
#      discovers VMs by:
#         external_ids:mbvisor-channel=/dev/shm/NAME  external_ids:attached-mac=MAC
#         external_ids:vm-id=NAME
#      and the operator's trust annotations (docs/agent.md):
#         external_ids:mbvisor-tenant=$MB_TENANT  external_ids:mbvisor-ips=$MB_IPS
#   3. runs QEMU with KVM when a guest runs on it here (a probe of at most 2 s), else TCG
#      (MB_ACCEL=kvm|tcg chooses; the choice is printed and written to STATE/accel), with
#         -object memory-backend-file,id=mb,share=on,mem-path=/dev/shm/NAME,size=1M
#         -device ivshmem-plain,memdev=mb                       (PCI 1af4:1110, BAR2 = region)
#      or, with MB_DOORBELL=1, a device the guest rings the host through (docs/protocol.md §12):
#      before step 2 it starts "mbvisor ivshmem-server /dev/shm/NAME=SOCKET" (SOCKET is
#      $MB_DOORBELL_DIR/NAME.sock, default /run/mbvisor/ivshmem/NAME.sock), annotates the port
#      with external_ids:mbvisor-doorbell=SOCKET, and QEMU gets
#         -chardev socket,id=ivs,path=SOCKET -device ivshmem-doorbell,chardev=ivs,vectors=1
#         -netdev tap,id=n0,ifname=TAP,script=no,downscript=no
#         -device virtio-net-pci,netdev=n0,mac=MAC,csum=off,guest_csum=off
#      csum=off,guest_csum=off: with OVS's userspace datapath, frames with unfinished
#      (offloaded) checksums are not completed on the way, and the receiver drops them;
#   4. waits for QEMU; on its exit, or on SIGTERM/SIGINT/SIGHUP to this script (QEMU is
#      stopped first), removes the OVS port, the tap and the region (MB_KEEP_REGION=1 keeps
#      the region), and stops the ivshmem server. SIGKILL to this script skips step 4:
#      remove the port, tap and region yourself (names below); the server ends with it
#      (setpriv --pdeathsig TERM) and removes its socket.
#
# The guest's two serial ports (files in MB_STATE_DIR, default /run/mbvisor/vm/NAME):
#   console.log   ttyS0, the kernel console and the guest init's messages; the mbvisor
#                 image writes "MBVISOR-READY" there once eth0 is up
#   control.sock  ttyS1 as a UNIX socket (QEMU listens; connect at any time); the mbvisor
#                 image serves one shell command per line there: "<id> <base64 command>"
#                 answered by "@@MBV-BEGIN <id>@@", the output, "@@MBV-END <id> <rc>@@"
#                 (mbvisor.topologies.qemu.vm.GuestConsole is a client)
#   qemu.log      QEMU's own stdout and stderr;  qemu.pid  its pid
#
# Environment: MB_TENANT (the VM's tenant; default NAME: a VM alone in its tenant),
#   MB_IPS (the VM's own addresses, comma separated; default the address of mbv.ip= in
#   EXTRA_APPEND, else none), MB_TAP (tap name; default "mbt" + the last 12 characters of NAME),
#   MB_STATE_DIR, MB_MEM (MiB, default 256), MB_REGION_SIZE (default 1M), MB_ACCEL (auto: kvm
#   when a guest runs on /dev/kvm, else tcg), MB_QEMU (qemu-system-x86_64), MB_KEEP_REGION, MB_DOORBELL (1: an
#   ivshmem-doorbell device), MB_DOORBELL_DIR, MB_MBVISOR (the mbvisor command; default mbvisor).
# Needs root, qemu-system-x86 and openvswitch-switch; see docs/qemu.md.
set -euo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }
[ $# -ge 5 ] && [ $# -le 6 ] || usage
BRIDGE=$1 NAME=$2 MAC=$3 KERNEL=$4 INITRAMFS=$5 EXTRA_APPEND=${6:-}
[[ $NAME =~ ^[A-Za-z0-9_-]+$ ]] || { echo "launch-middlebox: bad VM name '$NAME'" >&2; exit 2; }
[[ $MAC =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || { echo "launch-middlebox: bad MAC '$MAC'" >&2; exit 2; }
MAC=${MAC,,}
TENANT=${MB_TENANT:-$NAME}
if [ -z "${MB_IPS+set}" ] && [[ " $EXTRA_APPEND " =~ [[:space:]]mbv\.ip=([^/[:space:]]+) ]]; then
  MB_IPS=${BASH_REMATCH[1]}
fi
IPS=${MB_IPS:-}
[[ $TENANT =~ ^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$ ]] || { echo "launch-middlebox: bad tenant '$TENANT'" >&2; exit 2; }
[[ $IPS =~ ^[0-9A-Fa-f.:,\ ]*$ ]] || { echo "launch-middlebox: bad MB_IPS '$IPS'" >&2; exit 2; }
TAP=${MB_TAP:-mbt${NAME: -12}}
STATE=${MB_STATE_DIR:-/run/mbvisor/vm/$NAME}
REGION=/dev/shm/$NAME
QEMU=${MB_QEMU:-qemu-system-x86_64}
DOORBELL=${MB_DOORBELL:-}
DOORBELL_SOCKET=${MB_DOORBELL_DIR:-/run/mbvisor/ivshmem}/$NAME.sock
read -r -a MBVISOR <<< "${MB_MBVISOR:-mbvisor}"
ACCEL=${MB_ACCEL:-auto}
[[ $ACCEL =~ ^(auto|kvm|tcg)$ ]] || { echo "launch-middlebox: MB_ACCEL must be auto, kvm or tcg, not '$ACCEL'" >&2; exit 2; }
for file in "$KERNEL" "$INITRAMFS"; do
  [ -r "$file" ] || { echo "launch-middlebox: cannot read $file" >&2; exit 2; }
done
command -v "$QEMU" >/dev/null || { echo "launch-middlebox: $QEMU not found (apt-get install qemu-system-x86)" >&2; exit 2; }
[ ${#TAP} -le 15 ] || { echo "launch-middlebox: tap name $TAP is longer than 15 characters (set MB_TAP)" >&2; exit 2; }
ovs-vsctl --timeout=10 br-exists "$BRIDGE" || { echo "launch-middlebox: no OVS bridge $BRIDGE" >&2; exit 2; }
if [ -e "$REGION" ] || [ -e "/sys/class/net/$TAP" ]; then
  echo "launch-middlebox: $REGION or tap $TAP already exists; is $NAME running?" >&2; exit 2
fi

QEMU_PID= SERVER_PID=
created_region= created_tap= added_port=
cleanup() {
  local status=$?
  trap '' INT TERM HUP          # finish cleaning up even when signalled again
  trap - EXIT
  if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  [ -n "$added_port" ] && ovs-vsctl --timeout=10 --if-exists del-port "$BRIDGE" "$TAP" || true
  [ -n "$created_tap" ] && ip link del "$TAP" 2>/dev/null || true
  if [ -n "$created_region" ] && [ -z "${MB_KEEP_REGION:-}" ]; then rm -f "$REGION"; fi
  rm -f "$STATE/control.sock" "$STATE/qemu.pid" "${probe_image:-}"
  echo "launch-middlebox: $NAME stopped and cleaned up (exit $status)" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

mkdir -p "$STATE"
rm -f "$STATE/control.sock"
: > "$STATE/console.log"

# 1. the region
truncate -s "${MB_REGION_SIZE:-1M}" "$REGION"; created_region=1
chmod 600 "$REGION"

# 1b. its ivshmem server, for a doorbell (up before the agent is told of it, and before QEMU)
doorbell_id=() ivshmem=(-object "memory-backend-file,id=mb,share=on,mem-path=$REGION,size=${MB_REGION_SIZE:-1M}"
                        -device ivshmem-plain,memdev=mb)
if [ "$DOORBELL" = 1 ]; then
  mkdir -p -m 700 "$(dirname "$DOORBELL_SOCKET")"
  rm -f "$DOORBELL_SOCKET"  # a killed server's: the wait below must see the new one's
  setpriv --pdeathsig TERM "${MBVISOR[@]}" ivshmem-server "$REGION=$DOORBELL_SOCKET" >"$STATE/ivshmem-server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do [ -S "$DOORBELL_SOCKET" ] && break; kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  [ -S "$DOORBELL_SOCKET" ] || { echo "launch-middlebox: the ivshmem server did not start:" >&2; tail -5 "$STATE/ivshmem-server.log" >&2; exit 1; }
  doorbell_id=("external_ids:mbvisor-doorbell=$DOORBELL_SOCKET")
  ivshmem=(-chardev "socket,id=ivs,path=$DOORBELL_SOCKET" -device ivshmem-doorbell,chardev=ivs,vectors=1)
fi

# 2. the tap on the bridge, annotated for the agent
ip tuntap add dev "$TAP" mode tap; created_tap=1
echo 1 > "/proc/sys/net/ipv6/conf/$TAP/disable_ipv6" 2>/dev/null || true
ethtool -K "$TAP" tx off >/dev/null 2>&1 || true
ip link set "$TAP" up
added_port=1
ovs-vsctl --timeout=10 add-port "$BRIDGE" "$TAP" -- set Interface "$TAP" \
  "external_ids:mbvisor-channel=$REGION" "external_ids:attached-mac=$MAC" "external_ids:vm-id=$NAME" \
  "external_ids:mbvisor-tenant=$TENANT" "external_ids:mbvisor-ips=\"$IPS\"" "${doorbell_id[@]}"

# 3. the VM
# Under KVM the host's CPU model, without the ARCH_CAPABILITIES MSR: nested KVM on these
# machines refuses to set it and QEMU aborts ("failed to set MSR 0x10a"); qemu64 asks for
# features such a host lacks.
KVM_CPU=host,arch-capabilities=off
if [ "$ACCEL" = auto ]; then
  # KVM works if a guest runs on it: a boot sector that writes 0x10 to QEMU's debug-exit
  # port makes QEMU exit with 33 at once (~0.1 s). Where /dev/kvm exists but its vCPUs
  # never run (seen on nested hosts: QEMU starts, the guest prints nothing), it times out.
  ACCEL=tcg
  if [ -c /dev/kvm ]; then
    probe_image=$(mktemp)
    { printf '\xb0\x10\xe6\xf4\xf4'; head -c 505 /dev/zero; printf '\x55\xaa'; } > "$probe_image"
    probe=0
    timeout 2 "$QEMU" -machine pc,accel=kvm -cpu "$KVM_CPU" -m 16 -nodefaults -no-user-config -display none \
      -device isa-debug-exit,iobase=0xf4,iosize=0x04 -drive "file=$probe_image,format=raw,if=floppy" -boot a \
      >/dev/null 2>&1 || probe=$?
    rm -f "$probe_image"
    [ "$probe" -eq 33 ] && ACCEL=kvm
  fi
fi
CPU=$([ "$ACCEL" = kvm ] && echo "$KVM_CPU" || echo qemu64)
echo "$ACCEL" > "$STATE/accel"
"$QEMU" -name "$NAME" -machine pc,accel="$ACCEL" -cpu "$CPU" -smp 1 -m "${MB_MEM:-256}" \
  -nodefaults -no-user-config -display none -no-reboot \
  -kernel "$KERNEL" -initrd "$INITRAMFS" \
  -append "console=ttyS0 loglevel=4 panic=-1 ipv6.disable=1 mbv.name=$NAME $EXTRA_APPEND" \
  -chardev "file,id=console,path=$STATE/console.log" -serial chardev:console \
  -chardev "socket,id=control,path=$STATE/control.sock,server=on,wait=off" -serial chardev:control \
  "${ivshmem[@]}" \
  -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" \
  -device "virtio-net-pci,netdev=n0,mac=$MAC,csum=off,guest_csum=off" \
  -pidfile "$STATE/qemu.pid" >"$STATE/qemu.log" 2>&1 &
QEMU_PID=$!
echo "launch-middlebox: $NAME running (qemu pid $QEMU_PID, $ACCEL, tap $TAP on $BRIDGE, region $REGION, state $STATE)" >&2
# 4. `wait` returns early when a trapped signal arrives; the EXIT trap then cleans up
wait "$QEMU_PID" && status=0 || status=$?
QEMU_PID=
[ "$status" -eq 0 ] || { echo "launch-middlebox: qemu exited with $status:" >&2; tail -5 "$STATE/qemu.log" >&2; }
exit "$status"
