"""Hostile VirtualMachines through the real operator on kmock (hypothesis, seeded).

The emulator stores whatever it is sent, so off-schema specs, hostile names and
annotations reach the controller as they would through a CRD without its schema.
Each VM must become a pod the node runtime accepts or an ErrorInvalidSpec status
with a Failure condition (or ErrorPvcNotFound, when a claim it names was left out
on purpose), then go away with its pod when deleted; no pass may crash. Bodies
come from tests/unit/test_vmapi_fuzz.py's CRD-schema and storage strategies; the
claims their volumes name are made beforehand (any volume mode, size, phase) or not.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

from cri_shim import annotations as va
from tests.integration.vmapi.convergence import LogWatch, check, GONE
from tests.integration.vmapi.harness import NS, TIMEOUT_SCALE, vm_manifest, vm_with_claim
from tests.integration.vmapi.profile import LONG
from tests.unit.test_vmapi_fuzz import storage_vm_bodies, vm_bodies
from vmapi import podspec, requests, storage, types

pytestmark = pytest.mark.asyncio
EXAMPLES = 300 if LONG else 25


def _routable(name) -> bool:
    # Names kmock can route in a URL path (a real API server refuses the rest at create).
    return isinstance(name, str) and 0 < len(name) <= 253 and "/" not in name and name not in (".", "..") \
        and name.isprintable() and name.strip() == name and "%" not in name and "?" not in name and "#" not in name


async def test_hostile_vms_become_a_pod_or_a_clear_condition(server, cluster, operator):
    counter = itertools.count()
    seen: collections.Counter = collections.Counter()
    loop = asyncio.get_running_loop()

    def wait(pred, what, timeout=5.0):
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    @settings(max_examples=EXAMPLES, derandomize=not LONG, database=None, deadline=None,
              phases=list(Phase) if LONG else [Phase.explicit, Phase.generate],  # shrinking costs minutes here
              suppress_health_check=list(HealthCheck))
    @given(vm=vm_bodies() | storage_vm_bodies(), claims=st.data())
    # Valid VMs whose runStrategy wants no pod: neither a pod nor InvalidSpec, but Stopped.
    @example(vm=vm_manifest("halted", "Halted"), claims=None)
    @example(vm=vm_manifest("manual", "Manual"), claims=None)
    # Whatever the generated examples turn out to be, the run sees a pod with disks and a VM waiting for a claim.
    @example(vm=vm_with_claim("withclaim"), claims=None)
    @example(vm=_vm_with_own_claim("ownclaim"), claims=LEAVE_OUT)
    def one(vm, claims):
        name = vm["metadata"]["name"]
        if not _routable(name):
            name = "x"
        name = f"{name}-{next(counter)}" if len(name) < 240 else f"n{next(counter)}"
        body = {**vm, "metadata": {k: v for k, v in vm["metadata"].items() if k != "uid"} | {"name": name}}
        body.pop("status", None)
        made, left_out = _make_claims(cluster, body, claims)
        cluster.custom.create_namespaced_custom_object(types.GROUP, types.VERSION, NS, types.PLURAL, body,
                                                       _preload_content=False)

        wants_no_pod = _wants_no_pod(body)

        def outcome():
            got = cluster.kube.get_vm(NS, name)
            st = (got or {}).get("status") or {}
            pod = cluster.kube.get_pod(NS, podspec.pod_name(name))
            if pod is not None:
                return ("pod", pod)
            conditions = [c for c in st.get("conditions") or [] if isinstance(c, dict)]
            if any(c.get("type") == "Failure" and c.get("reason") == "InvalidSpec" for c in conditions):
                return ("invalid", st)
            if left_out and st.get("printableStatus") == "ErrorPvcNotFound":
                return ("no-claim", st)
            # Status, conditions and printableStatus come in one patch: Stopped without a Failure is final.
            if wants_no_pod and st.get("printableStatus") == "Stopped" and not any(
                    c.get("type") == "Failure" for c in conditions):
                return ("stopped", got)
            return None
        kind, what = wait(outcome, f"VM {name!r} to get a pod, an InvalidSpec condition, ErrorPvcNotFound (claims "
                                   f"left out: {left_out}) or (its runStrategy wants no pod) to be Stopped", timeout=3)
        seen[kind] += 1
        if kind == "pod":
            seen["pod with disks"] += bool(va.VMAnnotations.from_pod_annotations(what["metadata"]["annotations"]).disks)
            va.VMAnnotations.from_pod_annotations(what["metadata"]["annotations"])
            assert not left_out, f"a pod without its claims {left_out}"
            for v in what["spec"].get("volumes") or []:  # every claim the pod names is there
                if "persistentVolumeClaim" in v:
                    assert cluster.kube.get_pvc(NS, v["persistentVolumeClaim"]["claimName"]) is not None, v
        elif kind == "no-claim":
            reasons = {s.get("persistentVolumeClaimInfo", {}).get("claimName"): s.get("reason")
                       for s in what.get("volumeStatus") or []}
            assert all(reasons.get(c) == "PvcNotFound" for c in left_out), (left_out, reasons)
            assert not what["created"] and not any(c.get("type") == "Failure" for c in what["conditions"]), what
        elif kind == "stopped":
            assert not what["status"].get("created") and not what["status"].get("ready"), what["status"]
            podspec.render(what)  # no InvalidSpec: the spec must be one that makes a pod when started
        else:
            failure = [c for c in what["conditions"] if c["type"] == "Failure" and c["status"] == "True"]
            assert failure and failure[0]["message"], what
            assert what["printableStatus"] in ("ErrorInvalidSpec", "Stopped") and not what["created"], what
        cluster.custom.delete_namespaced_custom_object(types.GROUP, types.VERSION, NS, types.PLURAL, name,
                                                       _preload_content=False)
        wait(lambda: asyncio.run_coroutine_threadsafe(_gone(server, name), loop).result() is None,
             f"VM {name!r} and its pod to be gone")
        for claim in made + _claims_of(cluster, name):  # no garbage collector here: the test cleans up
            cluster.core.delete_namespaced_persistent_volume_claim(claim, NS, _preload_content=False)

    with LogWatch() as logs:
        await asyncio.to_thread(one)
    assert operator.alive()
    # The run tested what it claims: pods with disks, invalid specs, and VMs waiting for a claim.
    assert {"pod with disks", "invalid", "no-claim", "stopped"} <= {k for k, n in seen.items() if n}, seen
    assert not logs.crashes(), "\n".join(logs.crashes())


LEAVE_OUT = "leave every claim out"


def _vm_with_own_claim(name: str) -> dict:
    """A VM whose data disk is a claim no template makes (the user's own, data-<name>)."""
    vm = vm_manifest(name)
    vmi = vm["spec"]["template"]["spec"]
    vmi["domain"]["disks"] = [{"name": "data"}]
    vmi["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": f"data-{name}"}}]
    return vm


def _make_claims(cluster, body, data) -> tuple[list[str], list[str]]:
    """Make the claims the VM's volumes name that no template makes, but leave one out now and then:
    (made, left out). Each made one has any volume mode, size and phase a real cluster could show.
    LEAVE_OUT: make none of them."""
    if data is None:
        return [], []
    try:
        plan = podspec.prepare(body | {"metadata": body["metadata"] | {"uid": "u", "namespace": NS}}).plan
    except (podspec.SpecError, KeyError, TypeError, AttributeError):
        return [], []
    made, left_out = [], []
    for ref in plan.claims:
        if ref.template is not None:
            continue
        if data == LEAVE_OUT or data.draw(st.integers(0, 5)) == 3:
            left_out.append(ref.claim)
            continue
        spec = {"accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": data.draw(st.sampled_from(["1Gi", "10Gi", "1e9", "1Ki"]))}}}
        if data.draw(st.booleans()):
            spec["volumeMode"] = data.draw(st.sampled_from(["Filesystem", "Block"]))
        cluster.core.create_namespaced_persistent_volume_claim(NS, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": ref.claim, "namespace": NS},
            "spec": spec, "status": {"phase": data.draw(st.sampled_from(["Pending", "Bound"]))}},
            _preload_content=False)
        made.append(ref.claim)
    return made, left_out


def _claims_of(cluster, vm_name) -> list[str]:
    items = json.loads(cluster.core.list_namespaced_persistent_volume_claim(NS, _preload_content=False).data)["items"]
    return [c["metadata"]["name"] for c in items if storage.made_for(c, vm_name)]


def _wants_no_pod(body) -> bool:
    """Halted, or Manual with no start request: a valid VM then stays Stopped, without a pod."""
    spec = body.get("spec")
    rs = spec.get("runStrategy", "Always") if isinstance(spec, dict) else None
    annotations = body["metadata"].get("annotations")
    queued = isinstance(annotations, dict) and requests.ANNOTATION in annotations
    return rs == "Halted" or (rs == "Manual" and not queued)


async def _gone(server, name):
    return check(server, name, GONE)
