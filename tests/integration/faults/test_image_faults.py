"""The image server dying mid-pull and the image store's file system filling up, through vmlet's CRI socket.

Either ends in a clear error naming the cause (UNAVAILABLE with the URL; RESOURCE_EXHAUSTED naming the file
system), nothing half-written stays in the store, the daemon keeps serving, and a retry succeeds once the
cause is gone.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from proto.runtime.v1 import api_pb2

from .conftest import RPC_SLACK, TESTVM

pytestmark = pytest.mark.libvirt

MIB = 1 << 20


def pull(client, timeout: float = 120):
    return client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=timeout)


def store_files(vmlet) -> dict[str, list[str]]:
    root = vmlet.state_dir / "images"
    return {d: sorted(p.name for p in (root / d).iterdir()) for d in ("sha256", "tmp")}


def assert_store_empty(client, vmlet) -> None:
    assert store_files(vmlet) == {"sha256": [], "tmp": []}
    assert list(client.images.ListImages(api_pb2.ListImagesRequest(), timeout=RPC_SLACK).images) == []
    st = client.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=TESTVM)),
                                   timeout=RPC_SLACK)
    assert not st.HasField("image")


def test_image_server_dying_mid_pull_is_unavailable_leaves_nothing_and_a_retry_works(
        vmlet, client, image_server, test_image):
    url = image_server.stall("/testvm.qcow2", test_image, at=4 * MIB)
    outcome: dict[str, object] = {}

    def pull_in_background() -> None:
        try:
            outcome["response"] = pull(client)
        except grpc.RpcError as e:
            outcome["error"] = e

    puller = threading.Thread(target=pull_in_background)
    puller.start()
    try:
        assert image_server.stalled.wait(60), "the pull never reached the image server"
        # The partial download is in the store's tmp/ now; the server dies under it.
        assert store_files(vmlet)["tmp"], "no download in progress in the store"
        image_server.kill()
        started = time.monotonic()
    finally:
        puller.join(RPC_SLACK + 120)
    assert not puller.is_alive(), "PullImage hung after the image server died"
    assert time.monotonic() - started < RPC_SLACK, "PullImage did not notice the server's death promptly"
    err = outcome.get("error")
    assert isinstance(err, grpc.RpcError), f"PullImage succeeded against a dead server: {outcome}"
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert url in err.details(), err.details()
    assert_store_empty(client, vmlet)

    # The daemon is still there, and the server comes back on the same URL with the whole file.
    assert vmlet.alive()
    image_server.start()
    image_server.serve_file("/testvm.qcow2", test_image)
    ref = pull(client).image_ref
    assert ref.startswith("sha256:")
    assert store_files(vmlet) == {"sha256": [ref.removeprefix("sha256:")], "tmp": []}


def test_full_image_store_is_resource_exhausted_names_the_file_system_and_recovers(
        tmpfs, vmlet_factory, test_image):
    proc = vmlet_factory()
    fs = tmpfs(proc.state_dir / "images", 8 * MIB)  # the test image is 16 MiB
    client = proc.start()
    with pytest.raises(grpc.RpcError) as exc:
        pull(client)
    err = exc.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert str(fs.target) in err.details() and "No space left on device" in err.details(), err.details()
    assert fs.free() > 7 * MIB, "the failed download was not deleted"
    assert_store_empty(client, proc)
    assert client.runtime.Version(api_pb2.VersionRequest(), timeout=RPC_SLACK).runtime_name == "vmlet"

    fs.grow(64 * MIB)  # space freed: the same request works
    ref = pull(client).image_ref
    assert store_files(proc)["sha256"] == [ref.removeprefix("sha256:")]
    assert test_image.stat().st_size == (fs.target / "sha256" / ref.removeprefix("sha256:")).stat().st_size
