"""The runtime object every RPC module works with: stores, clients, and VM exit bookkeeping.

Thin on purpose (containerd's criService shape): it holds the metadata store,
the libvirt host, the image store, the event hub and the console copiers, and
offers the lookups every RPC needs. The RPC modules hold the logic.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path

import libvirt

from image_service.store import Store as ImageStore
from proto.runtime.v1 import api_pb2

from . import errors
from .storage import pod_volumes
from .config import Config
from .console_log import ConsoleCopier
from .events import EventHub
from .guest_agent import AgentTracker, ExecLedger
from .libvirt_host import LibvirtHost
from .network import NetworkManager
from .state import ContainerRecord, SandboxRecord, Store, resolve_id
from .storage.vm_files import vm_files

log = logging.getLogger("vmlet.runtime")

# How a stopped domain maps to a container exit: (exit code, reason).
EXIT_CLEAN = (0, "Completed")
EXIT_KILLED = (137, "Killed")  # destroyed: stop timeout, or by hand
EXIT_CRASHED = (139, "Crashed")
EXIT_FAILED = (1, "Error")


def new_id() -> str:
    return secrets.token_hex(32)


def now_ns() -> int:
    return time.time_ns()


def exit_for(state: int, reason: int) -> tuple[int, str]:
    """The container exit a shut-off domain's libvirt state reason stands for."""
    if state == libvirt.VIR_DOMAIN_CRASHED or reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return EXIT_CRASHED
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN:
        return EXIT_CLEAN
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED:
        return EXIT_KILLED
    return EXIT_FAILED


def _instance_id(state_dir: Path) -> str:
    """This daemon's identity, written into every domain it defines.

    Recovery only touches domains carrying it, so two vmlet daemons on one
    host (a test run beside a real node) never take each other's VMs for orphans.
    """
    path = state_dir / "instance-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_hex(16)
        path.write_text(value + "\n")
        return value


class DerivedCache:
    """Values derived from a record (parsed configs, list items), built once per stored version.

    Records are immutable and replaced on every change, so "same record
    object" means "nothing changed". List* calls read every record; parsing
    and rebuilding a thousand messages per call would dominate their latency.
    Entries of records that are gone are dropped as the store shrinks.
    """

    def __init__(self, rt: "Runtime") -> None:
        self._rt = rt
        self._entries: dict[tuple[str, str], tuple[object, object]] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, record, build):
        key = (kind, record.id)
        cached = self._entries.get(key)
        if cached is not None and cached[0] is record:
            return cached[1]
        value = build(self._rt, record)
        with self._lock:
            self._entries[key] = (record, value)
            if len(self._entries) > 4 * (len(self._rt.store.containers) + len(self._rt.store.sandboxes)) + 64:
                live = self._rt.store.containers.keys() | self._rt.store.sandboxes.keys()
                self._entries = {k: v for k, v in self._entries.items() if k[1] in live}
        return value


class Runtime:
    def __init__(self, config: Config, host: LibvirtHost, images: ImageStore, domain_type: str) -> None:
        self.config = config
        self.host = host
        self.images = images
        self.domain_type = domain_type
        self.store = Store(config.db_path)
        self.events = EventHub()
        self.copiers: dict[str, ConsoleCopier] = {}
        self.stops: dict[str, object] = {}  # container id -> its container_stop.VMStop in progress
        self.stops_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self.pod_cidr = ""  # from UpdateRuntimeConfig
        self.derived = DerivedCache(self)
        self._exits: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._exit_worker, name="vm-exits", daemon=True).start()
        self.instance_id = _instance_id(config.state_dir)
        self.network = NetworkManager(config.state_dir, config.cni_conf_dir, config.cni_bin_dirs,
                                      plugin_timeout=config.cni_plugin_timeout)
        # Guest agent state and facts: fed by libvirt's agent events, never waited on by an RPC.
        # ...and its record of guest commands in flight (exec leftovers are swept after a crash).
        self.agent = AgentTracker(host.lookup, ExecLedger(config.state_dir / "exec-inflight"))
        host.add_agent_listener(self.agent.on_agent_event)
        host.add_lifecycle_listener(self._on_lifecycle)

    def close(self) -> None:
        self._exits.put(None)
        self.agent.close()
        for copier in list(self.copiers.values()):
            copier.stop()
        self.copiers.clear()
        self.store.close()

    def domain_name_for(self, container_id: str) -> str:
        return self.config.domain_prefix + container_id[:32]

    def network_status(self) -> tuple[bool, str, str]:
        """(ready, reason, message) for the NetworkReady condition: a valid CNI config exists."""
        return self.network.status()

    # -------------------------------------------------------------- lookups

    def lock(self, object_id: str) -> threading.Lock:
        """Serialises operations on one sandbox or container."""
        with self._locks_guard:
            return self._locks[object_id]

    def sandbox(self, given: str, field: str = "pod_sandbox_id") -> SandboxRecord:
        sid = self._resolve(self.store.sandboxes, given, "pod sandbox", field)
        return self.store.sandboxes[sid]

    def container(self, given: str, field: str = "container_id") -> ContainerRecord:
        cid = self._resolve(self.store.containers, given, "container", field)
        return self.store.containers[cid]

    def find_sandbox(self, given: str) -> SandboxRecord | None:
        found = resolve_id(list(self.store.sandboxes), given) if given else None
        return self.store.sandboxes.get(found) if isinstance(found, str) else None

    def find_container(self, given: str) -> ContainerRecord | None:
        found = resolve_id(list(self.store.containers), given) if given else None
        return self.store.containers.get(found) if isinstance(found, str) else None

    @staticmethod
    def _resolve(records: dict, given: str, kind: str, field: str) -> str:
        if not given:
            raise errors.invalid_argument(f"{field} must not be empty")
        found = resolve_id(list(records), given)
        if found is None:
            raise errors.not_found(f"{kind} {errors.show(given)} not found")
        if isinstance(found, list):
            raise errors.invalid_argument(f"{field} {errors.show(given)} is ambiguous: it matches {len(found)} {kind}s")
        return found

    def sandbox_config(self, sb: SandboxRecord) -> api_pb2.PodSandboxConfig:
        """The sandbox's config, parsed once per stored version. Shared: do not modify it."""
        return self.derived.get("config", sb, lambda _rt, r: api_pb2.PodSandboxConfig.FromString(r.config))

    def container_config(self, c: ContainerRecord) -> api_pb2.ContainerConfig:
        """The container's config, parsed once per stored version. Shared: do not modify it."""
        return self.derived.get("config", c, lambda _rt, r: api_pb2.ContainerConfig.FromString(r.config))

    # -------------------------------------------------------------- VM exits

    def _on_lifecycle(self, domain: str, event: int, _detail: int) -> None:
        # Runs on libvirt's event loop thread (or one replaying stops after a reconnect): hand over, never block.
        if domain.startswith(self.config.domain_prefix) and event in (
                libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED,
                libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            self.agent.forget(domain)
            if event != libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
                self._exits.put(domain)

    def _exit_worker(self) -> None:
        while True:
            domain = self._exits.get()
            if domain is None:
                return
            try:
                for c in list(self.store.containers.values()):
                    if c.domain_name == domain:
                        self.record_exit(c.id)
            except Exception:  # noqa: BLE001 - keep handling later exits
                log.exception("recording the exit of %s failed", domain)

    def record_exit(self, container_id: str) -> ContainerRecord | None:
        """If the container's domain is no longer running, record how it ended. Idempotent."""
        with self.store_lock():
            c = self.store.containers.get(container_id)
            if c is None or c.state != api_pb2.CONTAINER_RUNNING:
                return c
            st = self.host.state(c.domain_name)
            if st is None:
                code, reason, message = 1, "DomainLost", "the VM's libvirt domain disappeared"
            elif st[0] in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
                code, reason = exit_for(*st)
                message = ""
            else:
                return c
            c = dataclasses.replace(c, state=api_pb2.CONTAINER_EXITED, finished_at=now_ns(),
                                    exit_code=code, reason=reason, message=message)
            self.store.update_container(c)
        log.info("container %s exited: %s (%d)", c.id[:12], reason, code)
        self.stop_console(c.id)
        pod_volumes.release(vm_files(self.config.vms_dir, c.id).dir)
        self.events.container_event(self, c.id, api_pb2.CONTAINER_STOPPED_EVENT)
        return c

    def mark_sandbox_not_ready(self, sandbox_id: str) -> bool:
        """Record the sandbox NOTREADY (the kubelet then stops and recreates the pod); False if it already was
        or is gone."""
        with self.store_lock():
            sb = self.store.sandboxes.get(sandbox_id)
            if sb is None or sb.state == api_pb2.SANDBOX_NOTREADY:
                return False
            self.store.update_sandbox(dataclasses.replace(sb, state=api_pb2.SANDBOX_NOTREADY))
            return True

    def store_lock(self) -> threading.RLock:
        """Held across read-modify-write of records (the store's own lock, re-entrant)."""
        return self.store.lock

    # -------------------------------------------------------------- console

    def start_console(self, c: ContainerRecord) -> None:
        if not c.log_path or c.id in self.copiers:
            return
        files = vm_files(self.config.vms_dir, c.id)

        def progress(offset: int, cid: str = c.id) -> None:
            try:
                with self.store_lock():
                    current = self.store.containers.get(cid)
                    if current is not None and current.console_offset != offset:
                        self.store.update_container(dataclasses.replace(current, console_offset=offset))
            except errors.CRIError as e:  # the state dir's file system full: keep copying, record it next time
                log.warning("container %s: cannot record its console offset: %s", cid[:12], e.message)

        self.copiers[c.id] = ConsoleCopier(files.console_log, Path(c.log_path), c.console_offset, progress).start()

    def stop_console(self, container_id: str) -> None:
        copier = self.copiers.pop(container_id, None)
        if copier is not None:
            copier.stop()
