"""StopContainer and RemoveContainer: ACPI shutdown, destroy at the deadline, tear down.

StopContainer presses the VM's ACPI power button and gives the guest
`timeout` seconds to power off (the kubelet's grace period), then destroys
it. The press is repeated every PRESS_INTERVAL seconds: a guest still in its
boot loader, or before its acpid runs, loses a press, and one lost press would
cost the whole grace period.

A stop is one background job per VM (`VMStop`), shared by every caller, and
no call holds the container's lock while the guest takes its time:
- a later stop with an earlier deadline moves the job's deadline forward (a
  `kubectl delete --grace-period=0 --force` after a graceful delete: destroy
  now, and the first call returns too);
- RemoveContainer and StopPodSandbox force it (deadline now) instead of
  waiting out the grace period;
- a caller whose client went away stops waiting; the job still destroys the
  VM at its deadline.
Both RPCs are idempotent: stopping an exited VM or removing a removed one
succeeds. Remove also works on a running VM (forcibly), as the CRI asks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from proto.runtime.v1 import api_pb2

from . import stats
from .storage import pod_volumes
from .crashpoints import crashpoint
from .runtime import Runtime
from .state import ContainerRecord
from .storage.vm_files import remove_vm_files, vm_files

log = logging.getLogger("vmlet.cri")

POLL = 0.2
PRESS_INTERVAL = 2.0  # seconds between ACPI presses while the guest has not powered off

ClientActive = Callable[[], bool]


class VMStop:
    """The stop of one VM in progress: ACPI presses until the guest is off or the deadline, then destroy."""

    def __init__(self, rt: Runtime, c: ContainerRecord, deadline: float) -> None:
        self.rt, self.container_id, self.domain = rt, c.id, c.domain_name
        self.deadline = deadline
        self._changed = threading.Condition()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def hasten(self, deadline: float) -> None:
        """Move the deadline forward (never back: the shortest grace period asked for wins)."""
        with self._changed:
            if deadline < self.deadline:
                self.deadline = deadline
                self._changed.notify_all()

    def run(self) -> None:
        try:
            self._stop()
        except BaseException as e:  # noqa: BLE001 - handed to the callers waiting
            self.error = e
            log.exception("stopping container %s failed", self.container_id[:12])
        finally:
            with self.rt.stops_guard:
                if self.rt.stops.get(self.container_id) is self:
                    del self.rt.stops[self.container_id]
            self.done.set()

    def _stop(self) -> None:
        host = self.rt.host
        next_press = 0.0
        while host.is_active(self.domain):
            now = time.monotonic()
            with self._changed:
                deadline = self.deadline
            if now >= deadline:
                break
            if now >= next_press:
                host.shutdown(self.domain)
                crashpoint("stop.after-acpi")
                next_press = now + PRESS_INTERVAL
            with self._changed:
                if self.deadline == deadline:
                    self._changed.wait(max(0.0, min(POLL, self.deadline - now, next_press - now)))
        if host.is_active(self.domain):
            log.info("container %s: guest did not power off by its deadline; destroying it", self.container_id[:12])
            host.destroy(self.domain)
        self.rt.record_exit(self.container_id)
        # The exit may have been recorded by the exit worker, still busy: the volumes are free when
        # StopContainer returns (the kubelet tears them down next).
        pod_volumes.release(vm_files(self.rt.config.vms_dir, self.container_id).dir)

    def wait(self, client_active: ClientActive | None = None) -> bool:
        """Wait until the VM is stopped; False if the client went away first (the stop goes on)."""
        while not self.done.wait(POLL):
            if client_active is not None and not client_active():
                return False
        if self.error is not None:
            raise self.error
        return True


def request_stop(rt: Runtime, c: ContainerRecord, timeout: float) -> VMStop | None:
    """Start the VM's stop, or bring a running one's deadline forward. Call with the container's lock held.

    None when nothing runs (a created container is marked exited here)."""
    c = rt.store.containers.get(c.id)  # callers may hold a record read before they got the lock
    if c is None:
        return None
    if c.state == api_pb2.CONTAINER_CREATED:
        # Never started: nothing runs. Mark it exited so the kubelet can remove it.
        with rt.store_lock():
            c = dataclasses.replace(c, state=api_pb2.CONTAINER_EXITED, finished_at=time.time_ns(),
                                    exit_code=0, reason="NeverStarted")
            rt.store.update_container(c)
        pod_volumes.release(vm_files(rt.config.vms_dir, c.id).dir)
        return None
    if c.state != api_pb2.CONTAINER_RUNNING:
        return None
    deadline = time.monotonic() + max(0.0, timeout)
    with rt.stops_guard:
        stop = rt.stops.get(c.id)
        if stop is not None:
            stop.hasten(deadline)
            return stop
        stop = rt.stops[c.id] = VMStop(rt, c, deadline)
    threading.Thread(target=stop.run, name=f"stop-{c.id[:12]}", daemon=True).start()
    return stop


def stop_vm(rt: Runtime, c: ContainerRecord, timeout: float) -> None:
    """Stop the container's VM within `timeout` seconds and wait for it; the container's lock is held."""
    stop = request_stop(rt, c, timeout)
    if stop is not None:
        stop.wait()


def remove_vm(rt: Runtime, c: ContainerRecord) -> None:
    """Forcibly remove a container: its domain, its files, its image reference, its record."""
    stop_vm(rt, c, timeout=0)  # also ends a graceful stop still waiting for the guest
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


def stop_container(rt: Runtime, req: api_pb2.StopContainerRequest,
                   client_active: ClientActive | None = None) -> api_pb2.StopContainerResponse:
    c = rt.container(req.container_id)
    with rt.lock(c.id):  # only to start the stop: the wait for the guest holds no lock
        stop = request_stop(rt, c, req.timeout)
    if stop is not None:
        stop.wait(client_active)
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
