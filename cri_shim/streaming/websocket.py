"""RFC 6455 WebSocket, server side: the handshake, framing and the connection that the channel protocols use.

Small and strict, because every byte comes from the client: frames from the
client must be masked, reserved bits and unknown opcodes are protocol errors,
control frames are at most 125 bytes and never fragmented, a message is capped
(`max_message`, close code 1009), text must be UTF-8 (1007), and a close frame
is answered once. Pings are answered with pongs by the reader.
`FrameParser` and `MessageAssembler` are pure (bytes in, frames out) so the
unit tests drive them byte by byte; `WebSocketConnection` puts them on a socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import socket
import struct
import threading
from dataclasses import dataclass

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPS = {OP_CONT, OP_TEXT, OP_BINARY}
_CONTROL_OPS = {OP_CLOSE, OP_PING, OP_PONG}

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR = 1000, 1001, 1002
CLOSE_INVALID_DATA, CLOSE_TOO_BIG, CLOSE_INTERNAL = 1007, 1009, 1011

MAX_MESSAGE = 2 << 20  # the kubernetes Python client sends up to 1 MiB + a channel byte per message


class ProtocolError(Exception):
    """The client broke RFC 6455: the connection is closed with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class HandshakeError(Exception):
    """Not an acceptable WebSocket upgrade: answered with HTTP `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- handshake

def _tokens(headers: dict[str, list[str]], name: str) -> list[str]:
    return [t.strip().lower() for v in headers.get(name, []) for t in v.split(",") if t.strip()]


def is_websocket_request(headers: dict[str, list[str]]) -> bool:
    """The kubelet's wsstream test: Connection has `upgrade` and Upgrade is `websocket`."""
    return "upgrade" in _tokens(headers, "connection") and "websocket" in _tokens(headers, "upgrade")


def offered_protocols(headers: dict[str, list[str]]) -> list[str]:
    """Sec-WebSocket-Protocol values in the client's order of preference (case kept: they are compared exactly)."""
    return [t.strip() for v in headers.get("sec-websocket-protocol", []) for t in v.split(",") if t.strip()]


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode("ascii")


def handshake_key(method: str, headers: dict[str, list[str]]) -> str:
    """The client's Sec-WebSocket-Key after checking the upgrade request; HandshakeError otherwise."""
    if method != "GET":
        raise HandshakeError(405, "a WebSocket upgrade must be a GET request")
    if not is_websocket_request(headers):
        raise HandshakeError(400, "missing WebSocket upgrade headers (Connection: Upgrade, Upgrade: websocket)")
    versions = _tokens(headers, "sec-websocket-version")
    if versions != ["13"]:
        raise HandshakeError(426, "Sec-WebSocket-Version must be 13")
    keys = headers.get("sec-websocket-key", [])
    if len(keys) != 1:
        raise HandshakeError(400, "exactly one Sec-WebSocket-Key header is required")
    key = keys[0].strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64") from None
    return key


def handshake_response(key: str, protocol: str | None) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_key(key)}"]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


# ---------------------------------------------------------------- framing

def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    # XOR as one big integer: linear time without a Python-level loop per byte.
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bytes | None = None,
                 rsv: int = 0) -> bytes:
    """One frame; `mask` (4 bytes) as a client sends it (the server sends unmasked frames)."""
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode
    n = len(payload)
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", first, mbit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, n)
    if mask is not None:
        return head + mask + _mask(payload, mask)
    return head + payload


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


class FrameParser:
    """Incremental frame decoder; `feed` answers the frames completed so far, raises ProtocolError."""

    def __init__(self, max_frame: int = MAX_MESSAGE, require_mask: bool = True) -> None:
        self.max_frame = max_frame
        self.require_mask = require_mask
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while True:
            frame = self._one()
            if frame is None:
                return frames
            frames.append(frame)

    def _one(self) -> Frame | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, rsv, opcode = bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        if rsv:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode in _CONTROL_OPS and (not fin or n > 125):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames must be unfragmented and at most 125 bytes")
        if self.require_mask and not masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n = struct.unpack_from("!H", buf, 2)[0]
            pos = 4
            if n < 126:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "payload length not in its shortest form")
        elif n == 127:
            if len(buf) < 10:
                return None
            n = struct.unpack_from("!Q", buf, 2)[0]
            pos = 10
            if n >> 63:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "payload length has its top bit set")
            if n < 1 << 16:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "payload length not in its shortest form")
        if n > self.max_frame:
            raise ProtocolError(CLOSE_TOO_BIG, f"frame of {n} bytes is over the limit of {self.max_frame}")
        key = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            key = bytes(buf[pos:pos + 4])
            pos += 4
        if len(buf) < pos + n:
            return None
        payload = bytes(buf[pos:pos + n])
        del buf[:pos + n]
        return Frame(fin, opcode, _mask(payload, key) if masked else payload)


class MessageAssembler:
    """Frames → messages: joins fragments (capped at max_message), passes control frames through as they come."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._opcode: int | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, frame: Frame) -> tuple[int, bytes] | None:
        if frame.opcode in _CONTROL_OPS:
            if frame.opcode == OP_CLOSE:
                check_close_payload(frame.payload)
            return frame.opcode, frame.payload
        if frame.opcode == OP_CONT:
            if self._opcode is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
        else:
            if self._opcode is not None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new data frame inside a fragmented message")
            self._opcode = frame.opcode
        self._size += len(frame.payload)
        if self._size > self.max_message:
            raise ProtocolError(CLOSE_TOO_BIG, f"message over the limit of {self.max_message} bytes")
        self._parts.append(frame.payload)
        if not frame.fin:
            return None
        opcode, data = self._opcode, b"".join(self._parts)
        self._opcode, self._parts, self._size = None, [], 0
        if opcode == OP_TEXT:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None
        return opcode, data


def check_close_payload(payload: bytes) -> None:
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
    if len(payload) >= 2:
        code = struct.unpack("!H", payload[:2])[0]
        if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


# ---------------------------------------------------------------- connection

class WebSocketConnection:
    """A server-side WebSocket on a connected socket (after the 101 answer).

    One reader thread calls `recv_message`; any thread may `send`. `closed` is
    set once the connection is over (close frames exchanged, the peer gone, a
    protocol error, or `abort`). `aborted` is set by `abort` (or shared with
    the socket's own, when it has one: the streaming server's wire sets it
    when it cuts the client off), for threads that wait on something other
    than the socket.
    """

    def __init__(self, sock, *, initial: bytes = b"", max_message: int = MAX_MESSAGE) -> None:
        self.sock = sock
        self._parser = FrameParser(max_frame=max_message)
        self._assembler = MessageAssembler(max_message)
        self._pending: list[tuple[int, bytes]] = []
        self._initial = initial
        self._send_lock = threading.Lock()
        self.close_sent = False
        self.closed = threading.Event()
        self.aborted: threading.Event = getattr(sock, "aborted", None) or threading.Event()

    def recv_message(self) -> tuple[int, bytes] | None:
        """The next text or binary message; None once the connection is over. Answers pings and close."""
        while not self.closed.is_set():
            while self._pending:
                opcode, data = self._pending.pop(0)
                if opcode == OP_PING:
                    self._send_quiet(OP_PONG, data)
                elif opcode == OP_PONG:
                    continue
                elif opcode == OP_CLOSE:
                    code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else CLOSE_NORMAL
                    self.close(code)
                    self.closed.set()
                    return None
                else:
                    return opcode, data
            if self._initial:
                data, self._initial = self._initial, b""
            else:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
            if not data:
                self.closed.set()
                return None
            try:
                for frame in self._parser.feed(data):
                    message = self._assembler.add(frame)
                    if message is not None:
                        self._pending.append(message)
            except ProtocolError as e:
                self.close(e.code, str(e))
                self.closed.set()
                return None
        return None

    def send(self, opcode: int, data: bytes) -> None:
        """One unfragmented message; BrokenPipeError once the connection is closing or gone."""
        if self.close_sent or self.closed.is_set():
            raise BrokenPipeError("the WebSocket connection is closed")
        frame = encode_frame(opcode, data)
        with self._send_lock:
            if self.close_sent:
                raise BrokenPipeError("the WebSocket connection is closed")
            try:
                self.sock.sendall(frame)
            except OSError as e:
                self.closed.set()
                raise BrokenPipeError(f"the WebSocket client has gone: {e}") from None

    def _send_quiet(self, opcode: int, data: bytes) -> None:
        try:
            self.send(opcode, data)
        except BrokenPipeError:
            pass

    def abort(self) -> None:
        """End at once, without a close handshake (a client that reads nothing would never get ours)."""
        self.aborted.set()
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader and any sender
        except OSError:
            pass

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send our close frame once (the reader then waits for the client's)."""
        with self._send_lock:
            if self.close_sent:
                return
            self.close_sent = True
            try:
                self.sock.sendall(encode_frame(OP_CLOSE, close_payload(code, reason)))
            except OSError:
                self.closed.set()
