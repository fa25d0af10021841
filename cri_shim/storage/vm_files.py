"""A VM's files: its directory, the copy-on-write root overlay, the cloud-init disk.

Layout, one directory per container so a VM is self-describing on disk:

    <state>/vms/<container-id>/root.qcow2      overlay, backed by the image store's file
    <state>/vms/<container-id>/cloud-init.iso  NoCloud or ConfigDrive
    <state>/vms/<container-id>/console.log     the serial console as virtlogd writes it
    <state>/vms/<container-id>/volumes.json    the pod volumes shared with the VM, and those left out
    <state>/vms/<container-id>/shares/<tag>    read-only bind mounts of read-only volumes
    <state>/vms/<container-id>/disks.json      the disks from the pod's volumes (cri_shim/storage/disks.py)
    <state>/vms/<container-id>/disks/<name>    bind mounts of disk images and devices on volumes
    <state>/vms/<container-id>/config-<name>.iso  configVolume disks
    <state>/pods/<sandbox-id>/empty-disks/<name>.qcow2  emptyDisks: they live as long as the sandbox

QEMU runs as an unprivileged user (libvirt's dynamic ownership chowns the
files it opens), so directories on the way are traversable (0711) but not
listable by it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from image_service.store import mount_point

from . import pod_volumes

QEMU_IMG_TIMEOUT = 120


class VolumeError(Exception):
    pass


@dataclass(frozen=True)
class VMFiles:
    dir: Path

    @property
    def root_disk(self) -> Path:
        return self.dir / "root.qcow2"

    @property
    def cloud_init_iso(self) -> Path:
        return self.dir / "cloud-init.iso"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def volumes_record(self) -> Path:
        return self.dir / "volumes.json"

    @property
    def disks_record(self) -> Path:
        return self.dir / "disks.json"

    @property
    def disks_dir(self) -> Path:
        return self.dir / "disks"

    def config_iso(self, disk_name: str) -> Path:
        return self.dir / f"config-{disk_name}.iso"


@dataclass(frozen=True)
class PodFiles:
    """What a pod sandbox keeps beyond one container: its emptyDisks."""

    dir: Path

    def empty_disk(self, disk_name: str) -> Path:
        return self.dir / "empty-disks" / f"{disk_name}.qcow2"


def pod_files(pods_dir: Path, sandbox_id: str) -> PodFiles:
    return PodFiles(pods_dir / sandbox_id)


def vm_files(vms_dir: Path, container_id: str) -> VMFiles:
    return VMFiles(vms_dir / container_id)


def ensure_traversable(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o711)


def _qemu_img(*args: str) -> str:
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise VolumeError(f"qemu-img {args[0]} timed out after {QEMU_IMG_TIMEOUT}s") from None
    if proc.returncode != 0:
        raise VolumeError(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def image_info(path: Path) -> dict:
    return json.loads(_qemu_img("info", "--output=json", "--force-share", str(path)))


def create_root_overlay(files: VMFiles, base: Path, base_format: str, size_bytes: int | None) -> int:
    """Create the qcow2 overlay on `base`; grow it to `size_bytes` when larger.

    Returns the overlay's virtual size. A requested size below the image's own
    is ignored, as virtlet does: a disk is never shrunk under its file system.
    """
    base_size = int(image_info(base)["virtual-size"])
    size = max(base_size, size_bytes or 0)
    files.dir.mkdir(parents=True, exist_ok=True)
    files.dir.chmod(0o711)
    _qemu_img("create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base),
              str(files.root_disk), str(size))
    return size


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temporary file and rename; raises VolumeError (naming a full file system) and leaves no temp."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(mode)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VolumeError(f"the file system on {mount_point(path.parent)} is full: {e.strerror} "
                              f"writing {path}") from None
        raise VolumeError(f"cannot write {path}: {e.strerror or e}") from None


def remove_vm_files(files: VMFiles) -> None:
    """Delete a VM's directory, after detaching the volume bind mounts in it.

    Raises pod_volumes.VolumeMountError (and deletes nothing) if a mount
    stays: deleting through it would delete the pod's volume.
    """
    if files.dir.is_dir():
        pod_volumes.unmount_under(files.dir)
    shutil.rmtree(files.dir, ignore_errors=True)


def allocated_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0
