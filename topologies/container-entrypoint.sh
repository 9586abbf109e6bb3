#!/usr/bin/env bash
# Container entry point: start Open vSwitch (userspace datapath), then run the command.
set -euo pipefail
/usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >/dev/null
exec "$@"
