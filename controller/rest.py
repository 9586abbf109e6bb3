"""Versioned JSON API (``/v1``) and Prometheus metrics, served inside the controller.

Reads are open; writes (commands from agents, the operator's delete) need the bearer
token when one is configured.  Errors are JSON ``{"error": {"code", "message"}}`` with a
stable code.  Documented in docs/rest.md.
"""

from __future__ import annotations

import json
import logging

from routes import Mapper
from webob import Request, Response
from webob.exc import HTTPException

from .compat import hub
from .flows import cookie_of
from .service import CommandRequest
from .store import encode_middlebox

log = logging.getLogger("mbvisor.rest")
HTTP_STATUS = {"OK": 200, "SYNTAX": 400, "REJECTED": 409, "REFUSED": 403, "UNAVAILABLE": 503}


def _json(body, status: int = 200) -> Response:
    return Response(json.dumps(body, indent=1) + "\n", status=status, content_type="application/json",
                    charset="utf-8")


def _error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"code": code, "message": message}}, status)


class RestApi:
    def __init__(self, core, settings):
        self.core = core
        self.token = settings.token
        self.routes = Mapper()
        self.routes.connect("/v1/health", action="health", conditions={"method": ["GET"]})
        self.routes.connect("/v1/middleboxes", action="middleboxes", conditions={"method": ["GET"]})
        self.routes.connect("/v1/middleboxes/{dpid}/{mac}", action="middlebox", conditions={"method": ["GET"]})
        self.routes.connect("/v1/middleboxes/{dpid}/{mac}", action="delete", conditions={"method": ["DELETE"]})
        self.routes.connect("/v1/middleboxes/{dpid}/{mac}/flows", action="flows", conditions={"method": ["GET"]})
        self.routes.connect("/v1/switches", action="switches", conditions={"method": ["GET"]})
        self.routes.connect("/v1/commands", action="command", conditions={"method": ["POST"]})
        self.routes.connect("/metrics", action="metrics", conditions={"method": ["GET"]})

    def __call__(self, environ, start_response):
        request = Request(environ)
        match = self.routes.match(environ=environ)
        if match is None:
            response = _error(404, "not-found", f"no such endpoint: {request.method} {request.path}")
        else:
            try:
                response = getattr(self, match.pop("action"))(request, **match)
            except HTTPException as error:
                response = _error(error.code, "http", error.detail or error.title)
            except (ValueError, KeyError) as error:
                response = _error(400, "bad-request", str(error))
            except Exception:  # an API bug must not kill the controller
                log.exception("REST %s %s failed", request.method, request.path)
                response = _error(500, "internal", "internal error; see the controller log")
        return response(environ, start_response)

    def _authorised(self, request: Request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    # --- reads ---------------------------------------------------------------------------

    def health(self, request):
        return _json({"status": "ok", "switches": len(self.core.switches.switches),
                      "middleboxes": len(self.core.state.middleboxes)})

    def _describe(self, middlebox) -> dict:
        body = json.loads(encode_middlebox(middlebox))
        return {"dpid": f"{middlebox.dpid:016x}", "mac": middlebox.mac, **body,
                "cookie": f"{cookie_of(middlebox.mac):#018x}"}

    def middleboxes(self, request):
        return _json({"middleboxes": [self._describe(mb) for mb in self.core.state.middleboxes]})

    def _find(self, dpid: str, mac: str):
        middlebox = self.core.state.find(int(dpid, 16), mac.lower())
        if middlebox is None:
            raise LookupError(f"no middlebox {mac} on switch {dpid}")
        return middlebox

    def middlebox(self, request, dpid, mac):
        try:
            middlebox = self._find(dpid, mac)
        except LookupError as error:
            return _error(404, "not-found", str(error))
        flows = self.core.switches.flow_statistics(middlebox.dpid, cookie_of(middlebox.mac))
        handled = {"packets": sum(f["packets"] for f in flows), "bytes": sum(f["bytes"] for f in flows)}
        return _json({**self._describe(middlebox), "handled_in_switch": handled})

    def flows(self, request, dpid, mac):
        try:
            middlebox = self._find(dpid, mac)
        except LookupError as error:
            return _error(404, "not-found", str(error))
        return _json({"flows": self.core.switches.flow_statistics(middlebox.dpid, cookie_of(middlebox.mac))})

    def switches(self, request):
        return _json({"switches": [{"dpid": f"{dpid:016x}", "connected": True, "connected_at": s.connected_at,
                                    "synced": s.synced.is_set(), "flows": s.flow_count(), "groups": len(s.groups)}
                                   for dpid, s in sorted(self.core.switches.switches.items())]})

    def metrics(self, request):
        for dpid in list(self.core.switches.switches):
            handled = self.core.switches.handled_packets(dpid)
            for middlebox in self.core.state.on(dpid):
                self.core.metrics.handled.labels(f"{dpid:016x}", middlebox.mac).set(
                    handled.get(cookie_of(middlebox.mac), 0))
        return Response(self.core.metrics.exposition(), content_type="text/plain", charset="utf-8")

    # --- writes --------------------------------------------------------------------------

    def command(self, request):
        """One command object, or ``{"commands": [...]}``: applied in order, their flows
        confirmed together (a guest's frame, or a bulk install)."""
        if not self._authorised(request):
            return _error(401, "unauthorised", "a valid bearer token is required for writes")
        body = request.json_body
        if isinstance(body, dict) and "commands" in body:
            answers = self.core.switches.execute_all([_command_request(item) for item in body["commands"]])
            return _json({"answers": [_answer_body(a) for a in answers]})
        answer = self.core.switches.execute(_command_request(body))
        return _json(_answer_body(answer), HTTP_STATUS.get(answer.status, 500))

    def delete(self, request, dpid, mac):
        if not self._authorised(request):
            return _error(401, "unauthorised", "a valid bearer token is required for writes")
        with self.core.switches.lock:
            answer = self.core.delete_middlebox(int(dpid, 16), mac.lower())
        if answer.code == "not-found":
            return _error(404, "not-found", answer.text)
        return _json({"status": answer.status, "text": answer.text}, HTTP_STATUS.get(answer.status, 500))


def _command_request(body: dict) -> CommandRequest:
    dpid = body["dpid"]
    return CommandRequest(dpid=int(dpid, 16) if isinstance(dpid, str) else int(dpid), port=int(body["port"]),
                          command=body["command"], channel=body.get("channel"), epoch=body.get("epoch"),
                          seq=body.get("seq"))


def _answer_body(answer) -> dict:
    return {"status": answer.status, "code": answer.code, "text": answer.text, "replayed": answer.replayed}


def start_server(core, settings) -> None:
    api = RestApi(core, settings)
    server = hub.WSGIServer((settings.rest_host, settings.rest_port), api)
    log.info("REST API on http://%s:%d/v1", settings.rest_host, settings.rest_port)
    hub.spawn(server.serve_forever)
