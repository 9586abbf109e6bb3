#!/usr/bin/env bash
# Build mbvisor's container image with podman (docs/container.md):
#   1. a Debian 12 base image: BASE if given (e.g. docker.io/library/debian:12), else one
#      made here with debootstrap and imported, once (localhost/mbvisor-base:bookworm);
#   2. a wheelhouse of every Python dependency, built on the host with the project's venv
#      (.container/wheels; the build mounts it, pip inside a build fetches nothing);
#   3. `podman build --target TARGET` (runtime, the default, or test) tagged TAG.
# Progress goes to stderr as "[container] ..." lines.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${TARGET:-runtime}
TAG=${TAG:-mbvisor:latest}
BASE=${BASE:-}
VENV=${VENV:-.venv}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=localhost/mbvisor-base:bookworm
# Measured on these machines (docs/container.md): crun refuses their cgroup layout, and
# the default limits are too low for apt and ovs-vswitchd.
PODMAN_FLAGS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

say() { printf '[container] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { say "run as root: podman's system storage and debootstrap need it"; exit 1; }

missing=()
for package in podman debootstrap runc; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if [ -z "$BASE" ]; then
  BASE=$LOCAL_BASE
  status=0
  podman image exists "$BASE" || status=$?
  if [ "$status" = 1 ]; then  # not there (any other status is podman failing: set -e stops)
    root=$(mktemp -d /var/tmp/mbvisor-base.XXXXXX)
    trap 'rm -rf "$root" "$root.log"' EXIT
    say "bootstrapping a minimal Debian 12 from $MIRROR (about 30 s)"
    if ! debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1; then
      say "debootstrap failed (network, or MIRROR=$MIRROR unreachable?); its last lines:"
      tail -n 15 "$root.log" >&2
      exit 1
    fi
    tar -C "$root" -c . | podman import -q - "$BASE" >/dev/null
    say "base image $BASE"
  elif [ "$status" != 0 ]; then
    say "podman image exists $BASE failed with status $status"
    exit 1
  fi
fi

say "wheelhouse .container/wheels (runtime and test dependencies, built on this host)"
mkdir -p .container/wheels
"$VENV/bin/python" - > .container/requirements.txt <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"] + ["setuptools>=68", "wheel"]))
PY
# What the wheelhouse has already is used offline; only what it lacks is fetched.
"$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-index --find-links .container/wheels \
    -w .container/wheels -r .container/requirements.txt 2>/dev/null \
  || "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --find-links .container/wheels \
    -w .container/wheels -r .container/requirements.txt

say "building $TAG (target $TARGET) from $BASE"
podman build "${PODMAN_FLAGS[@]}" --build-arg BASE="$BASE" --build-context wheels=.container/wheels \
  --target "$TARGET" -t "$TAG" .
say "built $TAG: $(podman image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
