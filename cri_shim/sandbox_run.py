"""RunPodSandbox: check the pod's VM settings, set up its network, record it.

A VM pod's sandbox owns what the VM joins: a network namespace where CNI runs,
whose address is handed to the VM (cri_shim/network, docs/networking.md); the
VM itself is built by CreateContainer. Annotations are validated first, so a
pod with a bad VM setting fails at its first step with InvalidArgument.
The network is set up before the sandbox is recorded: a crash in between
leaves a network of an unknown sandbox, which the next start sweeps away.
"""

from __future__ import annotations

from proto.runtime.v1 import api_pb2

from . import errors, validation
from .annotations import AnnotationError, VMAnnotations
from .crashpoints import crashpoint
from .network import DNSSettings, NetworkError
from .runtime import Runtime, new_id, now_ns
from .state import SandboxRecord

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
    validation.path(cfg.linux.cgroup_parent, "config.linux.cgroup_parent")
    validation.dns_config(cfg.dns_config.servers, cfg.dns_config.searches, cfg.dns_config.options)
    if req.runtime_handler not in SUPPORTED_HANDLERS:
        raise errors.invalid_argument(f"runtime_handler {errors.show(req.runtime_handler)} is not supported "
                                      f"(vmlet serves {', '.join(repr(h) for h in SUPPORTED_HANDLERS)})")
    ns_options = cfg.linux.security_context.namespace_options
    if ns_options.network == api_pb2.NODE:
        raise errors.failed_precondition(
            "host-network pods cannot be VMs: config.linux.security_context.namespace_options.network is NODE")
    try:
        vm = VMAnnotations.from_pod_annotations(cfg.annotations)
    except AnnotationError as e:
        raise errors.invalid_argument(str(e)) from None
    dns = DNSSettings.of(cfg.dns_config.servers, cfg.dns_config.searches, cfg.dns_config.options)

    name_key = sandbox_name_key(md)
    with rt.lock("sandbox-name:" + name_key):
        owner = next((s.id for s in rt.store.sandboxes.values() if s.name_key == name_key), None)
        if owner:
            raise errors.already_exists(f"pod sandbox name {errors.show(name_key, 300)} is already reserved for "
                                        f"sandbox {owner}")
        sandbox_id = new_id()
        try:
            network = rt.network.setup(sandbox_id, pod_namespace=md.namespace, pod_name=md.name, pod_uid=md.uid,
                                       dns=dns, hostname=validation.hostname(cfg.hostname or md.name),
                                       binding=vm.network_binding)
        except NetworkError as e:
            raise errors.failed_precondition(f"pod network setup failed: {e}") from None
        except ValueError as e:
            raise errors.invalid_argument(f"pod network: {e}") from None
        crashpoint("run.after-network")
        sb = SandboxRecord(id=sandbox_id, name_key=name_key, state=api_pb2.SANDBOX_READY, created_at=now_ns(),
                           runtime_handler=req.runtime_handler, config=cfg.SerializeToString(),
                           ips=[network.pod_ip, *network.additional_ips], netns=network.netns_path)
        try:
            rt.store.add_sandbox(sb)
        except BaseException:
            rt.network.remove(sandbox_id)
            raise
    rt.events.container_event(rt, sb.id, api_pb2.CONTAINER_CREATED_EVENT)
    rt.events.container_event(rt, sb.id, api_pb2.CONTAINER_STARTED_EVENT)
    return api_pb2.RunPodSandboxResponse(pod_sandbox_id=sb.id)
