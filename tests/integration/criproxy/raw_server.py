"""What the proxy suites' in-process fake runtimes share: a gRPC server for every runtime.v1 method on raw
bytes (no (de)serialization: a fake answers any bytes, garbage included), and a poll until a condition."""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
from google.protobuf.descriptor import MethodDescriptor

from proto.runtime.v1 import api_pb2

SERVICES = [api_pb2.DESCRIPTOR.services_by_name[n] for n in ("RuntimeService", "ImageService")]

Unary = Callable[[bytes, grpc.ServicerContext], bytes]
Stream = Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]


def serve(socket: Path, handlers: Callable[[MethodDescriptor], tuple[Unary, Stream]], workers: int = 8,
          options: list[tuple[str, int]] | None = None) -> grpc.Server:
    """A started server on `socket` whose every method runs `handlers(method)`'s unary or stream function."""
    server = grpc.server(futures.ThreadPoolExecutor(workers), options=options or [])
    generic = []
    for svc in SERVICES:
        methods = {}
        for m in svc.methods:
            unary, stream = handlers(m)
            methods[m.name] = (grpc.unary_stream_rpc_method_handler(stream) if m.server_streaming
                               else grpc.unary_unary_rpc_method_handler(unary))
        generic.append(grpc.method_handlers_generic_handler(svc.full_name, methods))
    server.add_generic_rpc_handlers(generic)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    return server


def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)
