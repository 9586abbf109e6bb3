# mbvisor in a container: Open vSwitch, the controller, the agent and the lab demo.
# Built with the same setup script the README's commands use (topologies/host-setup.sh).
#
#   docker build -t mbvisor .
#   docker run --rm -it --privileged --network host mbvisor              # make demo
#   docker run --rm -it --privileged --network host mbvisor make test    # the test suite
#
# --privileged is needed for network namespaces, veths and the userspace datapath's raw
# sockets; --network host lets the container's OVS and namespaces use the host's kernel
# networking (nothing leaves the namespaces the demo creates).
FROM debian:12

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends make git ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mbvisor
COPY . .
# Debian packages and .venv, nothing started (a build has no running services).
RUN bash topologies/host-setup.sh --install-only && rm -rf /var/lib/apt/lists/*

ENTRYPOINT ["/opt/mbvisor/topologies/container-entrypoint.sh"]
CMD ["make", "demo"]
