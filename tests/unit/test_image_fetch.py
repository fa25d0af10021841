"""fetch.py against a raw loopback socket server speaking exactly the bytes each test gives it: the HTTP
framings the shared test server cannot produce (chunked, close-delimited, keep-alive, garbage)."""

import contextlib
import hashlib
import io
import socket
import threading
import time

import pytest

from image_service.errors import DownloadError, PolicyError
from image_service.fetch import Fetcher
from image_service.translation import Transport
from image_service.urlpolicy import AddressPolicy

BODY = bytes(range(256)) * 1000
LOCAL = Transport(allowHTTP=True, readTimeout=1000)


class CannedServer:
    """Answers every connection with `response`, then closes (or holds the connection open `hold` seconds).

    close() shuts the listener down, waits for the thread, and only then closes the fd: closing an fd that
    another thread is about to accept() on lets that thread accept on whatever socket reuses the number next
    (another test's server) and steal its connections.
    """

    def __init__(self, response: bytes, hold: float = 0.0):
        self.response, self.hold = response, hold
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/image"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # shut down
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                conn.sendall(self.response)
                self.stop.wait(self.hold)

    def close(self):
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def serve():
    servers = []

    def _serve(response: bytes, hold: float = 0.0) -> str:
        servers.append(CannedServer(response, hold))
        return servers[-1].url

    yield _serve
    for s in servers:
        s.close()


def fetch(url, transport=LOCAL, **kwargs):
    out = io.BytesIO()
    result = Fetcher(AddressPolicy.from_strings(allow=["127.0.0.1/32"]), **kwargs).fetch(url, transport, out)
    assert result.size == len(out.getvalue()) and result.sha256 == hashlib.sha256(out.getvalue()).hexdigest()
    return out.getvalue()


def chunked(body: bytes, size: int = 10_000) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_close_delimited_body(serve):
    assert fetch(serve(b"HTTP/1.1 200 OK\r\n\r\n" + BODY)) == BODY


def test_chunked_body(serve):
    assert fetch(serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY))) == BODY


def test_truncated_chunked_body(serve):
    url = serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY)[:50_000])
    with pytest.raises(DownloadError, match="truncated body"):
        fetch(url)


def test_server_ignoring_connection_close_is_fine_when_the_length_is_exact(serve):
    url = serve(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY, hold=5)
    start = time.monotonic()
    assert fetch(url) == BODY
    assert time.monotonic() - start < 2  # a short wait for stray bytes, not the read timeout


def test_size_cap_applies_to_bodies_of_unknown_length(serve):
    with pytest.raises(PolicyError, match="exceeds the download limit of 1000 bytes"):
        fetch(serve(b"HTTP/1.1 200 OK\r\n\r\n" + BODY), max_size=1000)
    with pytest.raises(PolicyError, match="exceeds the download limit"):
        fetch(serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY)), max_size=1000)


@pytest.mark.parametrize("response, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n" + bytes(20), "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n", "redirect without a Location"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 0\r\n\r\n", "HTTP 206"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "invalid HTTP response"),
    (b"", "closed the connection without answering"),
])
def test_broken_responses(serve, response, message):
    with pytest.raises(DownloadError, match=message):
        fetch(serve(response))


def test_silent_server_hits_the_read_timeout(serve):
    url = serve(b"", hold=3)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"no data for 0.3s \(read timeout\)"):
        fetch(url, Transport(allowHTTP=True, readTimeout=300))
    assert time.monotonic() - start < 2


def test_close_interrupts_a_download_in_progress(serve):
    url = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + bytes(10), hold=10)
    fetcher = Fetcher(AddressPolicy.from_strings(allow=["127.0.0.1/32"]))
    errors = []

    def run():
        try:
            fetcher.fetch(url, Transport(allowHTTP=True, readTimeout=20_000), io.BytesIO())
        except DownloadError as e:
            errors.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    start = time.monotonic()
    fetcher.close()
    t.join(5)
    assert time.monotonic() - start < 1
    assert errors and "shutting down" in errors[0]


def test_names_that_resolve_to_denied_addresses_are_refused_before_connecting():
    with pytest.raises(PolicyError, match="localhost resolves to address .* in the denied network"):
        Fetcher().fetch("https://localhost/x", Transport(), io.BytesIO())
