"""The proxy's gRPC server: a generic handler for every method of runtime.v1 RuntimeService and ImageService.

Methods are enumerated from the proto descriptor, so an RPC added to the proto is
served without code here. Requests and responses travel as bytes; a message is
decoded only when the proxy must look inside:

- the request carries a routing ID (`pod_sandbox_id`/`container_id`) -> decode it to
  read the ID; a default-backend request is then forwarded as the original bytes, a
  prefixed one is re-encoded without the prefix (python protobuf keeps unknown fields
  on re-encoding); the response of a non-default backend is decoded to prefix its IDs;
- RunPodSandbox (the target-runtime annotation), image calls (the image name);
- List*/Stream* calls fan out concurrently to the backends the filter allows and merge
  by concatenating the serialized responses (the default's bytes are never decoded);
- Status, ImageFsInfo, ListMetricDescriptors merge decoded answers (merge.py);
- GetContainerEvents merges the event streams of all backends;
- anything else (Version, RuntimeConfig, unknown new RPCs) goes to the default backend
  as raw bytes; Exec/Attach/PortForward return the backend's URL unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import message_factory
from grpc import aio

from criproxy import merge, routing
from criproxy.backends import MAX_MESSAGE, Backend, BackendError, Backends
from proto.runtime.v1 import api_pb2

log = logging.getLogger("criproxy.server")

SERVICES = [api_pb2.DESCRIPTOR.services_by_name[n] for n in ("RuntimeService", "ImageService")]
IMAGE_BY_NAME = {"ImageStatus", "PullImage", "RemoveImage"}
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


def _cls(desc):
    return message_factory.GetMessageClass(desc)


async def _collect_stream(backend: Backend, path: str, req: bytes, timeout) -> list[bytes]:
    """All messages of one backend's server stream (merged streams are answered once every backend is done)."""
    call = backend.stream(path, req, timeout)
    try:
        return [item async for item in backend.iterate(call)]
    finally:
        call.cancel()


class Proxy:
    def __init__(self, backends: Backends):
        self.backends = backends
        self.routes = routing.Routes(backends.default, tuple(n for n in backends.by_name if n != backends.default))

    # ------------------------------------------------------------ request/response rewriting

    def to_backend(self, backend: str, req_cls, raw: bytes, decoded=None) -> bytes:
        if backend == self.routes.default or not routing.has_id_fields(req_cls.DESCRIPTOR):
            return raw
        msg = req_cls() if decoded is None else decoded.__class__()
        if decoded is None:
            msg.ParseFromString(raw)
        else:
            msg.CopyFrom(decoded)
        routing.strip_prefixes(self.routes, backend, msg)
        return msg.SerializeToString()

    def from_backend(self, backend: str, resp_cls, raw: bytes) -> bytes:
        if backend == self.routes.default or not routing.has_id_fields(resp_cls.DESCRIPTOR):
            return raw
        msg = resp_cls.FromString(raw)
        routing.add_prefixes(self.routes, backend, msg)
        return msg.SerializeToString()

    # ------------------------------------------------------------ handlers

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        out = []
        for svc in SERVICES:
            methods = {m.name: self._handler(svc, m) for m in svc.methods}
            out.append(grpc.method_handlers_generic_handler(svc.full_name, methods))
        return out

    def _handler(self, svc, m) -> grpc.RpcMethodHandler:
        path = f"/{svc.full_name}/{m.name}"
        req_cls, resp_cls = _cls(m.input_type), _cls(m.output_type)
        name = m.name
        if m.client_streaming:
            return self._passthrough_client_streaming(path, m.server_streaming)
        route_field = routing.request_route_field(m.input_type)
        has_filter = "filter" in m.input_type.fields_by_name
        if m.server_streaming:
            if name == "GetContainerEvents":
                fn = self._events(path, resp_cls)
            elif name == "StreamImages":
                fn = self._list_images(path, req_cls, resp_cls, streaming=True)
            elif route_field:
                fn = self._by_id_stream(path, req_cls, resp_cls, route_field)
            elif name.startswith("Stream"):
                fn = self._list(path, req_cls, resp_cls, has_filter, streaming=True)
            else:
                fn = self._default_stream(path)
            return grpc.unary_stream_rpc_method_handler(fn)
        if name == "RunPodSandbox":
            fn = self._run_sandbox(path, req_cls, resp_cls)
        elif name == "Status":
            fn = self._status(path)
        elif name == "UpdateRuntimeConfig":
            fn = self._broadcast(path)
        elif name == "ImageFsInfo":
            fn = self._merged(path, resp_cls, merge.imagefs)
        elif name == "ListMetricDescriptors":
            fn = self._merged(path, resp_cls, merge.metric_descriptors)
        elif name == "ListImages":
            fn = self._list_images(path, req_cls, resp_cls, streaming=False)
        elif name in IMAGE_BY_NAME:
            fn = self._by_image(path, req_cls, resp_cls)
        elif route_field:
            fn = self._by_id(path, req_cls, resp_cls, route_field)
        elif name.startswith("List"):
            fn = self._list(path, req_cls, resp_cls, has_filter, streaming=False)
        else:
            fn = self._default(path)
        return grpc.unary_unary_rpc_method_handler(fn)

    @staticmethod
    async def _abort(context, e: BackendError):
        await context.abort(e.code, e.details)

    # -- default backend, raw

    def _default(self, path):
        backend = self.backends[self.routes.default]

        async def handle(raw: bytes, context):
            try:
                return await backend.unary(path, raw, context.time_remaining())
            except BackendError as e:
                await self._abort(context, e)
        return handle

    def _default_stream(self, path):
        backend = self.backends[self.routes.default]

        async def handle(raw: bytes, context):
            call = backend.stream(path, raw, context.time_remaining())
            try:
                async for item in backend.iterate(call):
                    yield item
            except BackendError as e:
                await self._abort(context, e)
            finally:
                call.cancel()
        return handle

    def _passthrough_client_streaming(self, path, server_streaming: bool):
        """No CRI method streams requests today; should one appear, it goes to the default backend raw."""
        backend = self.backends[self.routes.default]

        async def handle(request_iterator, context):
            make = backend.channel.stream_stream if server_streaming else backend.channel.stream_unary
            call = make(path, request_serializer=None, response_deserializer=None)(
                request_iterator, timeout=context.time_remaining())
            try:
                if server_streaming:
                    async for item in call:
                        yield item
                else:
                    yield await call
            except grpc.RpcError as e:
                err = backend.error(e)
                await context.abort(err.code, err.details)

        if server_streaming:
            return grpc.stream_stream_rpc_method_handler(handle)

        async def unary(request_iterator, context):
            async for item in handle(request_iterator, context):
                return item
        return grpc.stream_unary_rpc_method_handler(unary)

    # -- routed by one ID

    def _by_id(self, path, req_cls, resp_cls, field):
        async def handle(raw: bytes, context):
            req = req_cls.FromString(raw)
            name, _ = self.routes.split_id(getattr(req, field))
            backend = self.backends[name]
            try:
                resp = await backend.unary(path, self.to_backend(name, req_cls, raw, req), context.time_remaining())
            except BackendError as e:
                await self._abort(context, e)
            return self.from_backend(name, resp_cls, resp)
        return handle

    def _by_id_stream(self, path, req_cls, resp_cls, field):
        async def handle(raw: bytes, context):
            req = req_cls.FromString(raw)
            name, _ = self.routes.split_id(getattr(req, field))
            backend = self.backends[name]
            call = backend.stream(path, self.to_backend(name, req_cls, raw, req), context.time_remaining())
            try:
                async for item in backend.iterate(call):
                    yield self.from_backend(name, resp_cls, item)
            except BackendError as e:
                await self._abort(context, e)
            finally:
                call.cancel()
        return handle

    def _run_sandbox(self, path, req_cls, resp_cls):
        async def handle(raw: bytes, context):
            req = req_cls.FromString(raw)
            try:
                name = self.routes.sandbox_backend(req.config.annotations)
            except routing.UnknownRuntime as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            log.info("RunPodSandbox %s/%s -> %s", req.config.metadata.namespace, req.config.metadata.name, name)
            try:
                resp = await self.backends[name].unary(path, self.to_backend(name, req_cls, raw, req),
                                                       context.time_remaining())
            except BackendError as e:
                await self._abort(context, e)
            return self.from_backend(name, resp_cls, resp)
        return handle

    def _by_image(self, path, req_cls, resp_cls):
        async def handle(raw: bytes, context):
            req = req_cls.FromString(raw)
            name, _ = self.routes.image_backend(req.image.image)
            try:
                resp = await self.backends[name].unary(path, self.to_backend(name, req_cls, raw, req),
                                                       context.time_remaining())
            except BackendError as e:
                await self._abort(context, e)
            return self.from_backend(name, resp_cls, resp)
        return handle

    # -- fan-out

    async def _gather(self, calls: list[tuple[Backend, asyncio.Future]]) -> list[bytes]:
        """Await all; the first failure (in backend order) is raised after all finished."""
        results = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def _plan(self, req_cls, raw: bytes, has_filter: bool) -> list[tuple[str, bytes]]:
        """[(backend, request bytes for it)] for a filtered list call."""
        if not has_filter:
            return [(b, raw) for b in self.routes.all]
        req = req_cls.FromString(raw)
        ids = routing.filter_ids(req.filter) if req.HasField("filter") else {}
        out = []
        for backend, stripped in routing.plan_list(self.routes, ids):
            if backend == self.routes.default:
                out.append((backend, raw))
                continue
            msg = req_cls()
            msg.CopyFrom(req)
            for f, v in stripped.items():
                setattr(msg.filter, f, v)
            out.append((backend, msg.SerializeToString()))
        return out

    def _list(self, path, req_cls, resp_cls, has_filter, streaming):
        def collect(backend: Backend, req: bytes, timeout):
            return _collect_stream(backend, path, req, timeout)

        if streaming:
            async def handle_stream(raw: bytes, context):
                plan = self._plan(req_cls, raw, has_filter)
                timeout = context.time_remaining()
                try:
                    results = await self._gather([(self.backends[b], collect(self.backends[b], r, timeout))
                                                  for b, r in plan])
                except BackendError as e:
                    await self._abort(context, e)
                for (b, _), items in zip(plan, results):
                    for item in items:
                        yield self.from_backend(b, resp_cls, item)
            return handle_stream

        async def handle(raw: bytes, context):
            plan = self._plan(req_cls, raw, has_filter)
            timeout = context.time_remaining()
            try:
                results = await self._gather([(self.backends[b], self.backends[b].unary(path, r, timeout))
                                              for b, r in plan])
            except BackendError as e:
                await self._abort(context, e)
            return merge.concat([self.from_backend(b, resp_cls, resp) for (b, _), resp in zip(plan, results)])
        return handle

    def _list_images(self, path, req_cls, resp_cls, streaming):
        def plan(raw: bytes) -> list[tuple[str, bytes]]:
            req = req_cls.FromString(raw)
            out = []
            for backend, image in routing.image_filter_backends(self.routes, req.filter.image.image):
                out.append((backend, self.to_backend(backend, req_cls, raw, req)))
            return out

        def collect(backend: Backend, req: bytes, timeout):
            return _collect_stream(backend, path, req, timeout)

        if streaming:
            async def handle_stream(raw: bytes, context):
                p = plan(raw)
                try:
                    results = await self._gather([(self.backends[b], collect(self.backends[b], r, context.time_remaining()))
                                                  for b, r in p])
                except BackendError as e:
                    await self._abort(context, e)
                for (b, _), items in zip(p, results):
                    for item in items:
                        yield self.from_backend(b, resp_cls, item)
            return handle_stream

        async def handle(raw: bytes, context):
            p = plan(raw)
            try:
                results = await self._gather([(self.backends[b], self.backends[b].unary(path, r, context.time_remaining()))
                                              for b, r in p])
            except BackendError as e:
                await self._abort(context, e)
            return merge.concat([self.from_backend(b, resp_cls, resp) for (b, _), resp in zip(p, results)])
        return handle

    def _merged(self, path, resp_cls, merger: Callable):
        async def handle(raw: bytes, context):
            names = self.routes.all
            try:
                results = await self._gather([(self.backends[b], self.backends[b].unary(path, raw, context.time_remaining()))
                                              for b in names])
            except BackendError as e:
                await self._abort(context, e)
            parts = []
            for b, resp in zip(names, results):
                msg = resp_cls.FromString(resp)
                routing.add_prefixes(self.routes, b, msg)
                parts.append(msg)
            return merger(parts).SerializeToString()
        return handle

    def _broadcast(self, path):
        """Every backend must accept it (UpdateRuntimeConfig: the pod CIDR); the default's answer is returned."""
        async def handle(raw: bytes, context):
            try:
                results = await self._gather([(self.backends[b], self.backends[b].unary(path, raw, context.time_remaining()))
                                              for b in self.routes.all])
            except BackendError as e:
                await self._abort(context, e)
            return results[0]
        return handle

    def _status(self, path):
        async def handle(raw: bytes, context):
            names = self.routes.all
            results = await asyncio.gather(
                *(self.backends[b].unary(path, raw, context.time_remaining()) for b in names), return_exceptions=True)
            parts = []
            for b, r in zip(names, results):
                if isinstance(r, BackendError):
                    parts.append((b, None, r.details))
                elif isinstance(r, BaseException):
                    raise r
                else:
                    parts.append((b, api_pb2.StatusResponse.FromString(r), ""))
            return merge.status(parts, self.routes.default).SerializeToString()
        return handle

    def _events(self, path, resp_cls):
        """GetContainerEvents: the events of every backend, as they come, IDs prefixed.
        A backend's stream failing fails the merged stream (the kubelet reconnects)."""
        async def handle(raw: bytes, context):
            queue: asyncio.Queue = asyncio.Queue()
            calls = [(b, b.stream(path, raw, context.time_remaining())) for b in self.backends]

            async def pump(backend: Backend, call):
                try:
                    async for item in backend.iterate(call):
                        await queue.put((backend.name, item, None))
                    await queue.put((backend.name, None, None))
                except BackendError as e:
                    await queue.put((backend.name, None, e))

            tasks = [asyncio.ensure_future(pump(b, c)) for b, c in calls]
            remaining = len(tasks)
            try:
                while remaining:
                    name, item, err = await queue.get()
                    if err is not None:
                        await self._abort(context, err)
                    if item is None:
                        remaining -= 1
                        continue
                    yield self.from_backend(name, resp_cls, item)
            finally:
                for _, c in calls:
                    c.cancel()
                for t in tasks:
                    t.cancel()
        return handle


# ---------------------------------------------------------------- serving

def _prepare_socket(listen: str) -> str:
    path = listen.removeprefix("unix://")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return path


async def start(listen: str, specs: list[tuple[str, str]], default: str | None = None):
    """Start serving on a unix socket; returns (server, backends)."""
    backends = Backends(specs, default)
    backends.open()
    server = aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers(Proxy(backends).handlers())
    path = _prepare_socket(listen)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    os.chmod(path, 0o660)
    log.info("criproxy listening on %s", path)
    return server, backends


class ProxyThread:
    """The proxy on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, listen: str, specs: list[tuple[str, str]], default: str | None = None):
        self.listen, self.specs, self.default = listen, specs, default
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="criproxy", daemon=True)
        self._server = self._backends = None

    def start(self) -> "ProxyThread":
        self._thread.start()
        self._server, self._backends = asyncio.run_coroutine_threadsafe(
            start(self.listen, self.specs, self.default), self._loop).result(30)
        return self

    def stop(self) -> None:
        async def _stop():
            await self._server.stop(grace=1)
            await self._backends.close()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(30)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
