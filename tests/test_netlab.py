"""The namespace lab (topologies/netlab.py): bridges, namespace hosts, traffic, cleanup.

Every bridge here is ``fail_mode=standalone`` without a controller, so OVS acts as a
learning switch (its one flow is ``priority=0 actions=NORMAL``) and drop flows are added
with ``ovs-ofctl`` on top.  Nothing waits a fixed time: everything polls with a deadline.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from mbvisor.topologies import netlab
from mbvisor.topologies.netlab import CommandError, Lab, WaitTimeout, wait_until

pytestmark = pytest.mark.host


@pytest.fixture
def trio(lab):
    """A standalone bridge with hosts h1, h2, h3 (10.0.0.1-3) that know each other's MACs, so
    no ARP moves a counter behind a test's back."""
    switch = lab.bridge(fail_mode="standalone")
    hosts = [lab.host(f"h{n}", ip=f"10.0.0.{n}/24") for n in (1, 2, 3)]
    lab.fill_arp()
    return (switch, *hosts)


def system_names() -> tuple[str, str, str]:
    """What `ip netns list`, `ovs-vsctl list-br` and `ip link` show, straight from the tools."""
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return out("ip", "netns", "list"), out("ovs-vsctl", "list-br"), out("ip", "-o", "link")


def assert_nothing_left(prefix: str) -> None:
    for listing in system_names():
        assert prefix not in listing, f"{prefix} still present:\n{listing}"
    assert netlab.leftovers(prefix) == {"netns": [], "bridges": [], "links": []}
    assert not os.path.exists(os.path.join(netlab.RESERVATIONS, prefix))


def test_bridge_and_hosts_are_known_up_front(lab, trio):
    switch, h1, h2, h3 = trio
    assert switch.dpid == netlab.datapath_id_for(lab.prefix, 0) == switch.read_dpid()
    assert [h.ofport for h in (h1, h2, h3)] == [1, 2, 3]
    assert all(len(name) <= 15 for name in [switch.name] + [h.port_name for h in (h1, h2, h3)])
    assert sorted(switch.ports()) == sorted(h.port_name for h in (h1, h2, h3))
    assert h1.run(["cat", "/sys/class/net/eth0/address"]).stdout.strip() == h1.mac
    assert f"inet {h2.cidr}" in h2.run("ip -4 addr show dev eth0").stdout
    flows = switch.flows()
    assert [(f.priority, f.actions) for f in flows] == [(0, "NORMAL")]


def test_ping_between_two_hosts(trio):
    _, h1, h2, _ = trio
    assert h1.ping(h2, count=3) == 3
    assert h2.ping(h1.ip, count=3) == 3


@pytest.mark.parametrize("layer", ["ip", "mac"])
def test_drop_flow_stops_one_source_only(trio, layer):
    switch, target, friend, attacker = trio
    assert attacker.ping(target, count=2) == 2          # reachable before the rule
    match = f"ip,nw_src={attacker.ip}" if layer == "ip" else f"dl_src={attacker.mac}"
    switch.add_flow(f"priority=100,{match},actions=drop")
    assert any(f.priority == 100 and f.actions == "drop" for f in switch.flows())

    before = target.rx_packets()
    assert attacker.ping(target, count=5, timeout=0.3) == 0
    # The drops happened in OVS (the rule counted them) and nothing reached the target.
    wait_until(lambda: switch.flow_packets("actions=drop") >= 5, 10, "the drop rule to count 5 packets")
    assert target.rx_packets() == before

    assert friend.ping(target, count=5) == 5
    assert target.rx_packets() >= before + 5

    switch.del_flows(match, strict=False)
    assert attacker.ping(target, count=2) == 2          # and back once the rule is gone


def test_udp_reaches_listener_in_other_namespace(trio):
    switch, h1, h2, _ = trio
    listener = h2.udp_listener(5000)
    assert h1.send_udp(h2, 5000, count=3, src_port=40000, payload=b"hello") == 3
    datagrams = listener.wait_for(3)
    assert datagrams == [netlab.Datagram(h1.ip, 40000, b"hello")] * 3

    # Transport layer: drop one destination port, the other still gets through.
    blocked = h2.udp_listener(5001)
    switch.add_flow(f"priority=100,udp,nw_dst={h2.ip},tp_dst=5001,actions=drop")
    assert h1.send_udp(h2, 5001, count=4) == 4
    wait_until(lambda: switch.flow_packets("tp_dst=5001") >= 4, 10, "the UDP drop rule to count 4 packets")
    assert h1.send_udp(h2, 5000, count=1) == 1
    listener.wait_for(4)
    assert blocked.count == 0


def test_tcp_syn_dropped_at_transport_layer(trio):
    switch, h1, h2, _ = trio
    h1.serve_http(8080)
    assert h2.send_tcp_syn(h1, 8080, count=3) == 3
    assert h2.tcp_probe(h1, 8081, count=2) == ["refused", "refused"]
    switch.add_flow(f"priority=100,tcp,nw_dst={h1.ip},tp_dst=8080,actions=drop")
    assert h2.send_tcp_syn(h1, 8080, count=3, timeout=0.3) == 0
    assert h2.tcp_connect(h1, 8081) == "refused"        # other ports still answer
    assert h2.tcp_connect(h1, 8080, src_port=41000, timeout=0.3) == "timeout"


def test_http_get_across_bridge(trio):
    _, h1, h2, h3 = trio
    server = h1.serve_http(8000)
    status, body, peer = h2.http_get(f"http://{h1.ip}:8000/index.html")
    assert (status, body, peer) == (200, "h1\n", (h1.ip, 8000))
    assert h3.http_get(f"http://{h1.ip}:8000/").status == 200
    server.stop()
    assert not server.alive()
    with pytest.raises(netlab.NetlabError, match="ConnectionRefused"):
        h2.http_get(f"http://{h1.ip}:8000/", timeout=2)


def test_close_removes_everything_it_created():
    netlab.require_host_tools()
    with Lab() as lab:
        prefix, workdir = lab.prefix, lab.workdir
        switch = lab.bridge(fail_mode="standalone")
        h1, h2 = lab.host("h1"), lab.host("h2")
        assert h1.ping(h2, count=1) == 1
        sleeper = h1.popen(["sleep", "300"])
        server = h2.serve_http(8000)
        stray = h1.run("sleep 300 >/dev/null 2>&1 & echo $!").stdout.strip()  # not tracked by popen
        assert lab.leftovers()["bridges"] == [switch.name]
    assert_nothing_left(prefix)
    assert not sleeper.alive() and not server.alive()
    assert not os.path.exists(f"/proc/{stray}") or "sleep" not in open(f"/proc/{stray}/cmdline").read()
    assert not os.path.exists(workdir)
    lab.close()                                          # idempotent
    with pytest.raises(netlab.NetlabError, match="closed"):
        lab.host("h3")


def test_failure_inside_the_with_block_still_cleans_up():
    netlab.require_host_tools()
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            prefix = lab.prefix
            lab.bridge(fail_mode="standalone")
            lab.host("h1").popen(["sleep", "300"])
            raise RuntimeError("boom")
    assert_nothing_left(prefix)


def test_closing_one_lab_leaves_another_alone(lab):
    other_switch = lab.bridge(fail_mode="standalone")
    a, b = lab.host("a"), lab.host("b")
    with Lab() as short_lived:
        short_lived.bridge(fail_mode="standalone")
        short_lived.host("a")
        assert short_lived.prefix != lab.prefix
    assert_nothing_left(short_lived.prefix)
    assert a.ping(b, count=2) == 2
    assert lab.leftovers()["bridges"] == [other_switch.name]


def test_errors_name_the_failing_command(trio):
    switch, h1, _, _ = trio
    with pytest.raises(CommandError) as failed:
        h1.run(["ip", "link", "set", "nosuchdev", "up"])
    message = str(failed.value)
    assert "ip netns exec" in message and "ip link set nosuchdev up" in message
    assert "exit code" in message and "nosuchdev" in failed.value.stderr
    with pytest.raises(CommandError, match=r"ovs-ofctl .*add-flow .*bogus_field"):
        switch.add_flow("bogus_field=1,actions=drop")
    with pytest.raises(netlab.NetlabError, match="could not send.*unreachable"):
        h1.ping("192.0.2.1", count=1)                 # no route: not silently "0 replies"
    with pytest.raises(WaitTimeout, match="waiting for the impossible"):
        wait_until(lambda: False, 0.05, "the impossible")
