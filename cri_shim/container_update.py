"""UpdateContainerResources, UpdatePodSandboxResources, ReopenContainerLog.

Memory changes go to a running VM through its balloon, within the memory it
was booted with (libvirt cannot hot-add beyond the domain's maximum); vCPU
count changes need a reboot and are refused with a message saying so. CPU
quota/period go to libvirt's scheduler parameters where the host's cgroups
allow. The new limits are also recorded so ContainerStatus reports them.
"""

from __future__ import annotations

import dataclasses
import math

import libvirt

from proto.runtime.v1 import api_pb2

from . import errors
from .runtime import Runtime

MIB = 1024 * 1024


def _apply_live(rt: Runtime, domain: str, current: api_pb2.LinuxContainerResources,
                new: api_pb2.LinuxContainerResources, vcpus: int) -> None:
    dom = rt.host.lookup(domain)
    if dom is None or not dom.isActive():
        return
    if new.memory_limit_in_bytes > 0 and new.memory_limit_in_bytes != current.memory_limit_in_bytes:
        kib = math.ceil(new.memory_limit_in_bytes / 1024)
        max_kib = dom.maxMemory()
        if kib > max_kib:
            raise errors.failed_precondition(
                f"memory_limit_in_bytes {new.memory_limit_in_bytes}: a running VM cannot grow beyond the "
                f"{max_kib // 1024} MiB it was started with; restart the pod to change it")
        try:
            dom.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise errors.failed_precondition(f"cannot change the VM's memory: {e}") from None
    if new.cpu_quota > 0 and new.cpu_period > 0:
        wanted = max(1, math.ceil(new.cpu_quota / new.cpu_period))
        if wanted != vcpus:
            raise errors.failed_precondition(
                f"the CPU limit asks for {wanted} vCPUs but the VM has {vcpus}; vmlet does not hot-plug vCPUs, "
                "restart the pod to change it")
        try:
            dom.setSchedulerParametersFlags({"global_period": new.cpu_period, "global_quota": new.cpu_quota},
                                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise errors.failed_precondition(f"cannot apply the CPU quota to the VM: {e}") from None


def update_container_resources(rt: Runtime, req: api_pb2.UpdateContainerResourcesRequest
                               ) -> api_pb2.UpdateContainerResourcesResponse:
    c = rt.container(req.container_id)
    if not req.HasField("linux"):
        return api_pb2.UpdateContainerResourcesResponse()
    with rt.lock(c.id):
        c = rt.container(c.id)
        if c.state not in (api_pb2.CONTAINER_CREATED, api_pb2.CONTAINER_RUNNING):
            raise errors.failed_precondition(f"container {c.id} has exited; its resources cannot change")
        cfg = api_pb2.ContainerConfig()
        cfg.CopyFrom(rt.container_config(c))  # the parsed config is shared: change a copy
        dom = rt.host.lookup(c.domain_name)
        vcpus = dom.maxVcpus() if dom is not None and dom.isActive() else 0
        if c.state == api_pb2.CONTAINER_RUNNING:
            _apply_live(rt, c.domain_name, cfg.linux.resources, req.linux, vcpus)
        elif req.linux.memory_limit_in_bytes or req.linux.cpu_quota:
            raise errors.failed_precondition(
                f"container {c.id} is created but not started; its VM definition is fixed at creation")
        cfg.linux.resources.CopyFrom(req.linux)
        with rt.store_lock():
            rt.store.update_container(dataclasses.replace(rt.container(c.id), config=cfg.SerializeToString()))
    return api_pb2.UpdateContainerResourcesResponse()


def update_pod_sandbox_resources(rt: Runtime, req: api_pb2.UpdatePodSandboxResourcesRequest
                                 ) -> api_pb2.UpdatePodSandboxResourcesResponse:
    # A VM pod's resources are its one container's: the kubelet updates those
    # through UpdateContainerResources. The sandbox itself holds none.
    rt.sandbox(req.pod_sandbox_id)
    return api_pb2.UpdatePodSandboxResourcesResponse()


def reopen_container_log(rt: Runtime, req: api_pb2.ReopenContainerLogRequest) -> api_pb2.ReopenContainerLogResponse:
    c = rt.container(req.container_id)
    if c.state != api_pb2.CONTAINER_RUNNING:
        raise errors.failed_precondition(f"container {c.id} is not running; its log cannot be reopened")
    copier = rt.copiers.get(c.id)
    if copier is not None:
        copier.reopen()
    return api_pb2.ReopenContainerLogResponse()
