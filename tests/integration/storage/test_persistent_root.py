"""The persistent root, on a filesystem volume (disk.img) and on a block device (a loop device): imported
once when blank, then used; another image's digest refused unless re-imaging; a user's own disk used as it
is; a crash at each crashpoint (a child SIGKILLed there) followed by a call that imports again and ends
consistent, while a file that merely has the import's temp name never re-images anything; a damaged block
header refused; a claim's real ext4 holding the root; two imports of one volume taking turns. What the guest
would see is compared with the image by `qemu-img compare`."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import signal
import struct
import time
import zlib

import pytest

from cri_shim.storage import persistent_root as pr
from cri_shim.storage import volume_image as vi
from tests.integration.storage.conftest import MIB, compare, crash_at, make_image, raw_opts, run, sha256_of
from vmapi.storage import disk_capacity

IMG = vi.IMAGE_NAME
GIB = 1024 * MIB
BLOCK_POINTS = ("root.import.after-convert", "root.import.after-record")
FILE_POINTS = (*BLOCK_POINTS, "root.import.after-rename")


def file_root(volume, img, *, capacity=32 * MIB, reimage=False, **kw):
    return pr.prepare_file_root(volume, base=img.path, base_format=img.format, digest=img.digest,
                                image=f"virtlet.cloud/{img.path.stem}", capacity=capacity, reimage=reimage, **kw)


def block_root(device, img, *, reimage=False):
    return pr.prepare_block_root(device, base=img.path, base_format=img.format, digest=img.digest,
                                 image=f"virtlet.cloud/{img.path.stem}", reimage=reimage)


def file_kwargs(volume, img, *, capacity=32 * MIB, reimage=False):
    return dict(volume_dir=volume, base=img.path, base_format=img.format, digest=img.digest,
                image=f"virtlet.cloud/{img.path.stem}", capacity=capacity, reimage=reimage)


def block_kwargs(device, img, *, reimage=False):
    return dict(device=device, base=img.path, base_format=img.format, digest=img.digest,
                image=f"virtlet.cloud/{img.path.stem}", reimage=reimage)


def assert_file_holds(volume, img, capacity=32 * MIB):
    path = volume / IMG
    assert path.stat().st_size == capacity
    cmp = compare(img, raw_opts(path))
    assert cmp.returncode == 0, f"{path} is not the image {img.path}: {cmp.stdout}{cmp.stderr}"
    record = vi.read_record(volume)
    assert record["format"] == "raw" and record["root"]["imageDigest"] == img.digest
    assert record["root"]["image"] == f"virtlet.cloud/{img.path.stem}" and record["root"]["state"] == "ready"
    at = datetime.datetime.fromisoformat(record["root"]["importedAt"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - at).total_seconds()) < 600
    assert not (volume / pr.IMPORT_TEMP).exists()


def assert_block_holds(device, img):
    size = _dev_size(device)
    cmp = compare(img, raw_opts(device, pr.HEADER_SIZE, size - pr.HEADER_SIZE, block=True))
    assert cmp.returncode == 0, f"{device}'s slice is not the image {img.path}: {cmp.stdout}{cmp.stderr}"
    header = pr.read_block_header(device)
    assert header is not None and header["imageDigest"] == img.digest
    assert header["image"] == f"virtlet.cloud/{img.path.stem}"
    with open(device, "rb") as f:
        first = f.read(pr.HEADER_SIZE)
    assert first[pr.HEADER_BLOCK:] == bytes(pr.HEADER_SIZE - pr.HEADER_BLOCK), "the rest of the first MiB is zero"


def _dev_size(device) -> int:
    with open(device, "rb") as f:
        return f.seek(0, os.SEEK_END)


def device_sha(device) -> str:
    return sha256_of(device)


# ---------------------------------------------------------------- file root

def test_file_root_first_import_is_the_image_grown_to_capacity(volume, image_a):
    got = file_root(volume, image_a)
    assert got == pr.RootDisk(volume / IMG, "raw", 0, None, imported=True, digest=image_a.digest)
    assert_file_holds(volume, image_a)
    assert (volume / IMG).stat().st_blocks * 512 < 8 * MIB, "grown sparse, holes not written"


def test_file_root_second_call_does_not_import_again(volume, image_a):
    file_root(volume, image_a)
    st, sha = (volume / IMG).stat(), sha256_of(volume / IMG)
    got = file_root(volume, image_a)
    assert got == pr.RootDisk(volume / IMG, "raw", 0, None, imported=False, digest=image_a.digest)
    again = (volume / IMG).stat()
    assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns) and sha256_of(volume / IMG) == sha


def test_file_root_default_capacity_is_the_volumes(small_fs, image_a):
    d = small_fs(64)
    got = file_root(d, image_a, capacity=None)
    assert got.imported and (d / IMG).stat().st_size == vi.default_capacity(d)


def test_file_root_of_another_digest_is_refused_naming_both(volume, image_a, image_b):
    file_root(volume, image_a)
    sha = sha256_of(volume / IMG)
    with pytest.raises(pr.RootDigestMismatch) as e:
        file_root(volume, image_b)
    assert (e.value.recorded, e.value.wanted) == (image_a.digest, image_b.digest)
    msg = str(e.value)
    assert image_a.digest in msg and image_b.digest in msg and "vmlet.dev/root-reimage" in msg
    assert sha256_of(volume / IMG) == sha


def test_file_root_reimage_writes_the_new_image_then_is_idempotent(volume, image_a, image_b):
    file_root(volume, image_a)
    got = file_root(volume, image_b, reimage=True)
    assert got.imported and got.digest == image_b.digest
    assert_file_holds(volume, image_b)
    st = (volume / IMG).stat()
    again = file_root(volume, image_b, reimage=True)  # the annotation left on does nothing more
    assert not again.imported and (volume / IMG).stat().st_mtime_ns == st.st_mtime_ns


def test_file_root_users_own_disk_is_used_as_it_is(volume, image_a):
    data = b"user's own filesystem" + os.urandom(4 * MIB - 21)
    (volume / IMG).write_bytes(data)
    got = file_root(volume, image_a)
    assert got == pr.RootDisk(volume / IMG, "raw", 0, None, imported=False, digest=None)
    assert (volume / IMG).read_bytes() == data
    got = file_root(volume, image_a, reimage=True)
    assert got.imported and got.digest == image_a.digest
    assert_file_holds(volume, image_a)


def test_file_root_users_own_qcow2_is_used_as_qcow2(volume, image_a, image_b):
    shutil.copy(image_b.path, volume / IMG)
    got = file_root(volume, image_a)
    assert got == pr.RootDisk(volume / IMG, "qcow2", 0, None, imported=False, digest=None)
    assert sha256_of(volume / IMG) == image_b.digest.removeprefix("sha256:")


def test_file_root_hostile_users_disk_is_refused(volume, image_a, hostile_images):
    shutil.copy(hostile_images["backing-file"], volume / IMG)
    with pytest.raises(vi.VolumeImageRejected, match="backing file"):
        file_root(volume, image_a)
    (volume / IMG).unlink()
    (volume / IMG).symlink_to("/etc/passwd")
    for reimage in (False, True):
        with pytest.raises(vi.VolumeImageRejected, match="symlink"):
            file_root(volume, image_a, reimage=reimage)
    assert (volume / IMG).is_symlink() and not (volume / pr.IMPORT_TEMP).exists()


def test_file_root_capacity_below_the_image_is_refused(volume, image_a):
    with pytest.raises(pr.RootTooSmall) as e:
        file_root(volume, image_a, capacity=4 * MIB)
    assert (e.value.needed, e.value.available) == (image_a.virtual_size, 4 * MIB)
    assert str(volume / IMG) in str(e.value)
    assert list(volume.iterdir()) == []


def test_file_root_larger_than_the_file_system_is_refused(small_fs, image_a):
    d = small_fs(16)
    with pytest.raises(vi.CapacityError) as e:
        file_root(d, image_a, capacity=64 * MIB)
    assert e.value.requested == 64 * MIB and e.value.available <= 16 * MIB
    assert list(d.iterdir()) == []


def test_file_root_planted_temp_symlink_is_removed_not_written_through(volume, image_a, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"host file")
    (volume / pr.IMPORT_TEMP).symlink_to(outside)
    assert file_root(volume, image_a).imported
    assert outside.read_bytes() == b"host file"
    assert_file_holds(volume, image_a)


def test_file_root_truncated_leftover_temp_is_deleted_and_the_import_redone(volume, image_a):
    (volume / pr.IMPORT_TEMP).write_bytes(b"half a convert")
    assert file_root(volume, image_a).imported
    assert_file_holds(volume, image_a)


def test_file_root_a_file_at_the_import_temps_name_does_not_reimage_a_live_root(volume, image_a):
    file_root(volume, image_a)
    with open(volume / IMG, "r+b") as f:  # the guest's data on its root
        f.seek(20 * MIB)
        f.write(b"guest data")
    sha = sha256_of(volume / IMG)
    (volume / pr.IMPORT_TEMP).write_bytes(b"anyone can make a file of this name")
    got = file_root(volume, image_a)
    assert got == pr.RootDisk(volume / IMG, "raw", 0, None, imported=False, digest=image_a.digest)
    assert sha256_of(volume / IMG) == sha and not (volume / pr.IMPORT_TEMP).exists()


def test_file_root_record_of_an_earlier_vmlet_without_state_is_an_imported_root(volume, image_a):
    file_root(volume, image_a)
    record = vi.read_record(volume)
    del record["root"]["state"]
    vi.write_record(volume, record)
    st = (volume / IMG).stat()
    assert not file_root(volume, image_a).imported
    assert (volume / IMG).stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("point", FILE_POINTS)
def test_file_root_crash_then_the_next_call_imports_and_ends_consistent(volume, image_a, point):
    proc = crash_at(point, "prepare_file_root", **file_kwargs(volume, image_a))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    renamed = point == "root.import.after-rename"
    assert (volume / pr.IMPORT_TEMP).exists() != renamed and (volume / IMG).exists() == renamed
    if point != "root.import.after-convert":
        assert vi.read_record(volume)["root"]["state"] == "importing"
    got = file_root(volume, image_a)
    assert got.imported and got.digest == image_a.digest
    assert_file_holds(volume, image_a)


@pytest.mark.parametrize("point", FILE_POINTS)
def test_file_root_crash_while_reimaging_is_redone_even_without_the_annotation(volume, image_a, image_b, point):
    file_root(volume, image_a)
    proc = crash_at(point, "prepare_file_root", **file_kwargs(volume, image_b, reimage=True))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if point == "root.import.after-convert":
        # nothing recorded yet: the old root is whole, and without the annotation it is refused as before
        with pytest.raises(pr.RootDigestMismatch):
            file_root(volume, image_b)
        got = file_root(volume, image_b, reimage=True)
    else:
        # recorded as importing image_b: disk.img is still image_a (or image_b, not yet recorded ready)
        with pytest.raises(pr.RootDigestMismatch, match="interrupted re-image"):
            file_root(volume, image_a)
        got = file_root(volume, image_b)
    assert got.imported
    assert_file_holds(volume, image_b)


def test_file_root_crash_child_without_crashpoint_returns(volume, image_a):
    proc = crash_at("no.such.point", "prepare_file_root", **file_kwargs(volume, image_a))
    assert proc.returncode == 0 and "returned" in proc.stdout, proc.stderr
    assert_file_holds(volume, image_a)


# ---------------------------------------------------------------- block root

def test_block_root_first_import_is_the_image_from_the_header_on(block_volume, image_a):
    dev = block_volume(32 * MIB)
    got = block_root(dev, image_a)
    assert got == pr.RootDisk(dev, "raw", pr.HEADER_SIZE, 31 * MIB, imported=True, digest=image_a.digest)
    assert_block_holds(dev, image_a)


def test_block_root_second_call_does_not_import_again(block_volume, image_a):
    dev = block_volume(32 * MIB)
    block_root(dev, image_a)
    sha = device_sha(dev)
    got = block_root(dev, image_a)
    assert got == pr.RootDisk(dev, "raw", pr.HEADER_SIZE, 31 * MIB, imported=False, digest=image_a.digest)
    assert device_sha(dev) == sha


def test_block_root_of_another_digest_is_refused_naming_both(block_volume, image_a, image_b):
    dev = block_volume(32 * MIB)
    block_root(dev, image_a)
    sha = device_sha(dev)
    with pytest.raises(pr.RootDigestMismatch) as e:
        block_root(dev, image_b)
    assert (e.value.recorded, e.value.wanted) == (image_a.digest, image_b.digest)
    assert image_a.digest in str(e.value) and image_b.digest in str(e.value)
    assert "vmlet.dev/root-reimage" in str(e.value) and str(dev) in str(e.value)
    assert device_sha(dev) == sha


def test_block_root_reimage_writes_the_new_image(block_volume, image_a, image_b):
    dev = block_volume(32 * MIB)
    block_root(dev, image_a)
    got = block_root(dev, image_b, reimage=True)
    assert got.imported and got.digest == image_b.digest
    assert_block_holds(dev, image_b)
    sha = device_sha(dev)
    assert not block_root(dev, image_b, reimage=True).imported
    assert device_sha(dev) == sha


def test_block_root_users_own_disk_is_used_whole(block_volume, image_a):
    dev = block_volume(32 * MIB)
    with open(dev, "r+b") as f:  # a user's disk: a boot sector and data
        f.write(bytes(446) + os.urandom(64) + b"\x55\xaa")
        f.seek(8 * MIB)
        f.write(os.urandom(MIB))
    sha = device_sha(dev)
    assert pr.read_block_header(dev) is None
    got = block_root(dev, image_a)
    assert got == pr.RootDisk(dev, "raw", 0, None, imported=False, digest=None)
    assert device_sha(dev) == sha
    got = block_root(dev, image_a, reimage=True)
    assert got.imported and got.offset == pr.HEADER_SIZE
    assert_block_holds(dev, image_a)


def test_block_root_image_bigger_than_the_device_is_refused(block_volume, image_a):
    dev = block_volume(image_a.virtual_size)  # the header's MiB does not fit as well
    sha = device_sha(dev)
    with pytest.raises(pr.RootTooSmall) as e:
        block_root(dev, image_a)
    assert (e.value.needed, e.value.available) == (image_a.virtual_size, image_a.virtual_size - pr.HEADER_SIZE)
    assert str(dev) in str(e.value)
    assert device_sha(dev) == sha


def test_block_root_exactly_the_image_plus_header_fits(block_volume, image_a):
    dev = block_volume(image_a.virtual_size + pr.HEADER_SIZE)
    assert block_root(dev, image_a).size == image_a.virtual_size
    assert_block_holds(dev, image_a)


def test_block_root_must_be_a_block_device(tmp_path, image_a):
    f = tmp_path / "not-a-device"
    f.write_bytes(bytes(32 * MIB))
    with pytest.raises(pr.RootError, match="not a block device"):
        block_root(f, image_a)
    assert f.read_bytes() == bytes(32 * MIB)
    with pytest.raises(pr.RootError, match="cannot stat"):
        block_root(tmp_path / "missing", image_a)


@pytest.mark.parametrize("point", BLOCK_POINTS)
def test_block_root_crash_then_the_next_call_ends_consistent(block_volume, image_a, point):
    dev = block_volume(32 * MIB)
    proc = crash_at(point, "prepare_block_root", **block_kwargs(dev, image_a))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    header = pr.read_block_header(dev)
    got = block_root(dev, image_a)
    if point == "root.import.after-convert":
        assert header is None, "no header before the image is known written"
        assert got.imported
    else:
        assert header["imageDigest"] == image_a.digest
        assert not got.imported
    assert_block_holds(dev, image_a)


def test_block_root_crash_while_reimaging_leaves_a_blank_header(block_volume, image_a, image_b):
    dev = block_volume(32 * MIB)
    block_root(dev, image_a)
    proc = crash_at("root.import.after-convert", "prepare_block_root", **block_kwargs(dev, image_b, reimage=True))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert pr.read_block_header(dev) is None  # the old header went first
    got = block_root(dev, image_b)  # blank now: imported without the annotation
    assert got.imported
    assert_block_holds(dev, image_b)


def _damage(kind: str, block: bytearray) -> None:
    at = len(pr.HEADER_MAGIC) + 4  # after magic and version: length, crc32, JSON
    if kind == "json":
        block[at + 8 + 10:at + 8 + 110] = bytes(100)  # the JSON cut short
    elif kind == "crc":
        block[at + 4:at + 8] = struct.pack(">I", (struct.unpack_from(">I", block, at + 4)[0] + 1) % 2**32)
    elif kind == "length":
        block[at:at + 4] = struct.pack(">I", pr.HEADER_BLOCK)
    else:  # a valid crc over JSON that is not vmlet's record
        body = b"[1]"
        block[at:at + 8 + len(body)] = struct.pack(">II", len(body), zlib.crc32(body)) + body


@pytest.mark.parametrize("kind", ["json", "crc", "length", "not-a-record"])
def test_block_root_damaged_header_is_refused_unless_reimage(block_volume, image_a, kind):
    dev = block_volume(32 * MIB)
    block_root(dev, image_a)
    with open(dev, "r+b") as f:
        block = bytearray(f.read(pr.HEADER_BLOCK))
        _damage(kind, block)
        f.seek(0)
        f.write(block)
    sha = device_sha(dev)
    for call in (lambda: block_root(dev, image_a), lambda: pr.read_block_header(dev)):
        with pytest.raises(pr.RootHeaderDamaged) as e:
            call()
        msg = str(e.value)
        assert f"damaged vmlet header on {dev}" in msg and "vmlet.dev/root-reimage" in msg
    assert device_sha(dev) == sha, "not imported over"
    assert block_root(dev, image_a, reimage=True).imported
    assert_block_holds(dev, image_a)


def test_block_root_header_of_an_unknown_version_is_an_error(block_volume, image_a):
    dev = block_volume(32 * MIB)
    with open(dev, "r+b") as f:
        f.write(pr.HEADER_MAGIC + (pr.HEADER_VERSION + 1).to_bytes(4, "big"))
    with pytest.raises(pr.RootError, match="version 2"):
        block_root(dev, image_a)


def test_block_root_mounted_device_is_refused(block_volume, image_a, tmp_path):
    dev = block_volume(32 * MIB)
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 missing")
    run("mkfs.ext4", "-q", str(dev))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", str(dev), str(mnt))
    try:
        with pytest.raises(pr.RootError, match="in use"):
            block_root(dev, image_a, reimage=True)
    finally:
        run("umount", str(mnt))


def test_block_root_of_a_larger_image_with_holes_imports_only_data(block_volume, tmp_path):
    img = make_image(tmp_path / "holes.qcow2", "48M", [(0x77, 40 * MIB, MIB)])
    dev = block_volume(64 * MIB)
    with open(dev, "r+b") as f:  # old data inside the image's range: the guest must see the image's zeros
        f.seek(pr.HEADER_SIZE + 20 * MIB)
        f.write(b"\xff" * MIB)
    assert block_root(dev, img).imported
    assert_block_holds(dev, img)


def test_header_fits_its_block_whatever_the_image_name(block_volume, image_a):
    dev = block_volume(32 * MIB)
    pr.prepare_block_root(dev, base=image_a.path, base_format="qcow2", digest=image_a.digest,
                          image="virtlet.cloud/" + "x" * 10000, reimage=False)
    header = pr.read_block_header(dev)
    assert header["imageDigest"] == image_a.digest and len(header["image"]) == pr.MAX_IMAGE_NAME


# ---------------------------------------------------------------- a claim's real ext4

def test_file_root_on_a_claims_ext4_of_the_rendered_capacity(ext4_fs, image_a):
    d = ext4_fs(GIB)
    rendered = disk_capacity(GIB)
    got = file_root(d, image_a, capacity=rendered)
    assert got.imported
    assert_file_holds(d, image_a, capacity=rendered)


def test_file_root_default_capacity_fits_a_claims_ext4(ext4_fs, image_a):
    d = ext4_fs(GIB)
    expected = vi.default_capacity(d)
    assert file_root(d, image_a, capacity=None).imported
    assert_file_holds(d, image_a, capacity=expected)


def test_file_root_of_the_whole_claim_is_shrunk_to_the_free_space(ext4_fs, image_a):
    d = ext4_fs(GIB)
    st = os.statvfs(d)
    free = st.f_bfree * st.f_frsize
    assert file_root(d, image_a, capacity=GIB).imported
    assert_file_holds(d, image_a, capacity=free // MIB * MIB)


def test_file_root_beyond_the_toleration_is_refused(ext4_fs, image_a):
    d = ext4_fs(GIB)
    with pytest.raises(vi.CapacityError) as e:
        file_root(d, image_a, capacity=2 * GIB)
    assert e.value.requested == 2 * GIB and "import the image into" in str(e.value)
    assert sorted(p.name for p in d.iterdir()) == ["lost+found"]


def test_file_root_shrunk_below_the_image_is_too_small(ext4_fs, tmp_path):
    d = ext4_fs(GIB)
    img = make_image(tmp_path / "gib.qcow2", "1G", [(0x42, 0, MIB)])
    st = os.statvfs(d)
    with pytest.raises(pr.RootTooSmall) as e:
        file_root(d, img, capacity=GIB)  # shrunk to the free space, which is less than the image
    assert (e.value.needed, e.value.available) == (GIB, st.f_bfree * st.f_frsize // MIB * MIB)
    assert sorted(p.name for p in d.iterdir()) == ["lost+found"]


# ---------------------------------------------------------------- one import per volume

@pytest.fixture
def image_big(tmp_path, qemu_tools):
    """128 MiB of data: an import that takes long enough (about a third of a second here) to be raced."""
    return make_image(tmp_path / "big.qcow2", "160M", [(0x42, 0, 128 * MIB)])


def test_file_root_waits_for_the_volumes_lock(volume, image_a, spawn):
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        child = spawn("prepare_file_root", **file_kwargs(volume, image_a))
        time.sleep(1.5)
        assert child.poll() is None, f"the import did not wait for the lock: {child.communicate()}"
        assert list(volume.iterdir()) == []
    finally:
        os.close(fd)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and '"imported": true' in out, err
    assert_file_holds(volume, image_a)


def test_two_imports_of_one_volume_take_turns(volume, image_big, spawn):
    # Both wait on the lock we hold, then race for it: one imports, the other finds the import done.
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        children = [spawn("prepare_file_root", **file_kwargs(volume, image_big, capacity=256 * MIB))
                    for _ in range(2)]
    finally:
        os.close(fd)
    outs = [c.communicate(timeout=300) for c in children]
    assert all(c.returncode == 0 for c in children), outs
    imported = sorted('"imported": true' in out for out, _ in outs)
    assert imported == [False, True], outs
    assert_file_holds(volume, image_big, capacity=256 * MIB)


def test_file_root_disk_img_made_by_someone_else_during_the_import_is_not_imported_over(volume, image_big, spawn):
    child = spawn("prepare_file_root", **file_kwargs(volume, image_big, capacity=256 * MIB))
    deadline = time.monotonic() + 60
    while not (volume / pr.IMPORT_TEMP).exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    theirs = os.urandom(MIB)
    fd = os.open(volume / IMG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # fails if the import won the race
    with os.fdopen(fd, "wb") as f:
        f.write(theirs)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 3 and "appeared while vmlet was creating it" in out, (out, err)
    assert vi.read_record(volume) is None, "the import's record is taken back"
    got = file_root(volume, image_big, capacity=256 * MIB)
    assert got == pr.RootDisk(volume / IMG, "raw", 0, None, imported=False, digest=None)  # a user's own disk
    assert (volume / IMG).read_bytes() == theirs


def test_root_record_in_the_volume_is_json_with_the_digest(volume, image_a):
    file_root(volume, image_a)
    record = json.loads((volume / vi.RECORD_NAME).read_text())
    assert record["root"]["imageDigest"] == image_a.digest and record["createdBy"] == "vmlet"
