"""SPDY/3.1 framing, server side, as Kubernetes streaming uses it (kubelet, crictl, client-go).

Two layers:
- a pure codec: `FrameEncoder` (frame objects -> bytes) and `FrameDecoder`
  (bytes -> frame objects, fed incrementally, any split); header blocks are
  zlib-compressed with the SPDY/3 dictionary, one compression context per
  direction for the connection's lifetime, as the protocol requires;
- `SpdyConnection` / `SpdyStream`: one connection over a connected socket
  (after the HTTP 101 answer), the peer's streams handed to a callback.

Flow control. The clients that speak SPDY to a CRI streaming server are all
built on moby/spdystream, which neither sends WINDOW_UPDATE nor honours it
(its frame handler drops WINDOW_UPDATE and SETTINGS as unhandled frames).
So this server never waits for send window: writes are bounded by TCP
back-pressure alone (a client that does not read blocks its own
connection's writers; the socket under the connection bounds how long).
For reads it grants window as the application consumes, so a peer that
does honour SPDY/3.1 windows never stalls, and for peers that ignore
windows it bounds what it buffers per stream (`max_buffered`): when a
stream's buffer is full the reader waits for the application to drain it
(TCP back-pressure, so a fast client and a slower consumer still move
every byte), but only while the application keeps taking bytes: a stream
whose application takes nothing for `stall_timeout` seconds is reset with
FLOW_CONTROL_ERROR and its data dropped, so one stuck stream cannot hold
up the connection's other streams, PINGs and RST_STREAMs for good.

Hostile input (bad lengths, unknown versions, oversize or undecompressable
header blocks, zlib bombs) ends the connection with GOAWAY(PROTOCOL_ERROR);
no thread is started here, nothing is buffered without bound.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Union

log = logging.getLogger(__name__)

VERSION = 3

# Control frame types.
TYPE_SYN_STREAM = 1
TYPE_SYN_REPLY = 2
TYPE_RST_STREAM = 3
TYPE_SETTINGS = 4
TYPE_PING = 6
TYPE_GOAWAY = 7
TYPE_HEADERS = 8
TYPE_WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
INVALID_CREDENTIALS = 10
FRAME_TOO_LARGE = 11

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

MAX_STREAM_ID = 0x7FFFFFFF
MAX_FRAME_LENGTH = 0xFFFFFF  # 24-bit length field
INITIAL_WINDOW = 64 * 1024  # SPDY/3.1's default per-stream and connection window
MAX_SETTINGS_ENTRIES = 256  # eight ids exist; a peer repeating them beyond this is hostile
MAX_DATA_CHUNK = 64 * 1024  # DATA frames are delivered (and sent) in pieces of at most this

# The header compression dictionary of the SPDY/3 spec (section 2.6.10.1):
# length-prefixed words, then a run of status codes, reason phrases, dates and common values.
_DICT_WORDS = (
    'options', 'head', 'post', 'put', 'delete', 'trace', 'accept', 'accept-charset', 'accept-encoding',
    'accept-language', 'accept-ranges', 'age', 'allow', 'authorization', 'cache-control', 'connection',
    'content-base', 'content-encoding', 'content-language', 'content-length', 'content-location',
    'content-md5', 'content-range', 'content-type', 'date', 'etag', 'expect', 'expires', 'from', 'host',
    'if-match', 'if-modified-since', 'if-none-match', 'if-range', 'if-unmodified-since', 'last-modified',
    'location', 'max-forwards', 'pragma', 'proxy-authenticate', 'proxy-authorization', 'range', 'referer',
    'retry-after', 'server', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'user-agent', 'vary', 'via',
    'warning', 'www-authenticate', 'method', 'get', 'status', '200 OK', 'version', 'HTTP/1.1', 'url', 'public',
    'set-cookie', 'keep-alive', 'origin',
)
_DICT_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    b"403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    b"Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    b"chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    b"text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


def _build_dictionary() -> bytes:
    return b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICT_WORDS) + _DICT_TAIL


DICTIONARY = _build_dictionary()


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must end (GOAWAY with `status`)."""

    def __init__(self, message: str, status: int = GOAWAY_PROTOCOL_ERROR):
        super().__init__(message)
        self.status = status
        self.frames: list = []  # from FrameDecoder.feed: the frames completed before the bad one


# ---------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes = b""
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    associated_id: int = 0
    priority: int = 0  # 0 (highest) .. 7
    slot: int = 0
    fin: bool = False
    unidirectional: bool = False


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    # (flags, id, value) triples, in the order sent.
    entries: tuple[tuple[int, int, int], ...] = ()
    clear: bool = False


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GOAWAY_OK


@dataclass(frozen=True)
class Headers:
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    fin: bool = False


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int  # 0: the connection's window (SPDY/3.1)
    delta: int


Frame = Union[DataFrame, SynStream, SynReply, RstStream, Settings, Ping, GoAway, Headers, WindowUpdate]


# ---------------------------------------------------------------------------------------------
# Codec


def _encode_header_block(headers: dict[str, str]) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        if not isinstance(name, str) or not name or name != name.lower() or "\x00" in name:
            raise ValueError(f"SPDY header name {name!r}: must be a non-empty lower-case string without NUL")
        nb = name.encode("latin-1")
        vb = str(value).encode("latin-1")
        out.append(struct.pack(">I", len(nb)) + nb + struct.pack(">I", len(vb)) + vb)
    return b"".join(out)


def _check_u31(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= MAX_STREAM_ID:
        raise ValueError(f"{name} {value!r}: must be an integer in 0..2^31-1")


def _check_u32(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value!r}: must be an integer in 0..2^32-1")


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError(f"control frame payload of {len(payload)} bytes: over the 24-bit length")
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


class FrameEncoder:
    """Frames -> bytes. Holds this direction's header compression context: encode in send order."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def _compress(self, headers: dict[str, str]) -> bytes:
        block = _encode_header_block(headers)
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def encode(self, frame: Frame) -> bytes:
        if isinstance(frame, DataFrame):
            _check_u31("stream_id", frame.stream_id)
            if frame.stream_id == 0:
                raise ValueError("DATA frame: stream_id 0 is reserved")
            if len(frame.data) > MAX_FRAME_LENGTH:
                raise ValueError(f"DATA frame of {len(frame.data)} bytes: over the 24-bit length")
            flags = FLAG_FIN if frame.fin else 0
            return struct.pack(">II", frame.stream_id, (flags << 24) | len(frame.data)) + bytes(frame.data)
        if isinstance(frame, SynStream):
            _check_u31("stream_id", frame.stream_id)
            _check_u31("associated_id", frame.associated_id)
            if not 0 <= frame.priority <= 7 or not 0 <= frame.slot <= 255:
                raise ValueError(f"SYN_STREAM priority {frame.priority} / slot {frame.slot}: out of range")
            flags = (FLAG_FIN if frame.fin else 0) | (FLAG_UNIDIRECTIONAL if frame.unidirectional else 0)
            payload = struct.pack(">IIBB", frame.stream_id, frame.associated_id, frame.priority << 5, frame.slot)
            return _control(TYPE_SYN_STREAM, flags, payload + self._compress(frame.headers))
        if isinstance(frame, (SynReply, Headers)):
            _check_u31("stream_id", frame.stream_id)
            kind = TYPE_SYN_REPLY if isinstance(frame, SynReply) else TYPE_HEADERS
            payload = struct.pack(">I", frame.stream_id) + self._compress(frame.headers)
            return _control(kind, FLAG_FIN if frame.fin else 0, payload)
        if isinstance(frame, RstStream):
            _check_u31("stream_id", frame.stream_id)
            _check_u32("status", frame.status)
            return _control(TYPE_RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status))
        if isinstance(frame, Settings):
            parts = [struct.pack(">I", len(frame.entries))]
            for flags, sid, value in frame.entries:
                if not 0 <= flags <= 0xFF or not 0 <= sid <= 0xFFFFFF:
                    raise ValueError(f"SETTINGS entry ({flags}, {sid}): flags or id out of range")
                _check_u32("SETTINGS value", value)
                parts.append(struct.pack(">II", (flags << 24) | sid, value))
            return _control(TYPE_SETTINGS, FLAG_SETTINGS_CLEAR if frame.clear else 0, b"".join(parts))
        if isinstance(frame, Ping):
            _check_u32("ping_id", frame.ping_id)
            return _control(TYPE_PING, 0, struct.pack(">I", frame.ping_id))
        if isinstance(frame, GoAway):
            _check_u31("last_good_stream_id", frame.last_good_stream_id)
            _check_u32("status", frame.status)
            return _control(TYPE_GOAWAY, 0, struct.pack(">II", frame.last_good_stream_id, frame.status))
        if isinstance(frame, WindowUpdate):
            _check_u31("stream_id", frame.stream_id)
            _check_u31("delta", frame.delta)
            return _control(TYPE_WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta))
        raise TypeError(f"not a SPDY frame: {type(frame).__name__}")


# Fixed payload lengths of the fixed-size control frames.
_FIXED_LENGTH = {TYPE_RST_STREAM: 8, TYPE_PING: 4, TYPE_GOAWAY: 8, TYPE_WINDOW_UPDATE: 8}
_TYPE_NAMES = {TYPE_SYN_STREAM: "SYN_STREAM", TYPE_SYN_REPLY: "SYN_REPLY", TYPE_RST_STREAM: "RST_STREAM",
               TYPE_SETTINGS: "SETTINGS", TYPE_PING: "PING", TYPE_GOAWAY: "GOAWAY", TYPE_HEADERS: "HEADERS",
               TYPE_WINDOW_UPDATE: "WINDOW_UPDATE"}


class FrameDecoder:
    """Bytes -> frames, incrementally: `feed` any split of the stream, get the frames it completes.

    DATA frames longer than `max_data_chunk` come out as several DataFrame
    pieces of the same stream (FIN on the last one only), so a 16 MiB frame
    is never buffered whole. Control frames of unknown types are skipped, as
    the spec says. Any other violation raises ProtocolError, and the decoder
    stays failed (the connection ends).
    """

    def __init__(self, *, max_header_block: int = 64 * 1024, max_data_chunk: int = MAX_DATA_CHUNK):
        self.max_header_block = max_header_block
        self.max_data_chunk = max_data_chunk
        self._z = zlib.decompressobj(15, DICTIONARY)
        self._buf = bytearray()
        self._data: tuple[int, int] | None = None  # (stream_id, flags) of the DATA frame being read
        self._data_left = 0
        self._skip = 0  # bytes of an ignored control frame still to skip
        self._failed: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        self._buf += data
        out: list[Frame] = []
        try:
            self._parse(out)
        except ProtocolError as e:
            self._failed = e
            self._buf = bytearray()
            e.frames = out
            raise
        return out

    def _parse(self, out: list[Frame]) -> None:
        buf = self._buf
        pos = 0
        try:
            while True:
                if self._skip:
                    n = min(self._skip, len(buf) - pos)
                    pos += n
                    self._skip -= n
                    if self._skip:
                        return
                if self._data is not None:
                    need = min(self._data_left, self.max_data_chunk)
                    if len(buf) - pos < need:
                        return
                    sid, flags = self._data
                    chunk = bytes(buf[pos:pos + need])
                    pos += need
                    self._data_left -= need
                    done = self._data_left == 0
                    if done:
                        self._data = None
                    out.append(DataFrame(sid, chunk, bool(flags & FLAG_FIN) and done))
                    continue
                if len(buf) - pos < 8:
                    return
                word, flags_len = struct.unpack_from(">II", buf, pos)
                flags, length = flags_len >> 24, flags_len & 0xFFFFFF
                if not word & 0x80000000:
                    sid = word & 0x7FFFFFFF
                    if sid == 0:
                        raise ProtocolError("DATA frame on stream 0")
                    pos += 8
                    if length == 0:
                        out.append(DataFrame(sid, b"", bool(flags & FLAG_FIN)))
                    else:
                        self._data, self._data_left = (sid, flags), length
                    continue
                version, ftype = (word >> 16) & 0x7FFF, word & 0xFFFF
                if version != VERSION:
                    raise ProtocolError(f"unsupported SPDY version {version} (this server speaks {VERSION})")
                name = _TYPE_NAMES.get(ftype)
                if name is None:
                    pos += 8  # unknown control frame types are ignored (SPDY/3 section 2.2.1)
                    self._skip = length
                    continue
                self._check_length(name, ftype, length)
                if len(buf) - pos < 8 + length:
                    return
                payload = bytes(buf[pos + 8:pos + 8 + length])
                pos += 8 + length
                out.append(self._control(ftype, flags, payload))
        finally:
            del buf[:pos]

    def _check_length(self, name: str, ftype: int, length: int) -> None:
        fixed = _FIXED_LENGTH.get(ftype)
        if fixed is not None:
            if length != fixed:
                raise ProtocolError(f"{name} frame with length {length} (must be {fixed})")
            return
        if ftype == TYPE_SETTINGS:
            if length < 4 or (length - 4) % 8 or (length - 4) // 8 > MAX_SETTINGS_ENTRIES:
                raise ProtocolError(f"SETTINGS frame with length {length}")
            return
        fixed_part = 10 if ftype == TYPE_SYN_STREAM else 4
        if length < fixed_part + 1:
            raise ProtocolError(f"{name} frame with length {length}: too short for its header block")
        if length - fixed_part > self.max_header_block:
            raise ProtocolError(f"{name} header block of {length - fixed_part} bytes: over the limit of "
                                f"{self.max_header_block}")

    def _control(self, ftype: int, flags: int, p: bytes) -> Frame:
        if ftype == TYPE_SYN_STREAM:
            sid, assoc, prio, slot = struct.unpack_from(">IIBB", p)
            sid &= MAX_STREAM_ID
            if sid == 0:
                raise ProtocolError("SYN_STREAM for stream 0")
            return SynStream(sid, self._headers(p[10:]), assoc & MAX_STREAM_ID, prio >> 5, slot,
                             bool(flags & FLAG_FIN), bool(flags & FLAG_UNIDIRECTIONAL))
        if ftype in (TYPE_SYN_REPLY, TYPE_HEADERS):
            sid = struct.unpack_from(">I", p)[0] & MAX_STREAM_ID
            if sid == 0:
                raise ProtocolError(f"{_TYPE_NAMES[ftype]} for stream 0")
            cls = SynReply if ftype == TYPE_SYN_REPLY else Headers
            return cls(sid, self._headers(p[4:]), bool(flags & FLAG_FIN))
        if ftype == TYPE_RST_STREAM:
            sid, status = struct.unpack(">II", p)
            sid &= MAX_STREAM_ID
            if sid == 0 or status == 0:
                raise ProtocolError(f"RST_STREAM with stream {sid}, status {status}")
            return RstStream(sid, status)
        if ftype == TYPE_SETTINGS:
            n = struct.unpack_from(">I", p)[0]
            if 4 + 8 * n != len(p):
                raise ProtocolError(f"SETTINGS frame: {n} entries in {len(p)} bytes")
            entries = []
            for i in range(n):
                fid, value = struct.unpack_from(">II", p, 4 + 8 * i)
                entries.append((fid >> 24, fid & 0xFFFFFF, value))
            return Settings(tuple(entries), bool(flags & FLAG_SETTINGS_CLEAR))
        if ftype == TYPE_PING:
            return Ping(struct.unpack(">I", p)[0])
        if ftype == TYPE_GOAWAY:
            last, status = struct.unpack(">II", p)
            return GoAway(last & MAX_STREAM_ID, status)
        if ftype == TYPE_WINDOW_UPDATE:
            sid, delta = struct.unpack(">II", p)
            return WindowUpdate(sid & MAX_STREAM_ID, delta & MAX_STREAM_ID)
        raise AssertionError(ftype)  # _check_length knows only the types above

    def _headers(self, compressed: bytes) -> dict[str, str]:
        limit = self.max_header_block
        try:
            block = self._z.decompress(compressed, limit + 1)
        except zlib.error as e:
            raise ProtocolError(f"header block does not decompress: {e}") from None
        if len(block) > limit or self._z.unconsumed_tail:
            raise ProtocolError(f"header block decompresses to over {limit} bytes")
        if self._z.eof:
            # The peer ended its zlib stream: its later header blocks could not be decoded.
            raise ProtocolError("header block ends the connection's compression stream")
        return parse_header_block(block)


def parse_header_block(block: bytes) -> dict[str, str]:
    """A decompressed SPDY/3 name/value block -> {lower-case name: value} (NUL-separated values kept)."""
    def u32(at: int) -> int:
        if at + 4 > len(block):
            raise ProtocolError("header block truncated")
        return struct.unpack_from(">I", block, at)[0]

    count = u32(0)
    pos = 4
    if count > (len(block) - 4) // 8:
        raise ProtocolError(f"header block claims {count} headers in {len(block)} bytes")
    headers: dict[str, str] = {}
    for _ in range(count):
        n = u32(pos)
        pos += 4
        if n == 0 or pos + n > len(block):
            raise ProtocolError("header block: empty or truncated header name")
        name = block[pos:pos + n].decode("latin-1").lower()
        pos += n
        if "\x00" in name:
            raise ProtocolError(f"header name {name!r} contains NUL")
        if name in headers:
            raise ProtocolError(f"header block: duplicate header {name!r}")
        n = u32(pos)
        pos += 4
        if pos + n > len(block):
            raise ProtocolError(f"header block: truncated value of {name!r}")
        headers[name] = block[pos:pos + n].decode("latin-1")
        pos += n
    if pos != len(block):
        raise ProtocolError(f"header block: {len(block) - pos} bytes after the last header")
    return headers


# ---------------------------------------------------------------------------------------------
# Connection

_RECV_SIZE = 64 * 1024
_WINDOW_UPDATE_AT = INITIAL_WINDOW // 2  # grant window once half of it has been consumed
_CLOSE_LOCK_WAIT = 1.0  # how long close() waits for a writer to finish its frame before giving up the GOAWAY
_LINGER = 2.0  # how long the reader drains the peer's input after the end, before closing the socket
_POLL_MS = 250  # the reader's wait between checks of the end


class SpdyStream:
    """One stream the peer opened (SYN_STREAM). Thread-safe; see SpdyConnection for the threads."""

    def __init__(self, conn: "SpdyConnection", frame: SynStream):
        self.id = frame.stream_id
        self.headers: dict[str, str] = dict(frame.headers)
        self.priority = frame.priority
        self.closed = threading.Event()
        self._conn = conn
        # Guards the read side (_buf, _remote_fin, _unacked) and _reset; the write side's flags
        # (_replied, _local_fin) are guarded by the connection's write lock.
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._remote_fin = frame.fin
        self._unacked = 0
        self._taken = 0  # bytes the application has read: its progress, for the stall timeout
        self._reset = False
        self._gone = False  # the connection ended
        self._replied = False
        self._local_fin = frame.unidirectional  # a unidirectional stream is never written

    def __repr__(self) -> str:
        return f"<SpdyStream {self.id} {self.headers!r}>"

    # -- write side

    def reply(self, headers: dict[str, str] | None = None, fin: bool = False) -> None:
        """Send the SYN_REPLY (once; later calls do nothing). BrokenPipeError once reset or ended."""
        def build() -> list[Frame]:
            if self._reset:
                raise BrokenPipeError(f"SPDY stream {self.id} was reset")
            if self._replied:
                return []
            self._replied = True
            if fin:
                self._local_fin = True
            return [SynReply(self.id, dict(headers or {}), fin)]
        self._conn._send(build)
        if fin:
            self._check_done()

    def write(self, data: bytes) -> None:
        """Send `data` as DATA frames (a SYN_REPLY first if none was sent); blocks on TCP back-pressure."""
        view = memoryview(data).cast("B")
        offset = 0
        while True:
            chunk = view[offset:offset + MAX_DATA_CHUNK]

            def build(chunk: memoryview = chunk) -> list[Frame]:
                if self._reset:
                    raise BrokenPipeError(f"SPDY stream {self.id} was reset")
                if self._local_fin:
                    raise BrokenPipeError(f"SPDY stream {self.id} is closed for writing")
                frames: list[Frame] = []
                if not self._replied:
                    self._replied = True
                    frames.append(SynReply(self.id, {}))
                if len(chunk):
                    frames.append(DataFrame(self.id, bytes(chunk)))
                return frames
            self._conn._send(build)
            offset += len(chunk)
            if offset >= len(view):
                return

    def close_write(self) -> None:
        """Half-close: an empty DATA frame with FLAG_FIN (or a SYN_REPLY with FIN). Idempotent, never raises."""
        def build() -> list[Frame]:
            if self._reset or self._local_fin:
                return []
            self._local_fin = True
            if not self._replied:
                self._replied = True
                return [SynReply(self.id, {}, True)]
            return [DataFrame(self.id, b"", True)]
        try:
            self._conn._send(build)
        except BrokenPipeError:
            pass
        self._check_done()

    def reset(self, status: int = CANCEL) -> None:
        """Abort the stream (RST_STREAM): reads answer b"", writes BrokenPipeError. Idempotent."""
        with self._cond:
            if self._reset or self.closed.is_set():
                return
            self._reset = True
            self._discard()
        try:
            self._conn._send(lambda: [RstStream(self.id, status)])
        except BrokenPipeError:
            pass
        self._finish()

    # -- read side

    def read(self, n: int = 65536) -> bytes:
        """Up to n bytes; blocks until some arrive; b"" at the peer's FIN, a reset or the end (after the
        bytes already received)."""
        if n < 0:
            raise ValueError(f"read size {n}: must not be negative")
        if n == 0:
            return b""
        with self._cond:
            while not self._buf and not (self._remote_fin or self._reset or self._gone):
                self._cond.wait()
            if self._reset or not self._buf:
                return b""
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self._taken += len(data)
            self._unacked += len(data)
            grant = 0
            if self._unacked >= _WINDOW_UPDATE_AT and not (self._remote_fin or self._gone):
                grant, self._unacked = self._unacked, 0
            self._cond.notify_all()  # the reader may wait for room
        self._conn._consumed(len(data), self.id if grant else 0, grant)
        return data

    # -- called by the connection

    def _discard(self) -> None:  # under _cond
        if self._buf:
            self._conn._consumed(len(self._buf), 0, 0, send=False)
            self._buf = bytearray()
        self._cond.notify_all()

    def _deliver(self, frame: DataFrame, max_buffered: int, stall_timeout: float) -> None:
        """Reader thread: queue a DATA frame's bytes. While the buffer is full it waits (back-pressure), as
        long as the application keeps reading; after stall_timeout without a byte read, the stream is reset
        (FLOW_CONTROL_ERROR) so that the connection's other streams go on."""
        overflow = False
        with self._cond:
            taken, since = self._taken, time.monotonic()
            while len(self._buf) >= max_buffered and not (self._reset or self._gone):
                if self._taken != taken:
                    taken, since = self._taken, time.monotonic()
                left = since + stall_timeout - time.monotonic()
                if left <= 0:
                    overflow = True
                    break
                self._cond.wait(left)
            if overflow or self._reset or self._gone:
                self._conn._consumed(len(frame.data), 0, 0, send=False)
            else:
                self._buf += frame.data
                if frame.fin:
                    self._remote_fin = True
                self._cond.notify_all()
        if overflow:
            log.info("SPDY connection: stream %d reset: %d bytes unread for %.0f s", self.id, len(self._buf),
                     stall_timeout)
            self.reset(FLOW_CONTROL_ERROR)
        elif frame.fin:
            self._check_done()

    def _remote_finished(self) -> bool:
        with self._cond:
            return self._remote_fin

    def _peer_fin(self) -> None:
        with self._cond:
            self._remote_fin = True
            self._cond.notify_all()
        self._check_done()

    def _peer_reset(self) -> None:
        with self._cond:
            if self._reset:
                return
            self._reset = True
            self._discard()
        self._finish()

    def _end(self) -> None:
        with self._cond:
            self._gone = True
            self._cond.notify_all()
        self.closed.set()

    def _check_done(self) -> None:
        with self._cond:
            done = self._remote_fin and self._local_fin and not self._gone
        if done:
            self._finish()

    def _finish(self) -> None:
        self.closed.set()
        self._conn._forget(self)


class SpdyConnection:
    """Server side of one SPDY/3.1 connection over a connected socket (after the HTTP 101 answer).

    Threads: `serve()` is the reader loop and runs in the caller's thread;
    `on_stream(stream)` is called from it for each SYN_STREAM of the peer
    and must not block (hand the stream off to a thread). Stream reads,
    writes and closes may come from any threads; writes to the socket are
    serialised. The connection owns the socket: it is closed when the
    connection ends. No thread is started here.
    """

    def __init__(self, sock: socket.socket, on_stream: Callable[[SpdyStream], None], *, max_streams: int = 64,
                 max_header_block: int = 64 * 1024, max_buffered: int = 1 << 20, stall_timeout: float = 5.0,
                 initial_data: bytes = b""):
        """initial_data: bytes already read from the socket after the upgrade request (a buffered HTTP
        reader's read-ahead), handled before anything read from the socket.

        `sock` is a socket or an object with its methods (recv, sendall, send, shutdown, close, fileno,
        settimeout); one with `wait_readable(ms)` (the streaming server's wire, which may hold decrypted
        TLS bytes the kernel does not see) is asked that instead of polling its descriptor."""
        if max_streams < 1 or max_header_block < 16 or max_buffered < 1 or not stall_timeout > 0:
            raise ValueError("max_streams, max_header_block, max_buffered and stall_timeout must be positive "
                             "(max_header_block at least 16)")
        self.closed = threading.Event()
        self.max_streams = max_streams
        self.max_buffered = max_buffered
        self.stall_timeout = stall_timeout
        self._sock = sock
        sock.settimeout(None)  # blocking: back-pressure is TCP's; close() unblocks every call
        self._on_stream = on_stream
        self._initial = bytes(initial_data)
        self._enc = FrameEncoder()
        self._dec = FrameDecoder(max_header_block=max_header_block)
        self._wlock = threading.Lock()  # one frame at a time on the socket, in encoder order
        self._state = threading.Lock()  # _streams, _ended, _reader_active, _conn_unacked
        self._streams: dict[int, SpdyStream] = {}
        self._last_peer_id = 0
        self._ended = False
        self._reader_active = False
        self._fd_closed = False
        self._peer_eof = False
        self._conn_unacked = 0

    # -- public

    def serve(self) -> None:
        """Read frames until the connection ends (peer EOF or GOAWAY, a protocol error, close())."""
        with self._state:
            if self._ended:
                ended = True
            else:
                ended, self._reader_active = False, True
        if ended:
            self._close_fd()
            return
        goaway: int | None = None
        try:
            goaway = self._read_loop()
        except Exception:  # a bug here must end this connection only, never leak it
            log.exception("SPDY connection: reader failed")
            goaway = GOAWAY_INTERNAL_ERROR
        finally:
            self._shutdown(goaway)
            if not self._peer_eof:
                self._drain()
            self._close_fd()

    def abort(self) -> None:
        """End now, without GOAWAY or a last drain: for a peer that reads nothing (a graceful end would
        wait on it). Streams end as with close()."""
        self._shutdown(None, socket.SHUT_RDWR)
        with self._state:
            reader = self._reader_active
        if not reader:
            self._close_fd()

    def close(self) -> None:
        """GOAWAY and close: streams' read() -> b"" (after what was received), write() -> BrokenPipeError.

        What was written before is still delivered: the socket's write side is
        shut (FIN after the queued data) and the reader drains the peer's
        last bytes for a moment before closing, so the peer sees no reset.
        """
        self._shutdown(GOAWAY_OK)
        with self._state:
            reader = self._reader_active
        if not reader:
            self._close_fd()

    # -- reader

    def _read_loop(self) -> int | None:
        """Returns when the connection must end: the GOAWAY status to send, or None for none."""
        if self._initial:
            data, self._initial = self._initial, b""
            ended, status = self._process(data)
            if ended:
                return status
        readable = getattr(self._sock, "wait_readable", None)
        if readable is None:
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN | select.POLLPRI)
            readable = poller.poll
        while not self._ended:
            # A bounded wait: close() from another thread must be noticed (shutting the write side wakes
            # no reader).
            if not readable(_POLL_MS):
                continue
            try:
                data = self._sock.recv(_RECV_SIZE)
            except OSError:
                data = b""
            if not data:
                self._peer_eof = True
                return None
            ended, status = self._process(data)
            if ended:
                return status
        return None

    def _process(self, data: bytes) -> tuple[bool, int | None]:
        try:
            try:
                frames, error = self._dec.feed(data), None
            except ProtocolError as e:
                frames, error = e.frames, e
            for frame in frames:  # those before a bad frame are the peer's too
                if self._ended or not self._handle(frame):
                    return True, None
            if error is not None:
                raise error
        except ProtocolError as e:
            log.info("SPDY connection: protocol error from the peer: %s", e)
            return True, e.status
        except BrokenPipeError:  # our socket failed while answering
            return True, None
        return False, None

    def _drain(self) -> None:
        """After our FIN: read and drop the peer's last bytes until its EOF, for at most _LINGER seconds.

        Closing a TCP socket with unread input resets the connection, and a
        reset can destroy what the peer has not read yet of our last frames.
        """
        deadline = time.monotonic() + _LINGER
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLPRI)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                return
            try:
                if not self._sock.recv(_RECV_SIZE):
                    return
            except OSError:
                return

    def _handle(self, frame: Frame) -> bool:
        """One frame from the peer; False when the connection must end (GOAWAY)."""
        if isinstance(frame, DataFrame):
            stream = self._get(frame.stream_id)
            if stream is None:
                # A stream already closed or reset here (data in flight) or never opened: dropped.
                self._consumed(len(frame.data), 0, 0)
            elif stream._remote_finished():
                stream.reset(STREAM_ALREADY_CLOSED)
            else:
                stream._deliver(frame, self.max_buffered, self.stall_timeout)
        elif isinstance(frame, SynStream):
            self._open(frame)
        elif isinstance(frame, RstStream):
            stream = self._get(frame.stream_id)
            if stream is not None:
                stream._peer_reset()
        elif isinstance(frame, Headers):
            stream = self._get(frame.stream_id)
            if stream is not None and frame.fin:
                stream._peer_fin()
        elif isinstance(frame, Ping):
            if frame.ping_id % 2:  # the peer's (odd); even ids would be our own, and this side never pings
                self._send(lambda: [frame])
        elif isinstance(frame, GoAway):
            log.debug("SPDY connection: GOAWAY from the peer (last stream %d, status %d)",
                      frame.last_good_stream_id, frame.status)
            return False
        elif isinstance(frame, SynReply):
            raise ProtocolError(f"SYN_REPLY for stream {frame.stream_id}, which this server did not open")
        # SETTINGS and WINDOW_UPDATE: nothing to do (send windows are not honoured, see the module doc).
        return True

    def _open(self, frame: SynStream) -> None:
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self._last_peer_id:
            raise ProtocolError(f"SYN_STREAM for stream {sid}: a client's ids are odd and increasing "
                                f"(last was {self._last_peer_id})")
        self._last_peer_id = sid
        with self._state:
            full = len(self._streams) >= self.max_streams
            stream = None if full else SpdyStream(self, frame)
            if stream is not None:
                self._streams[sid] = stream
        if stream is None:
            log.info("SPDY connection: stream %d refused (%d streams open)", sid, self.max_streams)
            self._send(lambda: [RstStream(sid, REFUSED_STREAM)])
            return
        try:
            self._on_stream(stream)
        except Exception:
            log.exception("SPDY connection: stream handler failed for stream %d", sid)
            stream.reset(INTERNAL_ERROR)

    # -- shared

    def _get(self, sid: int) -> SpdyStream | None:
        with self._state:
            return self._streams.get(sid)

    def _forget(self, stream: SpdyStream) -> None:
        with self._state:
            if self._streams.get(stream.id) is stream:
                del self._streams[stream.id]

    def _send(self, build: Callable[[], list[Frame]]) -> None:
        """Encode build()'s frames and write them, all under the write lock (so in encoder order)."""
        failed: OSError | None = None
        with self._wlock:
            if self._ended:
                raise BrokenPipeError("SPDY connection closed")
            frames = build()
            if not frames:
                return
            data = b"".join(self._enc.encode(f) for f in frames)
            try:
                self._sock.sendall(data)
            except OSError as e:
                failed = e
        if failed is not None:
            self._shutdown(None)
            raise BrokenPipeError(f"SPDY connection: {failed}") from failed

    def _consumed(self, n: int, sid: int, grant: int, send: bool = True) -> None:
        """n bytes read or dropped: grant window back (stream `sid` gets `grant`; the connection, its own)."""
        with self._state:
            self._conn_unacked += n
            conn_grant = 0
            if self._conn_unacked >= _WINDOW_UPDATE_AT and send:
                conn_grant, self._conn_unacked = self._conn_unacked, 0
        frames: list[Frame] = []
        if grant:
            frames.append(WindowUpdate(sid, min(grant, MAX_STREAM_ID)))
        if conn_grant:
            frames.append(WindowUpdate(0, min(conn_grant, MAX_STREAM_ID)))
        if frames:
            try:
                self._send(lambda: frames)
            except BrokenPipeError:
                pass

    def _shutdown(self, goaway: int | None, how: int | None = None) -> None:
        with self._state:
            if self._ended:
                return
            self._ended = True
            streams = list(self._streams.values())
            self._streams.clear()
        if goaway is not None and self._wlock.acquire(timeout=_CLOSE_LOCK_WAIT):
            # Best effort and never blocking: a peer that does not read gets no GOAWAY, just the close.
            try:
                self._sock.send(self._enc.encode(GoAway(self._last_peer_id, goaway)), socket.MSG_DONTWAIT)
            except OSError:
                pass
            finally:
                self._wlock.release()
        # Writers blocked on the socket wake up with EPIPE. With a reader running, only the write side is
        # shut: the reader drains the peer's last bytes and closes (see _drain).
        try:
            if how is None:
                how = socket.SHUT_WR if self._reader_active else socket.SHUT_RDWR
            self._sock.shutdown(how)
        except OSError:
            pass
        for stream in streams:
            stream._end()
        self.closed.set()

    def _close_fd(self) -> None:
        with self._wlock:  # after shutdown() no writer stays in sendall for long
            if self._fd_closed:
                return
            self._fd_closed = True
        try:
            self._sock.close()
        except OSError:
            pass
