"""The agent's side of the controller's REST API (docs/rest.md)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


class ControllerUnavailable(Exception):
    """Not reachable, restarting, or the switch is not connected: try again later."""


@dataclass(frozen=True)
class ControllerClient:
    url: str = "http://127.0.0.1:8181"
    token: str | None = None
    timeout: float = 30.0

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url.rstrip("/") + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            payload = error.read()
            if error.code >= 500:
                raise ControllerUnavailable(f"controller answered HTTP {error.code}") from None
            try:
                return error.code, json.loads(payload or b"{}")
            except ValueError:
                raise ControllerUnavailable(f"controller answered HTTP {error.code} without JSON") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise ControllerUnavailable(f"controller at {self.url} unreachable: {error}") from None

    def execute(self, commands: list[dict]) -> list[dict]:
        """Post commands (dicts with dpid, port, command, channel, epoch, seq); their answers.
        Raises ControllerUnavailable if any answer says the switch is not connected."""
        status, body = self._call("POST", "/v1/commands", {"commands": commands})
        if status == 401:
            raise PermissionError("the controller refused the agent's token")
        if status != 200 or "answers" not in body:
            raise ControllerUnavailable(f"controller answered HTTP {status}: {body}")
        if any(answer["status"] == "UNAVAILABLE" for answer in body["answers"]):
            raise ControllerUnavailable(next(a["text"] for a in body["answers"] if a["status"] == "UNAVAILABLE"))
        return body["answers"]

    def delete_middlebox(self, dpid: int, mac: str) -> bool:
        """Remove a middlebox's offloads; False if the controller had none."""
        status, body = self._call("DELETE", f"/v1/middleboxes/{dpid:016x}/{mac}")
        if status == 401:
            raise PermissionError("the controller refused the agent's token")
        return status == 200

    def middleboxes(self) -> list[dict]:
        return self._call("GET", "/v1/middleboxes")[1].get("middleboxes", [])
