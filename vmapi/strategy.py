"""runStrategy + pod + state-change requests → one action (pure).

KubeVirt's semantics, with the VM pod in the VMI's place:

* Always — a pod always exists: a missing one is created, a finished one
  (guest powered off, or crashed) is deleted and then recreated.
* RerunOnFailure — a failed pod is replaced; a pod that Succeeded (the guest
  powered itself off) is left alone and the VM is Stopped. A pod that vanished
  while it was not finished (drain, node failure) counts as a failure.
* Once — one pod, started when the VM gets this strategy, never replaced.
* Manual — pods come and go only through start/stop/restart requests.
* Halted — no pod.

State-change requests (KubeVirt's status.stateChangeRequests) are a queue:
`Stop(uid)` deletes the pod with that uid and is done once it is gone;
`Start` creates a pod and is done once one exists. `vmctl restart` queues
[Stop(uid), Start]. vmlet keeps the queue in the VM annotation
`vmlet.dev/state-change-requests` (see requests.py for why).

The decision never depends on wall-clock time except through `now` passed in,
and never on anything but its inputs: the controller re-runs it on every event
and every resync (level-triggered), and a pass that fails is simply re-run.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from vmapi.requests import Request

Action = Literal["create", "delete", "none"]
FINAL = ("Succeeded", "Failed")

# Crash loop: the first failure restarts at once; further consecutive failures
# (no pod reached Running in between) wait base * 2**(n-2) seconds, capped.
BACKOFF_BASE = 10.0
BACKOFF_CAP = 300.0


@dataclasses.dataclass(frozen=True)
class PodView:
    uid: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    terminating: bool = False
    owned: bool = True


@dataclasses.dataclass(frozen=True)
class StartFailure:
    count: int = 0
    retry_after: float | None = None  # epoch seconds
    last_failed_uid: str | None = None


@dataclasses.dataclass(frozen=True)
class Inputs:
    run_strategy: str
    pod: PodView | None
    requests: tuple[Request, ...] = ()
    last_run_strategy: str | None = None  # status.runStrategy: the strategy last acted upon
    last_pod_uid: str | None = None  # status.podUID / podPhase: the pod seen on the last pass
    last_pod_phase: str | None = None
    start_failure: StartFailure = StartFailure()
    deleting: bool = False
    now: float = 0.0
    backoff_base: float = BACKOFF_BASE
    backoff_cap: float = BACKOFF_CAP


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    requests: tuple[Request, ...]  # the queue once the action has succeeded
    start_failure: StartFailure = StartFailure()
    wait_until: float | None = None  # crash-loop back-off: nothing to do before then
    conflict: bool = False  # a pod of that name exists that this VM does not own


def decide(i: Inputs) -> Decision:
    pod, reqs = i.pod, list(i.requests)
    sf = _note_failure(i)

    def out(action: Action, reason: str, **kw) -> Decision:
        return Decision(action, reason, tuple(reqs), kw.pop("start_failure", sf), **kw)

    if pod is not None and not pod.owned:
        return out("none", "a pod of that name exists and is not owned by this VM", conflict=True)
    if i.deleting:
        return out("delete" if pod and not pod.terminating else "none", "the VM is being deleted")

    stopped_by_request = False
    while reqs and reqs[0].action == "Stop" and (pod is None or (reqs[0].uid not in (None, pod.uid))):
        stopped_by_request |= reqs[0].uid in (None, i.last_pod_uid)
        reqs.pop(0)
    if pod is not None and pod.terminating:
        return out("none", "waiting for the pod to terminate")
    if reqs and reqs[0].action == "Stop":  # pod is not None here: it is the one to stop
        return out("delete", "stop requested")

    rs = i.run_strategy
    start_req = bool(reqs) and reqs[0].action == "Start"
    if rs == "Halted":
        reqs.clear()  # KubeVirt turns a Start under Halted into runStrategy Always; vmctl does that itself
        return out("delete", "runStrategy is Halted") if pod else out("none", "runStrategy is Halted")
    if rs == "Once" and start_req:
        reqs.pop(0)  # Once takes no requests
        start_req = False

    if pod is not None:
        final = pod.phase in FINAL
        if final and (rs == "Always" or (rs == "RerunOnFailure" and pod.phase == "Failed") or start_req):
            return out("delete", f"the pod {pod.phase}: replacing it")
        if start_req and not final:
            reqs.pop(0)  # already running
        return out("none", "the pod is as wanted")

    vanished = i.last_pod_uid is not None and not stopped_by_request and i.last_pod_phase != "Succeeded"
    want = {
        "Always": True,
        "RerunOnFailure": start_req or i.last_run_strategy != rs or vanished,
        "Once": i.last_run_strategy != rs,
        "Manual": start_req,
    }.get(rs, False)
    if not want:
        return out("none", "stopped")
    if sf.retry_after is not None and i.now < sf.retry_after:
        return out("none", "crash loop back-off", wait_until=sf.retry_after)
    if start_req:
        reqs.pop(0)
    return out("create", "starting" if i.last_pod_uid is None else "restarting")


def _note_failure(i: Inputs) -> StartFailure:
    """Count a failed pod once (by uid); a pod that reached Running clears the count."""
    sf, pod = i.start_failure, i.pod
    if pod is None or not pod.owned:
        return sf
    if pod.phase == "Running":
        return StartFailure()
    if pod.phase == "Failed" and sf.last_failed_uid != pod.uid:
        count = sf.count + 1
        delay = 0.0 if count <= 1 else min(i.backoff_base * 2 ** (count - 2), i.backoff_cap)
        return StartFailure(count, i.now + delay if delay else None, pod.uid)
    return sf
