"""HTTP(S) download of one URL into an open file, hashing as it goes, with every hop re-checked.

Why http.client by hand rather than a client library that follows redirects itself: every hop must pass
urlpolicy (scheme, userinfo, plain http, address deny list), and the connection must go to the very address
that was checked (a second DNS lookup could answer differently: DNS rebinding). So we resolve, check, connect
the socket ourselves and hand it to http.client only to write the request and parse the response head.

The body of a non-chunked response is read from the socket directly: http.client stops at Content-Length and
reports a connection closed early as a normal end, so it can tell neither a truncated body nor a server that
sends more than it announced. Memory stays flat: one 1 MiB buffer, reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO
from urllib.parse import SplitResult, urljoin

from image_service.errors import DownloadError, PolicyError, RemoteNotFound, RemoteRefused
from image_service.store import store_error
from image_service.translation import TLSConfig, Transport
from image_service.urlpolicy import AddressPolicy, check_url

log = logging.getLogger("vmlet.image")

CHUNK = 1 << 20
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "vmlet-image-service/0.1"
TRAILING_CHECK = 1.0  # s to wait for bytes beyond Content-Length when the server keeps the connection open


@dataclass(frozen=True)
class Fetched:
    size: int
    sha256: str
    url: str  # the last URL of the redirect chain


class Fetcher:
    def __init__(self, policy: AddressPolicy | None = None, max_size: int = 64 << 30,
                 progress_interval: float = 5.0):
        self.policy = policy or AddressPolicy()
        self.max_size = max_size
        self.progress_interval = progress_interval
        self._closing = threading.Event()
        self._active: set[socket.socket] = set()  # sockets of downloads in progress, for close()
        self._lock = threading.Lock()

    def close(self) -> None:
        """End every download in progress now (their callers get an error and clean up) and refuse new ones."""
        self._closing.set()
        with self._lock:
            for sock in self._active:
                with contextlib.suppress(OSError):  # already closed
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv at once

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._active.add(sock)
        return sock

    def _untrack(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._active.discard(sock)

    def _check_closing(self, url: str) -> None:
        if self._closing.is_set():
            raise DownloadError(f"{url}: the image service is shutting down")

    def fetch(self, url: str, transport: Transport, out: BinaryIO, label: str = "") -> Fetched:
        """Download `url` into `out` (an unbuffered binary file); errors are ImageError subclasses."""
        deadline = time.monotonic() + transport.timeout / 1000 if transport.timeout else None
        previous = None
        for _ in range(transport.redirects + 1):
            try:
                try:
                    parts = check_url(url, transport.allowHTTP)
                    conn, resp = self._request(url, parts, transport, deadline)
                except PolicyError as e:
                    if previous is None:
                        raise
                    raise PolicyError(f"redirect from {previous} refused: {e}") from None
                try:
                    if resp.status not in REDIRECTS:
                        _check_status(url, resp)
                        return self._body(url, conn, resp, transport, deadline, out, label)
                    location = resp.getheader("Location")
                    if not location:
                        raise DownloadError(f"{url}: HTTP {resp.status} redirect without a Location")
                    previous, url = url, urljoin(url, location.strip())
                finally:
                    self._untrack(conn.raw)
                    resp.close()
                    conn.close()
            except ssl.SSLCertVerificationError as e:
                raise PolicyError(f"{url}: TLS certificate verification failed: {e.verify_message}") from None
            except (OSError, http.client.HTTPException) as e:
                self._check_closing(url)
                raise DownloadError(f"{url}: {_describe(e, transport, deadline)}") from None
        raise PolicyError(f"{url}: too many redirects (more than {transport.redirects})")

    # ------------------------------------------------------------ one request

    def _request(self, url: str, parts: SplitResult, transport: Transport, deadline: float | None):
        https = parts.scheme.lower() == "https"
        port = parts.port or (443 if https else 80)
        self._check_closing(url)
        sock = self._track(self._connect(url, parts.hostname, port, transport, deadline))
        try:
            if https:
                tls = transport.tls or TLSConfig()
                wrapped = _ssl_context(tls.model_dump_json()).wrap_socket(
                    sock, server_hostname=tls.serverName or parts.hostname)
                self._untrack(sock)
                sock = self._track(wrapped)
            conn = _Pinned(parts.hostname, port, sock)
            conn.putrequest("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                            skip_host=True, skip_accept_encoding=True)
            for k, v in (("Host", parts.netloc), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
                         ("Accept-Encoding", "identity"), ("Connection", "close")):
                conn.putheader(k, v)
            conn.endheaders()
            return conn, conn.getresponse()
        except BaseException:
            self._untrack(sock)
            sock.close()
            raise

    def _connect(self, url: str, host: str, port: int, transport: Transport, deadline: float | None):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except socket.gaierror as e:
            raise DownloadError(f"{url}: cannot resolve {host}: {e.strerror}") from None
        # Refuse if any address is denied: a name that points at the metadata service is an attack, not a typo.
        for info in infos:
            address = info[4][0]
            if (net := self.policy.denied_by(address)) is not None:
                via = "" if address == host.strip("[]") else f"{host} resolves to "
                raise PolicyError(f"{url}: {via}address {address} is in the denied network {net}")
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(_timeout(transport, deadline))
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise DownloadError(f"{url}: cannot connect to {host} port {port}: {_describe(error, transport, deadline)}")

    # ------------------------------------------------------------ the body

    def _body(self, url, conn, resp, transport, deadline, out, label) -> Fetched:
        length = _content_length(url, resp)
        if length is not None and length > self.max_size:
            raise PolicyError(f"{url}: Content-Length {length} exceeds the download limit of {self.max_size} bytes")
        digest = hashlib.sha256()
        buf = memoryview(bytearray(CHUNK))
        progress = _Progress(label or url, length, self.progress_interval)
        total = 0
        while True:
            want = CHUNK if length is None else min(CHUNK, length - total)
            if want == 0:
                break
            if resp.chunked:
                conn.raw.settimeout(_timeout(transport, deadline))
                n = resp.readinto(buf)  # http.client raises IncompleteRead on a truncated chunked body
            else:
                n = _fill(resp.fp, buf[:want], conn.raw, transport, deadline)
            self._check_closing(url)  # a shut-down socket reads as the end of the body
            if n == 0:
                break
            total += n
            if total > self.max_size:
                raise PolicyError(f"{url}: body exceeds the download limit of {self.max_size} bytes")
            digest.update(buf[:n])
            _write_all(out, buf[:n])
            progress.update(total)
        if length is not None:
            if total < length:
                raise DownloadError(f"{url}: truncated body: the connection ended after {total} of the "
                                    f"{length} bytes announced by Content-Length")
            conn.raw.settimeout(min(TRAILING_CHECK, transport.readTimeout / 1000))
            try:
                extra = resp.fp.read1(1)
            except TimeoutError:
                extra = b""  # the server keeps the connection open despite Connection: close
            if extra:
                raise DownloadError(f"{url}: the server sent more than the {length} bytes its Content-Length announced")
        progress.done(total)
        return Fetched(size=total, sha256=digest.hexdigest(), url=url)


class _Pinned(http.client.HTTPConnection):
    """An HTTPConnection over a socket we connected (and checked) ourselves; it never reconnects.

    `raw` keeps the socket: http.client drops `sock` once a response says the connection will close (the
    response's file still reads from it), but we still set its timeouts and may shut it down.
    """

    def __init__(self, host: str, port: int, sock: socket.socket):
        super().__init__(host, port)
        self.sock = self.raw = sock

    def connect(self):
        raise http.client.HTTPException("connection already closed")


def _check_status(url: str, resp: http.client.HTTPResponse) -> None:
    if resp.status == 200:
        return
    what = f"{url}: HTTP {resp.status} {resp.reason}".rstrip()
    if resp.status in (404, 410):
        raise RemoteNotFound(what)
    if 400 <= resp.status < 500:
        raise RemoteRefused(what)
    raise DownloadError(what)


def _content_length(url: str, resp: http.client.HTTPResponse) -> int | None:
    if resp.chunked:
        return None
    values = {v.strip() for v in resp.msg.get_all("Content-Length") or []}
    if not values:
        return None
    if len(values) > 1 or not next(iter(values)).isdigit():
        raise DownloadError(f"{url}: invalid Content-Length {sorted(values)}")
    return int(values.pop())


def _fill(fp, buf: memoryview, sock: socket.socket, transport: Transport, deadline: float | None) -> int:
    """Read until `buf` is full or the stream ends; each read is bounded by the read timeout and deadline."""
    got = 0
    while got < len(buf):
        sock.settimeout(_timeout(transport, deadline))
        n = fp.readinto1(buf[got:])
        if not n:
            break
        got += n
    return got


def _write_all(out: BinaryIO, data: memoryview) -> None:
    try:
        while data:
            n = out.write(data)
            data = data[n:]
    except OSError as e:  # not a download error: the store's disk
        name = getattr(out, "name", None)
        raise store_error(e, name if isinstance(name, (str, Path)) else None) from None


def _timeout(transport: Transport, deadline: float | None) -> float:
    t = transport.readTimeout / 1000
    if deadline is None:
        return t
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline")
    return min(t, left)


def _describe(e: BaseException | None, transport: Transport, deadline: float | None) -> str:
    if isinstance(e, TimeoutError):
        if deadline is not None and time.monotonic() >= deadline - 0.05:
            return f"download took longer than the transport timeout of {transport.timeout / 1000:g}s"
        return f"no data for {transport.readTimeout / 1000:g}s (read timeout)"
    if isinstance(e, http.client.IncompleteRead):
        return f"truncated body: the connection ended after {len(e.partial)} more bytes"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(e, http.client.HTTPException):
        return f"invalid HTTP response ({type(e).__name__}: {e})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


@lru_cache(maxsize=32)
def _ssl_context(tls_json: str) -> ssl.SSLContext:
    """One context per distinct TLS config (keyed by its JSON: the model itself is not hashable)."""
    tls = TLSConfig.model_validate_json(tls_json)
    ctx = ssl.create_default_context()
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    for c in tls.certificates:
        if c.key is None:
            ctx.load_verify_locations(cadata=c.cert)  # added to the system CAs
        else:
            # load_cert_chain only reads files: write them to a private directory, gone right after.
            with tempfile.TemporaryDirectory() as d:
                cert, key = Path(d, "cert.pem"), Path(d, "key.pem")
                cert.write_text(c.cert)
                key.write_text(c.key)
                ctx.load_cert_chain(cert, key)
    return ctx


class _Progress:
    """Logs bytes, rate and ETA every `interval` seconds, so only downloads that take a while log at all."""

    def __init__(self, label: str, total: int | None, interval: float):
        self.label, self.total, self.interval = label, total, interval
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = done / (now - self.start)
        if self.total:
            eta = (self.total - done) / rate if rate else float("inf")
            log.info("pull %s: %.1f/%.1f MiB (%d%%), %.1f MiB/s, ETA %.0fs", self.label, done / 2**20,
                     self.total / 2**20, 100 * done // self.total, rate / 2**20, eta)
        else:
            log.info("pull %s: %.1f MiB, %.1f MiB/s", self.label, done / 2**20, rate / 2**20)

    def done(self, total: int) -> None:
        elapsed = time.monotonic() - self.start
        log.info("pull %s: downloaded %.1f MiB in %.1fs (%.1f MiB/s)", self.label, total / 2**20, elapsed,
                 total / 2**20 / elapsed if elapsed > 0 else 0.0)
