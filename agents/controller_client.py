"""The agent's side of the controller's REST API (docs/rest.md).

Every failure is one of two kinds, because the agent must decide whether waiting can help:

* ``ControllerUnavailable`` (transient): no connection, reset, time-out, HTTP 502/503/504
  (starting, overloaded, or a proxy saying so), or an answer with status UNAVAILABLE (the
  switch is not connected).  The same request, with the same idempotency keys, may
  succeed later.
* ``ControllerFailed`` (permanent for this request): HTTP 400 (malformed), 401 (token),
  409 (idempotency key reused for another command), 500 (internal), or a reply the agent
  cannot read.  Sending the same request again cannot help, so it is answered at once.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field

from mbvisor.guest.ring import Status

TRANSIENT_HTTP = frozenset({502, 503, 504})


class ControllerUnavailable(Exception):
    """Not reachable, starting, overloaded, or the switch is not connected: try again later."""


class ControllerFailed(Exception):
    """The controller answered and will not apply this request; ``status`` is what the
    guest is told (INTERNAL, or REJECTED for a reused idempotency key)."""

    def __init__(self, message: str, status: Status = Status.INTERNAL):
        super().__init__(message)
        self.status = status


def _error_text(status: int, body: dict) -> str:
    """``{"error": {"code", "message"}}`` (or ``{"error": "text"}``) in one line, whatever
    part of it is there."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"HTTP {status} {error.get('code', '')}: {error.get('message', '')}".strip()
    if isinstance(error, str):
        return f"HTTP {status}: {error[:300]}"
    return f"HTTP {status}"


def refusal(status: int, body: dict) -> ControllerFailed:
    """The permanent failure an HTTP status other than 200 stands for."""
    if status == 401:
        return ControllerFailed("the controller refused the agent's token (check --token-file)")
    if status == 409:
        return ControllerFailed(f"controller refused the idempotency key: {_error_text(status, body)}",
                                Status.REJECTED)
    return ControllerFailed(f"controller answered {_error_text(status, body)}")


def checked_answers(body: dict, count: int) -> list[dict]:
    """The ``answers`` of a 200 reply, one ``{"status", "text", ...}`` per command sent."""
    answers = body.get("answers") if isinstance(body, dict) else None
    if (not isinstance(answers, list) or len(answers) != count
            or not all(isinstance(a, dict) and isinstance(a.get("status"), str) and isinstance(a.get("text"), str)
                       for a in answers)):
        raise ControllerFailed(f"controller's reply is not {count} answer(s) the agent understands")
    unavailable = [a["text"] for a in answers if a["status"] == "UNAVAILABLE"]
    if unavailable:
        raise ControllerUnavailable(unavailable[0])
    return answers


# A kept connection the controller closed while it was idle fails like this on its next
# use: the request goes again once, on a new connection.  The same failure also comes from
# a controller that read the request and died before answering; sending it again is safe
# then too: commands carry idempotency keys (a replay gets the first answer), PUT of an
# inventory is idempotent, and a DELETE applied the first time answers 404, which a
# removal takes as done.
_CLOSED_WHILE_IDLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass(frozen=True)
class ControllerClient:
    """Each thread keeps its own connection to the controller (HTTP/1.1 keep-alive): a
    command's round trip then costs no TCP handshake and no urllib machinery, which was
    about half of what the agent added to a command (docs/agent.md, measured)."""

    url: str = "http://127.0.0.1:8181"
    token: str | None = None
    timeout: float = 30.0
    ca_file: str | None = None  # verifies an https:// controller (None: the system's CAs)
    _kept: threading.local = field(default_factory=threading.local, compare=False, repr=False)

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._kept, "connection", None)
        if connection is None:
            parts = urllib.parse.urlsplit(self.url)
            host = parts.hostname or "127.0.0.1"
            if parts.scheme == "https":
                try:
                    context = ssl.create_default_context(cafile=self.ca_file)  # the name and the chain are checked
                except (OSError, ssl.SSLError) as error:
                    raise ControllerUnavailable(f"cannot use the controller's CA {self.ca_file}: {error}") from None
                connection = http.client.HTTPSConnection(host, parts.port, timeout=self.timeout, context=context)
            else:
                connection = http.client.HTTPConnection(host, parts.port, timeout=self.timeout)
            self._kept.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._kept, "connection", None)
        if connection is not None:
            connection.close()
            self._kept.connection = None

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(HTTP status, JSON body) of any answer; raises ControllerUnavailable when there
        is none worth reading (no connection, time-out, 502/503/504).  Every request is
        safe to send twice (see _CLOSED_WHILE_IDLE), which the one retry relies on."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        target = urllib.parse.urlsplit(self.url).path.rstrip("/") + path
        attempt = 0
        while True:
            attempt += 1
            connection = self._connection()
            kept = connection.sock is not None
            try:
                connection.request(method, target, data, headers)
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as error:
                self._drop_connection()
                if attempt == 1 and kept and isinstance(error, _CLOSED_WHILE_IDLE):
                    continue
                raise ControllerUnavailable(f"controller at {self.url} unreachable: {error}") from None
            if response.will_close:
                self._drop_connection()
            if response.status in TRANSIENT_HTTP:
                raise ControllerUnavailable(f"controller answered HTTP {response.status}")
            return response.status, self._json(response.status, payload)

    @staticmethod
    def _json(status: int, payload: bytes) -> dict:
        try:
            return json.loads(payload or b"{}")
        except ValueError:
            raise ControllerFailed(f"controller answered HTTP {status} without JSON") from None

    def execute(self, commands: list[dict]) -> list[dict]:
        """Post commands (dicts with dpid, port, command, channel, epoch, seq); one answer
        each.  Raises ControllerUnavailable or ControllerFailed (see the module)."""
        status, body = self._call("POST", "/v1/commands", {"commands": commands})
        if status != 200:
            raise refusal(status, body)
        return checked_answers(body, len(commands))

    def put_ports(self, dpid: int, ports: list[dict], underlay: list[dict] = ()) -> dict:
        """Replace the switch's inventory of annotated ports and underlay ports (``PUT
        /v1/switches/{dpid}/ports``); the controller's answer, ``{"dpid", "ports":
        [accepted], "underlay": [accepted], "refused": [{"port", "interface", "reason"}]}``.
        Raises ControllerUnavailable or ControllerFailed."""
        status, body = self._call("PUT", f"/v1/switches/{dpid:016x}/ports",
                                  {"ports": ports, **({"underlay": list(underlay)} if underlay else {})})
        if status != 200:
            raise refusal(status, body)
        if not (isinstance(body, dict) and isinstance(body.get("ports"), list) and isinstance(body.get("refused"), list)
                and all(isinstance(r, dict) for r in body["refused"])):
            raise ControllerFailed("controller's reply to the port inventory is not the {ports, refused} it should be")
        return body

    def delete_middlebox(self, dpid: int, mac: str) -> bool:
        """Remove a middlebox's offloads; False if the controller had none (404)."""
        status, body = self._call("DELETE", f"/v1/middleboxes/{dpid:016x}/{mac}")
        if status not in (200, 404):
            raise refusal(status, body)
        return status == 200
