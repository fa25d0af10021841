"""RemoveImage never breaks a running VM; ImageFsInfo reports what is really on disk."""

import subprocess

import grpc
import pytest

from image_service.errors import ImageNotFound

from .conftest import rpc_error


def test_remove_while_in_use_keeps_the_file_until_the_last_release(client, small):
    ref = client.pull("virtlet.cloud/srv/small.qcow2")
    path = client.service.acquire("virtlet.cloud/srv/small.qcow2", holder="vm-1")
    assert path == client.store / "sha256" / ref.removeprefix("sha256:")
    client.service.acquire(ref, holder="vm-2")
    assert '"holders": ["vm-1", "vm-2"]' in client.status(ref, verbose=True).info["info"]

    client.remove(ref)
    assert not client.status(ref).HasField("image") and client.list() == []  # gone for the kubelet
    assert path.read_bytes() == small.read_bytes()  # still there for the VMs
    client.service.release(ref, "vm-1")
    assert path.exists()
    client.service.release(ref, "vm-2")
    assert not path.exists()
    assert client.leftovers() == []


def test_pulling_a_removed_but_held_image_brings_it_back(client, small):
    ref = client.pull("virtlet.cloud/srv/small.qcow2")
    client.service.acquire(ref, "vm-1")
    client.remove(ref)
    assert client.pull("virtlet.cloud/srv/small.qcow2") == ref
    client.service.release(ref, "vm-1")
    assert client.status(ref).image.id == ref  # not deleted: it was pulled again


def test_holders_survive_a_restart_of_the_service(make_service, tmp_path, small):
    first = make_service()
    ref = first.pull("virtlet.cloud/srv/small.qcow2")
    first.service.acquire(ref, "vm-1")
    first.remove(ref)
    first.service.close()  # the store is free for the next service on the same state dir
    second = make_service(state_dir=first.state_dir)
    path = second.store / "sha256" / ref.removeprefix("sha256:")
    assert path.exists() and second.list() == []
    second.service.release(ref, "vm-1")
    assert not path.exists()


def test_acquire_of_an_unknown_image_fails(client):
    with pytest.raises(ImageNotFound):
        client.service.acquire("virtlet.cloud/srv/nothing", "vm-1")


def test_remove_by_every_kind_of_reference(client, small, raw_disk, image_server):
    image_server.serve_file("/disk.raw", raw_disk)
    for ref_of in (lambda r: r, lambda r: r.removeprefix("sha256:"), lambda r: r[:14],
                   lambda r: f"virtlet.cloud/srv/disk.raw@{r}", lambda r: "virtlet.cloud/srv/disk.raw"):
        ref = client.pull("virtlet.cloud/srv/disk.raw")
        client.remove(ref_of(ref))
        assert client.list() == [] and client.leftovers() == []


def du_and_find(root):
    du = int(subprocess.run(["du", "-sB1", str(root)], capture_output=True, text=True, check=True).stdout.split()[0])
    inodes = len(subprocess.run(["find", str(root)], capture_output=True, text=True, check=True).stdout.splitlines())
    return du, inodes


def test_image_fs_info_matches_the_files_on_disk(client, small, raw_disk, image_server):
    image_server.serve_file("/disk.raw", raw_disk)
    empty = client.fsinfo()
    assert empty.fs_id.mountpoint == str(client.store)
    assert (empty.used_bytes.value, empty.inodes_used.value) == du_and_find(client.store)

    client.pull("virtlet.cloud/srv/small.qcow2")
    client.pull("virtlet.cloud/srv/disk.raw")
    usage = client.fsinfo()
    assert (usage.used_bytes.value, usage.inodes_used.value) == du_and_find(client.store)
    assert usage.used_bytes.value - empty.used_bytes.value >= raw_disk.stat().st_size
    assert usage.inodes_used.value >= empty.inodes_used.value + 2
    assert usage.timestamp > empty.timestamp


def test_unknown_prefix_and_ambiguity_rules(client, small):
    ref = client.pull("virtlet.cloud/srv/small.qcow2")
    other = "0" if ref[7] != "0" else "1"
    assert not client.status(other * 10).HasField("image")
    client.remove(other * 10)  # unknown: fine
    assert client.status(ref).image.id == ref
    assert not client.status("not-a-ref!").HasField("image")  # cannot be an image of vmlet's: absent
    with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "neither"):
        client.remove("not-a-ref!")
