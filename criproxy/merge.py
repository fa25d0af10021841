"""Pure merging of the backends' answers into the one answer the kubelet gets.

Lists merge by concatenating serialized responses: in the protobuf wire format,
concatenated messages parse as one message whose repeated fields are appended in
order, so the default backend's response bytes are never decoded, and fields the
proxy does not know survive untouched. Everything here is pure.
"""

from __future__ import annotations

from typing import Sequence

from proto.runtime.v1 import api_pb2

RUNTIME_READY = "RuntimeReady"
NETWORK_READY = "NetworkReady"
REQUIRED_CONDITIONS = (RUNTIME_READY, NETWORK_READY)


def concat(parts: Sequence[bytes]) -> bytes:
    """Merge list responses (repeated fields only) given in the order default first."""
    return b"".join(parts)


def status(parts: Sequence[tuple[str, api_pb2.StatusResponse | None, str]], default: str) -> api_pb2.StatusResponse:
    """Merge Status answers: [(backend, response or None when it failed, error text)].

    A condition is true only if it is true on every backend; when false, its reason and
    message name each failing backend. A backend that did not answer counts as false for
    RuntimeReady and NetworkReady. runtime_handlers: the default's, then other backends'
    handlers with new names; features: the default's. Verbose info keys of non-default
    backends are prefixed `<backend>/`.
    """
    order: list[str] = []
    conds: dict[str, list[tuple[str, api_pb2.RuntimeCondition]]] = {}
    out = api_pb2.StatusResponse()
    handler_names: set[str] = set()
    for backend, resp, error in parts:
        if resp is None:
            for t in REQUIRED_CONDITIONS:
                c = api_pb2.RuntimeCondition(type=t, status=False, reason="BackendUnavailable",
                                             message=error)
                conds.setdefault(t, []).append((backend, c))
                if t not in order:
                    order.append(t)
            continue
        for c in resp.status.conditions:
            conds.setdefault(c.type, []).append((backend, c))
            if c.type not in order:
                order.append(c.type)
        for k, v in resp.info.items():
            out.info[k if backend == default else f"{backend}/{k}"] = v
        for h in resp.runtime_handlers:
            if h.name not in handler_names:
                handler_names.add(h.name)
                out.runtime_handlers.append(h)
        if backend == default and resp.HasField("features"):
            out.features.CopyFrom(resp.features)
    answered = [b for b, r, _ in parts if r is not None]
    for t in order:
        seen = conds[t]
        seen_backends = {b for b, _ in seen}
        failing = [(b, c) for b, c in seen if not c.status]
        # A required condition a backend did not report at all is not true there.
        if t in REQUIRED_CONDITIONS:
            failing += [(b, api_pb2.RuntimeCondition(type=t, status=False, reason="ConditionMissing",
                                                     message=f"{t} not reported"))
                        for b in answered if b not in seen_backends]
        if not failing:
            out.status.conditions.append(api_pb2.RuntimeCondition(type=t, status=True))
            continue
        if len(failing) == 1:
            b, c = failing[0]
            reason = c.reason
        else:
            reason = "MultipleBackends"
        message = "; ".join(f"backend {b}: {c.reason}{': ' + c.message if c.message else ''}" for b, c in failing)
        out.status.conditions.append(api_pb2.RuntimeCondition(type=t, status=False, reason=reason, message=message))
    return out


def imagefs(parts: Sequence[api_pb2.ImageFsInfoResponse]) -> api_pb2.ImageFsInfoResponse:
    """ImageFsInfo: every backend's filesystems, default first (the kubelet reads the first
    entry for its image GC thresholds); entries with a mountpoint already listed are summed
    into it so one filesystem is not counted twice."""
    out = api_pb2.ImageFsInfoResponse()
    for field in ("image_filesystems", "container_filesystems"):
        seen: dict[str, api_pb2.FilesystemUsage] = {}
        target = getattr(out, field)
        for resp in parts:
            for fs in getattr(resp, field):
                key = fs.fs_id.mountpoint
                if key and key in seen:
                    s = seen[key]
                    s.used_bytes.value += fs.used_bytes.value
                    s.inodes_used.value += fs.inodes_used.value
                    continue
                target.append(fs)
                if key:
                    seen[key] = target[-1]
    return out


def metric_descriptors(parts: Sequence[api_pb2.ListMetricDescriptorsResponse]) -> api_pb2.ListMetricDescriptorsResponse:
    """Descriptors are per metric name: the first backend's wins."""
    out = api_pb2.ListMetricDescriptorsResponse()
    names: set[str] = set()
    for resp in parts:
        for d in resp.descriptors:
            if d.name not in names:
                names.add(d.name)
                out.descriptors.append(d)
    return out
