"""docs/openapi.yaml is valid OpenAPI 3 and says what the REST code does: the same routes
and methods, every status code the code produces and no other, and bodies that match the
documented schemas (checked on the answers of the real RestApi with a fake service)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from mbvisor.controller import rest
from mbvisor.controller.requests import Answer
from test_rest import AUTH, COMMAND, MAC, FakeService, call, settings

SPEC = yaml.safe_load((Path(__file__).parent.parent / "docs" / "openapi.yaml").read_text())
SPEC_URI = "urn:mbvisor:openapi"
REGISTRY = Registry().with_resource(SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT4))
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
ONE = f"/v1/middleboxes/00000000000000a1/{MAC}"
UNKNOWN = "/v1/middleboxes/a1/52:34:56:00:12:99"
PORTS = "/v1/switches/00000000000000a1/ports"
INVENTORY = {"ports": [{"port": 3, "interface": "vm1", "mac": MAC, "vm_id": "vm1", "tenant": "blue",
                        "ips": ["10.0.0.5"]},
                       {"port": 4, "interface": "vm2", "mac": "02:00:00:00:00:04", "tenant": "blue",
                        "ips": ["10.0.0.5"]}]}  # the same address: both refused, and said so


class BrokenService:
    """A service whose every use fails: each operation's 500."""

    def __getattr__(self, name):
        raise RuntimeError(f"broken: {name}")


def answering(status: str, code: str):
    service = FakeService()
    service.answer = lambda request: Answer(status, "text", code)
    return service


def disconnected():
    service = FakeService()
    service.connected.clear()
    return service


ANSWERS = [("OK", "ok"), ("SYNTAX", "syntax"), ("REFUSED", "refused"), ("REJECTED", "limit"),
           ("REJECTED", "key-reused"), ("UNAVAILABLE", "switch-down"), ("INTERNAL", "internal")]
EXCHANGES = [  # (service, method, path, body, authorised)
    *[(service, "GET", path, None, False) for service in (FakeService, BrokenService)
      for path in ("/v1/health", "/v1/switches", "/v1/middleboxes", ONE, ONE + "/flows", "/metrics")],
    *[(FakeService, "GET", path, None, False) for path in (UNKNOWN, UNKNOWN + "/flows", "/v1/middleboxes/x/y",
                                                          "/v1/middleboxes/x/y/flows")],
    *[(disconnected, "GET", path, None, False) for path in (ONE, ONE + "/flows")],
    *[(lambda s=status, c=code: answering(s, c), "POST", "/v1/commands", COMMAND, True) for status, code in ANSWERS],
    *[(lambda s=status, c=code: answering(s, c), "DELETE", ONE, None, True) for status, code in ANSWERS
      if status != "SYNTAX"],
    (FakeService, "POST", "/v1/commands", {"commands": [COMMAND, COMMAND]}, True),
    (FakeService, "POST", "/v1/commands", {"commands": [COMMAND, {}]}, True),
    (FakeService, "POST", "/v1/commands", COMMAND, False),
    (FakeService, "POST", "/v1/commands", {**COMMAND, "command": " " * (70 << 20)}, True),
    (BrokenService, "POST", "/v1/commands", COMMAND, True),
    (FakeService, "DELETE", UNKNOWN, None, True),
    (FakeService, "DELETE", "/v1/middleboxes/x/y", None, True),
    (FakeService, "DELETE", ONE, None, False),
    (BrokenService, "DELETE", ONE, None, True),
    (FakeService, "GET", PORTS, None, False),
    (FakeService, "GET", "/v1/switches/x/ports", None, False),
    (BrokenService, "GET", PORTS, None, False),
    (FakeService, "PUT", PORTS, INVENTORY, True),
    (FakeService, "PUT", PORTS, {"ports": [{**INVENTORY["ports"][0], "ips": ["10.0.0.300"]}]}, True),
    (FakeService, "PUT", PORTS, INVENTORY, False),
    (BrokenService, "PUT", PORTS, INVENTORY, True),
]


def _pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def _documented_response(template: str, method: str, status: int) -> tuple[str, dict]:
    """The JSON pointer into the spec of a documented response, and the response itself."""
    response = SPEC["paths"][template][method]["responses"][str(status)]
    if "$ref" in response:
        name = response["$ref"].rsplit("/", 1)[1]
        return _pointer("components", "responses", name), SPEC["components"]["responses"][name]
    return _pointer("paths", template, method, "responses", str(status)), response


def _check_body(response, pointer: str, documented: dict) -> None:
    media = response.content_type
    assert media in documented["content"], f"{media} not documented"
    if media == "application/json":
        _conforms(json.loads(response.body), pointer + _pointer("content", media, "schema"))


def _conforms(body, pointer: str) -> None:
    OAS30Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=REGISTRY).validate(body)


def test_the_spec_is_valid_openapi_3():
    validate(SPEC)


def test_the_spec_has_exactly_the_routes_and_methods_of_the_code():
    api = rest.RestApi(FakeService(), settings())
    assert {route.routepath for route in api.routes.matchlist} == set(SPEC["paths"])
    documented = {(path, method.upper()): operation["operationId"] for path, item in SPEC["paths"].items()
                  for method, operation in item.items() if method in METHODS}
    assert documented == {(path, method): action for path, methods in rest.ROUTES.items()
                          for method, action in methods.items()}


def test_every_status_the_code_gives_is_documented_with_its_body_and_none_other():
    given = set()
    for make, method, path, body, authorised in EXCHANGES:
        api = rest.RestApi(make(), settings())
        response = call(api, method, path, body, AUTH if authorised else None)
        template = api.routes.match(path)["template"]
        given.add((template, method.lower(), response.status_int))
        pointer, documented = _documented_response(template, method.lower(), response.status_int)
        _check_body(response, pointer, documented)
    documented = {(path, method, int(status)) for path, item in SPEC["paths"].items()
                  for method, operation in item.items() if method in METHODS for status in operation["responses"]}
    assert given == documented


@pytest.mark.parametrize("method, path", [("PUT", "/v1/commands"), ("GET", "/nowhere")])
def test_405_and_404_bodies_are_the_documented_error(method, path):
    response = call(rest.RestApi(FakeService(), settings()), method, path)
    _conforms(response.json, "/components/schemas/Error")
