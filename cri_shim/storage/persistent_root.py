"""The persistent root: the pod's image written once onto a volume or a block device (docs/storage.md).

A root is imported when it is blank, or when the pod asks for it (`vmlet.dev/root-reimage`), and then
only used. What vmlet wrote is recorded where the root is, so the next pod, container or node knows:

* file root (a filesystem volume): `disk.img`, raw, converted into `disk.img.vmlet-import`, grown to
  the capacity, fsynced, recorded in `.vmlet-disk.json` (`root.imageDigest`), then renamed to disk.img.
  A leftover temp file means the import did not finish: it is deleted and the import redone.
* block root: the image at offset HEADER_SIZE (the guest sees a libvirt slice from there), then vmlet's
  header in the first 4 KiB: magic, version, length, crc32 and JSON {imageDigest, image, importedAt}.
  The header is written last (and cleared first when re-imaging), so a crash leaves a blank header
  and the next call imports again.

Nothing on a root is ever deleted but vmlet's own temp file; the base image is the image store's
(validated when pulled).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import stat
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from cri_shim.crashpoints import crashpoint
from image_service.validate import Validator

from . import volume_image as vi
from .disk_spec import ROOT_REIMAGE

HEADER_SIZE = 1024 * 1024  # block roots: vmlet's header lives in the first MiB; the guest sees the rest
HEADER_BLOCK = 4096  # the part of the first MiB that holds the header; the rest stays zero
HEADER_MAGIC = b"VMLET-ROOT\x00\x00"
HEADER_VERSION = 1
_HEADER = struct.Struct(">12sIII")  # magic, version, JSON length, crc32 of the JSON
MAX_HEADER_JSON = HEADER_BLOCK - _HEADER.size
MAX_IMAGE_NAME = 1024  # the image name is informative: cut so the header always fits its block
IMPORT_TEMP = vi.IMAGE_NAME + ".vmlet-import"
QEMU_IMG_MIN_TIMEOUT = 120.0
QEMU_IMG_MIN_RATE = 8 * vi.MIB  # bytes/s a qemu-img run may not fall below before it is called hung


class RootError(Exception):
    pass


class RootDigestMismatch(RootError):
    def __init__(self, path: Path, recorded: str, wanted: str) -> None:
        self.recorded, self.wanted = recorded, wanted
        super().__init__(f"the persistent root {path} holds image {recorded} (vmlet's record), not the pod's "
                         f"image {wanted}; set the pod annotation {ROOT_REIMAGE}: \"true\" to write the pod's "
                         "image over it")


class RootTooSmall(RootError):
    def __init__(self, path: Path, image: str, needed: int, available: int) -> None:
        self.needed, self.available = needed, available
        super().__init__(f"the persistent root {path} has room for {available} bytes ({vi.human(available)}), "
                         f"image {image} needs {needed} bytes ({vi.human(needed)})")


@dataclass(frozen=True)
class RootDisk:
    path: Path  # disk.img or the block device
    format: str  # raw | qcow2
    offset: int  # 0, or HEADER_SIZE for a block root with vmlet's header (libvirt <slice offset>)
    size: int | None  # slice size (device size - HEADER_SIZE) or None (whole file/device)
    imported: bool  # the image was written in this call
    digest: str | None  # the image digest the root holds per vmlet's record; None for a user's own disk


def qemu_img_timeout(nbytes: int) -> float:
    return max(QEMU_IMG_MIN_TIMEOUT, nbytes / QEMU_IMG_MIN_RATE)


def _qemu_img(args: list[str], what: str, timeout: float, pass_fds: tuple[int, ...] = ()) -> str:
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, pass_fds=pass_fds)
    except subprocess.TimeoutExpired:
        raise RootError(f"qemu-img {args[0]} {what} took longer than {timeout:.0f}s") from None
    except OSError as e:
        raise RootError(f"cannot run qemu-img {args[0]} {what}: {e.strerror}") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RootError(f"qemu-img {args[0]} {what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def base_virtual_size(base: Path, base_format: str) -> int:
    out = _qemu_img(["info", "--output=json", "-f", base_format, "--force-share", str(base)],
                    f"of the image {base}", QEMU_IMG_MIN_TIMEOUT)
    try:
        return int(json.loads(out)["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise RootError(f"qemu-img info of the image {base} printed no virtual size") from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _root_record(digest: str, image: str) -> dict:
    return {"imageDigest": digest, "image": image[:MAX_IMAGE_NAME], "importedAt": _now()}


# ---------------------------------------------------------------- file root

def prepare_file_root(volume_dir: Path, *, base: Path, base_format: str, digest: str, image: str,
                      capacity: int | None, reimage: bool, validator: Validator | None = None) -> RootDisk:
    """`<volume>/disk.img` holding the pod's image: imported now when there is none (or `reimage` over
    another), else used as it is: vmlet's import of `digest`, or a user's own disk (digest None)."""
    path = volume_dir / vi.IMAGE_NAME
    dirfd = vi.open_volume(volume_dir)
    try:
        interrupted = vi.remove_temp(dirfd, volume_dir, IMPORT_TEMP)
        present = _lstat(dirfd, vi.IMAGE_NAME)
        record = vi._read_record_at(dirfd, volume_dir)
        root = record.get("root") if record else None
        recorded = root.get("imageDigest") if isinstance(root, dict) else None
        if present is not None:
            # The record is written before the rename: a leftover temp with the pod's digest recorded
            # means disk.img is still what was there before the import.
            if recorded == digest and not interrupted:
                used = vi._inspect_at(dirfd, volume_dir, validator)
                return RootDisk(path, used.format, 0, None, imported=False, digest=digest)
            if recorded is not None and recorded != digest and not reimage:
                raise RootDigestMismatch(path, recorded, digest)
            if recorded is None and not reimage:  # a user's own disk (or a data disk vmlet created)
                used = vi._inspect_at(dirfd, volume_dir, validator)
                return RootDisk(path, used.format, 0, None, imported=False, digest=None)
            if not stat.S_ISREG(present.st_mode):
                raise vi.VolumeImageRejected(f"{path} is {vi._kind(present.st_mode)}, not a regular file; "
                                             "vmlet does not write the image over it")
        return _import_file(dirfd, volume_dir, base, base_format, digest, image, capacity,
                            replace=present is not None, freed=(present.st_blocks * 512) if present else 0)
    finally:
        os.close(dirfd)


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _import_file(dirfd: int, volume_dir: Path, base: Path, base_format: str, digest: str, image: str,
                 capacity: int | None, replace: bool, freed: int) -> RootDisk:
    path, tmp_path = volume_dir / vi.IMAGE_NAME, volume_dir / IMPORT_TEMP
    vsize = base_virtual_size(base, base_format)
    if capacity is not None and capacity <= 0:
        raise RootError(f"capacity of {path} must be greater than zero, not {capacity}")
    size = vi.round_up_mib(capacity) if capacity is not None else vi.default_capacity(volume_dir)
    if size < vsize:
        raise RootTooSmall(path, image, vsize, size)
    available = vi.fs_available(volume_dir) + freed  # a replaced disk.img's blocks come back
    if size > available:
        raise vi.CapacityError(path, size, available, what="import the image into")
    try:
        fd = os.open(IMPORT_TEMP, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660,
                     dir_fd=dirfd)
    except OSError as e:
        raise RootError(f"cannot create {tmp_path}: {e.strerror}") from None
    recorded = False
    try:
        try:
            os.ftruncate(fd, size)  # sparse and zero: qemu-img need not write the image's holes
        except OSError as e:
            raise RootError(f"cannot size {tmp_path} to {size} bytes: {e.strerror}") from None
        # Through our fd, not the name: the volume is the pod's, a name can be swapped under us.
        _qemu_img(["convert", "-q", "-n", "--target-is-zero", "-f", base_format, "-O", "raw",
                   str(base), str(vi.fd_path(fd))],
                  f"of the image {base} into {tmp_path}", qemu_img_timeout(vsize))
        try:
            os.fsync(fd)
        except OSError as e:
            raise RootError(f"cannot flush {tmp_path}: {e.strerror}") from None
        crashpoint("root.import.after-convert")
        recorded = True  # from here on disk.img may be recorded as the import: the temp must stay if we fail
        vi.write_record_at(dirfd, volume_dir, {"format": "raw", "createdBy": "vmlet",
                                               "root": _root_record(digest, image)})
        crashpoint("root.import.after-record")
        written = os.fstat(fd)
        vi.publish(dirfd, volume_dir, IMPORT_TEMP, replace=replace)
        now = _lstat(dirfd, vi.IMAGE_NAME)
        if now is None or (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino):
            raise RootError(f"{path} changed while vmlet renamed its import onto it; retry")
    except BaseException:
        if not recorded:
            vi.remove_temp(dirfd, volume_dir, IMPORT_TEMP)
        raise
    finally:
        os.close(fd)
    return RootDisk(path, "raw", 0, None, imported=True, digest=digest)


# ---------------------------------------------------------------- block root

def _encode_header(record: dict) -> bytes:
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER_JSON:
        raise RootError(f"vmlet's root header would be {len(body)} bytes, over {MAX_HEADER_JSON}")
    block = _HEADER.pack(HEADER_MAGIC, HEADER_VERSION, len(body), zlib.crc32(body)) + body
    return block + bytes(HEADER_BLOCK - len(block))


def _decode_header(block: bytes, device: Path) -> dict | None:
    """vmlet's header, or None: no magic (blank or a user's disk), or a torn one (vmlet's own write cut short
    by a crash: the image under it is there, the header must be written again)."""
    if not block.startswith(HEADER_MAGIC) or len(block) < _HEADER.size:
        return None
    _, version, length, crc = _HEADER.unpack_from(block)
    if version != HEADER_VERSION:
        raise RootError(f"{device} has a vmlet root header of version {version}, which this vmlet does not "
                        f"know (it writes version {HEADER_VERSION})")
    body = block[_HEADER.size:_HEADER.size + length]
    if length > MAX_HEADER_JSON or zlib.crc32(body) != crc:
        return None
    try:
        record = json.loads(body)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("imageDigest"), str):
        return None
    return record


def _open_block(device: Path, flags: int) -> int:
    try:
        st = os.stat(device)
    except OSError as e:
        raise RootError(f"cannot stat the root device {device}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise RootError(f"the root device {device} is {vi._kind(st.st_mode)}, not a block device")
    try:
        fd = os.open(device, flags | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise RootError(f"the root device {device} is in use (mounted, or another import holds it)") from None
        raise RootError(f"cannot open the root device {device}: {e.strerror}") from None
    if not stat.S_ISBLK(os.fstat(fd).st_mode):  # swapped between stat and open
        os.close(fd)
        raise RootError(f"the root device {device} is not a block device")
    return fd


def _pread_all(fd: int, n: int, offset: int, device: Path) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = os.pread(fd, n - len(out), offset + len(out))
        except OSError as e:
            raise RootError(f"cannot read {device}: {e.strerror}") from None
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_block_header(device: Path) -> dict | None:
    """The JSON of vmlet's root header on `device` ({imageDigest, image, importedAt}), None when there is
    none (a blank device, a user's disk, a header torn by a crash)."""
    fd = _open_block(device, os.O_RDONLY)
    try:
        return _decode_header(_pread_all(fd, HEADER_BLOCK, 0, device), device)
    finally:
        os.close(fd)


def _write_header(fd: int, device: Path, block: bytes) -> None:
    try:
        if os.pwrite(fd, block, 0) != len(block):
            raise RootError(f"short write of vmlet's root header to {device}")
        os.fsync(fd)
    except OSError as e:
        raise RootError(f"cannot write vmlet's root header to {device}: {e.strerror}") from None


def prepare_block_root(device: Path, *, base: Path, base_format: str, digest: str, image: str,
                       reimage: bool) -> RootDisk:
    """The block device holding the pod's image from HEADER_SIZE on: imported now when its first MiB is
    blank (or `reimage`), else used: vmlet's import of `digest`, or a user's own disk, whole (digest None).
    `device` is the resolved host path of the CRI device."""
    # O_EXCL: a mounted device, or a concurrent import of the same one, is refused (EBUSY) instead of
    # being written under its user. qemu-img's own open below is not exclusive, so it is not refused.
    fd = _open_block(device, os.O_RDWR | os.O_EXCL)
    try:
        try:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            raise RootError(f"cannot read the size of {device}: {e.strerror}") from None
        first = _pread_all(fd, HEADER_SIZE, 0, device)
        header = _decode_header(first, device)
        slice_size = dev_size - HEADER_SIZE
        if header is not None:
            recorded = header["imageDigest"]
            if recorded == digest:
                return RootDisk(device, "raw", HEADER_SIZE, slice_size, imported=False, digest=digest)
            if not reimage:
                raise RootDigestMismatch(device, recorded, digest)
        elif first.startswith(HEADER_MAGIC) or first.count(0) == len(first):
            pass  # blank, or vmlet's header torn by a crash: import
        elif not reimage:
            return RootDisk(device, "raw", 0, None, imported=False, digest=None)
        vsize = base_virtual_size(base, base_format)
        if vsize > slice_size:
            raise RootTooSmall(device, image, vsize, max(slice_size, 0))
        if first.count(0) != len(first):
            # Re-imaging: the old header (or the user's boot sector) goes first, so a crash from here on
            # leaves a blank root, imported again next time.
            _write_header(fd, device, bytes(HEADER_SIZE))
        target = ",".join([f"driver=raw,offset={HEADER_SIZE},size={slice_size}",
                           f"file.driver=host_device,file.filename={_opt(str(device))}"])
        # qemu-img 7.2 refuses -O together with --target-image-opts: the format is the options' driver.
        # -t none: O_DIRECT, the data goes to the device as it is converted (convert's default cache is
        # "unsafe": into the page cache, no flush, leaving the whole write-out to our fsync); -W: out of
        # order, nothing on the device depends on the order until the header, written after the fsync.
        _qemu_img(["convert", "-q", "-n", "-t", "none", "-W", "-f", base_format, str(base),
                   "--target-image-opts", target],
                  f"of the image {base} onto {device}", qemu_img_timeout(vsize))
        try:
            os.fsync(fd)  # the device's cache, before the header that says the image is there
        except OSError as e:
            raise RootError(f"cannot flush {device}: {e.strerror}") from None
        crashpoint("root.import.after-convert")
        _write_header(fd, device, _encode_header(_root_record(digest, image)))
        crashpoint("root.import.after-record")
        return RootDisk(device, "raw", HEADER_SIZE, slice_size, imported=True, digest=digest)
    finally:
        os.close(fd)


def _opt(value: str) -> str:
    """A value in qemu's key=value option syntax: a comma is written twice."""
    return value.replace(",", ",,")
