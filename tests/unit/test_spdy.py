"""SPDY/3.1 framing (cri_shim.streaming.spdy): the codec, and the connection over a socketpair.

The header dictionary and compression are also checked against a real client
(moby/spdystream) in tests/integration/streaming/test_spdy_interop.py.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cri_shim.streaming import spdy
from tests.support import prereq, spdyclient

ALL_FRAMES = [
    spdy.SynStream(1, {"streamtype": "error", "port": "8080", "requestid": "0"}, associated_id=0, priority=3,
                   slot=0, fin=False),
    spdy.SynStream(3, {}, fin=True, unidirectional=True, priority=7, slot=9, associated_id=1),
    spdy.SynReply(1, {"status": "200 OK", "multi": "a\x00b"}),
    spdy.SynReply(3, {}, fin=True),
    spdy.DataFrame(1, b"hello"),
    spdy.DataFrame(1, b"", fin=True),
    spdy.DataFrame(spdy.MAX_STREAM_ID, bytes(range(256)) * 4, fin=True),
    spdy.RstStream(1, spdy.CANCEL),
    spdy.Settings(((0, 4, 100), (1, 7, 65536)), clear=True),
    spdy.Settings(()),
    spdy.Ping(1),
    spdy.Ping(0xFFFFFFFF),
    spdy.GoAway(7, spdy.GOAWAY_PROTOCOL_ERROR),
    spdy.Headers(5, {"x-one": "1", "content-type": "text/plain"}, fin=True),
    spdy.WindowUpdate(0, 1),
    spdy.WindowUpdate(9, spdy.MAX_STREAM_ID),
]


def encode_all(frames):
    enc = spdy.FrameEncoder()
    return b"".join(enc.encode(f) for f in frames)


def test_round_trip_every_frame_type():
    wire = encode_all(ALL_FRAMES)
    assert spdy.FrameDecoder().feed(wire) == ALL_FRAMES


def test_header_blocks_share_one_compression_context():
    value = "".join(hashlib.sha256(bytes([i])).hexdigest() for i in range(4))  # incompressible on its own
    frames = [spdy.SynReply(i, {"streamtype": "stdout", "x-long": value}) for i in range(1, 9, 2)]
    enc = spdy.FrameEncoder()
    wire = [enc.encode(f) for f in frames]
    # Later blocks refer back to the first: a context per frame would make them all about the same size.
    assert len(wire[-1]) < len(wire[0]) / 3
    assert spdy.FrameDecoder().feed(b"".join(wire)) == frames
    # ...so a decoder that did not see the first block (a context of its own) cannot read the second.
    with pytest.raises(spdy.ProtocolError):
        spdy.FrameDecoder().feed(wire[1])


def test_dictionary_is_spdystreams():
    go = spdyclient.SPDYSTREAM / "spdy/dictionary.go"
    prereq.require(go.is_file(), spdyclient.missing() or f"{go} missing")
    text = go.read_text()
    body = text[text.index("[]byte{"):]
    assert spdy.DICTIONARY == bytes(int(x, 16) for x in re.findall(r"0x([0-9a-f]{2})", body))


def test_every_split_point():
    wire = encode_all(ALL_FRAMES)
    for cut in range(len(wire) + 1):
        dec = spdy.FrameDecoder()
        assert dec.feed(wire[:cut]) + dec.feed(wire[cut:]) == ALL_FRAMES, cut


def test_byte_by_byte():
    wire = encode_all(ALL_FRAMES)
    dec = spdy.FrameDecoder()
    got = []
    for i in range(len(wire)):
        got += dec.feed(wire[i:i + 1])
    assert got == ALL_FRAMES


def test_large_data_frame_comes_in_bounded_pieces():
    data = bytes(range(256)) * 1000  # 256000 bytes in one frame
    wire = encode_all([spdy.DataFrame(5, data, fin=True)])
    dec = spdy.FrameDecoder(max_data_chunk=16384)
    pieces = []
    for i in range(0, len(wire), 1000):
        pieces += dec.feed(wire[i:i + 1000])
        assert len(dec._buf) <= 16384 + 1000  # never the whole frame
    assert all(p.stream_id == 5 and len(p.data) <= 16384 for p in pieces)
    assert [p.fin for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert b"".join(p.data for p in pieces) == data


def test_unknown_control_frame_types_are_skipped():
    unknown = struct.pack(">HHI", 0x8003, 10, 5) + b"abcde"  # CREDENTIAL: ignored
    wire = unknown + encode_all([spdy.Ping(3)])
    dec = spdy.FrameDecoder()
    assert dec.feed(wire[:3]) + dec.feed(wire[3:]) == [spdy.Ping(3)]


def control(ftype, flags, payload, version=3):
    return struct.pack(">HHI", 0x8000 | version, ftype, (flags << 24) | len(payload)) + payload


def syn_stream_with_block(block: bytes, sid=1):
    return control(spdy.TYPE_SYN_STREAM, 0, struct.pack(">IIBB", sid, 0, 0, 0) + block)


def compress(raw: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    return z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)


def block(*pairs):
    out = struct.pack(">I", len(pairs))
    for name, value in pairs:
        out += struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value
    return out


@pytest.mark.parametrize("wire, message", [
    (control(spdy.TYPE_PING, 0, b"\0\0\0\1", version=2), "unsupported SPDY version 2"),
    (control(spdy.TYPE_PING, 0, b"\0\0\0\1\0"), "PING frame with length 5"),
    (control(spdy.TYPE_RST_STREAM, 0, b"\0\0\0\1"), "RST_STREAM frame with length 4"),
    (control(spdy.TYPE_RST_STREAM, 0, struct.pack(">II", 1, 0)), "status 0"),
    (control(spdy.TYPE_GOAWAY, 0, b"\0\0\0\1"), "GOAWAY frame with length 4"),
    (control(spdy.TYPE_WINDOW_UPDATE, 0, b""), "WINDOW_UPDATE frame with length 0"),
    (control(spdy.TYPE_SETTINGS, 0, struct.pack(">I", 2) + b"\0" * 8), "SETTINGS frame: 2 entries"),
    (control(spdy.TYPE_SETTINGS, 0, b"\0" * 7), "SETTINGS frame with length 7"),
    (control(spdy.TYPE_SYN_STREAM, 0, b"\0" * 9), "too short"),
    (control(spdy.TYPE_SYN_REPLY, 0, b"\0\0\0\1"), "too short"),
    (struct.pack(">II", 0, 3) + b"abc", "DATA frame on stream 0"),
    (syn_stream_with_block(b"garbage, not zlib", sid=1), "does not decompress"),
    (syn_stream_with_block(compress(block((b"a", b"1"))), sid=0), "SYN_STREAM for stream 0"),
    (syn_stream_with_block(compress(block((b"a", b"1"), (b"A", b"2")))), "duplicate header 'a'"),
    (syn_stream_with_block(compress(block((b"", b"1")))), "empty or truncated header name"),
    (syn_stream_with_block(compress(block((b"a", b"1"))[:-1])), "truncated value"),
    (syn_stream_with_block(compress(block((b"a", b"1")) + b"x")), "after the last header"),
    (syn_stream_with_block(compress(struct.pack(">I", 1000) + b"\0" * 8)), "claims 1000 headers"),
    (syn_stream_with_block(compress(b"\0\0")), "truncated"),
])
def test_protocol_errors(wire, message):
    dec = spdy.FrameDecoder()
    with pytest.raises(spdy.ProtocolError, match=re.escape(message)):
        dec.feed(wire)
    with pytest.raises(spdy.ProtocolError):  # and it stays failed
        dec.feed(encode_all([spdy.Ping(1)]))


def test_oversize_header_block_is_refused_before_it_is_read():
    dec = spdy.FrameDecoder(max_header_block=1024)
    head = struct.pack(">HHI", 0x8003, spdy.TYPE_SYN_STREAM, 10 + 4096)
    with pytest.raises(spdy.ProtocolError, match="header block of 4096 bytes: over the limit of 1024"):
        dec.feed(head)  # the length alone decides: nothing of the block was needed


def test_decompression_bomb_is_bounded():
    bomb = compress(struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", 50 << 20)
                    + b"\0" * (50 << 20))  # 50 MiB of header value in ~50 KiB of zlib
    assert len(bomb) < 64 * 1024
    dec = spdy.FrameDecoder(max_header_block=64 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(spdy.ProtocolError, match="decompresses to over 65536 bytes"):
            dec.feed(syn_stream_with_block(bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_encoder_refuses_what_it_cannot_send():
    enc = spdy.FrameEncoder()
    for frame in [spdy.SynReply(1, {"Upper": "x"}), spdy.SynReply(1, {"": "x"}), spdy.DataFrame(0, b"x"),
                  spdy.SynStream(1 << 31), spdy.SynStream(1, priority=8), spdy.Ping(-1)]:
        with pytest.raises(ValueError):
            enc.encode(frame)


# -- fuzzing: nothing but a clean ProtocolError, whatever the bytes

def feed_all(chunks):
    dec = spdy.FrameDecoder(max_header_block=4096)
    try:
        for c in chunks:
            dec.feed(c)
    except spdy.ProtocolError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_random_bytes(chunks):
    feed_all(chunks)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_frames(data):
    wire = bytearray(encode_all(ALL_FRAMES))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(wire) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "dup"]))
        if op == "flip":
            wire[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            wire[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del wire[i:i + data.draw(st.integers(1, 16))]
        else:
            wire[i:i] = wire[i:i + data.draw(st.integers(1, 16))]
        if not wire:
            break
    cut = data.draw(st.integers(0, len(wire)))
    feed_all([bytes(wire[:cut]), bytes(wire[cut:])])


# -- the connection over a socketpair

class Peer:
    """The client's end: raw frames in and out."""

    def __init__(self, sock):
        self.sock = sock
        self.enc = spdy.FrameEncoder()
        self.dec = spdy.FrameDecoder()
        self.frames = []
        sock.settimeout(10)

    def send(self, *frames):
        self.sock.sendall(b"".join(self.enc.encode(f) for f in frames))

    def until(self, pred, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.frames):
                if pred(f):
                    del self.frames[:i + 1]
                    return f
            if time.monotonic() > deadline:
                raise AssertionError(f"no such frame; got {self.frames!r}")
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; got {self.frames!r}")
            self.frames += self.dec.feed(data)

    def read_to_eof(self, timeout=10):
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            self.frames += self.dec.feed(data)


@pytest.fixture
def pair():
    """(connection, peer, accepted streams); the reader thread must be gone at the end."""
    before = threading.active_count()
    made = []

    def make(on_stream=None, **kw):
        a, b = socket.socketpair()
        streams = []

        def accept(s):
            streams.append(s)
            if on_stream:
                on_stream(s)
        conn = spdy.SpdyConnection(a, accept, **kw)
        t = threading.Thread(target=conn.serve, daemon=True)
        t.start()
        peer = Peer(b)
        made.append((conn, t, b))
        return conn, peer, streams, t
    yield make
    for conn, t, b in made:
        conn.close()
        b.close()  # the peer's EOF ends the reader's drain at once
        t.join(10)
        assert not t.is_alive()
    assert threading.active_count() <= before


def is_(cls, **kw):
    return lambda f: isinstance(f, cls) and all(getattr(f, k) == v for k, v in kw.items())


def test_stream_data_fin_and_reply(pair):
    conn, peer, streams, _ = pair()
    peer.send(spdy.SynStream(1, {"streamtype": "stdin", "x-mixed": "v"}), spdy.DataFrame(1, b"abc"),
              spdy.DataFrame(1, b"def", fin=True))
    peer.send(spdy.Ping(1))
    peer.until(is_(spdy.Ping, ping_id=1))  # frames are handled in order: the stream exists now
    (s,) = streams
    assert s.id == 1 and s.headers == {"streamtype": "stdin", "x-mixed": "v"}
    assert s.read(2) == b"ab" and s.read() == b"cdef" and s.read() == b""
    s.reply({"x-answer": "yes"})
    assert peer.until(is_(spdy.SynReply, stream_id=1)).headers == {"x-answer": "yes"}
    s.write(b"out")
    assert peer.until(is_(spdy.DataFrame, stream_id=1)).data == b"out"
    assert not s.closed.is_set()
    s.close_write()
    s.close_write()  # idempotent: one FIN
    assert peer.until(is_(spdy.DataFrame, stream_id=1)) == spdy.DataFrame(1, b"", fin=True)
    assert s.closed.wait(5)
    with pytest.raises(BrokenPipeError):
        s.write(b"late")


def test_write_before_reply_replies_first_and_splits_large_data(pair):
    conn, peer, streams, _ = pair()
    peer.send(spdy.SynStream(1, {}), spdy.Ping(1))
    peer.until(is_(spdy.Ping))
    data = bytes(range(256)) * 1024
    w = threading.Thread(target=streams[0].write, args=(data,), daemon=True)
    w.start()  # more than the socket buffer: it completes as the peer reads
    assert peer.until(lambda f: True) == spdy.SynReply(1, {})
    got = b""
    while len(got) < len(data):
        f = peer.until(is_(spdy.DataFrame, stream_id=1))
        assert len(f.data) <= spdy.MAX_DATA_CHUNK
        got += f.data
    assert got == data
    w.join(5)


def test_read_grants_window(pair):
    conn, peer, streams, _ = pair()
    peer.send(spdy.SynStream(1, {}), spdy.DataFrame(1, b"x" * 40000), spdy.Ping(1))
    peer.until(is_(spdy.Ping))
    assert len(streams[0].read(50000)) == 40000
    assert peer.until(is_(spdy.WindowUpdate, stream_id=1)).delta == 40000
    assert peer.until(is_(spdy.WindowUpdate, stream_id=0)).delta == 40000


def test_reset_both_ways(pair):
    conn, peer, streams, _ = pair()
    peer.send(spdy.SynStream(1, {}), spdy.SynStream(3, {}), spdy.DataFrame(1, b"pending"), spdy.Ping(1))
    peer.until(is_(spdy.Ping))
    one, three = streams
    peer.send(spdy.RstStream(1, spdy.CANCEL), spdy.Ping(3))
    peer.until(is_(spdy.Ping, ping_id=3))
    assert one.closed.is_set() and one.read() == b""  # a reset drops what was pending
    with pytest.raises(BrokenPipeError):
        one.write(b"x")
    three.reset(spdy.INTERNAL_ERROR)
    assert peer.until(is_(spdy.RstStream)) == spdy.RstStream(3, spdy.INTERNAL_ERROR)
    three.reset()  # idempotent
    assert three.closed.is_set()
    with pytest.raises(BrokenPipeError):
        three.reply()
    assert not conn.closed.is_set()  # a stream's reset is not the connection's


def test_ping_answered_only_for_the_peers_ids(pair):
    conn, peer, streams, _ = pair()
    peer.send(spdy.Ping(2), spdy.Ping(5))
    assert peer.until(is_(spdy.Ping)) == spdy.Ping(5)


def test_goaway_from_the_peer_ends_the_connection(pair):
    conn, peer, streams, t = pair()
    peer.send(spdy.SynStream(1, {}), spdy.DataFrame(1, b"kept"), spdy.GoAway(0))
    t.join(10)
    assert not t.is_alive() and conn.closed.is_set()
    (s,) = streams
    assert s.closed.is_set()
    assert s.read() == b"kept" and s.read() == b""  # what had arrived is still read
    with pytest.raises(BrokenPipeError):
        s.write(b"x")


def test_max_streams(pair):
    conn, peer, streams, _ = pair(max_streams=2)
    peer.send(spdy.SynStream(1, {}), spdy.SynStream(3, {}), spdy.SynStream(5, {}))
    assert peer.until(is_(spdy.RstStream)) == spdy.RstStream(5, spdy.REFUSED_STREAM)
    assert [s.id for s in streams] == [1, 3]
    streams[0].reset()  # a closed stream frees its place
    peer.send(spdy.SynStream(7, {}), spdy.Ping(1))
    peer.until(is_(spdy.Ping))
    assert [s.id for s in streams] == [1, 3, 7]


@pytest.mark.parametrize("frames", [
    [spdy.SynStream(2, {})],  # a client's ids are odd
    [spdy.SynStream(5, {}), spdy.SynStream(3, {})],  # and increasing
    [spdy.SynReply(1, {})],  # this server opens no streams
])
def test_stream_id_violations_end_the_connection(pair, frames):
    conn, peer, streams, t = pair()
    peer.send(*frames)
    assert peer.until(is_(spdy.GoAway)).status == spdy.GOAWAY_PROTOCOL_ERROR
    t.join(10)
    assert not t.is_alive()


def test_oversize_header_block_ends_the_connection(pair):
    conn, peer, streams, t = pair(max_header_block=1024)
    peer.send(spdy.SynStream(1, {"x-big": "y" * 5000}))
    assert peer.until(is_(spdy.GoAway)) == spdy.GoAway(0, spdy.GOAWAY_PROTOCOL_ERROR)
    peer.read_to_eof()
    t.join(10)
    assert not t.is_alive() and conn.closed.is_set() and streams == []


def test_garbage_ends_the_connection(pair):
    conn, peer, streams, t = pair()
    peer.send(spdy.SynStream(1, {}))
    peer.sock.sendall(b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01")  # SPDY/2
    assert peer.until(is_(spdy.GoAway)).last_good_stream_id == 1
    t.join(10)
    assert not t.is_alive() and streams[0].closed.is_set() and streams[0].read() == b""


def test_peer_vanishes_mid_stream(pair):
    conn, peer, streams, t = pair()
    peer.send(spdy.SynStream(1, {}), spdy.DataFrame(1, b"partial"))
    peer.send(spdy.Ping(1))
    peer.until(is_(spdy.Ping))
    peer.sock.close()
    t.join(10)
    assert not t.is_alive() and conn.closed.is_set()
    (s,) = streams
    assert s.read() == b"partial" and s.read() == b""
    with pytest.raises(BrokenPipeError):
        s.write(b"x")


def test_reads_are_bounded_for_a_peer_that_ignores_windows(pair):
    conn, peer, streams, t = pair(max_buffered=64 * 1024)
    peer.send(spdy.SynStream(1, {}), spdy.Ping(1))
    peer.until(is_(spdy.Ping))
    (s,) = streams
    chunk = b"z" * 32768
    total = 4 << 20

    def flood():
        try:
            for _ in range(total // len(chunk)):
                peer.send(spdy.DataFrame(1, chunk))
            peer.send(spdy.DataFrame(1, b"", fin=True))
        except OSError:
            pass
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    time.sleep(0.5)  # nobody reads: the reader stops, the sender blocks on the socket
    assert len(s._buf) <= 64 * 1024 + spdy.MAX_DATA_CHUNK
    assert sender.is_alive()
    got = 0
    while data := s.read():
        got += len(data)
        assert len(s._buf) <= 64 * 1024 + spdy.MAX_DATA_CHUNK
    assert got == total
    sender.join(10)


def test_close_wakes_a_blocked_writer_and_the_reader(pair):
    conn, peer, streams, t = pair()
    peer.send(spdy.SynStream(1, {}), spdy.Ping(1))
    peer.until(is_(spdy.Ping))
    (s,) = streams
    errors = []

    def writer():  # the peer never reads: this blocks on the socket
        try:
            while True:
                s.write(b"w" * 65536)
        except BrokenPipeError as e:
            errors.append(e)
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    time.sleep(0.3)
    assert w.is_alive()
    reader = threading.Thread(target=lambda: errors.append(s.read()), daemon=True)
    reader.start()
    conn.close()
    w.join(5)
    reader.join(5)
    assert not w.is_alive() and not reader.is_alive()
    assert isinstance(errors[0], BrokenPipeError) or isinstance(errors[1], BrokenPipeError)
    assert b"" in errors
    t.join(5)  # the reader drains for at most a moment and closes
    assert not t.is_alive()


def test_close_before_serve_closes_the_socket():
    a, b = socket.socketpair()
    conn = spdy.SpdyConnection(a, lambda s: None)
    conn.close()
    assert conn.closed.is_set() and a.fileno() == -1
    conn.serve()  # returns at once
    b.close()


def test_a_failing_stream_handler_resets_only_its_stream(pair):
    def handler(s):
        raise RuntimeError("boom")
    conn, peer, streams, t = pair(on_stream=handler)
    peer.send(spdy.SynStream(1, {}))
    assert peer.until(is_(spdy.RstStream)) == spdy.RstStream(1, spdy.INTERNAL_ERROR)
    assert t.is_alive()
