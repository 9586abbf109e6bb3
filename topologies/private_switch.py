"""A private Open vSwitch: an ovsdb-server and an ovs-vswitchd of our own, started fresh, for
measurements the machine's shared switch cannot give.  The one that needs it: how much
memory ovs-vswitchd takes for N flows.  A long-running vswitchd never returns freed memory
to the system (the allocator keeps it), so once anyone has had 100k flows in the shared
switch, its resident size says nothing more; a fresh one does.

Its datapaths are OVS's "dummy" ones (``--enable-dummy=override``, as in OVS's own test
suite): no kernel devices, no tap named ``ovs-netdev`` clashing with the shared switch's,
and OpenFlow tables, bundles and the classifier exactly as in the real thing.  It forwards
no real packets, so it serves control-plane measurements only.

While the context is open, ``OVS_RUNDIR``/``OVS_DBDIR`` point at its directory, so every
``ovs-vsctl``/``ovs-ofctl``/``ovs-appctl`` this process runs (netlab included) talks to it
(and its pid file is ``$OVS_RUNDIR/ovs-vswitchd.pid``, as for the system's);
they are restored at exit, when both daemons are stopped and the directory removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .netlab import Bridge, accepting, run, start_daemon, stop_daemon, wait_until

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
_VARIABLES = ("OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR")


class PrivateSwitch:
    """``with PrivateSwitch() as switch:`` ... ``switch.vswitchd_pid`` ...: a
    :class:`DummySwitch` in a directory of its own, with this process's ``OVS_RUNDIR``,
    ``OVS_DBDIR`` and ``OVS_LOGDIR`` pointing at it while the context is open."""

    def __init__(self):
        self.directory: Path | None = None
        self.switch: DummySwitch | None = None
        self._saved: dict[str, str | None] = {}

    @property
    def vswitchd_pid(self) -> int:
        return self.switch.vswitchd_pid

    def __enter__(self) -> "PrivateSwitch":
        self.directory = Path(tempfile.mkdtemp(prefix="mbvisor-ovs-"))
        try:
            self.switch = DummySwitch(self.directory).start()
            for name in _VARIABLES:
                self._saved[name] = os.environ.get(name)
                os.environ[name] = str(self.directory)
            run(["ovs-vsctl", "--timeout=10", "show"])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def crash_and_restart_vswitchd(self) -> None:
        self.switch.crash_and_restart_vswitchd()

    def crash_and_restart_ovsdb(self) -> None:
        self.switch.crash_and_restart_ovsdb()

    def __exit__(self, *exc) -> None:
        if self.switch is not None:
            self.switch.stop()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class DummySwitch:
    """One of several private switches open at once in one process (a data centre's
    hypervisors, ``bench/datacentre.py``): the same private ovsdb-server and ovs-vswitchd
    with OVS's dummy datapaths as :class:`PrivateSwitch`, in ``directory`` (made by the
    caller, removed by it), but the process's environment is never changed: its commands
    name it explicitly (``ovs-vsctl --db=unix:<directory>/db.sock``, ``ovs-ofctl ...
    unix:<directory>/<bridge>.mgmt``; :meth:`bridge` returns a :class:`~netlab.Bridge`
    that does so), and only its own daemons get ``OVS_RUNDIR=<directory>``.

        switch = DummySwitch(path).start()
        try:
            bridge = switch.bridge(lab, "mbx1a2bb0", dpid)
            ...
            switch.crash_and_restart_vswitchd()
        finally:
            switch.stop()
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._ovsdb: subprocess.Popen | None = None
        self._vswitchd: subprocess.Popen | None = None

    @property
    def db(self) -> str:
        return f"unix:{self.directory / 'db.sock'}"

    @property
    def vswitchd_pid(self) -> int | None:
        return self._vswitchd.pid if self._vswitchd is not None and self._vswitchd.poll() is None else None

    def pids(self) -> list[int]:
        """Its daemons still running."""
        return [p.pid for p in (self._ovsdb, self._vswitchd) if p is not None and p.poll() is None]

    def vsctl(self, *args: str) -> str:
        return run(["ovs-vsctl", f"--db={self.db}", "--timeout=10", *args]).stdout.strip()

    def start(self) -> "DummySwitch":
        """Both daemons, on a new database; stopped again if either does not come up."""
        d = self.directory
        try:
            run(["ovsdb-tool", "create", d / "conf.db", SCHEMA])
            self._start_ovsdb()
            self.vsctl("--no-wait", "init")
            self.start_vswitchd()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_ovsdb(self) -> None:
        d = self.directory
        self._ovsdb = self._spawn(["ovsdb-server", d / "conf.db", f"--remote=punix:{d / 'db.sock'}",
                                   f"--unixctl={d / 'ovsdb-server.ctl'}", f"--log-file={d / 'ovsdb-server.log'}"],
                                  d / "db.sock")

    def crash_and_restart_ovsdb(self) -> None:
        """SIGKILL ovsdb-server and start a new one on the same database file: its clients
        (ovs-vswitchd, the agent's replica) lose their connection and must reconnect."""
        self._ovsdb.kill()
        self._ovsdb.wait(10)
        for stale in ("db.sock", "ovsdb-server.ctl"):
            (self.directory / stale).unlink(missing_ok=True)
        self._start_ovsdb()

    def start_vswitchd(self) -> None:
        """ovs-vswitchd on the switch's database: its bridges come from it, flows do not."""
        d = self.directory
        self._vswitchd = self._spawn(["ovs-vswitchd", self.db, "--enable-dummy=override", "--disable-system",
                                      f"--pidfile={d / 'ovs-vswitchd.pid'}", f"--unixctl={d / 'ovs-vswitchd.ctl'}",
                                      f"--log-file={d / 'ovs-vswitchd.log'}"], d / "ovs-vswitchd.ctl")

    def kill_vswitchd(self) -> None:
        """SIGKILL ovs-vswitchd: what a crash does."""
        if self._vswitchd is not None:
            self._vswitchd.kill()
            self._vswitchd.wait(10)
        (self.directory / "ovs-vswitchd.ctl").unlink(missing_ok=True)

    def crash_and_restart_vswitchd(self) -> None:
        """A crash and its supervisor (as :meth:`PrivateSwitch.crash_and_restart_vswitchd`)."""
        self.kill_vswitchd()
        self.start_vswitchd()

    def bridge(self, lab, name: str, dpid: int, controller: str | None = None):
        """A bridge ``name`` with datapath id ``dpid`` (``fail-mode=secure``, OpenFlow 1.3,
        no in-band flows), pointed at ``controller`` if given: a :class:`~netlab.Bridge`
        whose commands name this switch.  It goes with the switch's database."""
        bridge = Bridge(lab, name, dpid, "OpenFlow13", owned=False, db=self.db,
                        ofctl_target=f"unix:{self.directory / name}.mgmt")
        bridge.vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev", "fail_mode=secure",
                     "protocols=OpenFlow13", f"other-config:datapath-id={dpid:016x}",
                     "other-config:disable-in-band=true")
        wait_until(lambda: bridge.read_dpid() == dpid and accepting(self.directory / f"{name}.mgmt"), 10,
                   f"{name} to take its datapath id")
        if controller:
            bridge.set_controller(controller)
        return bridge

    def _spawn(self, argv: list, ready: Path) -> subprocess.Popen:
        """One of its daemons, with this switch's directory as its OVS_RUNDIR."""
        return start_daemon(Path(str(argv[0])).name, argv, self.directory, ready,
                            {variable: str(self.directory) for variable in _VARIABLES})

    def stop(self) -> None:
        """Both daemons (ovs-vswitchd first); idempotent.  The directory stays (the caller's)."""
        try:
            stop_daemon(self._vswitchd)
        finally:
            stop_daemon(self._ovsdb)
