"""The flows REST reports in ovs-ofctl's syntax (controller/ovstext.py) are the flows the
switch holds: for every flow of a firewall with filters of each layer and family and of
a load balancer with redirects, ``ovs-ofctl parse-flows`` reads REST's text and
``dump-flows``'s line to the same flow."""

from __future__ import annotations

import re
import subprocess

import pytest

from mbvisor.topologies.controller_run import Controller
from test_controller_ovs import MB2_MAC, MB_MAC

pytestmark = pytest.mark.host


def parsed(lines: list[str], workdir) -> list[str]:
    """Each flow as ovs-ofctl reads it (its own canonical text), sorted."""
    path = workdir / "flows.txt"
    path.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "parse-flows", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return sorted(re.sub(r" \(xid=0x[0-9a-f]+\)", "", line) for line in out.splitlines()
                  if line.startswith("OFPT_FLOW_MOD"))


def test_every_reported_flow_reads_in_ovs_as_the_flow_the_switch_holds(lab, tmp_path):
    controller = Controller(tmp_path).start()
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        mb, lb = lab.host("mb", ip="10.0.0.5/24", mac=MB_MAC), lab.host("lb", ip="10.0.0.6/24", mac=MB2_MAC)
        lab.host("backend", ip="10.0.0.11/24")
        controller.wait_switch(bridge.dpid)
        lab.fill_arp()
        for text in [f"R F {MB_MAC} 10.0.0.5", f"A {MB_MAC} I 4 s 10.66.0.0/16", f"A {MB_MAC} I 4 s fd00:66::/32",
                     f"A {MB_MAC} I 6 s 10.77.0.0/16 t 8", f"A {MB_MAC} M 4 s 02:00:00:00:00:99",
                     f"A {MB_MAC} T 13 s 1024-2047 d 53 p udp", f"A {MB_MAC} T 8 d 443",
                     f"A {MB_MAC} T 9 d 22 p tcp"]:
            controller.ok(bridge.dpid, mb.ofport, text)
        for text in [f"R L {MB2_MAC} 10.0.0.6 0 * 10.0.0.11", f"R L {MB2_MAC} 10.0.0.6 1 10.9.0.0/16 10.0.0.11"]:
            controller.ok(bridge.dpid, lb.ofport, text)
        seen_actions = set()
        for mac in (MB_MAC, MB2_MAC):
            view = controller.get(f"/v1/middleboxes/{bridge.dpid:016x}/{mac}")[1]
            flows = controller.get(f"/v1/middleboxes/{bridge.dpid:016x}/{mac}/flows")[1]["flows"]
            held = bridge.dump_flows(f"cookie={int(view['cookie'], 16)}/-1", no_stats=True)
            assert len(flows) == len(held) > 3
            assert parsed([f["text"] for f in flows], tmp_path) == parsed(held, tmp_path)
            for flow in flows:
                assert flow["text"].endswith(f" actions={flow['actions']}")
                seen_actions.update(re.findall(r"[a-z_]+(?=[(:])|drop|NORMAL", flow["actions"]))
        # The shapes this test is about: conntrack with NAT and a register move, groups, resubmits.
        assert {"ct", "nat", "exec", "move", "group", "set_field", "drop", "output"} <= seen_actions, seen_actions
    finally:
        controller.stop()
