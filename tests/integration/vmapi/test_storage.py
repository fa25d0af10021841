"""Disks and volumes through the real operator on kmock: claims from templates, missing and pending claims.

kmock has no PV controller and no garbage collector: the test binds claims itself (status.phase) and
checks owner references instead of cascading deletes.
"""

from __future__ import annotations

import dataclasses

import kmock
import pytest

from cri_shim import annotations as va
from tests.integration.vmapi import faults
from tests.integration.vmapi.harness import FAST, Operator, vm_manifest, wait_for
from tests.integration.vmapi.test_run_strategies import running
from vmapi import client, storage, types

pytestmark = pytest.mark.asyncio


def storage_vm(name: str, retain: bool = False, run_strategy: str = "Always") -> dict:
    vm = vm_manifest(name, run_strategy)
    vmi = vm["spec"]["template"]["spec"]
    vmi["domain"]["rootDisk"] = {"image": "virtlet.cloud/testvm", "volume": "root"}
    vmi["domain"]["disks"] = [{"name": "data", "cache": "none", "io": "native"}, {"name": "scratch"},
                              {"name": "seed"}]
    vmi["domain"]["filesystems"] = [{"name": "conf", "mountPath": "/etc/app"}]
    vmi["volumes"] = [{"name": "root", "persistentVolumeClaim": {"claimName": "root"}},
                      {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                      {"name": "scratch", "emptyDisk": {"capacity": "1Gi"}},
                      {"name": "seed", "configMap": {"name": "seed"}},
                      {"name": "conf", "secret": {"secretName": "conf"}}]
    vm["spec"]["volumeClaimTemplates"] = [
        {"metadata": {"name": "root", "labels": {"tier": "db"}},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}},
        {"metadata": {"name": "data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "resources": {"requests": {"storage": "5Gi"}}}}]
    if retain:
        vm["spec"]["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Retain"}
    return vm


def with_claim(name: str, claim: str, run_strategy: str = "Always") -> dict:
    """A VM with one data disk on a claim made by someone else."""
    vm = vm_manifest(name, run_strategy)
    vmi = vm["spec"]["template"]["spec"]
    vmi["domain"]["disks"] = [{"name": "data"}]
    vmi["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    return vm


def _requests(server, kind):
    return [i for i, r in enumerate(server.log) if faults.from_controller(r) and faults.request_kind(r) == kind]


async def test_templates_make_owned_claims_before_the_pod_which_gets_every_kind_of_disk(server, cluster, operator):
    vm = await cluster.create_vm_manifest(storage_vm("db"))
    pod = await cluster.wait_pod("db")
    root, data = await cluster.claim("root-db"), await cluster.claim("data-db")
    for claim in (root, data):
        assert claim["metadata"]["labels"][types.LABEL_VM] == "db"
        assert claim["metadata"]["ownerReferences"] == [{
            "apiVersion": types.API_VERSION, "kind": types.KIND, "name": "db", "uid": vm["metadata"]["uid"],
            "controller": False, "blockOwnerDeletion": True}]
    assert root["metadata"]["labels"]["tier"] == "db"
    assert root["spec"]["volumeMode"] == "Filesystem" and data["spec"]["volumeMode"] == "Block"
    assert max(_requests(server, "persistentvolumeclaims:create")) < min(_requests(server, "pods:create"))

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["root"]["persistentVolumeClaim"]["claimName"] == "root-db"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "data-db"
    (c,) = pod["spec"]["containers"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/vmlet/disks/root", "/vmlet/config/seed", "/etc/app"}
    assert c["volumeDevices"] == [{"name": "data", "devicePath": "/dev/vmlet/data"}]
    disks = va.VMAnnotations.from_pod_annotations(pod["metadata"]["annotations"]).disks
    assert [(d.name, d.source, d.root) for d in disks] == [
        ("root", "volume", True), ("data", "device", False), ("scratch", "emptyDisk", False),
        ("seed", "configVolume", False)]
    assert disks[0].capacity == storage.disk_capacity(10 * 1024 ** 3)

    # The claims are Pending (no PV controller): the pod exists, as WaitForFirstConsumer binding needs.
    st = await cluster.wait_status("db", "WaitingForVolumeBinding")
    vs = {s["name"]: s for s in st["volumeStatus"]}
    assert vs["root"]["phase"] == "Pending" and vs["root"]["reason"] == "WaitingForVolumeBinding"
    assert vs["data"]["persistentVolumeClaimInfo"]["volumeMode"] == "Block"
    assert vs["conf"] == {"name": "conf", "target": "/etc/app"}
    assert any("root-db" in e["message"] for e in await cluster.events("WaitingForVolumeBinding"))
    assert {e["message"] for e in await cluster.events("SuccessfulCreate")} >= {
        "created PersistentVolumeClaim root-db", "created PersistentVolumeClaim data-db"}

    await cluster.bind_claim("root-db", capacity="12Gi")
    await cluster.bind_claim("data-db")
    await cluster.wait_status("db", "Starting")
    await running(cluster, "db")
    st = await cluster.status("db")
    vs = {s["name"]: s for s in st["volumeStatus"]}
    assert vs["root"]["phase"] == "Bound" and "reason" not in vs["root"]
    assert vs["root"]["persistentVolumeClaimInfo"]["capacity"] == {"storage": "12Gi"}
    assert vs["root"]["target"] == "/dev/disk/by-id/virtio-root"
    assert (await cluster.pod("db"))["metadata"]["uid"] == pod["metadata"]["uid"]  # binding did not restart it


async def test_retained_claims_have_no_owner_and_the_policy_can_change(cluster, operator):
    await cluster.create_vm_manifest(storage_vm("keep", retain=True))
    await cluster.wait_pod("keep")
    for name in ("root-keep", "data-keep"):
        assert not (await cluster.claim(name))["metadata"].get("ownerReferences")

    vm = await cluster.patch_vm("keep", {"spec": {"persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete"}}})

    async def owned(name, want):
        refs = (await cluster.claim(name))["metadata"].get("ownerReferences") or []
        return [r["uid"] for r in refs] == ([vm["metadata"]["uid"]] if want else [])
    for name in ("root-keep", "data-keep"):
        await wait_for(lambda: owned(name, True), 3, f"{name} owned by the VM")
    await cluster.patch_vm("keep", {"spec": {"persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain"}}})
    for name in ("root-keep", "data-keep"):
        await wait_for(lambda: owned(name, False), 3, f"{name} released")


async def test_a_missing_claim_holds_the_pod_back_until_it_appears(server, kubeconfig, cluster):
    # A resync far away: what starts the VM must be the claim's own event.
    op = await Operator(server, kubeconfig, dataclasses.replace(FAST, resync_seconds=600.0)).start()
    try:
        await cluster.create_vm_manifest(with_claim("lone", "shared"))
        st = await cluster.wait_status("lone", "ErrorPvcNotFound", created=False)
        (vs,) = st["volumeStatus"]
        assert (vs["reason"], vs["persistentVolumeClaimInfo"]) == ("PvcNotFound", {"claimName": "shared"})
        ready = next(c for c in st["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "PvcNotFound" and "'shared' not found" in ready["message"]
        assert not any(c["type"] == "Failure" for c in st["conditions"])
        events = await cluster.events("ErrorPvcNotFound")
        assert events and events[0]["type"] == "Warning" and "'shared' not found" in events[0]["message"]
        assert await cluster.pod("lone") is None

        await cluster.create_claim("shared", "4Gi", phase="Bound")
        pod = await cluster.wait_pod("lone", timeout=3)
        (disk,) = va.VMAnnotations.from_pod_annotations(pod["metadata"]["annotations"]).disks
        assert disk.source == "volume" and disk.capacity == storage.disk_capacity(4 * 1024 ** 3)
        await running(cluster, "lone")
    finally:
        await op.stop()


async def test_a_restarted_controller_routes_claim_events_again(server, kubeconfig, cluster):
    slow = dataclasses.replace(FAST, resync_seconds=600.0)
    op = await Operator(server, kubeconfig, slow).start()
    await cluster.create_vm_manifest(with_claim("later", "late-claim"))
    await cluster.wait_status("later", "ErrorPvcNotFound")
    await op.stop()
    op = await Operator(server, kubeconfig, slow).start()
    try:
        await wait_for(lambda: ("default", "late-claim") in op.memo["vmlet"].claim_users, 3, "the first pass")
        await cluster.create_claim("late-claim", mode="Block")
        pod = await cluster.wait_pod("later", timeout=3)
        assert pod["spec"]["containers"][0]["volumeDevices"] == [{"name": "data", "devicePath": "/dev/vmlet/data"}]
    finally:
        await op.stop()


async def test_a_deleted_template_claim_is_made_again_before_the_next_pod(cluster, operator):
    await cluster.create_vm_manifest(storage_vm("again", run_strategy="Manual"))
    first = await cluster.wait_claim("root-again")
    await cluster.wait_status("again", "Stopped")  # claims are made for a stopped VM too (KubeVirt's DataVolumes)
    await cluster.delete_claim("root-again")
    second = await cluster.wait_claim("root-again")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]


async def test_a_spec_with_storage_that_cannot_be_is_an_invalid_spec_and_makes_no_claim(cluster, operator):
    vm = storage_vm("broken")
    vm["spec"]["template"]["spec"]["domain"]["disks"].append({"name": "ghost"})
    await cluster.create_vm_manifest(vm)
    st = await cluster.wait_status("broken", "ErrorInvalidSpec")
    failure = next(c for c in st["conditions"] if c["type"] == "Failure")
    assert "spec.template.spec.domain.disks[3].name: 'ghost' names no volume" in failure["message"]
    assert await cluster.claim("root-broken") is None and await cluster.pod("broken") is None
    # A claim that cannot hold the disk is an invalid spec too, found once the claim is read.
    await cluster.create_claim("tiny", "1Mi")
    await cluster.create_vm_manifest(with_claim("small", "tiny"))
    st = await cluster.wait_status("small", "ErrorInvalidSpec")
    assert "claim 'tiny' requests '1Mi'" in next(c for c in st["conditions"] if c["type"] == "Failure")["message"]


async def test_a_failing_claim_create_is_reported_and_retried(server, cluster, operator):
    server.fail_when = lambda req: (req.action == kmock.action.CREATE and req.resource is not None
                                    and req.resource.plural == "persistentvolumeclaims")
    await cluster.create_vm_manifest(storage_vm("flaky"))
    st = await wait_for(lambda: _failure(cluster, "flaky"), 5, "an ActionFailed condition")
    assert st["reason"] == "ActionFailed" and "create persistentvolumeclaim" in st["message"] and "500" in st["message"]
    assert (await cluster.status("flaky"))["printableStatus"] == "Starting"  # the template will make it
    assert await cluster.pod("flaky") is None
    server.fail_when = None
    await cluster.wait_pod("flaky", timeout=8)
    await wait_for(lambda: _no_failure(cluster, "flaky"), 5, "the Failure condition to clear")


async def _failure(cluster, name):
    return next((c for c in (await cluster.status(name)).get("conditions") or []
                 if c["type"] == "Failure" and c["status"] == "True"), None)


async def _no_failure(cluster, name):
    return await _failure(cluster, name) is None


async def test_every_storage_call_is_granted_by_the_rbac(server, cluster, operator):
    await cluster.create_vm_manifest(storage_vm("rbac", retain=True))
    await cluster.wait_pod("rbac")
    await cluster.patch_vm("rbac", {"spec": {"persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete"}}})
    await wait_for(lambda: _has_owner(cluster, "root-rbac"), 3, "the adoption patch")
    allowed = client.controller_permissions()
    seen = set()
    for req in server.log:
        kind = faults.request_kind(req)
        if kind and faults.from_controller(req) and kind.startswith("persistentvolumeclaims"):
            resource, verb = kind.split(":")
            seen.add((req.resource.group, resource, verb))
    assert {("", "persistentvolumeclaims", v) for v in ("get", "create", "patch", "list", "watch")} <= seen
    assert seen <= set(allowed), seen - set(allowed)


async def _has_owner(cluster, name):
    return bool((await cluster.claim(name))["metadata"].get("ownerReferences"))


async def test_deleting_the_vm_leaves_the_claims_to_the_garbage_collector(cluster, operator):
    vm = await cluster.create_vm_manifest(storage_vm("gone"))
    await cluster.wait_pod("gone")
    await cluster.delete_vm("gone")
    await cluster.wait_no_pod("gone")
    await wait_for(lambda: _vm_gone(cluster, "gone"), 5, "the VM to be gone")
    # kmock has no garbage collector: the claims are still there, owned by the deleted VM's uid.
    claim = await cluster.claim("root-gone")
    assert [r["uid"] for r in claim["metadata"]["ownerReferences"]] == [vm["metadata"]["uid"]]

    # A new VM of the same name does not take over a claim the collector is about to delete.
    await cluster.create_vm_manifest(storage_vm("gone"))
    await wait_for(lambda: _reason_is(cluster, "gone", "root", "PvcOwnedByAnotherVM"), 3, "the claim to be refused")
    assert (await cluster.status("gone"))["printableStatus"] == "Starting" and await cluster.pod("gone") is None
    await cluster.delete_claim("root-gone")  # the collector's part
    await cluster.delete_claim("data-gone")
    pod = await cluster.wait_pod("gone", timeout=5)
    assert pod["metadata"]["ownerReferences"][0]["uid"] != vm["metadata"]["uid"]


async def _reason_is(cluster, vm_name, volume, reason):
    return any(s["name"] == volume and s.get("reason") == reason
               for s in (await cluster.status(vm_name)).get("volumeStatus") or [])


async def _vm_gone(cluster, name):
    return await cluster.vm(name) is None

