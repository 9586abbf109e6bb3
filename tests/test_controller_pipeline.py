"""A switch's next job is staged while it applies the one before (reconciler._stage_next):
planned on that job's outcome and streamed into a bundle of its own, committed only once
the switch confirmed the first.  On a fake switch that applies the real encoded messages
and that the test holds, to see what the controller sends and when.

Tried where it would break: the first job refused (the staged one must neither be
committed nor answered as planned on a state that never was), a staged job that depends on
the first one's outcome, and the switch lost while a job is staged."""

from __future__ import annotations

import pytest

from fakeswitch import FakeSwitch, wait_until
from mbvisor.controller.flows import cookie_of
from mbvisor.controller.pipeline import OFFLOAD_TABLE
from mbvisor.controller.reconciler import Job
from mbvisor.controller.requests import CommandRequest
from mbvisor.controller.service import Controller, Settings
from mbvisor.controller.trust import TrustMode

DPID = 0xD1
MAC, OTHER = "02:00:00:00:0d:01", "02:00:00:00:0d:02"


@pytest.fixture
def switch(tmp_path):
    service = Controller(Settings(database=tmp_path / "controller.sqlite", audit_interval=0,
                                  backend_check_interval=0, trust=TrustMode.LAB))
    fake = FakeSwitch(DPID, ports=(1, 2, 3), sink=lambda m: _deliver(service, m))
    service.switch_connected(fake.datapath)
    wait_until(lambda: service.reconcilers[DPID].synced, what="first reconciliation")
    yield service, fake
    service.close()
    fake.close()


def _deliver(service: Controller, message) -> None:
    if type(message).__name__ == "OFPSwitchFeatures":
        service.switch_connected(message.datapath)
    else:
        service.receive(message)


def _job(service, *texts: str, port: int = 2) -> Job:
    return service.reconcilers[DPID].submit(Job("commands", [CommandRequest(DPID, port, t) for t in texts]))


def _controls(fake) -> list[int]:
    """The bundle control messages the switch received, in order (their types)."""
    return [m.type for m in fake.received if type(m).__name__ == "ONFBundleCtrlMsg"]


def _done(*jobs: Job) -> bool:
    return all(job.done.is_set() for job in jobs)


def _flows(fake, mac: str) -> list:
    return [f for f in fake.flows(OFFLOAD_TABLE) if f.cookie == cookie_of(mac)]


def test_the_next_job_is_streamed_while_the_switch_applies_one_and_committed_after_it(switch):
    service, fake = switch
    ofp = fake.datapath.ofproto
    _job(service, f"R F {MAC} 10.13.0.1").done.wait(5)
    fake.received.clear()
    fake.hold()  # the switch takes the messages and answers nothing until released
    first = _job(service, *(f"A {MAC} I 4 s 10.66.{n}.0/24" for n in range(50)))
    second = _job(service, f"R F {OTHER} 10.13.0.2", f"A {OTHER} I 4 s 10.77.0.0/16", port=3)
    open_, commit = ofp.ONF_BCT_OPEN_REQUEST, ofp.ONF_BCT_COMMIT_REQUEST
    wait_until(lambda: _controls(fake) == [open_, commit, open_], what="the second bundle opened, not committed")
    assert not _done(first, second)
    fake.release()
    wait_until(lambda: _done(first, second), what="both jobs answered")
    assert _controls(fake) == [open_, commit, open_, commit]
    assert all(a.status == "OK" for a in first.answers + second.answers)
    assert len(_flows(fake, MAC)) >= 50 and _flows(fake, OTHER)
    assert service.state.find(DPID, OTHER) is not None and len(service.state.find(DPID, MAC).filters) == 50


def test_a_staged_job_planned_on_a_refused_one_is_discarded_and_decided_again(switch):
    """The second job adds a filter to the middlebox the first registers: staged, it was
    planned as if the registration held.  The switch refuses the first bundle: the staged
    bundle is discarded, never committed, and the job is decided again on what is: refused,
    the middlebox is not registered."""
    service, fake = switch
    ofp = fake.datapath.ofproto
    fake.received.clear()
    fake.hold()
    fake.fail_next_commit()
    first = _job(service, f"R F {MAC} 10.13.0.1", *(f"A {MAC} I 4 s 10.66.{n}.0/24" for n in range(20)))
    second = _job(service, f"A {MAC} I 4 s 10.88.0.0/16")
    open_, commit, discard = ofp.ONF_BCT_OPEN_REQUEST, ofp.ONF_BCT_COMMIT_REQUEST, ofp.ONF_BCT_DISCARD_REQUEST
    wait_until(lambda: _controls(fake) == [open_, commit, open_], what="the second job staged")
    fake.release()
    wait_until(lambda: _done(first, second), what="both jobs answered")
    assert {a.status for a in first.answers} == {"REJECTED"}
    assert second.answers[0].status == "REJECTED" and second.answers[0].code == "not-registered"
    assert _controls(fake)[:4] == [open_, commit, open_, discard]
    assert commit not in _controls(fake)[3:]  # the staged bundle was never committed
    assert service.state.find(DPID, MAC) is None and not _flows(fake, MAC)


def test_a_staged_job_on_a_lost_switch_is_answered_unavailable_and_changes_nothing(switch):
    service, fake = switch
    ofp = fake.datapath.ofproto
    _job(service, f"R F {MAC} 10.13.0.1").done.wait(5)
    fake.received.clear()
    fake.hold()
    first = _job(service, *(f"A {MAC} I 4 s 10.66.{n}.0/24" for n in range(20)))
    second = _job(service, f"A {MAC} I 4 s 10.88.0.0/16")
    open_, commit = ofp.ONF_BCT_OPEN_REQUEST, ofp.ONF_BCT_COMMIT_REQUEST
    wait_until(lambda: _controls(fake) == [open_, commit, open_], what="the second job staged")
    fake.disconnect()
    service.switch_disconnected(fake.datapath)
    fake.release()
    wait_until(lambda: _done(first, second), timeout=20, what="both jobs answered")
    assert {a.status for a in first.answers + second.answers} == {"UNAVAILABLE"}
    assert len(service.state.find(DPID, MAC).filters) == 0
