"""The streaming server under fuzzing: hostile bytes on real sockets, against the real daemon and a real guest.

One vmlet daemon (the suite's `fuzzer` fixture) with one RUNNING VM pod: masquerade
binding, busybox httpd on port 8080 in the guest. Each example takes a fresh URL from
the CRI (Exec of a long `sleep` that carries a marker, Attach, PortForward to 8080) and
speaks to it on a socket of its own:
- test_request_heads: random and mutated HTTP request heads (methods, targets, header
  names and values, lengths, upgrade headers, protocol lists, WebSocket keys and
  versions, chunked bodies, junk after the head, bit flips, early close);
- test_spdy_frames: after a valid SPDY/3.1 upgrade, frame sequences built from
  cri_shim.streaming.spdy's frame classes and encoder (valid, reordered, duplicated
  stream ids, wrong stream types and headers, huge lengths, header blocks compressed
  with another dictionary, bulk data, bit flips, truncation at a random byte);
- test_websocket_frames: after a valid WebSocket upgrade, frames with random opcodes,
  masks, lengths, fragmentation, channel bytes and close codes, unmasked frames, a
  client that stops reading.
After every example: the daemon answers Version; its threads and open fds
(/proc/PID/status, /proc/PID/fd) are back at their baseline within SETTLE seconds of
our close; every CHECK_EVERY examples a fresh exec runs end to end through the Go SPDY
client (tests/support/spdyclient). The last test proves no exec'd command outlives its
session in the guest (ExecSync `ps`).

Attach URLs never ask for stdin: fuzzed bytes on the serial console would be typed into
the guest's root shell. The server's answers are checked with parsers of this file (not
the server's): every frame it sends must be well-formed, and a 101 only for the exact
token path.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import grpc
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cri_shim.streaming import spdy
from cri_shim.streaming import websocket as ws
from proto.runtime.v1 import api_pb2
from tests.support import cri, spdyclient

from .conftest import TESTVM, Fuzzer, examples

pytestmark = pytest.mark.libvirt

GUEST_SERVERS = """#!/bin/sh
mkdir -p /www && echo "served by $(hostname)" > /www/index.html
busybox httpd -p 8080 -h /www
echo GUEST-SERVERS-UP
"""
GUEST_PORT = 8080
MARKER = "vmlet-fuzz-exec"  # in every fuzzed exec's command line: what the final `ps` looks for
SETTLE = 15.0  # s: the daemon's threads and fds must be back this soon after our close (guest kill included)
CHECK_EVERY = 4  # examples between two end-to-end execs with the Go client
ANSWER_WAIT = 5.0  # s for an answer to a complete request head
KEEP = 4 << 20  # bytes of the server's output kept for the checks
# DATA bytes per connection the strategies send at most: under what the server buffers for a stream or channel
# nobody reads (1 MiB; more is a defect, see the end of this file), so that the fuzzing goes on past it.
MAX_PER_CONNECTION = 1_000_000

KINDS = ["exec", "attach", "portforward"]
SPDY_EXEC = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
SPDY_VERSION = {"v5.channel.k8s.io": 4, "v4.channel.k8s.io": 4, "v3.channel.k8s.io": 3, "v2.channel.k8s.io": 2,
                "channel.k8s.io": 1}
SPDY_PF = ["portforward.k8s.io"]
WS_EXEC = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io",
           "base64.channel.k8s.io"]
WS_PF = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io", "portforward.k8s.io"]
BAD_PROTOCOLS = ["v9.channel.k8s.io", "V4.CHANNEL.K8S.IO", "v4.channel.k8s.io;q=1", "SPDY/3.1", "x" * 300]
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's, for our own check of Sec-WebSocket-Accept
HTTP_CODES = {101, 400, 403, 404, 405, 426, 431, 505}  # what the server may answer a head it has read


# ---------------------------------------------------------------- the daemon, its VM, and the checks


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line in /proc/{pid}/status")


def _fds(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return out


@dataclass(frozen=True)
class Opts:
    stdin: bool = False
    stderr: bool = True
    tty: bool = False
    ports: tuple[int, ...] = (GUEST_PORT,)


@dataclass
class Target:
    fuzzer: Fuzzer
    sid: str
    cid: str
    go_client: Path
    base_threads: int = 0
    base_fds: dict[str, str] = field(default_factory=dict)
    examples: int = 0
    execs: dict[str, str] = field(default_factory=dict)  # marker -> the example that was handed it
    current: str = ""
    before: tuple[int, dict[str, str]] = (0, {})

    @property
    def rt(self):
        return self.fuzzer.client.runtime

    @property
    def pid(self) -> int:
        return self.fuzzer.proc.proc.pid

    def url(self, kind: str, opts: Opts) -> str:
        if kind == "exec":
            marker = f"{MARKER}-{len(self.execs)}"
            self.execs[marker] = self.current
            # `; :` keeps the shell from exec'ing sleep: both carry the marker in `ps`.
            req = api_pb2.ExecRequest(container_id=self.cid, cmd=["sh", "-c", f"sleep 3600; : {marker}"],
                                      stdin=opts.stdin, stdout=True, stderr=opts.stderr)
            return self.rt.Exec(req, timeout=30).url
        if kind == "attach":
            return self.rt.Attach(api_pb2.AttachRequest(container_id=self.cid, stdout=True,
                                                        stderr=opts.stderr and not opts.tty, tty=opts.tty),
                                  timeout=30).url
        return self.rt.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=self.sid, port=list(opts.ports)),
                                   timeout=30).url

    def sample(self) -> tuple[int, dict[str, str]]:
        return _threads(self.pid), _fds(self.pid)

    def take_baseline(self) -> None:
        """The fewest threads seen over a quiet second, and the fds open then."""
        time.sleep(1.0)
        best = None
        for _ in range(10):
            t, f = self.sample()
            if best is None or (t, len(f)) < (best[0], len(best[1])):
                best = (t, f)
            time.sleep(0.1)
        self.base_threads, self.base_fds = best

    def begin(self, what: str) -> None:
        """Before an example: what it is (for the markers and messages) and the daemon's counts now."""
        self.current = what
        self.before = self.sample()

    def settle(self, what: str, against: tuple[int, dict[str, str]] | None = None, slack: int = 0) -> None:
        """Wait until the daemon has no more threads and fds than `against` (default: before this example)."""
        base_threads, base_fds = against or self.before
        deadline = time.monotonic() + SETTLE
        while True:
            t, f = self.sample()
            if t <= base_threads + slack and len(f) <= len(base_fds) + slack:
                return
            if time.monotonic() > deadline:
                new = sorted(v for k, v in f.items() if base_fds.get(k) != v)
                raise AssertionError(
                    f"{what}: {SETTLE}s after the connection closed the daemon has {t} threads (before: "
                    f"{base_threads}) and {len(f)} fds (before: {len(base_fds)}); fds it did not have before: "
                    f"{new[:20]}" + self.log_tail())
            time.sleep(0.1)

    def log_tail(self) -> str:
        text = self.fuzzer.proc.log()[-4000:]
        return f"\n--- daemon log (tail):\n{text}" if text else ""

    def after(self, what: str) -> None:
        """The checks after every example."""
        assert self.fuzzer.alive(), f"the daemon died after {what}" + self.log_tail()
        self.settle(what)
        self.examples += 1
        if self.examples % CHECK_EVERY == 0:
            self.end_to_end(what)

    def end_to_end(self, what: str) -> None:
        """A fresh exec through the Go SPDY client: the server still serves a correct session."""
        before = self.sample()
        url = self.rt.Exec(api_pb2.ExecRequest(container_id=self.cid, cmd=["sh", "-c", "echo e2e-out; "
                                                                             "echo e2e-err >&2; exit 7"],
                                               stdout=True, stderr=True), timeout=30).url
        done = subprocess.run([str(self.go_client), "exec", url], capture_output=True, timeout=120)
        assert (done.returncode, done.stdout, done.stderr) == (7, b"e2e-out\n", b"e2e-err\n"), \
            f"after {what}, a valid exec through the Go SPDY client answered {done}" + self.log_tail()
        self.settle(f"the end-to-end exec after {what}", against=before)

    def guest_ps(self) -> str:
        r = self.rt.ExecSync(api_pb2.ExecSyncRequest(container_id=self.cid, cmd=["ps", "-o", "args"], timeout=30),
                             timeout=90)
        return r.stdout.decode(errors="replace")


def _wait_for_log(path: Path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no file)"
    raise AssertionError(f"{needle!r} not in {path} after {timeout}s:\n{tail}")


@pytest.fixture(scope="module")
def target(fuzzer: Fuzzer) -> Iterator[Target]:
    go_client = spdyclient.require()
    rt, im = fuzzer.client.runtime, fuzzer.client.images
    im.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=120)
    pod = cri.pod_config(name="fuzz-streams", log_directory=str(fuzzer.live.log_dir), annotations={
        "vmlet.dev/network-binding": "masquerade", "VirtletCloudInitUserDataScript": GUEST_SERVERS})
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    fuzzer.live.known_ids.add(sid)  # the suite's teardown then checks its netns and links too
    try:
        cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod), timeout=120).container_id
        fuzzer.live.known_ids.add(cid)
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
        log = fuzzer.live.log_dir / "vm" / "0.log"
        _wait_for_log(log, "stdout F GUEST-SERVERS-UP", 240)
        _wait_for_log(log, "stdout F VMLET-TESTVM: ready", 120)
        t = Target(fuzzer, sid, cid, go_client)
        deadline = time.monotonic() + 120
        while True:  # the guest agent answers a moment after the ready line
            try:
                t.guest_ps()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the guest agent never answered ExecSync"
                time.sleep(1)
        _warm_up(t)
        t.take_baseline()
        yield t
    finally:
        try:
            rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        except grpc.RpcError:
            pass  # the fuzzer fixture's teardown removes every pod and reports what is left


def _warm_up(t: Target) -> None:
    """One session of every kind, so lazily made threads and fds (imports, the console hub) are in the baseline."""
    t.end_to_end("the warm-up")
    done = subprocess.run([str(t.go_client), "portforward", t.url("portforward", Opts()), str(GUEST_PORT)],
                          input=b"GET /index.html HTTP/1.0\r\n\r\n", capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stdout.endswith(b"served by fuzz-streams\n"), done
    for kind in ("attach", "exec"):
        url = t.url(kind, Opts())
        c = Conn(_port(url))
        c.send(_ws_head(_path(url), "v4.channel.k8s.io", _key(b"w" * 16)))
        c.wait_head(ANSWER_WAIT)
        time.sleep(1)
        c.close()


# ---------------------------------------------------------------- our end of a connection


class Conn:
    """A client socket; a thread keeps what the server sends (the first KEEP bytes) unless `read` is False."""

    def __init__(self, port: int, read: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setblocking(False)
        self.data = bytearray()
        self.eof = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if read:
            self._thread = threading.Thread(target=self._pump, daemon=True)
            self._thread.start()

    def _pump(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                try:
                    chunk = self.sock.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                with self._lock:
                    if len(self.data) < KEEP:
                        self.data += chunk
        except OSError:
            pass
        finally:
            self.eof.set()

    def read_head_now(self, timeout: float) -> None:
        """Without a reader thread: read up to the end of the answer's head (and what came with it)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.data and time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if r:
                try:
                    chunk = self.sock.recv(4096)
                except OSError:
                    return
                if not chunk:
                    return
                self.data += chunk

    def send(self, data: bytes, timeout: float = 3.0) -> bool:
        """All of data, or False: the server closed, or stopped reading for `timeout` s (its back-pressure)."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            _, w, _ = select.select([], [self.sock], [], max(0.0, deadline - time.monotonic()))
            if not w:
                return False
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                continue
            except OSError:
                return False
            view = view[n:]
        return True

    def snapshot(self) -> bytes:
        with self._lock:
            return bytes(self.data)

    def wait_head(self, timeout: float) -> tuple[int | None, dict[str, list[str]], bytes, bytes]:
        """(status, headers, the whole head, what followed) of the server's answer; status None if none came."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.snapshot() and not self.eof.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return parse_answer(self.snapshot())

    def wait_eof(self, timeout: float) -> bool:
        return self.eof.wait(timeout)

    def close(self, how: str = "close") -> None:
        try:
            if how == "rst":  # SO_LINGER 0: the close is a TCP reset
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()


def parse_answer(data: bytes) -> tuple[int | None, dict[str, list[str]], bytes, bytes]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None, {}, b"", data
    head, rest = data[:end], data[end + 4:]
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    assert len(parts) >= 2 and parts[0] == "HTTP/1.1" and parts[1].isdigit() and len(parts[1]) == 3, \
        f"not an HTTP/1.1 status line: {lines[0][:200]!r}"
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep and name, f"malformed header line in the server's answer: {line[:200]!r}"
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(parts[1]), headers, head, rest


def _port(url: str) -> int:
    return urlsplit(url).port


def _path(url: str) -> str:
    return urlsplit(url).path


def _key(raw16: bytes) -> str:
    return base64.b64encode(raw16).decode()


def _accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def _head(method: str, target: str, headers: list[tuple[str, str]], version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _spdy_head(path: str, offered: list[str]) -> bytes:
    return _head("POST", path, [("Host", "127.0.0.1"), ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                *(("X-Stream-Protocol-Version", p) for p in offered)])


def _ws_head(path: str, protocol: str | None, key: str) -> bytes:
    headers = [("Host", "127.0.0.1"), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
               ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key)]
    if protocol:
        headers.append(("Sec-WebSocket-Protocol", protocol))
    return _head("GET", path, headers)


# ---------------------------------------------------------------- strategies shared by the tests


def options(kind: str) -> st.SearchStrategy[Opts]:
    if kind == "exec":
        return st.builds(Opts, stdin=st.booleans(), stderr=st.booleans())
    if kind == "attach":
        return st.builds(lambda tty, stderr: Opts(stderr=stderr and not tty, tty=tty), st.booleans(), st.booleans())
    return st.builds(Opts, ports=st.sampled_from([(GUEST_PORT,), (GUEST_PORT, GUEST_PORT + 1)]))


def latin1(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(max_codepoint=255), max_size=max_size)


TOKEN_CHARS = "!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _flip(raw: bytes, flips: list[tuple[float, int]]) -> bytes:
    out = bytearray(raw)
    for where, bit in flips:
        if out:
            i = min(int(where * len(out)), len(out) - 1)
            out[i] ^= 1 << bit
    return bytes(out)


flips = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=3)


def pattern(n: int, seed: int) -> bytes:
    """n bytes without drawing them one by one (hypothesis would spend seconds on a megabyte)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


# ---------------------------------------------------------------- request heads


def protocol_list(valid: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(valid + BAD_PROTOCOLS + ["", " "]), max_size=5).map(", ".join)


def header_field(valid: list[str]) -> st.SearchStrategy[tuple[str, str]]:
    name = st.sampled_from
    return st.one_of(
        st.tuples(name(["Connection"]), st.sampled_from(["Upgrade", "upgrade", "keep-alive, Upgrade", "close",
                                                          "", "Upgrade, Upgrade", "Upgrade\t"])),
        st.tuples(name(["Upgrade"]), st.sampled_from(["SPDY/3.1", "websocket", "WebSocket", "SPDY/3", "h2c", "",
                                                       "SPDY/3.1, websocket", "websocket, SPDY/3.1"])),
        st.tuples(name(["X-Stream-Protocol-Version", "Sec-WebSocket-Protocol"]), protocol_list(valid)),
        st.tuples(name(["Sec-WebSocket-Version"]), st.sampled_from(["13", "8", "13, 8", "", "0013", "x" * 200])),
        st.tuples(name(["Sec-WebSocket-Key"]), st.one_of(st.binary(min_size=16, max_size=16).map(_key),
                                                         st.binary(max_size=40).map(_key), latin1(30))),
        st.tuples(name(["Content-Length"]), st.sampled_from(["0", "5", "-1", "99999999999999999999", "abc", ""])),
        st.tuples(name(["Transfer-Encoding"]), st.sampled_from(["chunked", "gzip, chunked", "identity", "x"])),
        st.tuples(name(["Host"]), st.sampled_from(["127.0.0.1", "", "[::1]:1", "a" * 300])),
        st.tuples(st.text(TOKEN_CHARS, min_size=1, max_size=30), latin1(80)),
        st.tuples(latin1(20), latin1(20)),  # not even a token
        st.tuples(name(["X-Long"]), st.sampled_from([1000, 60000, 70000]).map(lambda n: "v" * n)),
    )


def valid_headers(kind: str, ws_or_spdy: str, valid: list[str], key: str) -> list[tuple[str, str]]:
    if ws_or_spdy == "spdy":
        return [("Host", "127.0.0.1"), ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", valid[0])]
    return [("Host", "127.0.0.1"), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Protocol", valid[0])]


@st.composite
def request_head(draw, kind: str, path: str):
    """(bytes, complete, the valid path, our WebSocket key) of a hostile request head for the token `path`."""
    transport = draw(st.sampled_from(["spdy", "ws"]), label="upgrade to")
    valid = (SPDY_PF if kind == "portforward" else SPDY_EXEC) if transport == "spdy" else \
        (WS_PF if kind == "portforward" else WS_EXEC)
    key = _key(draw(st.binary(min_size=16, max_size=16)))
    method = draw(st.one_of(st.sampled_from(["GET", "POST"]),
                            st.sampled_from(["PUT", "HEAD", "OPTIONS", "CONNECT", "PRI", "get", "GE T", ""]),
                            st.text(TOKEN_CHARS, min_size=1, max_size=12), latin1(8)), label="method")
    query = "?port=8080" if kind == "portforward" and transport == "ws" else ""
    target = draw(st.one_of(
        st.just(path + query),
        st.sampled_from([path + "x", path[:-1], path.upper(), path + "/", "/" + path, path.replace("/", "%2F"),
                         "/exec/AAAAAAAAAAAAAAAAAAAAAA", "*", f"http://127.0.0.1{path}", path + "?port=0",
                         path + "?port=8080&port=x", path + "?" + "port=8080&" * 40, path + "\u00e9",
                         path + "#frag", path * 3000]),
        latin1(60)), label="target")
    version = draw(st.one_of(st.just("HTTP/1.1"),
                             st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", "", "http/1.1", "HTTP/1.10"])))
    headers = valid_headers(kind, transport, valid, key)
    headers = draw(st.one_of(st.just(headers), st.permutations(headers)))
    drop = draw(st.sets(st.integers(0, len(headers) - 1), max_size=2), label="drop headers")
    headers = [h for i, h in enumerate(headers) if i not in drop]
    extra = draw(st.lists(header_field(valid), max_size=6), label="add headers")
    headers += extra
    eol = draw(st.one_of(st.just("\r\n"), st.sampled_from(["\n", "\r", "\r\n\r\n"])), label="line ending")
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers)]
    raw = (eol.join(lines) + eol + eol).encode("latin-1")
    body = draw(st.one_of(
        st.just(b""),
        st.just(b"5\r\nhello\r\n0\r\n\r\n"),  # chunked
        st.just(b"ffffffffffffffff\r\n"),  # a chunk size to overflow
        st.binary(max_size=3000),  # junk after the head
        st.just(spdy.FrameEncoder().encode(spdy.Ping(1))),
        st.just(ws.encode_frame(ws.OP_CLOSE, b"\x03\xe8", mask=b"abcd"))), label="after the head")
    raw += body
    if draw(st.booleans(), label="bit flips"):
        raw = _flip(raw, draw(flips))
    cut = draw(st.one_of(st.none(), st.none(), st.none(), st.floats(0, 1)), label="cut at")
    if cut is not None:
        raw = raw[:int(cut * len(raw))]
    return raw, path, key


@settings(max_examples=examples(40))
@given(data=st.data())
def test_request_heads(target, data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    opts = data.draw(options(kind), label="options")
    target.begin(f"request head for {kind} {opts}")
    url = target.url(kind, opts)
    raw, path, key = data.draw(request_head(kind, _path(url)), label="head")
    conn = Conn(_port(url))
    try:
        conn.send(raw)
        complete = raw.find(b"\r\n\r\n") >= 0 or len(raw) > 64 * 1024 + 4
        status, headers, head, rest = conn.wait_head(ANSWER_WAIT if complete else 0.3)
        if not complete:
            # The server is still waiting for the rest of the head, or refuses one already too large.
            assert status in (None, 431), f"an answer {head[:300]!r} to an unfinished head"
        elif status is None:
            raise AssertionError(f"no answer within {ANSWER_WAIT}s to a complete head (the server "
                                 f"{'closed' if conn.eof.is_set() else 'kept'} the connection)" + target.log_tail())
        event(f"answer: HTTP {status}")
        if status is not None:
            assert status in HTTP_CODES, f"HTTP {status} answered: {head[:300]!r}"
        if status == 101:
            first = raw.split(b"\r\n", 1)[0].split(b" ")
            assert len(first) == 3 and first[0] in (b"GET", b"POST") and first[1].split(b"?")[0] == path.encode(), \
                f"a 101 for a request line that is not the token's: {first!r}"
            if b"sec-websocket-accept" in head.lower():
                assert headers["sec-websocket-accept"] == [_accept(key)] or b"Sec-WebSocket-Key" not in raw
        elif status is not None:
            length = int(headers["content-length"][0])
            assert len(head) < 2048 and length < 1024, f"an answer of {len(head)} + {length} bytes echoes the input"
            if status == 404:
                assert rest.startswith(b"404 page not found\n"), rest[:200]
            assert conn.wait_eof(3), f"HTTP {status} answered but the connection stays open"
            assert conn.snapshot().endswith(b"\r\n\r\n" + rest[:length]) and len(rest) == length, \
                f"the body is not the Content-Length ({length}) long: {rest[:200]!r}"
    finally:
        conn.close()
    target.after(target.current)


# ---------------------------------------------------------------- SPDY frames


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are, in place of a frame (what the encoder will not make)."""
    what: str
    data: bytes

    def __repr__(self) -> str:
        return f"Raw({self.what}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class Bulk:
    """n bytes of DATA on one stream (more than the server buffers for a stream nobody reads)."""
    stream_id: int
    n: int
    fin: bool = False


def _header_block(headers: dict[str, str]) -> bytes:
    out = struct.pack(">I", len(headers))
    for k, v in headers.items():
        kb, vb = k.encode("latin-1"), v.encode("latin-1")
        out += struct.pack(">I", len(kb)) + kb + struct.pack(">I", len(vb)) + vb
    return out


def _control(ftype: int, flags: int, payload: bytes, version: int = 3) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, ftype, flags << 24 | len(payload)) + payload


def other_dictionary_syn(sid: int, headers: dict[str, str], zdict: bytes | None) -> Raw:
    z = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, *([zdict] if zdict else []))
    block = z.compress(_header_block(headers)) + z.flush(zlib.Z_SYNC_FLUSH)
    return Raw(f"SYN_STREAM {sid} compressed with {'another' if zdict else 'no'} dictionary",
               _control(spdy.TYPE_SYN_STREAM, 0, struct.pack(">IIBB", sid, 0, 0, 0) + block))


STREAM_IDS = st.one_of(st.sampled_from([1, 3, 5, 7, 9, 11, 13]), st.sampled_from([2, 4, spdy.MAX_STREAM_ID]),
                       st.integers(1, spdy.MAX_STREAM_ID))
STREAM_TYPES = ["error", "stdin", "stdout", "stderr", "resize", "data", "bogus", "", "ERROR"]
HEADER_NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-:.", min_size=1, max_size=20)


def stream_headers() -> st.SearchStrategy[dict[str, str]]:
    return st.builds(lambda base, extra: {**extra, **base},
                     st.fixed_dictionaries({}, optional={
                         "streamtype": st.sampled_from(STREAM_TYPES),
                         "port": st.sampled_from(["8080", "8081", "0", "65536", "abc", "", " 8080", "08080"]),
                         "requestid": st.sampled_from(["0", "1", "2", "", "x" * 200])}),
                     st.dictionaries(HEADER_NAMES, latin1(40), max_size=3))


def spdy_op() -> st.SearchStrategy:
    payload = st.one_of(st.binary(max_size=512), st.builds(pattern, st.integers(1, 150_000), st.integers(0, 9)))
    return st.one_of(
        st.builds(spdy.SynStream, STREAM_IDS, stream_headers(), priority=st.integers(0, 7), fin=st.booleans(),
                  unidirectional=st.booleans()),
        st.builds(spdy.DataFrame, STREAM_IDS, payload, fin=st.booleans()),
        st.builds(spdy.RstStream, STREAM_IDS, st.integers(0, 12)),
        st.builds(spdy.Settings, st.lists(st.tuples(st.integers(0, 255), st.integers(0, 10),
                                                    st.integers(0, 2 ** 32 - 1)), max_size=4).map(tuple),
                  clear=st.booleans()),
        st.builds(spdy.Ping, st.integers(0, 2 ** 32 - 1)),
        st.builds(spdy.GoAway, STREAM_IDS, st.integers(0, 3)),
        st.builds(spdy.Headers, STREAM_IDS, stream_headers(), fin=st.booleans()),
        st.builds(spdy.WindowUpdate, st.integers(0, 13), st.integers(0, spdy.MAX_STREAM_ID)),
        st.builds(spdy.SynReply, STREAM_IDS, stream_headers()),
        st.builds(spdy.SynStream, STREAM_IDS, st.builds(lambda n: {"streamtype": "error", "x": "v" * n},
                                                         st.sampled_from([60000, 70000, 1 << 20]))),
        st.builds(other_dictionary_syn, STREAM_IDS, stream_headers(), st.sampled_from([None, b"not spdy's" * 20])),
        st.builds(lambda t, p: Raw(f"control type {t}", _control(t, 0, p)), st.integers(10, 0xFFFF),
                  st.binary(max_size=64)),
        st.builds(lambda v: Raw(f"SPDY version {v}", _control(spdy.TYPE_PING, 0, b"\0\0\0\1", v)),
                  st.sampled_from([0, 2, 4, 0x7FFF])),
        st.just(Raw("DATA on stream 0", struct.pack(">II", 0, 3) + b"abc")),
        st.builds(Bulk, STREAM_IDS, st.sampled_from([300_000, 900_000]), st.booleans()),
    )


def opening(kind: str, opts: Opts, version: int) -> list:
    """What client-go sends for this session: a SYN_STREAM per stream (and for port-forward a GET on each pair)."""
    frames: list = []
    if kind == "portforward":
        sid = 1
        for rid, port in enumerate(opts.ports):
            base = {"port": str(port), "requestid": str(rid)}
            frames += [spdy.SynStream(sid, {**base, "streamtype": "error"}),
                       spdy.DataFrame(sid, b"", fin=True),  # client-go closes the error stream's write side
                       spdy.SynStream(sid + 2, {**base, "streamtype": "data"}),
                       spdy.DataFrame(sid + 2, b"GET /index.html HTTP/1.0\r\n\r\n", fin=True)]
            sid += 4
        return frames
    types = ["error"] + (["stdin"] if opts.stdin else []) + ["stdout"] + \
        (["stderr"] if opts.stderr and not opts.tty else []) + (["resize"] if opts.tty and version >= 3 else [])
    for i, t in enumerate(types):
        frames.append(spdy.SynStream(2 * i + 1, {"streamtype": t}))
    if opts.stdin:
        frames.append(spdy.DataFrame(3, b"some input\n", fin=True))
    if opts.tty and version >= 3:
        frames.append(spdy.DataFrame(2 * len(types) - 1, b'{"Width":80,"Height":25}'))
    return frames


@st.composite
def spdy_script(draw, kind: str, opts: Opts, version: int):
    frames = opening(kind, opts, version)
    edit = draw(st.sampled_from(["valid", "permuted", "dropped", "duplicated", "retyped"]), label="opening")
    if edit == "permuted":
        frames = list(draw(st.permutations(frames)))
    elif edit == "dropped":
        frames.pop(draw(st.integers(0, len(frames) - 1)))
    elif edit == "duplicated":
        i = draw(st.integers(0, len(frames) - 1))
        frames.insert(draw(st.integers(i, len(frames))), frames[i])
    elif edit == "retyped":
        syns = [i for i, f in enumerate(frames) if isinstance(f, spdy.SynStream)]
        i = draw(st.sampled_from(syns))
        frames[i] = replace(frames[i], headers=draw(stream_headers()))
    ops = draw(st.lists(spdy_op(), max_size=6).filter(lambda ops: sum(map(_data_bytes, ops)) <= MAX_PER_CONNECTION
                                                       - sum(map(_data_bytes, frames))), label="more frames")
    for op in ops:
        frames.insert(draw(st.integers(0, len(frames))), op)
    return frames


def _data_bytes(f) -> int:
    return f.n if isinstance(f, Bulk) else len(f.data) if isinstance(f, (spdy.DataFrame, Raw)) else 0


def encode_spdy(frames: list) -> tuple[bytes, list[int]]:
    """The frames' bytes (one compression context, in order) and where each frame starts."""
    enc = spdy.FrameEncoder()
    out, starts = bytearray(), []
    for f in frames:
        starts.append(len(out))
        if isinstance(f, Raw):
            out += f.data
        elif isinstance(f, Bulk):
            data = pattern(f.n, f.stream_id)
            for i in range(0, f.n, spdy.MAX_DATA_CHUNK):
                last = i + spdy.MAX_DATA_CHUNK >= f.n
                out += enc.encode(spdy.DataFrame(f.stream_id, data[i:i + spdy.MAX_DATA_CHUNK], fin=f.fin and last))
        else:
            out += enc.encode(f)
    return bytes(out), starts


def server_spdy_frames(data: bytes) -> list:
    """The server's frames; fails on anything that is not SPDY/3.1 a client could read."""
    dec = spdy.FrameDecoder(max_header_block=1 << 20)
    try:
        frames = dec.feed(data)
    except spdy.ProtocolError as e:
        raise AssertionError(f"the server sent malformed SPDY: {e} (after {len(e.frames)} good frames)") from None
    return frames


@settings(max_examples=examples(45))
@given(data=st.data())
def test_spdy_frames(target, data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    opts = data.draw(options(kind), label="options")
    supported = SPDY_PF if kind == "portforward" else SPDY_EXEC
    offered = data.draw(st.builds(lambda a, p, b: a + [p] + b, st.lists(st.sampled_from(BAD_PROTOCOLS), max_size=2),
                                  st.sampled_from(supported), st.lists(st.sampled_from(supported + BAD_PROTOCOLS),
                                                                       max_size=2)), label="protocols offered")
    target.begin(f"SPDY {kind} {opts} offering {offered}")
    url = target.url(kind, opts)
    conn = Conn(_port(url))
    try:
        conn.send(_spdy_head(_path(url), offered))
        status, headers, head, rest = conn.wait_head(ANSWER_WAIT)
        chosen = next(p for p in offered if p in supported)
        assert status == 101 and headers.get("x-stream-protocol-version") == [chosen], \
            f"a valid SPDY upgrade offering {offered} answered {head[:400]!r}"
        frames = data.draw(spdy_script(kind, opts, SPDY_VERSION.get(chosen, 4)), label="frames")
        raw, starts = encode_spdy(frames)
        mangle = data.draw(st.sampled_from(["none", "flips", "huge length", "cut"]), label="bytes")
        if mangle == "flips":
            raw = _flip(raw, data.draw(flips))
        elif mangle == "huge length":
            at = starts[data.draw(st.integers(0, len(starts) - 1))]
            raw = raw[:at + 5] + b"\xff\xff\xff" + raw[at + 8:]
        elif mangle == "cut":
            raw = raw[:data.draw(st.integers(0, len(raw)))]
        pieces = data.draw(st.integers(1, 4), label="pieces")
        size = len(raw) // pieces + 1
        for i in range(0, len(raw), size):
            if not conn.send(raw[i:i + size]):
                break  # closed, or reading no more (back-pressure): both are the server's right
        time.sleep(data.draw(st.sampled_from([0.0, 0.3, 1.5]), label="hold"))
        out = server_spdy_frames(conn.snapshot()[len(head) + 4:])
        assert not any(isinstance(f, spdy.SynStream) for f in out), "the server opened a stream"
        for f in out:
            if isinstance(f, spdy.RstStream):
                assert 1 <= f.status <= 11, f"RST_STREAM with status {f.status}"
        if mangle != "flips":
            opened = {f.stream_id for f in frames if isinstance(f, spdy.SynStream)}
            replies = [f.stream_id for f in out if isinstance(f, spdy.SynReply)]
            assert len(replies) == len(set(replies)), f"two SYN_REPLYs for one stream: {replies}"
            stray = {f.stream_id for f in out if isinstance(f, (spdy.SynReply, spdy.DataFrame))} - opened
            assert not stray, f"the server answered or wrote on streams nobody opened: {sorted(stray)}"
        event("server frames: " + ", ".join(sorted({type(f).__name__ for f in out})))
        if any(isinstance(f, spdy.GoAway) for f in out):
            assert conn.wait_eof(3), "the server sent GOAWAY but kept the connection open"
        how = data.draw(st.sampled_from(["close", "rst", "half"]), label="close")
        if how == "half":
            conn.sock.shutdown(socket.SHUT_WR)
            assert conn.wait_eof(SETTLE), \
                f"the server did not end the connection within {SETTLE}s of the client's FIN" + target.log_tail()
    finally:
        conn.close("rst" if not conn.eof.is_set() else "close")
    target.after(target.current)


# ---------------------------------------------------------------- WebSocket frames


@dataclass(frozen=True)
class WsFrame:
    opcode: int
    payload: bytes = b""
    fin: bool = True
    mask: bytes | None = b"\x01\x02\x03\x04"
    rsv: int = 0
    length: str = "shortest"  # or "126" / "127" (not the shortest form), "huge" (declared 2 MiB + 1), "top bit"

    def encode(self) -> bytes:
        if self.length == "shortest":
            return ws.encode_frame(self.opcode, self.payload, fin=self.fin, mask=self.mask, rsv=self.rsv)
        first = (0x80 if self.fin else 0) | self.rsv << 4 | self.opcode
        mbit = 0x80 if self.mask is not None else 0
        n = len(self.payload)
        head = {"126": struct.pack("!BBH", first, mbit | 126, n),
                "127": struct.pack("!BBQ", first, mbit | 127, n),
                "huge": struct.pack("!BBQ", first, mbit | 127, ws.MAX_MESSAGE + 1),
                "top bit": struct.pack("!BBQ", first, mbit | 127, 1 << 63 | n)}[self.length]
        key = self.mask or b""
        body = bytes(b ^ key[i % 4] for i, b in enumerate(self.payload)) if key else self.payload
        return head + key + body

    def __repr__(self) -> str:
        return (f"WsFrame(op={self.opcode:#x}, {len(self.payload)} bytes {self.payload[:12]!r}, fin={self.fin}, "
                f"mask={self.mask is not None}, rsv={self.rsv}, length={self.length})")


def ws_data(binary: bool) -> st.SearchStrategy[bytes]:
    channel = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 255]), st.integers(0, 255))
    body = st.one_of(st.binary(max_size=300), st.builds(pattern, st.integers(1, 200_000), st.integers(0, 9)))
    if binary:
        return st.builds(lambda c, b: bytes([c]) + b, channel, body)
    return st.builds(lambda c, b: str(c % 10).encode() + base64.b64encode(b), channel, body) | st.binary(max_size=64)


CLOSE_CODES = st.one_of(st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1011, 3000, 4999]),
                        st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]))


def ws_op(binary: bool) -> st.SearchStrategy:
    masks = st.one_of(st.binary(min_size=4, max_size=4), st.none())
    return st.one_of(
        st.builds(WsFrame, st.sampled_from([ws.OP_BINARY, ws.OP_TEXT]), ws_data(binary), mask=masks),
        st.builds(WsFrame, st.integers(0, 15), ws_data(binary), fin=st.booleans(), mask=masks,
                  rsv=st.sampled_from([0, 0, 1, 4, 7])),
        st.builds(WsFrame, st.just(ws.OP_CLOSE), st.one_of(
            st.builds(lambda c, r: struct.pack("!H", c) + r, CLOSE_CODES, st.binary(max_size=20)),
            st.sampled_from([b"", b"\x03"]))),
        st.builds(WsFrame, st.sampled_from([ws.OP_PING, ws.OP_PONG]), st.binary(max_size=130), fin=st.booleans()),
        st.builds(WsFrame, st.sampled_from([ws.OP_BINARY, ws.OP_PING]), st.binary(max_size=200),
                  length=st.sampled_from(["126", "127", "huge", "top bit"])),
        # a fragmented message, maybe with a ping in the middle
        st.builds(lambda parts, ping: [WsFrame(ws.OP_BINARY if i == 0 else ws.OP_CONT, p, fin=i == len(parts) - 1)
                                       for i, p in enumerate(parts)][:1] + ([WsFrame(ws.OP_PING, b"p")] if ping else [])
                  + [WsFrame(ws.OP_BINARY if i == 0 else ws.OP_CONT, p, fin=i == len(parts) - 1)
                     for i, p in enumerate(parts)][1:],
                  st.lists(ws_data(True), min_size=2, max_size=4), st.booleans()),
        st.just(WsFrame(ws.OP_BINARY, bytes([255, 0]))),  # v5: stdin closed
        st.builds(lambda n, c: [WsFrame(ws.OP_BINARY, bytes([c]) + pattern(256 * 1024, i)) for i in range(n)],
                  st.sampled_from([1, 3]), st.sampled_from([0, 2])),  # bulk on stdin / a port's data channel
    )


def violation(frames: list[WsFrame]) -> int | None:
    """Index of the first frame RFC 6455 forbids a client to send (our own reading of it), or None."""
    fragmented = False
    for i, f in enumerate(frames):
        control = f.opcode >= 8
        n = len(f.payload)
        if f.mask is None or f.rsv or f.opcode not in (0, 1, 2, 8, 9, 10) or f.length != "shortest":
            return i
        if control and (not f.fin or n > 125):
            return i
        if f.opcode == ws.OP_CLOSE:
            if n == 1:
                return i
            if n >= 2:
                code = struct.unpack("!H", f.payload[:2])[0]
                if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
                    return i
                try:
                    f.payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    return i
            return None  # nothing after a close counts
        if f.opcode == ws.OP_CONT and not fragmented or f.opcode in (1, 2) and fragmented:
            return i
        if f.opcode in (0, 1, 2):
            fragmented = not f.fin
        if f.opcode == ws.OP_TEXT and f.fin:
            try:
                f.payload.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return None


def server_ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The server's frames (opcode, payload); fails on what a server must not send (RFC 6455 section 5)."""
    out, pos = [], 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        assert not b0 & 0x70, f"server frame with reserved bits {b0:#x}"
        assert not b1 & 0x80, "a masked frame from the server"
        opcode, n, at = b0 & 0xF, b1 & 0x7F, pos + 2
        assert opcode in (0, 1, 2, 8, 9, 10), f"server frame with opcode {opcode:#x}"
        if n == 126:
            if len(data) < at + 2:
                break
            n, at = struct.unpack_from("!H", data, at)[0], at + 2
        elif n == 127:
            if len(data) < at + 8:
                break
            n, at = struct.unpack_from("!Q", data, at)[0], at + 8
        if opcode >= 8:
            assert b0 & 0x80 and n <= 125, "a fragmented or long control frame from the server"
        if len(data) < at + n:
            break
        out.append((opcode, data[at:at + n]))
        pos = at + n
    return out


@settings(max_examples=examples(45))
@given(data=st.data())
def test_websocket_frames(target, data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    opts = data.draw(options(kind), label="options")
    protocol = data.draw(st.sampled_from((WS_PF if kind == "portforward" else WS_EXEC) + [None]), label="protocol")
    binary = protocol not in ("v4.base64.channel.k8s.io", "base64.channel.k8s.io")
    reading = data.draw(st.booleans(), label="client reads")
    target.begin(f"WebSocket {kind} {opts} protocol {protocol} reading={reading}")
    url = target.url(kind, opts)
    marker = list(target.execs)[-1] if kind == "exec" else None
    path = _path(url)
    if kind == "portforward":
        path += "?" + "&".join(f"port={p}" for p in opts.ports)
    key = _key(data.draw(st.binary(min_size=16, max_size=16)))
    conn = Conn(_port(url), read=reading)
    try:
        conn.send(_ws_head(path, protocol, key))
        if not reading:
            conn.read_head_now(ANSWER_WAIT)
            status, headers, head, rest = parse_answer(bytes(conn.data))
        else:
            status, headers, head, rest = conn.wait_head(ANSWER_WAIT)
        assert status == 101, f"a valid WebSocket upgrade answered {head[:400]!r}"
        assert headers.get("sec-websocket-accept") == [_accept(key)], head
        assert headers.get("sec-websocket-protocol", [None]) == [protocol], head
        frames = []
        ops = data.draw(st.lists(ws_op(binary), min_size=1, max_size=8).filter(
            lambda ops: sum(len(f.payload) for op in ops for f in (op if isinstance(op, list) else [op]))
            <= MAX_PER_CONNECTION), label="frames")
        for op in ops:
            frames += op if isinstance(op, list) else [op]
        bad = violation(frames)
        raw = b"".join(f.encode() for f in frames)
        cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))), label="cut at")
        if cut is not None:
            raw = raw[:cut]
        conn.send(raw)
        time.sleep(data.draw(st.sampled_from([0.0, 0.3, 1.5]), label="hold"))
        if reading:
            sent_bad = bad is not None and (cut is None or len(b"".join(f.encode() for f in frames[:bad + 1])) <= cut)
            if sent_bad:
                assert conn.wait_eof(SETTLE), \
                    f"frame {bad} ({frames[bad]!r}) breaks RFC 6455, yet the server kept the connection " \
                    f"for {SETTLE}s" + target.log_tail()
            out = server_ws_frames(conn.snapshot()[len(head) + 4:])
            for opcode, payload in out:
                if marker and opcode in (ws.OP_BINARY, ws.OP_TEXT) and payload[:1] in (b"\x03", b"3"):
                    target.execs[marker] += f"; its status: {payload[1:300]!r}"  # for the leftover report
                if opcode == ws.OP_CLOSE and len(payload) >= 2:
                    code = struct.unpack("!H", payload[:2])[0]
                    assert code in (1000, 1001, 1002, 1007, 1009, 1011), f"the server closed with code {code}"
                if opcode == ws.OP_BINARY and payload:
                    allowed = set(range(2 * len(opts.ports))) if kind == "portforward" else {1, 2, 3}
                    assert payload[0] in allowed, f"a message on channel {payload[0]} (allowed {allowed})"
            event(f"server frames: {sorted({op for op, _ in out})}, violation sent: {sent_bad}")
            if sent_bad:
                assert any(op == ws.OP_CLOSE for op, _ in out), \
                    "the server ended a broken session without a close frame"
    finally:
        conn.close(data.draw(st.sampled_from(["close", "rst"]), label="close"))
    target.after(target.current)


# ---------------------------------------------------------------- no exec outlives its session


def test_no_exec_outlives_its_session(target):
    """After every example above (and one more aborted exec of this test's own), no marked command runs on."""
    target.begin("the aborted exec of test_no_exec_outlives_its_session")
    url = target.url("exec", Opts(stderr=False))
    marker = list(target.execs)[-1]
    conn = Conn(_port(url))
    try:
        conn.send(_spdy_head(_path(url), ["v4.channel.k8s.io"]))
        assert conn.wait_head(ANSWER_WAIT)[0] == 101
        enc = spdy.FrameEncoder()
        conn.send(enc.encode(spdy.SynStream(1, {"streamtype": "error"}))
                  + enc.encode(spdy.SynStream(3, {"streamtype": "stdout"})))
        deadline = time.monotonic() + 60
        while marker not in target.guest_ps():
            assert time.monotonic() < deadline, f"{marker} never ran in the guest"
            time.sleep(0.5)
    finally:
        conn.close("rst")
    deadline = time.monotonic() + 30
    while True:
        left = sorted({m for line in target.guest_ps().splitlines() for m in target.execs
                       if line.rstrip().endswith(m)})
        if not left:
            break
        assert time.monotonic() < deadline, \
            "exec'd commands still run in the guest 30 s after their session ended:\n" + \
            "\n".join(f"  {m}: {target.execs[m]}" for m in left)
        time.sleep(1)
    target.after(target.current)




# ---------------------------------------------------------------- defects the fuzzing found (cri_shim/streaming/)
#
# Each is a client that sends more than the server buffers for a reader that no longer reads, then goes
# away. In cri_shim/streaming/ as of commit 6042ab7 the connection's reader thread then waited for room that
# never came, so it never saw the client's close: threads and the fd stayed (forever on WebSocket), and an
# exec'd command was never killed. These reproductions fail there and pass once a stalled reader gives up.
# The strategies above stay under those amounts (MAX_PER_CONNECTION), so each example checks one thing.


def _abandoned(target: Target, conn: Conn, marker: str | None = None) -> None:
    time.sleep(2)
    conn.close()
    target.settle(target.current)
    if marker is not None:
        deadline = time.monotonic() + 15
        while marker in target.guest_ps():
            assert time.monotonic() < deadline, f"{marker} still runs in the guest 15 s after its client left"
            time.sleep(1)


BULK_WS = b"".join(WsFrame(ws.OP_BINARY, b"\x00" + pattern(256 * 1024, i)).encode() for i in range(10))


def test_defect_websocket_exec_stdin_over_the_cap(target):
    """remotecommand.serve_websocket: exec stopped reading stdin at its 1 MiB cap; the reader stayed in Pipe.feed."""
    target.begin("WebSocket exec with stdin: 2.5 MiB on channel 0, then the client leaves")
    url = target.url("exec", Opts(stdin=True))
    conn = Conn(_port(url))
    conn.send(_ws_head(_path(url), "v4.channel.k8s.io", _key(b"k" * 16)))
    assert conn.wait_head(ANSWER_WAIT)[0] == 101
    conn.send(BULK_WS)
    _abandoned(target, conn)


def test_defect_websocket_port_forward_bulk_after_the_guest_closed(target):
    """portforward.serve_websocket: the guest closed, the forward stopped reading; the reader stayed in Pipe.feed."""
    target.begin("WebSocket port-forward to httpd: a GET, then 2.5 MiB on channel 0, then the client leaves")
    url = target.url("portforward", Opts())
    conn = Conn(_port(url))
    conn.send(_ws_head(_path(url) + f"?port={GUEST_PORT}", "v4.channel.k8s.io", _key(b"k" * 16)))
    assert conn.wait_head(ANSWER_WAIT)[0] == 101
    conn.send(WsFrame(ws.OP_BINARY, b"\x00GET / HTTP/1.0\r\n\r\n").encode())
    time.sleep(1)
    conn.send(BULK_WS)
    _abandoned(target, conn)


def test_defect_spdy_attach_unread_stdin_stream(target):
    """SpdyStream._deliver waited on a stdin stream an attach without stdin never reads (until the VM stops)."""
    target.begin("SPDY attach without stdin: a stdin stream with 2.5 MB, then the client leaves")
    url = target.url("attach", Opts(stderr=False))
    conn = Conn(_port(url))
    conn.send(_spdy_head(_path(url), ["v4.channel.k8s.io"]))
    assert conn.wait_head(ANSWER_WAIT)[0] == 101
    raw, _ = encode_spdy([spdy.SynStream(1, {"streamtype": "error"}), spdy.SynStream(3, {"streamtype": "stdout"}),
                          spdy.SynStream(5, {"streamtype": "stdin"}), Bulk(5, 2_500_000)])
    conn.send(raw)
    _abandoned(target, conn)


def test_defect_spdy_exec_unread_stream_of_unknown_type(target):
    """SpdyStream._deliver waited on a stream of unknown type (answered, never read); the command ran on."""
    target.begin("SPDY exec: a stream of type bogus with 2.5 MB, then the client leaves")
    url = target.url("exec", Opts(stderr=False))
    marker = list(target.execs)[-1]
    conn = Conn(_port(url))
    conn.send(_spdy_head(_path(url), ["v4.channel.k8s.io"]))
    assert conn.wait_head(ANSWER_WAIT)[0] == 101
    raw, _ = encode_spdy([spdy.SynStream(1, {"streamtype": "error"}), spdy.SynStream(3, {"streamtype": "stdout"}),
                          spdy.SynStream(5, {"streamtype": "bogus"}), Bulk(5, 2_500_000)])
    conn.send(raw)
    deadline = time.monotonic() + 60
    while marker not in target.guest_ps():
        assert time.monotonic() < deadline, f"{marker} never ran in the guest"
        time.sleep(0.5)
    _abandoned(target, conn, marker)
