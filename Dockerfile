# mbvisor in a container: Open vSwitch, the controller, the agent and the lab demo
# (docs/container.md).  Build it with `make container`, which makes the base image and a
# wheelhouse first (topologies/container-build.sh); by hand:
#
#   topologies/container-build.sh                                  # image mbvisor:latest
#   podman run --rm --privileged -v "$PWD/results:/opt/mbvisor/results" mbvisor     # the demo
#
# No host networking: the demo's namespaces, veths and its own ovs-vswitchd live in the
# container's network namespace.  --privileged is for creating those (network namespaces,
# the userspace datapath's tap and raw sockets).
#
# Two targets: `runtime` (the default: OVS, the venv without test tools, the sources) and
# `test` (adds the test tools and compilers: `make test-fast` runs in it).  Packages come
# before sources, so editing a source file rebuilds only the last layers.

ARG BASE=debian:12

FROM ${BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends openvswitch-switch iproute2 ethtool procps python3 python3-venv \
        tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
WORKDIR /opt/mbvisor
# The Python dependencies come from the wheelhouse container-build.sh built on the host
# (`--build-context wheels=...`, mounted for the install only, never a layer): pip inside
# a build cannot always verify HTTPS certificates, so nothing is fetched here.
COPY pyproject.toml .
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && python3 -m venv .venv \
 && .venv/bin/pip install -q --no-cache-dir --no-index --find-links /tmp/wheels -r /tmp/requirements.txt \
        "setuptools>=68" wheel
COPY . .
RUN .venv/bin/pip install -q --no-cache-dir --no-deps --no-build-isolation -e . && mkdir -p results
ENV PATH=/opt/mbvisor/.venv/bin:$PATH
VOLUME ["/opt/mbvisor/results"]
# tini is PID 1: it passes Ctrl-C and `podman stop` on to the command and reaps the OVS
# daemons the entry point starts, so the container ends when the command does.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/mbvisor/topologies/container-entrypoint.sh"]
CMD ["mbvisor", "demo"]

FROM runtime AS test
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make systemd \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]))' \
        > /tmp/test-requirements.txt \
 && .venv/bin/pip install -q --no-cache-dir --no-index --find-links /tmp/wheels -r /tmp/test-requirements.txt
CMD ["make", "test-fast"]
