"""Port-forward over SPDY (`portforward.k8s.io`) or WebSocket, as the kubelet's streaming server serves it.

SPDY: every forwarded connection is a pair of client streams with the same
`requestID` header (older clients without one: paired by stream ID, error
stream n and data stream n+2), `streamType` `error` or `data` and a `port`
header (1-65535; a stream without a valid one is reset). A complete pair is
one `backend.Duplex` handed to the runtime's forward function in a thread of
its own; what that raises is written to the pair's error stream
("error forwarding port P to pod ..."), then both streams are closed. A pair
still incomplete after the stream-creation timeout gets "timed out waiting
for streams" on the stream it has.

WebSocket: the ports come from the `port` query parameters (the kubelet's
name; `ports`, what the kubernetes Python client sends, is accepted too),
each port i has a data channel 2i and an error channel 2i+1, and both start
with the port as two little-endian bytes. The connection ends when every
port's forward has ended; data for a port whose forward has ended is
dropped (it must not hold up the reader, and so the other ports).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Callable

from . import websocket as ws
from .remotecommand import ChannelWriter, Pipe, ws_channel_messages

log = logging.getLogger("vmlet.streaming")

PROTOCOL = "portforward.k8s.io"
SPDY_PROTOCOLS = [PROTOCOL]
WS_V4, WS_V4_BASE64 = "v4.channel.k8s.io", "v4.base64.channel.k8s.io"
WS_PROTOCOLS = [WS_V4, WS_V4_BASE64, PROTOCOL]
MAX_WS_PORTS = 32

Forward = Callable[[int, object], None]  # (port, Duplex) -> None; raises CRIError


class PortError(ValueError):
    pass


def parse_port(value: str, what: str) -> int:
    if not value or not value.isdigit() or len(value) > 5:
        raise PortError(f"unable to parse {value[:32]!r} as a port in {what}")
    port = int(value)
    if not 1 <= port <= 65535:
        raise PortError(f"port {port} in {what} must be between 1 and 65535")
    return port


def ports_from_query(query: dict[str, list[str]]) -> list[int]:
    values = query.get("port", []) + query.get("ports", [])
    if not values:
        raise PortError('query parameter "port" is required')
    ports = []
    for value in values:
        if not value:
            raise PortError('query parameter "port" cannot be empty')
        for p in value.split(","):
            ports.append(parse_port(p.strip(), 'query parameter "port"'))
    if len(ports) > MAX_WS_PORTS:
        raise PortError(f"at most {MAX_WS_PORTS} ports per connection")
    return ports


def forward_error(port: int, pod: str, err: Exception) -> str:
    from ..errors import CRIError
    detail = err.message if isinstance(err, CRIError) else f"internal error: {err}"
    return f"error forwarding port {port} to pod {pod}: {detail}"


def _run_forward(forward: Forward, port: int, duplex, pod: str, report: Callable[[str], None]) -> None:
    from ..errors import CRIError
    try:
        forward(port, duplex)
    except CRIError as e:
        report(forward_error(port, pod, e))
    except Exception as e:  # noqa: BLE001 - a runtime bug must not kill the server
        log.exception("port-forward to %s port %d failed", pod, port)
        report(forward_error(port, pod, e))


# ---------------------------------------------------------------- SPDY

class SpdyDuplex:
    """One forwarded connection (the data stream of a pair)."""

    def __init__(self, data) -> None:
        self._data = data
        self.closed = threading.Event()

    def read(self, n: int = 65536) -> bytes:
        if self.closed.is_set():
            return b""
        return self._data.read(n)

    def write(self, data: bytes) -> None:
        if self.closed.is_set():
            raise BrokenPipeError("the port-forward client has gone")
        self._data.write(data)

    def close_write(self) -> None:
        try:
            self._data.close_write()
        except (BrokenPipeError, OSError):
            pass


class SpdyPortForward:
    """Pairs a SPDY connection's streams and runs a forward per pair.

    `on_stream` is the SpdyConnection callback (the reader thread: never
    blocks); `run` is the handler thread (timeouts); `end` is called when the
    connection is over.
    """

    def __init__(self, forward: Forward, pod: str, creation_timeout: float) -> None:
        self.forward, self.pod, self.creation_timeout = forward, pod, creation_timeout
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[float, dict[str, object]]] = {}
        self._active: set[threading.Thread] = set()
        self._duplexes: set[SpdyDuplex] = set()
        self._ended = threading.Event()

    def check(self, headers: dict[str, str]) -> str | None:
        """Why a stream is refused (None: accepted), the kubelet's httpStreamReceived checks."""
        port = headers.get("port", "")
        if not port:
            return '"port" header is required'
        try:
            parse_port(port, '"port" header')
        except PortError as e:
            return str(e)
        kind = headers.get("streamtype", "")
        if not kind:
            return '"streamType" header is required'
        if kind not in ("error", "data"):
            return f"invalid stream type {kind[:32]!r}"
        return None

    def on_stream(self, stream) -> None:
        from . import spdy
        why = self.check(stream.headers)
        if why is not None:
            log.info("port-forward: stream %d refused: %s", stream.id, why)
            stream.reset(spdy.REFUSED_STREAM)
            return
        stream.reply()
        kind = stream.headers["streamtype"]
        request_id = stream.headers.get("requestid", "")
        if not request_id:
            # Clients without request IDs open error n then data n+2.
            request_id = str(stream.id if kind == "error" else stream.id - 2)
        with self._lock:
            deadline, pair = self._pending.setdefault(request_id, (time.monotonic() + self.creation_timeout, {}))
            if kind in pair:
                self._write_error(stream, f"error processing stream for request {request_id}: "
                                          f"{kind} stream already assigned")
                stream.close_write()
                return
            pair[kind] = stream
            if len(pair) < 2:
                return
            del self._pending[request_id]
            if self._ended.is_set():
                return
            thread = threading.Thread(target=self._forward_pair, args=(pair,), daemon=True,
                                      name=f"portforward-{request_id[:16]}")
            self._active.add(thread)
        thread.start()

    @staticmethod
    def _write_error(stream, message: str) -> None:
        try:
            stream.write(message.encode())
        except (BrokenPipeError, OSError):
            pass

    def _forward_pair(self, pair: dict[str, object]) -> None:
        data, error = pair["data"], pair["error"]
        port = int(data.headers["port"])
        duplex = SpdyDuplex(data)
        with self._lock:
            self._duplexes.add(duplex)
        if self._ended.is_set():
            duplex.closed.set()
        try:
            _run_forward(self.forward, port, duplex, self.pod, lambda msg: self._write_error(error, msg))
        finally:
            for s in (data, error):
                try:
                    s.close_write()
                except (BrokenPipeError, OSError):
                    pass
            duplex.closed.set()
            with self._lock:
                self._duplexes.discard(duplex)
                self._active.discard(threading.current_thread())

    def run(self, conn) -> None:
        """Handler thread: expire incomplete pairs until the connection ends, then wait for the forwards."""
        while not self._ended.wait(0.5):
            now = time.monotonic()
            with self._lock:
                expired = [(rid, pair) for rid, (deadline, pair) in self._pending.items() if deadline <= now]
                for rid, _ in expired:
                    del self._pending[rid]
            for rid, pair in expired:
                for stream in pair.values():
                    self._write_error(stream, f"error processing stream for request {rid}: "
                                              "timed out waiting for streams")
                    try:
                        stream.close_write()
                    except (BrokenPipeError, OSError):
                        pass
        with self._lock:
            active = list(self._active)
        for thread in active:
            thread.join()

    def end(self) -> None:
        """The connection is over: every forward sees `closed`."""
        with self._lock:
            self._ended.set()
            duplexes = list(self._duplexes)
        for d in duplexes:
            d.closed.set()


# ---------------------------------------------------------------- WebSocket

class WsDuplex:
    def __init__(self, pipe: Pipe, writer: ChannelWriter, closed: threading.Event) -> None:
        self._pipe, self._writer = pipe, writer
        self.closed = closed

    def read(self, n: int = 65536) -> bytes:
        return self._pipe.read(n)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def close_write(self) -> None:
        # v4 channels have no half-close on the wire (the kubelet's wsstream sends nothing either).
        pass


def serve_websocket(conn: ws.WebSocketConnection, protocol: str, ports: list[int], forward: Forward, pod: str,
                    linger: Callable[[], None]) -> None:
    """A WebSocket port-forward, run in the connection's thread (the reader); a thread per port forwards."""
    binary = protocol != WS_V4_BASE64
    closed = threading.Event()
    pipes = [Pipe(cancel=conn.aborted) for _ in ports]
    try:
        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            ChannelWriter(conn, 2 * i, binary).message(prefix)
            ChannelWriter(conn, 2 * i + 1, binary).message(prefix)
    except BrokenPipeError:
        return
    remaining = [len(ports)]
    lock = threading.Lock()

    def one(i: int, port: int) -> None:
        duplex = WsDuplex(pipes[i], ChannelWriter(conn, 2 * i, binary), closed)
        err = ChannelWriter(conn, 2 * i + 1, binary)

        def report(message: str) -> None:
            try:
                err.write(message.encode())
            except BrokenPipeError:
                pass
        try:
            _run_forward(forward, port, duplex, pod, report)
        finally:
            pipes[i].abort()  # this port's forward is over: what the client still sends on it is dropped
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                conn.close(ws.CLOSE_NORMAL)
                linger()
    workers = [threading.Thread(target=one, args=(i, p), daemon=True, name=f"ws-portforward-{p}")
               for i, p in enumerate(ports)]
    for w in workers:
        w.start()
    try:
        for channel, data in ws_channel_messages(conn, binary):
            if channel % 2 == 0 and channel // 2 < len(pipes) and data:
                pipes[channel // 2].feed(data)
    finally:
        closed.set()
        for p in pipes:
            p.close()
        for w in workers:
            w.join()
