"""The backends: one gRPC channel each, raw-bytes callables per method, errors that name the backend.

gRPC channels reconnect by themselves; the reconnect backoff is capped low (1 s)
so a backend that comes back is used again within about a second. A call to a
backend that is down fails fast (no wait-for-ready) with UNAVAILABLE naming it:
"backend virtlet.cloud (/run/vmlet/vmlet.sock) is unavailable: ...".

The channels are grpcio's synchronous ones: the proxy's handlers run on server
threads and block in C (GIL released) while the backend answers, which costs less
per call than grpc.aio's hand-offs to an event loop (docs/criproxy.md, Performance).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from criproxy.messages import cap_message

log = logging.getLogger("criproxy.backends")

MAX_MESSAGE = 16 * 1024 * 1024  # the kubelet's own CRI limit
# A backend's error may echo a whole request value (a 64 KiB ID): received in full, so the proxy sees the
# backend's real code (gRPC's default 16 KiB limit turns it into RESOURCE_EXHAUSTED), then cut (messages.py).
MAX_BACKEND_METADATA = 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_metadata_size", MAX_BACKEND_METADATA),
    ("grpc.absolute_max_metadata_size", MAX_BACKEND_METADATA),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]


class BackendError(Exception):
    """A call failed; code and details are what the kubelet gets."""

    def __init__(self, backend: str, code: grpc.StatusCode, details: str):
        details = cap_message(details)
        super().__init__(details)
        self.backend = backend
        self.code = code
        self.details = details


@dataclass
class Backend:
    name: str
    socket: str
    default: bool = False
    channel: grpc.Channel | None = None
    _callables: dict[tuple[str, str], object] = field(default_factory=dict)

    def open(self) -> None:
        self.channel = grpc.insecure_channel(f"unix://{self.socket}", options=CHANNEL_OPTIONS)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
            self._callables.clear()

    def callable(self, kind: str, path: str):
        """The channel's multicallable (`unary_unary`, `unary_stream`, ...) for a method, on raw bytes;
        made once per method and reused."""
        fn = self._callables.get((kind, path))
        if fn is None:
            fn = self._callables[(kind, path)] = getattr(self.channel, kind)(
                path, request_serializer=None, response_deserializer=None)
        return fn

    def error(self, e: grpc.RpcError) -> BackendError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else str(e)) or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"backend {self.name} ({self.socket}) is unavailable: {details}"
        return BackendError(self.name, code, details)

    def unreadable(self, method: str, what: str, e: Exception) -> BackendError:
        """The backend's answer cannot be used: INTERNAL naming it (the backend's fault, not the caller's)."""
        return BackendError(self.name, grpc.StatusCode.INTERNAL, f"backend {self.name} answered {method} with {what}: {e}")

    def unary(self, path: str, request: bytes, timeout: float | None) -> bytes:
        try:
            return self.callable("unary_unary", path)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise self.error(e) from None

    def unary_cancellable(self, path: str, request: bytes, timeout: float | None,
                          add_callback: Callable[[Callable[[], None]], bool]) -> bytes:
        """As unary(), but the call is a future that `add_callback` (the server context's) cancels when the
        proxy's own call ends first: the kubelet cancelling a PullImage or StopContainer cancels it here
        too. add_callback returning False means that call is over already: cancel at once."""
        fut = self.callable("unary_unary", path).future(request, timeout=timeout)
        if not add_callback(fut.cancel):
            fut.cancel()
        try:
            return fut.result()
        except grpc.FutureCancelledError:
            raise BackendError(self.name, grpc.StatusCode.CANCELLED, "cancelled by the caller") from None
        except grpc.RpcError as e:
            raise self.error(e) from None

    def stream(self, path: str, request: bytes, timeout: float | None):
        """The call object (iterator of response bytes, `cancel()`); iterate with `iterate()`."""
        return self.callable("unary_stream", path)(request, timeout=timeout)

    def iterate(self, call) -> Iterator[bytes]:
        try:
            yield from call
        except grpc.RpcError as e:
            raise self.error(e) from None


class Backends:
    def __init__(self, specs: list[tuple[str, str]], default: str | None = None):
        if not specs:
            raise ValueError("at least one backend is needed")
        default = default or specs[0][0]
        if default not in {n for n, _ in specs}:
            raise ValueError(f"default backend {default!r} is not among the backends {[n for n, _ in specs]}")
        self.by_name = {n: Backend(n, s, default=(n == default)) for n, s in specs}
        self.default = default

    def open(self) -> None:
        for b in self.by_name.values():
            b.open()
            log.info("backend %s%s at %s", b.name, " (default)" if b.default else "", b.socket)

    def close(self) -> None:
        for b in self.by_name.values():
            b.close()

    def __getitem__(self, name: str) -> Backend:
        return self.by_name[name]

    def __iter__(self):
        return iter(self.by_name.values())
