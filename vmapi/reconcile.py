"""One reconcile pass for one VM: read, decide, act, record. Synchronous; no kopf in here.

Level-triggered: every pass reads the VM and its pod fresh from the API server
(not from the watch event that woke it), so a pass woken by a stale event or
run by a second controller at the same time still acts on the current state.
Every write is idempotent or guarded: the pod name is deterministic (a second
create gets 409), deletes carry the pod uid as a precondition, VM patches carry
the resourceVersion. Order of writes matters for crash safety: status first
(it records what was done), then the request queue (which says what is left).

Claims: a pass reads every claim the spec's volumes name, first creating the
ones its volumeClaimTemplates make (a 409 means another pass or controller was
first: read it again), so they exist before the pod; their owner references
follow the retention policy. A claim that is missing or not usable yet holds
the pod back (storage.report says why); the claim's watch event wakes the VM.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from kubernetes.client.rest import ApiException

from vmapi import podspec, requests, status as vmstatus, storage, strategy, types
from vmapi.client import Conflict, Kube

log = logging.getLogger(__name__)

# printableStatus values announced as Warning events.
WARNING_STATES = ("CrashLoopBackOff", "ErrorUnschedulable", "ErrImagePull", "ImagePullBackOff",
                  "ErrorInvalidSpec", "ErrorPvcNotFound", "Unknown")
# printableStatus values whose event says why (the Ready condition's message).
EXPLAINED_STATES = ("ErrorPvcNotFound", "WaitingForVolumeBinding")


@dataclasses.dataclass(frozen=True)
class Options:
    resync_seconds: float = 60.0
    backoff_base: float = strategy.BACKOFF_BASE
    backoff_cap: float = strategy.BACKOFF_CAP
    request_timeout: float = 30.0  # per API request (connect, then read), the controller's and kopf's
    workers: int = 32  # threads for passes and finalizations (VMs reconciled at once)
    # Seconds to wait after the 1st, 2nd, ... failed API call in a row (the last one repeats).
    error_backoff: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30, 60.0)  # the last is MAX_RETRY_AFTER


@dataclasses.dataclass
class Result:
    vm: dict[str, Any] | None  # None: the VM is gone
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None
    error: str | None = None  # an API call failed: retry with back-off
    retry_after: float | None = None  # ...not before this many seconds (the server's Retry-After)
    wrote: int = 0  # API writes made (for the benchmark and tests)
    claims: tuple[str, ...] = ()  # the claims the VM's volumes name (their events wake it)


def _pod_view(vm: dict[str, Any], pod: dict[str, Any] | None) -> strategy.PodView | None:
    if pod is None:
        return None
    meta = pod.get("metadata") or {}
    return strategy.PodView(uid=meta.get("uid") or "", phase=(pod.get("status") or {}).get("phase") or "Pending",
                            terminating=bool(meta.get("deletionTimestamp")), owned=podspec.is_owned_by(pod, vm))


def reconcile_once(kube: Kube, namespace: str, name: str, opts: Options, now: float) -> Result:
    vm = kube.get_vm(namespace, name)
    if vm is None:
        delete_orphan_pod(kube, namespace, name)
        return Result(vm=None)
    meta = vm.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Result(vm=vm)  # the deletion handler owns this VM now
    # Nothing below trusts the body's shape: what the schema would refuse may be stored anyway
    # (an emulator, a CRD installed without its schema); render() reports it as an invalid spec.
    spec = vm.get("spec") if isinstance(vm.get("spec"), dict) else {}
    raw_status = vm.get("status") if isinstance(vm.get("status"), dict) else {}
    prev = vmstatus.sanitize(raw_status)

    result = Result(vm=vm)
    prepared, spec_error = None, None
    try:
        prepared = podspec.prepare(vm)
    except podspec.SpecError as e:
        spec_error = str(e)
    claims: dict[str, Any] = {}
    claim_error = None
    volumes = None
    manifest = None
    if prepared is not None:
        result.claims = tuple(r.claim for r in prepared.plan.claims)
        claims, claim_error = sync_claims(kube, vm, prepared.plan, result)
        volumes = storage.report(prepared.plan, claims, vm)
        if not volumes.unavailable:
            try:
                manifest = podspec.render(vm, claims, prepared=prepared)
            except podspec.SpecError as e:
                spec_error = str(e)
    # Missing: the CRD's default (an API server fills it in). Invalid: no pod, and render() said why.
    rs = spec.get("runStrategy", "Always") if spec.get("runStrategy", "Always") in types.RUN_STRATEGIES else None
    reqs, requests_error = requests.parse(meta.get("annotations"))
    pod = kube.get_pod(namespace, podspec.pod_name(name))

    decision = strategy.decide(strategy.Inputs(
        run_strategy=rs or "Invalid", pod=_pod_view(vm, pod), requests=reqs,
        last_run_strategy=prev.get("runStrategy"), last_pod_uid=prev.get("podUID"),
        last_pod_phase=prev.get("podPhase"), start_failure=vmstatus.start_failure_of(prev),
        now=now, backoff_base=opts.backoff_base, backoff_cap=opts.backoff_cap,
    ))
    acted, created, action_error = True, False, claim_error
    try:
        if decision.action == "create" and manifest is not None:
            try:
                pod = kube.create_pod(manifest)
                created = True
                result.wrote += 1
                result.events.append(("Normal", "SuccessfulCreate", f"created VM pod {manifest['metadata']['name']}"))
            except Conflict:  # another controller (or a pass of ours) was first: look again next pass
                acted, pod = False, kube.get_pod(namespace, podspec.pod_name(name))
                result.requeue_after = 1.0
        elif decision.action == "create":
            acted = False
        elif decision.action == "delete":
            assert pod is not None
            kube.delete_pod(namespace, pod["metadata"]["name"], pod["metadata"].get("uid"))
            result.wrote += 1
            result.events.append(("Normal", "SuccessfulDelete",
                                  f"deleted VM pod {pod['metadata']['name']}: {decision.reason}"))
    except (ApiException, Conflict) as e:
        acted = False
        action_error = f"{decision.action} pod: {short(e)}"
        result.error = action_error
        result.retry_after = retry_after(e)
        reason = "FailedCreate" if decision.action == "create" else "FailedDelete"
        result.events.append(("Warning", reason, action_error))

    current_hash = podspec.template_hash(spec)
    new = vmstatus.derive(vm, pod, decision, now=now, current_hash=current_hash, spec_error=spec_error,
                          action_error=action_error, requests_error=requests_error, acted=acted, created=created,
                          volumes=volumes)
    patch = vmstatus.changed(raw_status, new)
    latest = vm
    if patch:
        latest = kube.patch_vm_status(namespace, name, patch) or vm
        result.wrote += 1
    result.events.extend(_transition_events(prev, new))

    if acted and (decision.requests != reqs or requests_error):
        lmeta = latest.get("metadata") or {}
        if _annotation(lmeta) != _annotation(meta):
            result.requeue_after = 0.0  # vmctl queued something meanwhile: decide again
            return result
        meta_patch: dict[str, Any] = {"annotations": {requests.ANNOTATION: requests.dump(decision.requests)}}
        if lmeta.get("resourceVersion"):  # a vmctl write from now on makes this a 409, not a lost request
            meta_patch["resourceVersion"] = lmeta["resourceVersion"]
        try:
            kube.patch_vm(namespace, name, {"metadata": meta_patch})
            result.wrote += 1
        except Conflict:
            result.requeue_after = 0.5
    if decision.wait_until is not None:
        result.requeue_after = max(0.05, decision.wait_until - now)
    return result


def sync_claims(kube: Kube, vm: dict[str, Any], plan: storage.Plan,
                result: Result) -> tuple[dict[str, Any], str | None]:
    """The claims the plan names, by name (None: not there), after creating the missing ones that
    templates make and fixing the owner references of the ones they made. An API error on a write is
    returned (the pass goes on and reports it); a failed read raises, as the pod's does."""
    ns = vm["metadata"]["namespace"]
    claims: dict[str, Any] = {}
    error = None
    for ref in plan.claims:
        claim = kube.get_pvc(ns, ref.claim)
        try:
            if claim is None and ref.template is not None:
                try:
                    claim = kube.create_pvc(storage.claim_manifest(vm, plan, ref))
                    result.wrote += 1
                    result.events.append(("Normal", "SuccessfulCreate", f"created PersistentVolumeClaim {ref.claim}"))
                except Conflict:  # made meanwhile (a pass of another controller, or a create that timed out)
                    claim = kube.get_pvc(ns, ref.claim)
            elif claim is not None and ref.template is not None:
                patch = storage.owner_patch(vm, plan, claim)
                if patch is not None:
                    try:
                        claim = kube.patch_pvc(ns, ref.claim, patch)
                        result.wrote += 1
                    except Conflict:  # changed meanwhile: the next pass looks again
                        result.requeue_after = 0.5
        except ApiException as e:
            error = error or f"{'create' if claim is None else 'patch'} persistentvolumeclaim {ref.claim}: {short(e)}"
            result.error = error
            result.retry_after = retry_after(e)
            result.events.append(("Warning", "FailedCreate" if claim is None else "FailedUpdate", error))
        claims[ref.claim] = claim
    return claims, error


def _annotation(meta: dict[str, Any]) -> Any:
    ann = meta.get("annotations")
    return ann.get(requests.ANNOTATION) if isinstance(ann, dict) else None


def _transition_events(prev: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    events = []
    old_ps, new_ps = prev.get("printableStatus"), new.get("printableStatus")
    if old_ps != new_ps:
        where = f" on node {new['nodeName']}" if new.get("nodeName") else ""
        kind = "Warning" if new_ps in WARNING_STATES else "Normal"
        why = ""
        if new_ps in EXPLAINED_STATES:
            ready = next((c for c in new["conditions"] if c["type"] == "Ready"), {})
            pending = [s["message"] for s in new.get("volumeStatus") or [] if s.get("reason") == "WaitingForVolumeBinding"]
            why = ": " + ("; ".join(pending) if new_ps == "WaitingForVolumeBinding" else ready.get("message", ""))
        events.append((kind, new_ps or "Unknown", f"VM is {new_ps}{where} (was {old_ps or 'new'}){why}"[:1024]))
    old_c = {c["type"]: c for c in prev.get("conditions") or [] if isinstance(c, dict) and "type" in c}
    for c in new["conditions"]:
        if c["type"] in ("RestartRequired", "Failure") and old_c.get(c["type"], {}).get("message") != c["message"]:
            events.append(("Warning", c["reason"], c["message"]))
    return events


def short(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return str(e)


# The longest wait a server's Retry-After can impose (the controller's largest error back-off): a
# hostile or broken "1e9" must not park a VM's worker for good.
MAX_RETRY_AFTER = 60.0


def retry_after(e: BaseException) -> float | None:
    """The server's Retry-After (429, 503) in seconds, at most MAX_RETRY_AFTER; None when it sent
    none or nothing usable (an HTTP date, "inf", "nan", a negative number)."""
    headers = getattr(e, "headers", None) if isinstance(e, ApiException) else None
    try:
        value = float(headers["Retry-After"]) if headers and headers.get("Retry-After") else None
    except (TypeError, ValueError):
        return None
    return clamp_retry_after(value)


def clamp_retry_after(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return min(value, MAX_RETRY_AFTER)


def delete_orphan_pod(kube: Kube, namespace: str, vm_name: str) -> bool:
    """Delete the VM pod of `vm_name` if the VM that owns it is gone; True if one was deleted.

    What an API server's garbage collector does for a pod whose owner is gone, done at once: a VM deleted
    before kopf could add its finalizer (that patch failed), or a create the server applied after its
    client gave up, leave a pod that no finalizer will ever see."""
    pod = kube.get_pod(namespace, podspec.pod_name(vm_name))
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    refs = [r for r in (pod.get("metadata") or {}).get("ownerReferences") or []
            if isinstance(r, dict) and r.get("kind") == types.KIND and r.get("controller")]
    if not refs:
        return False  # not a VM's pod: not ours to delete
    vm = kube.get_vm(namespace, vm_name)
    if vm is not None and podspec.is_owned_by(pod, vm):
        return False
    return kube.delete_pod(namespace, pod["metadata"]["name"], pod["metadata"].get("uid"))


def finalize(kube: Kube, vm: dict[str, Any]) -> bool:
    """The VM is being deleted: delete its pod. True once the pod is gone (the finalizer may go)."""
    meta = vm["metadata"]
    pod = kube.get_pod(meta["namespace"], podspec.pod_name(meta["name"]))
    if pod is not None and podspec.is_owned_by(pod, vm):
        if not (pod.get("metadata") or {}).get("deletionTimestamp"):
            kube.delete_pod(meta["namespace"], pod["metadata"]["name"], pod["metadata"].get("uid"))
        if (vm.get("status") or {}).get("printableStatus") != "Terminating":
            kube.patch_vm_status(meta["namespace"], meta["name"], {"printableStatus": "Terminating", "ready": False})
        return kube.get_pod(meta["namespace"], podspec.pod_name(meta["name"])) is None
    return True
