"""`disk.img` on a filesystem volume: the disk a `volume:` entry of vmlet.dev/disks gives the VM.

The volume is the pod's (a PVC other pods may mount too), so everything in it is hostile: `disk.img` is
reached only through an O_DIRECTORY fd of the volume with O_NOFOLLOW, checked to be a regular file on the
fd that is then used, and an existing image is only ever read. Absent, it is created sparse raw. Its
format is fixed once, in `.vmlet-disk.json` beside it: a guest may write a qcow2 header into its own raw
disk, and that must never make the host open it as qcow2 (with a backing file of the guest's choosing).

The check and the use are one inode: open_checked/ensure_open return the O_PATH fd of exactly the file
they validated (qemu-img reads it through /proc/<pid>/fd/N), and the caller binds that fd, so a hostile
qcow2 renamed into place after the check is never what QEMU gets. Every call holds an exclusive flock
on the volume's directory fd (two pods of one claim on this node take turns), and deletes vmlet's own
leftovers of a crash first. A read-only volume is never written: no record, no file, no cleanup.

    <volume>/disk.img                  the disk (raw or qcow2)
    <volume>/.vmlet-disk.json          {"format": "raw"|"qcow2", "createdBy": "vmlet"?, "root": {...}?}
    <volume>/disk.img.vmlet-create     vmlet's temp file while creating disk.img (a leftover is deleted)
    <volume>/..vmlet-disk.json.tmp     the record's temp file while it is written (a leftover is deleted)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cri_shim.crashpoints import crashpoint
from image_service.errors import ImageRejected
from image_service.validate import QCOW2_MAGIC, Validator

IMAGE_NAME = "disk.img"
RECORD_NAME = ".vmlet-disk.json"
CREATE_TEMP = IMAGE_NAME + ".vmlet-create"
RECORD_TEMP = f".{RECORD_NAME}.tmp"  # _write_at's temp of the record
FS_OVERHEAD = 0.055  # KubeVirt's default file system overhead
# KubeVirt's lessPVCSpaceToleration: a disk that does not fit is shrunk to the free space when that is at
# most this many percent less (a CSI driver's ext4 of exactly the claim's size holds less than the claim).
SPACE_TOLERATION = 10
LOCK_TIMEOUT = 900.0  # seconds a call waits for another one on the same volume (an import) to finish
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
    """The file system cannot hold the disk: `.requested` and `.available` bytes (free for root)."""

    def __init__(self, path: Path, requested: int, available: int, what: str = "create") -> None:
        self.requested, self.available = requested, available
        super().__init__(f"cannot {what} {path} of {requested} bytes ({human(requested)}): the file system "
                         f"holding {path.parent} has {available} bytes ({human(available)}) available, and vmlet "
                         f"shrinks a disk by at most {SPACE_TOLERATION}% to fit")


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
        crashpoint("volume.record.after-temp")
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


# ---------------------------------------------------------------- the lock, leftovers

def lock_volume(dirfd: int, volume_dir: Path, *, read_only: bool = False, timeout: float = LOCK_TIMEOUT) -> None:
    """An exclusive flock on the volume's directory fd, held until the fd is closed: two calls on one
    volume (two pods of a claim importing at once) take turns. A file system that cannot lock refuses a
    writing call; a read-only one writes nothing, so it goes on unlocked. The lock is this node's:
    network file systems keep directory flocks local."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise VolumeImageError(f"volume {volume_dir} is busy: another vmlet call on it (an image "
                                       f"import?) did not finish within {timeout:.0f}s") from None
            time.sleep(0.05)
        except OSError as e:
            if read_only:
                return
            raise VolumeImageError(f"cannot lock volume {volume_dir}: {e.strerror}") from None


@contextlib.contextmanager
def locked(volume_dir: Path, *, read_only: bool = False) -> Iterator[int]:
    """The volume's O_DIRECTORY fd, locked (lock_volume) for the block; closed (and unlocked) after."""
    dirfd = open_volume(volume_dir)
    try:
        lock_volume(dirfd, volume_dir, read_only=read_only)
        yield dirfd
    finally:
        os.close(dirfd)


def remove_leftovers(dirfd: int, volume_dir: Path) -> list[str]:
    """Delete what a crash leaves of vmlet's own files (a second link of disk.img at the create temp's
    name, a half-written record temp); under the lock, so no call of this node is writing them. A
    directory at such a name is not vmlet's and stays. The names deleted."""
    gone = []
    for name in (CREATE_TEMP, RECORD_TEMP):
        try:
            if remove_temp(dirfd, volume_dir, name):
                gone.append(name)
        except VolumeImageRejected:
            pass  # a directory: refused when vmlet needs the name, left alone here
    return gone


# ---------------------------------------------------------------- sizes

def fs_size(volume_dir: Path) -> int:
    st = os.statvfs(volume_dir)
    return st.f_blocks * st.f_frsize


def fs_free(volume_dir: Path) -> int:
    """The bytes root may still use (f_bfree: vmlet runs as root, the reserved blocks count)."""
    st = os.statvfs(volume_dir)
    return st.f_bfree * st.f_frsize


def default_capacity(volume_dir: Path) -> int:
    """(1 - FS_OVERHEAD) of the volume's file system size, rounded down to a MiB (KubeVirt's default)."""
    keep = round((1 - FS_OVERHEAD) * 1000)  # integers: no float rounding at terabyte sizes
    return fs_size(volume_dir) * keep // 1000 // MIB * MIB


def fit_capacity(volume_dir: Path, path: Path, capacity: int | None, *, freed: int = 0,
                 what: str = "create") -> int:
    """The size a disk of `capacity` bytes (rounded up to a MiB; None: default_capacity) gets on the
    volume: itself when the free space (plus `freed`, the blocks of a file it replaces) holds it, the free
    space rounded down to a MiB when that is at most SPACE_TOLERATION percent less, else CapacityError."""
    if capacity is not None and capacity <= 0:
        raise VolumeImageError(f"capacity of {path} must be greater than zero, not {capacity}")
    wanted = round_up_mib(capacity) if capacity is not None else default_capacity(volume_dir)
    free = fs_free(volume_dir) + freed
    if 0 < wanted <= free:
        return wanted
    shrunk = free // MIB * MIB
    if shrunk > 0 and free * 100 >= wanted * (100 - SPACE_TOLERATION):
        return shrunk
    raise CapacityError(path, wanted, free, what)


# ---------------------------------------------------------------- checks

def _validate_inode(pfd: int, path: Path, fmt: str | None, validator: Validator | None):
    """(format, ImageInfo) of the inode of O_PATH fd `pfd`, taken as `fmt` (None: qcow2 if it has the
    magic, else raw); VolumeImageRejected when it is not acceptable so."""
    try:
        rfd = _reopen(pfd, os.O_RDONLY)
    except OSError as e:
        raise VolumeImageError(f"cannot open {path}: {e.strerror}") from None
    try:
        if fmt is None:
            fmt = "qcow2" if os.pread(rfd, len(QCOW2_MAGIC), 0) == QCOW2_MAGIC else "raw"
        try:
            # qemu-img and the header checks read our fd's inode, not the name another pod may swap.
            return fmt, (validator or Validator()).validate_volume_image(fd_path(rfd), fmt)
        except ImageRejected as e:
            raise VolumeImageRejected(f"{path} as {fmt}: {e}") from None
        except OSError as e:
            raise VolumeImageError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(rfd)


def _check_at(dirfd: int, volume_dir: Path, validator: Validator | None, *, read_only: bool,
              expect_format: str | None = None) -> tuple[int, VolumeImage] | None:
    """(O_PATH fd, VolumeImage) of the existing disk.img as vmlet accepts it, None when there is none.
    The format is the record's; without one `expect_format`, else probed, and recorded unless read-only
    (a read-only disk cannot get a header from its guest, so probing it again each time is safe)."""
    path = volume_dir / IMAGE_NAME
    pfd = _open_entry(dirfd, IMAGE_NAME, path)
    if pfd is None:
        return None
    try:
        record = _read_record_at(dirfd, volume_dir)
        recorded = record["format"] if record is not None else None
        if expect_format is not None and recorded not in (None, expect_format):
            raise VolumeImageRejected(f"{volume_dir / RECORD_NAME} says {path} is {recorded}, but the VM was "
                                      f"created with it as {expect_format}; create the container again")
        fmt, info = _validate_inode(pfd, path, recorded or expect_format, validator)
        if record is None and not read_only:
            write_record_at(dirfd, volume_dir, {"format": fmt})  # fixed from now on, whatever the guest writes
        return pfd, VolumeImage(path, fmt, info.virtual_size, created=False)
    except BaseException:
        os.close(pfd)
        raise


def _missing(path: Path, read_only: bool) -> VolumeImageError:
    if read_only:
        return VolumeImageRejected(f"{path} does not exist and its volume is read-only: vmlet cannot create it "
                                   "(put a disk image there, or mount the volume read-write)")
    return VolumeImageError(f"{path} does not exist")


def open_checked(volume_dir: Path, *, validator: Validator | None = None, read_only: bool = False,
                 expect_format: str | None = None) -> tuple[int, VolumeImage]:
    """The O_PATH|O_CLOEXEC fd of exactly the `<volume>/disk.img` inode that was validated, and what it
    is; the caller binds that fd (never the name again) and closes it. `expect_format`: the format the VM
    opens it as (the image is validated so; a record naming another is refused). `read_only`: nothing is
    written. VolumeImageRejected for a hostile image, VolumeImageError when there is none."""
    with locked(volume_dir, read_only=read_only) as dirfd:
        if not read_only:
            remove_leftovers(dirfd, volume_dir)
        got = _check_at(dirfd, volume_dir, validator, read_only=read_only, expect_format=expect_format)
    if got is None:
        raise _missing(volume_dir / IMAGE_NAME, read_only)
    return got


def check_file(path: Path, fmt: str, *, validator: Validator | None = None) -> VolumeImage:
    """Validate, as `fmt`, the file at `path` itself (opened O_PATH|O_NOFOLLOW, a regular file): e.g. a
    disk's bind in the VM directory, the inode QEMU will open."""
    try:
        pfd = os.open(path, _PATH_FLAGS)
    except OSError as e:
        raise VolumeImageError(f"cannot open {path}: {e.strerror}") from None
    try:
        mode = os.fstat(pfd).st_mode
        if not stat.S_ISREG(mode):
            raise VolumeImageRejected(f"{path} is {_kind(mode)}, not a regular file")
        _, info = _validate_inode(pfd, path, fmt, validator)
        return VolumeImage(path, fmt, info.virtual_size, created=False)
    finally:
        os.close(pfd)


def inspect(volume_dir: Path, *, validator: Validator | None = None,
            read_only: bool = False) -> VolumeImage | None:
    """The existing `<volume>/disk.img` as vmlet accepts it (writing its record if it had none, unless
    `read_only`), None when there is none; VolumeImageRejected when it is hostile or unusable. Never
    writes to disk.img."""
    with locked(volume_dir, read_only=read_only) as dirfd:
        if not read_only:
            remove_leftovers(dirfd, volume_dir)
        got = _check_at(dirfd, volume_dir, validator, read_only=read_only)
    if got is None:
        return None
    os.close(got[0])
    return got[1]


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
                crashpoint("volume.publish.after-link")  # the temp is a second link: remove_leftovers' case
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


def _create_at(dirfd: int, volume_dir: Path, capacity: int | None) -> tuple[int, VolumeImage]:
    path = volume_dir / IMAGE_NAME
    size = fit_capacity(volume_dir, path, capacity)
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
            pfd = _reopen(fd, os.O_PATH)  # the inode made here is the one the caller binds
        except OSError as e:
            raise VolumeImageError(f"cannot size {volume_dir / CREATE_TEMP} to {size} bytes: {e.strerror}") from None
        finally:
            os.close(fd)
        try:
            publish(dirfd, volume_dir, CREATE_TEMP, replace=False)
            # After the rename: a crash before it leaves a zero raw disk.img without record, which
            # inspect takes as raw, the same thing.
            write_record_at(dirfd, volume_dir, {"format": "raw", "createdBy": "vmlet"})
            # The fd above is of the temp name's dentry, unlinked by now: the kernel clones no mount of an
            # unlinked dentry (open_tree: ENOENT). The caller binds disk.img's, checked to be the same inode.
            made = os.fstat(pfd)
            named = _open_entry(dirfd, IMAGE_NAME, path)
            if named is None or (os.fstat(named).st_dev, os.fstat(named).st_ino) != (made.st_dev, made.st_ino):
                if named is not None:
                    os.close(named)
                raise VolumeImageError(f"{path} was replaced while vmlet created it (another pod on the volume?)")
        finally:
            os.close(pfd)
    except BaseException:
        remove_temp(dirfd, volume_dir, CREATE_TEMP)
        raise
    return named, VolumeImage(path, "raw", size, created=True)


def ensure_open(volume_dir: Path, capacity: int | None, *, validator: Validator | None = None,
                read_only: bool = False) -> tuple[int, VolumeImage]:
    """ensure(), with the O_PATH fd of exactly the inode it checked or created (see open_checked)."""
    with locked(volume_dir, read_only=read_only) as dirfd:
        if not read_only:
            remove_leftovers(dirfd, volume_dir)
        existing = _check_at(dirfd, volume_dir, validator, read_only=read_only)
        if existing is not None:
            return existing
        if read_only:
            raise _missing(volume_dir / IMAGE_NAME, read_only)
        return _create_at(dirfd, volume_dir, capacity)


def ensure(volume_dir: Path, capacity: int | None, *, validator: Validator | None = None,
           read_only: bool = False) -> VolumeImage:
    """`<volume>/disk.img`: the existing one as inspect() accepts it, or a new sparse raw one of `capacity`
    bytes rounded up to a MiB (None: default_capacity), fitted to the free space by fit_capacity
    (CapacityError beyond its toleration). `read_only`: a read-only volume, never written (a missing
    disk.img is VolumeImageRejected). `volume_dir` is the caller's realpath of the volume."""
    fd, image = ensure_open(volume_dir, capacity, validator=validator, read_only=read_only)
    os.close(fd)
    return image
