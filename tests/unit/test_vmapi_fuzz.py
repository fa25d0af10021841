"""Property-based fuzzing of the controller's pure core (hypothesis): every VM becomes a valid pod or a SpecError.

VM bodies are generated from the CRD's own schema (deploy/manifests/crds/virtualmachines.yaml),
then some are pushed off it (wrong types, unknown fields, nulls: what an emulator or an older
schema lets through), with hostile names, labels, annotations and user data. Properties:

* `podspec.render` returns a pod a real API server would accept (DNS names, label syntax,
  annotation size, volumes that mounts and devices name) that the node runtime's parser accepts
  too, or raises SpecError — or, when a claim it needs is not there, ClaimsUnavailable, exactly
  when storage.report says the claim holds the pod back — never anything else;
* disks and volumes (`storage_vm_bodies`): coherent specs from a small pool of names, so that
  references, duplicates, roots and filesystems collide, with claims present, missing, of either
  volume mode, any size, terminating, or junk;
* the reconcile pass's other inputs (`requests.parse`, `template_hash`, `status.derive` on a
  hostile previous status, `strategy.decide`) never raise.

Seeded and bounded by default (VMLET_FUZZ=ci); VMLET_FUZZ=long runs many more examples.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from cri_shim import annotations as va
from vmapi.errors import ClaimsUnavailable
from vmapi import podspec, requests, status, storage, strategy, types

LONG = os.environ.get("VMLET_FUZZ", "ci") == "long"
FUZZ = settings(max_examples=3000 if LONG else 300, derandomize=not LONG, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CRD = Path(__file__).resolve().parents[2] / "deploy/manifests/crds/virtualmachines.yaml"
SCHEMA = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

HOSTILE_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(
    ["\x00", "\ud800", "\x1b", "\ufffe", "\uffff", "\u202e", "/", ".", "$", "{", "\n", "=", ",", "'", '"']), max_size=40)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | HOSTILE_TEXT,
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(HOSTILE_TEXT, c, max_size=3), max_leaves=8)


def from_schema(s: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
    """A hypothesis strategy for the values a structural schema admits."""
    if "enum" in s:
        return st.sampled_from(s["enum"])
    t = s.get("type")
    if s.get("x-kubernetes-preserve-unknown-fields") and t != "object" or (t == "object" and "properties" not in s
                                                                          and "additionalProperties" not in s):
        return JSON
    if t == "object" and "properties" in s:
        req = set(s.get("required") or [])
        props = {k: from_schema(v, depth + 1) for k, v in s["properties"].items()}
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in req},
                                     optional={k: v for k, v in props.items() if k not in req})
    if t == "object":
        return st.dictionaries(HOSTILE_TEXT | st.from_regex(r"[a-z0-9./-]{1,70}", fullmatch=True),
                               from_schema(s["additionalProperties"], depth + 1), max_size=4)
    if t == "array":
        return st.lists(from_schema(s["items"], depth + 1), max_size=min(s.get("maxItems", 4), 4))
    if t == "integer":
        return st.integers(s.get("minimum", -2**63), s.get("maximum", 2**63 - 1))
    if t == "boolean":
        return st.booleans()
    if t == "string":
        lo, hi = s.get("minLength", 0), min(s.get("maxLength", 80), 300)
        base = st.from_regex(s["pattern"], fullmatch=True) if "pattern" in s else HOSTILE_TEXT
        return base.filter(lambda x: lo <= len(x) <= hi)
    return JSON


SPEC = from_schema(SCHEMA["properties"]["spec"])
NAME = (st.from_regex(r"[a-z0-9]([-a-z0-9]{0,58}[a-z0-9])?", fullmatch=True)
        | st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,250}[a-z0-9])?", fullmatch=True) | HOSTILE_TEXT)


@st.composite
def off_schema(draw, spec: dict[str, Any]) -> Any:
    """The spec with one value somewhere replaced by anything (type confusion, nulls, unknown keys)."""
    if not isinstance(spec, dict) or not draw(st.booleans()):
        return spec
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
    walk(spec, ())
    path = draw(st.sampled_from(paths))
    if not path:
        return draw(JSON)
    out = json.loads(json.dumps(spec))
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = draw(JSON)
    return out


@st.composite
def vm_bodies(draw) -> dict[str, Any]:
    spec = draw(off_schema(draw(SPEC)))
    meta: dict[str, Any] = {"name": draw(NAME), "namespace": "default", "uid": "u-1"}
    if draw(st.booleans()):
        meta["annotations"] = draw(st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT | JSON, max_size=3))
    return {"apiVersion": types.API_VERSION, "kind": types.KIND, "metadata": meta, "spec": spec,
            "status": draw(st.none() | JSON | st.fixed_dictionaries({}, optional={
                k: JSON for k in ("printableStatus", "podUID", "podPhase", "restartCount", "conditions",
                                  "startFailure", "runStrategy")}))}


# Disks and volumes: few names, so that references hit and duplicates happen.
VOL_NAMES = st.sampled_from(["root", "data", "logs", "cfg", "app", "scratch", "a-much-longer-volume-name-1"])
GOOD_SIZES = st.sampled_from(["2Mi", "1Gi", "10Gi", "1.5Gi"])
BAD_SIZES = st.sampled_from(["1Ki", "1Mi", "20Ti", "0"])
DISK_OPTIONS = {"bus": st.sampled_from(["virtio", "scsi", "sata"]), "bootOrder": st.integers(1, 4),
                "readonly": st.booleans(), "serial": st.sampled_from(["s1", "data", "X.Y-z"]),
                "cache": st.sampled_from(["none", "none", "writeback", "unsafe"]),
                "io": st.sampled_from(["native", "threads", "io_uring"])}


@st.composite
def storage_vm_bodies(draw) -> dict[str, Any]:
    """A VM with disks, volumes, filesystems and claim templates: consistent, but for a fault now and
    then (a stray or duplicate name, two sources, a bad path or size, an unused volume or template)."""
    def fault() -> bool:  # about 1 in 12 (hypothesis favours the bounds of a range: not 0 here)
        return draw(st.integers(0, 11)) == 5

    vm = vm_manifest_like(draw(st.sampled_from(["vm", "db", "x" * 40])))
    vmi = vm["spec"]["template"]["spec"]
    dom = vmi["domain"]
    names = draw(st.lists(VOL_NAMES, max_size=5, unique=not fault()))
    volumes, disks, filesystems, templates = [], [], [], []
    mount_paths = iter(["/etc/app", "/srv/data", "/opt/conf", "/etc/app" if fault() else "/var/x", "/vmlet/x"])
    for n in names:
        kinds = [draw(st.sampled_from(types.VOLUME_SOURCES))]
        if fault():
            kinds = draw(st.lists(st.sampled_from(types.VOLUME_SOURCES), max_size=2, unique=True))
        vol: dict[str, Any] = {"name": n}
        for kind in kinds:
            if kind == "persistentVolumeClaim":
                claim = draw(st.sampled_from([n, n, "shared"]))
                vol[kind] = {"claimName": claim, **({"readOnly": True} if draw(st.integers(0, 3)) == 0 else {})}
                if claim == n and draw(st.booleans()):
                    spec = {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": draw(BAD_SIZES if fault() else GOOD_SIZES)}}}
                    if draw(st.booleans()):
                        spec["volumeMode"] = draw(st.sampled_from(["Filesystem", "Block"]))
                    templates.append({"metadata": {"name": claim}, "spec": spec})
            elif kind == "emptyDisk":
                vol[kind] = {"capacity": draw(BAD_SIZES if fault() else GOOD_SIZES)}
            else:
                src = {"name": "cm"} if kind == "configMap" else {"secretName": "sec"}
                if draw(st.booleans()):
                    src["items"] = [{"key": "a", "path": draw(st.sampled_from(["../c", "a//b"]) if fault()
                                                              else st.sampled_from(["a", "x/b"]))}]
                vol[kind] = src
        volumes.append(vol)
        if fault():
            continue  # used by nothing
        if kinds in (["configMap"], ["secret"]) and draw(st.booleans()):
            filesystems.append({"name": n, "mountPath": next(mount_paths) if not fault() else "/a/../b"})
        else:
            disks.append({"name": n, **draw(st.fixed_dictionaries({}, optional=DISK_OPTIONS))})
    if fault():
        disks.append({"name": draw(VOL_NAMES)})  # a stray or duplicate disk
    if fault():
        templates.append({"metadata": {"name": "unused"}, "spec": {"accessModes": ["ReadWriteOnce"],
                                                                   "resources": {"requests": {"storage": "1Gi"}}}})
    root = dom["rootDisk"]
    claim_volumes = [v["name"] for v in volumes if "persistentVolumeClaim" in v]
    if (claim_volumes or fault()) and draw(st.booleans()):
        root["volume"] = draw(st.sampled_from(claim_volumes) if claim_volumes and not fault() else VOL_NAMES)
        disks = [d for d in disks if d["name"] != root["volume"] or draw(st.booleans())]
    for key, value in (("capacity", draw(st.sampled_from(["1Gi", "11Gi"]))), ("reimage", True)):
        if ("volume" in root or fault()) and draw(st.booleans()):
            root[key] = value
    for key, value in (("size", "4Gi"), ("bus", "scsi")):
        if ("volume" not in root or fault()) and draw(st.booleans()):
            root[key] = value
    for key, value in (("volumes", volumes), ("disks", disks), ("filesystems", filesystems)):
        if value:
            (vmi if key == "volumes" else dom)[key] = value
    if templates:
        vm["spec"]["volumeClaimTemplates"] = templates
    if draw(st.booleans()):
        vm["spec"]["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": draw(st.sampled_from(["Retain", "Delete"]))}
    return vm


def vm_manifest_like(name: str) -> dict[str, Any]:
    return {"apiVersion": types.API_VERSION, "kind": types.KIND,
            "metadata": {"name": name, "namespace": "default", "uid": "u-1"},
            "spec": {"runStrategy": "Always", "template": {"spec": {"domain": {
                "memory": {"guest": "512Mi"}, "rootDisk": {"image": "virtlet.cloud/testvm"}}}}}}


@st.composite
def claims_for(draw, vm: dict[str, Any]) -> dict[str, Any]:
    """Claims for what the VM's volumes name (when its spec gets that far): each absent, as the
    controller makes it, someone else's of any mode and size and phase, being deleted, or junk."""
    try:
        plan = podspec.prepare(vm).plan
    except (podspec.SpecError, KeyError, TypeError, AttributeError):
        return {}
    out: dict[str, Any] = {}
    for ref in plan.claims:
        kind = draw(st.sampled_from(["absent", "made", "made", "user", "user", "user", "terminating", "junk"]))
        if kind == "absent":
            continue
        if kind == "junk":
            out[ref.claim] = draw(JSON)
            continue
        if kind == "made" and ref.template is not None:
            claim = storage.claim_manifest(vm, plan, ref)
        else:
            spec: dict[str, Any] = {"resources": {"requests": {"storage": draw(GOOD_SIZES | GOOD_SIZES | BAD_SIZES
                                                                                | st.sampled_from(["1e10", "lots"])
                                                                                | st.integers(0, 10))}}}
            if draw(st.booleans()):
                spec["volumeMode"] = draw(st.sampled_from(["Filesystem", "Block", "Object"]))
            claim = {"metadata": {"name": ref.claim}, "spec": spec}
        if kind == "terminating":
            claim["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
        claim["status"] = {"phase": draw(st.sampled_from(["Pending", "Bound", "Lost", ""]))}
        out[ref.claim] = claim
    return out


def pod_storage_problems(pod: dict[str, Any]) -> list[str]:
    """What the API server checks on a pod's volumes, and that every disk the annotation names is there."""
    out = []
    spec, (c,) = pod["spec"], pod["spec"]["containers"]
    names = [v["name"] for v in spec.get("volumes") or []]
    if len(names) != len(set(names)) or not all(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", n) for n in names):
        out.append(f"pod volume names {names}")
    for field, path in (("volumeMounts", "mountPath"), ("volumeDevices", "devicePath")):
        used = c.get(field) or []
        if len({u[path] for u in used}) != len(used) or any(u["name"] not in names for u in used):
            out.append(f"{field}: {used}")
    for v in spec.get("volumes") or []:
        if "persistentVolumeClaim" in v and not DNS_SUBDOMAIN.match(v["persistentVolumeClaim"]["claimName"]):
            out.append(f"claim name {v['persistentVolumeClaim']['claimName']!r}")
    mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
    devices = {d["devicePath"] for d in c.get("volumeDevices") or []}
    for d in va.VMAnnotations.from_pod_annotations(pod["metadata"]["annotations"]).disks:
        if (d.source in ("volume", "configVolume") and d.path not in mounts) or (
                d.source == "device" and d.path not in devices):
            out.append(f"disk {d.name}: {d.source} {d.path} is not in the pod")
    return out


# What kube-apiserver checks on a pod (apimachinery's validation).
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def valid_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    prefix, _, name = key.rpartition("/")
    return (0 < len(name) <= 63 and bool(QUALIFIED_NAME.match(name))
            and (not prefix or (len(prefix) <= 253 and bool(DNS_SUBDOMAIN.match(prefix)))))


def api_server_problems(pod: dict[str, Any]) -> list[str]:
    meta = pod["metadata"]
    out = []
    if not (isinstance(meta["name"], str) and len(meta["name"]) <= 253 and DNS_SUBDOMAIN.match(meta["name"])):
        out.append(f"pod name {meta['name']!r}")
    for k, v in meta["labels"].items():
        if not valid_key(k) or not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            out.append(f"label {k!r}: {v!r}")
    size = 0
    for k, v in meta["annotations"].items():
        if not valid_key(k) or not isinstance(v, str):
            out.append(f"annotation {k!r}")
            continue
        try:
            size += len(k.encode()) + len(v.encode())
        except UnicodeEncodeError:  # a lone surrogate: the server would store U+FFFD instead
            out.append(f"annotation {k!r}: {v!r} is not valid Unicode text")
    if size > 256 * 1024:
        out.append(f"annotations {size} bytes")
    for k, v in pod["spec"]["nodeSelector"].items():
        if not valid_key(k) or not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            out.append(f"nodeSelector {k!r}: {v!r}")
    return out


@FUZZ
@given(data=st.data(), vm=vm_bodies() | storage_vm_bodies())
def test_every_vm_becomes_a_valid_pod_or_a_spec_error(data, vm):
    claims = data.draw(claims_for(vm))
    try:
        pod = podspec.render(vm, claims)
    except podspec.SpecError as e:
        assert str(e) and len(str(e)) <= 4096
        return
    except ClaimsUnavailable as e:
        held = storage.report(podspec.prepare(vm).plan, claims, vm).unavailable
        assert e.claims and set(e.claims) == set(held), (e.claims, held)
        return
    assert not api_server_problems(pod), api_server_problems(pod)
    va.VMAnnotations.from_pod_annotations(pod["metadata"]["annotations"])  # the node accepts it too
    assert not pod_storage_problems(pod), pod_storage_problems(pod)
    assert not storage.report(podspec.prepare(vm).plan, claims, vm).unavailable
    assert podspec.is_owned_by(pod, vm)


@FUZZ
@given(data=st.data(), vm=storage_vm_bodies(), pod_phase=st.sampled_from(["Pending", "Running", None]),
       action=st.sampled_from(["create", "none"]))
def test_the_status_of_any_storage_is_one_the_schema_takes(data, vm, pod_phase, action):
    claims = data.draw(claims_for(vm))
    try:
        plan = podspec.prepare(vm).plan
    except podspec.SpecError:
        return
    rep = storage.report(plan, claims, vm)
    pod = None if pod_phase is None else {"metadata": {"name": "vm-vm", "uid": "p-1"},
                                          "status": {"phase": pod_phase}}
    derived = status.derive(vm, pod, strategy.Decision(action, "", ()), now=1000.0, current_hash="h", volumes=rep)
    types.VirtualMachineStatus.model_validate(json.loads(json.dumps(derived)))
    if pod is None and action == "create" and rep.unavailable:
        assert derived["printableStatus"] == ("ErrorPvcNotFound" if rep.missing else "Starting")
    for claim in claims.values():  # the retention patch never breaks on what it is given
        patch = storage.owner_patch(vm, plan, claim) if isinstance(claim, dict) else None
        assert patch is None or isinstance(patch["metadata"].get("ownerReferences"), (list, type(None)))


@FUZZ
@given(vm=vm_bodies(), pod_phase=st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown", None]),
       action=st.sampled_from(["create", "delete", "none"]), ann=HOSTILE_TEXT | JSON)
def test_the_rest_of_a_pass_never_raises(vm, pod_phase, action, ann):
    podspec.template_hash(vm["spec"] if isinstance(vm["spec"], dict) else {})
    requests.parse({requests.ANNOTATION: ann} if isinstance(ann, str) else ann if isinstance(ann, dict) else None)
    pod = None if pod_phase is None else {"metadata": {"name": "x-vm", "uid": "p-1", "ownerReferences": [
        podspec.owner_reference(vm)]}, "status": {"phase": pod_phase}}
    st_ = vm.get("status")
    vm_safe = {**vm, "status": st_ if isinstance(st_, dict) else None}
    prev = vm_safe.get("status") or {}
    decision = strategy.decide(strategy.Inputs(
        run_strategy="Always", pod=None if pod is None else strategy.PodView("p-1", pod_phase),
        last_pod_uid=prev.get("podUID") if isinstance(prev.get("podUID"), str) else None,
        start_failure=status.start_failure_of(prev), now=1000.0))
    derived = status.derive(vm_safe, pod, strategy.Decision(action, "", decision.requests), now=1000.0,
                            current_hash="h", spec_error="bad" if action == "create" else None)
    json.dumps(derived)
