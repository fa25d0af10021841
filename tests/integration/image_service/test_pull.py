"""PullImage / ImageStatus / ListImages / RemoveImage round trips over gRPC against the loopback server."""

import hashlib
import logging
import threading
from pathlib import Path

import grpc

from proto.runtime.v1 import api_pb2

from .conftest import rpc_error



def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_status_list_remove_round_trip(client, small, image_server):
    digest = sha256(small)
    ref = client.pull("virtlet.cloud/srv/small.qcow2")
    assert ref == f"sha256:{digest}"
    assert image_server.count("/small.qcow2") == 1
    assert (client.store / "sha256" / digest).read_bytes() == small.read_bytes()

    tag, repo_digest = "virtlet.cloud/srv/small.qcow2:latest", f"virtlet.cloud/srv/small.qcow2@sha256:{digest}"
    for lookup in ("virtlet.cloud/srv/small.qcow2", tag, repo_digest, ref, digest, digest[:12], f"sha256:{digest[:5]}"):
        image = client.status(lookup).image
        assert image.id == ref, lookup
        assert list(image.repo_tags) == [tag]
        assert list(image.repo_digests) == [repo_digest]
        assert image.size == small.stat().st_size
        assert image.spec.image == lookup  # round-trips
        assert not image.pinned
    (listed,) = client.list()
    assert (listed.id, listed.spec.image) == (ref, tag)
    assert [i.id for i in client.list(tag)] == [ref] and client.list("virtlet.cloud/other") == []
    streamed = list(client.stub.StreamImages(api_pb2.StreamImagesRequest()))
    assert [i.id for r in streamed for i in r.images] == [ref]

    verbose = client.status(tag, verbose=True)
    assert image_server.url("/small.qcow2") in verbose.info["info"] and '"format": "qcow2"' in verbose.info["info"]

    client.remove(tag)
    assert not client.status(ref).HasField("image")  # unknown: an empty answer, not an error
    assert client.list() == []
    assert client.leftovers() == []
    client.remove(tag)  # removing what is not there is fine (CRI semantics)
    client.remove("sha256:" + "0" * 64)


def test_pull_raw_disk_image(client, image_server, raw_disk):
    image_server.serve_file("/disk.raw", raw_disk)
    ref = client.pull("virtlet.cloud/srv/disk.raw:v1")
    assert ref == f"sha256:{sha256(raw_disk)}"
    assert list(client.status(ref).image.repo_tags) == ["virtlet.cloud/srv/disk.raw:v1"]
    assert '"format": "raw"' in client.status(ref, verbose=True).info["info"]


def test_pull_the_bootable_test_image(client, image_server, test_image):
    image_server.serve_file("/testvm.qcow2", test_image)
    assert client.pull("virtlet.cloud/srv/testvm.qcow2") == f"sha256:{sha256(test_image)}"


def test_pinned_digest(client, small, image_server):
    digest = sha256(small)
    pinned = f"virtlet.cloud/srv/small.qcow2@sha256:{digest}"
    assert client.pull(pinned) == f"sha256:{digest}"
    image = client.status(pinned).image
    assert list(image.repo_tags) == [] and list(image.repo_digests) == [pinned]
    # Already in the store: the digest names the content, nothing is downloaded again.
    assert client.pull(f"virtlet.cloud/srv/small.qcow2:v2@sha256:{digest}") == f"sha256:{digest}"
    assert image_server.count("/small.qcow2") == 1
    assert "virtlet.cloud/srv/small.qcow2:v2" in client.status(digest).image.repo_tags


def test_pinned_digest_mismatch_fails_and_leaves_nothing(client, small, image_server):
    wrong = "0" * 64
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, f"sha256:{wrong}", "does not match",
                   sha256(small), image_server.url("/small.qcow2")):
        client.pull(f"virtlet.cloud/srv/small.qcow2@sha256:{wrong}")
    assert image_server.count("/small.qcow2") == 1
    assert client.leftovers() == [] and client.list() == []


def test_translation_rules_end_to_end(client, small, image_server):
    ref = client.pull("virtlet.cloud/alias:stable")  # exact-name rule
    assert ref == client.pull("virtlet.cloud/srv/small.qcow2")  # regexp rule, same content
    assert sorted(client.status(ref).image.repo_tags) == ["virtlet.cloud/alias:stable",
                                                         "virtlet.cloud/srv/small.qcow2:latest"]


def test_default_translation_is_https_of_the_name(make_service):
    client = make_service(allow=())  # default address policy: loopback denied
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "https://127.0.0.1/disk.qcow2", "denied network 127.0.0.0/8"):
        client.pull("virtlet.cloud/127.0.0.1/disk.qcow2")


def test_concurrent_pulls_of_one_image_download_once(client, small, image_server):
    image_server.slow("/slow.qcow2", small, delay_per_4k=0.01)  # ~0.5 s: the pulls overlap
    names = ["virtlet.cloud/srv/slow.qcow2"] * 5 + ["virtlet.cloud/alias-slow:a", "virtlet.cloud/alias-slow:b"]
    results, errors = [], []

    def pull(name):
        try:
            results.append(client.pull(name))
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=pull, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [f"sha256:{sha256(small)}"] * len(names)
    assert image_server.count("/slow.qcow2") == 1
    assert sorted(client.status(results[0]).image.repo_tags) == [
        "virtlet.cloud/alias-slow:a", "virtlet.cloud/alias-slow:b", "virtlet.cloud/srv/slow.qcow2:latest"]
    assert client.leftovers() == [f"sha256/{sha256(small)}"]


def test_pulling_a_tag_again_downloads_again(client, small, image_server):
    assert client.pull("virtlet.cloud/srv/small.qcow2") == client.pull("virtlet.cloud/srv/small.qcow2")
    assert image_server.count("/small.qcow2") == 2
    assert len(client.list()) == 1


def test_a_tag_follows_new_content(client, small, raw_disk, image_server):
    old = client.pull("virtlet.cloud/srv/small.qcow2")
    image_server.serve_file("/small.qcow2", raw_disk)
    new = client.pull("virtlet.cloud/srv/small.qcow2")
    assert old != new
    assert client.status("virtlet.cloud/srv/small.qcow2").image.id == new
    assert list(client.status(old).image.repo_tags) == []  # the old content stays, untagged


def test_progress_is_logged_for_slow_downloads(make_service, small, image_server, caplog):
    client = make_service(progress_interval=0.1)
    image_server.slow("/slow.qcow2", small, delay_per_4k=0.01)
    with caplog.at_level(logging.INFO, logger="vmlet.image"):
        client.pull("virtlet.cloud/srv/slow.qcow2")
    progress = [r.getMessage() for r in caplog.records if "MiB/s, ETA" in r.getMessage()]
    assert progress, caplog.text
    assert "/0.2 MiB (" in progress[0]
