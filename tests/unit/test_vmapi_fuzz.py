"""Property-based fuzzing of the controller's pure core (hypothesis): every VM becomes a valid pod or a SpecError.

VM bodies are generated from the CRD's own schema (deploy/manifests/crds/virtualmachines.yaml),
then some are pushed off it (wrong types, unknown fields, nulls: what an emulator or an older
schema lets through), with hostile names, labels, annotations and user data. Properties:

* `podspec.render` returns a pod a real API server would accept (DNS names, label syntax,
  annotation size) that the node runtime's parser accepts too, or raises SpecError — never
  anything else;
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
from vmapi import podspec, requests, status, strategy, types

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
@given(vm=vm_bodies())
def test_every_vm_becomes_a_valid_pod_or_a_spec_error(vm):
    try:
        pod = podspec.render(vm)
    except podspec.SpecError as e:
        assert str(e) and len(str(e)) <= 4096
        return
    assert not api_server_problems(pod), api_server_problems(pod)
    va.VMAnnotations.from_pod_annotations(pod["metadata"]["annotations"])  # the node accepts it too
    assert podspec.is_owned_by(pod, vm)


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
