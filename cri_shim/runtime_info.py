"""Version, Status, RuntimeConfig, UpdateRuntimeConfig."""

from __future__ import annotations

import json

from proto.runtime.v1 import api_pb2

from .main import package_version
from .runtime import Runtime

CRI_VERSION = "0.1.0"  # the kubelet checks this value for the v1 API
RUNTIME_NAME = "vmlet"


def version(_rt: Runtime, _req: api_pb2.VersionRequest) -> api_pb2.VersionResponse:
    return api_pb2.VersionResponse(version=CRI_VERSION, runtime_name=RUNTIME_NAME,
                                   runtime_version=package_version(), runtime_api_version="v1")


def status(rt: Runtime, req: api_pb2.StatusRequest) -> api_pb2.StatusResponse:
    ok, why = rt.host.alive()
    runtime_ready = api_pb2.RuntimeCondition(type="RuntimeReady", status=ok)
    if not ok:
        runtime_ready.reason = "LibvirtUnavailable"
        runtime_ready.message = f"libvirtd at {rt.config.libvirt_uri} is not answering: {why}"
    network_ready, reason, message = rt.network_status()
    network = api_pb2.RuntimeCondition(type="NetworkReady", status=network_ready, reason=reason, message=message)
    resp = api_pb2.StatusResponse(status=api_pb2.RuntimeStatus(conditions=[runtime_ready, network]))
    resp.runtime_handlers.append(api_pb2.RuntimeHandler(name=""))
    if req.verbose:
        resp.info["config"] = json.dumps({
            "libvirtURI": rt.config.libvirt_uri, "stateDir": str(rt.config.state_dir),
            "accelerator": rt.config.accelerator, "domainType": rt.domain_type,
            "podCIDR": rt.pod_cidr,
        }, sort_keys=True)
    return resp


def runtime_config(_rt: Runtime, _req: api_pb2.RuntimeConfigRequest) -> api_pb2.RuntimeConfigResponse:
    # vmlet does not use systemd to place VMs; libvirt manages their cgroups itself.
    return api_pb2.RuntimeConfigResponse(linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=api_pb2.CGROUPFS))


def update_runtime_config(rt: Runtime, req: api_pb2.UpdateRuntimeConfigRequest) -> api_pb2.UpdateRuntimeConfigResponse:
    rt.pod_cidr = req.runtime_config.network_config.pod_cidr
    return api_pb2.UpdateRuntimeConfigResponse()
