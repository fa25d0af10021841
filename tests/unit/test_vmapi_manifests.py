"""deploy/manifests: every file parses, RBAC grants what the controller calls, the parts agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from cri_shim import annotations as va
from vmapi import client, podspec, storage, types

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "manifests"


def docs():
    out = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.relative_to(MANIFESTS), doc))
    return out


def test_every_manifest_parses_and_names_its_kind():
    found = docs()
    assert len(found) >= 10
    for path, doc in found:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
    kinds = {d["kind"] for _, d in found}
    assert {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Deployment",
            "DaemonSet", "VirtualMachine", "Namespace"} <= kinds


def _get(kind, name):
    (doc,) = [d for _, d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _granted(role):
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    yield g, r, v


def _allows(granted, group, resource, verb):
    return any(g in (group, "*") and r in (resource, "*") and v in (verb, "*") for g, r, v in granted)


def test_controller_rbac_covers_every_call_and_no_more_than_needed():
    granted = set(_granted(_get("ClusterRole", "vmlet-controller")))
    needed = client.controller_permissions()
    missing = [k for k in needed if not _allows(granted, *k)]
    assert not missing, f"vmlet-controller lacks {missing}"
    assert not any("*" in k for k in granted), "no wildcards in the controller's role"
    assert not _allows(granted, "", "secrets", "get") and not _allows(granted, "", "pods", "update")
    extra = {k for k in granted if k not in needed} - {("vmlet.dev", "virtualmachines", "get"),
                                                       ("kopf.dev", "clusterkopfpeerings", "get")}
    assert not extra, f"granted but never called: {extra}"


def test_the_parts_agree():
    binding = _get("ClusterRoleBinding", "vmlet-controller")
    deploy = _get("Deployment", "vmlet-controller")
    pod = deploy["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert binding["subjects"][0]["namespace"] == deploy["metadata"]["namespace"]
    assert "vmapi.operator" in pod["containers"][0]["command"]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    ds = _get("DaemonSet", "vmlet-node")
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == podspec.NODE_SELECTOR
    names = {c["name"] for c in ds["spec"]["template"]["spec"]["containers"]}
    assert names == {"libvirtd", "vmlet", "criproxy"}
    crd = _get("CustomResourceDefinition", f"{types.PLURAL}.{types.GROUP}")
    assert crd["spec"]["group"] == types.GROUP


def test_sample_vm_is_valid_and_renders():
    vm = _get("VirtualMachine", "testvm")
    types.VirtualMachine.model_validate(vm)
    vm = {**vm, "metadata": {**vm["metadata"], "namespace": "default", "uid": "u"}}
    assert podspec.render(vm)["metadata"]["name"] == "testvm-vm"


def test_persistent_sample_renders_claims_and_a_pod_the_node_accepts():
    vm = _get("VirtualMachine", "dbvm")
    types.VirtualMachine.model_validate(vm)
    vm = {**vm, "metadata": {**vm["metadata"], "namespace": "default", "uid": "u"}}
    plan = podspec.prepare(vm).plan
    claims = {r.claim: storage.claim_manifest(vm, plan, r) for r in plan.claims}
    assert set(claims) == {"root-dbvm", "data-dbvm"} and all(r.template is not None for r in plan.claims)
    for c in claims.values():
        assert c["metadata"]["ownerReferences"][0]["uid"] == "u"
    pod = podspec.render(vm, claims)
    parsed = va.VMAnnotations.from_pod_annotations(pod["metadata"]["annotations"])
    assert [(d.name, d.source, d.root) for d in parsed.disks] == [
        ("root", "volume", True), ("data", "device", False), ("scratch", "emptyDisk", False)]
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {f"{storage.DISK_DIR}/root", "/etc/app"}
    config = _get("ConfigMap", "dbvm-config")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["app-config"]["configMap"]["name"] == config["metadata"]["name"]


def test_node_containers_see_pod_volumes_and_each_others_shares():
    """Pod volumes go to VMs over virtio-fs (cri_shim/storage/pod_volumes.py): vmlet resolves the kubelet's host
    paths and bind-mounts read-only shares under its state dir; libvirtd's virtiofsd serves both. So both
    containers see /var/lib/kubelet with the volumes mounted after they started, and vmlet's mounts under
    /var/lib/vmlet propagate out to the host and from there into libvirtd, at the same paths."""
    pod = _get("DaemonSet", "vmlet-node")["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    containers = {c["name"]: c for c in pod["containers"]}

    def mount(container, path):
        found = [m for m in containers[container]["volumeMounts"] if m["mountPath"] == path]
        assert len(found) == 1, f"{container} should mount {path} once: {found}"
        (m,) = found
        assert host_paths[m["name"]] == path, (container, m)
        return m

    sees_host_mounts = ("HostToContainer", "Bidirectional")
    for name in ("vmlet", "libvirtd"):
        assert mount(name, "/var/lib/kubelet").get("mountPropagation") in sees_host_mounts, name
        assert not mount(name, "/var/lib/kubelet").get("readOnly"), name  # vmlet creates missing volume dirs
    assert mount("vmlet", "/var/lib/vmlet").get("mountPropagation") == "Bidirectional"
    assert mount("libvirtd", "/var/lib/vmlet").get("mountPropagation") in sees_host_mounts
    command = containers["vmlet"]["command"]
    assert command[command.index("--state-dir") + 1] == "/var/lib/vmlet"

    # The API server refuses Bidirectional propagation in an unprivileged container.
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        if any(m.get("mountPropagation") == "Bidirectional" for m in c.get("volumeMounts", [])):
            assert c.get("securityContext", {}).get("privileged") is True, c["name"]
