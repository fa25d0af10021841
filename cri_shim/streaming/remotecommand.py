"""remotecommand: exec and attach over SPDY/3.1 or WebSocket, as the kubelet's streaming server speaks it.

SPDY (`X-Stream-Protocol-Version`): the client opens one stream per
channel, each with a `streamType` header: `error`, then `stdin`, `stdout`,
`stderr` (not with a tty) and, from v3 on with a tty, `resize`. The server
answers each stream as it comes and waits (the stream-creation timeout, the
kubelet's 30 s) until every stream the request's options call for is there.
`v5.channel.k8s.io` is served as v4 (v5 only adds a close signal, which SPDY
has natively as FIN).

WebSocket (`Sec-WebSocket-Protocol`, the kubelet's wsstream): one
connection, each message prefixed with its channel (0 stdin, 1 stdout, 2
stderr, 3 error, 4 resize); `base64.` protocols send text messages whose
first character is the channel digit and the rest base64. The server first
sends an empty message on the lowest writable channel (the client's sign
that the session is up). `v5.channel.k8s.io` adds the close signal: a
message on channel 255 naming a channel the client has closed (its stdin
EOF).

The status goes on the error channel: from v4 on as JSON metav1.Status
(`Success`; `Failure` with reason `NonZeroExitCode` and an `ExitCode`
cause for a command that exited non-zero; `InternalError` with the message
otherwise), before v4 as plain text and nothing for success, which is what
client-go's decoders for each version expect.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from .backend import Session
from . import websocket as ws

log = logging.getLogger("vmlet.streaming")

V1, V2, V3, V4, V5 = ("channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io", "v4.channel.k8s.io",
                      "v5.channel.k8s.io")
# Preference when the client offers several: the client's order decides (negotiation picks its first we know).
SPDY_PROTOCOLS = [V5, V4, V3, V2, V1]
_SPDY_VERSION = {V5: 4, V4: 4, V3: 3, V2: 2, V1: 1}

WS_V4_BASE64, WS_BASE64 = "v4.base64.channel.k8s.io", "base64.channel.k8s.io"
# The kubelet's wsstream list plus v5; "" is a client that offered no protocol (binary, pre-v4 status).
WS_PROTOCOLS = [V5, V4, WS_V4_BASE64, V1, WS_BASE64]

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE_SIGNAL = 255
STREAM_TYPES = {"error": ERROR, "stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "resize": RESIZE}

NON_ZERO_EXIT = "NonZeroExitCode"
EXIT_CODE_CAUSE = "ExitCode"
MAX_WS_OUT_MESSAGE = 256 * 1024  # a large write goes out as several messages
PIPE_CAPACITY = 1 << 20


@dataclass(frozen=True)
class Options:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


# ---------------------------------------------------------------- status

def status_success() -> dict:
    return {"metadata": {}, "status": "Success"}


def exit_code_for_client(code: int) -> int:
    """client-go reads the exit code as a uint8: a signal death (-N) becomes 128+N, larger codes 255."""
    if code < 0:
        code = 128 - code
    return min(code, 255)


def status_exit(code: int, what: str) -> dict:
    rc = exit_code_for_client(code)
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: {what} exited with {rc}",
            "reason": NON_ZERO_EXIT,
            "details": {"causes": [{"reason": EXIT_CODE_CAUSE, "message": str(rc)}]}}


def status_internal(message: str) -> dict:
    """apierrors.NewInternalError: what the kubelet sends when the runtime call itself failed."""
    return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {message}",
            "reason": "InternalError", "details": {"causes": [{"message": message}]}, "code": 500}


def encode_status(status: dict, json_status: bool) -> bytes:
    """The error-channel bytes: JSON for v4+, else the message (nothing for success)."""
    if json_status:
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return status.get("message", "").encode()


def exec_runner(run: Callable[[Session], int], cmd: list[str]) -> Callable[[Session], dict]:
    """The session body of an exec: run the command, its exit code as the status."""
    what = " ".join(cmd)[:200]

    def body(session: Session) -> dict:
        code = run(session)
        if code == 0:
            return status_success()
        return status_exit(code, f"command {what!r}")
    return body


def attach_runner(run: Callable[[Session], None]) -> Callable[[Session], dict]:
    def body(session: Session) -> dict:
        run(session)
        return status_success()
    return body


def run_body(body: Callable[[Session], dict], session: Session, action: str) -> tuple[dict, bool]:
    """Call the runtime: (the status for the client, whether to cut the client off instead of telling it).

    A CRIError (or a bug) becomes the Failure status the client shows. RESOURCE_EXHAUSTED is the
    runtime's word that the client read too little of its output (attach's overrun): such a client
    would not read the status either, and a writer of the session may still be blocked on it, so the
    connection is to be aborted at once.
    """
    import grpc
    from ..errors import CRIError
    try:
        return body(session), False
    except CRIError as e:
        return status_internal(f"error {action}: {e.message}"), e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    except Exception as e:  # noqa: BLE001 - a bug in a runtime function must not kill the server
        log.exception("%s failed", action)
        return status_internal(f"error {action}: internal error: {e}"), False


def status_bad_request(message: str) -> dict:
    return {"metadata": {}, "status": "Failure", "message": message, "reason": "BadRequest", "code": 400}


def refuse_body(status: dict) -> Callable[[Session], dict]:
    """A session body that does not call the runtime: it answers `status`."""
    return lambda session: status


def stdin_eof_refusal(protocol: str) -> dict | None:
    """Exec with stdin over a WebSocket protocol that cannot say "end of stdin" (anything but v5): the
    runtime takes stdin whole before it starts the command, so that command could never start."""
    if protocol == V5:
        return None
    return status_bad_request(
        f"stdin: exec with stdin needs a protocol that signals the end of stdin: {V5} over WebSocket, or "
        f"SPDY; the client negotiated {protocol or 'no protocol'}, where stdin ends only with the connection")


# ---------------------------------------------------------------- resize

class ResizeDecoder:
    """A stream of JSON TerminalSize objects ({"Width": w, "Height": h}, keys case-insensitive as in Go).

    Like the kubelet's json.Decoder loop it stops at the first value that is
    not a size; the buffer is capped, so a client sending garbage costs 4 KiB.
    """

    MAX_BUFFER = 4096

    def __init__(self) -> None:
        self._buf = ""
        self._raw = b""
        self.failed = False
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        if self.failed:
            return []
        self._raw += data
        try:
            text = self._raw.decode("utf-8")
            self._raw = b""
        except UnicodeDecodeError as e:
            if len(self._raw) - e.start > 3:
                self.failed = True
                return []
            text, self._raw = self._raw[:e.start].decode("utf-8"), self._raw[e.start:]
        self._buf += text
        sizes = []
        while True:
            s = self._buf.lstrip()
            if not s:
                self._buf = ""
                break
            try:
                value, end = self._decoder.raw_decode(s)
            except json.JSONDecodeError:
                self._buf = s
                if len(s) > self.MAX_BUFFER:
                    self.failed = True
                break
            self._buf = s[end:]
            size = _terminal_size(value)
            if size is None:
                self.failed = True
                break
            sizes.append(size)
        return sizes


def _terminal_size(value) -> tuple[int, int] | None:
    if not isinstance(value, dict):
        return None
    fields = {k.lower(): v for k, v in value.items()}
    w, h = fields.get("width", 0), fields.get("height", 0)
    for v in (w, h):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF:
            return None
    return w, h


def push_resize(session: Session, size: tuple[int, int]) -> None:
    """Newest size wins: a full queue drops its oldest entry rather than blocking the reader."""
    while True:
        try:
            session.resize.put_nowait(size)
            return
        except queue.Full:
            try:
                session.resize.get_nowait()
            except queue.Empty:
                pass


# ---------------------------------------------------------------- SPDY

def spdy_version(protocol: str) -> int:
    return _SPDY_VERSION[protocol]


def required_streams(version: int, opts: Options) -> set[int]:
    """The streams a client of this version creates for these options (the kubelet's expectedStreams)."""
    need = {ERROR}
    if opts.stdin:
        need.add(STDIN)
    if opts.stdout:
        need.add(STDOUT)
    if opts.stderr and not opts.tty:
        need.add(STDERR)
    if opts.tty and version >= 3:
        need.add(RESIZE)
    return need


class StreamCollector:
    """Gathers a SPDY client's streams by type; `wait` returns them once all required ones are there."""

    def __init__(self, need: set[int]) -> None:
        self.need = need
        self.streams: dict[int, object] = {}
        self._cond = threading.Condition()
        self._ended = False

    def add(self, stream) -> bool:
        """From the SPDY reader: False for a stream of an unknown type (the caller resets it)."""
        kind = STREAM_TYPES.get(stream.headers.get("streamtype", ""))
        if kind is None:
            return False
        with self._cond:
            # A second stream of a type replaces the first, as in the kubelet.
            self.streams[kind] = stream
            self._cond.notify_all()
        return True

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> dict[int, object] | None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._ended or self.need <= self.streams.keys(), timeout)
            if not ok or not self.need <= self.streams.keys():
                return None
            return dict(self.streams)


def serve_spdy(conn, collector: StreamCollector, version: int, opts: Options, body: Callable[[Session], dict],
               action: str, creation_timeout: float) -> None:
    """The session thread of a SPDY exec/attach: wait for the streams, run the runtime, send the status.

    `conn` is the SpdyConnection, served by another thread that calls
    `collector.end()` when the connection is over.
    """
    streams = collector.wait(creation_timeout)
    if streams is None:
        if not conn.closed.is_set():
            log.info("%s: timed out waiting for the client to create streams %s", action,
                     sorted(collector.need - collector.streams.keys()))
        conn.close()
        return
    session = Session(stdin=streams.get(STDIN) if opts.stdin else None,
                      stdout=streams.get(STDOUT) if opts.stdout else None,
                      stderr=streams.get(STDERR) if opts.stderr and not opts.tty else None,
                      tty=opts.tty)
    watcher = threading.Thread(target=_set_when, args=(conn.closed, session.closed), daemon=True,
                               name="spdy-session-watch")
    watcher.start()
    resizer = None
    if opts.tty and RESIZE in streams:
        resizer = threading.Thread(target=_read_resize, args=(streams[RESIZE], session), daemon=True,
                                   name="spdy-resize")
        resizer.start()
    status, cut_off = run_body(body, session, action)
    if cut_off:
        log.info("%s: the client read too little of the output: disconnecting it", action)
        session.closed.set()
        conn.abort()  # wakes a writer still blocked on the client, which a status would queue behind
        watcher.join(5)
        if resizer is not None:
            resizer.join(5)
        return
    try:
        err = streams[ERROR]
        data = encode_status(status, json_status=version >= 4)
        if data:
            err.write(data)
        for kind in (STDOUT, STDERR, ERROR):
            if kind in streams:
                streams[kind].close_write()
    except (BrokenPipeError, OSError):
        pass  # the client has gone: nothing to tell it
    finally:
        session.closed.set()
        conn.close()
        watcher.join(5)
        if resizer is not None:
            resizer.join(5)


def _set_when(source: threading.Event, target: threading.Event) -> None:
    while not target.is_set():
        if source.wait(0.5):
            target.set()
            return


def _read_resize(stream, session: Session) -> None:
    decoder = ResizeDecoder()
    while True:
        data = stream.read(4096)
        if not data:
            return
        for size in decoder.feed(data):
            push_resize(session, size)


# ---------------------------------------------------------------- WebSocket

class Pipe:
    """Bytes from the connection's reader to the runtime: bounded (the reader waits while it is full).

    The reader's wait ends when the runtime reads, when the pipe is closed or
    aborted (the runtime is done with it: later bytes are dropped), or when
    `cancel` is set (the connection was cut off by the server).
    """

    _CHECK = 0.5  # how often a waiting feed looks at `cancel`

    def __init__(self, capacity: int = PIPE_CAPACITY, cancel: threading.Event | None = None) -> None:
        self.capacity = capacity
        self.cancel = cancel
        self._buf = bytearray()
        self._eof = False
        self._cond = threading.Condition()

    def feed(self, data: bytes) -> bool:
        """False when the data was dropped (the pipe is closed, or `cancel` was set while waiting)."""
        with self._cond:
            while not (self._eof or len(self._buf) < self.capacity):
                if self.cancel is not None and self.cancel.is_set():
                    return False
                self._cond.wait(self._CHECK if self.cancel is not None else None)
            if self._eof:
                return False
            self._buf += data
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """EOF once the buffered bytes are read."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._eof = True
            self._buf.clear()
            self._cond.notify_all()

    def read(self, n: int = 65536) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._eof or self._buf)
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self._cond.notify_all()
            return data


class ChannelWriter:
    """Writes to one WebSocket channel (binary: channel byte + data; base64: digit + base64 text)."""

    def __init__(self, conn: ws.WebSocketConnection, channel: int, binary: bool) -> None:
        self.conn, self.channel, self.binary = conn, channel, binary

    def message(self, data: bytes) -> None:
        if self.binary:
            self.conn.send(ws.OP_BINARY, bytes([self.channel]) + data)
        else:
            self.conn.send(ws.OP_TEXT, str(self.channel).encode() + base64.b64encode(data))

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_WS_OUT_MESSAGE):
            self.message(bytes(data[i:i + MAX_WS_OUT_MESSAGE]))


def decode_ws_message(opcode: int, data: bytes, binary: bool) -> tuple[int, bytes] | None:
    """(channel, payload) of a client message; None for one that carries no channel.

    The frame type does not matter (the kubernetes Python client sends str
    stdin as text frames on binary protocols; wsstream reads both alike).
    """
    if not data or opcode not in (ws.OP_BINARY, ws.OP_TEXT):
        return None
    if binary:
        return data[0], data[1:]
    if not 0x30 <= data[0] <= 0x39:
        return None
    try:
        return data[0] - 0x30, base64.b64decode(data[1:], validate=True)
    except (ValueError, binascii.Error):
        return None


def ws_channel_messages(conn, binary: bool):
    """(channel, payload) of every client message that carries a channel, until the connection ends."""
    while (message := conn.recv_message()) is not None:
        decoded = decode_ws_message(*message, binary)
        if decoded is not None:
            yield decoded


def serve_websocket(conn: ws.WebSocketConnection, protocol: str, opts: Options, body: Callable[[Session], dict],
                    action: str, linger: Callable[[], None], stdin_eof_needed: bool = False) -> None:
    """A WebSocket exec/attach, run in the connection's thread: this thread reads, the session runs in its own.

    `linger` is called once the session is over and our close frame is out:
    the server then gives the client a few seconds to answer it.
    `stdin_eof_needed`: the runtime reads stdin to its end before it starts
    (exec): with stdin on a protocol without a close signal, the session is
    refused with a Failure status instead of waiting for an EOF that only
    the connection's end brings.
    """
    binary = protocol not in (WS_V4_BASE64, WS_BASE64)
    json_status = protocol in (V4, V5, WS_V4_BASE64)
    refusal = stdin_eof_refusal(protocol) if stdin_eof_needed and opts.stdin else None
    if refusal is not None:
        body, opts = refuse_body(refusal), Options(False, opts.stdout, opts.stderr, opts.tty)
    stdin = Pipe(cancel=conn.aborted) if opts.stdin else None
    session = Session(stdin=stdin,
                      stdout=ChannelWriter(conn, STDOUT, binary) if opts.stdout else None,
                      stderr=ChannelWriter(conn, STDERR, binary) if opts.stderr and not opts.tty else None,
                      tty=opts.tty)
    first = STDOUT if opts.stdout else STDERR if opts.stderr and not opts.tty else ERROR
    try:
        ChannelWriter(conn, first, binary).message(b"")
    except BrokenPipeError:
        return

    def run() -> None:
        status, cut_off = run_body(body, session, action)
        try:
            if stdin is not None:
                stdin.abort()  # nobody reads it any more: the reader drops what the client still sends
            if cut_off:
                log.info("%s: the client read too little of the output: disconnecting it", action)
                conn.abort()  # wakes a writer still blocked on the client, which a status would queue behind
                return
            data = encode_status(status, json_status)
            if data:
                ChannelWriter(conn, ERROR, binary).write(data)
        except BrokenPipeError:
            pass
        finally:
            session.closed.set()
            conn.close(ws.CLOSE_NORMAL)
            linger()
    worker = threading.Thread(target=run, daemon=True, name=f"ws-{action.split()[0]}")
    worker.start()
    resize = ResizeDecoder() if opts.tty else None
    try:
        for channel, data in ws_channel_messages(conn, binary):
            if channel == STDIN and stdin is not None:
                if data:
                    stdin.feed(data)
            elif channel == RESIZE and resize is not None:
                for size in resize.feed(data):
                    push_resize(session, size)
            elif channel == CLOSE_SIGNAL and protocol == V5 and data[:1] == bytes([STDIN]) and stdin is not None:
                stdin.close()
    finally:
        # The client has gone (or answered our close): the runtime sees EOF and `closed`.
        if stdin is not None:
            stdin.abort() if not conn.close_sent else stdin.close()
        session.closed.set()
        worker.join()
