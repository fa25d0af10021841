"""A VM pod whose VM is gone is deleted (what the API server's garbage collector would do), never another pod."""

from __future__ import annotations

from vmapi import podspec, reconcile, types


class FakeKube:
    def __init__(self, pods=None, vms=None):
        self.pods, self.vms, self.deleted = dict(pods or {}), dict(vms or {}), []

    def get_pod(self, namespace, name):
        return self.pods.get(name)

    def get_vm(self, namespace, name):
        return self.vms.get(name)

    def delete_pod(self, namespace, name, uid=None):
        self.deleted.append((name, uid))
        return self.pods.pop(name, None) is not None


def pod_of(vm_uid, kind=types.KIND, controller=True, terminating=False):
    meta = {"name": podspec.pod_name("vm1"), "uid": "pod-uid",
            "ownerReferences": [{"kind": kind, "uid": vm_uid, "controller": controller}]}
    if terminating:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    return {"metadata": meta}


def vm(uid):
    return {"metadata": {"name": "vm1", "namespace": "default", "uid": uid}}


def test_the_pod_of_a_vm_that_is_gone_is_deleted_with_its_uid():
    kube = FakeKube(pods={podspec.pod_name("vm1"): pod_of("old-uid")})
    assert reconcile.delete_orphan_pod(kube, "default", "vm1")
    assert kube.deleted == [(podspec.pod_name("vm1"), "pod-uid")]


def test_the_pod_of_a_vm_that_was_recreated_under_the_same_name_is_an_orphan_too():
    kube = FakeKube(pods={podspec.pod_name("vm1"): pod_of("old-uid")}, vms={"vm1": vm("new-uid")})
    assert reconcile.delete_orphan_pod(kube, "default", "vm1")


def test_a_live_vms_pod_and_pods_that_are_not_a_vms_are_left_alone():
    for kube in (FakeKube(pods={podspec.pod_name("vm1"): pod_of("uid")}, vms={"vm1": vm("uid")}),
                 FakeKube(pods={podspec.pod_name("vm1"): pod_of("uid", kind="ReplicaSet")}),
                 FakeKube(pods={podspec.pod_name("vm1"): pod_of("uid", controller=False)}),
                 FakeKube(pods={podspec.pod_name("vm1"): pod_of("uid", terminating=True)}),
                 FakeKube()):
        assert not reconcile.delete_orphan_pod(kube, "default", "vm1")
        assert kube.deleted == []
