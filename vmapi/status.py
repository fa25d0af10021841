"""(VM, pod, decision) → VM status (pure): printableStatus, ready, conditions, pod facts.

printableStatus follows KubeVirt's values: Stopped, Starting, Running, Stopping,
Terminating, CrashLoopBackOff, ErrorUnschedulable, ErrImagePull, ImagePullBackOff,
Unknown — plus ErrorInvalidSpec, for a spec the schema accepted but that cannot
become a valid VM pod (KubeVirt rejects those in its admission webhook).

Storage (KubeVirt's): ErrorPvcNotFound when the pod cannot be made because a claim
it needs does not exist and no volumeClaimTemplate makes it; WaitingForVolumeBinding
while the pod is Pending on a claim that is not bound yet (the pod must exist for a
WaitForFirstConsumer claim to bind). `volumeStatus` comes from storage.report.

Guest facts (`guestOSInfo`, `interfaces`, the `AgentConnected` condition) are the node
reporter's (vmapi/guest_info.py): every status written here keeps them as they are while
the VM has a live pod, and drops them once it has none (gone or finished) — the one
change a reporter can miss (its node gone with it). The controller never sets them.

RestartRequired: the pod carries the hash of the template it was made from
(`vmlet.dev/template-hash`); when the VM's template hashes differently, the
running VM is not what the spec says until it is restarted (KubeVirt compares
the VM template with the VMI's revision in the same spirit).
"""

from __future__ import annotations

import datetime
from typing import Any, Mapping

from vmapi import podspec, storage
from vmapi.strategy import FINAL, Decision, StartFailure

WAITING_ERRORS = ("ErrImagePull", "ImagePullBackOff")
# Written by the node's guest-info reporter, not here (see the module docstring).
GUEST_FIELDS = ("guestOSInfo", "interfaces")
GUEST_CONDITIONS = ("AgentConnected",)


def iso(ts: float, micro: bool = False) -> str:
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(fmt)


def parse_iso(text: str | None) -> float | None:
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.datetime.strptime(text or "", fmt).replace(tzinfo=datetime.timezone.utc).timestamp()
        except ValueError:
            continue
    return None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    st = pod.get("status") or {}
    if st.get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conds = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
    if "Ready" in conds:
        return conds["Ready"] == "True"
    cs = st.get("containerStatuses") or []
    return bool(cs) and all(c.get("ready") for c in cs)


def printable(vm: Mapping[str, Any], pod: Mapping[str, Any] | None, decision: Decision,
              blocked: str | None, volumes: storage.Report | None = None) -> str:
    """`blocked`: what the VM is when the pod it wants cannot be created (ErrorInvalidSpec, ...)."""
    if (vm.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    if pod is None:
        if blocked is not None:
            return blocked
        if decision.wait_until is not None:
            return "CrashLoopBackOff"
        return "Starting" if decision.action == "create" else "Stopped"
    st = pod.get("status") or {}
    phase = st.get("phase") or "Pending"
    if (pod.get("metadata") or {}).get("deletionTimestamp") or decision.action == "delete":
        return "Stopping"
    if phase == "Pending":
        if volumes is not None and volumes.pending:  # before Unschedulable, as KubeVirt: it is the cause
            return "WaitingForVolumeBinding"
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return "ErrorUnschedulable"
        for cs in st.get("containerStatuses") or []:
            reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
            if reason in WAITING_ERRORS:
                return reason
        return "Starting"
    if phase == "Running":
        return "Running" if pod_ready(pod) else "Starting"
    if phase in FINAL:
        return "Stopped"
    return "Unknown"


_STR_FIELDS = ("printableStatus", "runStrategy", "podName", "podUID", "podPhase", "podIP", "nodeName", "templateHash")


def sanitize(status: Any) -> dict[str, Any]:
    """The previous status with every field of the wrong type dropped: the status subresource is
    writable by anyone allowed to, and an emulator (or an older schema) does not type-check it."""
    if not isinstance(status, Mapping):
        return {}
    out: dict[str, Any] = {}
    for k, v in status.items():
        if k in _STR_FIELDS and not isinstance(v, str):
            continue
        if k in ("restartCount", "observedGeneration") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            continue
        if k in ("ready", "created") and not isinstance(v, bool):
            continue
        if k == "conditions":
            if not isinstance(v, list):
                continue
            v = [c for c in v if isinstance(c, Mapping) and isinstance(c.get("type"), str)]
        if k == "startFailure" and not isinstance(v, Mapping):
            continue
        if (k == "guestOSInfo" and not isinstance(v, Mapping)) or (k == "interfaces" and not isinstance(v, list)):
            continue
        out[k] = v
    return out


def _condition(prev: Mapping[str, Mapping[str, Any]], now: str, type_: str, status: str,
               reason: str, message: str = "") -> dict[str, Any]:
    old = prev.get(type_) or {}
    same = old.get("status") == status
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": old.get("lastTransitionTime") if same and old.get("lastTransitionTime") else now}


def derive(vm: Mapping[str, Any], pod: Mapping[str, Any] | None, decision: Decision, *,
           now: float, current_hash: str | None, spec_error: str | None = None,
           action_error: str | None = None, requests_error: str | None = None,
           acted: bool = True, created: bool = False, volumes: storage.Report | None = None) -> dict[str, Any]:
    """The complete status to write. `acted`: the decision's action succeeded (or was none).
    `volumes`: the claims' report (None: the spec names no volumes, or could not be read)."""
    prev = sanitize(vm.get("status"))
    meta = vm.get("metadata") or {}
    nows = iso(now)
    waits_for_claims = volumes is not None and bool(volumes.unavailable) and spec_error is None
    create_blocked = decision.action == "create" and (spec_error is not None or waits_for_claims)
    blocked = None
    if create_blocked:
        # A claim a template makes but that is not there yet (being created, or being deleted): Starting.
        blocked = "ErrorInvalidSpec" if spec_error else "ErrorPvcNotFound" if volumes.missing else "Starting"
    out: dict[str, Any] = {
        "printableStatus": printable(vm, pod, decision, blocked, volumes),
        "created": pod is not None,
        "runStrategy": (spec.get("runStrategy", "Always") if isinstance(spec := vm.get("spec"), dict) else None)
        if acted and not create_blocked
        else prev.get("runStrategy"),
        "observedGeneration": meta.get("generation", prev.get("observedGeneration")),
        "restartCount": prev.get("restartCount"),
    }
    # A pod not recorded before counts by its uid, not by who made it: a create whose answer was lost
    # (the pod exists, the pass that made it never knew) or a pod another controller made counts once.
    pod_uid = (pod.get("metadata") or {}).get("uid") if pod is not None else None
    if created or (pod_uid and pod_uid != prev.get("podUID") and podspec.is_owned_by(pod, vm)):
        out["restartCount"] = 0 if prev.get("restartCount") is None else prev["restartCount"] + 1
    ready = pod is not None and pod_ready(pod)
    out["ready"] = ready

    # The last pod's record outlives it while a restart is pending: strategy.decide
    # needs it to tell "vanished or failed, replace it" from "stopped on request".
    if pod is not None:
        pmeta, pst = pod.get("metadata") or {}, pod.get("status") or {}
        out.update(podName=pmeta.get("name"), podUID=pmeta.get("uid"), podPhase=pst.get("phase") or "Pending",
                   podIP=pst.get("podIP"), nodeName=(pod.get("spec") or {}).get("nodeName"),
                   templateHash=(pmeta.get("annotations") or {}).get(podspec.ANN_TEMPLATE_HASH))
    elif decision.action == "create" or decision.wait_until is not None or not acted:
        out.update({k: prev.get(k) for k in ("podName", "podUID", "podPhase")})
        out.update(podIP=None, nodeName=None, templateHash=None)
    else:
        out.update(podName=None, podUID=None, podPhase=None, podIP=None, nodeName=None, templateHash=None)

    sf = decision.start_failure if acted else _start_failure(prev)
    out["startFailure"] = None if sf.count == 0 else {
        "consecutiveFailCount": sf.count, "lastFailedPodUID": sf.last_failed_uid,
        "retryAfterTimestamp": iso(sf.retry_after, micro=True) if sf.retry_after else None}

    prev_conds = {c.get("type"): c for c in prev.get("conditions") or [] if isinstance(c, dict)}
    conds = []
    if pod is None and create_blocked and waits_for_claims:
        conds.append(_condition(prev_conds, nows, "Ready", "False", "PvcNotFound" if volumes.missing else "PvcNotReady",
                                ("the pod waits for its claims: " + volumes.blocking_message())[:1024]))
    elif pod is None:
        conds.append(_condition(prev_conds, nows, "Ready", "False", "PodNotFound", "the VM has no pod"))
    elif ready:
        conds.append(_condition(prev_conds, nows, "Ready", "True", "PodReady"))
    else:
        conds.append(_condition(prev_conds, nows, "Ready", "False", "PodNotReady",
                                f"pod phase {(pod.get('status') or {}).get('phase') or 'Pending'}"))
    # vmlet VMs cannot be paused: the CRI has no pause. Reported so clients need not guess.
    conds.append(_condition(prev_conds, nows, "Paused", "False", "NotPaused"))
    pod_hash = out.get("templateHash")
    live = pod is not None and (pod.get("status") or {}).get("phase") not in FINAL
    if live and pod_hash and current_hash and pod_hash != current_hash:
        conds.append(_condition(prev_conds, nows, "RestartRequired", "True", "TemplateChanged",
                                "the VM template changed; restart the VM to apply it"))
    failure = spec_error or action_error or requests_error or (
        "a pod of that name exists and is not owned by this VM" if decision.conflict else None)
    if failure:
        reason = ("InvalidSpec" if spec_error else "ActionFailed" if action_error
                  else "InvalidRequests" if requests_error else "PodConflict")
        conds.append(_condition(prev_conds, nows, "Failure", "True", reason, failure[:1024]))
    # The reporter's, kept while a pod lives (last, in their order), dropped with it. Only keys the
    # previous status had: a VM without guest facts gets the same status as before they existed.
    if live:
        conds.extend(c for c in prev.get("conditions") or [] if c.get("type") in GUEST_CONDITIONS)
    for k in GUEST_FIELDS:
        if k in prev or k in (vm.get("status") if isinstance(vm.get("status"), Mapping) else {}):
            out[k] = prev.get(k) if live else None
    out["conditions"] = conds
    out["volumeStatus"] = volumes.statuses if volumes is not None and volumes.statuses else None
    return out


def _start_failure(prev: Mapping[str, Any]) -> StartFailure:
    sf = sanitize(prev).get("startFailure") or {}
    count, uid, when = sf.get("consecutiveFailCount"), sf.get("lastFailedPodUID"), sf.get("retryAfterTimestamp")
    return StartFailure(count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0,
                        parse_iso(when) if isinstance(when, str) else None, uid if isinstance(uid, str) else None)


def start_failure_of(status: Mapping[str, Any] | None) -> StartFailure:
    return _start_failure(status or {})


def changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning `old` into `new` (top-level keys; None removes)."""
    old = old or {}
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    return {k: v for k, v in patch.items() if not (v is None and k not in old)}
