"""Running the real controller (``mbvisor controller`` or a manager) as a process: for
integration tests, benchmarks and the lab."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .netlab import die_with_parent, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ControllerError(RuntimeError):
    """The controller answered a command with something other than OK."""


class Controller:
    """``mbvisor controller`` in a subprocess on free ports, with a REST client."""

    def __init__(self, state_dir: Path, token: str = "test-token", launcher: str = "mbvisor",
                 environment: dict[str, str] | None = None, ofp_port: int | None = None,
                 rest_port: int | None = None, trust: str = "lab", apps: tuple[str, ...] = (),
                 arguments: tuple[str, ...] = (), tls_ca: Path | None = None):
        """``trust``: ``"lab"`` (default here) lets tests drive unannotated namespace hosts
        through REST; the trust model's own tests, the demo and the agent's end-to-end
        tests run the product default, ``"annotations"``.  ``apps``: other apps to run in
        the same process; ``arguments``: more for the launcher (``--next-table 10``,
        ``--wsapi-port 8080``); ``tls_ca``: the controller was given a certificate (in
        ``arguments``) that this CA signed: REST is spoken over HTTPS verified with it, and
        switches connect with ``ssl:``."""
        self.state_dir = state_dir
        self.extra_environment = {"MBVISOR_TRUST": trust, **(environment or {})}
        self.launcher = launcher
        self.apps, self.arguments = apps, arguments
        self.tls = None if tls_ca is None else ssl.create_default_context(cafile=str(tls_ca))
        self.token = token
        self.ofp_port = ofp_port or free_port()
        self.rest_port = rest_port or free_port()
        self.process: subprocess.Popen | None = None
        self.log = state_dir / "controller.log"

    @property
    def target(self) -> str:
        return f"{'ssl' if self.tls else 'tcp'}:127.0.0.1:{self.ofp_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.rest_port}"

    def _argv(self, token_file: Path) -> list[str]:
        """The same app three ways: ``mbvisor controller``, ``osken-manager``, ``ryu-manager``."""
        if self.launcher == "mbvisor":
            return [sys.executable, "-m", "mbvisor.agents.cli", "controller", "--ofp-port", str(self.ofp_port),
                    "--rest-port", str(self.rest_port), "--db", str(self.state_dir / "controller.sqlite"),
                    "--token-file", str(token_file), *self.arguments, *(f"--app={app}" for app in self.apps)]
        manager = Path(sys.executable).parent / self.launcher
        return [str(manager), "--ofp-tcp-listen-port", str(self.ofp_port), *self.arguments, "mbvisor.controller.app",
                *self.apps]

    def start(self) -> "Controller":
        token_file = self.state_dir / "token"
        token_file.write_text(self.token)
        environment = {**os.environ, "MBVISOR_DB": str(self.state_dir / "controller.sqlite"),
                       "MBVISOR_REST_PORT": str(self.rest_port), "MBVISOR_TOKEN": self.token,
                       **self.extra_environment}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self._argv(token_file), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=environment, preexec_fn=die_with_parent)
        wait_until(self._healthy, timeout=20, what=f"controller REST on port {self.rest_port} (log {self.log})")
        return self

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise ControllerError(f"controller exited with {self.process.returncode}:\n{self.log.read_text()}")
        try:
            return self.get("/v1/health")[0] == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def request(self, method: str, path: str, body: dict | None = None, token: str | None = "default",
                timeout: float = 30.0):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        request = urllib.request.Request(f"{self.url}{path}", data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.tls) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get(self, path: str):
        return self.request("GET", path)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30, context=self.tls) as response:
            return response.read().decode()

    def command(self, dpid: int, port: int, text: str, key: tuple | None = None, token: str | None = "default"):
        body = {"dpid": f"{dpid:016x}", "port": port, "command": text}
        if key:
            body.update(channel=key[0], epoch=key[1], seq=key[2])
        return self.request("POST", "/v1/commands", body, token=token)

    def batch(self, dpid: int, port: int, texts: list[str]) -> list[dict]:
        status, body = self.request("POST", "/v1/commands", {"commands": [
            {"dpid": f"{dpid:016x}", "port": port, "command": text} for text in texts]})
        if status != 200:
            raise ControllerError(f"batch of {len(texts)} commands: HTTP {status}: {body}")
        return body["answers"]

    def load(self, dpid: int, port: int, texts: list[str]) -> list[dict]:
        """``batch`` asking for failures only (what a bulk loader reads): the answers not
        OK, each with its ``index`` in ``texts``."""
        status, body = self.request("POST", "/v1/commands", {"answers": "failures", "commands": [
            {"dpid": f"{dpid:016x}", "port": port, "command": text} for text in texts]})
        if status != 200 or body["count"] != len(texts) or body["ok"] + len(body["failures"]) != len(texts):
            raise ControllerError(f"load of {len(texts)} commands: HTTP {status}: {str(body)[:500]}")
        return body["failures"]

    def ok(self, dpid: int, port: int, text: str, key: tuple | None = None) -> dict:
        status, answer = self.command(dpid, port, text, key)
        if status != 200 or answer["status"] != "OK":
            raise ControllerError(f"{text!r}: HTTP {status}: {answer}")
        return answer

    def wait_switch(self, dpid: int, timeout: float = 20.0) -> None:
        def connected():
            switches = self.get("/v1/switches")[1]["switches"]
            return any(s["dpid"] == f"{dpid:016x}" and s["synced"] for s in switches)

        wait_until(connected, timeout=timeout, what=f"switch {dpid:016x} connected and reconciled")

    def reconciliations(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if " reconciled " in line]

