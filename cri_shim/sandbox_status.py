"""PodSandboxStatus and ListPodSandbox (and its streaming twin)."""

from __future__ import annotations

import json

from google.protobuf import json_format

from proto.runtime.v1 import api_pb2

from . import container_status
from .filters import sandbox_matches
from .runtime import Runtime
from .state import SandboxRecord


def to_status(rt: Runtime, sb: SandboxRecord) -> api_pb2.PodSandboxStatus:
    cfg = rt.sandbox_config(sb)
    status = api_pb2.PodSandboxStatus(
        id=sb.id, metadata=cfg.metadata, state=sb.state, created_at=sb.created_at,
        labels=cfg.labels, annotations=cfg.annotations, runtime_handler=sb.runtime_handler)
    if sb.ips:
        status.network.ip = sb.ips[0]
        status.network.additional_ips.extend(api_pb2.PodIP(ip=ip) for ip in sb.ips[1:])
    ns = status.linux.namespaces.options
    ns.network = api_pb2.POD
    ns.pid = api_pb2.POD
    ns.ipc = api_pb2.POD
    return status


def to_list_item(rt: Runtime, sb: SandboxRecord) -> api_pb2.PodSandbox:
    return rt.derived.get("list-item", sb, _build_list_item)


def _build_list_item(rt: Runtime, sb: SandboxRecord) -> api_pb2.PodSandbox:
    cfg = rt.sandbox_config(sb)
    return api_pb2.PodSandbox(id=sb.id, metadata=cfg.metadata, state=sb.state, created_at=sb.created_at,
                              labels=cfg.labels, annotations=cfg.annotations, runtime_handler=sb.runtime_handler)


def pod_sandbox_status(rt: Runtime, req: api_pb2.PodSandboxStatusRequest) -> api_pb2.PodSandboxStatusResponse:
    sb = rt.sandbox(req.pod_sandbox_id)
    resp = api_pb2.PodSandboxStatusResponse(status=to_status(rt, sb))
    for c in rt.store.containers_of(sb.id):
        resp.containers_statuses.append(container_status.to_status(rt, c))
    if req.verbose:
        resp.info["info"] = json.dumps({
            "id": sb.id,
            "runtimeHandler": sb.runtime_handler,
            "netns": sb.netns,
            "ips": sb.ips,
            "containers": [c.id for c in rt.store.containers_of(sb.id)],
            "config": json.loads(_to_json(rt.sandbox_config(sb))),
        }, sort_keys=True)
    return resp


def _to_json(msg) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=False)


def list_sandboxes(rt: Runtime, flt: api_pb2.PodSandboxFilter | None) -> list[api_pb2.PodSandbox]:
    sandboxes, _ = rt.store.snapshot()
    out = [to_list_item(rt, sb) for sb in sandboxes if sandbox_matches(rt, sb, flt)]
    out.sort(key=lambda s: s.created_at)
    return out


def list_pod_sandbox(rt: Runtime, req: api_pb2.ListPodSandboxRequest) -> api_pb2.ListPodSandboxResponse:
    return api_pb2.ListPodSandboxResponse(items=list_sandboxes(rt, req.filter if req.HasField("filter") else None))
