"""The streaming HTTP server: the URLs that Exec, Attach and PortForward answer, and the sessions behind them.

The kubelet's `cri/streaming` server, for a runtime of VMs:
- `get_exec` / `get_attach` / `get_port_forward` validate the request,
  cache it under a single-use token (`tokens`) and answer the absolute URL
  `http(s)://host:port/exec|attach|portforward/<token>`;
- a client's connection (GET or POST) consumes the token: unknown, expired,
  reused or of the wrong kind is one and the same 404;
- the request is upgraded by its headers, to WebSocket (`Upgrade:
  websocket`, protocol from `Sec-WebSocket-Protocol`) or SPDY/3.1 (`Upgrade:
  SPDY/3.1`, protocol from `X-Stream-Protocol-Version`; none in common: 403
  naming what we accept in `X-Accepted-Stream-Protocol-Versions`), and the
  negotiated protocol is in the 101 answer;
- the session runs the runtime's function in a thread of its own
  (`remotecommand`, `portforward`).

Limits: at most `max_connections` connections (one thread each; beyond:
503 and closed), the request head within `header_timeout` and
`max_header_bytes`, TLS handshakes within the header timeout, a connection
idle (no byte either way) for `stream_idle_timeout` closed, streams
created within `stream_creation_timeout` (the kubelet's 30 s), a client
that does not answer our WebSocket close within a few seconds cut off, and
one that takes no byte of our output for `send_timeout` cut off too (see
`_Wire`). `stop` closes every session.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import grpc

from ..errors import CRIError, invalid_argument, show
from . import portforward, remotecommand
from . import websocket as ws
from .backend import Duplex, Session
from .tokens import RequestCache

log = logging.getLogger("vmlet.streaming")

NOT_FOUND_BODY = b"404 page not found\n"
LINGER = 5.0  # seconds a client gets to answer our WebSocket close


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1"
    port: int = 0  # 0: a free port, chosen at start
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The host the URLs name; default: the address (loopback when bound to every address).
    advertise_address: str | None = None
    stream_creation_timeout: float = 30.0
    stream_idle_timeout: float = 4 * 3600.0  # the kubelet's streamingConnectionIdleTimeout
    max_connections: int = 128
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    request_ttl: float = 60.0
    max_in_flight: int = 1000
    # A client that takes no byte of our output for this long is disconnected (its writer would block).
    send_timeout: float = 30.0
    # SPDY: how long a stream whose buffer is full may hold up the connection's reader without its
    # reader taking a byte, before the stream is reset (FLOW_CONTROL_ERROR) and the others go on.
    stream_stall_timeout: float = 5.0


class StreamingRuntime(Protocol):
    """What the server calls for a session (the daemon binds these to the runtime's functions)."""

    def exec(self, container_id: str, cmd: list[str], session: Session) -> int: ...

    def attach(self, container_id: str, session: Session) -> None: ...

    def port_forward(self, pod_sandbox_id: str, port: int, stream: Duplex) -> None: ...


# ---------------------------------------------------------------- validation (the kubelet's)

def validate_exec(req) -> None:
    if not req.container_id:
        raise invalid_argument("container_id: required")
    if not len(req.cmd):
        raise invalid_argument("cmd: a command is required")
    _validate_streams(req)


def validate_attach(req) -> None:
    if not req.container_id:
        raise invalid_argument("container_id: required")
    _validate_streams(req)


def _validate_streams(req) -> None:
    if req.tty and req.stderr:
        raise invalid_argument("tty and stderr: cannot both be true (a terminal has one output stream)")
    if not (req.stdin or req.stdout or req.stderr):
        raise invalid_argument("stdin, stdout, stderr: one of them must be set")


def validate_port_forward(req) -> None:
    if not req.pod_sandbox_id:
        raise invalid_argument("pod_sandbox_id: required")
    for i, port in enumerate(req.port):
        if not 1 <= port <= 65535:
            raise invalid_argument(f"port[{i}]: {port} is not a port (1-65535)")


# ---------------------------------------------------------------- the wire

class _Wire:
    """The client's socket as the sessions use it.

    Every byte either way counts as activity for the idle timeout, and
    `abort` wakes whichever thread is blocked on it. The socket is
    non-blocking underneath and every wait is a poll, so that:
    - a send that makes no progress for `send_timeout` seconds (a client
      that stopped reading) aborts the connection instead of holding its
      writer, and the write lock it holds, for as long as the idle timeout;
    - with TLS, one SSL object is never used by two threads at once
      (OpenSSL does not support it: a TLS 1.3 read may write): each SSL call
      is made under `_io`, and the waits for the socket happen outside it.
    """

    _SLICE = 1.0  # longest single poll: a wait re-checks `aborted` this often
    _TLS_CHUNK = 64 * 1024  # retried unchanged after "want write", as OpenSSL requires

    def __init__(self, sock: socket.socket, send_timeout: float = 30.0) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.tls = False
        self.send_timeout = send_timeout
        self.timeout: float | None = None  # how long recv waits for data (None: until the end)
        self.last = time.monotonic()
        self.deadline: float | None = None  # a hard end (request head, WebSocket close answer)
        self.aborted = threading.Event()
        self._io = threading.Lock()  # TLS: one SSL call at a time

    def start_tls(self, ctx: ssl.SSLContext, timeout: float) -> None:
        """The server side of the TLS handshake, within `timeout` seconds."""
        self.sock = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.tls = True
        end = time.monotonic() + timeout
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, end, "TLS handshake")
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, end, "TLS handshake")

    def _wait(self, events: int, end: float | None, what: str) -> None:
        """Until the socket is ready for `events`; socket.timeout at `end`, BrokenPipeError once aborted."""
        while True:
            if self.aborted.is_set():
                raise BrokenPipeError(f"{what}: the connection was closed")
            fd = self.sock.fileno()
            if fd < 0:
                raise BrokenPipeError(f"{what}: the connection was closed")
            left = self._SLICE if end is None else min(self._SLICE, end - time.monotonic())
            if left <= 0:
                raise socket.timeout(f"{what}: timed out")
            poller = select.poll()
            poller.register(fd, events)
            if poller.poll(int(left * 1000) + 1):
                return

    def wait_readable(self, timeout_ms: int) -> bool:
        """For the SPDY reader: bytes to read (the kernel's, or decrypted ones TLS holds) within timeout_ms."""
        if self.tls:
            with self._io:
                if self.sock.pending():
                    return True
        poller = select.poll()
        fd = self.sock.fileno()
        if fd < 0:
            return True  # recv then fails: the reader ends
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(timeout_ms))

    def recv(self, n: int = 65536, flags: int = 0) -> bytes:
        end = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                if self.tls:
                    with self._io:
                        data = self.sock.recv(n)
                else:
                    data = self.sock.recv(n, flags)
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, end, "recv")
                continue
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                self._wait(select.POLLIN, end, "recv")
                continue
            self.last = time.monotonic()
            return data

    def sendall(self, data) -> None:
        """All of `data`, or an OSError; TimeoutError (after aborting) when no byte went for send_timeout."""
        view = memoryview(data).cast("B")
        stalled_until = time.monotonic() + self.send_timeout
        while len(view):
            if self.aborted.is_set():
                raise BrokenPipeError("send: the connection was closed")
            try:
                if self.tls:
                    with self._io:
                        sent = self.sock.send(view[:self._TLS_CHUNK])
                else:
                    sent = self.sock.send(view)
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                events = select.POLLOUT
            else:
                view = view[sent:]
                now = time.monotonic()
                self.last = now
                stalled_until = now + self.send_timeout
                continue
            try:
                self._wait(events, stalled_until, "send")
            except socket.timeout:
                log.info("streaming: the client read nothing for %.0f s: closing its connection", self.send_timeout)
                self.abort()
                raise TimeoutError(f"the client read nothing for {self.send_timeout:.0f} s") from None

    def send(self, data, flags: int = 0) -> int:
        """One attempt, never waiting (the socket is non-blocking): BlockingIOError when nothing fits."""
        try:
            if self.tls:
                with self._io:
                    sent = self.sock.send(data)
            else:
                sent = self.sock.send(data, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError("the TLS connection would block") from None
        self.last = time.monotonic()
        return sent

    def settimeout(self, t: float | None) -> None:
        self.timeout = t

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        try:
            socket.socket.shutdown(self.sock, how)  # the socket's, not SSLSocket's (which drops its SSL object)
        except OSError:
            pass

    def abort(self) -> None:
        self.aborted.set()
        self.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.abort()
        with self._io:
            try:
                self.sock.close()
            except OSError:
                pass


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 426: "Upgrade Required", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def http_response(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]  # lower-cased names


def parse_head(head: bytes, max_headers: int = 100) -> Request:
    """An HTTP/1.1 request head (without the final CRLF CRLF); _BadRequest for anything malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise _BadRequest(400, "malformed request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, "HTTP/1.1 required")
    if not method or not set(method) <= _TOKEN_CHARS:
        raise _BadRequest(400, "malformed method")
    if not target.startswith("/") or any(ord(c) < 0x21 or ord(c) > 0x7E for c in target):
        raise _BadRequest(400, "malformed request target")
    if len(lines) - 1 > max_headers:
        raise _BadRequest(431, "too many header fields")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise _BadRequest(400, "malformed header field")
        value = value.strip(" \t")
        if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value):
            raise _BadRequest(400, "malformed header field value")
        headers.setdefault(name.lower(), []).append(value)
    split = urlsplit(target)
    try:
        query = parse_qs(split.query, keep_blank_values=True, max_num_fields=100, strict_parsing=False)
    except ValueError:
        raise _BadRequest(400, "too many query parameters") from None
    return Request(method, split.path, query, headers)


def _comma_values(headers: dict[str, list[str]], name: str) -> list[str]:
    return [t.strip() for v in headers.get(name, []) for t in v.split(",") if t.strip()]


def _is_spdy_upgrade(headers: dict[str, list[str]]) -> bool:
    connection = " ".join(headers.get("connection", [])).lower()
    upgrade = " ".join(headers.get("upgrade", [])).lower()
    return "upgrade" in connection and "spdy/3.1" in upgrade


class _Connection:
    def __init__(self, wire: _Wire, peer: str) -> None:
        self.wire = wire
        self.peer = peer
        self.upgraded = False
        self.thread: threading.Thread | None = None


# ---------------------------------------------------------------- the server

class StreamingServer:
    def __init__(self, runtime: StreamingRuntime, config: ServerConfig = ServerConfig()) -> None:
        self.runtime = runtime
        self.config = config
        self.cache = RequestCache(ttl=config.request_ttl, max_in_flight=config.max_in_flight)
        self._tls: ssl.SSLContext | None = None
        for name in ("send_timeout", "stream_stall_timeout", "stream_idle_timeout", "header_timeout"):
            if not getattr(config, name) > 0:
                raise ValueError(f"streaming {name}: must be positive, got {getattr(config, name)!r}")
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("streaming TLS needs both a certificate and a key")
        if config.tls_cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
            self._tls = ctx
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.base_url = ""

    # -------------------------------------------------------------- life cycle

    def start(self) -> "StreamingServer":
        addr = self.config.address or "127.0.0.1"
        ip = ipaddress.ip_address(addr)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((addr, self.config.port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        host = self.config.advertise_address or (
            ("::1" if ip.version == 6 else "127.0.0.1") if ip.is_unspecified else addr)
        if ":" in host:
            host = f"[{host}]"
        self.base_url = f"{'https' if self._tls else 'http'}://{host}:{self.port}"
        for target, name in ((self._accept_loop, "streaming-accept"), (self._reaper, "streaming-reaper")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("streaming server on %s", self.base_url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every session; wait for their threads (up to `timeout`)."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.wire.abort()
        end = time.monotonic() + timeout
        for c in conns:
            if c.thread is not None:
                c.thread.join(max(0.0, end - time.monotonic()))
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        self._threads.clear()

    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    # -------------------------------------------------------------- URLs

    def _url(self, kind: str, req) -> str:
        if not self.base_url:
            raise CRIError(grpc.StatusCode.UNAVAILABLE, "the streaming server is not running")
        copy = type(req)()
        copy.CopyFrom(req)
        return f"{self.base_url}/{kind}/{self.cache.insert(copy)}"

    def get_exec(self, req) -> str:
        validate_exec(req)
        return self._url("exec", req)

    def get_attach(self, req) -> str:
        validate_attach(req)
        return self._url("attach", req)

    def get_port_forward(self, req) -> str:
        validate_port_forward(req)
        return self._url("portforward", req)

    # -------------------------------------------------------------- connections

    def _accept_loop(self) -> None:
        listener = self._listener
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while not self._stopping.is_set():
            try:
                if not poller.poll(250):
                    continue
                sock, addr = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                full = len(self._conns) >= self.config.max_connections
                if not full:
                    conn = _Connection(_Wire(sock, self.config.send_timeout), peer)
                    conn.wire.deadline = time.monotonic() + self.config.header_timeout
                    self._conns.add(conn)
            if full:
                log.warning("streaming: refusing %s: %d connections open", peer, self.config.max_connections)
                try:
                    sock.setblocking(False)
                    if self._tls is None:
                        sock.send(http_response(503, b"too many streaming connections\n"))
                except OSError:
                    pass
                sock.close()
                continue
            conn.thread = threading.Thread(target=self._handle, args=(conn,), daemon=True,
                                           name=f"streaming-{peer}")
            conn.thread.start()

    def _reaper(self) -> None:
        """Cut off connections past their deadline or idle too long (wakes their blocked threads)."""
        while not self._stopping.wait(0.5):
            now = time.monotonic()
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                w = c.wire
                if w.deadline is not None and now > w.deadline:
                    log.info("streaming: %s: deadline passed, closing", c.peer)
                    w.abort()
                elif c.upgraded and now - w.last > self.config.stream_idle_timeout:
                    log.info("streaming: %s: idle for %.0f s, closing", c.peer, self.config.stream_idle_timeout)
                    w.abort()

    def _handle(self, conn: _Connection) -> None:
        wire = conn.wire
        try:
            wire.settimeout(self.config.header_timeout)
            if self._tls is not None:
                wire.start_tls(self._tls, self.config.header_timeout)
            try:
                req = self._read_request(wire)
                self._route(conn, req)
            except _BadRequest as e:
                body = NOT_FOUND_BODY if e.status == 404 else (str(e) + "\n").encode()
                wire.sendall(http_response(e.status, body, e.headers))
        except (OSError, ssl.SSLError, ValueError) as e:
            log.debug("streaming: %s: %s", conn.peer, e)
        except Exception:  # noqa: BLE001 - one connection's bug must not take the server down
            log.exception("streaming: %s: session failed", conn.peer)
        finally:
            wire.close()
            with self._lock:
                self._conns.discard(conn)

    def _read_request(self, wire: _Wire) -> Request:
        """The request head, read without taking a byte past it: what follows belongs to the upgraded
        protocol, whose reader polls the socket itself."""
        buf = bytearray()
        limit = self.config.max_header_bytes
        tls = self._tls is not None
        try:
            while True:
                if tls:
                    # No MSG_PEEK on TLS: a byte at a time (from OpenSSL's buffer, no system call each).
                    data = wire.recv(1)
                    if not data:
                        raise OSError("client closed the connection before a request")
                    buf += data
                    if buf.endswith(b"\r\n\r\n"):
                        break
                else:
                    peek = wire.recv(min(65536, limit + 4), socket.MSG_PEEK)
                    if not peek:
                        raise OSError("client closed the connection before a request")
                    joined = buf[-3:] + peek
                    end = joined.find(b"\r\n\r\n")
                    take = len(peek) if end < 0 else end + 4 - len(buf[-3:])
                    buf += wire.recv(take)
                    if end >= 0:
                        break
                if len(buf) > limit + 4:
                    raise _BadRequest(431, "request header too large")
        except socket.timeout:
            raise _BadRequest(408, "request header not received in time") from None
        if len(buf) > limit + 4:
            raise _BadRequest(431, "request header too large")
        return parse_head(bytes(buf[:-4]))

    def _route(self, conn: _Connection, req: Request) -> None:
        parts = req.path.split("/")
        if len(parts) != 3 or parts[0] != "" or parts[1] not in ("exec", "attach", "portforward"):
            raise _BadRequest(404, "not found")
        if req.method not in ("GET", "POST"):
            raise _BadRequest(405, "only GET and POST")
        kind = parts[1]
        cached = self.cache.consume(parts[2])
        from proto.runtime.v1 import api_pb2
        want = {"exec": api_pb2.ExecRequest, "attach": api_pb2.AttachRequest,
                "portforward": api_pb2.PortForwardRequest}[kind]
        if not isinstance(cached, want):
            raise _BadRequest(404, "not found")
        if ws.is_websocket_request(req.headers):
            self._websocket(conn, kind, cached, req)
        else:
            self._spdy(conn, kind, cached, req)

    # -------------------------------------------------------------- WebSocket

    def _websocket(self, conn: _Connection, kind: str, cached, req: Request) -> None:
        try:
            key = ws.handshake_key(req.method, req.headers)
        except ws.HandshakeError as e:
            raise _BadRequest(e.status, f"unable to upgrade: {e}") from None
        ports: list[int] = []
        if kind == "portforward":
            try:
                ports = portforward.ports_from_query(req.query)
            except portforward.PortError as e:
                raise _BadRequest(400, str(e)) from None
        supported = (portforward.WS_PROTOCOLS if kind == "portforward" else remotecommand.WS_PROTOCOLS) + [""]
        offered = ws.offered_protocols(req.headers) or [""]
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            raise _BadRequest(403, f"unable to upgrade: requested protocol(s) are not supported: "
                                   f"{show(', '.join(offered), 200)}; supports {', '.join(supported[:-1])}")
        wire = conn.wire
        wire.sendall(ws.handshake_response(key, chosen or None))
        self._upgraded(conn)
        wsconn = ws.WebSocketConnection(wire)

        def linger() -> None:
            wire.deadline = time.monotonic() + LINGER
        if kind == "portforward":
            sid = cached.pod_sandbox_id
            portforward.serve_websocket(wsconn, chosen, ports,
                                        lambda port, d: self.runtime.port_forward(sid, port, d), sid, linger)
        else:
            opts, body, action = self._session_body(kind, cached)
            remotecommand.serve_websocket(wsconn, chosen, opts, body, action, linger,
                                          stdin_eof_needed=kind == "exec")

    def _upgraded(self, conn: _Connection) -> None:
        conn.wire.settimeout(None)
        conn.wire.deadline = None
        conn.wire.last = time.monotonic()
        conn.upgraded = True

    def _session_body(self, kind: str, cached):
        opts = remotecommand.Options(stdin=cached.stdin, stdout=cached.stdout, stderr=cached.stderr,
                                     tty=cached.tty)
        cid = cached.container_id
        if kind == "exec":
            cmd = list(cached.cmd)
            return opts, remotecommand.exec_runner(lambda s: self.runtime.exec(cid, cmd, s), cmd), \
                "executing command in container"
        return opts, remotecommand.attach_runner(lambda s: self.runtime.attach(cid, s)), "attaching to container"

    # -------------------------------------------------------------- SPDY

    def _spdy(self, conn: _Connection, kind: str, cached, req: Request) -> None:
        from . import spdy
        supported = portforward.SPDY_PROTOCOLS if kind == "portforward" else remotecommand.SPDY_PROTOCOLS
        offered = _comma_values(req.headers, "x-stream-protocol-version")
        if not offered:
            raise _BadRequest(400, "unable to upgrade: X-Stream-Protocol-Version is required")
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            raise _BadRequest(403, f"unable to upgrade: unable to negotiate protocol: client supports "
                                   f"{show(', '.join(offered), 200)}, server accepts {', '.join(supported)}",
                              [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])
        if not _is_spdy_upgrade(req.headers):
            raise _BadRequest(400, "unable to upgrade: missing upgrade headers in request "
                                   "(Connection: Upgrade, Upgrade: SPDY/3.1 or websocket)")
        wire = conn.wire
        wire.sendall(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                      f"X-Stream-Protocol-Version: {chosen}\r\n\r\n").encode("ascii"))
        self._upgraded(conn)
        timeout = self.config.stream_creation_timeout
        if kind == "portforward":
            sid = cached.pod_sandbox_id
            pf = portforward.SpdyPortForward(lambda port, d: self.runtime.port_forward(sid, port, d), sid, timeout)
            sconn = spdy.SpdyConnection(wire, pf.on_stream, stall_timeout=self.config.stream_stall_timeout)
            handler = threading.Thread(target=pf.run, args=(sconn,), daemon=True, name="spdy-portforward")
            handler.start()
            try:
                sconn.serve()
            finally:
                sconn.close()
                pf.end()
                handler.join()
            return
        opts, body, action = self._session_body(kind, cached)
        version = remotecommand.spdy_version(chosen)
        collector = remotecommand.StreamCollector(remotecommand.required_streams(version, opts))

        def on_stream(stream) -> None:
            stream.reply()
            collector.add(stream)  # a stream of an unknown type is answered and left unused, as by the kubelet
        sconn = spdy.SpdyConnection(wire, on_stream, stall_timeout=self.config.stream_stall_timeout)
        session = threading.Thread(target=remotecommand.serve_spdy,
                                   args=(sconn, collector, version, opts, body, action, timeout),
                                   daemon=True, name=f"spdy-{kind}")
        session.start()
        try:
            sconn.serve()
        finally:
            sconn.close()
            collector.end()
            session.join()
