"""The persistent root: the pod's image written once onto a volume or a block device (docs/storage.md).

A root is imported when it is blank, or when the pod asks for it (`vmlet.dev/root-reimage`), and then
only used. What vmlet wrote is recorded where the root is, so the next pod, container or node knows:

* file root (a filesystem volume): `disk.img`, raw, converted into `disk.img.vmlet-import`, grown to
  the capacity, fsynced, recorded in `.vmlet-disk.json` (`root.imageDigest`, `root.state: importing`),
  renamed to disk.img, recorded `state: ready`. A record still saying importing means vmlet's import did
  not finish: it is done again. A file at the temp's name is only ever deleted: anyone can make one, so
  it is no reason to import. The whole call holds the volume's lock (volume_image.locked).
* block root: the image at offset HEADER_SIZE (the guest sees a libvirt slice from there), then vmlet's
  header in the first 4 KiB: magic, version, length, crc32 and JSON {imageDigest, image, importedAt}.
  The header is written last, in one 4 KiB write (and cleared first when re-imaging), so a crash leaves a
  blank header and the next call imports again. A header with the magic that fails its checks is not a
  crash's outcome: it is refused, not imported over, unless the pod asks to re-image.

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
IMPORTING, READY = "importing", "ready"  # root.state in a file root's record
QEMU_IMG_MIN_TIMEOUT = 120.0
QEMU_IMG_MIN_RATE = 8 * vi.MIB  # bytes/s a qemu-img run may not fall below before it is called hung


class RootError(Exception):
    pass


class RootDigestMismatch(RootError):
    def __init__(self, path: Path, recorded: str, wanted: str, importing: bool = False) -> None:
        self.recorded, self.wanted = recorded, wanted
        holds = f"was being imported with image {recorded} (an interrupted re-image)" if importing \
            else f"holds image {recorded}"
        super().__init__(f"the persistent root {path} {holds} (vmlet's record), not the pod's "
                         f"image {wanted}; set the pod annotation {ROOT_REIMAGE}: \"true\" to write the pod's "
                         "image over it")


class RootHeaderDamaged(RootError):
    def __init__(self, device: Path, why: str) -> None:
        super().__init__(f"damaged vmlet header on {device} ({why}); set the pod annotation {ROOT_REIMAGE}: "
                         "\"true\" to write the image again")


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
    another, or vmlet's own import of it was interrupted), else used as it is: vmlet's import of
    `digest`, or a user's own disk (digest None). `capacity` is fitted as volume_image.fit_capacity
    does; the root must still hold the image (RootTooSmall)."""
    path = volume_dir / vi.IMAGE_NAME
    with vi.locked(volume_dir) as dirfd:
        vi.remove_leftovers(dirfd, volume_dir)
        vi.remove_temp(dirfd, volume_dir, IMPORT_TEMP)  # a crash's (or anyone's): never a reason to import
        present = _lstat(dirfd, vi.IMAGE_NAME)
        record = vi._read_record_at(dirfd, volume_dir)
        root = record.get("root") if record else None
        recorded = root.get("imageDigest") if isinstance(root, dict) else None
        # Written before the rename, "ready" after it: disk.img may still be what was there before.
        importing = isinstance(root, dict) and root.get("state") == IMPORTING
        if present is not None:
            if recorded == digest and not importing:
                return _use(dirfd, volume_dir, validator, digest)
            if recorded is not None and recorded != digest and not reimage:
                raise RootDigestMismatch(path, recorded, digest, importing=importing)
            if recorded is None and not reimage:  # a user's own disk (or a data disk vmlet created)
                return _use(dirfd, volume_dir, validator, None)
            if not stat.S_ISREG(present.st_mode):
                raise vi.VolumeImageRejected(f"{path} is {vi._kind(present.st_mode)}, not a regular file; "
                                             "vmlet does not write the image over it")
        return _import_file(dirfd, volume_dir, base, base_format, digest, image, capacity, previous=record,
                            replace=present is not None, freed=(present.st_blocks * 512) if present else 0)


def _use(dirfd: int, volume_dir: Path, validator: Validator | None, digest: str | None) -> RootDisk:
    got = vi._check_at(dirfd, volume_dir, validator, read_only=False)
    if got is None:
        raise vi.VolumeImageError(f"{volume_dir / vi.IMAGE_NAME} vanished while vmlet held its volume's lock")
    fd, used = got
    os.close(fd)
    return RootDisk(used.path, used.format, 0, None, imported=False, digest=digest)


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _import_file(dirfd: int, volume_dir: Path, base: Path, base_format: str, digest: str, image: str,
                 capacity: int | None, previous: dict | None, replace: bool, freed: int) -> RootDisk:
    path, tmp_path = volume_dir / vi.IMAGE_NAME, volume_dir / IMPORT_TEMP
    vsize = base_virtual_size(base, base_format)
    if capacity is not None and capacity <= 0:
        raise RootError(f"capacity of {path} must be greater than zero, not {capacity}")
    wanted = vi.round_up_mib(capacity) if capacity is not None else vi.default_capacity(volume_dir)
    if wanted < vsize:
        raise RootTooSmall(path, image, vsize, wanted)
    # A replaced disk.img's blocks come back.
    size = vi.fit_capacity(volume_dir, path, wanted, freed=freed, what="import the image into")
    if size < vsize:
        raise RootTooSmall(path, image, vsize, size)
    try:
        fd = os.open(IMPORT_TEMP, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660,
                     dir_fd=dirfd)
    except OSError as e:
        raise RootError(f"cannot create {tmp_path}: {e.strerror}") from None
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
        root = _root_record(digest, image)
        # From here on until "ready" the record says importing: a crash makes the next call import again.
        vi.write_record_at(dirfd, volume_dir, {"format": "raw", "createdBy": "vmlet",
                                               "root": {**root, "state": IMPORTING}})
        crashpoint("root.import.after-record")
        written = os.fstat(fd)
        try:
            vi.publish(dirfd, volume_dir, IMPORT_TEMP, replace=replace)
        except vi.VolumeImageError:
            if not replace and _lstat(dirfd, vi.IMAGE_NAME) is not None:
                # Another writer's disk.img appeared: ours was not published, and "importing" must not
                # make the next call import over theirs.
                _restore_record(dirfd, volume_dir, previous)
            raise
        now = _lstat(dirfd, vi.IMAGE_NAME)
        if now is None or (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino):
            raise RootError(f"{path} changed while vmlet renamed its import onto it; retry")
        crashpoint("root.import.after-rename")
        vi.write_record_at(dirfd, volume_dir, {"format": "raw", "createdBy": "vmlet",
                                               "root": {**root, "state": READY}})
    finally:
        os.close(fd)
        try:
            vi.remove_temp(dirfd, volume_dir, IMPORT_TEMP)  # gone after the rename; else a failure's leftover
        except vi.VolumeImageError:
            pass
    return RootDisk(path, "raw", 0, None, imported=True, digest=digest)


def _restore_record(dirfd: int, volume_dir: Path, previous: dict | None) -> None:
    if previous is not None:
        vi.write_record_at(dirfd, volume_dir, previous)
        return
    try:
        os.unlink(vi.RECORD_NAME, dir_fd=dirfd)
        vi.fsync_dir(dirfd)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise vi.VolumeImageError(f"cannot remove {volume_dir / vi.RECORD_NAME}: {e.strerror}") from None


# ---------------------------------------------------------------- block root

def _encode_header(record: dict) -> bytes:
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER_JSON:
        raise RootError(f"vmlet's root header would be {len(body)} bytes, over {MAX_HEADER_JSON}")
    block = _HEADER.pack(HEADER_MAGIC, HEADER_VERSION, len(body), zlib.crc32(body)) + body
    return block + bytes(HEADER_BLOCK - len(block))


def _decode_header(block: bytes, device: Path) -> dict | None:
    """vmlet's header, or None when the first bytes are not vmlet's magic (blank or a user's disk).
    RootHeaderDamaged when the magic is there and the rest fails its checks: the header is one 4 KiB
    write after an fsync of the image, so that is damage (or a forgery), not a crash's outcome."""
    if not block.startswith(HEADER_MAGIC):
        return None
    if len(block) < _HEADER.size:
        raise RootHeaderDamaged(device, "cut short")
    _, version, length, crc = _HEADER.unpack_from(block)
    if version != HEADER_VERSION:
        raise RootError(f"{device} has a vmlet root header of version {version}, which this vmlet does not "
                        f"know (it writes version {HEADER_VERSION})")
    if length > MAX_HEADER_JSON:
        raise RootHeaderDamaged(device, f"length {length} is over {MAX_HEADER_JSON}")
    body = block[_HEADER.size:_HEADER.size + length]
    if zlib.crc32(body) != crc:
        raise RootHeaderDamaged(device, "crc32 mismatch")
    try:
        record = json.loads(body)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("imageDigest"), str):
        raise RootHeaderDamaged(device, "no JSON object with an imageDigest")
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
    none (a blank device, a user's disk); RootHeaderDamaged for a header that fails its checks."""
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
        try:
            header = _decode_header(first, device)
        except RootHeaderDamaged:
            if not reimage:
                raise
            header = None  # the pod asks for the image to be written again: over the damage
        slice_size = dev_size - HEADER_SIZE
        if header is not None:
            recorded = header["imageDigest"]
            if recorded == digest:
                return RootDisk(device, "raw", HEADER_SIZE, slice_size, imported=False, digest=digest)
            if not reimage:
                raise RootDigestMismatch(device, recorded, digest)
        elif first.count(0) == len(first):
            pass  # blank: import
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
