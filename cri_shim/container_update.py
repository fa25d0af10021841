"""UpdateContainerResources, UpdatePodSandboxResources, ReopenContainerLog.

Memory changes go to a running VM through its balloon, within the memory it
was booted with (libvirt cannot hot-add beyond the domain's maximum); vCPU
count changes need a reboot and are refused with a message saying so. CPU
quota/period go to libvirt's scheduler parameters where the host's cgroups
allow. The new limits are also recorded so ContainerStatus reports them.
The values follow the same rule as CreateContainer (validation.memory_limit,
validation.cpu_limit) and libvirt's refusals map the same way
(errors.from_libvirt).
"""

from __future__ import annotations

import dataclasses
import math

import libvirt

from proto.runtime.v1 import api_pb2

from . import errors, host_caps, validation
from .runtime import Runtime

MIB = 1024 * 1024


def _apply_live(rt: Runtime, domain: str, current: api_pb2.LinuxContainerResources, memory: int,
                cpu_limit: tuple[int, int]) -> None:
    dom = rt.host.lookup(domain)
    if dom is None or not dom.isActive():
        return
    if memory and memory != current.memory_limit_in_bytes:
        kib = math.ceil(memory / 1024)
        max_kib = dom.maxMemory()
        if kib > max_kib:
            raise errors.failed_precondition(
                f"memory_limit_in_bytes {memory}: a running VM cannot grow beyond the "
                f"{max_kib // 1024} MiB it was started with; restart the pod to change it")
        try:
            dom.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise errors.from_libvirt(e, "cannot change the VM's memory") from None
    period, quota = cpu_limit
    if quota:
        vcpus = dom.maxVcpus()
        wanted = max(1, math.ceil(quota / period))
        if wanted != vcpus:
            raise errors.failed_precondition(
                f"the CPU limit asks for {wanted} vCPUs but the VM has {vcpus}; vmlet does not hot-plug vCPUs, "
                "restart the pod to change it")
        try:
            dom.setSchedulerParametersFlags({"global_period": period, "global_quota": quota},
                                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise errors.from_libvirt(e, "cannot apply the CPU quota to the VM") from None


def update_container_resources(rt: Runtime, req: api_pb2.UpdateContainerResourcesRequest
                               ) -> api_pb2.UpdateContainerResourcesResponse:
    c = rt.container(req.container_id)
    if not req.HasField("linux"):
        return api_pb2.UpdateContainerResourcesResponse()
    try:
        max_memory = host_caps.for_runtime(rt).memory_bytes
    except libvirt.libvirtError as e:
        raise errors.from_libvirt(e, "cannot read the host's domain capabilities") from None
    memory = validation.memory_limit(req.linux.memory_limit_in_bytes, "linux.memory_limit_in_bytes", max_memory)
    cpu_limit = validation.cpu_limit(req.linux.cpu_period, req.linux.cpu_quota, "linux")
    with rt.lock(c.id):
        c = rt.container(c.id)
        if c.state not in (api_pb2.CONTAINER_CREATED, api_pb2.CONTAINER_RUNNING):
            raise errors.failed_precondition(f"container {c.id} has exited; its resources cannot change")
        cfg = api_pb2.ContainerConfig()
        cfg.CopyFrom(rt.container_config(c))  # the parsed config is shared: change a copy
        if c.state == api_pb2.CONTAINER_RUNNING:
            try:
                _apply_live(rt, c.domain_name, cfg.linux.resources, memory, cpu_limit)
            except libvirt.libvirtError as e:  # looking the domain up; the changes map their own
                raise errors.from_libvirt(e, "cannot update the VM's resources") from None
        elif memory or cpu_limit[1]:
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
