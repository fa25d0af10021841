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
