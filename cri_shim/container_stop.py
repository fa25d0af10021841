"""StopContainer and RemoveContainer: ACPI shutdown, destroy after the timeout, tear down.

StopContainer presses the VM's ACPI power button and gives the guest
`timeout` seconds to power off (the kubelet's grace period), then destroys
it. Both RPCs are idempotent: stopping an exited VM or removing a removed
one succeeds. Remove also works on a running VM (forcibly), as the CRI asks.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from proto.runtime.v1 import api_pb2

from . import pod_volumes, stats
from .crashpoints import crashpoint
from .runtime import Runtime
from .state import ContainerRecord
from .volumes import remove_vm_files, vm_files

log = logging.getLogger("vmlet.cri")

POLL = 0.2


def stop_vm(rt: Runtime, c: ContainerRecord, timeout: float) -> ContainerRecord:
    """Gracefully stop the container's VM within `timeout` seconds; record its exit."""
    if c.state == api_pb2.CONTAINER_CREATED:
        # Never started: nothing runs. Mark it exited so the kubelet can remove it.
        with rt.store_lock():
            c = dataclasses.replace(c, state=api_pb2.CONTAINER_EXITED, finished_at=time.time_ns(),
                                    exit_code=0, reason="NeverStarted")
            rt.store.update_container(c)
        pod_volumes.release(vm_files(rt.config.vms_dir, c.id).dir)
        return c
    if c.state != api_pb2.CONTAINER_RUNNING:
        return c
    if timeout > 0 and rt.host.is_active(c.domain_name):
        rt.host.shutdown(c.domain_name)
        crashpoint("stop.after-acpi")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and rt.host.is_active(c.domain_name):
            time.sleep(POLL)
    if rt.host.is_active(c.domain_name):
        log.info("container %s: guest did not power off within %ss; destroying it", c.id[:12], timeout)
        rt.host.destroy(c.domain_name)
    c = rt.record_exit(c.id) or c
    # The exit may have been recorded by the exit worker, still busy: the volumes are free when
    # StopContainer returns (the kubelet tears them down next).
    pod_volumes.release(vm_files(rt.config.vms_dir, c.id).dir)
    return c


def remove_vm(rt: Runtime, c: ContainerRecord) -> None:
    """Forcibly remove a container: its domain, its files, its image reference, its record."""
    rt.host.destroy(c.domain_name)
    rt.record_exit(c.id)
    rt.stop_console(c.id)
    rt.host.undefine(c.domain_name)
    crashpoint("remove.after-undefine")
    remove_vm_files(vm_files(rt.config.vms_dir, c.id))
    rt.images.release_holder(c.id)
    stats.forget(c.id)
    rt.store.delete_container(c.id)
    rt.events.container_event(rt, c.id, api_pb2.CONTAINER_DELETED_EVENT, sandbox_id=c.sandbox_id)


def stop_container(rt: Runtime, req: api_pb2.StopContainerRequest) -> api_pb2.StopContainerResponse:
    c = rt.container(req.container_id)
    with rt.lock(c.id):
        stop_vm(rt, rt.store.containers.get(c.id, c), max(0, req.timeout))
    return api_pb2.StopContainerResponse()


def remove_container(rt: Runtime, req: api_pb2.RemoveContainerRequest) -> api_pb2.RemoveContainerResponse:
    c = rt.find_container(req.container_id)
    if c is None:
        return api_pb2.RemoveContainerResponse()  # already removed: not an error (CRI)
    with rt.lock(c.id):
        current = rt.store.containers.get(c.id)
        if current is not None:
            remove_vm(rt, current)
    return api_pb2.RemoveContainerResponse()
