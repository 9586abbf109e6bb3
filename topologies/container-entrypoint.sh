#!/usr/bin/env bash
# Container entry point (under tini): start Open vSwitch for the command, then run it.
#
# The daemons are started directly, not with ovs-ctl, whose start loads the openvswitch
# kernel module: a container cannot, and this datapath is userspace (netdev) anyway.
# MBVISOR_OVS=host: use the host's Open vSwitch instead (mount its /var/run/openvswitch);
# nothing is started.
set -euo pipefail

RUN=/var/run/openvswitch
DB=/etc/openvswitch/conf.db

start_ovs() {
  mkdir -p "$RUN" /var/log/openvswitch "$(dirname "$DB")"
  [ -e "$DB" ] || ovsdb-tool create "$DB" /usr/share/openvswitch/vswitch.ovsschema
  ovsdb-server "$DB" --remote=punix:"$RUN/db.sock" --pidfile="$RUN/ovsdb-server.pid" --detach \
    --log-file=/var/log/openvswitch/ovsdb-server.log
  ovs-vsctl --no-wait init
  ovs-vswitchd unix:"$RUN/db.sock" --pidfile="$RUN/ovs-vswitchd.pid" --detach \
    --log-file=/var/log/openvswitch/ovs-vswitchd.log
}

case "${MBVISOR_OVS:-container}" in
  container) start_ovs ;;
  host) [ -S "$RUN/db.sock" ] || { echo "MBVISOR_OVS=host but no $RUN/db.sock: mount the host's $RUN" >&2; exit 2; } ;;
  *) echo "MBVISOR_OVS must be 'container' or 'host', not '${MBVISOR_OVS}'" >&2; exit 2 ;;
esac
exec "$@"
