"""VM → pod manifest (pure). The pod is what the node runtime (cri_shim) runs as a VM.

* Name `<vm>-vm`, deterministic: the controller finds its pod by name (no label
  selectors needed, no generateName), and a second controller racing to create
  it gets 409 instead of a twin VM. A restart therefore waits until the old pod
  is gone, as KubeVirt's VMI (named as its VM) does.
* Owner reference to the VM (controller=true, with uid) so the garbage collector
  removes the pod when the VM goes, even without this controller.
* Annotations: `kubernetes.io/target-runtime: virtlet.cloud` (the CRI proxy routes
  on it), the virtlet annotations generated from the spec, and the template hash
  (`vmlet.dev/template-hash`) that status.py compares to report RestartRequired.
  Template annotations pass through, but the generated ones win.
* restartPolicy Never: restarts are the controller's decision (runStrategy), not
  the kubelet's.
* Probes: the VM's exec readinessProbe/livenessProbe go on the container with the
  kubelet's defaults written out; the kubelet runs them through the node's ExecSync
  (the guest agent). A failed liveness probe stops the VM; restartPolicy Never leaves
  the restart to the controller's runStrategy, as KubeVirt does.
* Disks and volumes (vmapi/storage.py): pod volumes, mounts and devices, and the
  `vmlet.dev/disks` / `vmlet.dev/root-reimage` annotations, which only the spec
  makes (a template annotation of those names is dropped). They depend on the
  claims (Block or Filesystem, requested size), so rendering is two steps:
  `prepare(vm)` checks everything the spec alone can tell, `render(vm, claims)`
  finishes the pod once the controller has read the claims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping

from cri_shim import annotations as va
from vmapi import storage, types
from vmapi.errors import SpecError

POD_SUFFIX = "-vm"
LABEL_VM = types.LABEL_VM
LABEL_VM_UID = types.LABEL_VM_UID
ANN_TEMPLATE_HASH = "vmlet.dev/template-hash"
CONTAINER = "vm"
# Nodes that run vmlet (the DaemonSet's nodeSelector carries the same label).
NODE_SELECTOR = {"vmlet.dev/runtime": "virtlet"}
TARGET_RUNTIME = "virtlet.cloud"

# Annotations only the spec's disks and volumes make: a template's own would bypass their checks.
STORAGE_ANNOTATIONS = (va.DISKS, va.ROOT_REIMAGE)


# What kube-apiserver checks on a pod's metadata (apimachinery validation): a VM that cannot make a
# pod the server accepts is reported as an invalid spec, not retried as a failing create forever.
_DNS_SUBDOMAIN = re.compile(types.DNS_SUBDOMAIN_PATTERN)
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_key(where: str, key: Any) -> None:
    prefix, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", "")
    if not (0 < len(name) <= 63 and _NAME_PART.match(name)) or (
            prefix and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix))):
        raise SpecError(f"{where}: {_shown(key)} is not a valid key ([prefix/]name, name of at most 63 "
                        "alphanumerics, '-', '_' or '.')")


def check_labels(where: str, labels: Mapping[str, Any]) -> None:
    for k, v in labels.items():
        _check_key(where, k)
        if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
            raise SpecError(f"{where}[{k}]: {_shown(v)} is not a valid label value (at most 63 "
                            "alphanumerics, '-', '_' or '.')")


def check_annotations(where: str, annotations: Mapping[str, Any]) -> None:
    size = 0
    for k, v in annotations.items():
        _check_key(where, k)
        v = str(v)
        try:
            encoded = v.encode("utf-8")
        except UnicodeEncodeError as e:
            # A lone surrogate is no Unicode text: on the wire it would arrive as U+FFFD, so the pod
            # would silently carry another value than the VM asked for.
            raise SpecError(f"{where}[{k}]: the value has a lone surrogate ({v[e.start]!r} at index {e.start}), "
                            "which is not valid Unicode text") from None
        size += len(k.encode("utf-8")) + len(encoded)
    if size > MAX_ANNOTATIONS_BYTES:
        raise SpecError(f"{where}: {size} bytes in all, over the API server's {MAX_ANNOTATIONS_BYTES} "
                        "(user data, SSH keys and template annotations together)")


def check_vm_name(name: Any) -> None:
    if not (isinstance(name, str) and 0 < len(name) <= types.MAX_VM_NAME and _DNS_SUBDOMAIN.match(name)):
        raise SpecError(f"metadata.name: {_shown(name)} cannot name a VM pod (a DNS subdomain of at most "
                        f"{types.MAX_VM_NAME} characters: the pod is <name>{POD_SUFFIX} and the name a label value)")


def pod_name(vm_name: str) -> str:
    return vm_name + POD_SUFFIX


def template_hash(spec: Mapping[str, Any]) -> str:
    """A stable hash of spec.template — what a running pod was made from.

    Hashed after parsing with the model's defaults filled in, so a template the API
    server defaulted and one it did not (or an older object missing a new defaulted
    field) hash the same; an unparseable template is hashed as written.
    """
    try:
        template: Any = parse_spec(spec).template.model_dump(mode="json", exclude_none=True)
    except SpecError:
        template = spec.get("template") or {}
    try:
        blob = json.dumps(template, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON-shaped (keys of mixed types): hash its repr
        blob = repr(template)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def parse_spec(spec: Mapping[str, Any]) -> types.VirtualMachineSpec:
    """The spec as the model; SpecError names the field when the API server let something through."""
    from pydantic import ValidationError
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec: {_shown(spec)} is not an object")
    try:
        return types.VirtualMachineSpec.model_validate(dict(spec))
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        raise SpecError(f"spec{where}: {err['msg']}") from None


def vm_annotations(spec: types.VirtualMachineSpec) -> dict[str, str]:
    """The virtlet annotations the node runtime reads, from the spec."""
    vmi = spec.template.spec
    dom = vmi.domain
    out = {
        va.TARGET_RUNTIME: TARGET_RUNTIME,
        va.VCPU_COUNT: str(dom.cpu.cores),
        va.DISK_DRIVER: dom.rootDisk.bus,
        va.NETWORK_BINDING: dom.interface.binding,
    }
    if dom.cpu.model:
        out[va.CPU_MODEL] = dom.cpu.model
    if dom.rootDisk.size:
        out[va.ROOT_VOLUME_SIZE] = dom.rootDisk.size
    ci = vmi.cloudInit
    if ci is not None:
        if ci.userData and ci.userData.strip():
            # virtlet: a mapping goes to VirtletCloudInitUserData, a script to ...UserDataScript.
            key = va.CLOUD_INIT_USER_DATA_SCRIPT if ci.userData.lstrip().startswith("#!") else va.CLOUD_INIT_USER_DATA
            out[key] = ci.userData
        if ci.userDataSecretRef is not None:
            out[va.CLOUD_INIT_USER_DATA_SOURCE] = f"secret/{ci.userDataSecretRef.name}"
            out[va.CLOUD_INIT_USER_DATA_SOURCE_KEY] = ci.userDataSecretRef.key or "userdata"
        if ci.sshKeys:
            out[va.SSH_KEYS] = "\n".join(ci.sshKeys)
        if ci.sshKeysSecretRef is not None:
            out[va.SSH_KEY_SOURCE] = f"secret/{ci.sshKeysSecretRef.name}/{ci.sshKeysSecretRef.key or 'authorized_keys'}"
    return out


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A VM whose spec checked out as far as it can without its claims."""

    vm: Mapping[str, Any]
    spec: types.VirtualMachineSpec
    plan: storage.Plan
    annotations: dict[str, str]  # all but the storage ones, already through the node's parser


def prepare(vm: Mapping[str, Any]) -> Prepared:
    """Everything about the VM pod that does not depend on its claims; SpecError naming the field."""
    meta = vm["metadata"]
    check_vm_name(meta.get("name"))
    spec = parse_spec(vm.get("spec"))
    vmi = spec.template.spec
    tmeta = spec.template.metadata or types.TemplateMeta()
    passed = {k: v for k, v in (tmeta.annotations or {}).items() if k not in STORAGE_ANNOTATIONS}
    annotations = {**passed, **vm_annotations(spec), ANN_TEMPLATE_HASH: template_hash(vm["spec"])}
    check_labels("spec.template.metadata.labels", tmeta.labels or {})
    check_labels("spec.template.spec.nodeSelector", vmi.nodeSelector or {})
    check_annotations("spec.template.metadata.annotations", annotations)
    try:  # the node runtime's own parser: refuse here what the node would refuse later
        va.VMAnnotations.from_pod_annotations(annotations)
    except va.AnnotationError as e:
        raise SpecError(str(e)) from None
    try:
        va.parse_quantity(vmi.domain.memory.guest)
    except ValueError as e:
        raise SpecError(f"spec.template.spec.domain.memory.guest: {e}") from None
    for i, t in enumerate(spec.volumeClaimTemplates or []):
        check_labels(f"spec.volumeClaimTemplates[{i}].metadata.labels", t.metadata.labels or {})
        check_annotations(f"spec.volumeClaimTemplates[{i}].metadata.annotations", t.metadata.annotations or {})
    return Prepared(vm, spec, storage.plan(spec, meta["name"]), annotations)


def render(vm: Mapping[str, Any], claims: Mapping[str, Any] | None = None,
           prepared: Prepared | None = None) -> dict[str, Any]:
    """The VM pod for a VirtualMachine body and its claims (by name; None or absent: not there).

    SpecError when the spec cannot make a valid pod; errors.ClaimsUnavailable when claims it needs
    are not there (yet). `prepared`: what prepare(vm) returned, to not do it twice."""
    p = prepared if prepared is not None else prepare(vm)
    meta, vmi = vm["metadata"], p.spec.template.spec
    disks = storage.render(p.plan, claims or {}, vm)
    annotations = {**p.annotations, **disks.annotations}
    if disks.annotations:
        check_annotations("spec.template.metadata.annotations", annotations)
        try:  # the node's parser on what the disks added (the rest went through it in prepare)
            va.VMAnnotations.from_pod_annotations(
                {k: annotations[k] for k in (*STORAGE_ANNOTATIONS, va.DISK_DRIVER) if k in annotations})
        except va.AnnotationError as e:
            raise SpecError(str(e)) from None
    tmeta = p.spec.template.metadata or types.TemplateMeta()
    labels = {**(tmeta.labels or {}), LABEL_VM: meta["name"], LABEL_VM_UID: meta["uid"]}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": vmi.domain.rootDisk.image,
        "imagePullPolicy": vmi.domain.rootDisk.imagePullPolicy,
        "resources": {
            "requests": {"memory": vmi.domain.memory.guest},
            "limits": {"memory": vmi.domain.memory.guest},
        },
    }
    for kind in ("readinessProbe", "livenessProbe"):
        probe = getattr(vmi, kind)
        if probe is not None:
            container[kind] = container_probe(probe)
    if disks.mounts:
        container["volumeMounts"] = disks.mounts
    if disks.devices:
        container["volumeDevices"] = disks.devices
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The node shares every directory mount with the guest: the pod's API token must not be one of them.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": vmi.terminationGracePeriodSeconds,
        "nodeSelector": {**(vmi.nodeSelector or {}), **NODE_SELECTOR},
        "containers": [container],
    }
    if disks.volumes:
        pod_spec["volumes"] = disks.volumes
    if vmi.affinity:
        pod_spec["affinity"] = vmi.affinity
    if vmi.tolerations:
        pod_spec["tolerations"] = vmi.tolerations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(vm)],
        },
        "spec": pod_spec,
    }


# The kubelet's defaults (core/v1 SetDefaults_Probe), written out so the pod says what runs.
PROBE_DEFAULTS = {"initialDelaySeconds": 0, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
                  "failureThreshold": 3}


def container_probe(probe: types.Probe) -> dict[str, Any]:
    """A VM's exec probe as the pod container's (the kubelet runs it through the node's ExecSync)."""
    out: dict[str, Any] = {"exec": {"command": list(probe.exec.command)}}
    for k, default in PROBE_DEFAULTS.items():
        v = getattr(probe, k)
        out[k] = default if v is None else v
    return out


def owner_reference(vm: Mapping[str, Any]) -> dict[str, Any]:
    meta = vm["metadata"]
    return {"apiVersion": types.API_VERSION, "kind": types.KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def is_owned_by(pod: Mapping[str, Any], vm: Mapping[str, Any]) -> bool:
    uid = vm["metadata"].get("uid")
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("kind") == types.KIND and r.get("controller") for r in refs)
