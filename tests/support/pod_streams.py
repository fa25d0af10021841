"""The API server's and the kubelet's part of `pods/NAME/attach|exec|portforward`, for tests.

On a cluster a streaming request goes client → API server (`/api/v1/namespaces/NS/pods/NAME/attach`,
an HTTP upgrade to WebSocket or SPDY) → the kubelet of the pod's node → the CRI's Attach / Exec /
PortForward, which answers the runtime's streaming URL → the kubelet proxies the upgraded connection to
that URL untranslated (the runtime speaks the client's protocol itself) and the API server proxies it to
the kubelet. kmock (the tests' API server) has no such subresources, and there is no kubelet here.

kmock cannot take them either: its reactions answer with content it renders (JSON, bytes, streams of
chunks); a connection upgrade is not one of them (an `aiohttp.web.StreamResponse` payload is refused by
design). So `PodStreams` is a small HTTP front in front of kmock, playing both hops:

* a request for `pods/NAME/attach|exec|portforward` is checked as the API server does (the pod exists,
  the container is one of its containers or the only one, the pod is bound to a node: `metav1.Status`
  errors, 404/400), then as the kubelet does: the pod's sandbox and container are found through the CRI
  by the labels the kubelet (tests/support/kubelet_agent.py) gives them (`io.kubernetes.pod.uid`,
  `io.kubernetes.container.name`), the CRI call gets the URL, and the request head is sent on to that URL
  unchanged but for the path (the URL's, with the client's query), `Host`, and the user's
  `Authorization` (which stays with the API server); from then on the two connections are spliced byte
  for byte both ways, the runtime's `101 Switching Protocols` included. Kubelet-side failures answer as
  the kubelet's `streaming.WriteError` does: the error's text, 404 for gRPC NotFound, 500 otherwise.
* any other connection is spliced to kmock unchanged. The choice is made once per connection, from
  its first request: the kubernetes client opens a connection of its own for each streaming request
  (websocket-client), and its pooled API connections carry no streaming request.

Bounded: request heads of 64 KiB read within 10 s, 64 connections at a time (then 503), 64 KiB copy
buffers. `stop()` shuts every connection down and joins every thread.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
import kubernetes
import yaml

from proto.runtime.v1 import api_pb2
from tests.support import cri
from vmapi.client import load_api_client

log = logging.getLogger(__name__)

STREAM_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/(attach|exec|portforward)$")
POD_UID_LABEL, CONTAINER_LABEL = "io.kubernetes.pod.uid", "io.kubernetes.container.name"
MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
BUF = 64 * 1024
API_TIMEOUT = 10
CRI_TIMEOUT = 30
# What the client's credentials are for: the API server keeps them, the kubelet/runtime hop never sees them.
DROPPED_HEADERS = {"host", "authorization"}


class HttpError(Exception):
    """An answer before any upgrade: status, body, content type."""

    def __init__(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        super().__init__(body)
        self.status, self.body, self.content_type = status, body, content_type


REASONS = {400: ("Bad Request", "BadRequest"), 404: ("Not Found", "NotFound"), 405: ("Method Not Allowed", "MethodNotAllowed"),
           500: ("Internal Server Error", "InternalError"), 502: ("Bad Gateway", "BadGateway"),
           503: ("Service Unavailable", "ServiceUnavailable")}


def api_status(code: int, message: str, details: dict[str, Any] | None = None) -> HttpError:
    """The API server's error: a metav1.Status body."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": REASONS.get(code, ("", "Unknown"))[1], "code": code}
    if details:
        body["details"] = details
    return HttpError(code, json.dumps(body), "application/json")


def parse_bool(value: str) -> bool:
    """Go's strconv.ParseBool, as the API server parses query options (the Python client sends "True")."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(value)


class PodStreams:
    """The front: `url` is what a kubeconfig names as the server (see `write_kubeconfig`)."""

    def __init__(self, upstream_url: str, kubeconfig: Path | str, cri_socket: Path | str, node_name: str) -> None:
        up = urllib.parse.urlsplit(str(upstream_url))
        if up.scheme != "http" or not up.hostname or not up.port:
            raise ValueError(f"upstream {upstream_url!r}: an http://HOST:PORT URL (kmock's)")
        self.upstream = (up.hostname, up.port)
        self.node = node_name
        self.core = kubernetes.client.CoreV1Api(load_api_client(str(kubeconfig)))
        self.cri = cri.connect(Path(cri_socket))
        self.requests: list[str] = []  # "attach default/x-vm/vm -> http://..." or "... refused 404: ..."
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closing = threading.Event()

    @property
    def url(self) -> str:
        assert self._listener is not None, "not started"
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> "PodStreams":
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._accepting = threading.Thread(target=self._accept_loop, name="pod-streams-accept", daemon=True)
        self._accepting.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop accepting, shut every connection down, join every thread; then close the clients."""
        self._closing.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accepting is not None:
            self._accepting.join(timeout)
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(timeout)
        alive = [t.name for t in threads if t.is_alive()]
        self.cri.close()
        self.core.api_client.close()
        if alive:
            raise RuntimeError(f"pod streams: threads still running after {timeout}s: {alive}")

    def write_kubeconfig(self, source: Path, dest: Path) -> Path:
        """`source` with every cluster's server pointed at this front."""
        cfg = yaml.safe_load(Path(source).read_text())
        for c in cfg.get("clusters") or []:
            c["cluster"]["server"] = self.url
        dest.write_text(yaml.safe_dump(cfg))
        return dest

    # ------------------------------------------------------------ connections

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=self._run, args=(target, *args), daemon=True, name=f"pod-streams-{target.__name__}")
        with self._lock:
            self._threads.add(t)
        t.start()

    def _run(self, target, *args) -> None:
        try:
            target(*args)
        except Exception:
            log.exception("pod streams: %s failed", target.__name__)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.add(s)
        if self._closing.is_set():  # stop() may have missed it
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return s

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with self._lock:
                self._socks.discard(s)
            s.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                _answer(conn, HttpError(503, "too many connections"))
                conn.close()
                continue
            self._track(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HEAD_TIMEOUT)
            try:
                head, rest = _read_head(conn)
            except (OSError, ValueError):
                return  # a client that sends no valid head in time: closed
            try:
                method, target, headers = _parse_head(head)
            except ValueError as e:
                _answer(conn, HttpError(400, str(e)))
                return
            path, _, query = target.partition("?")
            m = STREAM_PATH.match(path)
            if m is None:
                self._splice_to(conn, self.upstream, head + rest)
                return
            ns, name, sub = (urllib.parse.unquote(g) for g in m.groups())
            try:
                url = self._streaming_url(method, ns, name, sub, query, headers)
            except HttpError as e:
                self.requests.append(f"{sub} {ns}/{name} refused {e.status}: {e.body}")
                _answer(conn, e)
                return
            self.requests.append(f"{sub} {ns}/{name} -> {url}")
            u = urllib.parse.urlsplit(url)
            if u.scheme != "http" or not u.hostname:
                _answer(conn, HttpError(500, f"the test front proxies http:// streaming URLs only, not {url}"))
                return
            # The request as the client sent it, to the runtime's URL (its path, the client's query).
            lines = [f"{method} {u.path}{'?' + query if query else ''} HTTP/1.1", f"Host: {u.netloc}"]
            lines += [f"{k}: {v}" for k, v in headers if k.lower() not in DROPPED_HEADERS]
            self._splice_to(conn, (u.hostname, u.port or 80), ("\r\n".join(lines) + "\r\n\r\n").encode() + rest)
        finally:
            self._close(conn)
            self._slots.release()

    def _splice_to(self, conn: socket.socket, addr: tuple[str, int], first: bytes) -> None:
        try:
            up = self._track(socket.create_connection(addr, timeout=HEAD_TIMEOUT))
        except OSError as e:
            _answer(conn, HttpError(502, f"cannot reach {addr[0]}:{addr[1]}: {e}"))
            return
        try:
            conn.settimeout(None)
            up.settimeout(None)
            up.sendall(first)
            back = threading.Thread(target=_copy, args=(up, conn), daemon=True, name="pod-streams-copy")
            with self._lock:
                self._threads.add(back)
            try:
                back.start()
                _copy(conn, up)
                back.join()
            finally:
                with self._lock:
                    self._threads.discard(back)
        except OSError:
            pass
        finally:
            self._close(up)

    # ------------------------------------------------------------ the API server's and the kubelet's checks

    def _streaming_url(self, method: str, ns: str, name: str, sub: str, query: str,
                       headers: list[tuple[str, str]]) -> str:
        if method not in ("GET", "POST"):
            raise api_status(405, f"the server does not allow this method on the requested resource ({method})")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        flags = {}
        for k in ("stdin", "stdout", "stderr", "tty"):
            try:
                flags[k] = parse_bool(params[k][-1]) if k in params else False
            except ValueError:
                raise api_status(400, f"{k}: {params[k][-1]!r} is not a boolean") from None
        # --- the API server (pod strategy's streamLocation)
        pod = self._pod(ns, name)
        spec = pod.get("spec") or {}
        containers = [c.get("name") for c in spec.get("containers") or []]
        container = (params.get("container") or [""])[-1]
        if sub != "portforward":
            if not container:
                if len(containers) != 1:
                    raise api_status(400, f"a container name must be specified for pod {name}"
                                          + (f", choose one of: {containers}" if containers else ""))
                container = containers[0]
            elif container not in containers:
                raise api_status(400, f"container {container} is not valid for pod {name}")
        if not spec.get("nodeName"):
            raise api_status(400, f"pod {name} does not have a host assigned")
        if spec["nodeName"] != self.node:
            raise api_status(502, f"node {spec['nodeName']} is not served by this test front (only {self.node})")
        if not any(k.lower() == "upgrade" for k, _ in headers):
            raise HttpError(400, "Upgrade request required")  # the kubelet's streaming server says so
        # --- the kubelet (GetAttach / GetExec / GetPortForward) → the CRI
        uid = pod["metadata"].get("uid") or ""
        rt = self.cri.runtime
        try:
            sandboxes = rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(
                filter=api_pb2.PodSandboxFilter(label_selector={POD_UID_LABEL: uid})), timeout=CRI_TIMEOUT).items
            if sub == "portforward":
                ready = [s for s in sandboxes if s.state == api_pb2.SANDBOX_READY]
                if not ready:
                    raise HttpError(500, f"failed to find sandbox for pod {ns}/{name}")
                ports = []
                for p in params.get("ports", []) + params.get("port", []):
                    for part in p.split(","):
                        try:
                            ports.append(int(part))
                        except ValueError:
                            raise HttpError(400, f"invalid port {part!r}") from None
                return rt.PortForward(api_pb2.PortForwardRequest(
                    pod_sandbox_id=max(ready, key=lambda s: s.created_at).id, port=ports), timeout=CRI_TIMEOUT).url
            found = [c for s in sandboxes for c in rt.ListContainers(api_pb2.ListContainersRequest(
                filter=api_pb2.ContainerFilter(pod_sandbox_id=s.id, label_selector={CONTAINER_LABEL: container})),
                timeout=CRI_TIMEOUT).containers]
            if not found:
                raise HttpError(500, f'container not found ("{container}")')
            cid = max(found, key=lambda c: c.created_at).id
            if sub == "attach":
                return rt.Attach(api_pb2.AttachRequest(container_id=cid, **flags), timeout=CRI_TIMEOUT).url
            return rt.Exec(api_pb2.ExecRequest(container_id=cid, cmd=params.get("command", []), **flags),
                           timeout=CRI_TIMEOUT).url
        except grpc.RpcError as e:  # the kubelet's streaming.WriteError
            status = 404 if e.code() == grpc.StatusCode.NOT_FOUND else 500
            raise HttpError(status, f"rpc error: code = {e.code().name.title().replace('_', '')} "
                                    f"desc = {e.details()}") from None

    def _pod(self, ns: str, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.core.read_namespaced_pod(name, ns, _preload_content=False,
                                                            _request_timeout=API_TIMEOUT).data)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                raise api_status(404, f'pods "{name}" not found',
                                 {"name": name, "kind": "pods"}) from None
            raise api_status(500, f"reading pod {ns}/{name}: {e.status} {e.reason}") from None


# ---------------------------------------------------------------- HTTP bits

def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """The request head (through the blank line) and what came after it in the same reads."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[:end + 4], buf[end + 4:]
        if len(buf) > MAX_HEAD:
            raise ValueError("request head too large")
        chunk = conn.recv(BUF)
        if not chunk:
            raise ValueError("connection closed before the request head ended")
        buf += chunk


def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise ValueError("request head is not text") from None
    lines = text.split("\r\n")[:-2]
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"malformed request line {lines[0][:100] if lines else ''!r}")
    headers = []
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if not sep or not k or k != k.strip():
            raise ValueError(f"malformed header line {line[:100]!r}")
        headers.append((k, v.strip()))
    return parts[0], parts[1], headers


def _answer(conn: socket.socket, e: HttpError) -> None:
    body = e.body.encode()
    reason = REASONS.get(e.status, ("Error", ""))[0]
    head = (f"HTTP/1.1 {e.status} {reason}\r\nContent-Type: {e.content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        conn.sendall(head + body)
    except OSError:
        pass


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """src → dst until src's EOF (then dst's write side is shut: the half-close passed on) or an error."""
    try:
        while True:
            data = src.recv(BUF)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
