"""VM disks, volumes and claim templates → pod volumes, mounts, devices, `vmlet.dev/disks`, PVCs (vmapi.storage).

The pod's annotations are judged by the node runtime's own parser (cri_shim.annotations), so what is
checked is what the node will do with them, not the strings this module happens to write.
"""

from __future__ import annotations

import copy
import re
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import given, strategies as st

from cri_shim import annotations as va
from cri_shim.storage import disk_spec
from vmapi.errors import ClaimsUnavailable
from vmapi import podspec, status, storage, types
from vmapi.strategy import Decision

GI = 1024 ** 3
MI = 1024 ** 2
T = "spec.template.spec"


def claim_template(name, size="10Gi", mode=None):
    spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if mode:
        spec["volumeMode"] = mode
    return {"metadata": {"name": name}, "spec": spec}


def make_vm(**over):
    """A VM with a persistent root from a template, a Block data disk, a pre-made claim, an emptyDisk, a
    ConfigMap ISO and a Secret shared as a directory."""
    vm = {"apiVersion": types.API_VERSION, "kind": types.KIND,
          "metadata": {"name": "db", "namespace": "prod", "uid": "vm-uid"},
          "spec": {
              "volumeClaimTemplates": [claim_template("root", "10Gi"), claim_template("data", "20Gi", "Block")],
              "template": {"spec": {
                  "domain": {"rootDisk": {"image": "virtlet.cloud/testvm", "volume": "root"},
                             "disks": [{"name": "data", "cache": "writeback", "bus": "scsi"},
                                       {"name": "logs", "serial": "LOGS-1"}, {"name": "scratch"},
                                       {"name": "cfg", "bootOrder": 3}],
                             "filesystems": [{"name": "app", "mountPath": "/etc/app"}]},
                  "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "root"}},
                              {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                              {"name": "logs", "persistentVolumeClaim": {"claimName": "shared-logs",
                                                                         "readOnly": True}},
                              {"name": "scratch", "emptyDisk": {"capacity": "2Gi"}},
                              {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a", "path": "x/a"}]}},
                              {"name": "app", "secret": {"secretName": "app-secret", "optional": True}}]}}}}
    for path, value in over.items():
        node = vm
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
        if value is KeyError:
            del node[keys[-1]]
        elif keys[-1].isdigit():
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
    return vm


def user_claim(name, size="4Gi", mode=None, phase="Bound", **meta):
    spec = {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": size}}}
    if mode:
        spec["volumeMode"] = mode
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": "prod", "uid": f"c-{name}", **meta}, "spec": spec,
            "status": {"phase": phase, "capacity": {"storage": size}} if phase else {}}


def claims_for(vm, **extra):
    """What the controller would pass: the template claims as it creates them, plus the user's."""
    p = podspec.prepare(vm)
    out = {r.claim: storage.claim_manifest(vm, p.plan, r) for r in p.plan.claims if r.template is not None}
    out.update({"shared-logs": user_claim("shared-logs")})
    out.update(extra)
    return out


def node_view(pod):
    """The pod's disks as the node runtime reads them."""
    return va.VMAnnotations.from_pod_annotations(pod["metadata"]["annotations"])


def test_every_kind_of_volume_becomes_what_the_node_contract_says():
    vm = make_vm()
    pod = podspec.render(vm, claims_for(vm))
    parsed = node_view(pod)
    disks = {d.name: d for d in parsed.disks}
    assert [d.name for d in parsed.disks] == ["root", "data", "logs", "scratch", "cfg"]  # the root first

    root = disks["root"]
    assert (root.source, root.path, root.root) == ("volume", f"{storage.DISK_DIR}/root", True)
    assert parsed.root_disk == root and not parsed.root_reimage
    assert root.capacity == int(10 * GI * Fraction(945, 1000)) // MI * MI  # 5.5% overhead, whole MiB
    data = disks["data"]
    assert (data.source, data.path, data.cache, data.bus, data.capacity) == (
        "device", f"{storage.DEVICE_DIR}/data", "writeback", "scsi", None)
    logs = disks["logs"]
    assert (logs.source, logs.readonly, logs.effective_serial) == ("volume", True, "LOGS-1")
    assert logs.capacity == int(4 * GI * Fraction(945, 1000)) // MI * MI
    assert (disks["scratch"].source, disks["scratch"].capacity) == ("emptyDisk", 2 * GI)
    cfg = disks["cfg"]
    assert (cfg.source, cfg.path, cfg.readonly, cfg.boot_order) == ("configVolume", f"{storage.CONFIG_DIR}/cfg",
                                                                     True, 3)

    (c,) = pod["spec"]["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    # Every entry's container path is really there: a mount for volume/configVolume, a device for device.
    for d in parsed.disks:
        if d.source in ("volume", "configVolume"):
            assert mounts[d.name]["mountPath"] == d.path
        elif d.source == "device":
            assert {"name": d.name, "devicePath": d.path} in c["volumeDevices"]
    assert mounts["logs"].get("readOnly") and mounts["cfg"]["readOnly"] and not mounts["root"].get("readOnly")
    assert mounts["app"] == {"name": "app", "mountPath": "/etc/app", "readOnly": True}  # shared over virtio-fs
    assert "scratch" not in mounts and all(d["name"] != "scratch" for d in c["volumeDevices"])

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["root"]["persistentVolumeClaim"] == {"claimName": "root-db"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "data-db"}
    assert volumes["logs"]["persistentVolumeClaim"] == {"claimName": "shared-logs", "readOnly": True}
    assert volumes["cfg"]["configMap"] == {"name": "cfg", "items": [{"key": "a", "path": "x/a"}]}
    assert volumes["app"]["secret"] == {"secretName": "app-secret", "optional": True}
    assert set(volumes) == {"root", "data", "logs", "cfg", "app"}
    # Disk names, serials and paths are unique (the node checks it too).
    disk_spec.parse_entries([{"name": d.name, "volume": d.path} for d in parsed.disks if d.path],
                            va.parse_quantity, va.MAX_ROOT_VOLUME_SIZE)


def test_a_vm_without_volumes_renders_the_pod_it_always_did():
    vm = make_vm(**{"spec.volumeClaimTemplates": KeyError, f"{T}.volumes": KeyError,
                    f"{T}.domain.disks": KeyError, f"{T}.domain.filesystems": KeyError,
                    f"{T}.domain.rootDisk": {"image": "virtlet.cloud/testvm", "size": "4Gi"}})
    pod = podspec.render(vm)
    assert va.DISKS not in pod["metadata"]["annotations"] and va.ROOT_REIMAGE not in pod["metadata"]["annotations"]
    assert "volumes" not in pod["spec"] and set(pod["spec"]["containers"][0]) == {
        "name", "image", "imagePullPolicy", "resources"}
    # New optional fields must not change an old VM's template hash (RestartRequired under every pod).
    dumped = podspec.parse_spec(vm["spec"]).template.model_dump(mode="json", exclude_none=True)
    assert set(dumped["spec"]["domain"]["rootDisk"]) == {"image", "imagePullPolicy", "bus", "size"}
    assert not {"disks", "filesystems"} & set(dumped["spec"]["domain"]) and "volumes" not in dumped["spec"]


@given(request=st.integers(min_value=2 * MI, max_value=2 ** 44))
def test_the_derived_capacity_leaves_the_file_system_overhead_free(request):
    size = storage.disk_capacity(request)
    assert size % MI == 0
    assert size <= request * Fraction(945, 1000) < size + MI


@pytest.mark.parametrize("size", ["10Gi", "10G", "1e10", "10737418240", "1.5Gi"])
def test_capacity_comes_from_the_claims_request_in_any_quantity_form(size):
    vm = make_vm()  # a claim made by someone else may say 1e10, which the VM's schema does not take
    disks = {d.name: d for d in node_view(podspec.render(vm, claims_for(vm, **{
        "shared-logs": user_claim("shared-logs", size)}))).disks}
    assert disks["logs"].capacity == storage.disk_capacity(va.parse_quantity(size))


def test_a_claim_without_a_volume_mode_is_filesystem_and_one_without_a_request_leaves_the_size_to_the_node():
    vm = make_vm()
    bare = user_claim("shared-logs")
    del bare["spec"]["resources"]
    disks = {d.name: d for d in node_view(podspec.render(vm, claims_for(vm, **{"shared-logs": bare}))).disks}
    assert disks["logs"].source == "volume" and disks["logs"].capacity is None


def test_the_volume_mode_is_the_claims_not_the_templates():
    vm = make_vm()
    claims = claims_for(vm, **{"shared-logs": user_claim("shared-logs", mode="Block")})
    claims["data-db"]["spec"]["volumeMode"] = "Filesystem"  # a claim made by hand before the VM
    disks = {d.name: d for d in node_view(podspec.render(vm, claims)).disks}
    assert disks["logs"].source == "device" and disks["data"].source == "volume"


def test_root_capacity_reimage_and_block_root():
    vm = make_vm(**{f"{T}.domain.rootDisk.capacity": "8Gi", f"{T}.domain.rootDisk.reimage": True})
    parsed = node_view(podspec.render(vm, claims_for(vm)))
    assert parsed.root_disk.capacity == 8 * GI and parsed.root_reimage

    block = make_vm(**{"spec.volumeClaimTemplates.0": claim_template("root", "10Gi", "Block")})
    root = node_view(podspec.render(block, claims_for(block))).root_disk
    assert (root.source, root.path) == ("device", f"{storage.DEVICE_DIR}/root")


def test_the_root_takes_its_options_from_a_disk_of_the_same_name():
    vm = make_vm()
    vm["spec"]["template"]["spec"]["domain"]["disks"].append({"name": "root", "cache": "none", "io": "native",
                                                              "bootOrder": 2})
    parsed = node_view(podspec.render(vm, claims_for(vm)))
    assert parsed.disks[0].name == "root" and parsed.disks[0].root
    assert (parsed.disks[0].io, parsed.disks[0].boot_order) == ("native", 2)
    assert [d.name for d in parsed.disks].count("root") == 1


def test_template_annotations_cannot_set_the_disks():
    vm = make_vm(**{"spec.template.metadata": {"annotations": {
        va.DISKS: '[{"name": "evil", "device": "/dev/sda"}]', va.ROOT_REIMAGE: "true", "team": "a"}}})
    ann = podspec.render(vm, claims_for(vm))["metadata"]["annotations"]
    assert "evil" not in ann[va.DISKS] and va.ROOT_REIMAGE not in ann and ann["team"] == "a"
    bare = make_vm(**{"spec.template.metadata": {"annotations": {va.DISKS: '[{"name": "x", "device": "/dev/x"}]'}},
                      "spec.volumeClaimTemplates": KeyError, f"{T}.volumes": KeyError,
                      f"{T}.domain.disks": KeyError, f"{T}.domain.filesystems": KeyError,
                      f"{T}.domain.rootDisk": {"image": "virtlet.cloud/testvm"}})
    assert va.DISKS not in podspec.render(bare)["metadata"]["annotations"]


# --- what the spec cannot be ------------------------------------------------------------------------

V = f"{T}.volumes"
D = f"{T}.domain.disks"
FS = f"{T}.domain.filesystems"
R = f"{T}.domain.rootDisk"


def _vols(vm):
    return vm["spec"]["template"]["spec"]["volumes"]


def _disks(vm):
    return vm["spec"]["template"]["spec"]["domain"]["disks"]


def _edit(fn):
    vm = make_vm()
    fn(vm)
    return vm


BAD_SPECS = [
    ("duplicate volume", lambda vm: _vols(vm).append({"name": "scratch", "emptyDisk": {"capacity": "1Gi"}}),
     rf"{V}\[6\]\.name: 'scratch' is also volumes\[3\]'s"),
    ("two sources", lambda vm: _vols(vm)[3].update(configMap={"name": "x"}),
     rf"{V}\[3\]: needs exactly one of .*not emptyDisk and configMap"),
    ("no source", lambda vm: _vols(vm).append({"name": "nothing"}), rf"{V}\[6\]: needs exactly one of"),
    ("disk without volume", lambda vm: _disks(vm).append({"name": "ghost"}),
     rf"{D}\[4\]\.name: 'ghost' names no volume"),
    ("duplicate disk", lambda vm: _disks(vm).append({"name": "scratch"}), rf"{D}\[4\]\.name: 'scratch' is also disks\[2\]"),
    ("duplicate serial", lambda vm: _disks(vm)[2].update(serial="LOGS-1"), rf"{D}\[2\]\.serial: 'LOGS-1' is also disks\[1\]"),
    ("serial equal to a name", lambda vm: _disks(vm)[2].update(serial="cfg"), rf"{D}\[3\]\.serial: 'cfg' is also disks\[2\]"),
    ("duplicate bootOrder", lambda vm: _disks(vm)[0].update(bootOrder=3), rf"{D}\[3\]\.bootOrder: 3 is also disks\[0\]"),
    ("root names no volume", lambda vm: vm["spec"]["template"]["spec"]["domain"]["rootDisk"].update(volume="nope"),
     rf"{R}\.volume: 'nope' names no volume"),
    ("root on an emptyDisk", lambda vm: (vm["spec"]["template"]["spec"]["domain"]["rootDisk"].update(volume="scratch"),
                                         _disks(vm).pop(2), _vols(vm).pop(0), vm["spec"]["volumeClaimTemplates"].pop(0)),
     rf"{R}\.volume: volume 'scratch' is an emptyDisk volume; a persistent root needs a persistentVolumeClaim"),
    ("root with size", lambda vm: vm["spec"]["template"]["spec"]["domain"]["rootDisk"].update(size="4Gi"),
     rf"{R}\.size: not with rootDisk\.volume"),
    ("capacity without volume", lambda vm: vm["spec"]["template"]["spec"]["domain"]["rootDisk"].update(
        volume=None, capacity="4Gi"), rf"{R}\.capacity: only a persistent root"),
    ("reimage without volume", lambda vm: vm["spec"]["template"]["spec"]["domain"]["rootDisk"].update(
        volume=None, reimage=True), rf"{R}\.reimage: only a persistent root"),
    ("read-only root claim", lambda vm: _vols(vm)[0]["persistentVolumeClaim"].update(readOnly=True),
     rf"{V}\[0\]\.persistentVolumeClaim\.readOnly: the persistent root cannot be read-only"),
    ("read-only root disk", lambda vm: _disks(vm).append({"name": "root", "readonly": True}),
     rf"{D}\[4\]\.readonly: disk 'root' is the persistent root"),
    ("unused claim volume", lambda vm: _vols(vm).append({"name": "spare", "persistentVolumeClaim": {"claimName": "s"}}),
     rf"{V}\[6\]: volume 'spare' is used by nothing \(name it in domain\.disks\[\]\.name or domain\.rootDisk\.volume\)"),
    ("unused emptyDisk", lambda vm: _disks(vm).pop(2), rf"{V}\[3\]: volume 'scratch' is used by nothing"),
    ("unused secret", lambda vm: vm["spec"]["template"]["spec"]["domain"].pop("filesystems"),
     rf"{V}\[5\]: volume 'app' is used by nothing \(name it in domain\.disks\[\]\.name, or domain\.filesystems"),
    ("filesystem of a claim", lambda vm: vm["spec"]["template"]["spec"]["domain"]["filesystems"].append(
        {"name": "logs", "mountPath": "/logs"}), rf"{FS}\[1\]\.name: volume 'logs' is used by {D}\[1\] already"),
    ("filesystem of an emptyDisk", lambda vm: (_disks(vm).pop(2), vm["spec"]["template"]["spec"]["domain"][
        "filesystems"].append({"name": "scratch", "mountPath": "/s"})),
     rf"{FS}\[1\]\.name: volume 'scratch' is an emptyDisk volume; only configMap and secret"),
    ("filesystem without volume", lambda vm: vm["spec"]["template"]["spec"]["domain"]["filesystems"].append(
        {"name": "ghost", "mountPath": "/g"}), rf"{FS}\[1\]\.name: 'ghost' names no volume"),
    ("mountPath not normalised", lambda vm: vm["spec"]["template"]["spec"]["domain"]["filesystems"][0].update(
        mountPath="/etc/../app"), rf"{FS}\[0\]\.mountPath: '/etc/\.\./app'.*normalised"),
    ("mountPath trailing slash", lambda vm: vm["spec"]["template"]["spec"]["domain"]["filesystems"][0].update(
        mountPath="/etc/app/"), rf"{FS}\[0\]\.mountPath"),
    ("mountPath among the disks", lambda vm: vm["spec"]["template"]["spec"]["domain"]["filesystems"][0].update(
        mountPath="/vmlet/disks/root"), rf"{FS}\[0\]\.mountPath: '/vmlet/disks/root' is under /vmlet"),
    ("mountPath at the devices", lambda vm: vm["spec"]["template"]["spec"]["domain"]["filesystems"][0].update(
        mountPath="/dev/vmlet"), rf"{FS}\[0\]\.mountPath: '/dev/vmlet' is under /dev/vmlet"),
    ("duplicate mountPath", lambda vm: (_vols(vm).append({"name": "app2", "configMap": {"name": "c"}}),
                                        vm["spec"]["template"]["spec"]["domain"]["filesystems"].append(
                                            {"name": "app2", "mountPath": "/etc/app"})),
     rf"{FS}\[1\]\.mountPath: '/etc/app' is also filesystems\[0\]'s"),
    ("item path escapes", lambda vm: _vols(vm)[4]["configMap"]["items"].append({"key": "b", "path": "../b"}),
     rf"{V}\[4\]\.configMap\.items\[1\]\.path: '\.\./b' must be a relative path"),
    ("duplicate item path", lambda vm: _vols(vm)[4]["configMap"]["items"].append({"key": "b", "path": "x/a"}),
     rf"{V}\[4\]\.configMap\.items\[1\]\.path: 'x/a' is also items\[0\]'s"),
    ("unused template", lambda vm: vm["spec"]["volumeClaimTemplates"].append(claim_template("spare")),
     r"spec\.volumeClaimTemplates\[2\]\.metadata\.name: 'spare' is the claimName of no"),
    ("duplicate template", lambda vm: vm["spec"]["volumeClaimTemplates"].append(claim_template("root")),
     r"spec\.volumeClaimTemplates\[2\]\.metadata\.name: 'root' is also volumeClaimTemplates\[0\]'s"),
    ("limit below request", lambda vm: vm["spec"]["volumeClaimTemplates"][0]["spec"]["resources"].update(
        limits={"storage": "1Gi"}), r"spec\.volumeClaimTemplates\[0\]\.spec\.resources\.limits\.storage: '1Gi' is less"),
    ("zero request", lambda vm: vm["spec"]["volumeClaimTemplates"][0]["spec"]["resources"].update(
        requests={"storage": "0"}), r"spec\.volumeClaimTemplates\[0\]\.spec\.resources\.requests\.storage: must be greater"),
    ("one claim, two volumes", lambda vm: (_vols(vm).append({"name": "again", "persistentVolumeClaim": {
        "claimName": "shared-logs"}}), _disks(vm).append({"name": "again"})),
     rf"{V}\[6\]\.persistentVolumeClaim\.claimName: claim 'shared-logs' is also volumes\[2\]'s"),
    ("a claim named like a template's", lambda vm: (_vols(vm).append({"name": "again", "persistentVolumeClaim": {
        "claimName": "data-db"}}), _disks(vm).append({"name": "again"})),
     rf"{V}\[6\]\.persistentVolumeClaim\.claimName: claim 'data-db' is also volumes\[1\]'s"),
    ("native io with a cache", lambda vm: _disks(vm)[2].update(io="native", cache="writeback"),
     rf"{D}\[2\]\.io: native I/O needs cache none or directsync .*\(pod annotation vmlet\.dev/disks\[3\]\.io\)"),
    ("too many disks", lambda vm: (_vols(vm).extend({"name": f"e{i}", "emptyDisk": {"capacity": "1Mi"}} for i in range(19)),
                                   _disks(vm).extend({"name": f"e{i}"} for i in range(19))),
     rf"{D}: 24 disks and the node's own 1 \(cloud-init\) are more than the node's 24"),
    ("bad bus", lambda vm: _disks(vm)[0].update(bus="ide"), r"spec\.template\.spec\.domain\.disks\[0\]\.bus: "),
    ("bad cache", lambda vm: _disks(vm)[0].update(cache="fast"), rf"{D}\[0\]\.cache: "),
    ("unknown disk field", lambda vm: _disks(vm)[0].update(disk={"bus": "virtio"}), rf"{D}\[0\]\.disk: "),
    ("bad claim name", lambda vm: _vols(vm)[2]["persistentVolumeClaim"].update(claimName="Shared_Logs"),
     rf"{V}\[2\]\.persistentVolumeClaim\.claimName: "),
    ("bad template label", lambda vm: vm["spec"]["volumeClaimTemplates"][0]["metadata"].update(labels={"a": "b c"}),
     r"spec\.volumeClaimTemplates\[0\]\.metadata\.labels\[a\]: 'b c' is not a valid label value"),
]


@pytest.mark.parametrize("edit, needle", [(e, n) for _, e, n in BAD_SPECS], ids=[i for i, _, _ in BAD_SPECS])
def test_a_spec_that_cannot_be_is_a_spec_error_naming_the_field(edit, needle):
    vm = _edit(edit)
    with pytest.raises(podspec.SpecError, match=needle):
        podspec.render(vm, claims_for(vm))


BAD_CLAIMS = [
    ("volumeMode", lambda c: c["spec"].update(volumeMode="Object"),
     rf"{V}\[2\]\.persistentVolumeClaim\.claimName: claim 'shared-logs' has volumeMode 'Object'"),
    ("request", lambda c: c["spec"]["resources"]["requests"].update(storage="lots"),
     rf"{V}\[2\]\.persistentVolumeClaim\.claimName: claim 'shared-logs' requests 'lots', which is not a quantity"),
    ("request type", lambda c: c["spec"]["resources"]["requests"].update(storage=12),
     r"claim 'shared-logs' requests 12, which is not a quantity"),
    ("too small", lambda c: c["spec"]["resources"]["requests"].update(storage="1Mi"),
     rf"{D}\[1\]: claim 'shared-logs' requests '1Mi', less than 1Mi once the 5\.5% file system overhead"),
    ("too big", lambda c: c["spec"]["resources"]["requests"].update(storage="20Ti"),
     rf"{D}\[1\]: a \d+Mi disk on claim 'shared-logs' is over the node's limit of 16Ti"),
]


@pytest.mark.parametrize("edit, needle", [(e, n) for _, e, n in BAD_CLAIMS], ids=[i for i, _, _ in BAD_CLAIMS])
def test_a_claim_that_cannot_hold_the_disk_is_a_spec_error_naming_the_volume(edit, needle):
    vm = make_vm()
    claim = user_claim("shared-logs")
    edit(claim)
    with pytest.raises(podspec.SpecError, match=needle):
        podspec.render(vm, claims_for(vm, **{"shared-logs": claim}))


def test_root_capacity_must_fit_a_filesystem_claim_and_means_nothing_on_a_block_one():
    vm = make_vm(**{f"{T}.domain.rootDisk.capacity": "11Gi"})
    with pytest.raises(podspec.SpecError, match=rf"{R}\.capacity: '11Gi' is more than claim 'root-db' requests"):
        podspec.render(vm, claims_for(vm))
    vm = make_vm(**{f"{T}.domain.rootDisk.capacity": "8Gi",
                    "spec.volumeClaimTemplates.0": claim_template("root", "10Gi", "Block")})
    with pytest.raises(podspec.SpecError, match=rf"{R}\.capacity: claim 'root-db' is a Block volume"):
        podspec.render(vm, claims_for(vm))


# --- claims -----------------------------------------------------------------------------------------


def test_templates_make_labelled_claims_owned_by_the_vm_unless_retained():
    vm = make_vm(**{"spec.volumeClaimTemplates.0.metadata": {"name": "root", "labels": {"tier": "db"},
                                                            "annotations": {"note": "x"}}})
    p = podspec.prepare(vm)
    refs = {r.claim: r for r in p.plan.claims}
    assert set(refs) == {"root-db", "data-db", "shared-logs"} and refs["shared-logs"].template is None
    root = storage.claim_manifest(vm, p.plan, refs["root-db"])
    assert root["metadata"] == {
        "name": "root-db", "namespace": "prod", "labels": {"tier": "db", types.LABEL_VM: "db"},
        "annotations": {"note": "x"},
        "ownerReferences": [{"apiVersion": types.API_VERSION, "kind": types.KIND, "name": "db", "uid": "vm-uid",
                             "controller": False, "blockOwnerDeletion": True}]}
    assert root["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}},
                            "volumeMode": "Filesystem"}
    assert storage.claim_manifest(vm, p.plan, refs["data-db"])["spec"]["volumeMode"] == "Block"

    kept = make_vm(**{"spec.persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain"}})
    kp = podspec.prepare(kept)
    assert "ownerReferences" not in storage.claim_manifest(kept, kp.plan, kp.plan.claims[0])["metadata"]


def test_owner_references_follow_the_retention_policy_on_the_claims_the_controller_made():
    vm = make_vm()
    p = podspec.prepare(vm)
    ref = p.plan.claims[0]
    made = {**storage.claim_manifest(vm, p.plan, ref)}
    made["metadata"] = {**made["metadata"], "resourceVersion": "7"}
    assert storage.owner_patch(vm, p.plan, made) is None  # already as the policy says

    kept = make_vm(**{"spec.persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain"}})
    kp = podspec.prepare(kept)
    other = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "x-uid"}
    made["metadata"]["ownerReferences"] = [other, *made["metadata"]["ownerReferences"]]
    assert storage.owner_patch(kept, kp.plan, made) == {
        "metadata": {"ownerReferences": [other], "resourceVersion": "7"}}
    made["metadata"]["ownerReferences"] = made["metadata"]["ownerReferences"][1:]
    assert storage.owner_patch(kept, kp.plan, made) == {"metadata": {"ownerReferences": None, "resourceVersion": "7"}}

    adopted = copy.deepcopy(made)
    del adopted["metadata"]["ownerReferences"]  # retained by an earlier VM of this name, now Delete
    assert storage.owner_patch(vm, p.plan, adopted)["metadata"]["ownerReferences"] == [storage.owner_reference(vm)]

    users = copy.deepcopy(adopted)
    del users["metadata"]["labels"]  # made by a user: never touched
    assert storage.owner_patch(vm, p.plan, users) is None
    previous = copy.deepcopy(made)
    previous["metadata"]["ownerReferences"] = [{**storage.owner_reference(vm), "uid": "old-vm"}]
    assert storage.owner_patch(vm, p.plan, previous) is None  # the garbage collector's, not ours


def test_a_claim_that_is_not_there_holds_the_pod_back_and_says_why():
    vm = make_vm()
    p = podspec.prepare(vm)
    claims = claims_for(vm)
    del claims["shared-logs"], claims["root-db"]
    with pytest.raises(ClaimsUnavailable) as e:
        podspec.render(vm, claims)
    assert set(e.value.claims) == {"shared-logs", "root-db"}
    rep = storage.report(p.plan, claims, vm)
    assert rep.missing == ("shared-logs",) and rep.waiting == ("root-db",)  # a template will make root-db
    by = {s["name"]: s for s in rep.statuses}
    assert (by["logs"]["reason"], by["logs"]["phase"]) == ("PvcNotFound", "Pending")
    assert "'shared-logs' not found" in by["logs"]["message"] and by["root"]["reason"] == "PvcNotCreated"
    assert "'shared-logs' not found" in rep.blocking_message()

    terminating = claims_for(vm)
    terminating["shared-logs"]["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    terminating["data-db"]["metadata"]["ownerReferences"][0]["uid"] = "deleted-vm"
    rep = storage.report(p.plan, terminating, vm)
    assert set(rep.waiting) == {"shared-logs", "data-db"} and not rep.missing
    reasons = {s["name"]: s.get("reason") for s in rep.statuses}
    assert reasons["logs"] == "PvcTerminating" and reasons["data"] == "PvcOwnedByAnotherVM"


def test_volume_status_tells_where_the_guest_finds_each_volume_and_the_claims_state():
    vm = make_vm()
    vm["spec"]["template"]["spec"]["domain"]["rootDisk"]["bus"] = "scsi"
    vm["spec"]["template"]["spec"]["domain"]["disks"][2]["bus"] = "sata"
    long = "a-rather-long-volume-name"
    vm["spec"]["template"]["spec"]["volumes"].append({"name": long, "emptyDisk": {"capacity": "1Gi"}})
    vm["spec"]["template"]["spec"]["domain"]["disks"].append({"name": long, "bus": "virtio"})
    p = podspec.prepare(vm)
    claims = claims_for(vm)
    claims["root-db"]["status"] = {"phase": "Bound", "capacity": {"storage": "11Gi"}, "accessModes": ["ReadWriteOnce"]}
    claims["shared-logs"]["status"]["phase"] = "Lost"
    rep = storage.report(p.plan, claims, vm)
    by = {s["name"]: s for s in rep.statuses}
    assert [s["name"] for s in rep.statuses] == ["root", "data", "logs", "scratch", "cfg", long, "app"]
    assert by["root"]["target"] == "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_root"  # rootDisk.bus is the default
    assert by["data"]["target"] == "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_data"
    assert by["logs"]["target"] == "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_LOGS-1"
    assert by["scratch"]["target"] == "/dev/disk/by-id/ata-QEMU_HARDDISK_scratch"
    assert by[long]["target"] == "/dev/disk/by-id/virtio-" + disk_spec.default_serial(long)
    assert len(disk_spec.default_serial(long)) <= 20 and by["app"] == {"name": "app", "target": "/etc/app"}

    assert by["root"]["phase"] == "Bound" and "reason" not in by["root"]
    assert by["root"]["persistentVolumeClaimInfo"] == {
        "claimName": "root-db", "volumeMode": "Filesystem", "accessModes": ["ReadWriteOnce"],
        "capacity": {"storage": "11Gi"}, "requests": {"storage": "10Gi"}, "filesystemOverhead": "0.055"}
    assert (by["data"]["phase"], by["data"]["reason"]) == ("Pending", "WaitingForVolumeBinding")  # no status yet
    assert by["data"]["persistentVolumeClaimInfo"]["volumeMode"] == "Block"
    assert "filesystemOverhead" not in by["data"]["persistentVolumeClaimInfo"]
    assert (by["logs"]["phase"], by["logs"]["reason"]) == ("Lost", "ClaimLost")
    assert rep.pending == ("data-db",) and not rep.unavailable
    for s in rep.statuses:  # the status schema accepts it
        types.VolumeStatus.model_validate(s)


def test_hostile_claims_never_crash_the_report():
    vm = make_vm()
    p = podspec.prepare(vm)
    for junk in ({"status": "Bound"}, {"spec": [], "status": {"phase": 3, "capacity": {"storage": 1}}},
                 {"metadata": [], "spec": {"resources": {"requests": "x"}, "accessModes": "RWO"}},
                 {"metadata": {"ownerReferences": "x", "labels": []}}):
        claims = claims_for(vm, **{"shared-logs": junk})
        rep = storage.report(p.plan, claims, vm)
        for s in rep.statuses:
            types.VolumeStatus.model_validate(s)
        assert storage.owner_patch(vm, p.plan, junk) is None


# --- status -----------------------------------------------------------------------------------------


def _derive(vm, pod, decision, claims):
    p = podspec.prepare(vm)
    rep = storage.report(p.plan, claims, vm)
    return status.derive(vm, pod, decision, now=1000.0, current_hash="h", volumes=rep)


def _pod(phase):
    return {"metadata": {"name": "db-vm", "uid": "p1"}, "spec": {},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": str(phase == "Running")}]}}


def test_status_for_missing_pending_and_bound_claims():
    vm = make_vm()
    create = Decision("create", "", ())
    claims = claims_for(vm)
    del claims["shared-logs"]
    st = _derive(vm, None, create, claims)
    assert st["printableStatus"] == "ErrorPvcNotFound" and st["created"] is False
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "PvcNotFound" and "'shared-logs' not found" in ready["message"]
    assert not any(c["type"] == "Failure" for c in st["conditions"])  # it waits, it did not fail
    assert st["runStrategy"] is None  # not acted upon: a Once VM still starts when the claim comes
    assert {s["name"] for s in st["volumeStatus"]} >= {"root", "logs"}

    del claims["root-db"]  # and one a template makes, not there yet: still ErrorPvcNotFound (shared-logs)
    assert _derive(vm, None, create, claims)["printableStatus"] == "ErrorPvcNotFound"
    claims["shared-logs"] = user_claim("shared-logs")
    st = _derive(vm, None, create, claims)
    assert st["printableStatus"] == "Starting" and next(
        c for c in st["conditions"] if c["type"] == "Ready")["reason"] == "PvcNotReady"
    assert _derive(vm, None, Decision("none", "", ()), claims)["printableStatus"] == "Stopped"  # Halted: no error

    pending = claims_for(vm)  # the template claims have no status yet: Pending
    assert _derive(vm, _pod("Pending"), Decision("none", "", ()), pending)["printableStatus"] == "WaitingForVolumeBinding"
    bound = claims_for(vm)
    for c in bound.values():
        c["status"] = {"phase": "Bound"}
    assert _derive(vm, _pod("Pending"), Decision("none", "", ()), bound)["printableStatus"] == "Starting"
    assert _derive(vm, _pod("Running"), Decision("none", "", ()), pending)["printableStatus"] == "Running"
    types.VirtualMachineStatus.model_validate(_derive(vm, _pod("Running"), Decision("none", "", ()), bound))


def test_the_example_in_the_docs_renders():
    text = (Path(__file__).resolve().parents[2] / "docs/vmapi.md").read_text()
    section = text[text.index("### Disks and volumes"):]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    vm = {"metadata": {"name": "doc", "namespace": "n", "uid": "u"}, **example}
    plan = podspec.prepare(vm).plan
    claims = {r.claim: storage.claim_manifest(vm, plan, r) if r.template is not None else user_claim(r.claim)
              for r in plan.claims}
    parsed = node_view(podspec.render(vm, claims))
    assert parsed.root_disk is not None and {d.source for d in parsed.disks} == {
        "volume", "configVolume", "emptyDisk"}
