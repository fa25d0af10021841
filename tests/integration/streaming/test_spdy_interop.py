"""SpdyConnection against a real SPDY client: moby/spdystream, driven the way client-go drives it.

A tiny in-test server answers the HTTP upgrade and serves each connection
with cri_shim.streaming.spdy; its handlers echo (exec-like, port-forward-like,
many streams), so every byte the Go client checks went through both
implementations' framing and header compression.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

from cri_shim.streaming import spdy
from tests.support import spdyclient


@pytest.fixture(scope="module")
def client():
    return spdyclient.require()


class Server:
    """HTTP upgrade to SPDY/3.1 on loopback; each connection served in a thread of its own."""

    def __init__(self, protocols=("v4.channel.k8s.io",), max_streams=64, **conn_options):
        self.protocols = protocols
        self.max_streams = max_streams
        self.conn_options = conn_options  # more SpdyConnection keywords
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.conns: list[spdy.SpdyConnection] = []
        self.threads: list[threading.Thread] = []
        self.streams: list[spdy.SpdyStream] = []
        self.errors: list[BaseException] = []
        self.broken = 0  # sessions that ended on BrokenPipeError
        self.lock = threading.Lock()
        self._spawn(self._accept)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def _spawn(self, target, *args):
        def run():
            try:
                target(*args)
            except BaseException as e:  # surfaced by close()
                with self.lock:
                    self.errors.append(e)
        t = threading.Thread(target=run, daemon=True)
        with self.lock:
            self.threads.append(t)
        t.start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            self._spawn(self._connection, sock)

    def _connection(self, sock):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk or len(head) > 16384:
                sock.close()
                return
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        _method, target, _ = lines[0].split(" ", 2)
        offered = [v.strip() for line in lines[1:] for k, _, v in [line.partition(":")]
                   if k.strip().lower() == "x-stream-protocol-version"]
        path, _, query = target.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        handler = {"/exec": ExecSession, "/portforward": PortForward, "/echo": Echo, "/raw": Echo,
                   "/hold": HoldFirst, "/slow": SlowEcho}.get(path)
        chosen = next((p for p in offered if p in self.protocols), None)
        if handler is None or chosen is None:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found")
            sock.close()
            return
        sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                      f"X-Stream-Protocol-Version: {chosen}\r\n\r\n").encode())
        session = handler(self, params)
        conn = spdy.SpdyConnection(sock, session.on_stream, max_streams=self.max_streams, initial_data=rest,
                                   **self.conn_options)
        session.conn = conn
        with self.lock:
            self.conns.append(conn)
        conn.serve()

    def close(self):
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
        except OSError:
            pass
        self.lsock.close()
        for conn in list(self.conns):
            conn.close()
        deadline = time.monotonic() + 10
        for t in list(self.threads):
            t.join(max(0.1, deadline - time.monotonic()))
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, f"server threads left: {alive}"
        assert not self.errors, f"server thread failed: {self.errors!r}"


@pytest.fixture
def server():
    servers = []

    def make(**kw):
        s = Server(**kw)
        servers.append(s)
        return s
    before = threading.active_count()
    yield make
    for s in servers:
        s.close()
    assert threading.active_count() <= before, "threads left behind"


def read_all(stream):
    out = bytearray()
    while chunk := stream.read():
        out += chunk
    return bytes(out)


class ExecSession:
    """remotecommand-like: stdin echoed on stdout, its sha256 on stderr, the exit code ?rc= on the error stream."""

    def __init__(self, server, params):
        self.server, self.params, self.conn = server, params, None
        self.streams: dict[str, spdy.SpdyStream] = {}
        tty = params.get("tty") == "1"
        self.want = {"error", "stdout"} | ({"stdin"} if params.get("stdin") == "1" else set())
        self.want |= {"resize"} if tty else {"stderr"}

    def on_stream(self, stream):
        stream.reply({"x-vmlet-stream": stream.headers.get("streamtype", "?")})
        with self.server.lock:
            self.server.streams.append(stream)
        self.streams[stream.headers["streamtype"]] = stream
        if set(self.streams) == self.want:
            self.server._spawn(self.run)

    def run(self):
        try:
            self.session()
        except BrokenPipeError:  # the client went away: the session ends, as a server's would
            with self.server.lock:
                self.server.broken += 1

    def session(self):
        s = self.streams
        if "resize" in s:
            line = bytearray()
            while not line.endswith(b"\n"):
                chunk = s["resize"].read(1)
                if not chunk:
                    break
                line += chunk
            s["stdout"].write(bytes(line))
        digest = hashlib.sha256()
        if "stdin" in s:
            while data := s["stdin"].read():
                digest.update(data)
                s["stdout"].write(data)
        s["stdout"].close_write()
        if "stderr" in s:
            s["stderr"].write(digest.hexdigest().encode())
            s["stderr"].close_write()
        rc = int(self.params.get("rc", "0"))
        if self.params.get("empty") == "1":
            status = b""
        elif rc == 0:
            status = json.dumps({"metadata": {}, "status": "Success"}).encode()
        else:
            status = json.dumps({"metadata": {}, "status": "Failure", "message": f"exit {rc}",
                                 "reason": "NonZeroExitCode",
                                 "details": {"causes": [{"reason": "ExitCode", "message": str(rc)}]}}).encode()
        s["error"].write(status)
        s["error"].close_write()
        self.conn.close()  # as the kubelet does once the command is done


class PortForward:
    """port-forward-like: the data stream echoed; port 1 answers an error on the error stream."""

    def __init__(self, server, params):
        self.server, self.conn = server, None
        self.pairs: dict[str, dict[str, spdy.SpdyStream]] = {}

    def on_stream(self, stream):
        stream.reply()
        pair = self.pairs.setdefault(stream.headers.get("requestid", ""), {})
        pair[stream.headers.get("streamtype", "")] = stream
        if set(pair) == {"error", "data"}:
            self.server._spawn(self.run, pair)

    def run(self, pair):
        port = pair["data"].headers.get("port")
        if port == "1":
            pair["error"].write(b"error forwarding port 1: connection refused")
            pair["error"].close_write()
            pair["data"].close_write()
            return
        while data := pair["data"].read():
            pair["data"].write(data)
        pair["data"].close_write()
        pair["error"].close_write()


class Echo:
    """Every stream echoed until its FIN; the reply's headers repeat the stream's own."""

    def __init__(self, server, params):
        self.server, self.conn = server, None

    def on_stream(self, stream):
        self.server._spawn(self.run, stream)

    def run(self, stream):
        stream.reply({"index": stream.headers.get("index", ""), "content-type": "application/octet-stream"})
        while data := stream.read():
            stream.write(data)
        stream.close_write()


class HoldFirst(Echo):
    """Echo, except that stream index 0 is never read (a forwarded connection whose guest app is stuck)."""

    def run(self, stream):
        if stream.headers.get("index") != "0":
            return super().run(stream)
        stream.reply()
        with self.server.lock:
            self.server.streams.append(stream)
        stream.closed.wait(60)


class SlowEcho(Echo):
    """Echo that reads a little at a time, with pauses."""

    def run(self, stream):
        stream.reply()
        while data := stream.read(4096):
            time.sleep(0.01)
            stream.write(data)
        stream.close_write()


def run(client, *args, input=b"", timeout=60):
    return subprocess.run([str(client), *args], input=input, capture_output=True, timeout=timeout)


def test_exec_streams_large_data_both_ways_and_exit_code(client, server, tmp_path):
    srv = server()
    payload = os.urandom(3 * 1024 * 1024 + 12345)  # far over SPDY's 64 KiB initial window, both ways
    status_file = tmp_path / "status.json"
    proc = run(client, "exec", "--stdin", "--status-file", str(status_file), srv.url("/exec?stdin=1&rc=42"),
               input=payload)
    assert proc.returncode == 42, proc.stderr
    assert proc.stdout == payload
    assert proc.stderr.decode() == hashlib.sha256(payload).hexdigest()
    status = json.loads(status_file.read_text())
    assert status["protocol"] == "v4.channel.k8s.io"  # the client offers v5 first; this server has v4 only
    assert json.loads(status["error"])["details"]["causes"] == [{"reason": "ExitCode", "message": "42"}]
    # client-go's streams, in its order, headers decoded by the Python side
    assert [s.headers["streamtype"] for s in srv.streams] == ["error", "stdin", "stdout", "stderr"]
    assert all(s.closed.wait(5) for s in srv.streams)


@pytest.mark.parametrize("query, rc", [("rc=0", 0), ("rc=0&empty=1", 0), ("rc=1", 1)])
def test_exec_without_stdin(client, server, query, rc):
    srv = server()
    proc = run(client, "exec", srv.url("/exec?" + query))
    assert proc.returncode == rc, proc.stderr
    assert proc.stdout == b""
    assert proc.stderr.decode() == hashlib.sha256(b"").hexdigest()
    assert [s.headers["streamtype"] for s in srv.streams] == ["error", "stdout", "stderr"]


def test_tty_has_a_resize_stream_and_no_stderr(client, server):
    srv = server()
    proc = run(client, "exec", "--stdin", "--tty", "--size", "132x43", srv.url("/exec?stdin=1&tty=1"),
               input=b"typed\n")
    assert proc.returncode == 0, proc.stderr
    size, _, rest = proc.stdout.partition(b"\n")
    assert json.loads(size) == {"Width": 132, "Height": 43}
    assert rest == b"typed\n"
    assert [s.headers["streamtype"] for s in srv.streams] == ["error", "stdin", "stdout", "resize"]


def test_older_protocol_negotiated(client, server, tmp_path):
    srv = server(protocols=("v2.channel.k8s.io",))
    status_file = tmp_path / "status.json"
    proc = run(client, "exec", "--status-file", str(status_file), srv.url("/exec?rc=0&empty=1"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(status_file.read_text()) == {"protocol": "v2.channel.k8s.io", "error": ""}


def test_raw_upgrade_and_refusal(client, server):
    srv = server(protocols=("portforward.k8s.io",))
    ok = run(client, "raw", "--protocols", "portforward.k8s.io", srv.url("/raw"))
    assert ok.stdout.decode().splitlines() == ["HTTP/1.1 101 Switching Protocols", "protocol: portforward.k8s.io"]
    missing = run(client, "raw", srv.url("/nothing-here"))
    assert missing.stdout.decode().splitlines()[0] == "HTTP/1.1 404 Not Found"


def test_portforward_echo_with_pings(client, server):
    srv = server(protocols=("portforward.k8s.io",))
    payload = os.urandom(1024 * 1024)
    proc = subprocess.Popen([str(client), "portforward", "--ping-period", "50ms", srv.url("/portforward"), "8080"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Hold stdin open a moment so that the client's pings cross the live connection.
        proc.stdin.write(payload[:4096])
        proc.stdin.flush()
        time.sleep(0.5)
        out, err = proc.communicate(payload[4096:], timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out == payload
    assert err.count(b"ping ok") >= 2


def test_portforward_error_stream(client, server):
    srv = server(protocols=("portforward.k8s.io",))
    proc = run(client, "portforward", srv.url("/portforward"), "1")
    assert proc.returncode == 1
    assert b"error forwarding port 1: connection refused" in proc.stderr


def test_many_streams_at_once(client, server):
    srv = server(protocols=("v4.channel.k8s.io",))
    proc = run(client, "echo-streams", "--count", "40", "--bytes", str(300 * 1024), srv.url("/echo"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["ok=40", "refused=0", "failed=0"]


def test_a_stream_nobody_reads_is_reset_and_the_others_go_on(client, server, caplog):
    srv = server(max_buffered=64 * 1024, stall_timeout=1.0)
    start = time.monotonic()
    # Without the reset, stream 0's full buffer stops the connection's reader: every stream waits for good.
    with caplog.at_level(logging.INFO, logger=spdy.__name__):
        proc = run(client, "echo-streams", "--count", "4", "--bytes", str(1 << 20), srv.url("/hold"), timeout=30)
    assert proc.stdout.decode().split() == ["ok=3", "refused=0", "failed=1"], proc.stderr
    assert proc.stderr.startswith(b"stream 0: 0 bytes back") and b"stream 1:" not in proc.stderr, proc.stderr
    assert time.monotonic() - start < 20
    held = srv.streams[0]
    assert held.headers["index"] == "0" and held.closed.is_set()
    assert any(f"stream {held.id} reset" in r.getMessage() for r in caplog.records), caplog.text


def test_a_slow_reader_is_not_reset(client, server):
    """The stall timeout counts time without progress: a stream read slowly but steadily keeps all its bytes."""
    srv = server(max_buffered=64 * 1024, stall_timeout=0.5)
    proc = run(client, "echo-streams", "--count", "2", "--bytes", str(1 << 20), srv.url("/slow"), timeout=60)
    assert proc.stdout.decode().split() == ["ok=2", "refused=0", "failed=0"], proc.stderr


def test_streams_over_the_limit_are_refused(client, server):
    srv = server(max_streams=4)
    # Small streams: each is done quickly, but all 30 are opened before any can finish.
    proc = run(client, "echo-streams", "--count", "30", "--bytes", "1", srv.url("/echo"), timeout=120)
    counts = dict(kv.split("=") for kv in proc.stdout.decode().split())
    assert counts["failed"] == "0", proc.stderr
    assert int(counts["refused"]) > 0 and int(counts["ok"]) >= 4
    assert int(counts["refused"]) + int(counts["ok"]) == 30


def test_client_killed_mid_stream(client, server):
    srv = server()
    proc = subprocess.Popen([str(client), "exec", "--stdin", srv.url("/exec?stdin=1")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(os.urandom(200 * 1024))
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while len(srv.streams) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(srv.streams) == 4
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    conn = srv.conns[0]
    assert conn.closed.wait(10), "the connection did not end when its client died"
    assert all(s.closed.wait(5) for s in srv.streams)
    with pytest.raises(BrokenPipeError):
        srv.streams[2].write(b"x")
    deadline = time.monotonic() + 10
    while srv.broken == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.broken == 1  # the session saw the client go (its next write failed) and ended
