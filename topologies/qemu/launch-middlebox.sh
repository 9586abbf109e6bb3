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
#   3. runs QEMU with KVM when guest code runs on it here at least at a tenth of TCG's speed,
#      else TCG (the probe below; MB_ACCEL=kvm|tcg chooses without it; the choice and why, with
#      the probe's times, are printed and written to STATE/accel and STATE/accel-reason), with
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
#   when guest code runs on /dev/kvm fast enough, else tcg), MB_KVM_PROBE_TIMEOUT (s, default
#   30: for a first guest instruction on KVM), MB_KVM_MAX_SLOWDOWN (default 10: KVM's probe loop
#   may take that many times TCG's, and at least 1 s),
#   MB_QEMU (qemu-system-x86_64), MB_KEEP_REGION, MB_DOORBELL (1: an
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
PROBE_TIMEOUT=${MB_KVM_PROBE_TIMEOUT:-30} MAX_SLOWDOWN=${MB_KVM_MAX_SLOWDOWN:-10}
[[ $PROBE_TIMEOUT =~ ^[0-9]+$ && $PROBE_TIMEOUT -gt 0 ]] || { echo "launch-middlebox: MB_KVM_PROBE_TIMEOUT must be whole seconds, not '$PROBE_TIMEOUT'" >&2; exit 2; }
[[ $MAX_SLOWDOWN =~ ^[0-9]+$ && $MAX_SLOWDOWN -gt 0 ]] || { echo "launch-middlebox: MB_KVM_MAX_SLOWDOWN must be a whole number, not '$MAX_SLOWDOWN'" >&2; exit 2; }
for file in "$KERNEL" "$INITRAMFS"; do
  [ -r "$file" ] || { echo "launch-middlebox: cannot read $file" >&2; exit 2; }
done
command -v "$QEMU" >/dev/null || { echo "launch-middlebox: $QEMU not found (apt-get install qemu-system-x86)" >&2; exit 2; }
[ ${#TAP} -le 15 ] || { echo "launch-middlebox: tap name $TAP is longer than 15 characters (set MB_TAP)" >&2; exit 2; }
ovs-vsctl --timeout=10 br-exists "$BRIDGE" || { echo "launch-middlebox: no OVS bridge $BRIDGE" >&2; exit 2; }
if [ -e "$REGION" ] || [ -e "/sys/class/net/$TAP" ]; then
  echo "launch-middlebox: $REGION or tap $TAP already exists; is $NAME running?" >&2; exit 2
fi

QEMU_PID= SERVER_PID= PROBE_PID=
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
  [ -n "$PROBE_PID" ] && { kill -TERM "$PROBE_PID" 2>/dev/null; wait "$PROBE_PID" 2>/dev/null; } || true
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  [ -n "$added_port" ] && ovs-vsctl --timeout=10 --if-exists del-port "$BRIDGE" "$TAP" || true
  [ -n "$created_tap" ] && ip link del "$TAP" 2>/dev/null || true
  if [ -n "$created_region" ] && [ -z "${MB_KEEP_REGION:-}" ]; then rm -f "$REGION"; fi
  rm -rf "$STATE/control.sock" "$STATE/qemu.pid" "${probe_dir:-}"
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
# The probe's guest is a 64 KiB firmware whose reset vector runs "mov ecx, N; dec ecx; jnz;
# mov al, 0x10; out 0xf4, al": the write to QEMU's debug-exit port makes QEMU exit with 33.
# firmware FILE N writes it.  With N = 1 it tells whether a guest instruction runs on KVM at
# all (0.05-0.17 s with KVM or TCG here); with N = 4M how fast guest code runs: TCG ~0.1 s,
# and a KVM that emulates its guests (kvm_pvm on the nested host this was built on: ~0.65 us
# per instruction) 5.5-7.5 s.  SeaBIOS is not used: under such a KVM it took 5-8 s to boot,
# or more than 60 s with the vCPU halted waiting for an interrupt (docs/qemu.md, section 7).
LOOP=4194304
firmware() {
  { head -c 65520 /dev/zero | tr '\0' '\364'
    printf '\x66\xb9'; printf "\\x$(printf %02x $(( $2 & 255 )))\\x$(printf %02x $(( $2 >> 8 & 255 )))"
    printf "\\x$(printf %02x $(( $2 >> 16 & 255 )))\\x$(printf %02x $(( $2 >> 24 & 255 )))"
    printf '\x66\x49\x75\xfc\xb0\x10\xe6\xf4\xf4\xf4'; } > "$1"
}
# probe ACCEL CPU FIRMWARE TIMEOUT: run it; sets PROBE_EXIT (33: done; 124: not within TIMEOUT
# seconds) and PROBE_US (microseconds).  In the background, so that a signal ends the wait and
# cleanup stops the probe.
probe() {
  local started=${EPOCHREALTIME/./}
  PROBE_EXIT=0
  timeout "$4" "$QEMU" -machine "pc,accel=$1" -cpu "$2" -m 16 -nodefaults -no-user-config -display none \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 -bios "$3" >/dev/null 2>&1 &
  PROBE_PID=$!
  wait "$PROBE_PID" || PROBE_EXIT=$?
  PROBE_PID=
  PROBE_US=$(( ${EPOCHREALTIME/./} - started ))
}
seconds() { printf '%d.%02d s' $(( $1 / 1000000 )) $(( $1 % 1000000 / 10000 )); }
if [ "$ACCEL" != auto ]; then
  REASON="MB_ACCEL=$ACCEL (no probe)"
elif [ ! -c /dev/kvm ]; then
  ACCEL=tcg REASON="no /dev/kvm"
else
  probe_dir=$(mktemp -d)
  firmware "$probe_dir/first" 1
  firmware "$probe_dir/loop" "$LOOP"
  probe kvm "$KVM_CPU" "$probe_dir/first" "$PROBE_TIMEOUT"; first_exit=$PROBE_EXIT first_us=$PROBE_US
  if [ "$first_exit" -ne 33 ]; then
    ACCEL=tcg REASON="no guest instruction ran on KVM: its probe exited with $first_exit after $(seconds "$first_us") (124: the ${PROBE_TIMEOUT} s timeout)"
  else
    probe tcg qemu64 "$probe_dir/loop" "$PROBE_TIMEOUT"; tcg_us=$PROBE_US
    limit=$(( MAX_SLOWDOWN * tcg_us > 1000000 ? MAX_SLOWDOWN * tcg_us : 1000000 ))
    probe kvm "$KVM_CPU" "$probe_dir/loop" "$(( limit / 1000000 )).$(printf %06d $(( limit % 1000000 )))"
    if [ "$PROBE_EXIT" -eq 33 ]; then
      ACCEL=kvm REASON="KVM runs guests: its probe's first instruction exited QEMU after $(seconds "$first_us"), $LOOP loop iterations after $(seconds "$PROBE_US") (TCG: $(seconds "$tcg_us"))"
    else
      ACCEL=tcg REASON="KVM works (its probe's first instruction exited QEMU after $(seconds "$first_us")) but is too slow: $LOOP loop iterations did not finish in $(seconds "$limit") (${MAX_SLOWDOWN}x TCG's $(seconds "$tcg_us"), at least 1 s)"
    fi
  fi
  rm -rf "$probe_dir"
fi
echo "launch-middlebox: accelerator $ACCEL: $REASON" >&2
CPU=$([ "$ACCEL" = kvm ] && echo "$KVM_CPU" || echo qemu64)
echo "$ACCEL" > "$STATE/accel"
echo "$REASON" > "$STATE/accel-reason"
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
