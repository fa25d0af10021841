"""The streaming server under clients that misbehave within the protocol: ones that never read, ones that keep
sending after the runtime stopped reading, exec stdin where the protocol cannot end it, and TLS sessions read and
written at once. In-process server, real clients (the Go spdystream client, websocket-client, the kubernetes
Python client), and a fake runtime of this file.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
import time

import grpc
import pytest
import websocket
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

from cri_shim import errors
from proto.runtime.v1 import api_pb2
from tests.integration.streaming import test_streaming_server as base

# That file's fixtures (the in-process server, the Go client, a certificate) and helpers.
make_server, client_bin, self_signed = base.make_server, base.client_bin, base.self_signed
spdy, wait_until = base.spdy, base.wait_until

MiB = 1 << 20


class Backend:
    """exec `head N`: reads at most N bytes of stdin, then fails as exec_stream does past its cap;
    exec `flood` / port 83: write until the client is gone; attach: floods too, and with `overrun` set
    gives up as attach_stream does (RESOURCE_EXHAUSTED) while its pump is still blocked on the client."""

    def __init__(self, overrun: bool = False):
        self.overrun = overrun
        self.calls: list[str] = []
        self.flood_ended = threading.Event()
        self.flood_error: list[BaseException] = []
        self.started = threading.Event()

    def _flood(self, writer):
        self.started.set()
        try:
            while True:
                writer.write(b"x" * 65536)
        except OSError as e:
            self.flood_error.append(e)
        finally:
            self.flood_ended.set()

    def exec(self, container_id, cmd, session):
        self.calls.append(cmd[0])
        if cmd[0] == "head":
            n = 0
            while n <= int(cmd[1]):
                data = session.stdin.read(65536)
                if not data:
                    return 0
                n += len(data)
            raise errors.failed_precondition(f"stdin: more than {cmd[1]} bytes")
        if cmd[0] == "cat":
            while data := session.stdin.read():
                session.stdout.write(data)
            return 0
        if cmd[0] == "flood":
            self._flood(session.stdout)
            return 0
        raise errors.invalid_argument(f"unknown fake command {cmd[0]}")

    def attach(self, container_id, session):
        self.calls.append("attach")
        if not self.overrun:
            session.stdout.write(b"attached\n")
            while data := session.stdin.read():
                session.stdout.write(data)
            return
        threading.Thread(target=self._flood, args=(session.stdout,), daemon=True).start()
        assert self.started.wait(10)
        time.sleep(1)  # the pump is blocked on the client by now
        raise errors.CRIError(grpc.StatusCode.RESOURCE_EXHAUSTED, "disconnected: the client left output unread")

    def port_forward(self, pod_sandbox_id, port, stream):
        if port == 81:
            raise errors.unavailable("nothing listens on port 81")
        if port == 83:
            self._flood(stream)
            return
        while data := stream.read():
            stream.write(data.upper())


def ws_connect(url, protocol, **kw):
    return websocket.create_connection(url.replace("http", "ws", 1), subprotocols=[protocol], timeout=10, **kw)


def ws_messages(conn, until):
    """(channel, payload) of the server's binary messages until `until(channel, payload)` or the close."""
    got = []
    while True:
        op, data = conn.recv_data(control_frame=True)
        if op == websocket.ABNF.OPCODE_CLOSE:
            return got
        if op == websocket.ABNF.OPCODE_BINARY and data:
            got.append((data[0], data[1:]))
            if until(data[0], data[1:]):
                return got


def never_reading_ws(url, protocol="v4.channel.k8s.io"):
    """A WebSocket client that will not read: a small receive buffer, and nobody calls recv."""
    return ws_connect(url, protocol, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])


# ---------------------------------------------------------------- stdin the runtime no longer reads (finding 1)

def test_websocket_stdin_sent_after_the_runtime_stopped_reading_is_dropped(make_server):
    srv, backend = make_server(Backend())
    url = srv.get_exec(api_pb2.ExecRequest(container_id="c", cmd=["head", str(MiB)], stdin=True, stdout=True))
    conn = ws_connect(url, "v5.channel.k8s.io")
    try:
        chunk = b"\x00" + os.urandom(65536)
        for _ in range(64):  # 4 MiB: far past the 1 MiB the runtime reads and the server's 1 MiB pipe
            conn.send(chunk, opcode=websocket.ABNF.OPCODE_BINARY)  # times out (10 s) if the reader is stuck
        got = ws_messages(conn, lambda ch, _: False)  # to the server's close frame
        status = json.loads(b"".join(p for ch, p in got if ch == 3))
        assert status["status"] == "Failure" and "stdin: more than 1048576 bytes" in status["message"]
    finally:
        conn.close()
    wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the connection to end")


def test_websocket_port_forward_data_for_a_refused_port_does_not_stall_the_others(make_server):
    srv, _ = make_server(Backend())
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
    conn = ws_connect(url + "?port=81&port=80", "v4.channel.k8s.io")
    try:
        # 81: data channel 0, error 1; 80: data 2, error 3. Each channel first says its port.
        got = ws_messages(conn, lambda ch, p: ch == 1 and len(p) > 2)
        assert b"nothing listens on port 81" in b"".join(p for ch, p in got if ch == 1)
        chunk = b"\x00" + b"a" * 65536
        for _ in range(48):  # 3 MiB for the refused port: nobody will read it
            conn.send(chunk, opcode=websocket.ABNF.OPCODE_BINARY)
        conn.send(b"\x02hello", opcode=websocket.ABNF.OPCODE_BINARY)
        echoed = ws_messages(conn, lambda ch, p: ch == 2 and p == b"HELLO")
        assert (2, b"HELLO") in echoed
    finally:
        conn.close()
    wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the connection to end")


# ---------------------------------------------------------------- clients that never read (finding 3)

def test_overrun_disconnects_a_websocket_client_that_never_reads(make_server):
    srv, backend = make_server(Backend(overrun=True))  # the default send timeout (30 s): not what ends it
    url = srv.get_attach(api_pb2.AttachRequest(container_id="c", stdout=True))
    conn = never_reading_ws(url)
    try:
        assert backend.started.wait(10)
        start = time.monotonic()
        wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the overrun client to be disconnected")
        assert time.monotonic() - start < 8
        assert backend.flood_ended.wait(5) and isinstance(backend.flood_error[0], BrokenPipeError)
    finally:
        conn.close()


def test_overrun_disconnects_a_spdy_client_that_never_reads(make_server, client_bin):
    srv, backend = make_server(Backend(overrun=True))
    url = srv.get_attach(api_pb2.AttachRequest(container_id="c", stdout=True))
    # The Go client copies the stream to its stdout, a pipe nobody reads here: it stops reading the socket.
    proc = subprocess.Popen([str(client_bin), "attach", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert backend.started.wait(10)
        wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the overrun client to be disconnected")
        assert backend.flood_ended.wait(5) and isinstance(backend.flood_error[0], BrokenPipeError)
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_send_deadline_disconnects_a_websocket_exec_client_that_never_reads(make_server):
    srv, backend = make_server(Backend(), send_timeout=1.5)
    url = srv.get_exec(api_pb2.ExecRequest(container_id="c", cmd=["flood"], stdout=True))
    conn = never_reading_ws(url)
    try:
        assert backend.started.wait(10)
        assert backend.flood_ended.wait(10), "the runtime's write still blocked on a client that never reads"
        assert isinstance(backend.flood_error[0], BrokenPipeError)
        wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the connection to be closed")
    finally:
        conn.close()


def test_send_deadline_disconnects_a_spdy_port_forward_client_that_never_reads(make_server, client_bin):
    srv, backend = make_server(Backend(), send_timeout=1.5)
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
    proc = subprocess.Popen([str(client_bin), "portforward", url, "83"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert backend.started.wait(10)
        assert backend.flood_ended.wait(10), "the forward's write still blocked on a client that never reads"
        wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the connection to be closed")
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_a_slow_reader_is_not_a_stuck_one(make_server, client_bin, tmp_path):
    """The deadline is on progress: a client that reads, however slowly, keeps its session."""
    srv, _ = make_server(Backend(), send_timeout=1.0)
    data = os.urandom(3 * MiB)
    url = srv.get_exec(api_pb2.ExecRequest(container_id="c", cmd=["cat"], stdin=True, stdout=True))
    conn = ws_connect(url, "v5.channel.k8s.io", sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    try:
        for i in range(0, len(data), 65536):
            conn.send(b"\x00" + data[i:i + 65536], opcode=websocket.ABNF.OPCODE_BINARY)
        conn.send(b"\xff\x00", opcode=websocket.ABNF.OPCODE_BINARY)  # v5: stdin's end
        out = bytearray()
        start = time.monotonic()
        while True:
            time.sleep(0.05)  # a reader that dawdles: each pause well within the deadline, all of them past it
            op, msg = conn.recv_data(control_frame=True)
            if op == websocket.ABNF.OPCODE_CLOSE:
                break
            if op == websocket.ABNF.OPCODE_BINARY and msg[:1] == b"\x01":
                out += msg[1:]
        assert bytes(out) == data and time.monotonic() - start > 1.5
    finally:
        conn.close()


# ---------------------------------------------------------------- exec stdin without an end (finding 11)

@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "channel.k8s.io"])
def test_websocket_exec_with_stdin_needs_a_protocol_that_can_end_it(make_server, protocol):
    srv, backend = make_server(Backend())
    url = srv.get_exec(api_pb2.ExecRequest(container_id="c", cmd=["cat"], stdin=True, stdout=True))
    c = ws_client.WSClient(Configuration(), url.replace("http", "ws", 1), {"sec-websocket-protocol": protocol}, True)
    c.write_stdin("some input\n")
    c.run_forever(timeout=10)
    assert not c.is_open(), "the session waits for a stdin EOF that only the connection's end brings"
    err = c.read_channel(ws_client.ERROR_CHANNEL)
    if protocol.startswith("v4"):
        err = json.loads(err)
        assert err["status"] == "Failure" and err["reason"] == "BadRequest"
        err = err["message"]
    assert "v5.channel.k8s.io" in err and "SPDY" in err and protocol in err
    assert backend.calls == []  # the runtime was never asked
    c.close()


def test_websocket_attach_with_stdin_on_v4_still_works(make_server):
    """Attach streams stdin as it comes (no EOF needed): v4 stays allowed there."""
    srv, _ = make_server(Backend())
    url = srv.get_attach(api_pb2.AttachRequest(container_id="c", stdin=True, stdout=True))
    conn = ws_connect(url, "v4.channel.k8s.io")
    try:
        conn.send(b"\x00typed\n", opcode=websocket.ABNF.OPCODE_BINARY)
        out = bytearray()
        for ch, p in ws_messages(conn, lambda ch, p: ch == 1 and p.endswith(b"typed\n")):
            if ch == 1:
                out += p
        assert bytes(out) == b"attached\ntyped\n"
    finally:
        conn.close()
    wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the connection to end")


# ---------------------------------------------------------------- TLS: one SSL object, one thread at a time (13)

class _Watched(ssl.SSLSocket):
    """An SSLSocket that records when two threads are inside its SSL calls at the same time."""

    lock = threading.Lock()
    inside: dict[tuple[int, int], int] = {}  # (socket, thread) -> call depth
    overlaps: list[str] = []
    calls = 0

    def _call(self, name, method, *args, **kw):
        me = (id(self), threading.get_ident())
        with _Watched.lock:
            others = [t for (s, t), depth in _Watched.inside.items() if s == id(self) and t != me[1] and depth]
            if others:
                _Watched.overlaps.append(f"{name} while another thread was in an SSL call")
            _Watched.inside[me] = _Watched.inside.get(me, 0) + 1
            _Watched.calls += 1
        try:
            return method(self, *args, **kw)
        finally:
            with _Watched.lock:
                _Watched.inside[me] -= 1


for _name in ("recv", "recv_into", "read", "send", "sendall", "write", "pending", "do_handshake"):
    setattr(_Watched, _name, (lambda n: lambda self, *a, **k: self._call(n, getattr(ssl.SSLSocket, n), *a, **k))(
        _name))


def test_tls_sessions_never_use_one_ssl_object_from_two_threads(make_server, self_signed, client_bin, tmp_path):
    cert, key = self_signed
    srv, _ = make_server(Backend(), tls_cert=cert, tls_key=key)
    srv._tls.sslsocket_class = _Watched
    _Watched.overlaps.clear()
    data = os.urandom(2 * MiB)
    # SPDY: the reader takes stdin while the session writes it back
    url = srv.get_exec(api_pb2.ExecRequest(container_id="c", cmd=["cat"], stdin=True, stdout=True))
    proc = spdy(client_bin, "exec", url, "--stdin", "--ca-file", str(cert), input=data, timeout=60)
    assert proc.returncode == 0 and proc.stdout == data, proc.stderr[-500:]
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
    proc = spdy(client_bin, "portforward", url, "--ca-file", str(cert), port=80, input=data[:MiB].hex().encode(),
                timeout=60)
    assert proc.returncode == 0 and proc.stdout == data[:MiB].hex().upper().encode()
    # WebSocket: the reader waits in recv the whole time the session writes. (websocket-client itself must
    # not send and receive from two threads on TLS, so it sends everything first: an amount the buffers hold.)
    small = data[:256 * 1024]
    url = srv.get_exec(api_pb2.ExecRequest(container_id="c", cmd=["cat"], stdin=True, stdout=True))
    conn = websocket.create_connection(url.replace("https", "wss", 1), subprotocols=["v5.channel.k8s.io"],
                                       timeout=20, sslopt={"ca_certs": str(cert)})
    try:
        for i in range(0, len(small), 16384):
            conn.send(b"\x00" + small[i:i + 16384], opcode=websocket.ABNF.OPCODE_BINARY)
        conn.send(b"\xff\x00", opcode=websocket.ABNF.OPCODE_BINARY)
        out = b"".join(p for ch, p in ws_messages(conn, lambda ch, p: False) if ch == 1)
        assert out == small
    finally:
        conn.close()
    wait_until(lambda: srv.connection_count() == 0, timeout=10, what="the connections to end")
    assert _Watched.calls > 100  # the sessions did go through the watched sockets
    assert _Watched.overlaps == []
