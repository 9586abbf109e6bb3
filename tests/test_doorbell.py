"""The doorbell: mbvisor's ivshmem server (agents/ivshmem_server.py) speaking QEMU's
protocol to real clients over real UNIX sockets, host-side guests ringing through it,
and the agent sleeping in epoll until a ring (agents/bell.py, agents/agent.py), with
hostile servers, silent rings, floods and servers that die.  No OVS, no QEMU (the VM
test drives a real ivshmem-doorbell device: tests/test_qemu_guest.py)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from mbvisor.agents import ivshmem_server
from mbvisor.agents.agent import SPURIOUS_RING_PAUSE
from mbvisor.agents.bell import HostBell, open_bell
from mbvisor.agents.ivshmem_server import IvshmemServer, ServerError
from mbvisor.guest import ivshmem, ring
from mbvisor.guest.channel_errors import ChannelError
from mbvisor.guest.doorbell import EventDoorbell
from mbvisor.guest.ivshmem import DoorbellError, receive_message
from mbvisor.guest.reader import ChannelReader, serve
from mbvisor.guest.region import open_file, open_region
from mbvisor.guest.writer import ChannelWriter
from mbvisor.topologies.netlab import wait_until

from test_agent_shell import MAC, FakeController, guest, serving, shm, status_of, vm  # noqa: F401 - fixture

MBCTL = [sys.executable, "-m", "mbvisor.guest.mbctl"]


@pytest.fixture
def sockets(tmp_path):
    """A private directory for sockets (the agent only connects to sockets in one it is
    told of)."""
    directory = tmp_path / "ivshmem"
    directory.mkdir(mode=0o700)
    return directory


@contextlib.contextmanager
def running(pairs, **options):
    """An IvshmemServer over ``pairs`` stepping in a thread until the block ends."""
    server = IvshmemServer(pairs, **options)
    stopped = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stopped.is_set,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stopped.set()
        thread.join(timeout=5)
        server.close()


def read_all(connection: socket.socket, count: int) -> list[tuple[int, int | None]]:
    connection.settimeout(5)
    return [receive_message(connection) for _ in range(count)]


def raw_client(path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(str(path))
    return connection


def disconnect(setup: ivshmem.ClientSetup) -> None:
    """Close a client's connection and every descriptor its setup brought."""
    setup.close_except()
    setup.connection.close()


def readable(fd: int, timeout: float) -> bool:
    """poll(), not select(): a long test session may hold descriptors above 1023."""
    waiting = select.poll()
    waiting.register(fd, select.POLLIN)
    return bool(waiting.poll(timeout * 1000))


def inode(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def close_fds(messages) -> None:
    for _, fd in messages:
        if fd is not None:
            os.close(fd)


# --- the server, as QEMU sees it -------------------------------------------------------------

def test_setup_is_qemus_protocol_in_order(shm, sockets):
    region = shm.region()
    path = sockets / "a.sock"
    with running([(region, str(path))], vectors=2):
        connection = raw_client(path)
        messages = read_all(connection, 3 + 2 + 2)
        try:
            assert [number for number, _ in messages] == [0, 1, -1, 0, 0, 1, 1]
            assert [fd is not None for _, fd in messages] == [False, False, True, True, True, True, True]
            assert inode(messages[2][1]) == inode(os.open(region, os.O_RDONLY))
            ivshmem.ring_eventfd(messages[4][1])  # one eventfd per vector: ringing vector 1 leaves 0 quiet
            assert not readable(messages[3][1], 0)
            assert readable(messages[4][1], 0)
        finally:
            close_fds(messages)
            connection.close()


def test_peers_learn_of_each_other_and_share_the_hosts_eventfd(shm, sockets):
    region = shm.region()
    path = sockets / "b.sock"
    with running([(region, str(path))]):
        first = ivshmem.connect(str(path))
        second = ivshmem.connect(str(path))
        try:
            assert (first.peer_id, second.peer_id) == (1, 2)
            # the host's eventfd is one object: a ring through the second's copy wakes the first's
            ivshmem.ring_eventfd(second.peers[0][0])
            assert readable(first.peers[0][0], 5)
            assert os.eventfd_read(first.peers[0][0]) == 1
            first.connection.settimeout(5)
            own_vector = receive_message(first.connection)  # rest of the first's setup
            assert own_vector[0] == 1 and own_vector[1] is not None
            os.close(own_vector[1])
            joined = receive_message(first.connection)
            assert joined[0] == 2 and joined[1] is not None
            os.close(joined[1])
            second.connection.close()
            assert receive_message(first.connection) == (2, None)  # it left
        finally:
            first.close_except()
            second.close_except()
            first.connection.close()


def test_host_eventfd_outlives_every_client(shm, sockets):
    """QEMU never reconnects, the agent does: rings while no agent listens stay counted."""
    region = shm.region()
    path = sockets / "c.sock"
    with running([(region, str(path))]):
        guest_side = ivshmem.connect(str(path))
        ivshmem.ring_eventfd(guest_side.peers[0][0])
        ivshmem.ring_eventfd(guest_side.peers[0][0])
        agent_side = HostBell.connect(str(path))
        try:
            assert agent_side.clear() == 2
            assert agent_side.clear() == 0
        finally:
            agent_side.close()
            disconnect(guest_side)


def test_too_many_clients_are_turned_away(shm, sockets):
    region = shm.region()
    path = sockets / "d.sock"
    with running([(region, str(path))], max_clients=2):
        kept = [ivshmem.connect(str(path)) for _ in range(2)]
        try:
            with pytest.raises(DoorbellError, match="closed the connection"):
                ivshmem.connect(str(path))
            disconnect(kept[1])
            wait_until(lambda: _connects(path), what="the freed ID is given again")
        finally:
            disconnect(kept[0])


def _connects(path) -> bool:
    try:
        setup = ivshmem.connect(str(path))
    except DoorbellError:
        return False
    assert setup.peer_id == 2
    disconnect(setup)
    return True


def test_a_client_that_never_reads_is_dropped_not_waited_for(shm, sockets, monkeypatch):
    monkeypatch.setattr(ivshmem_server, "SEND_TIMEOUT", 0.2)
    region = shm.region()
    path = sockets / "e.sock"
    with running([(region, str(path))]):
        idle = raw_client(path)  # reads nothing until the end
        for _ in range(COMERS_TO_FILL_A_SOCKET):  # each comer and goer is a notification queued to it
            setup = ivshmem.connect(str(path))
            disconnect(setup)
        assert _dropped(idle)
        alive = ivshmem.connect(str(path))  # the server still serves
        disconnect(alive)


COMERS_TO_FILL_A_SOCKET = 3000  # 6,000 notifications: more than a UNIX socket's default buffer holds


def _dropped(connection: socket.socket) -> bool:
    """Whether the server closed ``connection`` (its queued messages read and thrown away)."""
    connection.setblocking(False)
    try:
        while True:
            message = receive_message(connection)
            if message is None:
                return True
            if message[1] is not None:
                os.close(message[1])
    except BlockingIOError:
        return False


def test_server_refuses_what_it_must_not_serve(shm, sockets, tmp_path):
    region = shm.region()
    small = shm()
    with open(small, "wb") as file:
        file.write(bytes(4096))
    with pytest.raises(ServerError, match="at least"):
        IvshmemServer([(small, str(sockets / "s.sock"))])
    link = tmp_path / "link"
    link.symlink_to(region)
    with pytest.raises(ServerError, match="cannot open region"):
        IvshmemServer([(str(link), str(sockets / "s.sock"))])
    plain_file = sockets / "not-a-socket"
    plain_file.write_text("x")
    with pytest.raises(ServerError, match="not a socket"):
        IvshmemServer([(region, str(plain_file))])
    with running([(region, str(sockets / "live.sock"))]):
        with pytest.raises(ServerError, match="already listens"):
            IvshmemServer([(region, str(sockets / "live.sock"))])
    assert not (sockets / "s.sock").exists()  # nothing left behind by the refusals


def test_a_dead_servers_socket_is_replaced(shm, sockets):
    region = shm.region()
    path = sockets / "f.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    with running([(region, str(path))]):
        setup = ivshmem.connect(str(path))
        assert setup.peer_id == 1
        disconnect(setup)
    assert not path.exists()


def test_ivshmem_server_command_serves_until_sigterm(shm, sockets):
    region = shm.region()
    path = sockets / "g.sock"
    process = subprocess.Popen([sys.executable, "-m", "mbvisor.agents.cli", "ivshmem-server", f"{region}={path}"],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(path.exists, what="the server's socket")
        bell = EventDoorbell.connect(str(path), os.open(region, os.O_RDONLY))
        bell.close()
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
    assert process.returncode == 0, errors
    assert not path.exists()
    bad = subprocess.run([sys.executable, "-m", "mbvisor.agents.cli", "ivshmem-server", "no-equals-sign"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "REGION=SOCKET" in bad.stderr


# --- clients of servers that are not what they claim -----------------------------------------

@contextlib.contextmanager
def scripted_server(path, messages):
    """A server that sends ``messages`` ((number, fd or None)) to its one client."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve_one():
        connection, _ = listener.accept()
        for number, fd in messages:
            ivshmem.send_message(connection, number, fd)
        connection.recv(1)  # until the client closes
        connection.close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(timeout=5)


@pytest.mark.parametrize("messages, problem", [
    ([(7, None)], "protocol version 7"),
    ([(0, None), (0, None)], "not a guest's"),
    ([(0, None), (1, None), (5, None)], "expected the shared memory"),
    ([(0, None), (1, None)], "did not finish its setup in time"),
])
def test_client_refuses_a_server_that_speaks_otherwise(sockets, messages, problem):
    path = sockets / "h.sock"
    before = len(os.listdir("/proc/self/fd"))
    with scripted_server(path, messages):
        with pytest.raises(DoorbellError, match=problem):
            ivshmem.connect(str(path), timeout=0.5)
    assert len(os.listdir("/proc/self/fd")) == before  # no descriptor leaked


def test_a_writer_refuses_a_server_of_another_region(shm, sockets):
    served, own = shm.region(), shm.region()
    path = sockets / "i.sock"
    with running([(served, str(path))]):
        with pytest.raises(DoorbellError, match="another region"):
            open_region(shm=own, doorbell=str(path))


def test_open_bell_only_in_its_directories(shm, sockets, tmp_path):
    region = shm.region()
    path = sockets / "j.sock"
    with running([(region, str(path))]):
        with pytest.raises(DoorbellError, match="not in a doorbell directory"):
            open_bell(str(path), (str(tmp_path),))
        link = sockets / "link.sock"
        link.symlink_to(path)
        with pytest.raises(DoorbellError, match="not a socket"):
            open_bell(str(link), (str(sockets),))
        bell = open_bell(str(path), (str(sockets) + "/",))
        assert bell.serves(os.stat(region))
        bell.close()


# --- guests that ring, hosts that sleep --------------------------------------------------------

def test_echo_responder_sleeps_until_a_ring(shm, sockets):
    """With a sweep far longer than the test, only a ring can get a command answered."""
    region = shm.region()
    path = sockets / "k.sock"
    with running([(region, str(path))]):
        bell = HostBell.connect(str(path))
        stop = threading.Event()
        reader = ChannelReader(open_file(region), "echo")
        thread = threading.Thread(target=serve, args=(reader, lambda incoming: (ring.Status.OK, "ok"), stop),
                                  kwargs={"bell": bell, "sweep": 3600}, daemon=True)
        thread.start()
        try:
            with open_region(shm=region, doorbell=str(path)) as ringing:
                writer = ChannelWriter(ringing)
                for _ in range(20):
                    assert writer.request(b"@R F 52:34:56:00:12:22 10.0.0.5@", timeout=5).text == "ok"
        finally:
            stop.set()
            ivshmem.ring_eventfd(bell.eventfd)  # wakes the sleeping loop to see stop
            thread.join(timeout=5)
            bell.close()
        assert not thread.is_alive()


def test_mbctl_rings_through_the_server_and_says_when_it_cannot(shm, sockets):
    region = shm.region()
    path = sockets / "l.sock"
    with running([(region, str(path))]):
        bell = HostBell.connect(str(path))
        try:
            result = subprocess.run([*MBCTL, "--shm", region, "--doorbell", str(path), "--timeout", "0.5",
                                     "-w", "@R F 52:34:56:00:12:22 10.0.0.5@"], capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 4  # nobody answers, but the ring was heard
            assert bell.clear() == 1
        finally:
            bell.close()
    missing = subprocess.run([*MBCTL, "--shm", region, "--doorbell", str(sockets / "none.sock"), "-r"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 5 and "cannot connect to the doorbell server" in missing.stderr
    usage = subprocess.run([*MBCTL, "--doorbell", str(path), "-r"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--doorbell goes with --shm" in usage.stderr


def state(agent, key: str):
    """``key`` of the test VM's channel in the agent's status; None until it is served."""
    return next((c[key] for c in agent.status()["channels"] if c["vm_id"] == "vm0"), None)


def belled(path: str, doorbell: str, name: str = "vm0") -> object:
    from dataclasses import replace
    return replace(vm(path, name), doorbell=doorbell)


def test_agent_answers_a_ringing_guest_without_polling_it(shm, sockets):
    region = shm.region()
    path = sockets / "m.sock"
    with running([(region, str(path))]):
        client = FakeController()
        with serving([belled(region, str(path))], client, bell_sweep=3600, doorbell_dirs=(str(sockets),)) as agent:
            wait_until(lambda: state(agent, "woken_by") == "doorbell", what="the doorbell attached")
            writer = guest(region)
            assert agent.poll_once(sweep=False) is False  # a belled channel is not polled between sweeps
            with open_region(shm=region, doorbell=str(path)) as ringing:
                ringing_writer = ChannelWriter(ringing)
                for index in range(10):
                    response = ringing_writer.request(f"@A {MAC} I 4 s 10.0.0.{index + 1}@".encode(), timeout=5)
                    assert response.ok, response.text
            assert state(agent, "answered") == 10
            assert state(agent, "doorbell_problem") is None
            writer.region.close()


def test_rings_for_nothing_cost_a_bounded_number_of_looks(shm, sockets):
    region = shm.region()
    path = sockets / "n.sock"
    with running([(region, str(path))]):
        with serving([belled(region, str(path))], FakeController(), bell_sweep=3600,
                     doorbell_dirs=(str(sockets),)) as agent:
            wait_until(lambda: state(agent, "woken_by") == "doorbell", what="the doorbell attached")
            channel = agent.channels["vm0/tap-vm0"]
            looks = []
            original = agent._hear_bell
            agent._hear_bell = lambda c: looks.append(time.monotonic()) or original(c)
            flood = HostBell.connect(str(path))
            started = time.monotonic()
            rings = 0
            while time.monotonic() - started < 0.5:
                ivshmem.ring_eventfd(flood.eventfd)
                rings += 1
            elapsed = time.monotonic() - started
            flood.close()
            assert rings > 1000
            # each look that found nothing waits SPURIOUS_RING_PAUSE before the bell is heard again
            assert len(looks) <= elapsed / SPURIOUS_RING_PAUSE + 2
            assert channel.bell is not None  # a ringing guest is slowed, not cut off


def test_a_server_that_dies_leaves_the_channel_polled_then_rung_again(shm, sockets, caplog):
    region = shm.region()
    path = sockets / "o.sock"
    client = FakeController()
    server = IvshmemServer([(region, str(path))])
    stopped = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stopped.is_set,), daemon=True)
    thread.start()
    with serving([belled(region, str(path))], client, bell_sweep=3600, doorbell_dirs=(str(sockets),)) as agent:
        wait_until(lambda: state(agent, "woken_by") == "doorbell", what="the doorbell attached")
        stopped.set()
        thread.join(timeout=5)
        server.close()  # the server's end: its connections close
        wait_until(lambda: state(agent, "woken_by") == "polling", what="the agent noticed")
        assert "closed the connection" in caplog.text
        writer = guest(region)  # no ring: found by polling
        assert writer.request(f"@A {MAC} I 4 s 10.0.0.1@".encode(), timeout=5).ok
        with running([(region, str(path))]):  # back (a restarted server): the next round attaches
            wait_until(lambda: state(agent, "woken_by") == "doorbell", what="the doorbell again")
            with open_region(shm=region, doorbell=str(path)) as ringing:
                assert ChannelWriter(ringing).request(f"@A {MAC} I 4 s 10.0.0.2@".encode(), timeout=5).ok
        writer.region.close()


@pytest.mark.parametrize("case", ["outside", "other-region", "missing"])
def test_a_doorbell_the_agent_cannot_trust_leaves_the_channel_polled(shm, sockets, tmp_path, case):
    region, other = shm.region(), shm.region()
    path = (tmp_path if case == "outside" else sockets) / "p.sock"
    served = other if case == "other-region" else region
    context = contextlib.nullcontext() if case == "missing" else running([(served, str(path))])
    with context, serving([belled(region, str(path))], FakeController(), bell_sweep=3600,
                          doorbell_dirs=(str(sockets),)) as agent:
        wait_until(lambda: state(agent, "doorbell_problem") is not None, what="the refusal")
        assert state(agent, "woken_by") == "polling"
        problem = state(agent, "doorbell_problem")
        assert {"outside": "not in a doorbell directory", "other-region": "serves another region",
                "missing": "No such file"}[case] in problem
        writer = guest(region)
        assert writer.request(f"@A {MAC} I 4 s 10.0.0.1@".encode(), timeout=5).ok  # served all the same
        writer.region.close()


def test_a_command_rung_while_no_agent_runs_is_answered_by_the_next(shm, sockets):
    region = shm.region()
    path = sockets / "q.sock"
    with running([(region, str(path))]):
        with serving([belled(region, str(path))], FakeController(), bell_sweep=3600, doorbell_dirs=(str(sockets),)):
            pass  # an agent came and went
        writer = ChannelWriter(open_region(shm=region, doorbell=str(path)))
        writer.initialise(ring.Geometry(8))
        ticket = writer.submit(f"@A {MAC} I 4 s 10.0.0.1@".encode())
        with serving([belled(region, str(path))], FakeController(), bell_sweep=3600,
                     doorbell_dirs=(str(sockets),)):
            assert writer.wait(ticket, timeout=5).ok
        writer.region.close()


def test_doorbell_error_is_a_channel_error():
    assert issubclass(DoorbellError, ChannelError)  # mbctl's exit code 5, the agent's refusal


def test_a_descriptor_sent_with_the_peer_id_is_not_kept(shm, sockets):
    region = shm.region()
    path = sockets / "r.sock"
    memory, host = os.open(region, os.O_RDONLY), os.eventfd(0)
    extra = os.eventfd(0)
    try:
        before = len(os.listdir("/proc/self/fd"))
        with scripted_server(path, [(0, None), (1, extra), (-1, memory), (0, host)]):
            setup = ivshmem.connect(str(path), timeout=2)
            disconnect(setup)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        for fd in (memory, host, extra):
            os.close(fd)


def test_agent_status_says_how_each_channel_is_woken_and_whether_ovs_is_reached(shm, sockets, tmp_path, capsys):
    from mbvisor.agents.agent import Agent, AgentSettings
    from mbvisor.agents.cli import main

    rung, refused = shm.region(), shm.region()
    path = sockets / "s.sock"
    status_file = tmp_path / "status.json"
    with running([(rung, str(path))]):
        vms = [belled(rung, str(path)), belled(refused, str(sockets / "none.sock"), "vm1")]
        agent = Agent(lambda: list(vms), FakeController(),
                      AgentSettings(status_file=status_file, doorbell_dirs=(str(sockets),)),
                      discovery_status=lambda: {"remote": "unix:/run/openvswitch/db.sock", "connected": False,
                                                "snapshots": 3})
        try:
            agent.round()
        finally:
            agent.shutdown()
    assert main(["agent-status", "--status-file", str(status_file)]) == 0
    out = capsys.readouterr().out
    assert "Open vSwitch at unix:/run/openvswitch/db.sock: NOT REACHED; the last view of the VMs stands" in out
    assert "channel vm0/tap-vm0: woken by its doorbell" in out
    assert f"channel vm1/tap-vm1: polled, its doorbell not used: doorbell {sockets}/none.sock: No such file" in out


# --- what the adversarial review found -------------------------------------------------------

@contextlib.contextmanager
def hostile_server(path, script):
    """A server that runs ``script(connection)`` for each client, in its own thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    listener.settimeout(0.05)
    done, connections = threading.Event(), []

    def accept():
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connections.append(connection)
            threading.Thread(target=_quietly, args=(script, connection), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        listener.close()
        for connection in connections:
            connection.close()


def _quietly(script, connection) -> None:
    try:
        script(connection)
    except OSError:
        pass


def eventfds() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}") and "eventfd" in _link(fd))


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def setup_then(region_fd: int, host_fd: int, then=lambda connection: connection.recv(1)):
    def script(connection):
        for number, fd in ((0, None), (1, None), (-1, region_fd), (0, host_fd)):
            ivshmem.send_message(connection, number, fd)
        then(connection)
    return script


def test_a_message_cut_short_leaks_nothing_and_loses_the_server(shm, sockets):
    region = shm.region()
    region_fd, host, extra = os.open(region, os.O_RDWR), os.eventfd(0), os.eventfd(0)
    cut = threading.Event()

    def one_byte_with_a_descriptor(connection):
        cut.wait(5)
        socket.send_fds(connection, [b"\x01"], [extra])  # never the other 7 bytes
        connection.recv(1)  # until the client (or the test's end) closes it

    path = sockets / "t.sock"
    try:
        with hostile_server(path, setup_then(region_fd, host, one_byte_with_a_descriptor)):
            bell = HostBell.connect(str(path))
            before = eventfds()
            cut.set()
            wait_until(lambda: readable(bell.connection.fileno(), 0), what="the cut message")
            assert bell.drain() is False  # out of step: the server is lost
            assert eventfds() == before
            bell.close()
    finally:
        for fd in (region_fd, host, extra):
            os.close(fd)


def test_connect_ends_at_its_deadline_whatever_the_server_dribbles(sockets):
    def dribble(connection):
        """A byte every 0.25 s, each within any per-read timeout, until the client gives up."""
        waiting = select.poll()
        waiting.register(connection, select.POLLIN)
        for byte in struct.pack("<q", 0):
            connection.sendall(bytes([byte]))
            if waiting.poll(250) and not connection.recv(1):  # the client closed: nothing more to dribble
                return

    path = sockets / "u.sock"
    with hostile_server(path, dribble):
        started = time.monotonic()
        with pytest.raises(DoorbellError, match="in time"):
            ivshmem.connect(str(path), timeout=0.3)
        assert time.monotonic() - started < 0.3 + 0.5  # one deadline for the whole setup, not one per read


@pytest.mark.parametrize("kind", ["regular file", "pipe"])
def test_a_server_whose_host_eventfd_is_no_eventfd_leaves_the_channel_polled(shm, sockets, kind):
    region = shm.region()
    region_fd = os.open(region, os.O_RDWR)
    read_end, write_end = os.pipe()
    host = region_fd if kind == "regular file" else write_end
    path = sockets / "w.sock"
    try:
        with hostile_server(path, setup_then(region_fd, host)):
            with serving([belled(region, str(path))], FakeController(), bell_sweep=0.2,
                         doorbell_dirs=(str(sockets),)) as agent:
                wait_until(lambda: state(agent, "doorbell_problem") is not None, what="the refusal")
                assert "not an eventfd" in state(agent, "doorbell_problem")
                writer = guest(region)
                assert writer.request(f"@A {MAC} I 4 s 10.0.0.1@".encode(), timeout=5).ok  # polled, served
                assert agent.channels["vm0/tap-vm0"].thread.is_alive()
                writer.region.close()
    finally:
        for fd in (region_fd, read_end, write_end):
            os.close(fd)


def test_a_server_flooding_notifications_cannot_hold_the_worker(shm, sockets):
    region = shm.region()
    region_fd, host = os.open(region, os.O_RDWR), os.eventfd(0, os.EFD_NONBLOCK)
    flood = threading.Event()

    def chatter(connection):
        flood.wait(10)
        chunk = struct.pack("<q", 2) * 8192  # "peer 2 left", over and over
        end = time.monotonic() + 10
        while time.monotonic() < end:
            connection.sendall(chunk)

    path = sockets / "x.sock"
    try:
        with hostile_server(path, setup_then(region_fd, host, chatter)):
            with serving([belled(region, str(path))], FakeController(), bell_sweep=3600,
                         doorbell_dirs=(str(sockets),)) as agent:
                wait_until(lambda: state(agent, "woken_by") == "doorbell", what="the doorbell attached")
                writer = guest(region)
                flood.set()
                ticket = writer.submit(f"@A {MAC} I 4 s 10.0.0.1@".encode())
                ivshmem.ring_eventfd(host)
                assert writer.wait(ticket, timeout=5).ok
                writer.region.close()
    finally:
        os.close(region_fd)
        os.close(host)


def test_stop_after_the_agent_ended_writes_nowhere(sockets):
    from mbvisor.agents.agent import Agent, AgentSettings

    agent = Agent(lambda: [], FakeController(), AgentSettings(discovery_interval=0.05))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    agent.stop.set()
    thread.join(10)
    assert not thread.is_alive()
    pipes = [os.pipe() for _ in range(4)]  # whatever reuses the wake-up's number
    try:
        agent.stop.set()  # a second SIGTERM: no error, nothing written
        for read_end, _ in pipes:
            assert not readable(read_end, 0)
    finally:
        for pair in pipes:
            for fd in pair:
                os.close(fd)


def test_serve_hears_a_ringing_guest_at_most_every_pause(shm, sockets):
    from mbvisor.guest.reader import SPURIOUS_RING_PAUSE

    region = shm.region()
    path = sockets / "y.sock"
    with running([(region, str(path))]):
        bell = HostBell.connect(str(path))
        reader = ChannelReader(open_file(region), "flooded")
        cleared = []
        clear = bell.clear
        bell.clear = lambda: cleared.append(1) or clear()
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(reader, lambda incoming: (ring.Status.OK, "ok"), stop),
                                  kwargs={"bell": bell, "sweep": 3600}, daemon=True)
        thread.start()
        flood = HostBell.connect(str(path))
        started, rings = time.monotonic(), 0
        while time.monotonic() - started < 0.5:
            ivshmem.ring_eventfd(flood.eventfd)
            rings += 1
        elapsed = time.monotonic() - started
        stop.set()
        ivshmem.ring_eventfd(flood.eventfd)
        thread.join(5)
        flood.close()
        bell.close()
        reader.region.close()
    assert rings > 1000 and len(cleared) <= elapsed / SPURIOUS_RING_PAUSE + 2


def test_an_agent_without_channels_sleeps_until_discovery_brings_one(shm):
    region = shm.region()
    vms = []
    looks, rounds = [], []
    with serving(vms, FakeController(), bell_sweep=0.05) as agent:
        poll_once, round_ = agent.poll_once, agent.round
        agent.poll_once = lambda sweep=True: looks.append(sweep) or poll_once(sweep)
        agent.round = lambda: rounds.append(1) or round_()
        wait_until(lambda: len(rounds) >= 10, what="ten discovery rounds")
        assert len(looks) <= 1  # asleep: nothing to look at, not even a sweep (ten rounds last ten sweeps)
        vms.append(vm(region))  # a VM appears: its channel is polled at once
        writer = guest(region)
        assert writer.request(f"@A {MAC} I 4 s 10.0.0.1@".encode(), timeout=5).ok
        writer.region.close()


def test_a_channel_opened_by_a_round_that_then_failed_is_still_served(shm):
    """The poller sleeps with no timeout when there is no channel: the round that opens one
    must wake it even when a later step of that round fails (the review's stall)."""
    good, bad = shm.region(), shm.region()
    vms = []
    rounds = []
    with serving(vms, FakeController(), bell_sweep=3600) as agent:
        real_open, round_ = agent._open, agent.round
        agent.round = lambda: rounds.append(1) or round_()

        def failing_open(channel_vm, problem=None):
            if channel_vm.vm_id == "vm1":
                raise RuntimeError("can't start new thread")
            return real_open(channel_vm, problem)

        agent._open = failing_open
        wait_until(lambda: len(rounds) >= 3, what="rounds with no channel")
        vms.extend([vm(good, "vm0", 5), vm(bad, "vm1", 6, "52:34:56:00:12:23")])
        wait_until(lambda: len(agent.channels) == 1, what="vm0 opened by a round that failed on vm1")
        writer = guest(good)
        assert writer.request(f"@X {MAC}@".encode(), timeout=5).ok
        writer.region.close()
