#!/usr/bin/env bash
# Prepare this machine for mbvisor: Debian packages, the project's virtual environment and
# a running Open vSwitch.  Idempotent: a second run installs nothing and starts nothing
# that already runs.  Used by `make demo` and `make test`; safe to run by hand.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEBIAN_PACKAGES=(openvswitch-switch iproute2 iputils-ping ethtool procps python3 python3-venv
                 qemu-system-x86 linux-image-cloud-amd64 busybox-static mininet
                 iperf3 iptables netsniff-ng
                 nftables ipset ipvsadm fail2ban   # mbctl follow's adapters and their tests
                 gcc libc6-dev make   # the C guest library (guest/c) and its tests
                 systemd)             # systemd-analyze: the units' verify and security tests
OVS_CTL=/usr/share/openvswitch/scripts/ovs-ctl

say() { printf '[setup] %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
  local missing=()
  for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "Debian packages present"
    return
  fi
  say "installing Debian packages: ${missing[*]} (waits for the dpkg lock if another install runs)"
  # DPkg::Lock::Timeout makes apt wait for a concurrent apt/dpkg instead of failing.
  as_root apt-get -o DPkg::Lock::Timeout=600 update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
    install -y -q --no-install-recommends "${missing[@]}"
}

python_311() {
  # The project is pinned to Python 3.11 (Debian 12's python3); prefer the first one on PATH.
  local candidate
  for candidate in python3.11 python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null \
       && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  echo "no Python 3.11 with venv found (Debian 12: apt-get install python3 python3-venv)" >&2
  return 1
}

create_virtualenv() {
  local python stamp="$VENV/.mbvisor-installed"
  python=$(python_311)
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV with $python"
    "$python" -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing mbvisor and its test dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
  else
    say "virtual environment up to date"
  fi
}

start_open_vswitch() {
  if as_root "$OVS_CTL" status >/dev/null 2>&1; then
    say "Open vSwitch running"
    return
  fi
  say "starting Open vSwitch (userspace datapath where the kernel has no OVS module)"
  as_root "$OVS_CTL" start --system-id=random >/dev/null
  as_root ovs-vsctl --timeout=10 show >/dev/null
}

install_debian_packages
create_virtualenv
start_open_vswitch
say "ready"
