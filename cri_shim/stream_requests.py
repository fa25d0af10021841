"""Exec, Attach, PortForward: the RPCs that answer a URL of the streaming server (cri_shim/streaming/).

Each is the kubelet's story: validate the request (the streaming server's
rules: a container and a command, one of stdin/stdout/stderr, no stderr
with a tty), ask the runtime whether it can be done now (the container's
guest agent, its console, the sandbox's network: a refusal here is the
RPC's error, not a broken stream later), cache the request under a
single-use token and answer the URL. The session itself runs when the
client connects, through `RuntimeAdapter`.

The daemon puts its `StreamingServer` on the runtime as `rt.streaming`;
without one the RPCs are UNAVAILABLE.
"""

from __future__ import annotations

from proto.runtime.v1 import api_pb2

from . import errors
from .streaming import server as streaming_server


class RuntimeAdapter:
    """The streaming server's runtime: binds `rt` to the session functions (imported when a session starts)."""

    def __init__(self, rt) -> None:
        self.rt = rt

    def exec(self, container_id: str, cmd: list[str], session) -> int:
        from .container_exec import exec_stream
        return exec_stream(self.rt, container_id, cmd, session)

    def attach(self, container_id: str, session) -> None:
        from .console_attach import attach_stream
        attach_stream(self.rt, container_id, session)

    def port_forward(self, pod_sandbox_id: str, port: int, stream) -> None:
        from .port_forward import forward_stream
        forward_stream(self.rt, pod_sandbox_id, port, stream)


def start_server(rt, config: streaming_server.ServerConfig) -> streaming_server.StreamingServer:
    server = streaming_server.StreamingServer(RuntimeAdapter(rt), config).start()
    rt.streaming = server
    return server


def _server(rt, what: str) -> streaming_server.StreamingServer:
    server = getattr(rt, "streaming", None)
    if server is None:
        raise errors.unavailable(f"{what}: the streaming server is not running")
    return server


def exec_(rt, req: api_pb2.ExecRequest) -> api_pb2.ExecResponse:
    server = _server(rt, "Exec")
    streaming_server.validate_exec(req)
    from .container_exec import check_exec
    check_exec(rt, req.container_id, list(req.cmd), req.tty, req.stdin)
    return api_pb2.ExecResponse(url=server.get_exec(req))


def attach(rt, req: api_pb2.AttachRequest) -> api_pb2.AttachResponse:
    server = _server(rt, "Attach")
    streaming_server.validate_attach(req)
    from .console_attach import check_attach
    check_attach(rt, req.container_id)
    return api_pb2.AttachResponse(url=server.get_attach(req))


def port_forward(rt, req: api_pb2.PortForwardRequest) -> api_pb2.PortForwardResponse:
    server = _server(rt, "PortForward")
    streaming_server.validate_port_forward(req)
    from .port_forward import check_port_forward
    check_port_forward(rt, req.pod_sandbox_id, list(req.port))
    return api_pb2.PortForwardResponse(url=server.get_port_forward(req))
