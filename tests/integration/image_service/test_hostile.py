"""Hostile images, hostile servers and hostile names: each refused with the right code and a message that
names the reason (and the URL), and nothing left behind in the store."""

import socket

import grpc
import pytest

from proto.runtime.v1 import api_pb2

from .conftest import rpc_error, rules

FAILED = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("variant, reason", [
    ("backing-file", "backing file ('/etc/shadow')"),
    ("data-file", "external data file"),
    ("encrypted", "encrypted (LUKS)"),
    ("huge", "virtual size 256.0 TiB"),
    ("not-an-image", "not a disk image"),
    ("vmdk", "format vmdk is not accepted"),
])
def test_hostile_images_are_rejected(client, image_server, hostile_images, variant, reason):
    url = image_server.serve_file(f"/{variant}", hostile_images[variant])
    with rpc_error(FAILED, reason, url, f"virtlet.cloud/srv/{variant}:latest"):
        client.pull(f"virtlet.cloud/srv/{variant}")
    assert client.leftovers() == [] and client.list() == []


def test_virtual_size_cap_is_configurable(make_service, image_server, small):
    from image_service.validate import Validator
    client = make_service(validator=Validator(max_virtual_size=8 << 20))
    with rpc_error(FAILED, "virtual size 16.0 MiB", "exceeds the limit of 8.0 MiB"):
        client.pull("virtlet.cloud/srv/small.qcow2")


def test_raw_without_partition_table_is_not_an_image(client, image_server, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(1 << 16))
    image_server.serve_file("/blob", blob)
    with rpc_error(FAILED, "no qcow2 header and no MBR or GPT partition table"):
        client.pull("virtlet.cloud/srv/blob")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    # name: (route setup (server, small image file) -> None, gRPC code, message fragments)
    "redirect-to-file": (lambda s, f: s.redirect("/x", "file:///etc/passwd"), FAILED,
                         ["redirect from", "scheme 'file' is not allowed"]),
    "redirect-to-metadata": (lambda s, f: s.redirect("/x", "http://169.254.169.254/latest/meta-data/"), FAILED,
                             ["169.254.169.254", "denied network 169.254.0.0/16"]),
    "redirect-to-link-local-v6": (lambda s, f: s.redirect("/x", "http://[fe80::1]/x"), FAILED,
                                  ["fe80::1", "denied network fe80::/10"]),
    "redirect-to-other-loopback": (lambda s, f: s.redirect("/x", f"http://127.0.0.2:{s.port}/small"), FAILED,
                                   ["127.0.0.2", "denied network 127.0.0.0/8"]),
    "redirect-with-userinfo": (lambda s, f: s.redirect("/x", f"http://user:secret@{s.host}/small"), FAILED,
                               ["credentials (userinfo)"]),
    "redirect-to-ftp": (lambda s, f: s.redirect("/x", "ftp://example.com/x"), FAILED, ["scheme 'ftp'"]),
    "redirect-loop": (lambda s, f: s.redirect("/x", "/x"), FAILED, ["too many redirects (more than 9)"]),
    "not-found": (lambda s, f: s.status("/x", 404), grpc.StatusCode.NOT_FOUND, ["HTTP 404"]),
    "gone": (lambda s, f: s.status("/x", 410), grpc.StatusCode.NOT_FOUND, ["HTTP 410"]),
    "forbidden": (lambda s, f: s.status("/x", 403), FAILED, ["HTTP 403"]),
    "server-error": (lambda s, f: s.status("/x", 500), UNAVAILABLE, ["HTTP 500"]),
    "unavailable": (lambda s, f: s.status("/x", 503), UNAVAILABLE, ["HTTP 503"]),
    "truncated": (lambda s, f: s.truncate("/x", f, at=5000), UNAVAILABLE,
                  ["truncated body", "after 5000 of the 196616 bytes"]),
    "content-length-too-big": (lambda s, f: s.serve_bytes("/x", f.read_bytes(), content_length=200_000),
                               UNAVAILABLE, ["truncated body", "196616 of the 200000"]),
    "content-length-too-small": (lambda s, f: s.serve_bytes("/x", f.read_bytes(), content_length=100_000),
                                 UNAVAILABLE, ["more than the 100000 bytes its Content-Length announced"]),
    "slow-server": (lambda s, f: s.slow("/x", f, delay_per_4k=3), UNAVAILABLE, ["no data for 0.3s (read timeout)"]),
    "empty-body": (lambda s, f: s.serve_bytes("/x", b""), FAILED, ["not a disk image: the file is empty"]),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_servers(make_service, image_server, small, case):
    setup, code, fragments = CASES[case]
    client = make_service(rules(image_server, readTimeout=300))
    setup(image_server, small)
    with rpc_error(code, image_server.url("/x"), *fragments) as e:
        client.pull("virtlet.cloud/srv/x")
    assert "secret" not in e.value.details()
    assert client.leftovers() == [] and client.list() == []


def test_overall_timeout_of_a_transport(make_service, image_server, small):
    client = make_service(rules(image_server, timeout=400))
    image_server.slow("/x", small, delay_per_4k=0.02)  # never idle for long, but ~1 s in all
    with rpc_error(UNAVAILABLE, "longer than the transport timeout of 0.4s"):
        client.pull("virtlet.cloud/srv/x")
    assert client.leftovers() == []


def test_max_redirects_of_a_transport(client, image_server, small):
    image_server.redirect("/hop2", "/small.qcow2")
    image_server.redirect("/hop1", "/hop2")
    with rpc_error(FAILED, "too many redirects (more than 1)"):
        client.pull("virtlet.cloud/one-redirect/hop1")
    assert client.pull("virtlet.cloud/one-redirect/hop2").startswith("sha256:")
    assert client.pull("virtlet.cloud/srv/hop1") == client.pull("virtlet.cloud/srv/hop2")


def test_download_size_cap(make_service, image_server, small):
    client = make_service(max_download_size=100_000)
    with rpc_error(FAILED, "Content-Length 196616 exceeds the download limit of 100000 bytes"):
        client.pull("virtlet.cloud/srv/small.qcow2")
    assert client.leftovers() == []


def test_connection_refused(make_service, image_server):
    port = closed_port()
    client = make_service([{"translations": [{"name": "closed", "url": f"http://127.0.0.1:{port}/x",
                                              "transport": "t"}], "transports": {"t": {"allowHTTP": True}}}])
    with rpc_error(UNAVAILABLE, f"http://127.0.0.1:{port}/x", "cannot connect", "Connection refused"):
        client.pull("virtlet.cloud/closed")


def test_loopback_is_denied_unless_allowed(make_service, image_server, small):
    client = make_service(allow=())
    with rpc_error(FAILED, image_server.url("/small.qcow2"), "address 127.0.0.1 is in the denied network 127.0.0.0/8"):
        client.pull("virtlet.cloud/srv/small.qcow2")
    assert image_server.requests == []  # refused before connecting


@pytest.mark.parametrize("image", [
    "virtlet.cloud/../../etc/passwd", "virtlet.cloud/srv/../../../etc/passwd", "virtlet.cloud/srv/..%2f..%2fetc",
    "virtlet.cloud//etc/passwd", "/etc/passwd", "file:///etc/passwd", "http://127.0.0.1/x", "../x",
    "virtlet.cloud/srv/x\x00", "virtlet.cloud/Srv/x", "virtlet.cloud/srv/x@sha256:1234", "docker.io/library/busybox",
])
def test_hostile_names_never_reach_the_network_or_the_filesystem(client, image_server, image):
    for call in (client.pull, client.remove):
        with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "image: "):
            call(image)
    # ImageStatus and a ListImages filter answer what vmlet cannot serve as an absent image (containerd's way).
    assert client.status(image) == api_pb2.ImageStatusResponse()
    assert client.status(image, verbose=True) == api_pb2.ImageStatusResponse()
    assert client.list(image) == []
    assert image_server.requests == []
    assert client.leftovers() == []


@pytest.mark.parametrize("lookup", ["sha256:../../etc/passwd", "sha256:", "SHA256:AB", "ab/../cd"])
def test_hostile_ids(client, small, lookup):
    client.pull("virtlet.cloud/srv/small.qcow2")  # a stored image: a lookup must not resolve to it either
    with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "image: "):
        client.remove(lookup)
    assert client.status(lookup) == api_pb2.ImageStatusResponse()
    assert client.status(lookup, verbose=True) == api_pb2.ImageStatusResponse()
    assert client.list(lookup) == []
    assert len(client.list()) == 1


def test_empty_image_field(client):
    for call in (client.pull, client.status, client.remove):
        with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "image: the image field is empty"):
            call("")
