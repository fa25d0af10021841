"""RunPodSandbox: reserve the pod's name, check its VM settings, record it.

A VM pod's sandbox owns what the VM will join (its network, in the
networking work); the VM itself is built by CreateContainer. Annotations are
validated here already, so a pod with a bad VM setting fails at its first
step with InvalidArgument instead of half-way through.
"""

from __future__ import annotations

from proto.runtime.v1 import api_pb2

from . import errors, validation
from .annotations import AnnotationError, VMAnnotations
from .runtime import Runtime, new_id, now_ns
from .state import NameConflict, SandboxRecord

SUPPORTED_HANDLERS = ("", "vmlet", "virtlet.cloud")


def sandbox_name_key(md: api_pb2.PodSandboxMetadata) -> str:
    # containerd's reservation key: one sandbox per (name, namespace, uid, attempt).
    return "_".join((md.name, md.namespace, md.uid, str(md.attempt)))


def run_pod_sandbox(rt: Runtime, req: api_pb2.RunPodSandboxRequest) -> api_pb2.RunPodSandboxResponse:
    cfg = req.config
    if not cfg.HasField("metadata"):
        raise errors.invalid_argument("config.metadata must be set")
    md = cfg.metadata
    validation.name(md.name, "config.metadata.name")
    validation.name(md.namespace, "config.metadata.namespace")
    validation.name(md.uid, "config.metadata.uid")
    validation.log_directory(cfg.log_directory)
    if req.runtime_handler not in SUPPORTED_HANDLERS:
        raise errors.invalid_argument(f"runtime_handler {req.runtime_handler!r} is not supported "
                                      f"(vmlet serves {', '.join(repr(h) for h in SUPPORTED_HANDLERS)})")
    ns_options = cfg.linux.security_context.namespace_options
    if ns_options.network == api_pb2.NODE:
        raise errors.failed_precondition(
            "host-network pods cannot be VMs: config.linux.security_context.namespace_options.network is NODE")
    try:
        VMAnnotations.from_pod_annotations(cfg.annotations)
    except AnnotationError as e:
        raise errors.invalid_argument(str(e)) from None

    sb = SandboxRecord(id=new_id(), name_key=sandbox_name_key(md), state=api_pb2.SANDBOX_READY,
                       created_at=now_ns(), runtime_handler=req.runtime_handler, config=cfg.SerializeToString())
    try:
        rt.store.add_sandbox(sb)
    except NameConflict as e:
        raise errors.already_exists(f"pod sandbox name {e.name_key!r} is already reserved for sandbox {e.owner_id}")
    rt.events.container_event(rt, sb.id, api_pb2.CONTAINER_CREATED_EVENT)
    rt.events.container_event(rt, sb.id, api_pb2.CONTAINER_STARTED_EVENT)
    return api_pb2.RunPodSandboxResponse(pod_sandbox_id=sb.id)
