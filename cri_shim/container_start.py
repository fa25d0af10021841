"""StartContainer: boot the VM and start copying its console into the CRI log."""

from __future__ import annotations

import dataclasses

import libvirt

from proto.runtime.v1 import api_pb2

from . import errors
from .crashpoints import crashpoint
from .runtime import Runtime, now_ns

START_ERROR_EXIT = 128  # containerd's exit code for a container that failed to start


def start_container(rt: Runtime, req: api_pb2.StartContainerRequest) -> api_pb2.StartContainerResponse:
    c = rt.container(req.container_id)
    with rt.lock(c.id):
        c = rt.container(c.id)
        if c.state != api_pb2.CONTAINER_CREATED:
            state = api_pb2.ContainerState.Name(c.state)
            raise errors.failed_precondition(f"container {c.id} is {state}; only a CONTAINER_CREATED one can start")
        sb = rt.store.sandboxes.get(c.sandbox_id)
        if sb is None or sb.state != api_pb2.SANDBOX_READY:
            raise errors.failed_precondition(f"pod sandbox {c.sandbox_id} of container {c.id} is not ready")
        try:
            rt.host.start(c.domain_name)
        except (libvirt.libvirtError, LookupError) as e:
            with rt.store_lock():
                rt.store.update_container(dataclasses.replace(
                    rt.container(c.id), state=api_pb2.CONTAINER_EXITED, finished_at=now_ns(),
                    exit_code=START_ERROR_EXIT, reason="StartError", message=str(e)))
            rt.events.container_event(rt, c.id, api_pb2.CONTAINER_STOPPED_EVENT)
            raise errors.failed_precondition(f"cannot start the VM of container {c.id}: {e}") from None
        crashpoint("start.after-boot")
        with rt.store_lock():
            c = dataclasses.replace(rt.container(c.id), state=api_pb2.CONTAINER_RUNNING, started_at=now_ns())
            rt.store.update_container(c)
        rt.start_console(c)
        rt.events.container_event(rt, c.id, api_pb2.CONTAINER_STARTED_EVENT)
        # A guest that powered off before RUNNING was recorded had its stop event ignored.
        rt.record_exit(c.id)
    return api_pb2.StartContainerResponse()
