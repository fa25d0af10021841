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

Volumes, as the kubelet's volume manager lays them out under its root dir (`<root>/pods/<pod uid>/`,
/var/lib/kubelet's layout: the root an rshared bind onto itself as the kubelet makes it; `pods`, each
pod's directory and the plugin directories 0750 root:root like the kubelet's, so an unprivileged QEMU
cannot traverse them) and hands them to CreateContainer as the kubelet's makeMounts / makeBlockVolumes do:

* `emptyDir` → `volumes/kubernetes.io~empty-dir/<name>` (0777; medium Memory: a tmpfs, sizeLimit its size);
* `configMap`, `secret` → `volumes/kubernetes.io~configmap|secret/<name>`, written like the kubelet's
  AtomicWriter: the files in `..<UTC timestamp>.<random>/`, `..data` → that directory, `<key>` →
  `..data/<key>`; `items` (key → path, mode), `defaultMode`, `optional`; secrets base64-decoded (and
  `stringData`, which an API server would have merged into `data`: kmock does not) on a tmpfs, as the
  kubelet keeps them. Re-written with an atomic swap of `..data` when the object changes. Always
  read-only mounts (the kubelet's configMap/secret mounters are);
* `persistentVolumeClaim` → the claim's bound PV (`spec.volumeName`): volumeMode Filesystem with
  `spec.local.path`: bind-mounted (read-only with the claim's readOnly) at
  `volumes/kubernetes.io~local-volume/<pv>`; with `spec.hostPath.path`: that path itself (the hostPath
  plugin mounts nothing); volumeMode Block: a symlink `volumeDevices/kubernetes.io~local-volume/<pv>`
  → the device, passed as a CRI Device with permissions "mrw" ("r" for a read-only claim);
* the CRI mount: container_path = volumeMounts[].mountPath, host_path the volume's path, readonly from
  the mount or the volume, propagation from mountPropagation; devices from volumeDevices[].devicePath.

A volume that cannot be set up (a claim missing, being deleted or not Bound, a missing ConfigMap or
Secret, a hostile item path, an unsupported source) keeps the pod Pending before RunPodSandbox: its
containers waiting with reason ContainerCreating and the message ("FailedMount: spec.volumes[i] ..."),
a Warning event FailedMount; the next pass tries again. Mounts that do not fit the volumes (a missing
volume, a Block volume in volumeMounts, a subPath) are CreateContainerConfigError, as the kubelet says.
The pod's directory goes (binds unmounted first, never deleted through a mount) after its
RemovePodSandbox, and in every pass for pods no longer bound to the node; `stop()` and `remove_all()`
leave no mount or directory behind. Not done: subPath, projected/downwardAPI/hostPath/ephemeral
volumes, the kubelet's own file mounts (/etc/hosts, the termination log), fsGroup ownership, SELinux.

Probes (`Prober`, the kubelet's prober workers): readiness and liveness probes of kind `exec` run
through the CRI's ExecSync, one worker thread per running container and probe, with the probe's
timeoutSeconds as ExecSync's timeout (DeadlineExceeded is a failed probe, as the kubelet treats a
probe timeout; other errors are retried up to 3 times, then the attempt is thrown away), periodSeconds,
initialDelaySeconds (from the container's start), and consecutive successThreshold/failureThreshold
results before a result changes. Readiness sets the container's `ready` and the pod's
ContainersReady/Ready conditions (not ready until the first success). A failed liveness probe stops
probing that container and makes the next pass stop it (StopContainer with the pod's grace period, a
Warning event Unhealthy); what happens then is the restartPolicy's, and since this agent does not
restart containers (below) the pod ends — for a VM pod (restartPolicy Never) the VM controller's
runStrategy decides the restart, as KubeVirt does. Other probe kinds (httpGet, tcpSocket, grpc) and
startup probes are not run (an agent error says so).

Level-triggered: every pass lists the pods and the agent's sandboxes (label AGENT_LABEL) and makes the
one match the other; nothing is remembered between passes but the probe workers' results (the
volumes are what is on disk). Not done: container restarts (VM pods are restartPolicy Never: the VM
controller decides restarts), init containers, images' pull secrets. It runs one pass at a time in its own thread, so a
VM's shutdown holds up the other pods; fine for a test node.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import kubernetes

from cri_shim.annotations import parse_quantity
from cri_shim.storage import pod_volumes
from proto.runtime.v1 import api_pb2
from tests.support import cri, storage
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
    """Scheduler + kubelet for the node `node_name`: start() runs passes in a thread, stop() ends them.

    `root_dir` is the kubelet's /var/lib/kubelet (default: `kubelet` beside the log root)."""

    def __init__(self, kubeconfig: Path | str, cri_socket: Path | str, node_name: str, *, log_root: Path,
                 node_labels: dict[str, str] | None = None, host_ip: str = "127.0.0.1",
                 dns_servers: tuple[str, ...] = (), cgroup_root: str = "vmlet-test-agent",
                 interval: float = 0.5, root_dir: Path | None = None) -> None:
        self.node = node_name
        self.labels = {"kubernetes.io/hostname": node_name, **(node_labels or {})}
        self.log_root, self.host_ip, self.dns_servers = Path(log_root), host_ip, tuple(dns_servers)
        self.cgroup_root, self.interval = cgroup_root, interval
        self.core = kubernetes.client.CoreV1Api(load_api_client(str(kubeconfig)))
        self.volumes = PodVolumes(Path(root_dir) if root_dir is not None else self.log_root.parent / "kubelet",
                                  self.core)
        self.cri = cri.connect(Path(cri_socket))
        self.calls: list[str] = []  # what the agent did, in order ("RunPodSandbox default/x-vm", ...)
        self.errors: list[str] = []  # failures of passes (retried on the next pass)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runtime_name = ""
        self.prober = Prober(self.cri.runtime, self._error)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "KubeletAgent":
        self._thread = threading.Thread(target=self._loop, name=f"kubelet-agent-{self.node}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 120) -> None:
        """Stop the loop (a CRI call in progress finishes first), then take down every volume it set up
        (unmounted, pod directories removed), also under pods still running; sandboxes are remove_all's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the kubelet agent did not stop within {timeout}s")
            self._thread = None
        self.prober.stop_all()
        self.volumes.teardown_all()

    def remove_all(self, grace: int = 0) -> list[str]:
        """Tear down every sandbox of this agent through the CRI, then every pod's volumes (the
        fixture's safety net); the sandbox IDs."""
        ids = [sb.id for sb in self._sandboxes()]
        for sid in ids:
            self._teardown_sandbox(sid, grace)
        self.volumes.teardown_all()
        return ids

    def close(self) -> None:
        self.prober.stop_all()
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
        # Pod directories of pods no longer bound here (their sandboxes are gone by now): the kubelet's
        # cleanupOrphanedPodDirs.
        bound = {p["metadata"].get("uid") for p in pods if (p.get("spec") or {}).get("nodeName") == self.node}
        for uid in self.volumes.uids():
            if uid not in bound:
                self._did(f"remove orphan pod dir {uid}")
                self.volumes.teardown(uid)
        # Probe workers of containers that are not running any more (exited, removed) end.
        self.prober.retain({c.id for c in self.cri.runtime.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING))),
            timeout=30).containers})

    def _sync_pod(self, pod: dict[str, Any], sandboxes: list[api_pb2.PodSandbox]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            grace = meta.get("deletionGracePeriodSeconds")
            for sb in sandboxes:
                self._teardown_sandbox(sb.id, grace, pod)
            if meta.get("uid") in self.volumes.uids():
                self._did(f"unmount volumes {self._key(pod)}")
                self.volumes.teardown(meta["uid"])
            if FINALIZER in (meta.get("finalizers") or []):
                self._finish_deletion(pod)
            return
        if FINALIZER not in (meta.get("finalizers") or []):
            self._patch(pod, {"metadata": {"finalizers": [*(meta.get("finalizers") or []), FINALIZER]}})
        if status.get("phase") in FINAL:
            return  # restartPolicy Never: a finished pod stays finished (its sandbox was stopped)
        # As the kubelet's syncPod: volumes first (and refreshed on every pass: ConfigMap/Secret updates).
        volumes, problems = self.volumes.setup(pod)
        if not sandboxes:
            if problems:  # WaitForAttachAndMount: no sandbox until every volume is there
                message = "FailedMount: " + "; ".join(problems)
                self._report(pod, None, waiting="ContainerCreating", message=message)
                self._event(pod, "FailedMount", message)
                return
            self._report(pod, None, waiting="ContainerCreating")
            self._did(f"RunPodSandbox {self._key(pod)}")
            sid = self.cri.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=self.sandbox_config(pod)),
                                                 timeout=CRI_TIMEOUT).pod_sandbox_id
            ready = True
        else:  # the newest; a stopped one is only reported (restartPolicy Never: no new sandbox)
            newest = max(sandboxes, key=lambda s: s.created_at)
            sid, ready = newest.id, newest.state == api_pb2.SANDBOX_READY
        if problems:  # a running pod keeps what its volumes had (as the kubelet, which logs and retries)
            log.info("kubelet agent %s: %s: volumes not refreshed: %s", self.node, self._key(pod), problems)
        if ready:
            self._kill_unhealthy(pod, sid)
        waiting, message = self._start_containers(pod, sid, volumes) if ready else (None, "")
        if self._report(pod, sid, waiting, message).get("phase") in FINAL and ready:
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

    def _event(self, pod: dict[str, Any], reason: str, message: str) -> None:
        """A Warning event on the pod, once per distinct message (its name is derived from it)."""
        meta = pod["metadata"]
        digest = hashlib.sha256(f"{meta.get('uid')}\0{reason}\0{message}".encode()).hexdigest()[:16]
        now = _now()
        # An object name has at most 253 characters: room for the digest.
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"name": f"{meta['name'][:200]}.{digest}", "namespace": meta["namespace"]},
                 "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                    "namespace": meta["namespace"], "uid": meta.get("uid")},
                 "reason": reason, "type": "Warning", "message": message,
                 "source": {"component": "kubelet", "host": self.node},
                 "count": 1, "firstTimestamp": now, "lastTimestamp": now}
        try:
            self.core.create_namespaced_event(meta["namespace"], event, _preload_content=False,
                                              _request_timeout=API_TIMEOUT)
        except kubernetes.client.ApiException as e:
            if e.status != 409:  # 409: already posted by an earlier pass
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
            ready = self.prober.watch(st.id, container, st.started_at)
            out.update(ready=ready, started=True, state={"running": {"startedAt": _ts(st.started_at)}})
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

    def container_config(self, pod: dict[str, Any], c: dict[str, Any], image_ref: str,
                         volumes: dict[str, Volume] | None = None) -> api_pb2.ContainerConfig:
        """The CreateContainer config of container `c`; with `volumes` (PodVolumes.setup's), its mounts and
        devices (ContainerConfigError or VolumeError when they do not fit)."""
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
        if volumes is not None:
            containers = spec.get("containers") or []
            ci = next((i for i, other in enumerate(containers) if other.get("name") == c.get("name")), 0)
            declared = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)}
            cfg.mounts.extend(container_mounts(c, ci, declared, volumes))
            cfg.devices.extend(container_devices(c, ci, declared, volumes))
        return cfg

    def _start_containers(self, pod: dict[str, Any], sid: str,
                          volumes: dict[str, Volume]) -> tuple[str | None, str]:
        """As the kubelet's SyncPod after the sandbox: per container, pull, create, start (what is missing).
        Returns the waiting reason and message for containers it could not create (None, "" if none)."""
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
                try:
                    config = self.container_config(pod, c, ref, volumes)
                except (ContainerConfigError, VolumeError) as e:  # the kubelet retries on its next sync
                    return "CreateContainerConfigError", str(e)
                self._did(f"CreateContainer {key} {c['name']}")
                try:
                    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
                        pod_sandbox_id=sid, config=config,
                        sandbox_config=self.sandbox_config(pod)), timeout=CRI_TIMEOUT).container_id
                except grpc.RpcError as e:  # what the kubelet reports; retried on the next pass
                    self._report(pod, sid, waiting="CreateContainerError", message=_describe(e))
                    raise
            else:
                cid = existing.id
            self._did(f"StartContainer {key} {c['name']}")
            rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=CRI_TIMEOUT)
        return None, ""

    def _kill_unhealthy(self, pod: dict[str, Any], sid: str) -> None:
        """The kubelet's answer to a failed liveness probe: stop the container (the pod's grace period)."""
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        for c in self.cri.runtime.ListContainers(api_pb2.ListContainersRequest(
                filter=api_pb2.ContainerFilter(pod_sandbox_id=sid)), timeout=30).containers:
            why = self.prober.failed_liveness(c.id)
            if why is None or c.state != api_pb2.CONTAINER_RUNNING:
                continue
            self._event(pod, "Unhealthy", f"Liveness probe failed: {why}")
            self._did(f"StopContainer {c.metadata.name} timeout={grace} (failed liveness probe)")
            self.cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=c.id, timeout=grace),
                                           timeout=grace + 60)

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



# ================================================================ probes (the kubelet's prober workers)

PROBE_DEFAULTS = {"initialDelaySeconds": 0, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
                  "failureThreshold": 3}  # core/v1 SetDefaults_Probe (kmock defaults nothing)
PROBE_RETRIES = 3  # the kubelet's maxProbeRetries: errors (not failures) are retried
# Seconds past a probe's timeout for the ExecSync deadline: the kubelet's remoteRuntimeService.ExecSync uses
# timeout + its runtime request timeout (--runtime-request-timeout, 2 min by default).
EXEC_MARGIN = 120


class ProbeWorker:
    """One probe of one container: the kubelet's worker loop, in a thread."""

    def __init__(self, runtime, container_id: str, kind: str, spec: dict[str, Any], started_at_ns: int,
                 on_error) -> None:
        self.runtime, self.container_id, self.kind = runtime, container_id, kind
        self.cmd = [str(a) for a in spec["exec"]["command"]]
        self.opts = {k: int(spec.get(k, d)) for k, d in PROBE_DEFAULTS.items()}
        for k, v in self.opts.items():  # the API server's validation (kmock has none)
            if v < (0 if k == "initialDelaySeconds" else 1):
                raise ValueError(f"{k}: {v} is out of range")
        self.started_at = started_at_ns / 1e9 if started_at_ns else time.time()
        self.on_error = on_error
        # Readiness starts failed (not ready until it succeeds), liveness succeeded (as the kubelet's).
        self.result = kind == "livenessProbe"
        self.message = ""
        self.last: bool | None = None
        self.run = 0
        self.probes = 0  # probes that gave a result (for tests and logs)
        self.on_hold = False  # a failed liveness probe: no more probing of this container
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"probe-{kind}-{container_id[:12]}")

    def start(self) -> "ProbeWorker":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set() and not self.on_hold:
            try:
                self._once()
            except Exception as e:  # never let a worker die silently: the agent's errors say it
                self.on_error(f"{self.kind} of {self.container_id}: {e!r}")
            self._stop.wait(self.opts["periodSeconds"])

    def _once(self) -> None:
        if time.time() - self.started_at < self.opts["initialDelaySeconds"]:
            return  # the kubelet keeps the initial result until the delay is over
        outcome = self.probe()
        if outcome is None:
            return  # an error, not a failure: the result stays
        ok, message = outcome
        self.probes += 1
        if ok == self.last:
            self.run += 1
        else:
            self.last, self.run = ok, 1
        if self.run < self.opts["successThreshold" if ok else "failureThreshold"]:
            return  # below the threshold: the result does not change yet
        self.result, self.message = ok, message
        if self.kind == "livenessProbe" and not ok:
            self.on_hold = True  # until the container is gone (the kubelet's onHold)

    def probe(self) -> tuple[bool, str] | None:
        """(success, message) of one run, or None when the runtime errs on every retry."""
        timeout = self.opts["timeoutSeconds"]
        for _ in range(PROBE_RETRIES):
            if self._stop.is_set():
                return None
            try:
                r = self.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=self.container_id, cmd=self.cmd,
                                                                  timeout=timeout), timeout=timeout + EXEC_MARGIN)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the kubelet: a timed-out probe failed
                    return False, f"command {self.cmd!r} timed out"
                last = _describe(e)
                continue
            if r.exit_code == 0:
                return True, ""
            out = (r.stdout + r.stderr).decode(errors="replace").strip()[-200:]
            return False, f"command {self.cmd!r} exited {r.exit_code}{': ' + out if out else ''}"
        log.info("probe %s of %s errored: %s", self.kind, self.container_id, last)
        return None


class Prober:
    """The agent's probe manager: workers per (container ID, probe kind), started for running containers
    (watch), ended for the others (retain, stop_all)."""

    KINDS = ("readinessProbe", "livenessProbe")

    def __init__(self, runtime, on_error) -> None:
        self.runtime, self.on_error = runtime, on_error
        self.workers: dict[tuple[str, str], ProbeWorker] = {}
        self._lock = threading.Lock()
        self._refused: set[tuple[str, str]] = set()

    def watch(self, container_id: str, container: dict[str, Any], started_at_ns: int) -> bool:
        """Make sure the probes of this running container run; whether it is ready now."""
        ready = True
        for kind in self.KINDS:
            spec = container.get(kind)
            if not spec:
                continue
            key = (container_id, kind)
            if not isinstance(spec, dict) or not isinstance((spec.get("exec") or {}).get("command"), list) \
                    or not spec["exec"]["command"]:
                if key not in self._refused:
                    self._refused.add(key)
                    self.on_error(f"container {container.get('name')}: {kind} {spec!r} is not run "
                                  "(the test kubelet agent runs exec probes only)")
                continue
            with self._lock:
                w = self.workers.get(key)
                if w is None:
                    try:
                        w = ProbeWorker(self.runtime, container_id, kind, spec, started_at_ns, self.on_error)
                    except (TypeError, ValueError) as e:  # kmock validates nothing: a hostile probe field
                        if key not in self._refused:
                            self._refused.add(key)
                            self.on_error(f"container {container.get('name')}: {kind}: {e}")
                        continue
                    self.workers[key] = w.start()
            if kind == "readinessProbe":
                ready = w.result
        return ready

    def worker(self, container_id: str, kind: str) -> ProbeWorker | None:
        return self.workers.get((container_id, kind))

    def failed_liveness(self, container_id: str) -> str | None:
        w = self.workers.get((container_id, "livenessProbe"))
        return w.message if w is not None and not w.result else None

    def retain(self, container_ids: set[str]) -> None:
        with self._lock:
            gone = [k for k in self.workers if k[0] not in container_ids]
            for k in gone:
                self.workers.pop(k).stop()

    def stop_all(self, timeout: float = 30) -> None:
        with self._lock:
            workers, self.workers = list(self.workers.values()), {}
        for w in workers:
            w.stop()
        for w in workers:  # an ExecSync in flight ends within its timeout + margin
            if w.thread.is_alive():
                w.thread.join(min(timeout, w.opts["timeoutSeconds"] + EXEC_MARGIN))


# ================================================================ volumes (the kubelet's volume manager)

EMPTY_DIR, CONFIGMAP, SECRET, LOCAL = ("kubernetes.io~empty-dir", "kubernetes.io~configmap", "kubernetes.io~secret",
                                       "kubernetes.io~local-volume")
DIR_MODE = 0o750  # the kubelet's for its root, pods and per-pod directories
DEFAULT_FILE_MODE = 0o644  # configMap/secret defaultMode (420)
MAX_PATH, MAX_NAME = 4096, 255  # the AtomicWriter's limits
DATA_LINK, DATA_TMP = "..data", "..data_tmp"
PROPAGATION = {None: api_pb2.PROPAGATION_PRIVATE, "None": api_pb2.PROPAGATION_PRIVATE,
               "HostToContainer": api_pb2.PROPAGATION_HOST_TO_CONTAINER,
               "Bidirectional": api_pb2.PROPAGATION_BIDIRECTIONAL}


class VolumeError(Exception):
    """A pod volume cannot be set up (yet): the pod waits (FailedMount). Names the field."""


class ContainerConfigError(Exception):
    """A container's volumeMounts/volumeDevices do not fit the pod's volumes (CreateContainerConfigError)."""


@dataclass(frozen=True)
class Volume:
    """A volume as set up on the host: a directory to mount, or (block) a symlink to a device."""

    name: str
    path: str
    read_only: bool = False
    block: bool = False


def _component(value: Any, field: str) -> str:
    """A name used as one path component under the agent's root or in a URL (kmock validates no names)."""
    if not isinstance(value, str) or not value:
        raise VolumeError(f"{field}: {value!r} is not a name (a non-empty string)")
    if len(value) > MAX_NAME or "/" in value or "\0" in value or value == "." or value.startswith(".."):
        raise VolumeError(f"{field}: {value!r} cannot name a directory (one path component of at most "
                          f"{MAX_NAME} characters, not '.' or '..')")
    return value


def _relative_path(value: Any, field: str) -> str:
    """A file path inside a configMap/secret volume, as the AtomicWriter allows it."""
    if not isinstance(value, str) or not value or len(value) > MAX_PATH or "\0" in value or value.startswith("/"):
        raise VolumeError(f"{field}: {value!r} must be a relative path of at most {MAX_PATH} characters")
    parts = value.split("/")
    if value.startswith("..") or any(p in ("", ".", "..") or len(p.encode()) > MAX_NAME for p in parts):
        raise VolumeError(f"{field}: {value!r} must not start with '..' nor have '..', '.' or empty elements")
    return value


def _mode(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise VolumeError(f"{field}: {value!r} is not a file mode (0 to 0777, decimal 0 to 511)")
    return value


def _run(*argv: str) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise VolumeError(f"{' '.join(argv)}: {out.stderr.strip() or f'exit {out.returncode}'}")


def _is_mountpoint(path: Path) -> bool:
    return os.path.realpath(path) in storage.mounts_under(path)


def _mkdir(path: Path, mode: int = DIR_MODE) -> Path:
    """`path`, made with `mode` (not cut by the umask) if missing, its missing parents with DIR_MODE;
    an existing symlink or non-directory is refused."""
    if not path.parent.is_dir():
        _mkdir(path.parent)
    try:
        path.mkdir(mode=mode)
        path.chmod(mode)
    except FileExistsError:
        pass
    if path.is_symlink() or not path.is_dir():
        raise VolumeError(f"{path} exists and is not a directory")
    return path


def atomic_write(target: Path, payload: dict[str, tuple[bytes, int]]) -> bool:
    """Project `payload` (relative path → (content, mode)) into `target` like the kubelet's AtomicWriter.

    The files go into a new `..<timestamp>.<random>` directory, `..data` is swapped to it with a rename
    (readers see the old set or the new one, never a mix), each top-level name is a symlink
    `<name>` → `..data/<name>`, and what the old set had and the new one lacks is removed. Nothing is
    written when the content and modes are already those. Returns whether it wrote.
    """
    for path in payload:  # a file cannot also be a directory of another
        parent = path.rpartition("/")[0]
        while parent:
            if parent in payload:
                raise VolumeError(f"path {parent!r} is both a file and the directory of {path!r}")
            parent = parent.rpartition("/")[0]
    if _projected(target) == payload:
        return False
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("..%Y_%m_%d_%H_%M_%S.")
    ts_dir = Path(tempfile.mkdtemp(prefix=stamp, dir=target))
    ts_dir.chmod(0o755)
    for rel, (content, mode) in sorted(payload.items()):
        dest = ts_dir / rel
        dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(content)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    data_link = target / DATA_LINK
    old = os.readlink(data_link) if data_link.is_symlink() else None
    tmp = target / DATA_TMP
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(ts_dir.name, tmp)
    os.rename(tmp, data_link)
    tops = {rel.split("/")[0] for rel in payload}
    for top in tops:
        if not os.path.lexists(target / top):
            os.symlink(f"{DATA_LINK}/{top}", target / top)
    for entry in os.listdir(target):
        if not entry.startswith("..") and entry not in tops and (target / entry).is_symlink():
            (target / entry).unlink()
    if old and old != ts_dir.name and old.startswith("..") and "/" not in old:
        shutil.rmtree(target / old, ignore_errors=True)
    return True


def _projected(target: Path) -> dict[str, tuple[bytes, int]] | None:
    """What `..data` of `target` holds now (path → (content, mode)); None when there is no such set."""
    link = target / DATA_LINK
    if not link.is_symlink():
        return None
    name = os.readlink(link)
    ts_dir = target / name
    if "/" in name or not name.startswith("..") or ts_dir.is_symlink() or not ts_dir.is_dir():
        return None
    out = {}
    for dirpath, _dirs, files in os.walk(ts_dir):
        for f in files:
            p = Path(dirpath) / f
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode):
                return None
            out[str(p.relative_to(ts_dir))] = (p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


class PodVolumes:
    """The agent's volume manager: sets up, refreshes and tears down pod volumes under `root`."""

    def __init__(self, root: Path, core: kubernetes.client.CoreV1Api) -> None:
        self.root, self.core = Path(root), core

    @property
    def pods_dir(self) -> Path:
        return self.root / "pods"

    def pod_dir(self, uid: str) -> Path:
        return self.pods_dir / _component(uid, "metadata.uid")

    def uids(self) -> list[str]:
        """The pods that have a directory here."""
        return sorted(p.name for p in self.pods_dir.iterdir()) if self.pods_dir.is_dir() else []

    def setup(self, pod: dict[str, Any]) -> tuple[dict[str, Volume], list[str]]:
        """Set up (or refresh) every volume of `pod`: (the ready volumes by name, the problems)."""
        self._make_rshared()
        _mkdir(self.pods_dir)
        ready: dict[str, Volume] = {}
        problems: list[str] = []
        try:
            pod_dir = _mkdir(self.pod_dir(pod["metadata"].get("uid")))
        except VolumeError as e:
            return ready, [str(e)]
        for i, vol in enumerate((pod.get("spec") or {}).get("volumes") or []):
            try:
                v = self._setup_volume(pod, pod_dir, i, vol)
            except VolumeError as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"spec.volumes[{i}]: {e}")
            else:
                ready[v.name] = v
        return ready, problems

    def teardown(self, uid: str) -> None:
        """Unmount what is mounted under the pod's directory, then remove it (never through a mount)."""
        d = self.pods_dir / uid  # a uid from listing the directory, or one that named a directory before
        if not os.path.lexists(d):
            return
        pod_volumes.unmount_under(d)  # raises if a mount stays: then nothing is deleted
        shutil.rmtree(d)

    def teardown_all(self) -> None:
        for uid in self.uids():
            self.teardown(uid)
        if _is_mountpoint(self.root):  # its bind onto itself (_make_rshared)
            pod_volumes.unmount_under(self.root)
        for d in (self.pods_dir, self.root):
            try:
                d.rmdir()  # only if empty: the root may hold what others put there
            except OSError:
                pass

    def _make_rshared(self) -> None:
        """As the kubelet's setupDataDirs (MakeRShared): the root bind-mounted onto itself and made
        rshared, so mounts under it can reach containers with HostToContainer propagation (runtimes
        refuse it from a private mount, and this machine's / is private)."""
        _mkdir(self.root)
        if not _is_mountpoint(self.root):
            _run("mount", "--bind", str(self.root), str(self.root))
            _run("mount", "--make-rshared", str(self.root))

    # ------------------------------------------------------------ per volume

    def _setup_volume(self, pod: dict[str, Any], pod_dir: Path, i: int, vol: Any) -> Volume:
        field = f"spec.volumes[{i}]"
        if not isinstance(vol, dict):
            raise VolumeError(f"{field}: {vol!r} is not a volume")
        name = _component(vol.get("name"), f"{field}.name")
        sources = [k for k in vol if k != "name"]
        if len(sources) != 1:
            raise VolumeError(f"{field} ({name}): needs exactly one volume source, has {sources or 'none'}")
        kind = sources[0]
        src = vol[kind] if isinstance(vol[kind], dict) else {}
        field = f"{field}.{kind}"
        ns = pod["metadata"].get("namespace")
        if kind == "emptyDir":
            return self._empty_dir(pod_dir / "volumes" / EMPTY_DIR / name, name, src, field)
        if kind == "configMap":
            cm_name = src.get("name")
            obj = self._get(self.core.read_namespaced_config_map, cm_name, ns, f"{field}.name")
            data = None
            if obj is not None:
                data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
                data.update({k: _b64(v, f"configmap {ns}/{cm_name} binaryData[{k!r}]")
                             for k, v in (obj.get("binaryData") or {}).items()})
            payload = self._payload(data, src, field, f"configmap {ns}/{cm_name}")
            d = _mkdir(pod_dir / "volumes" / CONFIGMAP / name, 0o777)
            atomic_write(d, payload)
            return Volume(name, str(d), read_only=True)
        if kind == "secret":
            secret_name = src.get("secretName")
            obj = self._get(self.core.read_namespaced_secret, secret_name, ns, f"{field}.secretName")
            data = None
            if obj is not None:
                data = {k: _b64(v, f"secret {ns}/{secret_name} data[{k!r}]") for k, v in (obj.get("data") or {}).items()}
                data.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
            payload = self._payload(data, src, field, f"secret {ns}/{secret_name}")
            d = _mkdir(pod_dir / "volumes" / SECRET / name, 0o777)
            if not _is_mountpoint(d):  # the kubelet keeps secrets in memory
                _run("mount", "-t", "tmpfs", "-o", "mode=0777,nosuid,nodev", "tmpfs", str(d))
            atomic_write(d, payload)
            return Volume(name, str(d), read_only=True)
        if kind == "persistentVolumeClaim":
            return self._claim(pod_dir, name, src, field, ns)
        raise VolumeError(f"{field} ({name}): not supported by the test kubelet agent "
                          "(emptyDir, configMap, secret and persistentVolumeClaim are)")

    def _empty_dir(self, d: Path, name: str, src: dict[str, Any], field: str) -> Volume:
        medium = src.get("medium") or ""
        if medium not in ("", "Memory"):
            raise VolumeError(f"{field}.medium: {medium!r} is not supported (\"\" or Memory)")
        _mkdir(d, 0o777)
        if medium == "Memory" and not _is_mountpoint(d):
            options = "mode=0777,nosuid,nodev"
            if src.get("sizeLimit") is not None:
                try:
                    options += f",size={parse_quantity(str(src['sizeLimit']))}"
                except ValueError as e:
                    raise VolumeError(f"{field}.sizeLimit: {e}") from None
            _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d))
        return Volume(name, str(d))

    def _payload(self, data: dict[str, bytes] | None, src: dict[str, Any], field: str,
                 what: str) -> dict[str, tuple[bytes, int]]:
        """The files of a configMap/secret volume: `items` (or every key), modes, `optional`."""
        optional = src.get("optional") is True
        if data is None and not optional:
            raise VolumeError(f"{field}: {what} not found")
        data = data or {}
        default = _mode(src.get("defaultMode", DEFAULT_FILE_MODE), f"{field}.defaultMode")
        items = src.get("items")
        if items is None:
            return {_relative_path(k, f"{what} key"): (v, default) for k, v in data.items()}
        if not isinstance(items, list):
            raise VolumeError(f"{field}.items: {items!r} is not a list")
        out: dict[str, tuple[bytes, int]] = {}
        for j, item in enumerate(items):
            where = f"{field}.items[{j}]"
            if not isinstance(item, dict):
                raise VolumeError(f"{where}: {item!r} is not an item")
            key = item.get("key")
            if key not in data:
                if optional:
                    continue
                raise VolumeError(f"{where}.key: {what} has no key {key!r}")
            path = _relative_path(item.get("path"), f"{where}.path")
            if path in out:
                raise VolumeError(f"{where}.path: {path!r} is also an earlier item's")
            out[path] = (data[key], _mode(item["mode"], f"{where}.mode") if "mode" in item else default)
        return out

    def _claim(self, pod_dir: Path, name: str, src: dict[str, Any], field: str, ns: str) -> Volume:
        claim_name = src.get("claimName")
        claim = self._get(self.core.read_namespaced_persistent_volume_claim, claim_name, ns, f"{field}.claimName")
        what = f"persistentvolumeclaim {ns}/{claim_name}"
        if claim is None:
            raise VolumeError(f"{field}: {what} not found")
        if claim["metadata"].get("deletionTimestamp"):
            raise VolumeError(f"{field}: {what} is being deleted")
        pv_name = (claim.get("spec") or {}).get("volumeName")
        phase = (claim.get("status") or {}).get("phase") or "Pending"
        if phase != "Bound" or not pv_name:
            raise VolumeError(f"{field}: {what} is {phase}, not bound to a volume")
        pv_name = _component(pv_name, f"{what} spec.volumeName")
        pv = self._get(self.core.read_persistent_volume, pv_name, None, f"{what} spec.volumeName")
        if pv is None:
            raise VolumeError(f"{field}: persistentvolume {pv_name} of {what} not found")
        spec = pv.get("spec") or {}
        ref = spec.get("claimRef") or {}
        if ref.get("uid") != claim["metadata"].get("uid"):
            raise VolumeError(f"{field}: persistentvolume {pv_name} is not bound to {what} (its claimRef)")
        read_only = src.get("readOnly") is True
        local, host = (spec.get("local") or {}).get("path"), (spec.get("hostPath") or {}).get("path")
        path = local or host
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise VolumeError(f"{field}: persistentvolume {pv_name} has no absolute spec.local.path or "
                              "spec.hostPath.path (other volume types are not supported)")
        if (spec.get("volumeMode") or "Filesystem") == "Block":
            try:
                is_block = stat.S_ISBLK(os.stat(path).st_mode)
            except OSError as e:
                raise VolumeError(f"{field}: persistentvolume {pv_name}: {path}: {e.strerror}") from None
            if not is_block:
                raise VolumeError(f"{field}: persistentvolume {pv_name} has volumeMode Block but {path} "
                                  "is not a block device")
            link = _mkdir(pod_dir / "volumeDevices" / LOCAL) / pv_name
            if not (link.is_symlink() and os.readlink(link) == path):
                tmp = link.with_name(f".{pv_name}.tmp")
                if os.path.lexists(tmp):
                    tmp.unlink()
                os.symlink(path, tmp)
                os.rename(tmp, link)
            return Volume(name, str(link), read_only, block=True)
        if local is None:
            return Volume(name, host, read_only)  # the hostPath plugin mounts nothing
        if not os.path.isdir(local):
            raise VolumeError(f"{field}: persistentvolume {pv_name}: spec.local.path {local} is not a directory")
        target = _mkdir(pod_dir / "volumes" / LOCAL / pv_name)
        if not _is_mountpoint(target):
            _run("mount", "--bind", local, str(target))
            if read_only:
                try:
                    _run("mount", "-o", "remount,bind,ro", str(target))
                except VolumeError:
                    pod_volumes.unmount_under(target)
                    raise
        return Volume(name, str(target), read_only)

    def _get(self, fn, name: Any, namespace: str | None, field: str) -> dict[str, Any] | None:
        """The object (None if there is none); `name` is checked first: it goes into a URL."""
        _component(name, field)
        args = (name,) if namespace is None else (name, namespace)
        try:
            return json.loads(fn(*args, _preload_content=False, _request_timeout=API_TIMEOUT).data)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise VolumeError(f"{what}: not base64") from None


def container_mounts(c: dict[str, Any], ci: int, declared: set[str], volumes: dict[str, Volume]) -> list[api_pb2.Mount]:
    """The CRI mounts of container `c` (spec.containers[ci]), as the kubelet's makeMounts."""
    mounts = []
    for j, m in enumerate(c.get("volumeMounts") or []):
        field = f"spec.containers[{ci}].volumeMounts[{j}]"
        vol = _volume_of(m, field, declared, volumes)
        if vol.block:
            raise ContainerConfigError(f"{field}: volume {vol.name!r} has volumeMode Block: it goes in volumeDevices")
        if m.get("subPath") or m.get("subPathExpr"):
            raise ContainerConfigError(f"{field}.subPath: not supported by the test kubelet agent")
        path = m.get("mountPath")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ContainerConfigError(f"{field}.mountPath: {path!r} must be an absolute path")
        if m.get("mountPropagation") not in PROPAGATION:
            raise ContainerConfigError(f"{field}.mountPropagation: {m.get('mountPropagation')!r} is not one of "
                                       "None, HostToContainer, Bidirectional")
        mounts.append(api_pb2.Mount(container_path=path, host_path=vol.path,
                                    readonly=m.get("readOnly") is True or vol.read_only,
                                    propagation=PROPAGATION[m.get("mountPropagation")]))
    return mounts


def container_devices(c: dict[str, Any], ci: int, declared: set[str], volumes: dict[str, Volume]) -> list[api_pb2.Device]:
    """The CRI devices of container `c`, as the kubelet's makeBlockVolumes."""
    devices = []
    for j, d in enumerate(c.get("volumeDevices") or []):
        field = f"spec.containers[{ci}].volumeDevices[{j}]"
        vol = _volume_of(d, field, declared, volumes)
        if not vol.block:
            raise ContainerConfigError(f"{field}: volume {vol.name!r} is not a block volume: it goes in volumeMounts")
        path = d.get("devicePath")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ContainerConfigError(f"{field}.devicePath: {path!r} must be an absolute path")
        devices.append(api_pb2.Device(container_path=path, host_path=vol.path,
                                      permissions="r" if vol.read_only else "mrw"))
    return devices


def _volume_of(ref: Any, field: str, declared: set[str], volumes: dict[str, Volume]) -> Volume:
    name = ref.get("name") if isinstance(ref, dict) else None
    if name not in declared:
        raise ContainerConfigError(f"{field}.name: {name!r} is not one of the pod's volumes")
    if name not in volumes:
        raise VolumeError(f"{field}: volume {name!r} is not set up")
    return volumes[name]
