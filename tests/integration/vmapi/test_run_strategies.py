"""Every runStrategy against the real operator on kmock; the test plays the kubelet and the users."""

from __future__ import annotations

import pytest

from vmapi import requests
from tests.integration.vmapi.harness import wait_for

pytestmark = pytest.mark.asyncio


async def running(cluster, name, **kw):
    """Wait for the pod, let the 'kubelet' run it, wait until the VM reports Running."""
    pod = await cluster.wait_pod(name, **kw)
    await cluster.kubelet(name, "Running")
    await cluster.wait_status(name, "Running", ready=True, podUID=pod["metadata"]["uid"])
    return pod


async def quiet(operator, cluster, name, passes=3):
    """Let the worker of `name` make a few more passes (resync is 2 s in tests; nudge it instead)."""
    start = operator.passes
    for _ in range(passes):
        await cluster.patch_vm(name, {"metadata": {"labels": {"nudge": str(operator.passes)}}})
        await wait_for(lambda: operator.passes > start, 3, "another reconcile pass")
        start = operator.passes


async def request(cluster, name, *reqs):
    await cluster.patch_vm(name, {"metadata": {"annotations": {requests.ANNOTATION: requests.dump(reqs)}}})


async def test_always_recreates_a_pod_deleted_by_a_drain_and_replaces_finished_ones(cluster, operator):
    await cluster.create_vm("a", "Always")
    first = await running(cluster, "a")
    assert (await cluster.status("a"))["restartCount"] == 0

    await cluster.delete_pod("a")  # drain / node failure
    second = await running(cluster, "a", other_than=first["metadata"]["uid"])
    assert (await cluster.status("a"))["restartCount"] == 1

    await cluster.kubelet("a", "Succeeded")  # the guest powered itself off
    third = await running(cluster, "a", other_than=second["metadata"]["uid"])

    await cluster.kubelet("a", "Failed")  # QEMU crashed
    await running(cluster, "a", other_than=third["metadata"]["uid"])
    st = await cluster.status("a")
    assert st["restartCount"] == 3 and st["runStrategy"] == "Always"
    reasons = {e["reason"] for e in await cluster.events()}
    assert {"SuccessfulCreate", "SuccessfulDelete", "Running", "Starting"} <= reasons


async def test_always_backs_off_a_crash_loop(cluster, operator):
    await cluster.create_vm("c", "Always")
    pod = await running(cluster, "c")
    for _ in range(2):  # two failures in a row, no Running in between for the second
        await cluster.kubelet("c", "Failed")
        pod = await cluster.wait_pod("c", other_than=pod["metadata"]["uid"])
    await cluster.kubelet("c", "Failed")
    st = await cluster.wait_status("c", "CrashLoopBackOff")
    assert st["startFailure"]["consecutiveFailCount"] >= 2
    await cluster.wait_pod("c", other_than=pod["metadata"]["uid"], timeout=5)  # after the back-off
    await cluster.kubelet("c", "Running")
    st = await cluster.wait_status("c", "Running")
    assert st.get("startFailure") is None
    assert any(e["type"] == "Warning" for e in await cluster.events("CrashLoopBackOff"))


async def test_rerun_on_failure_leaves_a_guest_that_powered_off_stopped(cluster, operator):
    await cluster.create_vm("r", "RerunOnFailure")
    pod = await running(cluster, "r")
    await cluster.kubelet("r", "Failed")
    pod = await running(cluster, "r", other_than=pod["metadata"]["uid"])

    await cluster.delete_pod("r")  # vanished while running: a failure too
    pod = await running(cluster, "r", other_than=pod["metadata"]["uid"])

    await cluster.kubelet("r", "Succeeded")
    await cluster.wait_status("r", "Stopped", ready=False)
    await quiet(operator, cluster, "r")
    assert (await cluster.pod("r"))["metadata"]["uid"] == pod["metadata"]["uid"]  # kept, not replaced
    await cluster.delete_pod("r")  # clearing away the finished pod does not start it either
    await quiet(operator, cluster, "r")
    assert await cluster.pod("r") is None
    assert (await cluster.status("r"))["printableStatus"] == "Stopped"


async def test_once_runs_one_pod_and_never_another(cluster, operator):
    await cluster.create_vm("o", "Once")
    await running(cluster, "o")
    await cluster.kubelet("o", "Failed")
    await cluster.wait_status("o", "Stopped")
    await quiet(operator, cluster, "o")
    assert (await cluster.pod("o"))["status"]["phase"] == "Failed"
    await cluster.delete_pod("o")
    await quiet(operator, cluster, "o")
    assert await cluster.pod("o") is None


async def test_manual_waits_for_requests(cluster, operator):
    await cluster.create_vm("m", "Manual")
    await cluster.wait_status("m", "Stopped", created=False)
    await quiet(operator, cluster, "m")
    assert await cluster.pod("m") is None

    await request(cluster, "m", requests.Request("Start"))
    pod = await running(cluster, "m")
    await wait_for(lambda: _no_requests(cluster, "m"), 3, "the Start request to be consumed")

    await request(cluster, "m", requests.Request("Stop", pod["metadata"]["uid"]), requests.Request("Start"))
    pod2 = await running(cluster, "m", other_than=pod["metadata"]["uid"])

    await cluster.kubelet("m", "Succeeded")  # powered off: Manual does not restart
    await cluster.wait_status("m", "Stopped")
    await quiet(operator, cluster, "m")
    assert (await cluster.pod("m"))["metadata"]["uid"] == pod2["metadata"]["uid"]

    await request(cluster, "m", requests.Request("Stop", pod2["metadata"]["uid"]))
    await cluster.wait_no_pod("m")
    await cluster.wait_status("m", "Stopped", created=False)
    await wait_for(lambda: _no_requests(cluster, "m"), 3, "the Stop request to be consumed")


async def _no_requests(cluster, name):
    vm = await cluster.vm(name)
    return requests.ANNOTATION not in (vm["metadata"].get("annotations") or {})


async def test_halted_removes_the_pod_and_always_brings_it_back(cluster, operator):
    await cluster.create_vm("h", "Halted")
    await cluster.wait_status("h", "Stopped")
    assert await cluster.pod("h") is None
    await cluster.patch_vm("h", {"spec": {"runStrategy": "Always"}})
    pod = await running(cluster, "h")
    await cluster.patch_vm("h", {"spec": {"runStrategy": "Halted"}})
    await cluster.wait_no_pod("h")
    st = await cluster.wait_status("h", "Stopped", runStrategy="Halted")
    assert st["observedGeneration"] == 3
    await cluster.patch_vm("h", {"spec": {"runStrategy": "RerunOnFailure"}})  # switching to it starts it
    await running(cluster, "h", other_than=pod["metadata"]["uid"])


async def test_template_change_under_a_running_vm_requires_a_restart(cluster, operator):
    await cluster.create_vm("t", "Always")
    pod = await running(cluster, "t")
    await cluster.patch_vm("t", {"spec": {"template": {"spec": {"domain": {"cpu": {"cores": 4}}}}}})
    st = await wait_for(lambda: _condition(cluster, "t", "RestartRequired"), 3, "RestartRequired")
    assert st["reason"] == "TemplateChanged"
    assert (await cluster.pod("t"))["metadata"]["uid"] == pod["metadata"]["uid"]  # not restarted by itself
    events = await cluster.events("TemplateChanged")
    assert events and events[0]["type"] == "Warning"

    await request(cluster, "t", requests.Request("Stop", pod["metadata"]["uid"]), requests.Request("Start"))
    new = await running(cluster, "t", other_than=pod["metadata"]["uid"])
    assert new["metadata"]["annotations"]["VirtletVCPUCount"] == "4"
    assert await _condition(cluster, "t", "RestartRequired") is None


async def _condition(cluster, name, type_):
    for c in (await cluster.status(name)).get("conditions") or []:
        if c["type"] == type_ and c["status"] == "True":
            return c
    return None


async def test_deleting_the_vm_deletes_its_pod(cluster, operator):
    await cluster.create_vm("d", "Always")
    await running(cluster, "d")
    await cluster.delete_vm("d")
    await cluster.wait_no_pod("d")
    await wait_for(lambda: _gone(cluster, "d"), 5, "the VM to be gone (finalizer released)")


async def _gone(cluster, name):
    return await cluster.vm(name) is None


async def test_a_pod_of_the_same_name_not_owned_by_the_vm_is_left_alone(cluster, operator):
    await cluster.call(cluster.core.create_namespaced_pod, "default",
                       {"metadata": {"name": "x-vm", "namespace": "default"},
                        "spec": {"containers": [{"name": "c", "image": "nginx"}]}})
    await cluster.create_vm("x", "Always")
    cond = await wait_for(lambda: _condition(cluster, "x", "Failure"), 3, "a Failure condition")
    assert cond["reason"] == "PodConflict"
    assert "ownerReferences" not in (await cluster.pod("x"))["metadata"]
