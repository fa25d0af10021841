"""ContainerStatus and ListContainers (and its streaming twin)."""

from __future__ import annotations

import json
import time

from proto.runtime.v1 import api_pb2

from .storage import disks as vm_disks
from .storage import pod_volumes
from .filters import container_matches
from .runtime import Runtime
from .state import ContainerRecord
from .storage.vm_files import vm_files


def _resources(cfg: api_pb2.ContainerConfig) -> api_pb2.ContainerResources:
    res = api_pb2.ContainerResources()
    if cfg.linux.HasField("resources"):
        res.linux.CopyFrom(cfg.linux.resources)
    return res


def to_status(rt: Runtime, c: ContainerRecord) -> api_pb2.ContainerStatus:
    cfg = rt.container_config(c)
    return api_pb2.ContainerStatus(
        id=c.id, metadata=cfg.metadata, state=c.state,
        created_at=c.created_at, started_at=c.started_at, finished_at=c.finished_at,
        exit_code=c.exit_code, reason=c.reason, message=c.message,
        image=api_pb2.ImageSpec(image=c.image, annotations=cfg.image.annotations),
        image_ref=c.image_ref, image_id=c.image_ref,
        labels=cfg.labels, annotations=cfg.annotations, mounts=cfg.mounts,
        log_path=c.log_path, resources=_resources(cfg))


def to_list_item(rt: Runtime, c: ContainerRecord) -> api_pb2.Container:
    return rt.derived.get("list-item", c, _build_list_item)


def _build_list_item(rt: Runtime, c: ContainerRecord) -> api_pb2.Container:
    cfg = rt.container_config(c)
    return api_pb2.Container(
        id=c.id, pod_sandbox_id=c.sandbox_id, metadata=cfg.metadata,
        image=api_pb2.ImageSpec(image=c.image), image_ref=c.image_ref, image_id=c.image_ref,
        state=c.state, created_at=c.created_at, labels=cfg.labels, annotations=cfg.annotations)


def _guest_facts(rt: Runtime, c: ContainerRecord) -> dict:
    """What the guest agent told (cached; refreshed in the background, never waited on here)."""
    if c.state != api_pb2.CONTAINER_RUNNING:
        return {"connected": False}
    connected = rt.agent.connected(c.domain_name)
    facts = rt.agent.facts(c.domain_name)
    out: dict = {"connected": connected if connected is not None else bool(facts and not facts.error)}
    if facts is not None:
        # KubeVirt's names (status.guestOSInfo, status.interfaces).
        out["guestOSInfo"] = facts.os
        out["hostname"] = facts.hostname
        out["interfaces"] = facts.interfaces
        out["ageSeconds"] = round(max(0.0, time.monotonic() - facts.fetched_at), 1)
        if facts.error:
            out["error"] = facts.error
    return out


def container_status(rt: Runtime, req: api_pb2.ContainerStatusRequest) -> api_pb2.ContainerStatusResponse:
    c = rt.container(req.container_id)
    if c.state == api_pb2.CONTAINER_RUNNING:
        c = rt.record_exit(c.id) or c  # catch an exit whose event was missed
    resp = api_pb2.ContainerStatusResponse(status=to_status(rt, c))
    if req.verbose:
        files = vm_files(rt.config.vms_dir, c.id)
        try:
            disks = vm_disks.load(files.disks_record)
        except vm_disks.DiskBuildError:
            disks = []
        resp.info["info"] = json.dumps({
            "sandboxID": c.sandbox_id,
            "domain": c.domain_name,
            "domainUUID": c.domain_uuid,
            "domainType": rt.domain_type,
            "vmDir": str(files.dir),
            "rootDisk": next((d.path for d in disks if d.root), str(files.root_disk)),
            "cloudInitImage": str(files.cloud_init_iso),
            "consoleLog": str(files.console_log),
            # Pod volumes: directories shared over virtio-fs, and the mounts a VM can't take (files).
            "volumes": pod_volumes.read_record(files.volumes_record),
            # Disks from the pod's volumes (docs/storage.md): kind, guest target and serial, what libvirt opens.
            "disks": [{"name": d.name, "kind": d.kind, "target": d.target, "serial": d.serial, "bus": d.bus,
                       "path": d.path, "hostPath": d.host_path, "format": d.format, "readOnly": d.readonly,
                       "persistent": d.persistent, "root": d.root, "imageDigest": d.digest} for d in disks],
            # libvirt places QEMU in its own machine partition; the kubelet's cgroup parent for the pod
            # is not used (see README: resources). Reported so an operator sees where the VM's CPU goes.
            "cgroupParent": rt.sandbox_config(rt.store.sandboxes[c.sandbox_id]).linux.cgroup_parent
            if c.sandbox_id in rt.store.sandboxes else "",
            "cgroupPlacement": "libvirt machine partition (/machine); CPU and memory limits enforced by "
                               "libvirt's <cputune> and the VM's memory size",
            "guestAgent": _guest_facts(rt, c),
        }, sort_keys=True)
    return resp


def list_containers(rt: Runtime, flt: api_pb2.ContainerFilter | None) -> list[api_pb2.Container]:
    _, containers = rt.store.snapshot()
    out = [to_list_item(rt, c) for c in containers if container_matches(rt, c, flt)]
    out.sort(key=lambda c: c.created_at)
    return out


def list_containers_rpc(rt: Runtime, req: api_pb2.ListContainersRequest) -> api_pb2.ListContainersResponse:
    return api_pb2.ListContainersResponse(containers=list_containers(rt, req.filter if req.HasField("filter") else None))
