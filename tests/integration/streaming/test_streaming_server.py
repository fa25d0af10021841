"""The streaming server in-process against real clients: the Go SPDY client (moby/spdystream, built by
tests/support/spdyclient.py) and the kubernetes Python client's `stream` module (WebSocket).

The runtime behind it is a fake of this file (FakeBackend): commands that echo, exit with a code,
write stderr, copy stdin until its EOF, wait for the session's end; port-forward that answers in
upper case or fails. What runs in a VM is tested with the runtime's own tests.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
import websocket
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

from cri_shim import errors
from cri_shim.streaming.server import ServerConfig, StreamingServer
from proto.runtime.v1 import api_pb2
from tests.support import spdyclient


def wait_until(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class FakeBackend:
    def __init__(self):
        self.started = threading.Event()
        self.ended: list[str] = []  # how each blocking session ended
        self.stdin_eof = threading.Event()
        self.lock = threading.Lock()

    def exec(self, container_id, cmd, session):
        op, args = cmd[0], cmd[1:]
        if op == "both":  # both OUT ERR CODE
            session.stdout.write(args[0].encode())
            (session.stderr or session.stdout).write(args[1].encode())
            return int(args[2])
        if op == "exit":
            return int(args[0])
        if op == "cat":
            while data := session.stdin.read():
                session.stdout.write(data)
            self.stdin_eof.set()
            return 0
        if op == "fail":
            raise errors.failed_precondition(" ".join(args))
        if op == "size":
            try:
                w, h = session.resize.get(timeout=5)
                session.stdout.write(f"{w}x{h}".encode())
            except Exception:  # noqa: BLE001
                session.stdout.write(b"none")
            return 0
        if op == "block":
            self.started.set()
            closed = session.closed.wait(30)
            with self.lock:
                self.ended.append("closed" if closed else "timeout")
            return 0
        if op == "big":  # big N: N bytes of a pattern
            n = int(args[0])
            session.stdout.write((b"0123456789abcdef" * (n // 16 + 1))[:n])
            return 0
        raise errors.invalid_argument(f"unknown fake command {op}")

    def attach(self, container_id, session):
        session.stdout.write(b"attached\n")
        if session.stdin is not None:
            while data := session.stdin.read():
                session.stdout.write(data)

    def port_forward(self, pod_sandbox_id, port, stream):
        if port == 81:
            raise errors.unavailable("nothing listens on port 81")
        if port == 82:
            self.started.set()
            closed = stream.closed.wait(30)
            with self.lock:
                self.ended.append("closed" if closed else "timeout")
            return
        while data := stream.read():
            stream.write(data.upper())
        stream.close_write()


@pytest.fixture
def make_server():
    made = []

    def make(backend=None, **config):
        backend = backend or FakeBackend()
        srv = StreamingServer(backend, ServerConfig(**config)).start()
        made.append(srv)
        return srv, backend
    yield make
    for srv in made:
        srv.stop()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def client_bin():
    return spdyclient.require()


def exec_url(srv, cmd, stdin=False, stdout=True, stderr=True, tty=False):
    return srv.get_exec(api_pb2.ExecRequest(container_id="c1", cmd=cmd, stdin=stdin, stdout=stdout,
                                            stderr=stderr and not tty, tty=tty))


def spdy(client_bin, mode, url, *args, port=None, input=b"", timeout=30):
    tail = [url] if port is None else [url, str(port)]
    return subprocess.run([str(client_bin), mode, *args, *tail], input=input, capture_output=True, timeout=timeout)


def spdy_exec(client_bin, tmp_path, url, *args, input=b""):
    status = tmp_path / f"status-{time.monotonic_ns()}.json"
    proc = spdy(client_bin, "exec", url, "--status-file", str(status), *args, input=input)
    return proc, json.loads(status.read_text()) if status.exists() else None


# ---------------------------------------------------------------- SPDY

@pytest.mark.parametrize("protocol, json_status", [
    ("v5.channel.k8s.io", True), ("v4.channel.k8s.io", True), ("v3.channel.k8s.io", False),
    ("v2.channel.k8s.io", False), ("channel.k8s.io", False)])
def test_spdy_exec_every_protocol(server, client_bin, tmp_path, protocol, json_status):
    srv, _ = server
    proc, status = spdy_exec(client_bin, tmp_path, exec_url(srv, ["both", "to-out", "to-err", "42"]),
                             "--protocols", protocol)
    assert proc.stdout == b"to-out"
    assert proc.stderr.startswith(b"to-err") and b"to-out" not in proc.stderr.split(b"spdyclient:")[0]
    assert status["protocol"] == protocol
    if json_status:
        assert proc.returncode == 42
        st = json.loads(status["error"])
        assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode"
        assert st["details"]["causes"] == [{"reason": "ExitCode", "message": "42"}]
    else:
        assert proc.returncode == 255  # client-go before v4: the text is the error
        assert status["error"].startswith("command terminated with non-zero exit code")
    # success: JSON Success from v4, nothing before
    proc, status = spdy_exec(client_bin, tmp_path, exec_url(srv, ["exit", "0"]), "--protocols", protocol)
    assert proc.returncode == 0
    assert status["error"] == ('{"metadata":{},"status":"Success"}' if json_status else "")


def test_spdy_exit_codes_and_runtime_errors(server, client_bin, tmp_path):
    srv, _ = server
    for code in (0, 1, 42, 255):
        proc, _ = spdy_exec(client_bin, tmp_path, exec_url(srv, ["exit", str(code)]))
        assert proc.returncode == code
    proc, status = spdy_exec(client_bin, tmp_path, exec_url(srv, ["fail", "no", "guest", "agent"]))
    assert proc.returncode == 255 and b"no guest agent" in proc.stderr
    assert json.loads(status["error"])["reason"] == "InternalError"
    assert status["protocol"] == "v5.channel.k8s.io"  # the Go client offers v5 first


def test_spdy_stdin_to_eof_and_large_output(server, client_bin, tmp_path):
    srv, backend = server
    data = os.urandom(700_000)
    proc, _ = spdy_exec(client_bin, tmp_path, exec_url(srv, ["cat"], stdin=True, stderr=False), "--stdin",
                        input=data)
    assert proc.returncode == 0 and proc.stdout == data
    assert backend.stdin_eof.is_set()
    proc, _ = spdy_exec(client_bin, tmp_path, exec_url(srv, ["big", "3000000"]))
    assert proc.returncode == 0 and len(proc.stdout) == 3_000_000


@pytest.mark.parametrize("protocol, want", [("v4.channel.k8s.io", b"100x40"), ("v3.channel.k8s.io", b"100x40"),
                                            ("v2.channel.k8s.io", b"none")])
def test_spdy_tty_resize(server, client_bin, tmp_path, protocol, want):
    srv, _ = server
    proc, _ = spdy_exec(client_bin, tmp_path, exec_url(srv, ["size"], tty=True), "--tty", "--size", "100x40",
                        "--protocols", protocol)
    assert proc.returncode == 0 and proc.stdout == want


def test_spdy_attach(server, client_bin, tmp_path):
    srv, _ = server
    url = srv.get_attach(api_pb2.AttachRequest(container_id="c1", stdin=True, stdout=True))
    proc = spdy(client_bin, "attach", url, "--stdin", input=b"typed\n")
    assert proc.returncode == 0 and proc.stdout == b"attached\ntyped\n"


def test_spdy_port_forward_both_ways_and_errors(server, client_bin):
    srv, _ = server
    data = os.urandom(200_000).hex().encode()
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1", port=[80]))
    proc = spdy(client_bin, "portforward", url, port=80, input=data)
    assert proc.returncode == 0 and proc.stdout == data.upper()
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
    proc = spdy(client_bin, "portforward", url, port=81, input=b"x")
    assert proc.returncode == 1
    assert b"error forwarding port 81 to pod p1: nothing listens on port 81" in proc.stderr


def test_spdy_negotiation(server, client_bin):
    srv, _ = server
    proc = spdy(client_bin, "raw", exec_url(srv, ["exit", "0"]), "--protocols", "v9.channel.k8s.io,bogus")
    assert b"403 Forbidden" in proc.stdout and b"unable to negotiate protocol" in proc.stderr
    proc = spdy(client_bin, "raw", exec_url(srv, ["exit", "0"]), "--protocols", "v3.channel.k8s.io,v4.channel.k8s.io")
    assert b"101 Switching Protocols" in proc.stdout and b"protocol: v3.channel.k8s.io" in proc.stdout
    # exec protocols are not port-forward's
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
    proc = spdy(client_bin, "raw", url, "--protocols", "v4.channel.k8s.io")
    assert b"403" in proc.stdout


# ---------------------------------------------------------------- raw HTTP

def http_request(srv, path, headers=(), method="GET", raw=None, timeout=10):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        if raw is None:
            lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{srv.port}", *headers]
            raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b"Content-Length" not in out.split(b"\r\n\r\n")[0]:
                break
        return out


SPDY_UPGRADE = ("Connection: Upgrade", "Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: v4.channel.k8s.io")


def test_unknown_reused_expired_and_wrong_kind_tokens_are_one_404(make_server):
    srv, _ = make_server(request_ttl=0.5)
    used = exec_url(srv, ["exit", "0"]).split(srv.base_url)[1]
    http_request(srv, used, SPDY_UPGRADE)  # consumes it (then closes)
    expired = exec_url(srv, ["exit", "0"]).split(srv.base_url)[1]
    time.sleep(0.6)
    attach_token = srv.get_attach(api_pb2.AttachRequest(container_id="c", stdout=True)).rsplit("/", 1)[1]
    answers = [http_request(srv, path, SPDY_UPGRADE) for path in (
        used, expired, f"/exec/{attach_token}", "/exec/AAAAAAAAAAAAAAAAAAAAAA", "/exec/", "/nothing/x",
        "/exec/../attach/x", "/exec/%00")]
    for a in answers:
        assert a.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert a.split(b"\r\n\r\n", 1)[1] == b"404 page not found\n"
    assert len({a.split(b"\r\n\r\n", 1)[1] for a in answers}) == 1


def test_upgrade_errors(server):
    srv, _ = server

    def path():
        return exec_url(srv, ["exit", "0"]).split(srv.base_url)[1]
    a = http_request(srv, path(), ("Connection: Upgrade", "Upgrade: SPDY/3.1"))
    assert a.startswith(b"HTTP/1.1 400") and b"X-Stream-Protocol-Version is required" in a
    a = http_request(srv, path(), ("Connection: Upgrade", "Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: v9"))
    assert a.startswith(b"HTTP/1.1 403") and b"X-Accepted-Stream-Protocol-Versions: v4.channel.k8s.io" in a
    a = http_request(srv, path(), ("X-Stream-Protocol-Version: v4.channel.k8s.io",))
    assert a.startswith(b"HTTP/1.1 400") and b"missing upgrade headers" in a
    a = http_request(srv, path(), SPDY_UPGRADE, method="PUT")
    assert a.startswith(b"HTTP/1.1 405")
    ws_headers = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
                  "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode())
    a = http_request(srv, path(), (*ws_headers, "Sec-WebSocket-Protocol: v9.channel.k8s.io"))
    assert a.startswith(b"HTTP/1.1 403") and b"not supported" in a
    a = http_request(srv, path(), ws_headers[:3])
    assert a.startswith(b"HTTP/1.1 400") and b"Sec-WebSocket-Key" in a
    pf = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).split(srv.base_url)[1]
    a = http_request(srv, pf + "?port=0", ws_headers)
    assert a.startswith(b"HTTP/1.1 400") and b"port" in a
    a = http_request(srv, "/x", raw=b"GARBAGE\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 400")
    a = http_request(srv, "/x", raw=b"GET /exec/x HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert a.startswith(b"HTTP/1.1 431")


# ---------------------------------------------------------------- WebSocket (kubernetes Python client)

def ws_exec(url, protocol=None):
    headers = {"sec-websocket-protocol": protocol} if protocol else None
    return ws_client.WSClient(Configuration(), url.replace("http", "ws", 1), headers, True)


@pytest.mark.parametrize("protocol", [None, "v4.channel.k8s.io"])  # None: the client's own v5,v4 offer
def test_websocket_exec_exit_codes_and_streams(server, protocol):
    srv, _ = server
    for code in (0, 1, 42):
        c = ws_exec(exec_url(srv, ["both", "out", "err", str(code)]), protocol)
        c.run_forever(timeout=10)
        assert c.subprotocol == (protocol or "v5.channel.k8s.io")
        assert c.read_stdout() == "out" and c.read_stderr() == "err"
        assert c.returncode == code
    c = ws_exec(exec_url(srv, ["fail", "agent", "gone"]), protocol)
    c.run_forever(timeout=10)
    err = json.loads(c.read_channel(ws_client.ERROR_CHANNEL))
    assert err["status"] == "Failure" and "agent gone" in err["message"]


def test_websocket_v5_stdin_close_signal(server):
    srv, backend = server
    c = ws_exec(exec_url(srv, ["cat"], stdin=True, stderr=False))
    assert c.subprotocol == "v5.channel.k8s.io"
    c.write_stdin("line one\n")
    c.write_stdin(b"\x00\xffbinary")
    c.close_channel(ws_client.STDIN_CHANNEL)
    c.run_forever(timeout=10)
    assert backend.stdin_eof.is_set()
    assert c.read_stdout().encode("utf-8", "replace").startswith(b"line one\n")
    assert c.returncode == 0


def test_websocket_base64_protocol(server):
    srv, _ = server
    url = exec_url(srv, ["both", "o\x01", "e", "3"]).replace("http", "ws", 1)
    conn = websocket.create_connection(url, subprotocols=["base64.channel.k8s.io"], timeout=10)
    assert conn.subprotocol == "base64.channel.k8s.io"
    got = {}
    while True:
        try:
            op, frame = conn.recv_data_frame(True)
        except websocket.WebSocketConnectionClosedException:
            break
        if op == websocket.ABNF.OPCODE_CLOSE:
            break
        assert op == websocket.ABNF.OPCODE_TEXT
        text = frame.data.decode()
        got.setdefault(int(text[0]), b"")
        got[int(text[0])] += base64.b64decode(text[1:])
    conn.close()
    # before v4: the status is the message in plain text
    assert got[1] == b"o\x01" and got[2] == b"e" and got[3].startswith(b"command terminated with non-zero exit code")


def test_websocket_port_forward(server):
    srv, _ = server
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1", port=[80, 81]))
    pf = ws_client.portforward_call(Configuration(), "GET", url.replace("http", "ws", 1) + "?ports=80,81")
    s = pf.socket(80)
    s.settimeout(10)
    payload = os.urandom(300_000).hex().encode()
    sender = threading.Thread(target=s.sendall, args=(payload,))
    sender.start()
    got = b""
    while len(got) < len(payload):
        got += s.recv(65536)
    sender.join()
    assert got == payload.upper()
    wait_until(lambda: pf.error(81) is not None, what="the error of port 81")
    assert "error forwarding port 81 to pod p1: nothing listens on port 81" in pf.error(81)
    pf.close()


# ---------------------------------------------------------------- many at once, vanishing clients, junk

def _fds():
    return len(os.listdir("/proc/self/fd"))


def test_concurrent_sessions(server, client_bin, tmp_path):
    srv, _ = server
    results = {}

    def spdy_one(i):
        data = os.urandom(50_000)
        proc, _ = spdy_exec(client_bin, tmp_path, exec_url(srv, ["cat"], stdin=True, stderr=False), "--stdin",
                            input=data)
        results[f"spdy{i}"] = proc.returncode == 0 and proc.stdout == data

    def ws_one(i):
        c = ws_exec(exec_url(srv, ["both", f"o{i}", f"e{i}", str(i)]))
        c.run_forever(timeout=20)
        results[f"ws{i}"] = (c.read_stdout(), c.read_stderr(), c.returncode) == (f"o{i}", f"e{i}", i)
    threads = [threading.Thread(target=spdy_one, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=ws_one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {**{f"spdy{i}": True for i in range(8)}, **{f"ws{i}": True for i in range(8)}}
    wait_until(lambda: srv.connection_count() == 0, what="all connections closed")


def test_client_killed_mid_stream_closes_the_session(server, client_bin):
    srv, backend = server
    wait_until(lambda: srv.connection_count() == 0)
    threads, fds = threading.active_count(), _fds()
    # SPDY: kill -9 the Go client while the command waits
    proc = subprocess.Popen([str(client_bin), "exec", exec_url(srv, ["block"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert backend.started.wait(10)
        proc.kill()
    finally:
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    wait_until(lambda: backend.ended == ["closed"], what="the exec session to see closed")
    # WebSocket: the socket dropped without a close frame
    backend.started.clear()
    c = ws_exec(exec_url(srv, ["block"]))
    assert backend.started.wait(10)
    c.sock.sock.shutdown(socket.SHUT_RDWR)
    c.sock.sock.close()
    wait_until(lambda: backend.ended == ["closed", "closed"], what="the WebSocket session to see closed")
    # port-forward over SPDY: the forward sees closed
    backend.started.clear()
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
    proc = subprocess.Popen([str(client_bin), "portforward", url, "82"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert backend.started.wait(10)
        proc.kill()
    finally:
        proc.wait(10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    wait_until(lambda: backend.ended == ["closed"] * 3, what="the forward to see closed")
    wait_until(lambda: srv.connection_count() == 0 and threading.active_count() <= threads and _fds() <= fds,
               what=f"threads back to {threads} and fds to {fds}")


def _junk(srv, client_bin):
    port = srv.port
    token_path = lambda: exec_url(srv, ["block"]).split(srv.base_url)[1]  # noqa: E731
    raw_cases = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS hello to a plain server
        os.urandom(3000),
        b"GET / HTTP/1.1\r\n",  # and then nothing: the header timeout ends it
        b"GET /exec/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
        b"GET /exec/x HTTP/1.1\r\n" + b"A: b\r\n" * 200 + b"\r\n",
        b"GET /exec/x HTTP/9.9\r\n\r\n",
    ]
    for raw in raw_cases:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(raw)
                s.recv(100)
            except OSError:
                pass
    # upgraded, then garbage: SPDY frames that are not, and WebSocket frames that break the rules
    for garbage in (b"\x80\x03\x00\x01\x00\x00\x00\x05\x00\x00\x00\x01\x00",  # SYN_STREAM too short
                    b"\x80\x02\x00\x01" + b"\xff" * 100, os.urandom(5000)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall((f"POST {token_path()} HTTP/1.1\r\nHost: a\r\n" + "".join(h + "\r\n" for h in SPDY_UPGRADE)
                       + "\r\n").encode() + garbage)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass
    key = base64.b64encode(os.urandom(16)).decode()
    for garbage in (struct.pack("!BB", 0x82, 5) + b"nomsk",  # unmasked
                    struct.pack("!BBQ", 0x82, 0xFF, 1 << 40) + b"abcd",  # 1 TiB frame
                    os.urandom(3000)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall((f"GET {token_path()} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                       f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode() + garbage)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass


def test_junk_connections_leave_no_thread_or_fd(make_server, client_bin):
    srv, backend = make_server(header_timeout=1.0, stream_creation_timeout=1.0)
    _junk(srv, client_bin)  # warm-up (lazy imports, the first TLS/SPDY objects)
    wait_until(lambda: srv.connection_count() == 0, timeout=15)
    threads, fds = threading.active_count(), _fds()
    for _ in range(5):
        _junk(srv, client_bin)
    # upgraded and then silent: the stream-creation timeout closes it
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall((f"POST {exec_url(srv, ['exit', '0']).split(srv.base_url)[1]} HTTP/1.1\r\nHost: a\r\n"
                   + "".join(h + "\r\n" for h in SPDY_UPGRADE) + "\r\n").encode())
        start = time.monotonic()
        while s.recv(65536):
            pass
        assert time.monotonic() - start < 8
    wait_until(lambda: srv.connection_count() == 0 and threading.active_count() <= threads and _fds() <= fds,
               timeout=15, what=f"threads back to {threads} and fds to {fds}")
    # WebSocket sessions start at the handshake: those the junk broke saw `closed`, none waited out its 30 s
    assert backend.ended and set(backend.ended) == {"closed"}
    # and the server still works
    proc = spdy(client_bin, "exec", exec_url(srv, ["exit", "1"]))
    assert proc.returncode == 1


def test_idle_timeout_and_connection_limit(make_server):
    srv, backend = make_server(stream_idle_timeout=1.0, max_connections=2, header_timeout=5.0)
    c = ws_exec(exec_url(srv, ["block"]))
    assert backend.started.wait(10)
    wait_until(lambda: backend.ended == ["closed"], timeout=10, what="the idle session to be closed")
    c.close()
    wait_until(lambda: srv.connection_count() == 0)
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        wait_until(lambda: srv.connection_count() == 2)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            assert s.recv(100).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()


def test_stop_closes_every_session(make_server):
    srv, backend = make_server()
    c = ws_exec(exec_url(srv, ["block"]))
    assert backend.started.wait(10)
    srv.stop()
    assert backend.ended == ["closed"]
    assert srv.connection_count() == 0
    c.close()


# ---------------------------------------------------------------- TLS

@pytest.fixture
def self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vmlet-test",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_with_a_self_signed_certificate(make_server, self_signed, client_bin, tmp_path):
    cert, key = self_signed
    srv, _ = make_server(tls_cert=cert, tls_key=key)
    url = exec_url(srv, ["both", "secret-out", "e", "42"])
    assert url.startswith(f"https://127.0.0.1:{srv.port}/exec/")
    proc = spdy(client_bin, "exec", url, "--ca-file", str(cert))
    assert proc.returncode == 42 and proc.stdout == b"secret-out"
    cfg = Configuration()
    cfg.ssl_ca_cert = str(cert)
    c = ws_client.WSClient(cfg, exec_url(srv, ["both", "o", "e", "1"]).replace("https", "wss", 1), None, True)
    c.run_forever(timeout=10)
    assert (c.read_stdout(), c.returncode) == ("o", 1)
    url = srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
    proc = spdy(client_bin, "portforward", url, "--ca-file", str(cert), port=80, input=b"over tls")
    assert proc.returncode == 0 and proc.stdout == b"OVER TLS"
    # plain HTTP to the TLS port is no request
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /exec/x HTTP/1.1\r\n\r\n")
        try:
            assert b"404" not in s.recv(100)
        except OSError:
            pass
    ctx = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"GET /exec/unknown HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 404")


def test_urls_name_the_configured_host(make_server):
    srv, _ = make_server(address="0.0.0.0")
    assert exec_url(srv, ["exit", "0"]).startswith(f"http://127.0.0.1:{srv.port}/exec/")
    srv, _ = make_server(address="::1")
    assert exec_url(srv, ["exit", "0"]).startswith(f"http://[::1]:{srv.port}/exec/")
    srv, _ = make_server(address="127.0.0.1", advertise_address="127.0.0.9")
    assert srv.get_attach(api_pb2.AttachRequest(container_id="c", stdout=True)).startswith(
        f"http://127.0.0.9:{srv.port}/attach/")


@pytest.mark.parametrize("req, field", [
    (api_pb2.ExecRequest(cmd=["x"], stdout=True), "container_id"),
    (api_pb2.ExecRequest(container_id="c", stdout=True), "cmd"),
    (api_pb2.ExecRequest(container_id="c", cmd=["x"]), "stdin, stdout, stderr"),
    (api_pb2.ExecRequest(container_id="c", cmd=["x"], tty=True, stderr=True), "tty and stderr"),
])
def test_get_exec_validates(server, req, field):
    srv, _ = server
    with pytest.raises(errors.CRIError) as e:
        srv.get_exec(req)
    assert e.value.code.name == "INVALID_ARGUMENT" and field in e.value.message

