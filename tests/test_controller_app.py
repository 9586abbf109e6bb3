"""The OS-Ken app shell: it refuses a taken OpenFlow port and only hands events to the
service (wired here to the fake switch, so the app's handlers are what moves the data)."""

from __future__ import annotations

import gc
import socket
from types import SimpleNamespace

import pytest

from fakeswitch import FakeDatapath, FakeSwitch, wait_until
from mbvisor.controller import app as app_module
from mbvisor.controller import metrics as metrics_module
from mbvisor.controller.compat import CONF, hub, ofp_event
from mbvisor.controller.reconciler import Job
from mbvisor.controller.requests import CommandRequest
from mbvisor.topologies.controller_run import free_port

MAC = "52:34:56:00:12:22"


def test_a_taken_openflow_port_stops_the_start_with_its_number():
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as os-ken listens
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit, match=f"OpenFlow port 127.0.0.1:{port} is already in use"):
            app_module.refuse_taken_port("127.0.0.1", port, "OpenFlow")
    app_module.refuse_taken_port("127.0.0.1", port, "OpenFlow")  # free again: no error


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("MBVISOR_DB", str(tmp_path / "controller.sqlite"))
    monkeypatch.setenv("MBVISOR_REST_PORT", str(free_port()))
    monkeypatch.setenv("MBVISOR_AUDIT_INTERVAL", "0")
    monkeypatch.setenv("MBVISOR_TRUST", "lab")  # the backend below is found by ARP through _packet_in
    monkeypatch.delenv("MBVISOR_TOKEN", raising=False)
    monkeypatch.setattr(CONF, "ofp_tcp_listen_port", free_port(), raising=False)
    thresholds = gc.get_threshold()
    made = app_module.MbvisorController()
    yield made
    hub.kill(made.rest_server)
    made.service.close()
    gc.callbacks.remove(app_module._freeze_survivors)
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_the_app_keeps_the_collector_from_walking_what_it_loaded(app):
    """A full collection walks every live object: what was loaded at start is frozen out
    of it."""
    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold()[:2] == (app_module.GC_YOUNG, app_module.GC_MIDDLE)


def test_what_outlives_the_young_collections_is_frozen_out_of_them(app):
    """A held flow or a middlebox outlives the young collections: it is frozen, so that no
    collection walks the controller's state again (each walk of it stopped everything)."""
    frozen = gc.get_freeze_count()
    held = [[n] for n in range(app_module.GC_YOUNG * (app_module.GC_MIDDLE + 2) * 2)]  # automatic collections
    assert gc.get_freeze_count() - frozen >= len(held) // 2
    assert gc.get_count()[0] < app_module.GC_YOUNG and len(gc.get_objects(2)) < len(held) // 10
    del held


def frozen_metric(service) -> float:
    (line,) = [line for line in service.metrics.exposition().decode().splitlines()
               if line.startswith("mbvisor_gc_frozen_objects ")]
    return float(line.split()[1])


def test_the_frozen_objects_are_reported_as_they_grow(app, monkeypatch):
    """Frozen garbage in cycles is never freed: /metrics shows the frozen count, so an
    operator sees it grow while the state does not."""
    monkeypatch.setattr(metrics_module, "FROZEN_COUNT_AGE", 0.0)
    before = frozen_metric(app.service)
    assert before > 10_000 and abs(before - gc.get_freeze_count()) < 100  # frozen objects freed meanwhile
    held = [[n] for n in range(app_module.GC_YOUNG * (app_module.GC_MIDDLE + 2) * 2)]
    after = frozen_metric(app.service)
    assert after >= before + len(held) // 2 and abs(after - gc.get_freeze_count()) < 100
    del held


def test_the_frozen_objects_are_counted_at_most_every_few_minutes(app, monkeypatch):
    """Counting them walks every one (5.6 ms for 700,000, holding every switch's commands):
    a scrape within FROZEN_COUNT_AGE of the last count reports that count, not a new one."""
    counts = []
    monkeypatch.setattr(metrics_module, "get_freeze_count", lambda: counts.append(1) or 1000 + len(counts))
    clock = [1000.0]
    monkeypatch.setattr(metrics_module, "monotonic", lambda: clock[0])
    app.service.metrics = metrics_module.Metrics()  # as started: its first scrape counts
    assert frozen_metric(app.service) == 1001
    clock[0] += metrics_module.FROZEN_COUNT_AGE - 0.001
    assert frozen_metric(app.service) == 1001 and len(counts) == 1
    clock[0] += 0.001
    assert frozen_metric(app.service) == 1002 and len(counts) == 2


def route(app, message) -> None:
    """What os-ken's dispatcher does with a message: a features reply goes to the hook the
    app registered in os-ken's receive loop (``_accept``, see start); any other, to the
    handlers registered for its event class; a message nobody registered for is dropped."""
    if type(message).__name__ == "OFPSwitchFeatures":
        app._accept(SimpleNamespace(msg=message))
        return
    event_class = ofp_event.ofp_msg_to_ev_cls(type(message))
    handlers = [getattr(app, name) for name in dir(type(app))
                if event_class in getattr(getattr(type(app), name), "callers", {})]
    for handler in handlers:
        handler(SimpleNamespace(msg=message))


def test_the_handlers_move_switch_events_to_the_service(app):
    service = app.service
    with FakeSwitch(0xA1, sink=lambda message: route(app, message)) as fake:
        fake.add_host("10.0.0.11", "02:00:00:00:00:11", 3)
        fake.reconnect()  # the features reply reaches _accept
        wait_until(lambda: 0xA1 in service.reconcilers and service.reconcilers[0xA1].synced,
                   what="the first reconciliation through the app")
        answers = service.submit([CommandRequest(0xA1, 2, text) for text in (
            f"R F {MAC} 10.0.0.5", f"A {MAC} I 4 s 10.66.0.0/16", f"R L {MAC} 10.0.0.5 0 * 10.0.0.11")])
        assert [a.status for a in answers] == ["OK"] * 3  # the ARP reply came through _packet_in
        reconciler = service.reconcilers[0xA1]
        assert reconciler.submit(Job("audit")).done.wait(timeout=10)  # aggregate and group replies reach it
        assert reconciler.synced and reconciler.last_error is None
        added = []
        service.port_added = lambda dpid, port: added.append((dpid, port))
        fake.add_port(9)  # _port_status tells the service of a port added
        wait_until(lambda: added == [(0xA1, 9)], what="the port added reaching the service")
        del service.port_added
        fake.remove_port(2)  # _port_status retires the middlebox
        wait_until(lambda: service.state.find(0xA1, MAC) is None, what="the retirement")
        datapath = fake.datapath
        fake.disconnect()
        app._switch_gone(SimpleNamespace(datapath=datapath))
        assert service.switch_views()[0]["connected"] is False


class _Datapath:
    """A connection as the features handler sees it: its id, its TLS socket's certificate
    (hashable, as os-ken's datapaths are)."""

    def __init__(self, dpid: int, certificate):
        self.id, self.address, self.closed = dpid, ("127.0.0.1", 40000), 0
        self.socket = SimpleNamespace(getpeercert=lambda: certificate)

    def close(self):
        self.closed += 1


@pytest.fixture
def tls_app(app, monkeypatch):
    """The app as started with a switch CA (the manager's --ctl-cert, --ctl-privkey,
    --ca-certs): built again with those options set."""
    for option, value in (("ctl_cert", "cert.pem"), ("ctl_privkey", "key.pem"), ("ca_certs", "ca.pem"),
                          ("ofp_ssl_listen_port", free_port())):
        monkeypatch.setattr(CONF, option, value, raising=False)

    def build(**environment):
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        hub.kill(app.rest_server)
        app.service.close()
        made = app_module.MbvisorController()
        app.rest_server, app.service = made.rest_server, made.service  # closed by the app fixture
        return made
    return build


def _started(made, monkeypatch) -> object:
    """``made.start()`` against a stand-in for os-ken's ofp_event service; the hook it
    registered there (run by os-ken's receive loop, in CONFIG_DISPATCHER only)."""
    brick = SimpleNamespace(handlers=[], register_handler=lambda cls, handler: brick.handlers.append((cls, handler)))
    monkeypatch.setattr(app_module, "lookup_service_brick", lambda name: brick if name == "ofp_event" else None)
    made.start()
    ((event_class, accept),) = brick.handlers
    assert event_class is ofp_event.EventOFPSwitchFeatures
    assert accept.callers[event_class].dispatchers == [app_module.CONFIG_DISPATCHER]
    return accept


def test_a_switch_is_taken_on_in_os_kens_receive_loop_not_from_the_apps_queue(app, monkeypatch):
    """The app's queue can get a features reply before os-ken set the connection's id (a
    review found a switch never taken on that way: the loop hands the event to every app
    first and waits on one whose queue is full); the hook runs after os-ken's handler."""
    accept = _started(app, monkeypatch)
    assert not any(ofp_event.EventOFPSwitchFeatures in getattr(getattr(type(app), name), "callers", {})
                   for name in dir(type(app))), "the app still takes switches on from its queue"
    switch = _Datapath(0xA1, None)
    accept(SimpleNamespace(msg=SimpleNamespace(datapath=switch)))
    assert 0xA1 in app.service.reconcilers and switch.closed == 0
    broken = _Datapath(0xB2, None)
    monkeypatch.setattr(app.service, "switch_connected", lambda datapath: 1 / 0)
    accept(SimpleNamespace(msg=SimpleNamespace(datapath=broken)))
    assert broken.closed == 1  # taken on halfway: closed, the switch connects again


def test_with_a_switch_ca_a_switch_announcing_an_id_its_certificate_does_not_name_is_refused(tls_app, monkeypatch):
    made = tls_app()
    assert made.checks_switch_ids
    accept = _started(made, monkeypatch)
    impostor = _Datapath(0xA1, {"subjectAltName": (("URI", "urn:mbvisor:dpid:00000000000000b2"),)})
    accept(SimpleNamespace(msg=SimpleNamespace(datapath=impostor)))
    assert impostor.closed == 1 and 0xA1 not in made.service.reconcilers
    assert b"mbvisor_switches_refused_total 1.0" in made.service.metrics.exposition()
    monkeypatch.setattr(FakeDatapath, "socket", SimpleNamespace(getpeercert=lambda: {
        "subjectAltName": (("URI", "urn:mbvisor:dpid:00000000000000a1"),)}), raising=False)
    with FakeSwitch(0xA1, sink=lambda message: route(made, message)) as fake:
        fake.reconnect()
        wait_until(lambda: 0xA1 in made.service.reconcilers and made.service.reconcilers[0xA1].synced,
                   what="the switch whose certificate names its id")


def test_the_operator_may_let_any_switch_announce_any_id(tls_app, caplog, monkeypatch):
    made = tls_app(MBVISOR_TLS_SWITCH_IDS="any")
    assert not made.checks_switch_ids
    assert "MBVISOR_TLS_SWITCH_IDS=any: any switch the switch CA signed may announce any datapath id" in caplog.text
    anyone = _Datapath(0xA1, {})
    _started(made, monkeypatch)(SimpleNamespace(msg=SimpleNamespace(datapath=anyone)))
    assert anyone.closed == 0 and 0xA1 in made.service.reconcilers
