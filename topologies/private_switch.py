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

from .netlab import accepting, die_with_parent, run, wait_until

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
_VARIABLES = ("OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR")


class PrivateSwitch:
    """``with PrivateSwitch() as switch:`` ... ``switch.vswitchd_pid`` ..."""

    def __init__(self):
        self.directory: Path | None = None
        self._processes: list[subprocess.Popen] = []
        self._saved: dict[str, str | None] = {}

    @property
    def vswitchd_pid(self) -> int:
        return self._processes[-1].pid

    def __enter__(self) -> "PrivateSwitch":
        self.directory = Path(tempfile.mkdtemp(prefix="mbvisor-ovs-"))
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        d = self.directory
        run(["ovsdb-tool", "create", d / "conf.db", SCHEMA])
        self._start_ovsdb()
        for name in _VARIABLES:
            self._saved[name] = os.environ.get(name)
            os.environ[name] = str(d)
        run(["ovs-vsctl", "--no-wait", "init"])
        self._start_vswitchd()
        run(["ovs-vsctl", "--timeout=10", "show"])

    def _start_vswitchd(self) -> None:
        d = self.directory
        self._spawn(["ovs-vswitchd", f"unix:{d / 'db.sock'}", "--enable-dummy=override", "--disable-system",
                     f"--pidfile={d / 'ovs-vswitchd.pid'}",
                     f"--unixctl={d / 'ovs-vswitchd.ctl'}", f"--log-file={d / 'ovs-vswitchd.log'}"],
                    d / "ovs-vswitchd.ctl")

    def crash_and_restart_vswitchd(self) -> None:
        """SIGKILL ovs-vswitchd and start a new one on the same database: what a crash and
        its supervisor do.  Its bridges come back from the database, its flows do not."""
        vswitchd = self._processes.pop()
        vswitchd.kill()
        vswitchd.wait(10)
        (self.directory / "ovs-vswitchd.ctl").unlink(missing_ok=True)
        self._start_vswitchd()

    def crash_and_restart_ovsdb(self) -> None:
        """SIGKILL ovsdb-server and start a new one on the same database file: its clients
        (ovs-vswitchd, the agent's replica) lose their connection and must reconnect."""
        server = self._processes.pop(0)
        server.kill()
        server.wait(10)
        d = self.directory
        for stale in ("db.sock", "ovsdb-server.ctl"):
            (d / stale).unlink(missing_ok=True)
        self._start_ovsdb()
        self._processes.insert(0, self._processes.pop())  # the vswitchd stays the last

    def _start_ovsdb(self) -> None:
        d = self.directory
        self._spawn(["ovsdb-server", d / "conf.db", f"--remote=punix:{d / 'db.sock'}",
                     f"--unixctl={d / 'ovsdb-server.ctl'}", f"--log-file={d / 'ovsdb-server.log'}"],
                    d / "db.sock")

    def _spawn(self, argv: list, ready: Path) -> None:
        """A daemon in the foreground (it dies with us), ready once its socket accepts
        connections (the file exists a moment before: a client would be refused)."""
        log = open(self.directory / f"{Path(str(argv[0])).name}.out", "wb")
        with log:
            process = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self._processes.append(process)
        wait_until(lambda: accepting(ready) or process.poll() is not None, timeout=10, what=f"{argv[0]} to start")
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {process.returncode}: "
                               f"{(self.directory / f'{Path(str(argv[0])).name}.out').read_text()[-500:]}")

    def __exit__(self, *exc) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        self._processes.clear()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
