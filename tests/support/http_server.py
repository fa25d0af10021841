"""A real HTTP server on 127.0.0.1 that serves images, and misbehaves on request.

Tests register routes; each route says what the server does for one path:
serve a file (streamed, with a correct Content-Length), redirect, answer with
an error status, send fewer bytes than Content-Length promises, lie about the
length, dribble bytes slowly, or send part of a file and stall there (so a
test can `kill()` the server in the middle of a download, and `start()` it
again on the same port). Image service tests use the hostile routes; every
request is recorded so tests can count downloads.
"""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass(frozen=True)
class Route:
    kind: str  # file | redirect | status | truncate | slow | bytes | stall
    path: Path | None = None
    data: bytes = b""
    location: str = ""
    status: int = 200
    truncate_at: int = 0
    delay: float = 0.0
    content_length: int | None = None  # for kind="bytes": the length to claim


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        owner._record(self.command, self.path)
        route = owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            return self._simple(404, b"not found\n")
        if route.kind == "status":
            return self._simple(route.status, f"status {route.status}\n".encode())
        if route.kind == "redirect":
            self.send_response(route.status if route.status in (301, 302, 303, 307, 308) else 302)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.kind == "bytes":
            length = route.content_length if route.content_length is not None else len(route.data)
            self._headers(length)
            if not head:
                self.wfile.write(route.data)
            self.close_connection = True
            return
        assert route.path is not None
        size = route.path.stat().st_size
        self._headers(size)
        if head:
            return
        with route.path.open("rb") as f:
            if route.kind == "file":
                shutil.copyfileobj(f, self.wfile, 1 << 20)
            elif route.kind == "truncate":
                self.wfile.write(f.read(route.truncate_at))
                self.close_connection = True
            elif route.kind == "stall":
                self.wfile.write(f.read(route.truncate_at))
                self.wfile.flush()
                owner.stalled.set()
                owner._killed.wait()  # until the server dies under the client
            elif route.kind == "slow":
                while chunk := f.read(4096):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    time.sleep(route.delay)

    def _headers(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _simple(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "ImageServer"

    def handle_error(self, request, client_address) -> None:
        # Clients hanging up mid-transfer (truncation and timeout tests) are expected.
        pass

    def process_request(self, request, client_address) -> None:
        with self.owner._lock:
            self.owner._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.owner._lock:
            self.owner._open.discard(request)
        super().shutdown_request(request)


class ImageServer:
    """Start with `start()`, stop with `stop()`; `url(path)` gives a full URL."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0  # kept across kill(): start() comes back on the same port (the URLs stay valid)
        self._open: set[socket.socket] = set()
        self._killed = threading.Event()
        self.stalled = threading.Event()  # a "stall" route has sent its bytes and waits

    def start(self) -> "ImageServer":
        self._killed.clear()
        self.stalled.clear()
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.owner = self
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="image-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._killed.set()  # release stalled handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def kill(self) -> None:
        """Die the way a crashed server does: stop listening and reset every open connection (RST)."""
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.stop()

    @property
    def port(self) -> int:
        assert self._port, "server not started"
        return self._port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def count(self, path: str, method: str = "GET") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if p == path and m == method)

    # Route helpers: each returns the route's full URL.
    def serve_file(self, path: str, file: Path) -> str:
        self.routes[path] = Route("file", path=Path(file))
        return self.url(path)

    def serve_bytes(self, path: str, data: bytes, content_length: int | None = None) -> str:
        self.routes[path] = Route("bytes", data=data, content_length=content_length)
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.routes[path] = Route("redirect", location=location, status=status)
        return self.url(path)

    def status(self, path: str, status: int) -> str:
        self.routes[path] = Route("status", status=status)
        return self.url(path)

    def truncate(self, path: str, file: Path, at: int) -> str:
        self.routes[path] = Route("truncate", path=Path(file), truncate_at=at)
        return self.url(path)

    def stall(self, path: str, file: Path, at: int) -> str:
        """Announce the whole file, send its first `at` bytes, then wait until the server is killed."""
        self.routes[path] = Route("stall", path=Path(file), truncate_at=at)
        return self.url(path)

    def slow(self, path: str, file: Path, delay_per_4k: float) -> str:
        self.routes[path] = Route("slow", path=Path(file), delay=delay_per_4k)
        return self.url(path)
