"""Versioned JSON API (``/v1``) and Prometheus metrics, served inside the controller.

The edge of the command path: it authenticates writes, validates each request whole
(``requests``), hands valid requests to the service and maps the service's answers to
HTTP.  It imports nothing of the service or the app; the app gives it an object with the
service's methods (``submit``, ``delete_middlebox``, ``switch_views``, ``flow_statistics``,
``handled_packets``, ``refresh_metrics``, ``state``, ``metrics``).  Errors are JSON
``{"error": {"code", "message"}}`` with a stable code.  Documented in docs/rest.md.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import traceback
from json.encoder import encode_basestring_ascii

import eventlet.wsgi
from eventlet import greenio
from eventlet.green import ssl as green_ssl
from routes import Mapper
from webob import Request, Response

from mbvisor.guest.reader import FaultLog

from .compat import hub
from .handshakes import HandshakingListener
from .flows import cookie_of
from .pacing import Pacer, preparing
from .requests import (BadRequest, SwitchUnavailable, answers_wanted, clip, dpid_from, flag_from, inventory_from_body,
                       is_batch,
                       mac_from, port_identity_body, requests_from_body, underlay_body)
from .store import encode_middlebox, filter_text

log = logging.getLogger("mbvisor.rest")

# Path template -> method -> handler.  The one table the router, the 405 answers' Allow
# header and the OpenAPI test (tests/test_openapi.py) all read.
ROUTES = {
    "/v1/health": {"GET": "health"},
    "/v1/switches": {"GET": "switches"},
    "/v1/switches/{dpid}/ports": {"GET": "ports", "PUT": "set_ports"},
    "/v1/middleboxes": {"GET": "middleboxes"},
    "/v1/middleboxes/{dpid}/{mac}": {"GET": "middlebox", "DELETE": "delete"},
    "/v1/middleboxes/{dpid}/{mac}/flows": {"GET": "flows"},
    "/v1/commands": {"POST": "command"},
    "/metrics": {"GET": "metrics"},
}
WRITES = {"command", "delete", "set_ports"}
HTTP_STATUS = {"OK": 200, "SYNTAX": 400, "REJECTED": 409, "REFUSED": 403, "UNAVAILABLE": 503, "INTERNAL": 500}
MAX_BODY = 64 << 20  # a 200,000-command batch is about 25 MiB
BACKLOG = 1024  # 50 (eventlet's default) reset connections under 200 concurrent writers
MAX_CONNECTIONS = 256
IDLE_TIMEOUT = 30.0


class PortInUse(RuntimeError):
    """Another process listens on the REST port: starting anyway would split requests."""


class _NotFound(LookupError):
    pass


class _TooLarge(Exception):
    pass


BULK_BODY = 1 << 15  # a body this large (~400 commands) is read while no command is on the CPU (pacing.py)


def _json(body, status: int = 200) -> Response:
    # Compact: with an indent, json falls back from its C encoder (a 200,000-answer batch
    # then holds the event loop for about a second).
    return _json_text(json.dumps(body), status)


def _json_text(text: str, status: int = 200) -> Response:
    return Response(text + "\n", status=status, content_type="application/json", charset="utf-8")


def _error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"code": code, "message": message}}, status)


def http_status(answer) -> int:
    """The HTTP status of a single command's answer: its channel status, except that a
    reused idempotency key is a conflict whatever the service calls it."""
    if answer.code == "key-reused":
        return 409
    return HTTP_STATUS.get(answer.status, 500)


def _answer_body(answer) -> dict:
    return {"status": answer.status, "code": answer.code, "text": answer.text, "replayed": answer.replayed}


def _answers_json(answers) -> str:
    """``json.dumps({"answers": [_answer_body(a) for a in answers]})``, the same text
    (tests/test_rest.py), without a dictionary per answer: a batch's answers share a few
    (status, code, replayed), whose JSON around the text is made once."""
    frames: dict[tuple, tuple[str, str]] = {}
    parts = []
    for answer in answers:
        shape = (answer.status, answer.code, answer.replayed)
        frame = frames.get(shape)
        if frame is None:
            frame = frames[shape] = (f'{{"status": {json.dumps(answer.status)}, "code": {json.dumps(answer.code)}, '
                                     '"text": ', f', "replayed": {json.dumps(answer.replayed)}}}')
        parts.append(frame[0] + encode_basestring_ascii(answer.text) + frame[1])
    return '{"answers": [' + ", ".join(parts) + "]}"


def _failures_json(answers) -> str:
    """A batch's answers when only its failures were asked for: how many commands, how
    many OK, and each answer that is not OK with its command's index."""
    failures = [{"index": index, **_answer_body(answer)} for index, answer in enumerate(answers)
                if answer.status != "OK"]
    return json.dumps({"count": len(answers), "ok": len(answers) - len(failures), "failures": failures})


def _describe(middlebox) -> dict:
    body = json.loads(encode_middlebox(middlebox))
    return {"dpid": f"{middlebox.dpid:016x}", "mac": middlebox.mac, **body,
            "filters": sorted(filter_text(middlebox.mac, f) for f in middlebox.filters),
            "cookie": f"{cookie_of(middlebox.mac):#018x}"}


def _json_body(request: Request):
    """The request's JSON (``_body_bytes``, then ``_decoded``)."""
    return _decoded(_body_bytes(request))


def _body_bytes(request: Request) -> bytes:
    """The request's body, read at most ``MAX_BODY`` bytes: a client cannot make us buffer
    more than that, whatever Content-Length it claims or however long it streams."""
    if (request.content_length or 0) > MAX_BODY:
        raise _TooLarge()
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        request.is_body_readable = True  # eventlet reads chunks but does not tell webob it may
    data = request.body_file.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise _TooLarge()
    return data


def _decoded(data: bytes):
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise BadRequest("body", f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except (ValueError, RecursionError):  # not UTF-8, an integer of thousands of digits, deep nesting
        raise BadRequest("body", "not valid JSON (UTF-8, numbers and nesting within limits)") from None


def _checked_token(token: str | None) -> str | None:
    """None leaves writes open (no token file); an empty token would open them silently.
    Surrounding white space is never part of it: HTTP strips it from header values."""
    if token is None:
        return None
    if not token.strip():
        raise ValueError("the REST token is empty: give a non-empty token or none at all")
    return token.strip()


def _mapper() -> Mapper:
    routes = Mapper()
    for template in ROUTES:
        routes.connect(template, template=template)
    return routes


class RestApi:
    def __init__(self, service, settings):
        self.service = service
        self.token = _checked_token(settings.token)
        self.routes = _mapper()
        self.refusals = FaultLog(log)  # anyone may send bad requests: logged at a bounded rate

    def __call__(self, environ, start_response):
        return self._respond(Request(environ))(environ, start_response)

    def _respond(self, request: Request) -> Response:
        """Route, authenticate, run the handler; every failure becomes a JSON error."""
        match = self.routes.match(environ=request.environ)
        if match is None:
            return _error(404, "not-found", f"no such endpoint: {clip(request.path_info)}")
        methods = ROUTES[match.pop("template")]
        action = methods.get(request.method)
        if action is None:
            response = _error(405, "method-not-allowed",
                              f"{clip(request.method, 20)} is not allowed here; allowed: {', '.join(sorted(methods))}")
            response.allow = sorted(methods)
            return response
        if action in WRITES and not self._authorised(request):
            response = _error(401, "unauthorised", "a valid bearer token is required for writes")
            response.www_authenticate = "Bearer"
            return response
        try:
            return getattr(self, action)(request, **match)
        except BadRequest as error:
            self.refusals("refused", logging.INFO, "REST %s %s refused: %s", clip(request.method, 20),
                     clip(request.path_info), clip(str(error)))
            return _error(400, "bad-request", str(error))
        except _NotFound as error:
            return _error(404, "not-found", str(error))
        except SwitchUnavailable as error:
            return _error(503, "switch-unavailable", str(error))
        except _TooLarge:
            response = _error(413, "too-large", f"the body is larger than {MAX_BODY} bytes")
            response.headers["Connection"] = "close"
            return response
        except Exception as error:  # an API bug must not kill the controller
            _log_failure(self.refusals, request, error)
            return _error(500, "internal", "internal error; see the controller log")

    def _authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    def _find(self, dpid: str, mac: str):
        dpid, mac = dpid_from(dpid), mac_from(mac)
        middlebox = self.service.state.find(dpid, mac)
        if middlebox is None:
            raise _NotFound(f"no middlebox {mac} on switch {dpid:016x}")
        return middlebox

    # --- reads ---------------------------------------------------------------------------

    def health(self, request):
        connected = sum(1 for view in self.service.switch_views() if view["connected"])
        return _json({"status": "ok", "switches": connected, "middleboxes": len(self.service.state.middleboxes)})

    def switches(self, request):
        views = sorted(self.service.switch_views(), key=lambda view: view["dpid"])
        return _json({"switches": [{**view, "dpid": f"{view['dpid']:016x}"} for view in views]})

    def ports(self, request, dpid):
        dpid = dpid_from(dpid)
        return _json(_inventory_body(dpid, self.service.inventory_of(dpid)))

    def middleboxes(self, request):
        return _json({"middleboxes": [_describe(mb) for mb in self.service.state.middleboxes]})

    def middlebox(self, request, dpid, mac):
        middlebox = self._find(dpid, mac)
        handled = self.service.handled_packets(middlebox.dpid, middlebox.mac)
        backends = self.service.backend_states(middlebox.dpid, middlebox.mac)
        return _json({**_describe(middlebox), "handled_in_switch": handled, "backends": backends})

    def flows(self, request, dpid, mac):
        middlebox = self._find(dpid, mac)
        return _json({"flows": self.service.flow_statistics(middlebox.dpid, cookie_of(middlebox.mac))})

    def metrics(self, request):
        self.service.refresh_metrics()
        return Response(self.service.metrics.exposition(), content_type="text/plain", charset="utf-8")

    # --- writes --------------------------------------------------------------------------

    def command(self, request):
        """One command object, answered with its own HTTP status; or ``{"commands": [...]}``,
        answered 200 with an answer per command once the whole request was valid."""
        data = _body_bytes(request)
        with preparing(bulk=len(data) >= BULK_BODY):  # chunked bodies too: counted as read
            body = _decoded(data)
            requests = requests_from_body(body, pause=Pacer())
        answers = self.service.submit(requests)
        if is_batch(body):
            if answers_wanted(body) == "failures":
                return _json_text(_failures_json(answers))
            return _json_text(_answers_json(answers))
        return _json(_answer_body(answers[0]), http_status(answers[0]))

    def set_ports(self, request, dpid):
        """The host agent's inventory of a switch's annotated ports; it replaces the
        switch's and is kept even while the switch is away."""
        dpid = dpid_from(dpid)
        inventory = self.service.set_inventory(dpid, inventory_from_body(_json_body(request)))
        return _json(_inventory_body(dpid, inventory))

    def delete(self, request, dpid, mac):
        answer = self.service.delete_middlebox(dpid_from(dpid), mac_from(mac),
                                               flag_from(request.GET.get("anchor"), "anchor"))
        if answer.code == "not-found":
            raise _NotFound(answer.text)
        return _json(_answer_body(answer), http_status(answer))


def _inventory_body(dpid: int, inventory) -> dict:
    return {"dpid": f"{dpid:016x}", "ports": [port_identity_body(i) for i in inventory.identities],
            "underlay": [underlay_body(u) for u in inventory.underlay],
            "refused": [{"port": r.port, "interface": r.interface, "reason": r.reason} for r in inventory.refused]}


def _log_failure(refusals: FaultLog, request: Request, error: Exception) -> None:
    """The traceback of an API bug, with the exception's text clipped: it may quote a
    client's megabyte."""
    frames = "".join(traceback.format_tb(error.__traceback__))
    refusals("failed", logging.ERROR, "REST %s %s failed:\n%s%s: %s", clip(request.method, 20),
             clip(request.path_info), frames, type(error).__name__, clip(str(error)))


class _ServerLog:
    """eventlet's server log (access lines, connection events) at DEBUG and clipped; the
    API logs its own refusals and failures."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def info(self, message, *args, **kwargs) -> None:
        self._logger.debug("%s", clip(str(message).rstrip()))

    debug = error = info


def listen(host: str, port: int, backlog: int = BACKLOG):
    """The listening socket, bound without SO_REUSEPORT.  With it (eventlet's and os-ken's
    default) a second controller binds the same port silently and the kernel splits the
    requests between two processes with different databases."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart while old connections linger
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUse(f"REST port {host}:{port} is already in use (another mbvisor controller?)") from None
        raise
    sock.listen(backlog)
    return greenio.GreenSocket(sock)


class _HeadersInTime(eventlet.wsgi.HttpProtocol):
    """A request line and its headers must arrive within ``header_timeout`` seconds in all,
    not merely one byte per socket time-out: a client dripping a header byte now and then
    would otherwise hold a connection slot for ever (slowloris), and a few hundred such
    clients every slot.  Bodies are read by the API and bounded by the socket time-out."""

    header_timeout = IDLE_TIMEOUT
    _deadline = None

    def _read_request_line(self):
        self._deadline = eventlet.Timeout(self.header_timeout)
        return super()._read_request_line()

    def get_environ(self):
        self._deadline.cancel()  # the headers are in: the request itself may take long
        return super().get_environ()

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except eventlet.Timeout as timeout:
            if timeout is not self._deadline:
                raise
            self.close_connection = 1
        finally:
            if self._deadline is not None:
                self._deadline.cancel()


def serve(sock, api: RestApi, settings) -> None:
    """Answer on ``sock`` until killed: at most ``rest_max_connections`` at once (more wait
    in the backlog), each closed after ``rest_idle_timeout`` seconds without traffic or
    without a complete request line and headers, so idle or dripping connections cannot
    hold every slot (or every file descriptor) for long."""
    timeout = getattr(settings, "rest_idle_timeout", IDLE_TIMEOUT)
    protocol = type("HeadersInTime", (_HeadersInTime,), {"header_timeout": timeout})
    eventlet.wsgi.server(sock, api, log=_ServerLog(log), debug=False, protocol=protocol,
                         max_size=getattr(settings, "rest_max_connections", MAX_CONNECTIONS),
                         socket_timeout=timeout)


def tls_context(settings):
    """The server's TLS context (TLS 1.2 at least) if a certificate is configured, else
    None.  A certificate or key that cannot be loaded stops the start with the reason."""
    cert, key = getattr(settings, "tls_cert", None), getattr(settings, "tls_key", None)
    if cert is None:
        return None
    context = green_ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise TlsSetupError(f"cannot load the TLS certificate {cert} with key {key}: {error}") from None
    return context


class TlsSetupError(RuntimeError):
    pass


def start_server(service, settings):
    """Bind the REST port (``PortInUse`` if taken) and serve it in a green thread.  Served
    on a non-loopback address without TLS, bearer tokens cross the network in clear:
    said loudly at start."""
    api = RestApi(service, settings)
    tls = tls_context(settings)
    sock = listen(settings.rest_host, settings.rest_port)
    if tls is not None:  # the server gets connections whose handshake is done (handshakes.py)
        sock = HandshakingListener(sock, tls, "REST")
    scheme = "https" if tls else "http"
    log.info("REST API on %s://%s:%d/v1", scheme, settings.rest_host, settings.rest_port)
    if tls is None and not _loopback(settings.rest_host):
        log.warning("REST API on %s without TLS: tokens and commands cross the network in clear "
                    "(give --tls-cert/--tls-key; docs/datacentre.md)", settings.rest_host)
    return hub.spawn(serve, sock, api, settings)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
