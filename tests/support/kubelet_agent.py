"""A test-only scheduler + kubelet for one node: pods from an API server become CRI calls on a real socket.

There is no kubelet on the project's machines (see ../shared/notes/machine.md), so the node end-to-end
test needs something to play its part between the API server (kmock, tests/integration/vmapi/harness.py)
and the node's CRI socket (criproxy, with containerd and vmlet behind it). `KubeletAgent` does what the
kubelet does for a pod, in the same order and with the same CRI fields, and nothing more:

* **schedule**: a pod without `spec.nodeName` whose nodeSelector the node's labels satisfy is bound to
  the node (a merge patch of spec.nodeName: kmock has no pods/binding subresource);
* **run**, in the kubelet's order: RunPodSandbox (metadata name/namespace/uid/attempt, labels +
  `io.kubernetes.pod.*`, annotations incl. `kubernetes.io/target-runtime`, log_directory, hostname, DNS,
  cgroup_parent), then per container ImageStatus/PullImage (per imagePullPolicy), CreateContainer (the
  pulled image ref, command/args, env values, resources → linux resources, log_path
  `<name>/<restart count>.log`, the kubelet's `io.kubernetes.*` labels and annotations), StartContainer;
* **report**: PodSandboxStatus/ContainerStatus → pod status (phase, podIP(s), hostIP(s), conditions incl.
  Ready, containerStatuses with waiting/running/terminated, exitCode, restartCount), written as a merge
  patch of the status subresource, only when it changed;
* **terminate**: a pod with a deletionTimestamp is stopped (StopContainer with the grace period — for a VM
  the ACPI power button), removed (RemoveContainer, StopPodSandbox, RemovePodSandbox), its final status
  written, and its deletion finished. A sandbox whose pod is gone altogether is torn down the same way
  (the kubelet's orphan cleanup).

Deletion: a real API server deletes a pod bound to a node gracefully — it sets deletionTimestamp and
waits for the kubelet's final delete. kmock deletes at once, which would leave nothing to see the VM
shut down by. So the agent puts a finalizer of its own (FINALIZER) on the pods it runs: a delete then
only sets deletionTimestamp, as on a real cluster, and removing the finalizer is the kubelet's
"final delete".

Level-triggered: every pass lists the pods and the agent's sandboxes (label AGENT_LABEL) and makes the
one match the other; nothing is remembered between passes. Not done: container restarts (VM pods are
restartPolicy Never: the VM controller decides restarts), probes, volumes, init containers, images'
pull secrets. It runs one pass at a time in its own thread, so a VM's shutdown holds up the other pods;
fine for a test node.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import kubernetes

from cri_shim.annotations import parse_quantity
from proto.runtime.v1 import api_pb2
from tests.support import cri
from vmapi.client import MERGE, load_api_client

log = logging.getLogger(__name__)

AGENT_LABEL = "vmlet.test/kubelet-agent"  # on every sandbox the agent makes; value: the node name
FINALIZER = "vmlet.test/kubelet-agent"
FINAL = ("Succeeded", "Failed")
API_TIMEOUT = 10  # seconds, every API request
CRI_TIMEOUT = 180  # seconds; RunPodSandbox of a VM under TCG takes a while (PullImage has none)
DEFAULT_GRACE = 30


def _ts(nanos: int) -> str | None:
    if not nanos:
        return None
    return datetime.datetime.fromtimestamp(nanos / 1e9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _millicores(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


class KubeletAgent:
    """Scheduler + kubelet for the node `node_name`: start() runs passes in a thread, stop() ends them."""

    def __init__(self, kubeconfig: Path | str, cri_socket: Path | str, node_name: str, *, log_root: Path,
                 node_labels: dict[str, str] | None = None, host_ip: str = "127.0.0.1",
                 dns_servers: tuple[str, ...] = (), cgroup_root: str = "vmlet-test-agent",
                 interval: float = 0.5) -> None:
        self.node = node_name
        self.labels = {"kubernetes.io/hostname": node_name, **(node_labels or {})}
        self.log_root, self.host_ip, self.dns_servers = Path(log_root), host_ip, tuple(dns_servers)
        self.cgroup_root, self.interval = cgroup_root, interval
        self.core = kubernetes.client.CoreV1Api(load_api_client(str(kubeconfig)))
        self.cri = cri.connect(Path(cri_socket))
        self.calls: list[str] = []  # what the agent did, in order ("RunPodSandbox default/x-vm", ...)
        self.errors: list[str] = []  # failures of passes (retried on the next pass)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runtime_name = ""

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "KubeletAgent":
        self._thread = threading.Thread(target=self._loop, name=f"kubelet-agent-{self.node}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 120) -> None:
        """Stop the loop (a CRI call in progress finishes first); does not touch the pods."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the kubelet agent did not stop within {timeout}s")
            self._thread = None

    def remove_all(self, grace: int = 0) -> list[str]:
        """Tear down every sandbox of this agent through the CRI (the fixture's safety net); their IDs."""
        ids = [sb.id for sb in self._sandboxes()]
        for sid in ids:
            self._teardown_sandbox(sid, grace)
        return ids

    def close(self) -> None:
        self.cri.close()
        self.core.api_client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as e:  # API or CRI unreachable: retried on the next pass, as the kubelet does
                self._error(f"pass failed: {e!r}")
            self._stop.wait(self.interval)  # the pass period, not a synchronisation

    def _error(self, msg: str) -> None:
        log.warning("kubelet agent %s: %s", self.node, msg)
        self.errors.append(msg)

    def _did(self, what: str) -> None:
        log.info("kubelet agent %s: %s", self.node, what)
        self.calls.append(what)

    # ------------------------------------------------------------ one pass

    def sync_once(self) -> None:
        if not self._runtime_name:  # containerID is "<runtime name>://<id>", as the kubelet writes it
            self._runtime_name = self.cri.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name
        pods = self._list_pods()
        sandboxes: dict[str, list[api_pb2.PodSandbox]] = {}
        for sb in self._sandboxes():
            sandboxes.setdefault(sb.labels.get("io.kubernetes.pod.uid", ""), []).append(sb)
        for pod in pods:
            if self._stop.is_set():
                return
            spec, meta = pod.get("spec") or {}, pod["metadata"]
            if not spec.get("nodeName"):
                if not meta.get("deletionTimestamp") and self._fits(pod):
                    self._bind(pod)
                continue
            if spec["nodeName"] != self.node:
                continue
            try:
                self._sync_pod(pod, sandboxes.pop(meta["uid"], []))
            except Exception as e:  # this pod's sync failed: retried on the next pass; the others go on
                self._error(f"{self._key(pod)}: {_describe(e)}")
        for orphans in sandboxes.values():  # their pods are gone: the kubelet's orphan cleanup
            for sb in orphans:
                self._did(f"orphan sandbox {sb.id} of {sb.metadata.namespace}/{sb.metadata.name}")
                self._teardown_sandbox(sb.id, None)

    def _sync_pod(self, pod: dict[str, Any], sandboxes: list[api_pb2.PodSandbox]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            grace = meta.get("deletionGracePeriodSeconds")
            for sb in sandboxes:
                self._teardown_sandbox(sb.id, grace, pod)
            if FINALIZER in (meta.get("finalizers") or []):
                self._finish_deletion(pod)
            return
        if FINALIZER not in (meta.get("finalizers") or []):
            self._patch(pod, {"metadata": {"finalizers": [*(meta.get("finalizers") or []), FINALIZER]}})
        if status.get("phase") in FINAL:
            return  # restartPolicy Never: a finished pod stays finished (its sandbox was stopped)
        if not sandboxes:
            self._report(pod, None, waiting="ContainerCreating")
            self._did(f"RunPodSandbox {self._key(pod)}")
            sid = self.cri.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=self.sandbox_config(pod)),
                                                 timeout=CRI_TIMEOUT).pod_sandbox_id
            ready = True
        else:  # the newest; a stopped one is only reported (restartPolicy Never: no new sandbox)
            newest = max(sandboxes, key=lambda s: s.created_at)
            sid, ready = newest.id, newest.state == api_pb2.SANDBOX_READY
        if ready:
            self._start_containers(pod, sid)
        if self._report(pod, sid).get("phase") in FINAL and ready:
            # The kubelet stops a finished pod's sandbox (for a VM pod: frees its network).
            self._did(f"StopPodSandbox {self._key(pod)}")
            self.cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=CRI_TIMEOUT)

    # ------------------------------------------------------------ API side

    def _list_pods(self) -> list[dict[str, Any]]:
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=API_TIMEOUT)
        return json.loads(resp.data).get("items") or []

    def _fits(self, pod: dict[str, Any]) -> bool:
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        return all(self.labels.get(k) == v for k, v in selector.items())

    def _bind(self, pod: dict[str, Any]) -> None:
        self._did(f"bind {self._key(pod)}")
        # The finalizer goes on in the same write: from now on a delete waits for the agent.
        self._patch(pod, {"spec": {"nodeName": self.node},
                          "metadata": {"finalizers": [*(pod["metadata"].get("finalizers") or []), FINALIZER]}})

    def _patch(self, pod: dict[str, Any], body: dict[str, Any], status: bool = False) -> None:
        fn = self.core.patch_namespaced_pod_status if status else self.core.patch_namespaced_pod
        fn(pod["metadata"]["name"], pod["metadata"]["namespace"], body, _content_type=MERGE,
           _preload_content=False, _request_timeout=API_TIMEOUT)

    def _finish_deletion(self, pod: dict[str, Any]) -> None:
        """The kubelet's final delete: with the agent's finalizer gone the API server removes the pod."""
        self._did(f"finish deletion {self._key(pod)}")
        rest = [f for f in pod["metadata"].get("finalizers") or [] if f != FINALIZER]
        try:
            self._patch(pod, {"metadata": {"finalizers": rest}})
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise

    def _report(self, pod: dict[str, Any], sandbox_id: str | None, waiting: str | None = None,
                message: str = "") -> dict[str, Any]:
        """Write the pod's status as the CRI reports it (only what changed); return the new status."""
        new = self._pod_status(pod, sandbox_id, waiting, message)
        old = pod.get("status") or {}
        # Conditions keep their lastTransitionTime while their status stays.
        old_conds = {c.get("type"): c for c in old.get("conditions") or []}
        for c in new["conditions"]:
            prev = old_conds.get(c["type"]) or {}
            c["lastTransitionTime"] = prev.get("lastTransitionTime") if prev.get("status") == c["status"] \
                and prev.get("lastTransitionTime") else _now()
        new["startTime"] = old.get("startTime") or _now()
        if any(old.get(k) != v for k, v in new.items()):
            self._patch(pod, {"status": new}, status=True)
            pod["status"] = {**old, **new}
            if new.get("phase") != old.get("phase"):
                self._did(f"status {self._key(pod)} {new.get('phase')} {new.get('podIP') or ''}".rstrip())
        return new

    def _pod_status(self, pod: dict[str, Any], sandbox_id: str | None, waiting: str | None,
                    message: str) -> dict[str, Any]:
        spec = pod.get("spec") or {}
        rt = self.cri.runtime
        ip, extra_ips, containers = None, [], {}
        if sandbox_id is not None:
            sb = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id), timeout=30).status
            if sb.state == api_pb2.SANDBOX_READY and sb.network.ip:
                ip, extra_ips = sb.network.ip, [a.ip for a in sb.network.additional_ips]
            for c in rt.ListContainers(api_pb2.ListContainersRequest(
                    filter=api_pb2.ContainerFilter(pod_sandbox_id=sandbox_id)), timeout=30).containers:
                containers[c.metadata.name] = rt.ContainerStatus(
                    api_pb2.ContainerStatusRequest(container_id=c.id), timeout=30).status
        statuses = [self._container_status(c, containers.get(c["name"]), waiting, message)
                    for c in spec.get("containers") or []]
        states = [next(iter(s["state"])) for s in statuses]
        if states and all(s == "terminated" for s in states):
            codes = [s["state"]["terminated"]["exitCode"] for s in statuses]
            phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        elif any(s == "running" for s in states) and all(s != "waiting" for s in states):
            phase = "Running"
        else:
            phase = "Pending"
        all_ready = bool(statuses) and all(s["ready"] for s in statuses)
        cond = lambda t, ok: {"type": t, "status": "True" if ok else "False"}  # noqa: E731
        return {
            "phase": phase,
            "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
            "podIP": ip, "podIPs": [{"ip": a} for a in [ip, *extra_ips]] if ip else None,
            "conditions": [cond("PodScheduled", True), cond("Initialized", True),
                           cond("PodReadyToStartContainers", ip is not None),
                           cond("ContainersReady", all_ready), cond("Ready", all_ready)],
            "containerStatuses": statuses,
        }

    def _container_status(self, container: dict[str, Any], st: api_pb2.ContainerStatus | None,
                          waiting: str | None, message: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": container["name"], "image": container.get("image"), "imageID": "",
                               "ready": False, "started": False, "restartCount": 0}
        if st is None or st.state in (api_pb2.CONTAINER_CREATED, api_pb2.CONTAINER_UNKNOWN):
            reason = waiting or "ContainerCreating"
            out["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
            return out
        out["imageID"] = st.image_ref
        out["containerID"] = f"{self._runtime_name}://{st.id}"
        if st.state == api_pb2.CONTAINER_RUNNING:
            out.update(ready=True, started=True, state={"running": {"startedAt": _ts(st.started_at)}})
        else:  # CONTAINER_EXITED
            out["state"] = {"terminated": {
                "exitCode": st.exit_code, "reason": st.reason or ("Completed" if st.exit_code == 0 else "Error"),
                "startedAt": _ts(st.started_at), "finishedAt": _ts(st.finished_at),
                "containerID": out["containerID"], **({"message": st.message} if st.message else {})}}
        return out

    # ------------------------------------------------------------ CRI side

    def _sandboxes(self) -> list[api_pb2.PodSandbox]:
        return list(self.cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(
            filter=api_pb2.PodSandboxFilter(label_selector={AGENT_LABEL: self.node})), timeout=30).items)

    @staticmethod
    def _key(pod: dict[str, Any]) -> str:
        return f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}"

    def log_directory(self, pod: dict[str, Any]) -> Path:
        """/var/log/pods/<namespace>_<name>_<uid>, under the agent's log root."""
        m = pod["metadata"]
        return self.log_root / f"{m['namespace']}_{m['name']}_{m['uid']}"

    def log_file(self, pod: dict[str, Any], container: str, restart_count: int = 0) -> Path:
        return self.log_directory(pod) / container / f"{restart_count}.log"

    def sandbox_config(self, pod: dict[str, Any]) -> api_pb2.PodSandboxConfig:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        cfg = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"],
                                                attempt=0),
            hostname=(spec.get("hostname") or meta["name"])[:63],
            log_directory=str(self.log_directory(pod)),
            labels={**(meta.get("labels") or {}), "io.kubernetes.pod.name": meta["name"],
                    "io.kubernetes.pod.namespace": meta["namespace"], "io.kubernetes.pod.uid": meta["uid"],
                    AGENT_LABEL: self.node},
            annotations={**(meta.get("annotations") or {}), "kubernetes.io/config.source": "api",
                         "kubernetes.io/config.seen": meta.get("creationTimestamp") or _now()})
        cfg.dns_config.servers.extend(self.dns_servers)
        cfg.dns_config.searches.extend([f"{meta['namespace']}.svc.cluster.local", "svc.cluster.local"])
        # The kubelet's pod cgroup (cgroupfs driver). vmlet reports it; QEMU runs in libvirt's partition.
        cfg.linux.cgroup_parent = f"/{self.cgroup_root}/pod{meta['uid']}"
        return cfg

    def container_config(self, pod: dict[str, Any], c: dict[str, Any], image_ref: str) -> api_pb2.ContainerConfig:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        cfg = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=c["name"], attempt=0),
            image=api_pb2.ImageSpec(image=image_ref, user_specified_image=c["image"]),
            command=c.get("command") or [], args=c.get("args") or [], working_dir=c.get("workingDir") or "",
            envs=[api_pb2.KeyValue(key=e["name"], value=e.get("value") or "") for e in c.get("env") or []
                  if "valueFrom" not in e],
            log_path=f"{c['name']}/0.log",
            labels={"io.kubernetes.container.name": c["name"], "io.kubernetes.pod.name": meta["name"],
                    "io.kubernetes.pod.namespace": meta["namespace"], "io.kubernetes.pod.uid": meta["uid"]},
            annotations={
                "io.kubernetes.container.hash": hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8],
                "io.kubernetes.container.restartCount": "0",
                "io.kubernetes.container.terminationMessagePath": c.get("terminationMessagePath",
                                                                        "/dev/termination-log"),
                "io.kubernetes.container.terminationMessagePolicy": c.get("terminationMessagePolicy", "File"),
                "io.kubernetes.pod.terminationGracePeriod": str(grace),
            })
        res = cfg.linux.resources
        limits, requests = (c.get("resources") or {}).get("limits") or {}, (c.get("resources") or {}).get("requests") or {}
        if "memory" in limits:
            res.memory_limit_in_bytes = parse_quantity(str(limits["memory"]))
        if "cpu" in limits:  # as the kubelet: quota = limit × period
            res.cpu_period = 100000
            res.cpu_quota = _millicores(str(limits["cpu"])) * res.cpu_period // 1000
        cpu_request = requests.get("cpu", limits.get("cpu"))
        res.cpu_shares = max(2, _millicores(str(cpu_request)) * 1024 // 1000) if cpu_request else 2
        return cfg

    def _start_containers(self, pod: dict[str, Any], sid: str) -> None:
        """As the kubelet's SyncPod after the sandbox: per container, pull, create, start (what is missing)."""
        rt, key = self.cri.runtime, self._key(pod)
        have = {c.metadata.name: c for c in rt.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(pod_sandbox_id=sid)), timeout=30).containers}
        for c in pod["spec"].get("containers") or []:
            existing = have.get(c["name"])
            if existing is not None and existing.state != api_pb2.CONTAINER_CREATED:
                continue  # running or exited: restartPolicy Never
            if existing is None:
                try:
                    ref = self._ensure_image(c)
                except grpc.RpcError as e:
                    self._report(pod, sid, waiting="ErrImagePull", message=_describe(e))
                    raise
                self._did(f"CreateContainer {key} {c['name']}")
                cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
                    pod_sandbox_id=sid, config=self.container_config(pod, c, ref),
                    sandbox_config=self.sandbox_config(pod)), timeout=CRI_TIMEOUT).container_id
            else:
                cid = existing.id
            self._did(f"StartContainer {key} {c['name']}")
            rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=CRI_TIMEOUT)

    def _ensure_image(self, c: dict[str, Any]) -> str:
        spec = api_pb2.ImageSpec(image=c["image"])
        policy = c.get("imagePullPolicy") or "IfNotPresent"
        if policy != "Always":
            have = self.cri.images.ImageStatus(api_pb2.ImageStatusRequest(image=spec), timeout=30).image
            if have.id:
                return have.id
            if policy == "Never":
                raise RuntimeError(f"image {c['image']} is not present and imagePullPolicy is Never")
        self._did(f"PullImage {c['image']}")
        # No deadline, as the real kubelet (a pull takes what it takes; the kubelet only cancels it).
        return self.cri.images.PullImage(api_pb2.PullImageRequest(image=spec)).image_ref

    def _teardown_sandbox(self, sandbox_id: str, grace: int | None, pod: dict[str, Any] | None = None) -> None:
        """Stop each container (grace: the pod's, else the one recorded on the container), remove all."""
        rt = self.cri.runtime
        containers = rt.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(pod_sandbox_id=sandbox_id)), timeout=30).containers
        for c in containers:
            if c.state == api_pb2.CONTAINER_RUNNING:
                timeout = grace if grace is not None else int(
                    c.annotations.get("io.kubernetes.pod.terminationGracePeriod", DEFAULT_GRACE))
                self._did(f"StopContainer {c.metadata.name} timeout={timeout}")
                rt.StopContainer(api_pb2.StopContainerRequest(container_id=c.id, timeout=timeout),
                                 timeout=timeout + 60)
        if pod is not None and containers:  # the final status (exit codes) before the pod goes
            self._report(pod, sandbox_id)
        for c in containers:
            self._did(f"RemoveContainer {c.metadata.name}")
            rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=c.id), timeout=CRI_TIMEOUT)
        self._did(f"StopPodSandbox {sandbox_id}")
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=CRI_TIMEOUT)
        self._did(f"RemovePodSandbox {sandbox_id}")
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=CRI_TIMEOUT)


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, kubernetes.client.ApiException):
        return f"API {e.status} {e.reason}"
    return repr(e)

