"""disks.bind and disks.rebind: a volume's disk.img is bound into the VM directory as exactly the inode that
was checked, and StartContainer checks the inode QEMU will open (the create's bind, when it is still there),
not whatever the name in the volume points at by then. A co-tenant pod on the volume renames or rewrites
files at the worst instants. Real bind mounts, real qemu-img, real ext4 for the read-only volume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cri_shim.storage import disks, pod_volumes
from cri_shim.storage import volume_image as vi
from cri_shim.storage.vm_files import VMFiles
from tests.integration.storage.conftest import MIB, SwapAfterCheck, qemu_info, sha256_of
from tests.support.prereq import require

IMG = vi.IMAGE_NAME


@pytest.fixture
def files(tmp_path):
    """A VM directory; every bind under it is detached after the test, also when it fails."""
    require(os.geteuid() == 0, "needs root (bind mounts)")
    f = VMFiles(tmp_path / "vm")
    f.dir.mkdir()
    yield f
    pod_volumes.unmount_under(f.dir)


def attached(files: VMFiles, volume: Path, fmt: str, *, readonly: bool = False, name: str = "d") -> disks.Attached:
    """A volume disk as build() records it in disks.json: bound at disks/<name> in the VM directory."""
    return disks.Attached(name=name, kind="volume", serial=name, bus="virtio", target="vdb", source="file",
                          path=str(files.disks_dir / name), host_path=str(volume / IMG), format=fmt,
                          readonly=readonly, cache="none", bind=True, persistent=True)


def record(files: VMFiles, *ds: disks.Attached) -> None:
    files.disks_record.write_bytes(disks.record(ds))


def has_data_file(path: Path) -> bool:
    return "data-file" in qemu_info(path)["format-specific"]["data"]


@pytest.fixture
def qcow2_volume(volume, image_a):
    """A volume whose disk.img is the good qcow2 image_a, accepted (and recorded) once."""
    shutil.copy(image_a.path, volume / IMG)
    assert vi.ensure(volume, None).format == "qcow2"
    return volume


def swap(volume: Path, hostile: Path, keep: bool = True) -> SwapAfterCheck:
    shutil.copy(hostile, volume / "incoming")
    return SwapAfterCheck(swap=(volume / "incoming", volume / IMG), keep=volume / "checked.img" if keep else None)


def test_bind_binds_the_inode_it_checked_when_a_hostile_qcow2_is_renamed_in_meanwhile(
        files, qcow2_volume, hostile_images):
    volume = qcow2_volume
    checked = (volume / IMG).stat().st_ino
    d = attached(files, volume, "qcow2")
    disks.bind(files, d, validator=swap(volume, hostile_images["data-file"]))
    assert has_data_file(volume / IMG), "the co-tenant's rename happened"
    assert os.stat(d.path).st_ino == checked and not has_data_file(Path(d.path))


def test_bind_of_a_checked_file_deleted_meanwhile_binds_nothing(files, qcow2_volume, hostile_images):
    volume = qcow2_volume
    d = attached(files, volume, "qcow2")
    with pytest.raises(vi.VolumeImageError, match="was replaced after vmlet checked it"):
        disks.bind(files, d, validator=swap(volume, hostile_images["data-file"], keep=False))
    assert not pod_volumes._mountpoints_under(files.dir)


def test_bind_of_an_fd_binds_that_inode(files, qcow2_volume, hostile_images):
    volume = qcow2_volume
    fd, got = vi.open_checked(volume, validator=swap(volume, hostile_images["data-file"]))
    try:
        d = attached(files, volume, got.format)
        disks.bind(files, d, source_fd=fd)
        assert os.stat(d.path).st_ino == os.fstat(fd).st_ino != (volume / IMG).stat().st_ino
    finally:
        os.close(fd)
    assert not has_data_file(Path(d.path))


def test_bind_refuses_a_hostile_disk_and_binds_nothing(files, volume, hostile_images):
    shutil.copy(hostile_images["backing-file"], volume / IMG)
    with pytest.raises(vi.VolumeImageRejected, match="backing file"):
        disks.bind(files, attached(files, volume, "qcow2"))
    assert not pod_volumes._mountpoints_under(files.dir)


def test_rebind_checks_the_bound_inode_not_the_name(files, qcow2_volume, image_a, hostile_images):
    """The create's bind holds inode A. A co-tenant keeps A open, renames a good copy over the name and then
    writes a hostile header into A: the name is fine, what QEMU would open is not."""
    volume = qcow2_volume
    d = attached(files, volume, "qcow2")
    record(files, d)
    disks.bind(files, d)
    disks.rebind(files)  # fine as it is
    with open(volume / IMG, "r+b") as bound:
        shutil.copy(image_a.path, volume / "good")
        os.rename(volume / "good", volume / IMG)
        bound.write(hostile_images["data-file"].read_bytes())
        bound.truncate()
    assert not has_data_file(volume / IMG) and has_data_file(Path(d.path))
    with pytest.raises(disks.DiskBuildError) as e:
        disks.rebind(files)
    assert "disk 'd'" in str(e.value) and "external data file" in str(e.value)


def test_rebind_after_the_vm_stopped_binds_the_inode_it_checked(files, qcow2_volume, hostile_images):
    volume = qcow2_volume
    d = attached(files, volume, "qcow2")
    record(files, d)
    disks.bind(files, d)
    pod_volumes.release(files.dir)  # the VM stopped: the binds are gone
    assert not pod_volumes.is_mountpoint(Path(d.path))
    checked = (volume / IMG).stat().st_ino
    disks.rebind(files, validator=swap(volume, hostile_images["data-file"]))
    assert os.stat(d.path).st_ino == checked and not has_data_file(Path(d.path))
    pod_volumes.release(files.dir)
    with pytest.raises(disks.DiskBuildError, match="external data file"):
        disks.rebind(files)  # the hostile file is at the name now: refused, not bound
    assert not pod_volumes.is_mountpoint(Path(d.path))


def test_rebind_refuses_a_record_that_changed_the_disks_format(files, volume):
    vi.ensure(volume, 4 * MIB)
    d = attached(files, volume, "raw")
    record(files, d)
    vi.write_record(volume, {"format": "qcow2"})  # another pod's say: the VM still opens it as raw
    with pytest.raises(disks.DiskBuildError, match="the VM was created with it as raw"):
        disks.rebind(files)


def test_bind_of_a_read_only_volume_writes_nothing_and_is_read_only(ext4_fs, files, tmp_path):
    # ext4_fs first: its finalizer (unmount, detach) runs after the binds under `files` are gone.
    content = tmp_path / "content"
    content.mkdir()
    (content / IMG).write_bytes(b"read-only data" + bytes(MIB - 14))
    ro = ext4_fs(64 * MIB, read_only=True, content=content)
    d = attached(files, ro, "raw", readonly=True)
    record(files, d)
    disks.rebind(files)
    assert pod_volumes.is_mountpoint(Path(d.path))
    with pytest.raises(OSError):
        open(d.path, "r+b").close()
    assert sha256_of(Path(d.path)) == sha256_of(content / IMG)
    assert sorted(p.name for p in ro.iterdir()) == [IMG, "lost+found"]
