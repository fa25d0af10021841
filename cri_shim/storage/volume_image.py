"""`disk.img` on a filesystem volume: the disk a `volume:` entry of vmlet.dev/disks gives the VM.

The volume is the pod's (a PVC other pods may mount too), so everything in it is hostile: `disk.img` is
reached only through an O_DIRECTORY fd of the volume with O_NOFOLLOW, checked to be a regular file on the
fd that is then used, and an existing image is only ever read. Absent, it is created sparse raw. Its
format is fixed once, in `.vmlet-disk.json` beside it: a guest may write a qcow2 header into its own raw
disk, and that must never make the host open it as qcow2 (with a backing file of the guest's choosing).

    <volume>/disk.img                  the disk (raw or qcow2)
    <volume>/.vmlet-disk.json          {"format": "raw"|"qcow2", "createdBy": "vmlet"?, "root": {...}?}
    <volume>/disk.img.vmlet-create     vmlet's temp file while creating disk.img (a leftover is deleted)
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from image_service.errors import ImageRejected
from image_service.validate import QCOW2_MAGIC, Validator

IMAGE_NAME = "disk.img"
RECORD_NAME = ".vmlet-disk.json"
CREATE_TEMP = IMAGE_NAME + ".vmlet-create"
FS_OVERHEAD = 0.055  # KubeVirt's default file system overhead
MIB = 1024 * 1024
MAX_RECORD_BYTES = 64 * 1024
FORMATS = ("raw", "qcow2")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class VolumeImageError(Exception):
    """Base: the message names the file and why."""


class VolumeImageRejected(VolumeImageError):
    """An existing disk.img (or its record) that vmlet will not use: not a regular file, a qcow2 that is
    not self-contained, encrypted or too big, a raw file of a size no disk has."""


class CapacityError(VolumeImageError):
    """The file system cannot hold the disk: `.requested` and `.available` bytes."""

    def __init__(self, path: Path, requested: int, available: int, what: str = "create") -> None:
        self.requested, self.available = requested, available
        super().__init__(f"cannot {what} {path} of {requested} bytes ({human(requested)}): the file system "
                         f"holding {path.parent} has {available} bytes ({human(available)}) available")


@dataclass(frozen=True)
class VolumeImage:
    path: Path  # <volume>/disk.img
    format: str  # raw | qcow2
    virtual_size: int
    created: bool  # vmlet created it in this call


def human(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def round_up_mib(n: int) -> int:
    return -(-n // MIB) * MIB


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_volume(volume_dir: Path) -> int:
    """An O_DIRECTORY fd of the volume (not following a symlink in its place); VolumeImageError otherwise."""
    try:
        return os.open(volume_dir, _DIR_FLAGS)
    except FileNotFoundError:
        raise VolumeImageError(f"volume {volume_dir} does not exist") from None
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise VolumeImageError(f"volume {volume_dir} is not a directory") from None
        raise VolumeImageError(f"cannot open volume {volume_dir}: {e.strerror}") from None


def _open_entry(dirfd: int, name: str, where: Path) -> int | None:
    """An O_PATH fd of a regular file `name` in the volume, None when absent, VolumeImageRejected for a
    symlink/dir/fifo/device (O_PATH never opens the object itself: no fifo blocks, no device is touched)."""
    try:
        fd = os.open(name, _PATH_FLAGS, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise VolumeImageError(f"cannot open {where}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise VolumeImageRejected(f"{where} is {_kind(mode)}, not a regular file; vmlet refuses it")
    return fd


def _reopen(path_fd: int, flags: int) -> int:
    """Open the very inode an O_PATH fd names (through its /proc magic link, never a name in the volume)."""
    return os.open(f"/proc/self/fd/{path_fd}", flags | os.O_CLOEXEC)


def fd_path(fd: int) -> Path:
    """A path another process (qemu-img, our child) opens the file of our `fd` by: the same inode."""
    return Path(f"/proc/{os.getpid()}/fd/{fd}")


def fsync_dir(dirfd: int) -> None:
    os.fsync(dirfd)


def open_image(volume_dir: Path) -> int:
    """An O_PATH|O_NOFOLLOW|O_CLOEXEC fd of `<volume>/disk.img`, checked to be a regular file
    (VolumeImageRejected otherwise; VolumeImageError when there is none). The caller closes it."""
    dirfd = open_volume(volume_dir)
    try:
        fd = _open_entry(dirfd, IMAGE_NAME, volume_dir / IMAGE_NAME)
    finally:
        os.close(dirfd)
    if fd is None:
        raise VolumeImageError(f"{volume_dir / IMAGE_NAME} does not exist")
    return fd


# ---------------------------------------------------------------- the record

def _read_record_at(dirfd: int, volume_dir: Path) -> dict | None:
    where = volume_dir / RECORD_NAME
    pfd = _open_entry(dirfd, RECORD_NAME, where)
    if pfd is None:
        return None
    try:
        fd = _reopen(pfd, os.O_RDONLY)
    finally:
        os.close(pfd)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise VolumeImageRejected(f"{where} is over {MAX_RECORD_BYTES} bytes; not vmlet's record "
                                  "(delete it to let vmlet detect the format again)")
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("format") not in FORMATS:
        raise VolumeImageRejected(f"{where} is not vmlet's record (a JSON object with format raw or qcow2); "
                                  "delete it to let vmlet detect the format again")
    return record


def read_record(volume_dir: Path) -> dict | None:
    """`<volume>/.vmlet-disk.json`, None when absent; VolumeImageRejected when it is not a valid record."""
    dirfd = open_volume(volume_dir)
    try:
        return _read_record_at(dirfd, volume_dir)
    finally:
        os.close(dirfd)


def _write_at(dirfd: int, directory: Path, name: str, data: bytes, mode: int = 0o644) -> None:
    """Atomic replace of `name` in the directory: temp (created O_EXCL|O_NOFOLLOW) + fsync + rename + fsync
    of the directory. rename replaces whatever is at `name` (a symlink itself, not its target)."""
    tmp = f".{name}.tmp"
    try:
        os.unlink(tmp, dir_fd=dirfd)  # a crashed write's leftover (or a planted symlink: the link goes)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise VolumeImageError(f"cannot remove {directory / tmp}: {e.strerror}") from None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        fsync_dir(dirfd)
    except OSError as e:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        why = "the file system is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
        raise VolumeImageError(f"cannot write {directory / name}: {why}") from None


def write_record_at(dirfd: int, volume_dir: Path, record: dict) -> None:
    if record.get("format") not in FORMATS:
        raise ValueError(f"record format {record.get('format')!r} is not raw or qcow2")
    _write_at(dirfd, volume_dir, RECORD_NAME, json.dumps(record, sort_keys=True, indent=1).encode() + b"\n")


def write_record(volume_dir: Path, record: dict) -> None:
    """Write `<volume>/.vmlet-disk.json` atomically (temp + fsync + rename + fsync of the directory)."""
    dirfd = open_volume(volume_dir)
    try:
        write_record_at(dirfd, volume_dir, record)
    finally:
        os.close(dirfd)


# ---------------------------------------------------------------- sizes

def fs_size(volume_dir: Path) -> int:
    st = os.statvfs(volume_dir)
    return st.f_blocks * st.f_frsize


def fs_available(volume_dir: Path) -> int:
    st = os.statvfs(volume_dir)
    return st.f_bavail * st.f_frsize


def default_capacity(volume_dir: Path) -> int:
    """(1 - FS_OVERHEAD) of the volume's file system size, rounded down to a MiB (KubeVirt's default)."""
    keep = round((1 - FS_OVERHEAD) * 1000)  # integers: no float rounding at terabyte sizes
    return fs_size(volume_dir) * keep // 1000 // MIB * MIB


# ---------------------------------------------------------------- inspect / ensure

def _inspect_at(dirfd: int, volume_dir: Path, validator: Validator | None) -> VolumeImage | None:
    path = volume_dir / IMAGE_NAME
    pfd = _open_entry(dirfd, IMAGE_NAME, path)
    if pfd is None:
        return None
    try:
        record = _read_record_at(dirfd, volume_dir)
        try:
            rfd = _reopen(pfd, os.O_RDONLY)
        except OSError as e:
            raise VolumeImageError(f"cannot open {path}: {e.strerror}") from None
    finally:
        os.close(pfd)
    try:
        if record is not None:
            fmt = record["format"]
        else:
            fmt = "qcow2" if os.pread(rfd, len(QCOW2_MAGIC), 0) == QCOW2_MAGIC else "raw"
        try:
            # qemu-img and the header checks read our fd's inode, not the name another pod may swap.
            info = (validator or Validator()).validate_volume_image(fd_path(rfd), fmt)
        except ImageRejected as e:
            raise VolumeImageRejected(f"{path} as {fmt}: {e}") from None
        except OSError as e:
            raise VolumeImageError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(rfd)
    if record is None:
        write_record_at(dirfd, volume_dir, {"format": fmt})  # fixed from now on, whatever the guest writes
    return VolumeImage(path, fmt, info.virtual_size, created=False)


def inspect(volume_dir: Path, *, validator: Validator | None = None) -> VolumeImage | None:
    """The existing `<volume>/disk.img` as vmlet accepts it (writing its record if it had none), None when
    there is none; VolumeImageRejected when it is hostile or unusable. Never writes to disk.img."""
    dirfd = open_volume(volume_dir)
    try:
        return _inspect_at(dirfd, volume_dir, validator)
    finally:
        os.close(dirfd)


def remove_temp(dirfd: int, volume_dir: Path, name: str) -> bool:
    """Delete vmlet's temp file `name` (a crash's leftover); True if there was one. A directory there is
    not vmlet's: refused, not deleted."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise VolumeImageRejected(f"{volume_dir / name} is a directory, where vmlet keeps a temp file; "
                                  "vmlet does not delete it")
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise VolumeImageError(f"cannot remove {volume_dir / name}: {e.strerror}") from None
    return True


def publish(dirfd: int, volume_dir: Path, tmp: str, replace: bool) -> None:
    """Give vmlet's finished temp file the name disk.img. Without `replace` an existing disk.img is never
    overwritten (hard link, which fails on EEXIST, then unlink of the temp); file systems without hard
    links fall back to a rename after a check."""
    target = volume_dir / IMAGE_NAME
    try:
        if replace:
            os.rename(tmp, IMAGE_NAME, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        else:
            try:
                os.link(tmp, IMAGE_NAME, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=dirfd)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                try:
                    os.stat(IMAGE_NAME, dir_fd=dirfd, follow_symlinks=False)
                    raise FileExistsError(errno.EEXIST, "File exists") from None
                except FileNotFoundError:
                    pass
                os.rename(tmp, IMAGE_NAME, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        fsync_dir(dirfd)
    except FileExistsError:
        raise VolumeImageError(f"{target} appeared while vmlet was creating it (another pod?); "
                               "it was left as it is") from None
    except OSError as e:
        raise VolumeImageError(f"cannot rename {volume_dir / tmp} to {target}: {e.strerror}") from None


def _create_at(dirfd: int, volume_dir: Path, capacity: int | None) -> VolumeImage:
    path = volume_dir / IMAGE_NAME
    if capacity is not None and capacity <= 0:
        raise VolumeImageError(f"capacity of {path} must be greater than zero, not {capacity}")
    size = round_up_mib(capacity) if capacity is not None else default_capacity(volume_dir)
    available = fs_available(volume_dir)
    if size == 0 or size > available:
        raise CapacityError(path, size, available)
    remove_temp(dirfd, volume_dir, CREATE_TEMP)
    try:
        fd = os.open(CREATE_TEMP, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660,
                     dir_fd=dirfd)
    except OSError as e:
        raise VolumeImageError(f"cannot create {volume_dir / CREATE_TEMP}: {e.strerror}") from None
    try:
        try:
            os.ftruncate(fd, size)  # sparse: no block is written
            os.fsync(fd)
        except OSError as e:
            raise VolumeImageError(f"cannot size {volume_dir / CREATE_TEMP} to {size} bytes: {e.strerror}") from None
        finally:
            os.close(fd)
        publish(dirfd, volume_dir, CREATE_TEMP, replace=False)
    except BaseException:
        remove_temp(dirfd, volume_dir, CREATE_TEMP)
        raise
    # After the rename: a crash before it leaves a zero raw disk.img without record, which inspect
    # takes as raw, the same thing.
    write_record_at(dirfd, volume_dir, {"format": "raw", "createdBy": "vmlet"})
    return VolumeImage(path, "raw", size, created=True)


def ensure(volume_dir: Path, capacity: int | None, *, validator: Validator | None = None) -> VolumeImage:
    """`<volume>/disk.img`: the existing one as inspect() accepts it, or a new sparse raw one of `capacity`
    bytes rounded up to a MiB (None: default_capacity), refused with CapacityError when the file system has
    less available. `volume_dir` is the caller's realpath of the volume."""
    dirfd = open_volume(volume_dir)
    try:
        existing = _inspect_at(dirfd, volume_dir, validator)
        if existing is not None:
            return existing
        return _create_at(dirfd, volume_dir, capacity)
    finally:
        os.close(dirfd)
