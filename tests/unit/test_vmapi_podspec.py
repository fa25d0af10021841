"""VM → pod (vmapi.podspec): the annotations must be what the node runtime accepts."""

from __future__ import annotations

import copy

import pytest

from cri_shim import annotations as va
from vmapi import podspec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@example"
VM = {
    "apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
    "metadata": {"name": "web", "namespace": "prod", "uid": "1111-2222"},
    "spec": {"runStrategy": "Always", "template": {
        "metadata": {"labels": {"app": "web", "vmlet.dev/vm": "spoof"},
                     "annotations": {"team": "a", "VirtletVCPUCount": "99"}},
        "spec": {
            "domain": {"cpu": {"cores": 2, "model": "host-passthrough"}, "memory": {"guest": "2Gi"},
                       "rootDisk": {"image": "virtlet.cloud/debian", "bus": "scsi", "size": "20Gi"},
                       "interface": {"binding": "masquerade"}},
            "cloudInit": {"userData": "#cloud-config\npackages: [nginx]\n", "sshKeys": [KEY],
                          "userDataSecretRef": {"name": "web-ud"},
                          "sshKeysSecretRef": {"name": "web-keys", "key": "keys"}},
            "nodeSelector": {"zone": "a"},
            "tolerations": [{"key": "vm", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "terminationGracePeriodSeconds": 30,
        }}},
}


def test_pod_is_an_annotated_virtlet_pod_the_node_runtime_accepts():
    pod = podspec.render(VM)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "web-vm" and meta["namespace"] == "prod"
    assert meta["ownerReferences"] == [{"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "name": "web",
                                        "uid": "1111-2222", "controller": True, "blockOwnerDeletion": True}]
    parsed = va.VMAnnotations.from_pod_annotations(meta["annotations"])
    assert parsed.target_runtime == "virtlet.cloud"
    assert parsed.vcpu_count == 2  # the spec wins over a template annotation
    assert parsed.disk_driver == "scsi" and parsed.cpu_model == "host-passthrough"
    assert parsed.root_volume_size == 20 * 1024**3 and parsed.network_binding == "masquerade"
    assert parsed.cloud_init_user_data == {"packages": ["nginx"]} and parsed.ssh_keys == (KEY,)
    assert parsed.cloud_init_user_data_source == va.DataSourceRef(kind="secret", name="web-ud")
    assert meta["annotations"][va.CLOUD_INIT_USER_DATA_SOURCE_KEY] == "userdata"
    assert parsed.ssh_key_source == va.DataSourceRef(kind="secret", name="web-keys", key="keys")
    assert meta["annotations"]["team"] == "a"
    assert meta["labels"] == {"app": "web", "vmlet.dev/vm": "web", "vmlet.dev/vm-uid": "1111-2222"}
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 30
    assert spec["nodeSelector"] == {"zone": "a", "vmlet.dev/runtime": "virtlet"}
    assert spec["tolerations"] == [{"key": "vm", "operator": "Exists"}] and spec["affinity"] == {"nodeAffinity": {}}
    (c,) = spec["containers"]
    assert c["image"] == "virtlet.cloud/debian"
    assert c["resources"] == {"requests": {"memory": "2Gi"}, "limits": {"memory": "2Gi"}}


def test_defaults_and_script_user_data():
    vm = {"metadata": {"name": "m", "namespace": "n", "uid": "u"},
          "spec": {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/x"}},
                                         "cloudInit": {"userData": "#!/bin/sh\necho hi\n"}}}}}
    ann = podspec.render(vm)["metadata"]["annotations"]
    parsed = va.VMAnnotations.from_pod_annotations(ann)
    assert parsed.vcpu_count == 1 and parsed.disk_driver == "virtio" and parsed.network_binding == "bridge"
    assert parsed.cloud_init_user_data_script == "#!/bin/sh\necho hi\n" and parsed.cloud_init_user_data is None
    assert va.ROOT_VOLUME_SIZE not in ann


@pytest.mark.parametrize("path,value,needle", [
    (("cloudInit", "userData"), "- a list\n", "VirtletCloudInitUserData"),
    (("domain", "rootDisk", "size"), "17Ti", "VirtletRootVolumeSize"),
    (("domain", "memory", "guest"), "1.5", "memory"),
    (("domain", "cpu", "cores"), 0, "cores"),
])
def test_what_the_node_would_refuse_is_a_spec_error(path, value, needle):
    vm = copy.deepcopy(VM)
    node = vm["spec"]["template"]["spec"]
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    with pytest.raises(podspec.SpecError, match=needle):
        podspec.render(vm)


def test_template_hash_ignores_defaulting_but_not_changes():
    bare = {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/x"}}}}}
    defaulted = {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/x", "bus": "virtio"},
                                                  "cpu": {"cores": 1}}}}}
    changed = {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/x"}, "cpu": {"cores": 2}}}}}
    assert podspec.template_hash(bare) == podspec.template_hash(defaulted) != podspec.template_hash(changed)
    assert podspec.template_hash({"runStrategy": "Halted", **bare}) == podspec.template_hash(bare)


def test_ownership():
    pod = podspec.render(VM)
    assert podspec.is_owned_by(pod, VM)
    assert not podspec.is_owned_by(pod, {"metadata": {"uid": "other"}})
    assert not podspec.is_owned_by({"metadata": {}}, VM)


@pytest.mark.parametrize("value", ["a\ud800b", "\udfff", "ok\udc80"])
def test_a_lone_surrogate_in_a_template_annotation_is_a_spec_error_naming_the_key(value):
    """JSON carries it as an escape, the API server stores U+FFFD: the pod would differ from the VM."""
    vm = copy.deepcopy(VM)
    vm["spec"]["template"]["metadata"]["annotations"]["team"] = value
    with pytest.raises(podspec.SpecError, match=r"spec\.template\.metadata\.annotations\[team\].*surrogate"):
        podspec.render(vm)


def test_the_vm_pod_carries_no_service_account_token():
    """The node shares every directory mount with the guest over virtio-fs; the kubelet's token volume would be one."""
    from vmapi import podspec as ps
    vm = {"metadata": {"name": "tok", "namespace": "default", "uid": "u-1"},
          "spec": {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/testvm"}}}}}}
    assert ps.render(vm)["spec"]["automountServiceAccountToken"] is False


# ---------------------------------------------------------------- exec probes (KubeVirt's readinessProbe/livenessProbe)

def _with(**vmi_extra):
    vm = {"metadata": {"name": "p", "namespace": "default", "uid": "u-2"},
          "spec": {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/testvm"}}, **vmi_extra}}}}
    return vm


def test_exec_probes_go_to_the_container_with_the_kubelets_defaults_written_out():
    pod = podspec.render(_with(readinessProbe={"exec": {"command": ["cat", "/etc/os-release"]}, "periodSeconds": 2},
                               livenessProbe={"exec": {"command": ["true"]}, "failureThreshold": 1,
                                              "timeoutSeconds": 5, "initialDelaySeconds": 30}))
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"] == {"exec": {"command": ["cat", "/etc/os-release"]}, "initialDelaySeconds": 0,
                                   "timeoutSeconds": 1, "periodSeconds": 2, "successThreshold": 1,
                                   "failureThreshold": 3}
    assert c["livenessProbe"] == {"exec": {"command": ["true"]}, "initialDelaySeconds": 30, "timeoutSeconds": 5,
                                  "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 1}
    assert pod["spec"]["restartPolicy"] == "Never"  # a failed liveness probe ends the pod: runStrategy restarts


def test_no_probes_no_probe_fields_and_an_unchanged_template_hash():
    bare = _with()
    (c,) = podspec.render(bare)["spec"]["containers"]
    assert "readinessProbe" not in c and "livenessProbe" not in c
    # A new optional field must not change the hash of existing VMs (RestartRequired under running pods).
    assert podspec.template_hash(bare["spec"]) == podspec.template_hash(
        {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/testvm"}}, "readinessProbe": None}}})
    assert podspec.template_hash(bare["spec"]) != podspec.template_hash(
        _with(readinessProbe={"exec": {"command": ["true"]}})["spec"])


@pytest.mark.parametrize("kind", ["httpGet", "tcpSocket", "grpc", "guestAgentPing"])
@pytest.mark.parametrize("field", ["readinessProbe", "livenessProbe"])
def test_probe_kinds_other_than_exec_are_refused_naming_the_probe_and_the_kind(field, kind):
    with pytest.raises(podspec.SpecError, match=rf"spec\.template\.spec\.{field}: .*{kind} probes are not supported"):
        podspec.render(_with(**{field: {kind: {"port": 80}}}))


@pytest.mark.parametrize("probe, where, what", [
    ({}, "readinessProbe", "needs exec.command"),
    ({"exec": {"command": []}}, r"readinessProbe\.exec\.command", "at least 1 item"),
    ({"exec": {}}, r"readinessProbe\.exec\.command", "Field required"),
    ({"exec": {"command": ["true"]}, "periodSeconds": 0}, r"readinessProbe\.periodSeconds", "greater than or equal to 1"),
    ({"exec": {"command": ["true"]}, "timeoutSeconds": 0}, r"readinessProbe\.timeoutSeconds", "greater than or equal"),
    ({"exec": {"command": ["true"]}, "initialDelaySeconds": -1}, r"readinessProbe\.initialDelaySeconds", "greater"),
    ({"exec": {"command": ["true"]}, "failureThreshold": 0}, r"readinessProbe\.failureThreshold", "greater"),
    ({"exec": {"command": ["true"]}, "exec2": 1}, r"readinessProbe\.exec2", "Extra inputs"),
])
def test_bad_probes_are_spec_errors_naming_the_field(probe, where, what):
    with pytest.raises(podspec.SpecError, match=rf"spec\.template\.spec\.{where}: .*{what}"):
        podspec.render(_with(readinessProbe=probe))


def test_a_liveness_probe_needs_a_success_threshold_of_one():
    with pytest.raises(podspec.SpecError, match=r"spec\.template\.spec\.livenessProbe: .*successThreshold must be 1"):
        podspec.render(_with(livenessProbe={"exec": {"command": ["true"]}, "successThreshold": 2}))
    (c,) = podspec.render(_with(readinessProbe={"exec": {"command": ["true"]}, "successThreshold": 2}))["spec"]["containers"]
    assert c["readinessProbe"]["successThreshold"] == 2
