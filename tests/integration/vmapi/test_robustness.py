"""Bad specs, API errors, controller restarts, two controllers at once, and RBAC vs what is called."""

from __future__ import annotations

import asyncio
import dataclasses

import kmock
import pytest

from vmapi import client, podspec, types
from tests.integration.vmapi import faults
from tests.integration.vmapi.harness import FAST, Operator, vm_manifest, wait_for
from tests.integration.vmapi.test_run_strategies import _condition, quiet, running

pytestmark = pytest.mark.asyncio


async def test_a_spec_the_schema_cannot_judge_becomes_a_condition_not_a_crash(cluster, operator):
    # Passes the CRD schema, but the node would refuse it: user data that is not a YAML mapping,
    # a root disk over the node runtime's 16Ti limit.
    await cluster.create_vm("bad", cloudInit={"userData": "- just\n- a list\n"})
    huge = vm_manifest("huge")
    huge["spec"]["template"]["spec"]["domain"]["rootDisk"]["size"] = "20Ti"
    await cluster.create_vm_manifest(huge)
    await cluster.create_vm("good")  # the controller keeps serving the others
    await running(cluster, "good")

    for name, needle in (("bad", "VirtletCloudInitUserData"), ("huge", "VirtletRootVolumeSize")):
        st = await cluster.wait_status(name, "ErrorInvalidSpec")
        cond = await _condition(cluster, name, "Failure")
        assert cond["reason"] == "InvalidSpec" and needle in cond["message"], cond
        assert st["created"] is False and await cluster.pod(name) is None
    assert any(needle in e["message"] for e in await cluster.events("InvalidSpec")
               for needle in ["VirtletCloudInitUserData"])

    await cluster.patch_vm("bad", {"spec": {"template": {"spec": {"cloudInit": {"userData": "#cloud-config\n{}"}}}}})
    await running(cluster, "bad")
    assert await _condition(cluster, "bad", "Failure") is None

    # A malformed request annotation is dropped, never fatal. (The InvalidRequests condition it raises lasts
    # only until the next pass, which can follow within milliseconds: polling for it raced, so the durable
    # effects are checked here; tests/unit/test_vmapi_status.py covers the condition.)
    await cluster.patch_vm("good", {"metadata": {"annotations": {"vmlet.dev/state-change-requests": "{nope"}}})
    await wait_for(lambda: _annotation_gone(cluster, "good"), 3, "the bad annotation to be dropped")
    await cluster.wait_status("good", "Running")


async def _annotation_gone(cluster, name):
    vm = await cluster.vm(name)
    return "vmlet.dev/state-change-requests" not in (vm["metadata"].get("annotations") or {})


async def test_api_errors_are_retried_with_back_off(server, cluster, operator):
    server.fail_when = lambda req: (req.action == kmock.action.CREATE and req.resource is not None
                                    and req.resource.plural == "pods")
    await cluster.create_vm("e")
    cond = await wait_for(lambda: _condition(cluster, "e", "Failure"), 5, "an ActionFailed condition")
    assert cond["reason"] == "ActionFailed" and "500" in cond["message"]
    await wait_for(lambda: cluster.events("FailedCreate"), 5, "a FailedCreate event")
    server.fail_when = None  # the API server is back: the retry (after back-off) creates the pod
    await cluster.wait_pod("e", timeout=8)
    await cluster.kubelet("e", "Running")
    await cluster.wait_status("e", "Running", timeout=8)
    assert await _condition(cluster, "e", "Failure") is None


async def test_passes_hung_on_the_api_server_do_not_stall_the_other_vms(server, kubeconfig, cluster):
    """Passes run in the controller's own thread pool, not asyncio's default executor (at most 32
    threads, 6 on 2 cores): more hung passes than that must leave the other VMs served."""
    hung = {f"hung{i}" for i in range(36)}

    def hang_their_gets(request):
        if (request.name in hung and faults.request_kind(request) == f"{types.PLURAL}:get"
                and faults.from_controller(request)):
            return faults.Fault("hang")
        return None

    def hanging() -> int:
        return sum(1 for r in list(server._requests.inflight.values())
                   if r.name in hung and faults.request_kind(r) == f"{types.PLURAL}:get")

    server.faults = hang_their_gets
    # Deadlines far past the test's waits: a hung pass holds its thread until the test releases it.
    op = await Operator(server, kubeconfig, dataclasses.replace(FAST, request_timeout=120.0, workers=48)).start()
    try:
        for name in sorted(hung):
            await cluster.create_vm(name)
        await wait_for(lambda: hanging() == len(hung), 10, f"{len(hung)} hung passes")
        await cluster.create_vm("free")
        await cluster.wait_pod("free", timeout=5)
        assert hanging() == len(hung)
    finally:
        server.faults = None
        server.released.set()  # the hung answers end: their passes fail and the operator can stop
        await op.stop()


async def test_controller_restart_converges_on_what_changed_meanwhile(server, kubeconfig, cluster):
    op = await Operator(server, kubeconfig).start()
    await cluster.create_vm("keep")
    await cluster.create_vm("drained")
    await cluster.create_vm("halt")
    kept = await running(cluster, "keep")
    drained = await running(cluster, "drained")
    await running(cluster, "halt")
    await op.stop()

    await cluster.delete_pod("drained")
    await cluster.patch_vm("halt", {"spec": {"runStrategy": "Halted"}})
    await cluster.create_vm("new")
    await asyncio.sleep(0.2)
    assert await cluster.pod("new") is None  # nobody is running the controller

    op2 = await Operator(server, kubeconfig).start()
    try:
        await running(cluster, "drained", other_than=drained["metadata"]["uid"])
        await running(cluster, "new")
        await cluster.wait_no_pod("halt")
        await cluster.wait_status("halt", "Stopped")
        await quiet(op2, cluster, "keep")
        assert (await cluster.pod("keep"))["metadata"]["uid"] == kept["metadata"]["uid"]  # untouched
        st = await cluster.status("keep")
        assert st["restartCount"] == 0 and st["printableStatus"] == "Running"
    finally:
        await op2.stop()


async def test_two_controllers_at_once_make_one_pod(server, kubeconfig, cluster):
    a, b = await Operator(server, kubeconfig).start(), await Operator(server, kubeconfig).start()
    try:
        for i in range(5):
            await cluster.create_vm(f"twin{i}")
        for i in range(5):
            await running(cluster, f"twin{i}")
        pods = [p for p in server.objects.values() if not p.deleted and p.get("kind") == "Pod"
                and p["metadata"]["name"].startswith("twin")]
        assert len(pods) == 5
        await cluster.delete_pod("twin0")
        await running(cluster, "twin0")
        assert (await cluster.status("twin0"))["restartCount"] == 1
        assert a.passes > 0 and b.passes > 0
    finally:
        await a.stop()
        await b.stop()


async def test_every_call_the_controller_makes_is_granted_by_the_rbac(server, cluster, operator):
    """The declared table (client.controller_permissions) against what the operator really sent."""
    await cluster.create_vm("p")
    await running(cluster, "p")
    await cluster.patch_vm("p", {"spec": {"runStrategy": "Halted"}})
    await cluster.wait_no_pod("p")
    await cluster.delete_vm("p")
    await wait_for(lambda: _vm_gone(cluster, "p"), 5, "VM deleted")
    verbs = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
             kmock.action.CREATE: "create", kmock.action.UPDATE: "patch", kmock.action.DELETE: "delete"}
    allowed = client.controller_permissions()
    seen = set()
    for req in server.log:
        agent = req.headers.get("User-Agent", "")
        if req.resource is None or not req.resource.plural or not agent.startswith(("kopf/", "vmlet-controller")):
            continue
        resource = req.resource.plural + (f"/{req.subresource}" if req.subresource else "")
        seen.add((req.resource.group, resource, verbs[req.action]))
    assert seen, "no requests recorded from the operator"
    assert seen <= set(allowed), f"not in client.controller_permissions: {seen - set(allowed)}"
    assert (("", "pods", "create") in seen and ("", "events", "create") in seen
            and ("vmlet.dev", "virtualmachines/status", "patch") in seen)


async def _vm_gone(cluster, name):
    return await cluster.vm(name) is None


def test_pod_name_stays_a_valid_label_value():
    assert len(podspec.pod_name("x" * 60)) == 63
