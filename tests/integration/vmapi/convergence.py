"""What "converged" means for the VM controller, and the helpers that get a cluster there.

* `AutoKubelet` plays the kubelet for every VM pod (binds it to a node, reports it
  Running with an IP), and the PV controller for every new claim (Bound), and, on
  every look, checks the invariant that holds at every instant: never two pods for
  one VM.
* `LogWatch` collects the operator's log records: a programming error (anything
  but an API or transport error) in a handler is a crash, whatever kopf then does.
* `converged` waits until each VM is what its runStrategy asks for — exactly one
  Running pod, or none, or the VM and its pod gone — and its status says so.
* `request_rate` counts the controller's requests: retries must back off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kmock

from tests.integration.vmapi import faults
from tests.integration.vmapi.harness import TIMEOUT_SCALE, Cluster
from vmapi import podspec, types

RUNNING, STOPPED, GONE = "Running", "Stopped", "gone"


def _pods(server: kmock.KubernetesEmulator) -> list[Any]:
    return [o for o in list(server.objects.values()) if not o.deleted and o.get("kind") == "Pod"]


def _claims(server: kmock.KubernetesEmulator) -> list[Any]:
    return [o for o in list(server.objects.values()) if not o.deleted and o.get("kind") == "PersistentVolumeClaim"]


def _vms(server: kmock.KubernetesEmulator) -> list[Any]:
    return [o for o in list(server.objects.values()) if not o.deleted and o.get("kind") == types.KIND]


def pods_of(server: kmock.KubernetesEmulator, vm_name: str, vm_uid: str | None = None) -> list[dict[str, Any]]:
    """Pods that belong to the VM: named for it, labelled for it, or owned by its uid."""
    out = []
    for p in _pods(server):
        meta = p.get("metadata") or {}
        owners = {r.get("uid") for r in meta.get("ownerReferences") or []}
        if (meta.get("name") == podspec.pod_name(vm_name) or (meta.get("labels") or {}).get(podspec.LABEL_VM) == vm_name
                or (vm_uid is not None and vm_uid in owners)):
            out.append(p.raw)
    return out


class AutoKubelet:
    """Runs every new VM pod (status Running, node, IP); records any VM seen with two pods."""

    def __init__(self, server: kmock.KubernetesEmulator, cluster: Cluster, interval: float = 0.05):
        self.server, self.cluster, self.interval = server, cluster, interval
        self.twins: list[str] = []
        self.task: asyncio.Task | None = None
        self.enabled = True

    async def __aenter__(self) -> "AutoKubelet":
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.task is not None
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        n = 0
        while True:
            owners: dict[str, list[str]] = {}
            for p in _pods(self.server):
                meta = p.get("metadata") or {}
                vm = (meta.get("labels") or {}).get(podspec.LABEL_VM)
                if vm is None:
                    continue
                owners.setdefault(vm, []).append(meta.get("name"))
                if self.enabled and not (p.get("status") or {}).get("phase") and not meta.get("deletionTimestamp"):
                    n += 1
                    try:
                        await self.cluster.kubelet(vm, "Running", ip=f"10.1.{n // 250}.{n % 250 + 2}")
                    except Exception:  # the pod went meanwhile: the next look sees it
                        pass
            for c in _claims(self.server):
                if self.enabled and not (c.get("status") or {}).get("phase"):
                    try:
                        await self.cluster.bind_claim(c["metadata"]["name"])
                    except Exception:  # deleted meanwhile
                        pass
            self.twins += [f"{vm}: {names}" for vm, names in owners.items() if len(names) > 1]
            await asyncio.sleep(self.interval)


class LogWatch(logging.Handler):
    """Operator log records; `crashes()` are those that carry a non-API exception."""

    API_ERRORS = ("ApiException", "MaxRetryError", "ProtocolError", "ReadTimeoutError", "ConnectTimeoutError",
                  "NewConnectionError", "ConnectionError", "ConnectionResetError", "RemoteDisconnected",
                  "TimeoutError", "APIError", "APIServerError", "APIConflictError", "APITooManyRequestsError",
                  "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "TemporaryError",
                  "ClientOSError", "IncompleteRead", "Conflict")

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def __enter__(self) -> "LogWatch":
        for name in ("kopf", "vmapi"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in ("kopf", "vmapi"):
            logging.getLogger(name).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.records.append(record)

    def crashes(self) -> list[str]:
        out = []
        for r in self.records:
            exc = r.exc_info[1] if r.exc_info else None
            if exc is not None and type(exc).__name__ not in self.API_ERRORS:
                out.append(f"{r.name}: {r.getMessage()} ({type(exc).__name__}: {exc})")
            elif r.levelno >= logging.ERROR and "crashed" in r.getMessage():
                out.append(f"{r.name}: {r.getMessage()}")
        return out


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def check(server: kmock.KubernetesEmulator, name: str, want: str, uid: str | None = None) -> str | None:
    """None when the VM `name` is as `want` says (RUNNING/STOPPED/GONE), else what is wrong."""
    vm = next((v.raw for v in _vms(server) if v["metadata"]["name"] == name), None)
    pods = pods_of(server, name, uid or (vm or {}).get("metadata", {}).get("uid"))
    if want == GONE:
        if vm is not None:
            return f"VM still there (finalizers {vm['metadata'].get('finalizers')}, status {vm.get('status')})"
        return f"pods left for a deleted VM: {[p['metadata']['name'] for p in pods]}" if pods else None
    if vm is None:
        return "VM is gone"
    st = vm.get("status") or {}
    failure = _condition(st, "Failure")
    if failure:
        return f"Failure condition: {failure}"
    if want == STOPPED:
        if pods:
            return f"pods of a stopped VM: {[p['metadata']['name'] for p in pods]}"
        if st.get("printableStatus") != "Stopped" or st.get("created") or st.get("ready") or st.get("podUID"):
            return f"status {st}"
        return None
    if len(pods) != 1:
        return f"{len(pods)} pods"
    pod = pods[0]
    pst = pod.get("status") or {}
    if pst.get("phase") != "Running":
        return f"pod phase {pst.get('phase')}"
    expect = {"printableStatus": "Running", "ready": True, "created": True, "podUID": pod["metadata"]["uid"],
              "podName": pod["metadata"]["name"], "podIP": pst.get("podIP"), "nodeName": pod["spec"].get("nodeName"),
              "podPhase": "Running", "runStrategy": vm["spec"].get("runStrategy")}
    wrong = {k: (st.get(k), v) for k, v in expect.items() if st.get(k) != v}
    if wrong:
        return f"status differs from the pod (got, want): {wrong}"
    if not _condition(st, "Ready"):
        return f"no Ready condition: {st.get('conditions')}"
    return None


async def converged(server: kmock.KubernetesEmulator, want: dict[str, str], timeout: float = 20.0,
                    uids: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout * TIMEOUT_SCALE
    while True:
        wrong = {n: w for n, w in ((n, check(server, n, s, (uids or {}).get(n))) for n, s in want.items()) if w}
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not converged after {timeout * TIMEOUT_SCALE:.0f}s: {wrong}")
        await asyncio.sleep(0.05)


def controller_requests(server: kmock.KubernetesEmulator, since: int = 0, kind: str | None = None) -> list[Any]:
    return [r for r in server.log[since:] if faults.from_controller(r)
            and (kind is None or faults.request_kind(r) == kind)]
