"""StartContainer: boot the VM and start copying its console into the CRI log."""

from __future__ import annotations

import dataclasses
import time

import libvirt

from proto.runtime.v1 import api_pb2

from . import errors
from .storage import disks as vm_disks
from .storage import pod_volumes
from .crashpoints import crashpoint
from .runtime import Runtime, now_ns
from .storage.vm_files import vm_files

START_ERROR_EXIT = 128  # containerd's exit code for a container that failed to start
RECONNECT_WAIT = 15.0  # seconds StartContainer waits for a restarting libvirtd


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
        files = vm_files(rt.config.vms_dir, c.id)
        try:
            # The read-only bind mounts made at create time are gone after a host reboot.
            pod_volumes.prepare(files.dir, pod_volumes.load(files.volumes_record)[0])
            vm_disks.rebind(files)
            rt.host.start(c.domain_name)
        except libvirt.libvirtError as e:
            # libvirtd restarting under the call: the domain may have booted before the answer was lost.
            # The kubelet never repeats a StartContainer (it creates a new container), so settle it here.
            unreachable = errors.libvirt_unreachable(e)
            if not (unreachable and _start_after_reconnect(rt, c.domain_name)):
                _start_failed(rt, c.id, files, e)
                if unreachable:
                    raise errors.unavailable(f"cannot start the VM of container {c.id}: libvirtd is not reachable: "
                                             f"{e}") from None
                raise errors.failed_precondition(f"cannot start the VM of container {c.id}: {e}") from None
        except (LookupError, OSError, pod_volumes.VolumeMountError, vm_disks.DiskBuildError) as e:
            _start_failed(rt, c.id, files, e)
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


def _start_after_reconnect(rt: Runtime, domain: str) -> bool:
    """Once libvirtd answers again (within RECONNECT_WAIT), start the domain unless it already runs."""
    deadline = time.monotonic() + RECONNECT_WAIT
    while time.monotonic() < deadline:
        try:
            rt.host.start(domain)  # idempotent: a domain that booted before the connection broke is left alone
            return True
        except libvirt.libvirtError as e:
            if not errors.libvirt_unreachable(e):
                return False
            time.sleep(0.5)
    return False


def _start_failed(rt: Runtime, container_id: str, files, e: BaseException) -> None:
    """The VM cannot start: the container exits with StartError, as containerd's does."""
    pod_volumes.release(files.dir)
    with rt.store_lock():
        rt.store.update_container(dataclasses.replace(
            rt.container(container_id), state=api_pb2.CONTAINER_EXITED, finished_at=now_ns(),
            exit_code=START_ERROR_EXIT, reason="StartError", message=str(e)))
    rt.events.container_event(rt, container_id, api_pb2.CONTAINER_STOPPED_EVENT)
