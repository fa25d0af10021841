"""Is a downloaded file an image vmlet accepts? qcow2 or raw, self-contained, unencrypted, of bounded size.

Two independent checks, both must pass:
1. Our own reading of the first bytes: the qcow2 header (backing file offset, encryption method, the
   external-data-file and corrupt feature bits, the virtual size), or for raw images a partition table.
   It gives precise messages and needs no subprocess.
2. `qemu-img info --output=json -f <format> --force-share` run under CPU-time and address-space limits
   (`prlimit`, as OpenStack does since CVE-2015-5162: a crafted image can make qemu-img spin or allocate
   without bound) and a wall-clock timeout. `-f` is always given: format probing is never trusted.

Raw: qemu-img calls any bytes "raw" (an HTML error page, a tarball), so a raw image is accepted only if it
looks like a disk: an MBR boot signature 0x55AA at offset 510 or a GPT header ("EFI PART") at offset 512,
and a size that is a multiple of 512. A raw filesystem image without a partition table is refused;
convert it to qcow2 (or add a partition table).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from image_service.errors import ImageRejected

QCOW2_MAGIC = b"QFI\xfb"
# qcow2 incompatible feature bits (docs/interop/qcow2.txt): 0 dirty, 1 corrupt, 2 external data file,
# 3 compression type, 4 extended L2 entries. Unknown bits mean a format we cannot vouch for.
_CORRUPT, _DATA_FILE, _KNOWN_INCOMPAT = 1 << 1, 1 << 2, (1 << 5) - 1
# Recognised only to name them in the refusal: other disk formats, and what error pages and archives look like.
_OTHER_FORMATS = ((0, b"KDMV", "vmdk"), (0, b"# Disk DescriptorFile", "vmdk"), (0, b"COWD", "vmdk"),
                  (0, b"vhdxfile", "vhdx"), (0, b"conectix", "vpc (vhd)"), (0, b"QED\x00", "qed"),
                  (0, b"LUKS\xba\xbe", "luks"), (64, b"\x7f\x10\xda\xbe", "vdi"))
_OTHER_CONTENT = ((0, b"\x1f\x8b", "gzip data"), (0, b"\xfd7zXZ\x00", "xz data"), (0, b"BZh", "bzip2 data"),
                  (0, b"(\xb5/\xfd", "zstd data"), (257, b"ustar", "a tar archive"),
                  (0, b"PK\x03\x04", "a zip archive"), (0, b"<", "HTML or XML text (an error page?)"))


@dataclass(frozen=True)
class ImageInfo:
    format: str  # qcow2 | raw
    virtual_size: int


@dataclass(frozen=True)
class Validator:
    max_virtual_size: int = 1 << 40  # 1 TiB
    cpu_seconds: int = 30
    address_space: int = 1 << 30  # bytes
    wall_timeout: float = 60.0
    qemu_img: str = "qemu-img"

    def validate(self, path: Path) -> ImageInfo:
        """ImageInfo of an acceptable image; ImageRejected naming the reason otherwise."""
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4096)
        if head.startswith(QCOW2_MAGIC):
            fmt, vsize = "qcow2", self._qcow2_header(path, head)
        elif _has_partition_table(head) and size % 512 == 0:
            fmt, vsize = "raw", size
        else:
            raise ImageRejected(_not_an_image(head, size))
        self._check_size(vsize)
        info = self._qemu_img_info(path, fmt)
        self._check_info(info, fmt)
        return ImageInfo(fmt, int(info["virtual-size"]))

    def validate_volume_image(self, path: Path, fmt: str) -> ImageInfo:
        """ImageInfo of an existing disk on a volume (`disk.img`) taken as `fmt`; ImageRejected otherwise.

        Unlike validate(), the format is the caller's (a record, or the qcow2 magic), not guessed: a raw
        disk needs no partition table (a blank or whole-disk file system is a fine raw disk), only a
        non-zero size that is a multiple of 512, and is never given to qemu-img (raw has nothing to
        follow). A qcow2 gets the same header checks and `qemu-img info` under limits as a download.
        """
        if fmt == "raw":
            size = path.stat().st_size
            if size == 0 or size % 512:
                raise ImageRejected(f"raw disk size {size} bytes is not a positive multiple of 512")
            return ImageInfo("raw", size)
        if fmt != "qcow2":
            raise ValueError(f"format {fmt!r} is not raw or qcow2")
        with path.open("rb") as f:
            head = f.read(4096)
        if not head.startswith(QCOW2_MAGIC):
            raise ImageRejected("not a qcow2 image (no qcow2 magic at offset 0)")
        self._check_size(self._qcow2_header(path, head))
        info = self._qemu_img_info(path, fmt)
        self._check_info(info, fmt)
        return ImageInfo(fmt, int(info["virtual-size"]))

    def _check_size(self, vsize: int) -> None:
        if vsize > self.max_virtual_size:
            raise ImageRejected(f"virtual size {_human(vsize)} ({vsize} bytes) exceeds the limit of "
                                f"{_human(self.max_virtual_size)}")

    def _qcow2_header(self, path: Path, head: bytes) -> int:
        if len(head) < 72:
            raise ImageRejected("truncated qcow2 header")
        version, backing_off, backing_len, _, vsize, crypt = struct.unpack_from(">IQIIQI", head, 4)
        if version not in (2, 3):
            raise ImageRejected(f"unsupported qcow2 version {version}")
        if backing_off:
            raise ImageRejected(f"qcow2 image has a backing file ({_read_name(path, backing_off, backing_len)}); "
                                "images must be self-contained")
        if crypt:
            raise ImageRejected(f"qcow2 image is encrypted ({ {1: 'AES', 2: 'LUKS'}.get(crypt, crypt)}); "
                                "vmlet has no key for it")
        if version == 3:
            if len(head) < 80:
                raise ImageRejected("truncated qcow2 v3 header")
            (incompat,) = struct.unpack_from(">Q", head, 72)
            if incompat & _DATA_FILE:
                raise ImageRejected("qcow2 image uses an external data file; images must be self-contained")
            if incompat & _CORRUPT:
                raise ImageRejected("qcow2 image is marked corrupt")
            if incompat & ~_KNOWN_INCOMPAT:
                raise ImageRejected(f"qcow2 image uses unknown incompatible features (0x{incompat:x})")
        return vsize

    def _qemu_img_info(self, path: Path, fmt: str) -> dict:
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise RuntimeError("prlimit (util-linux) is needed to run qemu-img under resource limits")
        cmd = [prlimit, f"--cpu={self.cpu_seconds}", f"--as={self.address_space}", "--",
               self.qemu_img, "info", "--output=json", "-f", fmt, "--force-share", str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=self.wall_timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ImageRejected(f"qemu-img info took longer than {self.wall_timeout:g}s") from None
        if proc.returncode < 0 or proc.returncode in (128 + 9, 128 + 24):  # SIGKILL / SIGXCPU
            raise ImageRejected(f"qemu-img info exceeded its resource limits (exit {proc.returncode})")
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise ImageRejected(f"qemu-img cannot read it as {fmt}: {msg[-1] if msg else proc.returncode}")
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise ImageRejected("qemu-img info printed invalid JSON") from None

    def _check_info(self, info: dict, fmt: str) -> None:
        data = (info.get("format-specific") or {}).get("data") or {}
        if info.get("format") != fmt:
            raise ImageRejected(f"qemu-img reads it as {info.get('format')!r}, not {fmt}")
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise ImageRejected(f"image has a backing file ({info.get('backing-filename')!r}); "
                                "images must be self-contained")
        if data.get("data-file"):
            raise ImageRejected("qcow2 image uses an external data file; images must be self-contained")
        if info.get("encrypted") or data.get("encrypt"):
            raise ImageRejected("image is encrypted; vmlet has no key for it")
        if data.get("corrupt"):
            raise ImageRejected("qcow2 image is marked corrupt")
        if not isinstance(info.get("virtual-size"), int):
            raise ImageRejected("qemu-img reports no virtual size")
        self._check_size(info["virtual-size"])


def _has_partition_table(head: bytes) -> bool:
    return head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART"


def _not_an_image(head: bytes, size: int) -> str:
    if size == 0:
        return "not a disk image: the file is empty"
    for offset, magic, name in _OTHER_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            return f"format {name} is not accepted (only qcow2 and raw disk images)"
    for offset, magic, name in _OTHER_CONTENT:
        if head[offset:offset + len(magic)] == magic:
            return f"not a disk image: it looks like {name}"
    if _has_partition_table(head):
        return f"not a disk image: raw image size {size} is not a multiple of 512"
    return ("not a disk image: no qcow2 header and no MBR or GPT partition table "
            "(raw images must start with a partition table)")


def _read_name(path: Path, offset: int, length: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return repr(f.read(min(length, 256)).decode("utf-8", "replace"))
    except (OSError, OverflowError, ValueError):
        return "unreadable name"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
