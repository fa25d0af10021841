"""StopPodSandbox and RemovePodSandbox.

Stop kills what still runs in the sandbox (the kubelet has already given the
container its grace period through StopContainer) and releases the sandbox's
resources; Remove also removes the containers, the sandbox's emptyDisks, and
forgets the sandbox. Both
are idempotent; removing an unknown sandbox succeeds, as the CRI asks.
"""

from __future__ import annotations

import shutil

from proto.runtime.v1 import api_pb2

from . import errors
from .container_stop import remove_vm, stop_vm
from .crashpoints import crashpoint
from .network import NetworkError
from .runtime import Runtime
from .storage.vm_files import pod_files


def stop_pod_sandbox(rt: Runtime, req: api_pb2.StopPodSandboxRequest) -> api_pb2.StopPodSandboxResponse:
    sb = rt.sandbox(req.pod_sandbox_id)
    with rt.lock(sb.id):
        for c in rt.store.containers_of(sb.id):
            with rt.lock(c.id):
                stop_vm(rt, c, timeout=0)  # re-reads the record under the lock
        try:
            rt.network.teardown(sb.id)  # CNI DEL, DHCP server, links; idempotent
        except NetworkError as e:
            raise errors.failed_precondition(f"pod network teardown failed (will be retried): {e}") from None
        crashpoint("sandbox-stop.after-network")
        if rt.mark_sandbox_not_ready(sb.id):
            rt.events.container_event(rt, sb.id, api_pb2.CONTAINER_STOPPED_EVENT)
    return api_pb2.StopPodSandboxResponse()


def remove_pod_sandbox(rt: Runtime, req: api_pb2.RemovePodSandboxRequest) -> api_pb2.RemovePodSandboxResponse:
    sb = rt.find_sandbox(req.pod_sandbox_id)
    if sb is None:
        return api_pb2.RemovePodSandboxResponse()
    with rt.lock(sb.id):
        for c in rt.store.containers_of(sb.id):
            with rt.lock(c.id):
                current = rt.store.containers.get(c.id)  # a RemoveContainer may have been first
                if current is not None:
                    remove_vm(rt, current)
        try:
            rt.network.remove(sb.id)  # teardown if still up, then the netns
        except NetworkError as e:
            raise errors.failed_precondition(f"pod network removal failed (will be retried): {e}") from None
        # The emptyDisks end with the pod (a crash before this line: recovery removes the directory).
        shutil.rmtree(pod_files(rt.config.pods_dir, sb.id).dir, ignore_errors=True)
        crashpoint("sandbox-remove.after-pod-files")
        if sb.id in rt.store.sandboxes:
            rt.store.delete_sandbox(sb.id)
            rt.events.container_event(rt, sb.id, api_pb2.CONTAINER_DELETED_EVENT, sandbox_id=sb.id)
    return api_pb2.RemovePodSandboxResponse()
