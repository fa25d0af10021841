"""deploy/manifests: every file parses, RBAC grants what the controller calls, the parts agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from cri_shim import annotations as va
from vmapi import client, guest_info, podspec, storage, types

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
    assert names == {"libvirtd", "vmlet", "criproxy", "guest-info"}
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


def test_guest_info_reporter_has_its_own_least_privilege_credentials():
    """The reporter (vmapi/guest_info.py) in the node DaemonSet: its own ServiceAccount's role grants
    exactly what vmapi.guest_info.PERMISSIONS declares (get/list/watch pods and VMs, patch VM status), its
    token reaches that container only, and it reads the CRI socket vmlet serves."""
    role = set(_granted(_get("ClusterRole", "vmlet-guest-info")))
    assert role == set(guest_info.PERMISSIONS)
    assert not _allows(role, "", "secrets", "get") and not _allows(role, "vmlet.dev", "virtualmachines", "patch")
    for method in ("Kube.get_pod", "Kube.get_vm"):  # the reads it makes through vmapi.client
        assert all(k in guest_info.PERMISSIONS for k, v in client.USED.items() if v == method), method
    binding = _get("ClusterRoleBinding", "vmlet-guest-info")
    assert binding["roleRef"]["name"] == "vmlet-guest-info"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "vmlet-guest-info", "namespace": "vmlet-system"}]
    secret = _get("Secret", "vmlet-guest-info-token")
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "vmlet-guest-info"
    assert secret["metadata"]["namespace"] == binding["subjects"][0]["namespace"]

    pod = _get("DaemonSet", "vmlet-node")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    token_volumes = {v["name"] for v in pod["volumes"] if (v.get("secret") or {}).get("secretName") == secret["metadata"]["name"]}
    assert len(token_volumes) == 1
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        mounts = [m for m in c.get("volumeMounts", []) if m["name"] in token_volumes]
        if c["name"] == "guest-info":
            assert [m["mountPath"] for m in mounts] == ["/var/run/secrets/kubernetes.io/serviceaccount"]
            assert all(m.get("readOnly") for m in mounts)
        else:
            assert not mounts, f"{c['name']} must not get the reporter's token"
    reporter = containers["guest-info"]
    cmd = reporter["command"]
    assert cmd[cmd.index("-m") + 1] == "vmapi.guest_info"
    vmlet_cmd = containers["vmlet"]["command"]
    assert cmd[cmd.index("--cri-socket") + 1] == vmlet_cmd[vmlet_cmd.index("--socket") + 1]
    env = {e["name"]: e for e in reporter["env"]}
    assert cmd[cmd.index("--node") + 1] == "$(NODE_NAME)"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    sock_dir = cmd[cmd.index("--cri-socket") + 1].rsplit("/", 1)[0]
    assert any(m["mountPath"] == sock_dir for m in reporter["volumeMounts"])
    sc = reporter["securityContext"]
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
