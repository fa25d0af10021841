"""RFC 6455 server framing: handshake, masking, fragmentation, control frames, limits.

Client frames come from websocket-client's own encoder (ABNF) where it can
make them, so the parser is checked against an implementation nobody here wrote.
"""

import base64
import os
import socket
import struct
import threading

import pytest
from websocket import ABNF

from cri_shim.streaming import websocket as ws


def client_frame(opcode, data, fin=1):
    return ABNF(fin, 0, 0, 0, opcode, 1, data).format()


def test_accept_key_rfc_example():
    # RFC 6455 section 1.3
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def _headers(**kw):
    h = {"connection": ["keep-alive, Upgrade"], "upgrade": ["websocket"], "sec-websocket-version": ["13"],
         "sec-websocket-key": [base64.b64encode(os.urandom(16)).decode()]}
    h.update(kw)
    return {k: v for k, v in h.items() if v is not None}


def test_handshake_checks():
    key = ws.handshake_key("GET", _headers())
    assert ws.accept_key(key).encode() in ws.handshake_response(key, "v4.channel.k8s.io")
    assert b"Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n" in ws.handshake_response(key, "v4.channel.k8s.io")
    assert b"Sec-WebSocket-Protocol" not in ws.handshake_response(key, None)
    for method, headers, status in [
        ("POST", _headers(), 405),
        ("GET", _headers(upgrade=None), 400),
        ("GET", _headers(connection=["close"]), 400),
        ("GET", _headers(**{"sec-websocket-version": ["8"]}), 426),
        ("GET", _headers(**{"sec-websocket-key": None}), 400),
        ("GET", _headers(**{"sec-websocket-key": ["a", "b"]}), 400),
        ("GET", _headers(**{"sec-websocket-key": ["not base64!"]}), 400),
        ("GET", _headers(**{"sec-websocket-key": [base64.b64encode(b"short").decode()]}), 400),
    ]:
        with pytest.raises(ws.HandshakeError) as e:
            ws.handshake_key(method, headers)
        assert e.value.status == status


def test_offered_protocols_keep_order():
    h = {"sec-websocket-protocol": ["v5.channel.k8s.io, v4.channel.k8s.io", "base64.channel.k8s.io"]}
    assert ws.offered_protocols(h) == ["v5.channel.k8s.io", "v4.channel.k8s.io", "base64.channel.k8s.io"]
    assert ws.offered_protocols({}) == []


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300000])
def test_masked_frames_of_every_length_form(size):
    data = os.urandom(size)
    raw = client_frame(ABNF.OPCODE_BINARY, data)
    parser = ws.FrameParser()
    frames = []
    for i in range(0, len(raw), 7777):  # fed in pieces: incremental
        frames += parser.feed(raw[i:i + 7777])
    assert frames == [ws.Frame(True, ws.OP_BINARY, data)]


def test_server_frames_decode_with_websocket_client():
    for size in (0, 5, 200, 70000):
        data = os.urandom(size)
        raw = ws.encode_frame(ws.OP_BINARY, data)
        assert raw[1] & 0x80 == 0  # server frames are not masked
        got = []
        buf = [raw]

        def recv(n):
            chunk = buf[0][:n]
            buf[0] = buf[0][n:]
            return chunk
        from websocket._abnf import frame_buffer
        frame = frame_buffer(recv, skip_utf8_validation=True).recv_frame()
        got.append(frame.data)
        assert got == [data] and frame.opcode == ABNF.OPCODE_BINARY


def test_fragmented_message_with_a_ping_between():
    parser, asm = ws.FrameParser(), ws.MessageAssembler()
    raw = (client_frame(ABNF.OPCODE_TEXT, b"hel", fin=0) + client_frame(ABNF.OPCODE_PING, b"p")
           + client_frame(ABNF.OPCODE_CONT, b"lo", fin=0) + client_frame(ABNF.OPCODE_CONT, "ü".encode(), fin=1))
    out = [m for f in parser.feed(raw) if (m := asm.add(f)) is not None]
    assert out == [(ws.OP_PING, b"p"), (ws.OP_TEXT, "helloü".encode())]


def _unmasked(first, payload):
    return bytes([first, len(payload)]) + payload


@pytest.mark.parametrize("raw, code", [
    (_unmasked(0x82, b"x"), ws.CLOSE_PROTOCOL_ERROR),  # not masked
    (ws.encode_frame(ws.OP_BINARY, b"x", mask=b"abcd", rsv=1), ws.CLOSE_PROTOCOL_ERROR),
    (ws.encode_frame(0x3, b"x", mask=b"abcd"), ws.CLOSE_PROTOCOL_ERROR),  # reserved opcode
    (ws.encode_frame(ws.OP_PING, b"x" * 126, mask=b"abcd"), ws.CLOSE_PROTOCOL_ERROR),
    (ws.encode_frame(ws.OP_PING, b"x", mask=b"abcd", fin=False), ws.CLOSE_PROTOCOL_ERROR),
    (bytes([0x82, 0xFE, 0x00, 0x05]) + b"abcd" + b"xxxxx", ws.CLOSE_PROTOCOL_ERROR),  # 16-bit length < 126
    (bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"abcd", ws.CLOSE_PROTOCOL_ERROR),
    (bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40) + b"abcd", ws.CLOSE_TOO_BIG),  # length alone refuses it
])
def test_bad_frames(raw, code):
    with pytest.raises(ws.ProtocolError) as e:
        ws.FrameParser().feed(raw)
    assert e.value.code == code


@pytest.mark.parametrize("frames, code", [
    ([(ABNF.OPCODE_CONT, b"x", 1)], ws.CLOSE_PROTOCOL_ERROR),  # continuation of nothing
    ([(ABNF.OPCODE_TEXT, b"a", 0), (ABNF.OPCODE_BINARY, b"b", 1)], ws.CLOSE_PROTOCOL_ERROR),
    ([(ABNF.OPCODE_TEXT, b"\xff\xfe", 1)], ws.CLOSE_INVALID_DATA),
    ([(ABNF.OPCODE_CLOSE, b"\x03", 1)], ws.CLOSE_PROTOCOL_ERROR),  # one-byte close payload
    ([(ABNF.OPCODE_CLOSE, struct.pack("!H", 999), 1)], ws.CLOSE_PROTOCOL_ERROR),
    ([(ABNF.OPCODE_CLOSE, struct.pack("!H", 1005), 1)], ws.CLOSE_PROTOCOL_ERROR),
    ([(ABNF.OPCODE_BINARY, b"x" * 600, 0), (ABNF.OPCODE_CONT, b"x" * 600, 1)], ws.CLOSE_TOO_BIG),
])
def test_bad_messages(frames, code):
    parser, asm = ws.FrameParser(), ws.MessageAssembler(max_message=1000)
    with pytest.raises(ws.ProtocolError) as e:
        for op, data, fin in frames:
            for f in parser.feed(ABNF(fin, 0, 0, 0, op, 1, data).format()):
                asm.add(f)
    assert e.value.code == code


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    b.settimeout(5)
    yield ws.WebSocketConnection(a, max_message=1000), b
    a.close()
    b.close()


def _read_frames(sock, parser=None):
    parser = parser or ws.FrameParser(require_mask=False)
    frames = []
    while not frames:
        data = sock.recv(65536)
        if not data:
            break
        frames = parser.feed(data)
    return frames


def test_connection_ping_pong_messages_and_close(pair):
    conn, client = pair
    client.sendall(client_frame(ABNF.OPCODE_PING, b"hi") + client_frame(ABNF.OPCODE_BINARY, b"\x00data"))
    assert conn.recv_message() == (ws.OP_BINARY, b"\x00data")
    assert _read_frames(client) == [ws.Frame(True, ws.OP_PONG, b"hi")]
    conn.send(ws.OP_BINARY, b"\x01out")
    assert _read_frames(client) == [ws.Frame(True, ws.OP_BINARY, b"\x01out")]
    client.sendall(client_frame(ABNF.OPCODE_CLOSE, struct.pack("!H", 1000) + b"bye"))
    assert conn.recv_message() is None and conn.closed.is_set()
    assert _read_frames(client) == [ws.Frame(True, ws.OP_CLOSE, struct.pack("!H", 1000))]
    with pytest.raises(BrokenPipeError):
        conn.send(ws.OP_BINARY, b"late")


def test_connection_closes_with_the_error_code(pair):
    conn, client = pair
    client.sendall(client_frame(ABNF.OPCODE_BINARY, b"x" * 1001))  # over max_message
    assert conn.recv_message() is None
    frames = _read_frames(client)
    assert frames[0].opcode == ws.OP_CLOSE and struct.unpack("!H", frames[0].payload[:2])[0] == ws.CLOSE_TOO_BIG


def test_connection_peer_gone_and_initial_bytes():
    a, b = socket.socketpair()
    conn = ws.WebSocketConnection(a, initial=client_frame(ABNF.OPCODE_BINARY, b"early"))
    assert conn.recv_message() == (ws.OP_BINARY, b"early")
    b.close()
    assert conn.recv_message() is None and conn.closed.is_set()
    a.close()


def test_close_sent_once_and_send_refused_after(pair):
    conn, client = pair
    conn.close(1000)
    conn.close(1001)
    frames = _read_frames(client)
    assert frames == [ws.Frame(True, ws.OP_CLOSE, struct.pack("!H", 1000))]
    with pytest.raises(BrokenPipeError):
        conn.send(ws.OP_BINARY, b"x")


def test_concurrent_senders_never_interleave_frames(pair):
    conn, client = pair
    conn._parser.max_frame = conn._assembler.max_message = 1 << 20
    payloads = [bytes([i]) * 50000 for i in range(8)]
    threads = [threading.Thread(target=conn.send, args=(ws.OP_BINARY, p)) for p in payloads]
    for t in threads:
        t.start()
    parser = ws.FrameParser(require_mask=False)
    got = []
    while len(got) < 8:
        got += parser.feed(client.recv(65536))
    for t in threads:
        t.join()
    assert sorted(f.payload for f in got) == sorted(payloads)
