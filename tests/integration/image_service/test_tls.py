"""https through the pinned-address connection: CA certificates and serverName from the transport, insecure,
and a redirect that downgrades to plain http."""

import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from tests.support.prereq import require

from .conftest import rpc_error

@pytest.fixture(autouse=True)
def _openssl():
    require(shutil.which("openssl") is not None, "openssl not installed (run deploy/setup-host.sh)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA and a server certificate for the name images.test (not for 127.0.0.1)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=vmlet test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=images.test")
    (d / "ext.cnf").write_text("subjectAltName=DNS:images.test\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")
    run("req", *ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=vmlet")
    (d / "client.cnf").write_text("extendedKeyUsage=clientAuth\n")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "1", "-extfile", "client.cnf")
    return d


@pytest.fixture
def tls_server(pki, small, image_server):
    """https://127.0.0.1:<port>/small.qcow2, and /downgrade redirecting to the plain http server."""
    yield from start_tls(pki, small, image_server)


@pytest.fixture
def mtls_server(pki, small, image_server):
    """The same, requiring a client certificate signed by the test CA."""
    yield from start_tls(pki, small, image_server, client_ca=pki / "ca.pem")


def start_tls(pki, small, image_server, client_ca=None):
    body = small.read_bytes()
    downgrade = image_server.url("/small.qcow2")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/downgrade":
                self.send_response(302)
                self.send_header("Location", downgrade)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def config(url, **transport):
    return [{"translations": [{"regexp": "tls/(.+)", "url": f"{url}/$1", "transport": "tls"}],
             "transports": {"tls": transport}}]


def test_ca_from_the_transport_and_server_name(make_service, tls_server, pki):
    client = make_service(config(tls_server, tls={"certificates": [{"cert": (pki / "ca.pem").read_text()}],
                                                  "serverName": "images.test"}))
    assert client.pull("virtlet.cloud/tls/small.qcow2").startswith("sha256:")


def test_unknown_ca_is_refused(make_service, tls_server):
    client = make_service(config(tls_server, tls={"serverName": "images.test"}))
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "TLS certificate verification failed", tls_server):
        client.pull("virtlet.cloud/tls/small.qcow2")
    assert client.leftovers() == []


def test_certificate_must_match_the_name(make_service, tls_server, pki):
    client = make_service(config(tls_server, tls={"certificates": [{"cert": (pki / "ca.pem").read_text()}]}))
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "TLS certificate verification failed", "mismatch"):
        client.pull("virtlet.cloud/tls/small.qcow2")


def test_insecure_skips_verification(make_service, tls_server):
    client = make_service(config(tls_server, tls={"insecure": True}))
    assert client.pull("virtlet.cloud/tls/small.qcow2").startswith("sha256:")


def test_redirect_from_https_to_http_needs_allow_http(make_service, tls_server, image_server):
    client = make_service(config(tls_server, tls={"insecure": True}))
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "redirect from", "plain http is not allowed"):
        client.pull("virtlet.cloud/tls/downgrade")
    assert image_server.requests == []
    allowed = make_service(config(tls_server, tls={"insecure": True}, allowHTTP=True),
                           state_dir=client.state_dir.parent / "s2")
    assert allowed.pull("virtlet.cloud/tls/downgrade").startswith("sha256:")


def test_client_certificate(make_service, mtls_server, pki, tmp_path):
    ca = {"cert": (pki / "ca.pem").read_text()}
    me = {"cert": (pki / "client.pem").read_text(), "key": (pki / "client.key").read_text()}
    without = make_service(config(mtls_server, tls={"certificates": [ca], "serverName": "images.test"}))
    with rpc_error(grpc.StatusCode.UNAVAILABLE, mtls_server):
        without.pull("virtlet.cloud/tls/small.qcow2")
    client = make_service(config(mtls_server, tls={"certificates": [ca, me], "serverName": "images.test"}),
                          state_dir=tmp_path / "with-cert")
    assert client.pull("virtlet.cloud/tls/small.qcow2").startswith("sha256:")
