"""vmapi.client against a real socket: a request's deadline is the one Kube was given, not a multiple of it."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import urllib3.exceptions
import yaml

from vmapi.client import Kube, load_api_client


class Silent:
    """A TCP server on loopback that accepts every connection and never answers (a wedged API server)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)  # kept open, never read: the request's answer never comes

    def __enter__(self) -> "Silent":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(5)
        for c in self.accepted:
            c.close()
        self.sock.close()


@pytest.fixture
def silent(tmp_path):
    with Silent() as srv:
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
               "clusters": [{"name": "s", "cluster": {"server": f"http://127.0.0.1:{srv.port}"}}],
               "users": [{"name": "u", "user": {"token": "t"}}],
               "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u"}}]}
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        srv.kubeconfig = str(path)
        yield srv


@pytest.mark.parametrize("call", ["get_pod", "delete_pod"])
def test_a_read_timeout_is_not_retried(silent, call):
    """urllib3's default Retry(3) would send the request four times: 4 s for a 1 s deadline."""
    kube = Kube(load_api_client(silent.kubeconfig), timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(urllib3.exceptions.HTTPError):
        getattr(kube, call)("default", "vm-1-vm")
    took = time.monotonic() - t0
    assert took < 2.5, f"{call} took {took:.1f}s with a 1 s deadline"
    assert len(silent.accepted) == 1, f"{len(silent.accepted)} connections for one request"


class OneShotWebSocket:
    """A WebSocket server on loopback (RFC 6455, written out here): answers one upgrade with the v4 channel
    protocol, records the request head, sends `frames` as stdout-channel binary frames, then a close frame."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.head = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import base64
        import hashlib
        import re
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            while b"\r\n\r\n" not in self.head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                self.head += chunk
            key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", self.head).group(1)
            accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n")
            for payload in self.frames:
                conn.sendall(self._frame(0x2, b"\x01" + payload))  # binary, channel 1 (stdout)
            conn.sendall(self._frame(0x8, (1000).to_bytes(2, "big")))  # close: normal
            try:
                conn.recv(4096)  # the client's close frame (or its end)
            except OSError:
                pass

    @staticmethod
    def _frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            size = bytes([n])
        elif n < 1 << 16:
            size = bytes([126]) + n.to_bytes(2, "big")
        else:
            size = bytes([127]) + n.to_bytes(8, "big")
        return bytes([0x80 | opcode]) + size + payload  # FIN, unmasked (server to client)

    def __enter__(self) -> "OneShotWebSocket":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()
        self.thread.join(10)


def test_attach_pod_keeps_no_copy_of_the_console_output(tmp_path):
    """kubernetes' WSClient, unless told capture_all=False, appends every stdout byte to a buffer of its own
    (read_all's) that vmctl console never reads: a console open for days grows without bound."""
    frames = [bytes([i]) * 16384 for i in range(64)]  # 1 MiB in 64 frames, each distinct
    with OneShotWebSocket(frames) as srv:
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
               "clusters": [{"name": "s", "cluster": {"server": f"http://127.0.0.1:{srv.port}"}}],
               "users": [{"name": "u", "user": {"token": "t0k"}}],
               "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u"}}]}
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        ws = Kube(load_api_client(str(path)), timeout=5).attach_pod("ns1", "vm-1-vm", "vm")
        try:
            got = bytearray()
            deadline = time.monotonic() + 20
            while ws.is_open() and time.monotonic() < deadline:
                ws.update(timeout=1)
                got += ws.read_channel(1)  # as vmctl's copy loop reads it
            got += ws.read_channel(1)
            assert bytes(got) == b"".join(frames), f"{len(got)} bytes of {16384 * 64}"
            with pytest.raises(TypeError, match="not capture"):  # the client's own word: no copy kept
                ws.read_all()
        finally:
            ws.close()
    request_line = srv.head.split(b"\r\n", 1)[0].decode()
    assert request_line.startswith("GET /api/v1/namespaces/ns1/pods/vm-1-vm/attach?"), request_line
    query = request_line.split("?", 1)[1].split()[0].split("&")
    assert sorted(query) == ["container=vm", "stderr=false", "stdin=true", "stdout=true", "tty=true"]
    assert b"\r\nauthorization: bearer t0k\r\n" in srv.head.lower()  # the kubeconfig's credentials went along
