"""``mbctl`` against a real region served by the real reader: answers and exit codes."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import threading

import pytest

from mbvisor.agents.echo import answer_frame
from mbvisor.guest import mbctl, ring
from mbvisor.guest.reader import ChannelReader, serve
from mbvisor.guest.region import open_file

MAC = "52:34:56:00:12:22"


@pytest.fixture
def served(make_channel):
    """A formatted region answered by the echo responder in a thread; yields its path."""
    writer = make_channel()
    stop = threading.Event()
    reader = ChannelReader(open_file(writer.region.path))
    thread = threading.Thread(target=serve, args=(reader, answer_frame, stop), daemon=True)
    thread.start()
    yield writer.region.path
    stop.set()
    thread.join(timeout=5)
    reader.region.close()


def run(capsys, *arguments) -> tuple[int, str, str]:
    code = mbctl.main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("arguments, command", [
    (["register", "firewall", "--mac", MAC, "--ip", "10.0.0.5"], f"R F {MAC} 10.0.0.5"),
    (["redirect", "--mac", MAC, "--ip", "10.0.0.5", "--to", "10.0.0.9"], f"R L {MAC} 10.0.0.5 0 * 10.0.0.9"),
    (["redirect", "--mac", MAC, "--ip", "10.0.0.5", "--to", "10.0.0.9,10.0.0.8", "--from", "10.1.0.7"],
     f"R L {MAC} 10.0.0.5 1 10.1.0.7 10.0.0.9,10.0.0.8"),
    (["filter", "add", "--mac", MAC, "--layer", "ip", "--src", "10.0.0.0/8", "--proto", "udp"],
     f"A {MAC} I 5 s 10.0.0.0/8 p 17"),
    (["filter", "del", "--mac", MAC, "--layer", "mac", "--src", "52:34:56:00:66:66"],
     f"D {MAC} M 4 s 52:34:56:00:66:66"),
    (["filter", "del", "--mac", MAC, "--layer", "transport", "--fields", "dst,proto"], f"D {MAC} T 9 d p"),
    (["show", "mac", "--mac", MAC], f"M {MAC}"),
    (["show", "ip", "--mac", MAC, "--skip", "200"], f"I {MAC} 200"),
    (["cancel", "--mac", MAC], f"X {MAC}"),
    (["cancel", "--redirect", "--mac", MAC], f"X {MAC} L *"),
    (["cancel", "--mac", MAC, "--redirect", "10.1.0.0/16"], f"X {MAC} L 10.1.0.0/16"),
    (["-w", f"@X {MAC}@"], f"X {MAC}"),
])
def test_sub_commands_send_the_grammar_and_print_the_answer(served, capsys, arguments, command):
    code, out, err = run(capsys, "--shm", served, *arguments)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == ("0 filter(s)" if command[0] in "IMT" else command)  # the echo keeps no filters


def test_json_answer(served, capsys):
    code, out, _ = run(capsys, "--shm", served, "--json", "-w", f"@R F {MAC} 10.0.0.5@@T {MAC}@")
    answer = json.loads(out)
    assert code == 0 and answer["status"] == "OK" and answer["seq"] == 0
    assert answer["answers"] == [
        {"status": "OK", "code": "ok", "text": f"R F {MAC} 10.0.0.5"},
        {"status": "OK", "code": "ok", "text": "0 filter(s)"}]
    assert answer["text"].splitlines() == [f"OK ok R F {MAC} 10.0.0.5", "OK ok 0 filter(s)"]


def test_show_sends_its_skip_and_a_bad_skip_is_refused_locally(served, capsys):
    assert mbctl.command_text(mbctl.build_parser().parse_args(["show", "ip", "--mac", MAC, "--skip", "3"])) \
        == f"I {MAC} 3"
    code, out, err = run(capsys, "--shm", served, "show", "ip", "--mac", MAC, "--skip", "-1")
    assert (code, out) == (mbctl.EXIT_INVALID_COMMAND, "")
    assert "'-1' is not a skip count" in err
    with open_file(served) as region:
        assert ring.read_header(region.buf).publish == 0  # nothing was sent


def test_invalid_command_is_refused_locally_and_not_sent(served, capsys):
    code, out, err = run(capsys, "--shm", served, "-w", f"@A {MAC} q 4 s 10.0.0.1@")
    assert code == mbctl.EXIT_INVALID_COMMAND
    assert "column 22: 'q' is not a filter layer; expected I, M or T" in err
    assert ring.describe(open_file(served).buf, 1 << 20)["published"] == 0


def test_host_error_answer_exits_one(served, capsys):
    code, out, err = run(capsys, "--shm", served, "--raw", "-w", f"@A {MAC} I 4 d 10.0.0.1@")
    assert code == mbctl.EXIT_HOST_ERROR
    assert err.startswith("mbctl: SYNTAX syntax: column") and "mask 4 means" in err


def test_no_answer_is_a_timeout_and_stays_pending(make_channel, capsys):
    path = make_channel().region.path
    code, _, err = run(capsys, "--shm", path, "--timeout", "0.05", "cancel", "--mac", MAC)
    assert code == mbctl.EXIT_TIMEOUT and "stays pending" in err
    code, out, _ = run(capsys, "--shm", path, "--json", "-r")
    assert json.loads(out)["pending"] == 1


def test_read_json_has_every_field_the_readme_lists(make_channel, region_path, capsys):
    writer = make_channel()
    ticket = writer.submit(b"@X 52:34:56:00:12:22@")
    reader = ChannelReader(open_file(writer.region.path))
    assert reader.poll() is not None and reader.answer(ticket.seq, ring.Status.OK, "cancelled")
    code, out, _ = run(capsys, "--shm", writer.region.path, "--json", "-r")
    state = json.loads(out)
    assert code == mbctl.EXIT_OK
    assert set(state) == {"region", "state", "epoch", "slots", "published", "answered", "pending", "host_attached",
                          "last_answers"}
    assert (state["state"], state["published"], state["answered"], state["pending"], state["host_attached"]) == (
        "ready", 1, 1, 0, True)
    assert state["last_answers"] == [{"seq": 0, "status": "OK", "text": "cancelled"}]
    reader.region.close()
    with open(region_path, "r+b") as blank:  # a region nobody initialised: state and detail
        blank.write(bytes(4096))
    code, out, _ = run(capsys, "--shm", region_path, "--json", "-r")
    assert set(json.loads(out)) == {"region", "state", "detail"} and json.loads(out)["state"] == "blank"


def test_full_ring_exit_code(make_channel, capsys):
    writer = make_channel(ring.Geometry(4, 128, 128))
    for _ in range(4):
        writer.submit(b"@X 52:34:56:00:12:22@")
    code, _, err = run(capsys, "--shm", writer.region.path, "--timeout", "0.05", "cancel", "--mac", MAC)
    assert code == mbctl.EXIT_RING_FULL and "ring full" in err


def test_the_timeout_bounds_the_wait_for_the_lock_and_nothing_is_sent_after_it(make_channel):
    """Another writer holds the channel's lock (stuck while publishing): ``mbctl --timeout``
    gives up at its deadline, says nothing was sent, and the ring shows nothing published."""
    writer = make_channel(ring.Geometry(4, 128, 128))
    holder = open_file(writer.region.path)
    fcntl.flock(holder.fd, fcntl.LOCK_EX)
    try:
        done = subprocess.run([sys.executable, "-m", "mbvisor.guest.mbctl", "--shm", writer.region.path,
                               "--timeout", "0.2", "cancel", "--mac", MAC],
                              capture_output=True, text=True, timeout=30)
    finally:
        fcntl.flock(holder.fd, fcntl.LOCK_UN)
        holder.close()
    assert done.returncode == mbctl.EXIT_RING_FULL, done.stderr
    assert "lock" in done.stderr and "nothing was sent" in done.stderr
    assert ring.read_header(writer.region.buf).publish == 0


def test_missing_region_and_missing_device(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "--shm", str(tmp_path / "nothing"), "cancel", "--mac", MAC)
    assert code == mbctl.EXIT_CHANNEL and "does not exist" in err
    monkeypatch.setattr("mbvisor.guest.region.PCI_DEVICES", tmp_path)
    code, _, err = run(capsys, "cancel", "--mac", MAC)
    assert code == mbctl.EXIT_CHANNEL and "no ivshmem device (PCI 1af4:1110)" in err


def test_usage_errors(capsys):
    assert run(capsys)[0] == mbctl.EXIT_USAGE
    with pytest.raises(SystemExit) as raised:
        mbctl.main(["filter", "add", "--layer", "dns"])
    assert raised.value.code == mbctl.EXIT_USAGE


def test_default_mac_is_the_only_nic(tmp_path, monkeypatch):
    monkeypatch.delenv("MBCTL_MAC", raising=False)
    for name, address in (("lo", "00:00:00:00:00:00"), ("eth0", "52:34:56:00:12:22")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(address + "\n")
    assert mbctl.default_mac(tmp_path) == "52:34:56:00:12:22"
    (tmp_path / "eth1").mkdir()
    (tmp_path / "eth1" / "address").write_text("52:34:56:00:12:23\n")
    assert mbctl.default_mac(tmp_path) is None
    monkeypatch.setenv("MBCTL_MAC", "52:34:56:00:00:01")
    assert mbctl.default_mac(tmp_path) == "52:34:56:00:00:01"


def test_command_longer_than_a_slot_is_refused_before_sending(served, capsys):
    code, _, err = run(capsys, "--shm", served, "--raw", "-w", "x" * 4080)
    assert code == mbctl.EXIT_INVALID_COMMAND and "does not fit this ring's 4064-byte slots" in err
    frame = "".join(f"@A {MAC} T 8 d {port}@" for port in range(1, 300))
    code, _, err = run(capsys, "--shm", served, "-w", frame)
    assert code == mbctl.EXIT_INVALID_COMMAND and "at most 4096 bytes" in err
    assert ring.describe(open_file(served).buf, 1 << 20)["published"] == 0


@pytest.mark.parametrize("order", ["before", "after", "both"])
def test_global_options_may_come_before_or_after_the_command(served, capsys, order):
    command = ["filter", "add", "--mac", MAC, "--layer", "ip", "--src", "10.0.0.0/8"]
    options = ["--shm", served, "--timeout", "5", "--json"]
    arguments = {"before": options + command, "after": command + options,
                 "both": ["--shm", "/no/such/region", "--timeout", "0.01"] + command + options}[order]
    code, out, _ = run(capsys, *arguments)
    assert code == mbctl.EXIT_OK  # "both": the values after the command win
    assert json.loads(out)["answers"][0]["text"] == f"A {MAC} I 4 s 10.0.0.0/8"


def test_every_filter_option_says_what_it_means_per_layer_and_its_default(capsys):
    with pytest.raises(SystemExit):
        mbctl.main(["filter", "add", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mac: VLAN PCP 0-7" in text and "mac: EtherType" in text and "DSCP 0-63" in text
    assert text.count("(default: any)") == 4 and "(default 5)" in text and "--shm PATH" in text


def test_device_and_shm_given_on_either_side_of_the_command_are_refused(served, capsys):
    code, _, err = run(capsys, "--shm", served, "status", "--device", "00:04.0")
    assert code == mbctl.EXIT_USAGE and "--device and --shm name two channels" in err


def test_init_answers_json_when_asked(make_channel, capsys):
    path = make_channel().region.path
    code, out, _ = run(capsys, "init", "--shm", path, "--json")
    assert code == mbctl.EXIT_OK and json.loads(out)["epoch"].startswith("0x")


def test_options_are_never_abbreviated(capsys):
    """--t could be --timeout or --tos, --s --shm or --src: no option is taken by a prefix."""
    with pytest.raises(SystemExit) as ended:
        mbctl.main(["filter", "add", "--mac", MAC, "--layer", "ip", "--t", "5"])
    assert ended.value.code == mbctl.EXIT_USAGE and "unrecognized arguments: --t" in capsys.readouterr().err


class StaticList:
    """A followed list that never changes (its watch has no descriptor and is never polled)."""

    description = "static list"

    def __init__(self, networks):
        self.networks = networks
        self.closed = False

    def verdict(self):
        from mbvisor.guest.follow.source import SOURCE, Verdict
        return Verdict(frozenset({SOURCE}))

    def snapshot(self):
        return dict.fromkeys(self.networks)

    def watch(self):
        return self

    poll_interval = None

    def fileno(self):
        return None

    def changes(self):
        return []

    def close(self):
        self.closed = True


def test_follow_once_syncs_through_the_channel_and_says_what_it_followed(served, capsys, monkeypatch, tmp_path):
    followed = StaticList(["10.0.0.0/24", "10.0.1.0/24"])
    monkeypatch.setattr(mbctl, "follow_sources", lambda args: [followed])
    code, out, err = run(capsys, "--shm", served, "follow", "ipset", "--set", "blocklist", "--mac", MAC, "--once",
                         "--lock-dir", str(tmp_path))
    assert code == mbctl.EXIT_OK and out == "" and followed.closed
    assert f"following static list (source) for {MAC}: 2 element(s); sent 2 add(s) and 0 delete(s)" in err


def test_follow_refuses_json_a_bad_resync_and_an_unusable_lock_directory(served, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(mbctl, "follow_sources", lambda args: [StaticList([])])
    code, _, err = run(capsys, "--shm", served, "--json", "follow", "nft", "--set", "inet", "filter", "x", "--mac", MAC)
    assert code == mbctl.EXIT_USAGE and "--json is not for it" in err
    code, _, err = run(capsys, "--shm", served, "follow", "ipset", "--set", "x", "--mac", MAC, "--resync-every", "0")
    assert code == mbctl.EXIT_USAGE and "--resync-every must be" in err
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, "--shm", served, "follow", "ipset", "--set", "x", "--mac", MAC, "--once",
                       "--lock-dir", str(tmp_path / "file"))
    assert code == mbctl.EXIT_NOT_FOLLOWED and "cannot take the follower's lock" in err
    with open_file(served) as region:
        assert ring.read_header(region.buf).publish == 0  # nothing was sent

