"""The proxy's gRPC server: a generic handler for every method of runtime.v1 RuntimeService and ImageService.

Methods are enumerated from the proto descriptor, so an RPC added to the proto is
served without code here. Requests and responses travel as bytes; a message is
decoded only when the proxy must look inside:

- the request carries a routing ID (`pod_sandbox_id`/`container_id`) -> decode it to
  read the ID; a default-backend request is then forwarded as the original bytes, a
  prefixed one is re-encoded without the prefix (python protobuf keeps unknown fields
  on re-encoding); the response of a non-default backend is decoded to prefix its IDs
  (one without IDs is decoded only to check that it parses, then passed on as it came);
- RunPodSandbox (the target-runtime annotation), image calls (the image name);
- List*/Stream* calls fan out concurrently to the backends the filter allows and merge
  by concatenating the serialized responses (the default's bytes are never decoded);
- Status, ImageFsInfo, ListMetricDescriptors merge decoded answers (merge.py);
- GetContainerEvents merges the event streams of all backends;
- anything else (Version, RuntimeConfig, unknown new RPCs) goes to the default backend
  as raw bytes; Exec/Attach/PortForward return the backend's URL unchanged.

The server is grpcio's synchronous one with a thread per call, and the backends'
channels are synchronous too: a handler blocks in C (GIL released) while its backend
answers. On the project's 2-core machines that costs 0.1-0.3 ms less per proxied call
than grpc.aio, whose every completion goes through a poller thread and the event loop
(bench/criproxy_latency.py; the designs measured are in docs/criproxy.md).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from criproxy import merge, routing
from criproxy.backends import MAX_MESSAGE, BackendError, Backends
from criproxy.messages import cap_message
from proto.runtime.v1 import api_pb2

log = logging.getLogger("criproxy.server")

SERVICES = [api_pb2.DESCRIPTOR.services_by_name[n] for n in ("RuntimeService", "ImageService")]
IMAGE_BY_NAME = {"ImageStatus", "PullImage", "RemoveImage"}
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
# One thread per call in progress. Calls can block for long (StopContainer waits out the grace
# period, a VM's RunPodSandbox takes seconds, GetContainerEvents lasts as long as the kubelet
# listens), and the pool makes threads only as calls need them: a high cap keeps calls from queueing.
MAX_CALLS = 256
# Calls that can take long: forwarded as a grpc future that the kubelet's cancellation (or its deadline
# passing) cancels on the backend too. A future costs ~0.4 ms more than a blocking call, so the short
# calls (Version, List*, *Status, ...) block: they have deadlines and end soon anyway.
CANCELLABLE = {"RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "CreateContainer", "StartContainer",
               "StopContainer", "RemoveContainer", "ExecSync", "CheckpointContainer", "PullImage", "RemoveImage"}
# grpcio's sync server reports "no deadline" (the kubelet sets none on PullImage and GetContainerEvents)
# as a remaining time of ~9.2e18 s; passed on as a backend call's timeout it overflows into an instant
# DEADLINE_EXCEEDED. Anything longer than this (~31 years) is no deadline.
NO_DEADLINE = 1e9
# Status: of the kubelet's time, what the merged answer needs after the backends' calls time out.
STATUS_RESERVE = 0.2


def _timeout(context) -> float | None:
    """The kubelet's remaining time, as the backend call's timeout: None if its call has no deadline."""
    t = context.time_remaining()
    return None if t is None or t > NO_DEADLINE else t


def _cls(desc):
    return message_factory.GetMessageClass(desc)


def _parse(cls, raw: bytes, context):
    """The kubelet's request, decoded; one that does not parse is the caller's mistake: INVALID_ARGUMENT."""
    try:
        return cls.FromString(raw)
    except DecodeError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {cls.DESCRIPTOR.full_name}: {e}")


def _too_big(size: int) -> BackendError:
    return BackendError("", grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the answer ({size} bytes) exceeds the CRI message limit of {MAX_MESSAGE} bytes")


def _answer(call: Callable[[], bytes], return_errors: bool) -> bytes | BackendError:
    try:
        return call()
    except BackendError as e:
        if not return_errors:
            raise
        return e


class Proxy:
    def __init__(self, backends: Backends):
        self.backends = backends
        self.routes = routing.Routes(backends.default, tuple(n for n in backends.by_name if n != backends.default))
        self._foreign = routing.foreign_markers(self.routes)
        # Calls to the second and further backends of a fan-out (threads are made as needed, then reused).
        self._pool = futures.ThreadPoolExecutor(max_workers=MAX_CALLS, thread_name_prefix="criproxy-fan-out")

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.backends.close()

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

    def from_backend(self, backend: str, resp_cls, raw: bytes, listing: bool = False) -> bytes:
        """A backend's answer as the kubelet gets it: a non-default backend's IDs prefixed. A default
        backend's answer is passed on undecoded unless it may carry an ID that would route elsewhere
        (a byte search): then, in a list (`listing`), the items carrying one are dropped; elsewhere the
        answer is refused. Raises BackendError (INTERNAL: an answer that does not parse or cannot be
        routed; RESOURCE_EXHAUSTED: one grown past the message limit)."""
        default = backend == self.routes.default
        if not routing.has_id_fields(resp_cls.DESCRIPTOR):
            if not default:  # nothing to rewrite, but the kubelet must not get a non-default backend's garbage
                try:
                    resp_cls.FromString(raw)
                except DecodeError as e:
                    raise self.backends[backend].unreadable(resp_cls.DESCRIPTOR.name, "a message that does not parse",
                                                            e)
            return raw
        if default and not any(m in raw for m in self._foreign):
            return raw
        try:
            msg = resp_cls.FromString(raw)
        except DecodeError as e:
            raise self.backends[backend].unreadable(resp_cls.DESCRIPTOR.name, "a message that does not parse", e)
        if not default:
            routing.add_prefixes(self.routes, backend, msg)
            out = msg.SerializeToString()
            if len(out) > MAX_MESSAGE:
                raise _too_big(len(out))
            return out
        dropped = routing.drop_foreign_items(self.routes, msg) if listing else []
        bad = routing.foreign_ids(self.routes, msg)
        if bad:
            raise BackendError(backend, grpc.StatusCode.INTERNAL,
                               f"backend {backend} answered {resp_cls.DESCRIPTOR.name} with the ID "
                               f"{cap_message(repr(bad[0]), 300)}, which would route to backend "
                               f"{self._owner(bad[0])}: the proxy cannot hand it out")
        if not dropped:
            return raw
        log.warning("%s of backend %s: %d item(s) left out, their IDs would route to another backend: %s",
                    resp_cls.DESCRIPTOR.name, backend, len(dropped), cap_message(", ".join(map(repr, dropped[:5])), 300))
        return msg.SerializeToString()

    def _owner(self, value: str) -> str:
        return self.routes.image_backend(value)[0] if self.routes.split_id(value)[0] == self.routes.default \
            else self.routes.split_id(value)[0]

    def _relay(self, backend: str, resp_cls, raw: bytes, context, listing: bool = False) -> bytes:
        try:
            return self.from_backend(backend, resp_cls, raw, listing)
        except BackendError as e:
            context.abort(e.code, e.details)

    # ------------------------------------------------------------ calling the backends

    def _unary(self, name: str, path: str, req: bytes, context, cancellable: bool = False) -> bytes:
        """One backend's answer; its failure aborts the kubelet's call with the backend's code.
        `cancellable`: the kubelet's call ending first (cancelled, deadline) cancels the backend's."""
        backend = self.backends[name]
        timeout = _timeout(context)
        try:
            if cancellable or timeout is None:  # without a deadline only the caller's cancelling ends it
                return backend.unary_cancellable(path, req, timeout, context.add_callback)
            return backend.unary(path, req, timeout)
        except BackendError as e:
            context.abort(e.code, e.details)

    def _fan_out(self, path: str, plan: list[tuple[str, bytes]], context,
                 return_errors: bool = False, reserve: float = 0.0) -> list[bytes | BackendError]:
        """The answers of the backends in `plan` ([(backend, request)]), called concurrently: the first
        on this thread, the others on the fan-out pool, so a single-backend plan costs one plain call.
        (A pool thread is cheaper than a grpc future, whose channel may start a polling thread per call.)
        The first failure in plan order is raised (or, with return_errors, returned in its place).
        A call without a deadline, which only the caller's cancelling can end, is made of futures that
        cancelling cancels on every backend (they cost ~0.3 ms more: the kubelet's lists have deadlines).
        `reserve`: seconds of the caller's time kept for answering after the backends' deadline."""
        if not plan:
            return []
        timeout = _timeout(context)
        if timeout is not None and reserve:
            timeout = max(timeout - reserve, timeout / 2)
        if timeout is None:
            return self._fan_out_futures(path, plan, context, return_errors)
        pending = [self._pool.submit(self.backends[b].unary, path, r, timeout) for b, r in plan[1:]]
        first, req = plan[0]
        out = [_answer(lambda: self.backends[first].unary(path, req, timeout), return_errors)]
        return out + [_answer(f.result, return_errors) for f in pending]

    def _fan_out_futures(self, path, plan, context, return_errors: bool) -> list[bytes | BackendError]:
        calls = [(self.backends[b], self.backends[b].callable("unary_unary", path).future(r)) for b, r in plan]

        def cancel():
            for _, f in calls:
                f.cancel()
        if not context.add_callback(cancel):
            cancel()
        out: list[bytes | BackendError] = []
        for backend, f in calls:
            try:
                out.append(f.result())
            except (grpc.FutureCancelledError, grpc.RpcError) as e:
                err = (BackendError(backend.name, grpc.StatusCode.CANCELLED, "cancelled by the caller")
                       if isinstance(e, grpc.FutureCancelledError) else backend.error(e))
                if not return_errors:
                    raise err from None
                out.append(err)
        return out

    def _collect_streams(self, path: str, plan: list[tuple[str, bytes]], context) -> list[list[bytes]]:
        """All messages of each backend's server stream, per backend in plan order. Every call is started
        first (the backends work concurrently), then drained in order, so the first failure raised is
        the first in plan order, as for unary fan-outs. The caller going away cancels them all."""
        calls = []
        timeout = _timeout(context)

        def cancel():
            for _, c in calls:
                c.cancel()
        try:
            for b, r in plan:
                calls.append((self.backends[b], self.backends[b].stream(path, r, timeout)))
            if not context.add_callback(cancel):
                cancel()
                raise BackendError("", grpc.StatusCode.CANCELLED, "cancelled by the caller")
            return [list(backend.iterate(call)) for backend, call in calls]
        finally:  # also the calls already started when starting a later one failed
            for _, call in calls:
                call.cancel()

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
                fn = self._default_stream(path, resp_cls)
            return grpc.unary_stream_rpc_method_handler(fn)
        cancellable = name in CANCELLABLE
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
            fn = self._by_image(path, req_cls, resp_cls, cancellable)
        elif route_field:
            fn = self._by_id(path, req_cls, resp_cls, route_field, cancellable)
        elif name.startswith("List"):
            fn = self._list(path, req_cls, resp_cls, has_filter, streaming=False)
        else:
            fn = self._default(path, cancellable)
        return grpc.unary_unary_rpc_method_handler(fn)

    # -- default backend, raw

    def _default(self, path, cancellable: bool = False):
        if cancellable:
            def handle_cancellable(raw: bytes, context):
                return self._unary(self.routes.default, path, raw, context, cancellable=True)
            return handle_cancellable

        # The hot path (Version, RuntimeConfig, ...): the multicallable is looked up once, here.
        backend = self.backends[self.routes.default]
        call = backend.callable("unary_unary", path)

        def handle(raw: bytes, context):
            timeout = _timeout(context)
            if timeout is None:  # only the caller's cancelling can end it: cancellable
                return self._unary(self.routes.default, path, raw, context, cancellable=True)
            try:
                return call(raw, timeout=timeout)
            except grpc.RpcError as e:
                err = backend.error(e)
                context.abort(err.code, err.details)
        return handle

    def _stream_from(self, name: str, path: str, req: bytes, resp_cls, context):
        """Relay one backend's server stream, IDs prefixed for a non-default backend."""
        backend = self.backends[name]
        call = backend.stream(path, req, _timeout(context))
        if not context.add_callback(call.cancel):  # the kubelet going away ends the backend's stream
            call.cancel()  # it is gone already
            return
        try:
            for item in backend.iterate(call):
                yield self.from_backend(name, resp_cls, item, listing=True)
        except BackendError as e:
            context.abort(e.code, e.details)
        finally:
            call.cancel()

    def _default_stream(self, path, resp_cls):
        def handle(raw: bytes, context):
            yield from self._stream_from(self.routes.default, path, raw, resp_cls, context)
        return handle

    def _passthrough_client_streaming(self, path, server_streaming: bool):
        """No CRI method streams requests today; should one appear, it goes to the default backend raw."""
        backend = self.backends[self.routes.default]

        def abort(context, e: grpc.RpcError):
            err = backend.error(e)
            context.abort(err.code, err.details)

        if server_streaming:
            def handle(request_iterator, context):
                call = backend.callable("stream_stream", path)(request_iterator, timeout=_timeout(context))
                if not context.add_callback(call.cancel):
                    call.cancel()
                    return
                try:
                    yield from call
                except grpc.RpcError as e:
                    abort(context, e)
                finally:
                    call.cancel()
            return grpc.stream_stream_rpc_method_handler(handle)

        def unary(request_iterator, context):
            fut = backend.callable("stream_unary", path).future(request_iterator, timeout=_timeout(context))
            if not context.add_callback(fut.cancel):
                fut.cancel()
            try:
                return fut.result()
            except grpc.FutureCancelledError:
                context.abort(grpc.StatusCode.CANCELLED, "cancelled")
            except grpc.RpcError as e:
                abort(context, e)
        return grpc.stream_unary_rpc_method_handler(unary)

    # -- routed by one ID

    def _by_id(self, path, req_cls, resp_cls, field, cancellable: bool):
        def handle(raw: bytes, context):
            req = _parse(req_cls, raw, context)
            name, _ = self.routes.split_id(getattr(req, field))
            resp = self._unary(name, path, self.to_backend(name, req_cls, raw, req), context, cancellable)
            return self._relay(name, resp_cls, resp, context)
        return handle

    def _by_id_stream(self, path, req_cls, resp_cls, field):
        def handle(raw: bytes, context):
            req = _parse(req_cls, raw, context)
            name, _ = self.routes.split_id(getattr(req, field))
            yield from self._stream_from(name, path, self.to_backend(name, req_cls, raw, req), resp_cls, context)
        return handle

    def _run_sandbox(self, path, req_cls, resp_cls):
        def handle(raw: bytes, context):
            req = _parse(req_cls, raw, context)
            try:
                name = self.routes.sandbox_backend(req.config.annotations)
            except routing.UnknownRuntime as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            log.info("RunPodSandbox %s/%s -> %s", req.config.metadata.namespace, req.config.metadata.name, name)
            resp = self._unary(name, path, self.to_backend(name, req_cls, raw, req), context, cancellable=True)
            return self._relay(name, resp_cls, resp, context)
        return handle

    def _by_image(self, path, req_cls, resp_cls, cancellable: bool):
        def handle(raw: bytes, context):
            req = _parse(req_cls, raw, context)
            name, _ = self.routes.image_backend(req.image.image)
            resp = self._unary(name, path, self.to_backend(name, req_cls, raw, req), context, cancellable)
            return self._relay(name, resp_cls, resp, context)
        return handle

    # -- fan-out

    def _plan(self, req_cls, raw: bytes, has_filter: bool, context) -> list[tuple[str, bytes]]:
        """[(backend, request bytes for it)] for a filtered list call."""
        if not has_filter:
            return [(b, raw) for b in self.routes.all]
        req = _parse(req_cls, raw, context)
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

    def _merge_lists(self, path, resp_cls, plan, context, streaming: bool):
        """A list call fanned out per `plan`: one concatenated answer, or (streaming) every backend's
        messages in plan order, IDs prefixed for non-default backends."""
        try:
            if streaming:
                results = self._collect_streams(path, plan, context)
                return [self.from_backend(b, resp_cls, item, listing=True)
                        for (b, _), items in zip(plan, results) for item in items]
            results = self._fan_out(path, plan, context)
            out = merge.concat([self.from_backend(b, resp_cls, resp, listing=True)
                                for (b, _), resp in zip(plan, results)])
            if len(out) > MAX_MESSAGE:
                raise _too_big(len(out))
            return out
        except BackendError as e:
            context.abort(e.code, e.details)

    def _list(self, path, req_cls, resp_cls, has_filter, streaming):
        if streaming:
            def handle_stream(raw: bytes, context):
                yield from self._merge_lists(path, resp_cls, self._plan(req_cls, raw, has_filter, context), context,
                                             True)
            return handle_stream

        def handle(raw: bytes, context):
            return self._merge_lists(path, resp_cls, self._plan(req_cls, raw, has_filter, context), context, False)
        return handle

    def _list_images(self, path, req_cls, resp_cls, streaming):
        def plan(raw: bytes, context) -> list[tuple[str, bytes]]:
            req = _parse(req_cls, raw, context)
            return [(backend, self.to_backend(backend, req_cls, raw, req))
                    for backend, _ in routing.image_filter_backends(self.routes, req.filter.image.image)]

        if streaming:
            def handle_stream(raw: bytes, context):
                yield from self._merge_lists(path, resp_cls, plan(raw, context), context, True)
            return handle_stream

        def handle(raw: bytes, context):
            return self._merge_lists(path, resp_cls, plan(raw, context), context, False)
        return handle

    def _merged(self, path, resp_cls, merger: Callable):
        def handle(raw: bytes, context):
            names = self.routes.all
            try:
                results = self._fan_out(path, [(b, raw) for b in names], context)
                parts = []
                for b, resp in zip(names, results):
                    try:
                        msg = resp_cls.FromString(resp)
                    except DecodeError as e:
                        raise self.backends[b].unreadable(resp_cls.DESCRIPTOR.name, "a message that does not parse", e)
                    routing.add_prefixes(self.routes, b, msg)
                    parts.append(msg)
            except BackendError as e:
                context.abort(e.code, e.details)
            return merger(parts).SerializeToString()
        return handle

    def _broadcast(self, path):
        """Every backend must accept it (UpdateRuntimeConfig: the pod CIDR); the default's answer is returned."""
        def handle(raw: bytes, context):
            try:
                return self._fan_out(path, [(b, raw) for b in self.routes.all], context)[0]
            except BackendError as e:
                context.abort(e.code, e.details)
        return handle

    def _status(self, path):
        def handle(raw: bytes, context):
            names = self.routes.all
            # A backend that does not answer in time is a not-ready one: the others' answer must still
            # reach the kubelet within its deadline.
            results = self._fan_out(path, [(b, raw) for b in names], context, return_errors=True,
                                    reserve=STATUS_RESERVE)
            parts = []
            for b, r in zip(names, results):
                if isinstance(r, BackendError):
                    parts.append((b, None, r.details))
                    continue
                try:
                    parts.append((b, api_pb2.StatusResponse.FromString(r), ""))
                except DecodeError as e:  # as if it had not answered
                    parts.append((b, None, f"its StatusResponse does not parse: {e}"))
            return merge.status(parts, self.routes.default).SerializeToString()
        return handle

    def _events(self, path, resp_cls):
        """GetContainerEvents: the events of every backend, as they come, IDs prefixed.
        A backend's stream failing fails the merged stream (the kubelet reconnects).
        A thread per backend stream feeds one queue that this call's thread relays."""
        def handle(raw: bytes, context):
            events: queue.SimpleQueue = queue.SimpleQueue()
            calls = []
            timeout = _timeout(context)

            def pump(backend, call):
                try:
                    for item in backend.iterate(call):
                        events.put((backend.name, item, None))
                    events.put((backend.name, None, None))
                except BackendError as e:
                    events.put((backend.name, None, e))

            def cancel():
                for _, c in calls:
                    c.cancel()

            try:
                for b in self.backends:
                    calls.append((b, b.stream(path, raw, timeout)))
            except BaseException:
                cancel()  # those already opened
                raise
            # The kubelet going away ends the backends' streams, which ends the pumps and wakes this thread.
            if not context.add_callback(cancel):
                cancel()  # it is gone already
                return
            for b, c in calls:
                threading.Thread(target=pump, args=(b, c), name=f"events-{b.name}", daemon=True).start()
            remaining = len(calls)
            try:
                while remaining:
                    name, item, err = events.get()
                    if err is not None:
                        context.abort(err.code, err.details)
                    if item is None:
                        remaining -= 1
                        continue
                    try:
                        yield self.from_backend(name, resp_cls, item)
                    except BackendError as e:  # one event the kubelet cannot use; the next relist has the state
                        log.warning("event of backend %s left out: %s", name, e.details)
            finally:
                cancel()
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


def serve(listen: str, specs: list[tuple[str, str]], default: str | None = None) -> tuple[grpc.Server, Proxy]:
    """Start serving on a unix socket (the server runs on its own threads); returns (server, proxy).
    To stop: `server.stop(grace).wait()`, then `proxy.close()`."""
    backends = Backends(specs, default)
    backends.open()
    proxy = Proxy(backends)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_CALLS, thread_name_prefix="criproxy"),
                         options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers(proxy.handlers())
    path = _prepare_socket(listen)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    os.chmod(path, 0o660)
    log.info("criproxy listening on %s", path)
    return server, proxy


class ProxyThread:
    """The proxy served from this process (tests, benchmarks): start(), stop()."""

    def __init__(self, listen: str, specs: list[tuple[str, str]], default: str | None = None):
        self.listen, self.specs, self.default = listen, specs, default
        self._server: grpc.Server | None = None
        self._proxy: Proxy | None = None

    def start(self) -> "ProxyThread":
        self._server, self._proxy = serve(self.listen, self.specs, self.default)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(30)
            self._proxy.close()
            self._server = None
