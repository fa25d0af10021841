"""A test-only storage provisioner (plus the PV binder and pvc-protection) against an API server.

There is no storage provisioner on the project's machines, so the claims VM tests make would stay
Pending. `Provisioner` runs beside `tests.support.kubelet_agent.KubeletAgent`, against the same API
server (kmock, tests/integration/vmapi/harness.py), and does what a dynamic provisioner, the PV
controller and the pvc-protection controller do together for one storage class:

* **provision**: every claim that is Pending, unbound and of the provisioner's storage class (or of
  none: the default class) gets a volume — volumeMode Filesystem: a new directory under the
  provisioner's root; Block: a sparse file of the requested size (rounded up to a MiB) attached to a
  loop device (tests/support/storage.py). A PersistentVolume `pvc-<claim uid>` names it in
  `spec.local.path` (the directory or /dev/loopN), with the claim's accessModes and volumeMode, the
  capacity, a claimRef, reclaim policy Delete and node affinity to the node;
* **bind**: the claim gets `spec.volumeName`, the binder's annotations, the pvc-protection finalizer
  and status Bound (capacity, accessModes);
* **protect and reclaim**: a deleted claim keeps its finalizer while a pod that names it exists (in
  any phase: the agent unmounts volumes only when the pod goes); once the claim is gone, its PV is
  deleted and its directory, or its loop device and file, removed.

A claim it cannot serve (a size that is no quantity, an unknown volumeMode, ...) gets a Warning event
ProvisioningFailed naming the field, and the message goes to `errors`; it stays Pending.

`on_demand=True` provisions a claim only after `provision(namespace, name)`, `delay` only once the
claim has been seen Pending that long: tests can watch claims (and what waits on them) Pending first.

Level-triggered: each pass lists claims, volumes and pods and makes them agree. What it made on the
host is remembered (`volumes`), as a real provisioner's storage backend would: `stop()` ends the
passes and then removes every directory and loop device it made, whatever state the API is in.
Storage class `""` (explicit: "no class", static binding only) and other classes are left alone;
claims naming a volume themselves (static binding) too.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes

from cri_shim.annotations import parse_quantity
from tests.support import storage
from vmapi.client import MERGE, load_api_client

log = logging.getLogger(__name__)

PROVISIONER = "vmlet.test/provisioner"
DEFAULT_CLASS = "vmlet-test"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
API_TIMEOUT = 10
MIB = 1024 * 1024
MAX_BLOCK_SIZE = 64 * 1024 * MIB  # sparse, but a guest could fill it: no test needs more
MODES = ("Filesystem", "Block")


class ClaimError(ValueError):
    """The claim cannot be provisioned as it is (names the field)."""


@dataclass(frozen=True)
class Backing:
    """What one PV is on the host: a directory, or a file attached to a loop device."""

    path: Path
    device: Path | None = None

    @property
    def local_path(self) -> str:
        return str(self.device or self.path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity(size: int) -> str:
    for suffix, unit in (("Gi", 1024 * MIB), ("Mi", MIB)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def claim_size(claim: dict[str, Any]) -> int:
    """spec.resources.requests.storage in bytes (ClaimError naming the field)."""
    field = "spec.resources.requests.storage"
    raw = (((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    if raw is None:
        raise ClaimError(f"{field} is missing")
    try:
        size = parse_quantity(str(raw))
    except ValueError as e:
        raise ClaimError(f"{field}: {e}") from None
    if size <= 0:
        raise ClaimError(f"{field}: {raw!r} must be more than 0")
    return size


class Provisioner:
    """Provisioner + binder for `storage_class` on `node_name`: start() runs passes, stop() frees all."""

    def __init__(self, kubeconfig: Path | str, root: Path | str, *, node_name: str = "",
                 storage_class: str = DEFAULT_CLASS, on_demand: bool = False, delay: float = 0.0,
                 interval: float = 0.5, max_block_size: int = MAX_BLOCK_SIZE) -> None:
        self.root, self.node, self.storage_class = Path(root), node_name, storage_class
        self.on_demand, self.delay, self.interval, self.max_block_size = on_demand, delay, interval, max_block_size
        api = load_api_client(str(kubeconfig))
        self.core, self.storage_api = kubernetes.client.CoreV1Api(api), kubernetes.client.StorageV1Api(api)
        self.volumes: dict[str, Backing] = {}  # PV name → what it is on the host
        self.calls: list[str] = []
        self.errors: list[str] = []
        self._allowed: set[tuple[str, str]] = set()
        self._first_seen: dict[str, float] = {}  # claim uid → when first seen Pending (for `delay`)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Provisioner":
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._ensure_storage_class()
        self._thread = threading.Thread(target=self._loop, name="test-provisioner", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        """End the passes, then remove every volume it made on the host (loop devices, files, dirs)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the provisioner did not stop within {timeout}s")
            self._thread = None
        with self._lock:
            failures = []
            for name in list(self.volumes):
                try:
                    self._free(name)
                except Exception as e:  # noqa: BLE001 - free the others, then report
                    failures.append(f"{name}: {e}")
            if failures:
                raise RuntimeError("could not remove volumes: " + "; ".join(failures))

    def close(self) -> None:
        self.core.api_client.close()

    def provision(self, namespace: str, name: str) -> None:
        """on_demand: let the claim namespace/name be provisioned (on the next pass)."""
        with self._lock:
            self._allowed.add((namespace, name))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as e:  # API unreachable: retried on the next pass
                self._error(f"pass failed: {e!r}")
            self._stop.wait(self.interval)

    def _error(self, msg: str) -> None:
        if msg not in self.errors:  # the same failure every pass is one entry
            log.warning("provisioner: %s", msg)
            self.errors.append(msg)

    def _did(self, what: str) -> None:
        log.info("provisioner: %s", what)
        self.calls.append(what)

    # ------------------------------------------------------------ one pass

    def sync_once(self) -> None:
        with self._lock:
            claims = self._list(self.core.list_persistent_volume_claim_for_all_namespaces)
            pvs = {pv["metadata"]["name"]: pv for pv in self._list(self.core.list_persistent_volume)}
            pods = self._list(self.core.list_pod_for_all_namespaces)
            live = {}
            for claim in claims:
                meta = claim["metadata"]
                live[(meta.get("namespace"), meta.get("name"))] = meta.get("uid")
                try:
                    self._sync_claim(claim, pvs, pods)
                except ClaimError as e:
                    self._failed(claim, str(e))
                except kubernetes.client.ApiException as e:
                    self._error(f"claim {meta.get('namespace')}/{meta.get('name')}: API {e.status} {e.reason}")
            self._reclaim(pvs, live)

    def _sync_claim(self, claim: dict[str, Any], pvs: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        meta, spec = claim["metadata"], claim.get("spec") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        if meta.get("deletionTimestamp"):
            if PVC_PROTECTION in (meta.get("finalizers") or []) and not self._in_use(ns, name, pods):
                self._did(f"unprotect claim {ns}/{name}")
                rest = [f for f in meta["finalizers"] if f != PVC_PROTECTION]
                self._patch_claim(claim, {"metadata": {"finalizers": rest}})
            return
        if (claim.get("status") or {}).get("phase") == "Bound":
            return
        if spec.get("storageClassName", None) not in (None, self.storage_class):
            return  # another class, or "" (static binding only)
        uid = meta.get("uid")
        if not uid or not isinstance(uid, str) or "/" in uid or uid in (".", ".."):
            raise ClaimError(f"metadata.uid {uid!r}: a claim needs a uid to name its volume")
        pv_name = f"pvc-{uid}"
        if spec.get("volumeName") not in (None, "", pv_name):
            return  # static binding to a volume that is not ours
        if self.on_demand and (ns, name) not in self._allowed:
            return
        first = self._first_seen.setdefault(uid, time.monotonic())
        if time.monotonic() - first < self.delay:
            return
        pv = pvs.get(pv_name)
        if pv is None:
            pv = self._create_volume(claim, pv_name)
            pvs[pv_name] = pv
        self._bind(claim, pv)

    def _create_volume(self, claim: dict[str, Any], pv_name: str) -> dict[str, Any]:
        meta, spec = claim["metadata"], claim.get("spec") or {}
        mode = spec.get("volumeMode") or "Filesystem"
        if mode not in MODES:
            raise ClaimError(f"spec.volumeMode {mode!r} is not one of {', '.join(MODES)}")
        size = claim_size(claim)
        access = spec.get("accessModes") or ["ReadWriteOnce"]
        if not isinstance(access, list) or not all(isinstance(a, str) for a in access):
            raise ClaimError(f"spec.accessModes {access!r} is not a list of access modes")
        if mode == "Block":
            size = -(-size // MIB) * MIB
            if size > self.max_block_size:
                raise ClaimError(f"spec.resources.requests.storage: {size} bytes is more than this "
                                 f"provisioner's {self.max_block_size}")
        backing = self.volumes.get(pv_name)
        if backing is None:  # a pass that failed after this point made it already
            if mode == "Block":
                file = self.root / f"{pv_name}.img"
                backing = Backing(file, storage.attach_loop(file, size))
            else:
                backing = Backing(storage.make_dir_volume(self.root, pv_name))
            self.volumes[pv_name] = backing
            self._did(f"made {mode} volume {pv_name} at {backing.local_path}")
        pv: dict[str, Any] = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": {"storage": _quantity(size)},
                "volumeMode": mode,
                "accessModes": access,
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                             "name": meta["name"], "uid": meta["uid"]},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": self.storage_class,
                "local": {"path": backing.local_path},
            },
        }
        if self.node:  # a local volume is on one node
            pv["spec"]["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [self.node]}]}]}}
        self._did(f"create PV {pv_name} for {meta['namespace']}/{meta['name']}")
        resp = self.core.create_persistent_volume(pv, _preload_content=False, _request_timeout=API_TIMEOUT)
        created = json.loads(resp.data)
        self.core.patch_persistent_volume_status(pv_name, {"status": {"phase": "Bound"}}, _content_type=MERGE,
                                                 _preload_content=False, _request_timeout=API_TIMEOUT)
        return created

    def _bind(self, claim: dict[str, Any], pv: dict[str, Any]) -> None:
        meta = claim["metadata"]
        pv_spec = pv.get("spec") or {}
        self._did(f"bind claim {meta['namespace']}/{meta['name']} to {pv['metadata']['name']}")
        finalizers = meta.get("finalizers") or []
        self._patch_claim(claim, {
            "metadata": {
                "annotations": {"pv.kubernetes.io/bind-completed": "yes", "pv.kubernetes.io/bound-by-controller": "yes",
                                "volume.kubernetes.io/storage-provisioner": PROVISIONER},
                "finalizers": finalizers if PVC_PROTECTION in finalizers else [*finalizers, PVC_PROTECTION]},
            "spec": {"volumeName": pv["metadata"]["name"], "volumeMode": pv_spec.get("volumeMode"),
                     **({} if "storageClassName" in (claim.get("spec") or {})
                        else {"storageClassName": self.storage_class})}})
        self._patch_claim(claim, {"status": {"phase": "Bound", "capacity": pv_spec.get("capacity"),
                                             "accessModes": pv_spec.get("accessModes")}}, status=True)

    def _reclaim(self, pvs: dict[str, Any], live: dict[tuple[str, str], str]) -> None:
        """Delete our volumes whose claim is gone (reclaim policy Delete), with what backs them."""
        for name, pv in pvs.items():
            if (pv["metadata"].get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            ref = (pv.get("spec") or {}).get("claimRef") or {}
            if live.get((ref.get("namespace"), ref.get("name"))) == ref.get("uid"):
                continue
            self._did(f"delete PV {name} (claim {ref.get('namespace')}/{ref.get('name')} is gone)")
            try:
                self.core.delete_persistent_volume(name, _preload_content=False, _request_timeout=API_TIMEOUT)
            except kubernetes.client.ApiException as e:
                if e.status != 404:
                    raise
            if name in self.volumes:
                self._free(name)
        for name in [n for n in self.volumes if n not in pvs]:  # its PV was never made, or deleted by a test
            self._free(name)

    def _free(self, pv_name: str) -> None:
        backing = self.volumes[pv_name]
        if backing.device is not None:
            storage.detach_loop(backing.device)
            backing.path.unlink(missing_ok=True)
        elif backing.path.exists():
            mounted = storage.mounts_under(backing.path)
            if mounted:  # never delete through a mount into someone else's files
                raise RuntimeError(f"{backing.path} still has mounts under it: {mounted}")
            shutil.rmtree(backing.path)
        del self.volumes[pv_name]
        self._did(f"removed volume {pv_name} ({backing.local_path})")

    # ------------------------------------------------------------ API side

    def _list(self, fn) -> list[dict[str, Any]]:
        return json.loads(fn(_preload_content=False, _request_timeout=API_TIMEOUT).data).get("items") or []

    @staticmethod
    def _in_use(namespace: str, name: str, pods: list[dict[str, Any]]) -> bool:
        for pod in pods:
            if pod["metadata"].get("namespace") != namespace:
                continue
            for vol in (pod.get("spec") or {}).get("volumes") or []:
                if ((vol or {}).get("persistentVolumeClaim") or {}).get("claimName") == name:
                    return True
        return False

    def _patch_claim(self, claim: dict[str, Any], body: dict[str, Any], status: bool = False) -> None:
        fn = (self.core.patch_namespaced_persistent_volume_claim_status if status
              else self.core.patch_namespaced_persistent_volume_claim)
        fn(claim["metadata"]["name"], claim["metadata"]["namespace"], body, _content_type=MERGE,
           _preload_content=False, _request_timeout=API_TIMEOUT)

    def _failed(self, claim: dict[str, Any], message: str) -> None:
        """A Warning event ProvisioningFailed on the claim (one per distinct message), and `errors`."""
        meta = claim["metadata"]
        self._error(f"claim {meta.get('namespace')}/{meta.get('name')}: {message}")
        digest = hashlib.sha256(f"{meta.get('uid')}\0{message}".encode()).hexdigest()[:16]
        # An object name has at most 253 characters: room for the digest.
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{str(meta.get('name'))[:200]}.{digest}", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": meta.get("name"),
                               "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "reason": "ProvisioningFailed", "type": "Warning", "message": message,
            "source": {"component": PROVISIONER}, "count": 1, "firstTimestamp": _now(), "lastTimestamp": _now(),
        }
        try:
            self.core.create_namespaced_event(meta.get("namespace"), event, _preload_content=False,
                                              _request_timeout=API_TIMEOUT)
        except kubernetes.client.ApiException as e:
            if e.status != 409:  # 409: posted on an earlier pass
                raise

    def _ensure_storage_class(self) -> None:
        body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": self.storage_class},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}
        try:
            self.storage_api.create_storage_class(body, _preload_content=False, _request_timeout=API_TIMEOUT)
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise


def leftover_volumes(root: Path | str) -> list[str]:
    """What a stopped provisioner must not leave under `root`: loop devices, mounts, files."""
    root = Path(root)
    found = storage.leaks(root)
    if root.exists():
        found += [f"file {p}" for p in sorted(root.iterdir())]
    return found

