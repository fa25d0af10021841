"""ImageStatus of a name vmlet cannot serve is an absent image (containerd's answer), not an error.

PullImage of the same names keeps its clear InvalidArgument; echoed names are
shortened, so a huge name still gets a readable status back.
"""

import grpc
import pytest

from proto.runtime.v1 import api_pb2

from .conftest import rpc_error

UNSERVABLE = [
    "docker.io/library/busybox:latest",  # another registry's: the kubelet asks every runtime
    "busybox",
    "virtlet.cloud/Upper/Case",
    "virtlet.cloud/srv/x\x00",
    "virtlet.cloud/srv/\ufffe",
    "virtlet.cloud/" + "a" * 300,  # longer than a repo name may be
    "sha256:../../etc/passwd",
    "x" * 65536,
]


@pytest.mark.parametrize("image", UNSERVABLE, ids=lambda s: repr(s[:40]))
def test_status_of_an_unservable_name_is_empty_and_pull_still_refuses(client, image_server, image):
    assert client.status(image) == api_pb2.ImageStatusResponse()
    assert client.status(image, verbose=True) == api_pb2.ImageStatusResponse()
    assert client.list(image) == []
    with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "image: ") as e:
        client.pull(image)
    assert len(e.value.details().encode()) <= 2048
    assert image_server.requests == []
    assert client.leftovers() == []


def test_status_still_finds_what_is_stored_and_refuses_an_empty_field(client, small):
    ref = client.pull("virtlet.cloud/srv/small.qcow2")
    assert client.status("virtlet.cloud/srv/small.qcow2").image.id == ref
    assert client.status(ref[:12]).image.id == ref
    assert client.status("docker.io/library/busybox").image.id == ""
    with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "the image field is empty"):
        client.status("")


def test_long_names_are_echoed_shortened(client):
    name = "virtlet.cloud/" + "b" * 65536 + "!"
    with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "image: ") as e:
        client.pull(name)
    assert len(e.value.details().encode()) <= 2048
