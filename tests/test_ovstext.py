"""ovs-ofctl's syntax for the shapes a small switch in tests/test_ovstext_ovs.py does not
produce (conjunctions, IPv6 NAT, a resubmit from a port, meters), and for what mbvisor
never writes; ``ovs-ofctl parse-flows`` (no switch needed) must read each as written."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from mbvisor.controller.ovstext import actions_text, flow_text
from mbvisor.controller.ofmessages import instructions

pytestmark = pytest.mark.host  # ovs-ofctl reads the text (no switch or root needed, but OVS installed)


def a_stat(match: dict, actions: tuple, table: int = 1, priority: int = 100, cookie: int = 0x4D42000000000007):
    datapath = SimpleNamespace(ofproto=ofp, ofproto_parser=parser)
    return SimpleNamespace(table_id=table, priority=priority, cookie=cookie, match=parser.OFPMatch(**match),
                           instructions=instructions(datapath, actions))


def ovs_reads(text: str, tmp_path) -> str:
    path = tmp_path / "flow.txt"
    path.write_text(text + "\n")
    done = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "parse-flows", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("OFPT_FLOW_MOD")][0]


def test_shapes_beyond_the_small_switch_read_back_as_written(tmp_path):
    cases = [  # (flow statistics, the actions as written here, the actions as OVS writes what it read)
        (a_stat({"eth_type": 0x0800, "ipv4_src": ("10.1.0.0", "255.255.0.0")}, (("conjunction", 7, 1, 2),)),
         "conjunction(7,1/2)", "conjunction(7,1/2)"),
        (a_stat({"eth_type": 0x86DD, "ipv6_dst": "fd00::5"}, (("ct_commit_nat", 3, "fd00::11"),)),
         "ct(commit,zone=3,nat(dst=[fd00::11]),exec(move:in_port_oxm[0..15]->ct_mark[0..15]))",
         "ct(commit,zone=3,nat(dst=fd00::11),exec(move:OXM_OF_IN_PORT[0..15]->NXM_NX_CT_MARK[0..15]))"),
        (a_stat({"in_port": 4}, (("meter", 65540), ("controller",))), "meter:65540,CONTROLLER:65535",
         "meter:65540,CONTROLLER:65535"),
        (a_stat({"eth_type": 0x0800, "ip_frag": (0, 2)}, (("resubmit", 2),)), "resubmit(,2)", "resubmit(,2)"),
        (a_stat({"reg1": 1}, (("set_field", "reg0", 5), ("goto", 3))), "set_field:5->reg0,goto_table:3",
         "set_field:0x5->reg0,goto_table:3"),
    ]
    for stat, written, read_back in cases:
        text = flow_text(stat)
        assert text.endswith(f" actions={written}"), text
        read = ovs_reads(text, tmp_path)
        assert read.endswith(f" actions={read_back}") and "cookie:0x4d42000000000007" in read, read
    assert "nw_frag=not_later" in flow_text(cases[3][0])


def test_what_mbvisor_never_writes_is_named_not_hidden():
    assert actions_text([]) == "drop"
    assert actions_text([parser.OFPInstructionWriteMetadata(1, 1)]) == "OFPInstructionWriteMetadata"
    odd = parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, [parser.OFPActionPopVlan()])
    assert actions_text([odd]) == "OFPActionPopVlan"


def test_write_and_clear_actions_are_not_written_as_applied_actions():
    """Write-actions and clear-actions are not applied actions: written as ovs-ofctl writes
    them (a review found them written as applied actions, which reads as another flow)."""
    write = parser.OFPInstructionActions(ofp.OFPIT_WRITE_ACTIONS, [parser.OFPActionOutput(1)])
    clear = parser.OFPInstructionActions(ofp.OFPIT_CLEAR_ACTIONS, [])
    assert actions_text([write]) == "write_actions(output:1)"
    assert actions_text([clear, parser.OFPInstructionGotoTable(3)]) == "clear_actions,goto_table:3"
