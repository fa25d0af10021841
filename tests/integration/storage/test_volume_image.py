"""disk.img on a filesystem volume: created sparse at its capacity (fitted to a claim's real ext4 with
KubeVirt's toleration), an existing one used as it is and never written, hostile ones (symlinks, directories,
fifos, devices, qcow2 that is not self-contained) refused, the format fixed by the record whatever the guest
writes into its disk, read-only volumes never written, the fd handed out the very inode checked, one call
per volume at a time, crash leftovers cleaned up. Real qemu-img, real files, real ext4 on loop devices."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest

from cri_shim.storage import volume_image as vi
from image_service.validate import Validator
from tests.integration.storage.conftest import MIB, SwapAfterCheck, crash_at, make_image, qemu_info, run, sha256_of
from vmapi.storage import disk_capacity

GIB = 1024 * MIB

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
    for call in (lambda: vi.ensure(volume, MIB), lambda: vi.inspect(volume), lambda: vi.open_checked(volume)):
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
        vi.open_checked(volume)
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
        vi.open_checked(volume)


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


# ---------------------------------------------------------------- one inode from check to use

def test_open_checked_is_an_o_path_fd_of_the_regular_file(volume):
    vi.ensure(volume, MIB)
    fd, got = vi.open_checked(volume)
    try:
        assert got == vi.VolumeImage(volume / IMG, "raw", MIB, created=False)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and st.st_ino == (volume / IMG).stat().st_ino
    finally:
        os.close(fd)


def test_open_checked_of_a_volume_without_disk_is_an_error(volume):
    with pytest.raises(vi.VolumeImageError, match="does not exist"):
        vi.open_checked(volume)
    assert_nothing_made(volume)


def test_the_fd_is_the_inode_checked_when_a_hostile_qcow2_is_renamed_in_during_the_check(
        volume, tmp_path, image_a, hostile_images):
    shutil.copy(image_a.path, volume / IMG)
    checked = (volume / IMG).stat().st_ino
    hostile = tmp_path / "hostile.qcow2"
    for call in (lambda v: vi.open_checked(volume, validator=v), lambda v: vi.ensure_open(volume, None, validator=v)):
        shutil.copy(hostile_images["data-file"], volume / "incoming")
        fd, got = call(SwapAfterCheck(swap=(volume / "incoming", volume / IMG)))
        try:
            assert (volume / IMG).stat().st_ino != checked, "the co-tenant's rename happened"
            assert os.fstat(fd).st_ino == checked and got.format == "qcow2"
            # What a bind of the fd gives QEMU: the checked image, no data file.
            info = qemu_info(vi.fd_path(fd))
            assert "data-file" not in info["format-specific"]["data"]
        finally:
            os.close(fd)
        assert "data-file" in qemu_info(volume / IMG)["format-specific"]["data"]
        os.rename(volume / IMG, hostile)
        shutil.copy(image_a.path, volume / IMG)
        checked = (volume / IMG).stat().st_ino


def test_ensure_open_of_a_new_disk_is_the_fd_of_the_file_it_created(volume):
    fd, got = vi.ensure_open(volume, 2 * MIB)
    try:
        assert got.created and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH
        assert os.fstat(fd).st_ino == (volume / IMG).stat().st_ino and os.fstat(fd).st_size == 2 * MIB
    finally:
        os.close(fd)


def test_open_checked_validates_as_the_format_the_vm_uses(volume, hostile_images):
    vi.ensure(volume, 4 * MIB)  # raw, recorded
    with pytest.raises(vi.VolumeImageRejected, match="the VM was created with it as qcow2"):
        vi.open_checked(volume, expect_format="qcow2")
    (volume / vi.RECORD_NAME).unlink()
    with open(volume / IMG, "r+b") as f:  # as a guest writes its own raw disk
        f.write(hostile_images["backing-file"].read_bytes()[:64 * 1024])
    # No record: taken as the VM's format, not probed (a probe would call it a qcow2 and refuse it).
    fd, got = vi.open_checked(volume, expect_format="raw")
    os.close(fd)
    assert got.format == "raw" and record_of(volume) == {"format": "raw"}
    (volume / vi.RECORD_NAME).unlink()
    with pytest.raises(vi.VolumeImageRejected, match="backing file"):
        vi.open_checked(volume, expect_format="qcow2")


def test_check_file_validates_the_file_itself(volume, image_a, hostile_images, tmp_path):
    shutil.copy(image_a.path, volume / IMG)
    assert vi.check_file(volume / IMG, "qcow2").virtual_size == image_a.virtual_size
    shutil.copy(hostile_images["data-file"], volume / IMG)
    with pytest.raises(vi.VolumeImageRejected, match="external data file"):
        vi.check_file(volume / IMG, "qcow2")
    (tmp_path / "link").symlink_to(volume / IMG)
    with pytest.raises(vi.VolumeImageRejected, match="symlink"):
        vi.check_file(tmp_path / "link", "qcow2")


# ---------------------------------------------------------------- a claim's real ext4

def free_bytes(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bfree * st.f_frsize


def test_a_claims_ext4_holds_the_disk_the_vm_api_renders_for_it(ext4_fs):
    d = ext4_fs(GIB)
    rendered = disk_capacity(GIB)  # the claim's request less KubeVirt's 5.5%, as the controller writes it
    st = os.statvfs(d)
    assert rendered > st.f_bavail * st.f_frsize, "more than a non-root user may use: the reviewer's case"
    got = vi.ensure(d, rendered)
    assert got == vi.VolumeImage(d / IMG, "raw", rendered, created=True)
    assert (d / IMG).stat().st_size == rendered


def test_the_default_capacity_fits_a_claims_ext4(ext4_fs):
    d = ext4_fs(GIB)
    expected = vi.default_capacity(d)
    assert expected > 0.85 * GIB
    got = vi.ensure(d, None)
    assert got.created and got.virtual_size == expected == (d / IMG).stat().st_size


def test_a_disk_of_the_whole_claim_is_shrunk_to_the_free_space(ext4_fs):
    d = ext4_fs(GIB)
    free = free_bytes(d)
    assert 0.9 * GIB < free < GIB, "the ext4 of a 1 GiB claim holds less than 1 GiB"
    got = vi.ensure(d, GIB)
    assert got.created and got.virtual_size == free // MIB * MIB == (d / IMG).stat().st_size


def test_a_disk_beyond_the_toleration_is_refused_with_the_numbers(ext4_fs):
    d = ext4_fs(GIB)
    free = free_bytes(d)
    largest = free * 100 // (100 - vi.SPACE_TOLERATION) // MIB * MIB  # the largest capacity still shrunk
    with pytest.raises(vi.CapacityError) as e:
        vi.ensure(d, largest + MIB)
    assert (e.value.requested, e.value.available) == (largest + MIB, free)
    msg = str(e.value)
    assert str(largest + MIB) in msg and str(free) in msg and f"{vi.SPACE_TOLERATION}%" in msg
    assert str(d / IMG) in msg
    assert sorted(p.name for p in d.iterdir()) == ["lost+found"]
    got = vi.ensure(d, largest)
    assert got.created and got.virtual_size == free // MIB * MIB


# ---------------------------------------------------------------- read-only volumes

def test_read_only_volume_disk_is_used_and_nothing_written(ext4_fs, tmp_path, image_a):
    content = tmp_path / "content"
    content.mkdir()
    shutil.copy(image_a.path, content / IMG)
    d = ext4_fs(64 * MIB, read_only=True, content=content)
    with pytest.raises(OSError):
        (d / "probe").write_bytes(b"")  # the mount is read-only for real
    expected = vi.VolumeImage(d / IMG, "qcow2", image_a.virtual_size, created=False)
    assert vi.ensure(d, None, read_only=True) == expected
    assert vi.inspect(d, read_only=True) == expected
    fd, got = vi.open_checked(d, read_only=True)
    os.close(fd)
    assert got == expected
    assert sorted(p.name for p in d.iterdir()) == [IMG, "lost+found"]  # no record, no temp


def test_read_only_volume_uses_the_recorded_format_else_probes_every_time(ext4_fs, tmp_path, hostile_images):
    content = tmp_path / "content"
    content.mkdir()
    raw = bytearray(4 * MIB)
    raw[:4096] = hostile_images["backing-file"].read_bytes()[:4096]  # a guest wrote a qcow2 header into it
    (content / IMG).write_bytes(bytes(raw))
    (content / vi.RECORD_NAME).write_text('{"format": "raw"}')
    d = ext4_fs(64 * MIB, read_only=True, content=content)
    assert vi.ensure(d, None, read_only=True).format == "raw"
    (content / vi.RECORD_NAME).unlink()
    d = ext4_fs(64 * MIB, read_only=True, content=content)
    with pytest.raises(vi.VolumeImageRejected, match="as qcow2: .*backing file"):
        vi.ensure(d, None, read_only=True)  # probed: the magic makes it a qcow2, checked as one


def test_read_only_volume_without_disk_is_refused_naming_it(ext4_fs):
    d = ext4_fs(64 * MIB, read_only=True)
    for call in (lambda: vi.ensure(d, MIB, read_only=True), lambda: vi.open_checked(d, read_only=True)):
        with pytest.raises(vi.VolumeImageRejected) as e:
            call()
        assert str(d / IMG) in str(e.value) and "read-only" in str(e.value)
    assert vi.inspect(d, read_only=True) is None
    assert sorted(p.name for p in d.iterdir()) == ["lost+found"]


def test_read_only_volume_hostile_image_is_refused(ext4_fs, tmp_path, hostile_images):
    content = tmp_path / "content"
    content.mkdir()
    shutil.copy(hostile_images["data-file"], content / IMG)
    d = ext4_fs(64 * MIB, read_only=True, content=content)
    with pytest.raises(vi.VolumeImageRejected, match="external data file"):
        vi.ensure(d, None, read_only=True)


# ---------------------------------------------------------------- leftovers of a crash

def plant_leftovers(volume):
    os.link(volume / IMG, volume / vi.CREATE_TEMP)  # publish's crash between link and unlink
    (volume / vi.RECORD_TEMP).write_bytes(b'{"form')  # a record write's crash before its rename


def test_leftovers_of_a_crash_are_removed_by_the_next_call(volume):
    vi.ensure(volume, MIB)
    st = (volume / IMG).stat()
    for call in (lambda: vi.ensure(volume, MIB), lambda: vi.inspect(volume),
                 lambda: os.close(vi.open_checked(volume)[0])):
        plant_leftovers(volume)
        call()
        assert_nothing_made(volume, IMG, vi.RECORD_NAME)
        after = (volume / IMG).stat()
        assert (after.st_ino, after.st_nlink, after.st_size) == (st.st_ino, 1, MIB)


def test_a_directory_at_a_temp_name_is_left_alone(volume):
    vi.ensure(volume, MIB)
    (volume / vi.RECORD_TEMP).mkdir()
    assert vi.inspect(volume).format == "raw"
    assert (volume / vi.RECORD_TEMP).is_dir()


def test_crash_between_link_and_unlink_leaves_a_second_link_the_next_ensure_removes(volume):
    proc = crash_at("volume.publish.after-link", "volume_image.ensure", volume_dir=volume, capacity=MIB)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (volume / IMG).stat().st_nlink == 2 and (volume / vi.CREATE_TEMP).exists()
    got = vi.ensure(volume, MIB)
    assert got == vi.VolumeImage(volume / IMG, "raw", MIB, created=False)
    assert_nothing_made(volume, IMG, vi.RECORD_NAME)
    assert (volume / IMG).stat().st_nlink == 1


def test_crash_mid_record_leaves_a_temp_the_next_ensure_removes(volume):
    vi.ensure(volume, MIB)
    proc = crash_at("volume.record.after-temp", "volume_image.write_record", volume_dir=volume,
                    record={"format": "qcow2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (volume / vi.RECORD_TEMP).exists() and record_of(volume)["format"] == "raw"
    assert vi.ensure(volume, MIB).format == "raw"
    assert_nothing_made(volume, IMG, vi.RECORD_NAME)


# ---------------------------------------------------------------- one call per volume

def hold_lock(volume) -> int:
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_ensure_waits_for_the_volumes_lock(volume, spawn):
    fd = hold_lock(volume)
    try:
        child = spawn("volume_image.ensure", volume_dir=volume, capacity=MIB)
        time.sleep(1.5)
        assert child.poll() is None, f"ensure did not wait for the lock: {child.communicate()}"
        assert_nothing_made(volume)
    finally:
        os.close(fd)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and "returned" in out, err
    assert_nothing_made(volume, IMG, vi.RECORD_NAME)


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
