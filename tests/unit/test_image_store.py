"""The content-addressed store and its metadata, directly (the gRPC tests drive it end to end)."""

import hashlib
import os
import subprocess

import pytest

from image_service.errors import ImageNotFound, InvalidName
from image_service.names import parse
from image_service.store import Store


def put(store: Store, data: bytes, name: str, image_id: str | None = None):
    image_id = image_id or hashlib.sha256(data).hexdigest()
    with store.new_temp() as temp:
        temp.file.write(data)
        temp.sync()
        return store.add(temp, image_id, len(data), "raw", len(data), "https://x/" + name, parse(name))


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "images")
    yield s
    s.close()


def test_add_lookup_and_refs(store):
    img = put(store, b"one", "virtlet.cloud/a")
    assert img.tags == ["virtlet.cloud/a:latest"]
    assert img.digests == [f"virtlet.cloud/a@sha256:{img.id}"]
    for ref in ("virtlet.cloud/a", "virtlet.cloud/a:latest", f"virtlet.cloud/a@sha256:{img.id}",
                f"sha256:{img.id}", img.id, img.id[:8], f"sha256:{img.id[:8]}"):
        assert store.get(ref).id == img.id, ref
    assert store.get("virtlet.cloud/a:other") is None
    assert store.get("virtlet.cloud/b") is None
    assert store.path(img.id).read_bytes() == b"one"
    assert oct(store.path(img.id).stat().st_mode & 0o777) == "0o644"
    assert list(store.tmp.iterdir()) == []


def test_same_content_under_two_names_is_one_image(store):
    a = put(store, b"same", "virtlet.cloud/a")
    b = put(store, b"same", "virtlet.cloud/b:v1")
    assert a.id == b.id
    assert sorted(store.get(a.id).tags) == ["virtlet.cloud/a:latest", "virtlet.cloud/b:v1"]
    assert len(store.list()) == 1


def test_a_tag_moves_when_its_content_changes(store):
    old = put(store, b"v1", "virtlet.cloud/a")
    new = put(store, b"v2", "virtlet.cloud/a")
    assert store.get("virtlet.cloud/a").id == new.id
    assert store.get(old.id).tags == []  # still there, by id and digest, untagged
    assert store.get(f"virtlet.cloud/a@sha256:{old.id}").id == old.id


def test_ambiguous_prefix_and_bad_refs(store):
    put(store, b"x", "virtlet.cloud/a", image_id="ab" + "0" * 62)
    put(store, b"y", "virtlet.cloud/b", image_id="ab" + "1" * 62)
    with pytest.raises(InvalidName, match="ambiguous"):
        store.get("ab")
    assert store.get("ab0").tags == ["virtlet.cloud/a:latest"]
    for bad in ("../../etc/passwd", "sha256:../x", "ABC", "sha256:", "virtlet.cloud/../x"):
        with pytest.raises(InvalidName):
            store.get(bad)
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_holders_keep_a_removed_image_until_the_last_release(store):
    img = put(store, b"vm disk", "virtlet.cloud/a")
    path = store.acquire("virtlet.cloud/a", "vm-1")
    assert path == store.path(img.id)
    store.acquire(img.id, "vm-2")
    store.remove(img.id)
    assert store.get(img.id) is None and store.list() == []
    assert store.holdings() == [(img.id, "vm-1"), (img.id, "vm-2")]  # still visible to the shim's recovery
    store.release(f"sha256:{img.id}", "vm-1")
    assert path.exists()
    store.release_holder("vm-2")
    assert not path.exists()
    with pytest.raises(ImageNotFound):
        store.acquire(img.id, "vm-3")
    store.release(img.id, "vm-3")  # unknown: no error


def test_restart_keeps_metadata_and_holders_and_repairs_crash_leftovers(tmp_path):
    s = Store(tmp_path / "images")
    kept = put(s, b"kept", "virtlet.cloud/kept")
    held = put(s, b"held", "virtlet.cloud/held")
    gone = put(s, b"gone", "virtlet.cloud/gone")
    s.acquire(held.id, "vm-1")
    s.remove(held.id)
    s.close()
    # A crash leaves: a partial download, a file renamed into place without its row, a row without its file.
    (tmp_path / "images/tmp/pull-partial").write_bytes(b"partial")
    orphan = tmp_path / "images/sha256" / ("f" * 64)
    orphan.write_bytes(b"orphan")
    (tmp_path / "images/sha256" / gone.id).unlink()

    s = Store(tmp_path / "images")
    try:
        assert [i.id for i in s.list()] == [kept.id]
        assert s.get("virtlet.cloud/kept").tags == ["virtlet.cloud/kept:latest"]
        assert s.get("virtlet.cloud/gone") is None
        assert not orphan.exists() and list(s.tmp.iterdir()) == []
        assert s.path(held.id).exists()  # removed but still held across the restart
        s.release(held.id, "vm-1")
        assert not s.path(held.id).exists()
    finally:
        s.close()


def test_one_store_one_owner(store):
    with pytest.raises(RuntimeError, match="in use by another process"):
        Store(store.root)


def test_usage_counts_allocated_bytes_and_inodes_like_du_and_find(store):
    put(store, os.urandom(300_000), "virtlet.cloud/a")
    used, inodes = store.usage()
    du = int(subprocess.run(["du", "-sB1", str(store.root)], capture_output=True, text=True).stdout.split()[0])
    found = len(subprocess.run(["find", str(store.root)], capture_output=True, text=True).stdout.splitlines())
    assert (used, inodes) == (du, found)
    assert used >= 300_000


def test_failed_download_leaves_no_temp_file(store):
    with pytest.raises(RuntimeError), store.new_temp() as temp:
        temp.file.write(b"partial")
        raise RuntimeError("download failed")
    assert list(store.tmp.iterdir()) == []


def test_huge_refs_are_echoed_shortened(store):
    huge = "x" * 65536
    with pytest.raises(InvalidName) as e:
        store.get(huge)
    assert "is neither a virtlet.cloud/ image name nor an image id" in str(e.value)
    assert "…(65536 chars)" in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(ImageNotFound) as e:
        store.acquire("virtlet.cloud/" + "a" * 240 + ":" + "t" * 128, "vm-1")  # the longest valid name
    assert "is not in the store" in str(e.value) and len(str(e.value)) < 200
