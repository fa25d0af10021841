"""The VM controller against kmock: an emulated API server, the real kopf operator, a fake kubelet.

* `ApiServer` is kmock's KubernetesEmulator plus the bookkeeping a real API
  server does on writes and kmock does not (uid, creationTimestamp, the
  namespace from the URL, generation bumped on spec changes).
* `Operator` runs `vmapi.operator.run` — the unchanged production entry point —
  as an asyncio task on the test's loop, pointed at the emulator by a
  generated kubeconfig, and waits for kopf's watches before returning.
* `Cluster` is the test's side: the official (sync) kubernetes client, used off
  the loop (asyncio.to_thread: the emulator runs on the test's loop), and the
  kubelet's part — pod phases, container states, IPs, nodes, deletions.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import jsonpatch
import jsonpointer
import kmock
import kubernetes
import yaml

from tests.integration.vmapi import faults
from vmapi import operator, podspec, reconcile, types
from vmapi.client import MERGE, Kube, load_api_client

VM_RESOURCE = f"{types.GROUP}/{types.VERSION}/{types.PLURAL}"
NS = "default"
FAST = reconcile.Options(resync_seconds=2.0, backoff_base=0.5, backoff_cap=2.0, request_timeout=2.0,
                         error_backoff=(0.2, 0.5, 1, 2))


class _InFlight(list):
    """kmock's request history, seen by kmock's matching as only the requests being served.

    kmock decides which reaction serves a request by checking, for each reaction,
    whether the request is among the requests that reaction's filter selects — by
    scanning the whole history, for every request: quadratic, seconds per request
    after a few thousand. The history is kept (len, ids, `ApiServer.log`), but
    iterating yields only the requests in flight, which is all that matching needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inflight: dict[int, Any] = {}

    def __iter__(self):
        return iter(list(self.inflight.values()))


class ApiServer(kmock.KubernetesEmulator):
    """kmock plus what kube-apiserver does to every object it stores.

    uid, creationTimestamp, generation, names from generateName, the namespace
    from the URL, and resourceVersion with optimistic concurrency: a write that
    names a resourceVersion other than the stored one gets 409, as on a real
    server (kopf's own JSON patches test it too).
    """

    _rv = 0
    fail_when = None  # a predicate on the request: answer 500 without storing anything (outage tests)
    faults = None  # a faults.Schedule (request -> Fault | None) for the controller's requests
    on_request = None  # hook(request, phase), phase "before" (True drops the request) or "after" it was applied

    def _next_rv(self) -> str:
        ApiServer._rv += 1
        return str(ApiServer._rv)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._requests = _InFlight()
        self.log: list[Any] = []  # every request, for assertions
        self.released = asyncio.Event()  # set at the end of a test: hanging answers end

    def _KubernetesEmulator__get_objs(self, request, strict: bool) -> list:
        """kmock's object lookup (its private `__get_objs`), same result, less work: kmock compares
        the request's resource with every stored object's (an expensive `__eq__`) on every request,
        which made the emulator, not the controller, the bottleneck of bench/vmapi_reconcile.py.
        Here the cheap name/namespace tests go first and each distinct resource is compared once.
        (kmock is pinned: this relies on its internals.)"""
        same_resource: dict[Any, bool] = {}
        objs = []
        want_name = request.name
        for (resource, namespace, name), obj in self._objects._objects.items():  # kmock 0.8's plain dict
            if want_name is not None and name != want_name:
                continue
            if not (namespace == request.namespace if strict else
                    request.namespace is None or namespace == request.namespace):
                continue
            ok = same_resource.get(resource)
            if ok is None:
                ok = same_resource[resource] = bool(resource == request.resource)
            if ok:
                objs.append(obj)
        return objs

    async def _handle(self, request):  # type: ignore[override]
        self.log.append(request)
        self._requests.inflight[id(request)] = request
        try:
            return await self._serve(request)
        finally:
            self._requests.inflight.pop(id(request), None)

    async def _serve(self, request):
        if self.on_request is not None and self.on_request(request, "before"):
            return faults.reset(request)  # the hook says the request never arrived
        fault = self.faults(request) if self.faults is not None else None
        if fault is not None:
            response = await self._inject(request, fault)
            if response is not None:
                return response
        response = await self._store(request)
        if self.on_request is not None:
            self.on_request(request, "after")
        return response

    async def _inject(self, request, fault: faults.Fault):
        """The faulty answer, or None to serve the request normally (after a delay)."""
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay)
            return None
        if fault.kind == "status":
            return faults.error_response(fault.status, fault.retry_after)
        if fault.kind == "status_after":
            await self._store(request)
            return faults.error_response(500)
        if fault.kind == "hang":
            return await faults.hang(request, self.released)
        if fault.kind == "reset":
            return faults.reset(request)
        if fault.kind in faults.WATCH_KINDS and request.action == kmock.action.WATCH:
            return await faults.faulty_watch(self, request, fault)
        return None

    async def _store(self, request):
        data = request.data
        if self.fail_when is not None and self.fail_when(request):
            raise kmock.KubernetesError(status=500, reason="InternalError", message="injected failure")
        if request.resource is not None and request.action == kmock.action.DELETE and request.name:
            self._check_preconditions(request)
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            md = data.setdefault("metadata", {})
            md.setdefault("namespace", request.namespace)
            if not md.get("name") and md.get("generateName"):
                md["name"] = md["generateName"] + uuid.uuid4().hex[:12]
            md.setdefault("uid", str(uuid.uuid4()))
            md.setdefault("creationTimestamp",
                          datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            md.setdefault("generation", 1)
            md["resourceVersion"] = self._next_rv()
        elif request.resource is not None and request.action == kmock.action.UPDATE:
            key = (request.resource, request.namespace, request.name)
            stored = self.objects[key] if key in self.objects and not self.objects[key].deleted else None
            smeta = (stored.get("metadata") or {}) if stored is not None else {}
            if isinstance(data, dict):
                md = data.setdefault("metadata", {})
                if md.get("resourceVersion") and md["resourceVersion"] != smeta.get("resourceVersion"):
                    raise kmock.KubernetesError(status=409, reason="Conflict",
                                                message="the object has been modified; please apply your "
                                                        "changes to the latest version and try again")
                md["resourceVersion"] = self._next_rv()
                if "spec" in data and not request.subresource and stored is not None:
                    md["generation"] = (smeta.get("generation") or 1) + 1
            elif isinstance(data, list):
                try:  # a failed JSON-patch test is 422 on a real server (kmock: 500); kopf relies on it
                    jsonpatch.apply_patch(copy.deepcopy(stored.raw) if stored is not None else {}, data)
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": self._next_rv()})
        return await super()._handle(request)


    def _check_preconditions(self, request) -> None:
        """DeleteOptions.preconditions (uid, resourceVersion): 409 when they do not hold, as on a real server."""
        pre = (request.data or {}).get("preconditions") if isinstance(request.data, dict) else None
        if not pre:
            return
        key = (request.resource, request.namespace, request.name)
        stored = self.objects[key] if key in self.objects and not self.objects[key].deleted else None
        if stored is None:
            return  # 404 from kmock
        smeta = stored.get("metadata") or {}
        for field in ("uid", "resourceVersion"):
            if pre.get(field) and pre[field] != smeta.get(field):
                raise kmock.KubernetesError(
                    status=409, reason="Conflict",
                    message=f"Precondition failed: {field} in precondition: {pre[field]}, "
                            f"{field} in object meta: {smeta.get(field)}")


def declare_resources(server: kmock.KubernetesEmulator) -> None:
    server.resources.load_bundled()
    server.resources[VM_RESOURCE] = kmock.ResourceInfo(
        kind=types.KIND, singular=types.SINGULAR, namespaced=True, shortnames=set(types.SHORT_NAMES),
        verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"})


def write_kubeconfig(server: kmock.KubernetesEmulator, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": NS}}],
    }))
    return path


WATCHED = (types.PLURAL, "pods", "persistentvolumeclaims")  # what the operator watches


def watches(server: kmock.KubernetesEmulator, plural: str) -> int:
    return sum(1 for r in server.log
               if r.action == kmock.action.WATCH and r.resource is not None and r.resource.plural == plural)


class Operator:
    """The controller "process": the operator on its own event loop in a thread; start/stop at will.

    Its own loop, as in production, and because kopf, when it stops, cancels
    every task of its loop that it did not find there when it started — that
    would include the test's own tasks.
    """

    def __init__(self, server: kmock.KubernetesEmulator, kubeconfig: Path, opts: reconcile.Options = FAST):
        self.server, self.kubeconfig, self.opts = server, kubeconfig, opts
        self.thread: threading.Thread | None = None
        self.stop_flag: threading.Event | None = None
        self.memo = None

    async def start(self) -> "Operator":
        before = {p: watches(self.server, p) for p in WATCHED}
        await self.start_unobserved()
        # kopf's ready flag fires before its watches connect: wait for the WATCH requests.
        await wait_for(lambda: all(watches(self.server, p) > n for p, n in before.items()),
                       timeout=10, what="kopf's watches")
        return self

    async def start_unobserved(self) -> None:
        """Start the thread; the caller finds out itself when kopf is watching."""
        self.memo = operator.make_memo(str(self.kubeconfig), self.opts)
        self.stop_flag = threading.Event()
        memo, stop_flag = self.memo, self.stop_flag

        async def main():
            self.loop = asyncio.get_running_loop()
            await operator.run(standalone=True, memo=memo, stop_flag=stop_flag)

        self.thread = threading.Thread(target=lambda: asyncio.run(main()), name="vmlet-operator", daemon=True)
        self.thread.start()

    def wake_all(self) -> int:
        """Wake every VM worker at once (a resync storm), from any thread."""
        wakeups = list(self.memo["vmlet"].wakeups.values())
        for ev in wakeups:
            self.loop.call_soon_threadsafe(ev.set)
        return len(wakeups)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def passes(self) -> int:
        return self.memo["vmlet"].passes if self.memo else 0

    async def stop(self) -> None:
        if self.thread is not None:
            self.stop_flag.set()
            await asyncio.to_thread(self.thread.join, 15)
            assert not self.thread.is_alive(), "the operator did not stop within 15 s"
            self.thread = None


# Timeouts are for a quiet machine; CI's 2 cores may be busy with VMs of other tests.
TIMEOUT_SCALE = 3.0


async def wait_for(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def vm_manifest(name: str, run_strategy: str = "Always", **spec_extra: Any) -> dict[str, Any]:
    vmi_spec: dict[str, Any] = {"domain": {"cpu": {"cores": 2}, "memory": {"guest": "512Mi"},
                                           "rootDisk": {"image": "virtlet.cloud/testvm", "size": "4Gi"}}}
    vmi_spec.update(spec_extra)
    return {"apiVersion": types.API_VERSION, "kind": types.KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {"runStrategy": run_strategy, "template": {"spec": vmi_spec}}}


def vm_with_claim(name: str, run_strategy: str = "Always") -> dict[str, Any]:
    """A VM whose data disk is a claim its volumeClaimTemplate makes (data-<name>): every pass reads
    the claim, the first one creates it."""
    vm = vm_manifest(name, run_strategy)
    vmi = vm["spec"]["template"]["spec"]
    vmi["domain"]["disks"] = [{"name": "data"}]
    vmi["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    vm["spec"]["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]
    return vm


class Cluster:
    """The test's view: API calls through the official client, and the kubelet's role."""

    def __init__(self, server: kmock.KubernetesEmulator, kubeconfig: Path):
        self.server, self.kubeconfig = server, kubeconfig
        self.api = load_api_client(str(kubeconfig))
        self.kube = Kube(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    async def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    # -- VMs
    async def create_vm(self, name: str, run_strategy: str = "Always", **spec_extra: Any) -> dict[str, Any]:
        return await self.create_vm_manifest(vm_manifest(name, run_strategy, **spec_extra))

    async def create_vm_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        resp = await self.call(self.custom.create_namespaced_custom_object, types.GROUP, types.VERSION, NS,
                               types.PLURAL, manifest, _preload_content=False)
        return json.loads(resp.data)

    async def vm(self, name: str) -> dict[str, Any] | None:
        return await self.call(self.kube.get_vm, NS, name)

    async def status(self, name: str) -> dict[str, Any]:
        return ((await self.vm(name)) or {}).get("status") or {}

    async def patch_vm(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.call(self.kube.patch_vm, NS, name, patch)

    async def delete_vm(self, name: str) -> None:
        await self.call(self.custom.delete_namespaced_custom_object, types.GROUP, types.VERSION, NS,
                        types.PLURAL, name, _preload_content=False)

    async def wait_status(self, name: str, printable: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        async def check():
            st = await self.status(name)
            ok = st.get("printableStatus") == printable and all(st.get(k) == v for k, v in fields.items())
            return st if ok else None
        try:
            return await wait_for(check, timeout, f"VM {name} to be {printable} {fields or ''}")
        except AssertionError as e:
            raise AssertionError(f"{e}; status now: {await self.status(name)}") from None

    # -- pods: the kubelet's part
    async def pod(self, vm_name: str) -> dict[str, Any] | None:
        return await self.call(self.kube.get_pod, NS, podspec.pod_name(vm_name))

    async def wait_pod(self, vm_name: str, other_than: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        async def check():
            p = await self.pod(vm_name)
            return p if p and p["metadata"].get("uid") != other_than else None
        return await wait_for(check, timeout, f"a pod for {vm_name}")

    async def wait_no_pod(self, vm_name: str, timeout: float = 5.0) -> None:
        async def gone():
            return await self.pod(vm_name) is None
        await wait_for(gone, timeout, f"no pod for {vm_name}")

    async def kubelet(self, vm_name: str, phase: str, *, node: str = "node-1", ip: str = "10.1.0.7",
                      exit_code: int | None = None) -> None:
        """Report the pod like a kubelet would: phase, container state, readiness, IP, node."""
        running = phase == "Running"
        if phase in ("Succeeded", "Failed"):
            state = {"terminated": {"exitCode": exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1),
                                    "reason": "Completed" if phase == "Succeeded" else "Error"}}
        elif running:
            state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        status = {
            "phase": phase, "podIP": ip if running else None,
            "conditions": [{"type": "Ready", "status": "True" if running else "False"},
                           {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": podspec.CONTAINER, "image": "virtlet.cloud/testvm", "imageID": "sha256:0",
                                   "ready": running, "restartCount": 0, "state": state}],
        }
        await self.call(self.core.patch_namespaced_pod, podspec.pod_name(vm_name), NS,
                        {"spec": {"nodeName": node}, "status": status}, _content_type=MERGE,
                        _preload_content=False)

    async def delete_pod(self, vm_name: str) -> None:
        await self.call(self.kube.delete_pod, NS, podspec.pod_name(vm_name))

    # -- claims: the user's part, and the PV controller's (kmock has none)
    async def create_claim(self, name: str, size: str = "1Gi", mode: str | None = None,
                           phase: str | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
        if mode:
            spec["volumeMode"] = mode
        body = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "namespace": NS}, "spec": spec}
        resp = await self.call(self.core.create_namespaced_persistent_volume_claim, NS, body, _preload_content=False)
        claim = json.loads(resp.data)
        if phase:
            claim = await self.bind_claim(name, phase)
        return claim

    async def claim(self, name: str) -> dict[str, Any] | None:
        return await self.call(self.kube.get_pvc, NS, name)

    async def wait_claim(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        return await wait_for(lambda: self.claim(name), timeout, f"claim {name}")

    async def bind_claim(self, name: str, phase: str = "Bound", capacity: str | None = None) -> dict[str, Any]:
        """What the PV controller does: the claim's phase (and the bound volume's capacity)."""
        claim = await self.claim(name)
        assert claim is not None, name
        status: dict[str, Any] = {"phase": phase}
        if phase == "Bound":
            status.update(accessModes=claim["spec"]["accessModes"],
                          capacity={"storage": capacity or claim["spec"]["resources"]["requests"]["storage"]})
        resp = await self.call(self.core.patch_namespaced_persistent_volume_claim_status, name, NS,
                               {"status": status}, _content_type=MERGE, _preload_content=False)
        return json.loads(resp.data)

    async def delete_claim(self, name: str) -> None:
        await self.call(self.core.delete_namespaced_persistent_volume_claim, name, NS, _preload_content=False)

    async def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        resp = await self.call(self.core.list_namespaced_event, NS, _preload_content=False)
        items = json.loads(resp.data).get("items") or []
        return [e for e in items if reason is None or e.get("reason") == reason]


def serve_main(argv: list[str] | None = None) -> None:
    """Run the emulator alone in this process; print its URL, serve until stdin closes (for the bench)."""
    async def run():
        async with ApiServer() as srv, kmock.Server(srv):
            declare_resources(srv)
            print(str(srv.url), flush=True)
            await asyncio.to_thread(sys.stdin.read)
    asyncio.run(run())


if __name__ == "__main__":
    serve_main()
