"""disk.img on a filesystem volume: created sparse at its capacity, an existing one used as it is and never
written, hostile ones (symlinks, directories, fifos, devices, qcow2 that is not self-contained) refused, and
the format fixed by the record whatever the guest writes into its disk. Real qemu-img, real files."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from cri_shim.storage import volume_image as vi
from image_service.validate import Validator
from tests.integration.storage.conftest import MIB, make_image, run, sha256_of

IMG = vi.IMAGE_NAME


def record_of(volume):
    return json.loads((volume / vi.RECORD_NAME).read_text())


def assert_nothing_made(volume, *allowed):
    assert sorted(p.name for p in volume.iterdir()) == sorted(allowed)


# ---------------------------------------------------------------- creating

def test_absent_disk_is_created_sparse_raw_at_capacity_rounded_up_to_a_mib(volume):
    capacity = 10 * MIB + 1
    got = vi.ensure(volume, capacity)
    path = volume / IMG
    assert got == vi.VolumeImage(path, "raw", 11 * MIB, created=True)
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11 * MIB
    assert st.st_blocks * 512 <= 64 * 1024, "created sparse: no data block written"
    assert record_of(volume) == {"format": "raw", "createdBy": "vmlet"}
    assert_nothing_made(volume, IMG, vi.RECORD_NAME)  # no temp file left
    # qemu-img agrees on what it is
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", str(path)))
    assert info["virtual-size"] == 11 * MIB


def test_second_ensure_uses_the_disk_it_created(volume):
    first = vi.ensure(volume, 4 * MIB)
    (volume / IMG).write_bytes(b"guest data" + bytes(4 * MIB - 10))  # what a guest left on it
    before = sha256_of(volume / IMG)
    again = vi.ensure(volume, 64 * MIB)  # another capacity does not resize an existing disk
    assert again == vi.VolumeImage(first.path, "raw", 4 * MIB, created=False)
    assert sha256_of(volume / IMG) == before


def test_default_capacity_is_the_file_system_less_kubevirts_overhead(small_fs):
    d = small_fs(64)
    st = os.statvfs(d)
    fs = st.f_blocks * st.f_frsize
    assert fs == 64 * MIB  # the tmpfs is the size asked for, so the expectation below is about vmlet
    expected = int(fs * (1 - vi.FS_OVERHEAD)) // MIB * MIB
    assert vi.default_capacity(d) == expected
    got = vi.ensure(d, None)
    assert got.virtual_size == expected and (d / IMG).stat().st_size == expected


def test_capacity_larger_than_the_file_system_is_refused_with_both_sizes(small_fs):
    d = small_fs(16)
    with pytest.raises(vi.CapacityError) as e:
        vi.ensure(d, 1024 * MIB)
    err = e.value
    assert err.requested == 1024 * MIB
    assert 0 < err.available <= 16 * MIB
    msg = str(err)
    assert str(d / IMG) in msg and str(err.requested) in msg and "1.0 GiB" in msg
    assert str(err.available) in msg and vi.human(err.available) in msg
    assert_nothing_made(d)


def test_capacity_of_what_is_left_after_other_files_is_refused(small_fs):
    d = small_fs(16)
    with open(d / "other", "wb") as f:
        f.write(os.urandom(10 * MIB))
    with pytest.raises(vi.CapacityError):
        vi.ensure(d, 8 * MIB)
    assert vi.ensure(d, 4 * MIB).created


@pytest.mark.parametrize("capacity", [0, -MIB])
def test_non_positive_capacity_is_an_error_naming_the_disk(volume, capacity):
    with pytest.raises(vi.VolumeImageError, match="capacity of .*disk.img"):
        vi.ensure(volume, capacity)
    assert_nothing_made(volume)


def test_leftover_create_temp_is_replaced(volume):
    (volume / vi.CREATE_TEMP).write_bytes(b"half made")
    assert vi.ensure(volume, MIB).created
    assert_nothing_made(volume, IMG, vi.RECORD_NAME)


def test_volume_must_be_a_directory(tmp_path, qemu_tools):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(vi.VolumeImageError, match="is not a directory"):
        vi.ensure(f, MIB)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(vi.VolumeImageError, match="is not a directory"):
        vi.ensure(link, MIB)  # the caller resolves; a symlink in its place is not followed
    with pytest.raises(vi.VolumeImageError, match="does not exist"):
        vi.ensure(tmp_path / "missing", MIB)


# ---------------------------------------------------------------- existing images

def test_existing_raw_is_used_as_it_is_and_never_written(volume):
    data = os.urandom(3 * MIB)
    (volume / IMG).write_bytes(data)
    st = (volume / IMG).stat()
    got = vi.ensure(volume, 100 * MIB)
    assert got == vi.VolumeImage(volume / IMG, "raw", len(data), created=False)
    after = (volume / IMG).stat()
    assert (volume / IMG).read_bytes() == data
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
    assert record_of(volume) == {"format": "raw"}  # the format is fixed; not "createdBy": vmlet did not make it


def test_existing_qcow2_is_used_as_it_is_and_never_written(volume, image_a):
    shutil.copy(image_a.path, volume / IMG)
    before = sha256_of(volume / IMG)
    got = vi.ensure(volume, None)
    assert got == vi.VolumeImage(volume / IMG, "qcow2", image_a.virtual_size, created=False)
    assert sha256_of(volume / IMG) == before
    assert record_of(volume) == {"format": "qcow2"}
    assert vi.inspect(volume) == got  # the recorded qcow2 is checked again, and still fine
    assert sha256_of(volume / IMG) == before


def test_inspect_of_a_volume_without_disk_is_none_and_makes_nothing(volume):
    assert vi.inspect(volume) is None
    assert_nothing_made(volume)


@pytest.mark.parametrize("size", [1000, 0])
def test_raw_of_a_size_no_disk_has_is_rejected(volume, size):
    (volume / IMG).write_bytes(os.urandom(size))
    with pytest.raises(vi.VolumeImageRejected, match="multiple of 512") as e:
        vi.ensure(volume, MIB)
    assert str(volume / IMG) in str(e.value)
    assert (volume / IMG).stat().st_size == size
    assert not (volume / vi.RECORD_NAME).exists()


# ---------------------------------------------------------------- hostile entries

def test_symlink_to_a_host_file_is_refused_and_the_file_untouched(volume):
    before = sha256_of(Path("/etc/passwd"))
    (volume / IMG).symlink_to("/etc/passwd")
    for call in (lambda: vi.ensure(volume, MIB), lambda: vi.inspect(volume), lambda: vi.open_image(volume)):
        with pytest.raises(vi.VolumeImageRejected, match="disk.img is a symlink"):
            call()
    assert sha256_of(Path("/etc/passwd")) == before
    assert (volume / IMG).is_symlink() and not (volume / vi.RECORD_NAME).exists()


def test_dangling_symlink_is_refused_not_created_through(volume, tmp_path):
    target = tmp_path / "outside.img"
    (volume / IMG).symlink_to(target)
    with pytest.raises(vi.VolumeImageRejected, match="symlink"):
        vi.ensure(volume, MIB)
    assert not target.exists()


def test_directory_is_refused(volume):
    (volume / IMG).mkdir()
    with pytest.raises(vi.VolumeImageRejected, match="is a directory"):
        vi.ensure(volume, MIB)
    with pytest.raises(vi.VolumeImageRejected, match="is a directory"):
        vi.open_image(volume)
    assert (volume / IMG).is_dir()


def test_fifo_is_refused_without_blocking(volume):
    os.mkfifo(volume / IMG)
    with pytest.raises(vi.VolumeImageRejected, match="is a fifo"):
        vi.ensure(volume, MIB)  # a blocking open of a fifo would hang here


def test_device_node_is_refused(volume):
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    os.mknod(volume / IMG, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    with pytest.raises(vi.VolumeImageRejected, match="is a character device"):
        vi.ensure(volume, MIB)
    with pytest.raises(vi.VolumeImageRejected, match="is a character device"):
        vi.open_image(volume)


@pytest.mark.parametrize("kind, reason", [
    ("backing-file", "backing file"),
    ("data-file", "external data file"),
    ("encrypted", "encrypted"),
    ("huge", "exceeds the limit"),
])
def test_qcow2_that_is_not_self_contained_is_refused(volume, hostile_images, kind, reason):
    shutil.copy(hostile_images[kind], volume / IMG)
    before = sha256_of(volume / IMG)
    with pytest.raises(vi.VolumeImageRejected) as e:
        vi.ensure(volume, MIB)
    assert reason in str(e.value) and str(volume / IMG) in str(e.value) and "as qcow2" in str(e.value)
    assert sha256_of(volume / IMG) == before
    assert not (volume / vi.RECORD_NAME).exists()  # refused: its format is not fixed


def test_recorded_qcow2_is_checked_again_each_time(volume, image_a, hostile_images):
    shutil.copy(image_a.path, volume / IMG)
    assert vi.ensure(volume, None).format == "qcow2"
    # Another pod rewrites it into a qcow2 with a backing file on the host.
    shutil.copy(hostile_images["backing-file"], volume / IMG)
    with pytest.raises(vi.VolumeImageRejected, match="backing file"):
        vi.ensure(volume, None)


def test_qemu_img_runs_under_the_validators_limits(volume, image_a):
    shutil.copy(image_a.path, volume / IMG)
    with pytest.raises(vi.VolumeImageRejected, match="exceeds the limit"):
        vi.ensure(volume, None, validator=Validator(max_virtual_size=4 * MIB))


def test_raw_disk_stays_raw_when_the_guest_writes_a_qcow2_header_into_it(volume, hostile_images):
    vi.ensure(volume, 4 * MIB)
    header = hostile_images["backing-file"].read_bytes()[:64 * 1024]
    with open(volume / IMG, "r+b") as f:  # as a guest writes its own disk: same file, same size
        f.write(header)
    assert (volume / IMG).read_bytes().startswith(b"QFI\xfb")
    got = vi.ensure(volume, None)
    assert got == vi.VolumeImage(volume / IMG, "raw", 4 * MIB, created=False)
    assert record_of(volume)["format"] == "raw"


def test_raw_without_record_is_raw_even_with_a_partition_table_or_nothing_at_all(volume):
    (volume / IMG).write_bytes(bytes(510) + b"\x55\xaa" + bytes(MIB - 512))
    assert vi.ensure(volume, None).format == "raw"


# ---------------------------------------------------------------- the record

def test_write_and_read_record_round_trip_atomically(volume):
    assert vi.read_record(volume) is None
    vi.write_record(volume, {"format": "raw", "root": {"imageDigest": "sha256:" + "0" * 64}})
    assert vi.read_record(volume) == {"format": "raw", "root": {"imageDigest": "sha256:" + "0" * 64}}
    vi.write_record(volume, {"format": "qcow2"})
    assert vi.read_record(volume) == {"format": "qcow2"}
    assert_nothing_made(volume, vi.RECORD_NAME)  # no temp left


def test_record_symlink_is_refused_and_replaced_not_written_through(volume, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"format": "qcow2"}')
    (volume / vi.RECORD_NAME).symlink_to(outside)
    with pytest.raises(vi.VolumeImageRejected, match="symlink"):
        vi.read_record(volume)
    vi.write_record(volume, {"format": "raw"})
    assert outside.read_text() == '{"format": "qcow2"}'
    assert not (volume / vi.RECORD_NAME).is_symlink() and vi.read_record(volume) == {"format": "raw"}


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"format": "vmdk"}', b"{" + b" " * (65 * 1024)])
def test_record_that_is_not_vmlets_is_an_error_naming_it(volume, content):
    (volume / vi.RECORD_NAME).write_bytes(content)
    (volume / IMG).write_bytes(bytes(MIB))
    with pytest.raises(vi.VolumeImageRejected) as e:
        vi.ensure(volume, MIB)
    assert str(volume / vi.RECORD_NAME) in str(e.value)
    assert (volume / vi.RECORD_NAME).read_bytes() == content


def test_write_record_refuses_an_unknown_format(volume):
    with pytest.raises(ValueError, match="format"):
        vi.write_record(volume, {"format": "vmdk"})
    assert_nothing_made(volume)


# ---------------------------------------------------------------- open_image

def test_open_image_is_an_o_path_fd_of_the_regular_file(volume):
    vi.ensure(volume, MIB)
    fd = vi.open_image(volume)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and st.st_ino == (volume / IMG).stat().st_ino
    finally:
        os.close(fd)


def test_open_image_of_a_volume_without_disk_is_an_error(volume):
    with pytest.raises(vi.VolumeImageError, match="does not exist"):
        vi.open_image(volume)


def test_a_large_qcow2_of_sparse_data_is_accepted_without_reading_it_all(volume, tmp_path):
    img = make_image(tmp_path / "big.qcow2", "64G", [(0x11, 32 * 1024 ** 3, MIB)])
    shutil.copy(img.path, volume / IMG)
    got = vi.ensure(volume, None)
    assert got.format == "qcow2" and got.virtual_size == 64 * 1024 ** 3


def test_hostile_names_elsewhere_in_the_volume_are_not_touched(volume):
    (volume / "lost+found").mkdir()
    (volume / "other.img").symlink_to("/etc/shadow")
    vi.ensure(volume, MIB)
    assert (volume / "other.img").is_symlink() and (volume / "lost+found").is_dir()
