"""(VM, pod, decision) → status (vmapi.status) and the request annotation (vmapi.requests)."""

from __future__ import annotations

from vmapi import podspec, requests, status
from vmapi.strategy import Decision, StartFailure

VM = {"metadata": {"name": "v", "namespace": "n", "uid": "u", "generation": 4},
      "spec": {"runStrategy": "Always", "template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/x"}}}}}}
HASH = podspec.template_hash(VM["spec"])
NONE = Decision("none", "", ())


def pod(phase="Running", ready=True, hash_=HASH, **extra):
    st = {"phase": phase, "podIP": "10.0.0.9",
          "conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **extra}
    return {"metadata": {"name": "v-vm", "uid": "p1", "annotations": {podspec.ANN_TEMPLATE_HASH: hash_}},
            "spec": {"nodeName": "n1"}, "status": st}


def derive(p, decision=NONE, vm=VM, **kw):
    return status.derive(vm, p, decision, now=1000.0, current_hash=HASH, **kw)


def conds(st):
    return {c["type"]: c for c in st["conditions"]}


def test_running_ready():
    st = derive(pod())
    assert st["printableStatus"] == "Running" and st["ready"] is True and st["created"] is True
    assert (st["podName"], st["podUID"], st["podIP"], st["nodeName"]) == ("v-vm", "p1", "10.0.0.9", "n1")
    assert st["observedGeneration"] == 4 and st["runStrategy"] == "Always"
    c = conds(st)
    assert c["Ready"]["status"] == "True" and c["Paused"]["status"] == "False"
    assert "RestartRequired" not in c and "Failure" not in c


def test_printable_statuses():
    assert derive(None)["printableStatus"] == "Stopped"
    assert derive(None, Decision("create", "", ()))["printableStatus"] == "Starting"
    assert derive(None, Decision("none", "", (), wait_until=2000.0))["printableStatus"] == "CrashLoopBackOff"
    assert derive(None, Decision("create", "", ()), spec_error="bad")["printableStatus"] == "ErrorInvalidSpec"
    assert derive(pod("Pending", False))["printableStatus"] == "Starting"
    unsched = pod("Pending", False, conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}])
    assert derive(unsched)["printableStatus"] == "ErrorUnschedulable"
    pull = pod("Pending", False, containerStatuses=[{"state": {"waiting": {"reason": "ImagePullBackOff"}}}])
    assert derive(pull)["printableStatus"] == "ImagePullBackOff"
    assert derive(pod("Running", False))["printableStatus"] == "Starting"
    assert derive(pod(), Decision("delete", "", ()))["printableStatus"] == "Stopping"
    assert derive(pod("Succeeded", False))["printableStatus"] == "Stopped"
    assert derive(pod("Unknown", False))["printableStatus"] == "Unknown"
    deleting = {**VM, "metadata": {**VM["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert derive(pod(), vm=deleting)["printableStatus"] == "Terminating"


def test_restart_required_when_the_template_changed_under_a_live_pod():
    c = conds(derive(pod(hash_="old")))
    assert c["RestartRequired"]["status"] == "True" and c["RestartRequired"]["reason"] == "TemplateChanged"
    assert "RestartRequired" not in conds(derive(pod("Succeeded", hash_="old")))


def test_failure_condition_and_transition_times_are_kept():
    st = derive(None, spec_error="spec.x: bad")
    assert conds(st)["Failure"]["reason"] == "InvalidSpec"
    vm2 = {**VM, "status": st}
    again = status.derive(vm2, None, NONE, now=5000.0, current_hash=HASH, spec_error="spec.x: bad")
    assert conds(again)["Failure"]["lastTransitionTime"] == conds(st)["Failure"]["lastTransitionTime"]
    assert status.changed(st, again) == {}


def test_the_last_pods_record_outlives_it_while_a_restart_is_pending():
    prev = {**VM, "status": {"podName": "v-vm", "podUID": "p1", "podPhase": "Failed", "restartCount": 0}}
    st = status.derive(prev, None, Decision("none", "", (), wait_until=2000.0), now=1000.0, current_hash=HASH)
    assert st["podUID"] == "p1" and st["podPhase"] == "Failed"
    st = status.derive(prev, None, NONE, now=1000.0, current_hash=HASH)
    assert st["podUID"] is None
    st = status.derive(prev, pod(), Decision("create", "", ()), now=1000.0, current_hash=HASH, created=True)
    assert st["restartCount"] == 1


def test_start_failure_round_trip():
    d = Decision("none", "", (), start_failure=StartFailure(2, 1010.5, "p1"))
    st = derive(None, d)
    assert status.start_failure_of(st) == StartFailure(2, 1010.5, "p1")


def test_requests_annotation():
    reqs = (requests.Request("Stop", "p1"), requests.Request("Start"))
    value = requests.dump(reqs)
    assert requests.parse({requests.ANNOTATION: value}) == (reqs, None)
    assert requests.dump(()) is None and requests.parse({}) == ((), None)
    for bad in ("{", '{"action": "Start"}', '[{"action": "Reboot"}]', '[{"action": "Stop", "uid": 5}]'):
        got, err = requests.parse({requests.ANNOTATION: bad})
        assert got == () and err and requests.ANNOTATION in err


def test_malformed_state_change_requests_become_a_failure_condition():
    st = derive(pod(), requests_error="vmlet.dev/state-change-requests: not JSON")
    assert conds(st)["Failure"]["reason"] == "InvalidRequests"
    assert "not JSON" in conds(st)["Failure"]["message"]
    assert "Failure" not in conds(derive(pod())) or conds(derive(pod()))["Failure"]["status"] == "False"
