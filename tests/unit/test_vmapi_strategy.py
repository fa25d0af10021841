"""runStrategy decisions (vmapi.strategy), KubeVirt's semantics with the pod in the VMI's place."""

from __future__ import annotations

import pytest

from vmapi.requests import Request
from vmapi.strategy import Inputs, PodView, StartFailure, decide

RUNNING = PodView("p1", "Running")
SUCCEEDED = PodView("p1", "Succeeded")
FAILED = PodView("p1", "Failed")


def d(rs, pod=None, reqs=(), **kw):
    kw.setdefault("last_run_strategy", rs)
    return decide(Inputs(run_strategy=rs, pod=pod, requests=tuple(reqs), **kw))


@pytest.mark.parametrize("rs,pod,last,expected", [
    ("Always", None, {}, "create"),
    ("Always", RUNNING, {}, "none"),
    ("Always", SUCCEEDED, {}, "delete"),
    ("Always", FAILED, {}, "delete"),
    ("Halted", RUNNING, {}, "delete"),
    ("Halted", None, {}, "none"),
    ("Manual", None, {}, "none"),
    ("Manual", SUCCEEDED, {}, "none"),
    ("Manual", FAILED, {}, "none"),
    ("Once", None, {"last_run_strategy": None}, "create"),  # a new VM
    ("Once", None, {"last_run_strategy": "Halted"}, "create"),  # switched to Once
    ("Once", None, {}, "none"),  # ran already
    ("Once", FAILED, {}, "none"),
    ("RerunOnFailure", FAILED, {}, "delete"),
    ("RerunOnFailure", SUCCEEDED, {}, "none"),  # the guest powered off: stays Stopped
    ("RerunOnFailure", None, {"last_run_strategy": None}, "create"),
    ("RerunOnFailure", None, {}, "none"),
    ("RerunOnFailure", None, {"last_pod_uid": "p1", "last_pod_phase": "Failed"}, "create"),
    ("RerunOnFailure", None, {"last_pod_uid": "p1", "last_pod_phase": "Running"}, "create"),  # drained
    ("RerunOnFailure", None, {"last_pod_uid": "p1", "last_pod_phase": "Succeeded"}, "none"),
    ("Always", PodView("p1", "Running", terminating=True), {}, "none"),  # wait until it is gone
])
def test_run_strategies(rs, pod, last, expected):
    assert d(rs, pod, **last).action == expected


def test_stop_request_deletes_that_pod_and_is_done_once_it_is_gone():
    dec = d("Manual", RUNNING, [Request("Stop", "p1")])
    assert dec.action == "delete" and dec.requests == (Request("Stop", "p1"),)
    dec = d("Manual", None, [Request("Stop", "p1")], last_pod_uid="p1", last_pod_phase="Running")
    assert dec.action == "none" and dec.requests == ()
    # RerunOnFailure: a stopped-on-request pod is not a failure
    dec = d("RerunOnFailure", None, [Request("Stop", "p1")], last_pod_uid="p1", last_pod_phase="Running")
    assert dec.action == "none"


def test_restart_is_stop_then_start():
    reqs = [Request("Stop", "p1"), Request("Start")]
    assert d("Manual", RUNNING, reqs).action == "delete"
    dec = d("Manual", None, reqs, last_pod_uid="p1")
    assert dec.action == "create" and dec.requests == ()
    dec = d("Manual", PodView("p2", "Running"), reqs)  # the new pod exists: both requests done
    assert dec.action == "none" and dec.requests == ()


def test_a_stale_stop_never_hits_a_newer_pod():
    dec = d("Always", PodView("p2", "Running"), [Request("Stop", "p1")])
    assert dec.action == "none" and dec.requests == ()


def test_start_on_a_finished_pod_replaces_it_and_once_ignores_requests():
    assert d("Manual", SUCCEEDED, [Request("Start")]).action == "delete"
    dec = d("Once", None, [Request("Start")])
    assert dec.action == "none" and dec.requests == ()
    assert d("Halted", None, [Request("Start")]).requests == ()


def test_foreign_pod_and_deletion():
    assert d("Always", PodView("x", "Running", owned=False)).conflict
    assert d("Always", PodView("x", "Running", owned=False)).action == "none"
    assert decide(Inputs("Always", RUNNING, deleting=True)).action == "delete"


def test_crash_loop_back_off():
    sf = StartFailure()
    dec = d("Always", PodView("f1", "Failed"), start_failure=sf, now=100.0)
    assert dec.action == "delete" and dec.start_failure.count == 1 and dec.start_failure.retry_after is None
    dec = d("Always", PodView("f2", "Failed"), start_failure=dec.start_failure, now=101.0)
    assert dec.start_failure.count == 2 and dec.start_failure.retry_after == 111.0
    again = d("Always", PodView("f2", "Failed"), start_failure=dec.start_failure, now=102.0)
    assert again.start_failure == dec.start_failure  # counted once per pod
    wait = d("Always", None, start_failure=dec.start_failure, now=105.0, last_pod_uid="f2")
    assert wait.action == "none" and wait.wait_until == 111.0
    assert d("Always", None, start_failure=dec.start_failure, now=111.5).action == "create"
    assert d("Always", RUNNING, start_failure=dec.start_failure).start_failure == StartFailure()
    capped = d("Always", PodView("f9", "Failed"), start_failure=StartFailure(20, None, "f8"), now=0.0)
    assert capped.start_failure.retry_after == 300.0
