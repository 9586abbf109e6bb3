"""The reconciler plans and streams the next commands job while the switch applies the
one before it (``SwitchReconciler._look_ahead``): the switch's commit time is no longer
idle time for the controller.  What must hold: the switch is told nothing new until the
job before is confirmed (the next bundle stays uncommitted), a refusal of the job before
costs the next one nothing (it is planned again on what the switch really holds), answers
and final state are those of applying the jobs one after the other, and a retried
command still replays its answer."""

from __future__ import annotations

import ipaddress
import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from fakeswitch import wait_until
from mbvisor.controller.compat import hub
from mbvisor.controller.flows import cookie_of
from mbvisor.controller.model import Limits
from mbvisor.controller.store import Store
from test_controller_shell import DPID, MAC, MAC2, MB_PORT, Host, filter_flows, host, sent  # noqa: F401

OTHER_PORT = 4


def filtered(fake, mac: str) -> set[str]:
    """The source networks the switch drops for ``mac``'s middlebox."""
    cookie = cookie_of(mac)
    return {str(ipaddress.IPv4Network((value, bin(mask).count("1")))) for f in filter_flows(fake) if f.cookie == cookie
            for name, value, mask, *_ in f.match if name == "ipv4_src"}


def bundle_controls(fake, kind: str) -> list:
    wanted = getattr(fake.datapath.ofproto, f"ONF_BCT_{kind}_REQUEST")
    return [m for m in sent(fake, "ONFBundleCtrlMsg") if m.type == wanted]


def registered(host: Host):
    fake = host.switch()
    host.ok(f"R F {MAC} 10.0.0.5")
    host.ok(f"R F {MAC2} 10.0.0.6", port=OTHER_PORT)
    return fake


def spawn_jobs(host: Host, *jobs: tuple) -> list:
    """Each (port, texts) submitted from a green thread of its own, in order; returns
    once all are queued."""
    reconciler, queued = host.service.reconcilers[DPID], []
    submit = reconciler.submit
    reconciler.submit = lambda job: queued.append(job) or submit(job)
    try:
        threads = [hub.spawn(host.run, *texts, port=port) for port, texts in jobs]
        wait_until(lambda: len(queued) == len(jobs), what="every job queued")
    finally:
        del reconciler.submit
    return threads


def test_the_next_job_is_streamed_while_the_switch_applies_the_one_before_and_committed_after_it(host):
    fake = registered(host)
    opened, committed = len(bundle_controls(fake, "OPEN")), len(bundle_controls(fake, "COMMIT"))
    fake.hold()  # the switch answers nothing: the first job's commit stays unconfirmed
    threads = spawn_jobs(host, (MB_PORT, [f"A {MAC} I 4 s 10.1.0.0/16"]),
                         (OTHER_PORT, [f"A {MAC2} I 4 s 10.2.0.0/16"]))
    wait_until(lambda: len(bundle_controls(fake, "OPEN")) == opened + 2, what="the second job's bundle opened")
    assert any("10.2.0.0" in str(m.message) for m in sent(fake, "ONFBundleAddMsg")), "its flows are on their way"
    assert len(bundle_controls(fake, "COMMIT")) == committed + 1, "only the first job's bundle is committed"
    fake.release()
    answers = [thread.wait() for thread in threads]
    assert [[a.status for a in job] for job in answers] == [["OK"], ["OK"]]
    assert len(bundle_controls(fake, "COMMIT")) == committed + 2
    assert filtered(fake, MAC) == {"10.1.0.0/16"} and filtered(fake, MAC2) == {"10.2.0.0/16"}
    assert host.service.reconcilers[DPID].installed.flow_count() == len(fake.flows())


def test_a_refused_job_costs_the_job_made_ready_after_it_nothing(host):
    """The second job was planned on the first's filter being there ("already present")
    and streamed; the switch refuses the first: the second is planned again, adds the
    filter itself, and the switch, the record, the state and the store all agree."""
    fake = registered(host)
    fake.hold()
    fake.fail_next_commit()
    opened = len(bundle_controls(fake, "OPEN"))
    first, second = spawn_jobs(host, (MB_PORT, [f"A {MAC} I 4 s 10.1.0.0/16"]),
                               (MB_PORT, [f"A {MAC} I 4 s 10.1.0.0/16", f"A {MAC} I 4 s 10.3.0.0/16"]))
    wait_until(lambda: host.service.reconcilers[DPID].ahead is not None, what="the second job made ready")
    fake.release()
    assert [a.status for a in first.wait()] == ["REJECTED"]
    answers = second.wait()
    assert [a.status for a in answers] == ["OK", "OK"]
    assert "added" in answers[0].text.lower() and "present" not in answers[0].text.lower(), answers[0].text
    assert len(bundle_controls(fake, "DISCARD")) == 1, "the bundle made on the refused job's state was dropped"
    assert len(bundle_controls(fake, "OPEN")) == opened + 3, "the first's, the second's ahead, and again"
    fake.settle()
    filters = {"10.1.0.0/16", "10.3.0.0/16"}
    assert filtered(fake, MAC) == filters
    reconciler = host.service.reconcilers[DPID]
    assert reconciler.installed.flow_count() == len(fake.flows())
    state = host.service.state.find(DPID, MAC)
    assert {str(f.source) for f in state.filters} == filters
    assert Store(host.database).load(Limits()).find(DPID, MAC).filters == state.filters
    host.ok(f"A {MAC} I 4 s 10.4.0.0/16")  # known whole again: an added filter is just added
    assert filtered(fake, MAC) == filters | {"10.4.0.0/16"}


def test_a_retried_command_queued_behind_its_first_send_replays_its_answer(host):
    fake = registered(host)
    fake.hold()
    key = ("vm-a", 1, 7)
    first, retry = (hub.spawn(host.run, f"A {MAC} I 4 s 10.1.0.0/16", key=key) for _ in range(2))
    wait_until(lambda: len(host.service.reconcilers[DPID].jobs) == 1 and len(bundle_controls(fake, "COMMIT")) == 2,
               what="the first committed, the retry queued")
    fake.release()
    original, replayed = first.wait()[0], retry.wait()[0]
    assert original.status == "OK" and not original.replayed
    assert replayed.status == "OK" and replayed.replayed, replayed
    assert filtered(fake, MAC) == {"10.1.0.0/16"}


def test_a_bug_while_planning_ahead_costs_nothing_the_job_runs_in_turn(host, monkeypatch, caplog):
    fake = registered(host)
    plan = host.service.plan

    def planning(dpid, requests, base=None):
        if base is not None:
            raise RuntimeError("boom")
        return plan(dpid, requests)

    monkeypatch.setattr(host.service, "plan", planning)
    fake.hold()
    threads = spawn_jobs(host, (MB_PORT, [f"A {MAC} I 4 s 10.1.0.0/16"]),
                         (OTHER_PORT, [f"A {MAC2} I 4 s 10.2.0.0/16"]))
    with caplog.at_level(logging.ERROR, logger="mbvisor.controller"):
        wait_until(lambda: "planning a job ahead failed" in caplog.text, what="the failed look-ahead logged")
        fake.release()
        assert [[a.status for a in thread.wait()] for thread in threads] == [["OK"], ["OK"]]
    assert filtered(fake, MAC) == {"10.1.0.0/16"} and filtered(fake, MAC2) == {"10.2.0.0/16"}


_job = st.tuples(st.sampled_from([(MB_PORT, MAC), (OTHER_PORT, MAC2)]),
                 st.lists(st.tuples(st.sampled_from("AD"), st.integers(1, 4)), min_size=1, max_size=3),
                 st.booleans())


@settings(max_examples=20, deadline=None)
@given(st.lists(_job, min_size=2, max_size=5))
def test_jobs_queued_together_end_as_they_end_one_after_the_other(tmp_path_factory, jobs):
    """Queued together (each made ready while the switch applies the one before, those
    marked refused carrying a filter the switch refuses), the jobs give the answers,
    state, store and switch flows they give when each is sent only once the one before
    is answered."""
    def texts(index, mac, commands, refused):
        return ([f"{verb} {mac} I 4 s 10.{n}.0.0/16" for verb, n in commands]
                + ([f"A {mac} I 4 s 10.99.{index}.0/24"] if refused else []))

    def refused_marker(message) -> bool:
        return type(message).__name__ == "OFPFlowMod" and "10.99." in str(message.match)

    outcomes = []
    for together in (False, True):
        host = Host(tmp_path_factory.mktemp("together" if together else "alone"))
        try:
            fake = registered(host)
            fake.refuse(refused_marker, times=None)
            sends = [(port, texts(index, mac, commands, refused))
                     for index, ((port, mac), commands, refused) in enumerate(jobs)]
            if together:
                fake.hold()
                threads = spawn_jobs(host, *sends)
                fake.release()
                answers = [thread.wait() for thread in threads]
            else:
                answers = [host.run(*texts_, port=port) for port, texts_ in sends]
            fake.settle()
            outcomes.append(([[(a.status, a.text) for a in job] for job in answers],
                             host.service.state.on(DPID),
                             sorted(Store(host.database).load(Limits()).on(DPID), key=lambda mb: mb.mac),
                             sorted(f.identity for f in fake.flows())))
            assert host.service.reconcilers[DPID].installed.flow_count() == len(fake.flows())
        finally:
            host.close()
    alone, together = outcomes
    assert together[0] == alone[0]
    assert together[1:] == alone[1:]
