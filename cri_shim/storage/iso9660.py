"""ISO 9660 images (Rock Ridge + Joliet) built in memory with pycdlib, the same bytes for the same files.

Used for the cloud-init disk (cri_shim/cloudinit.py) and the configVolume disks
(cri_shim/storage/config_iso.py).

Names: the ISO 9660 names are counters (`F0000001`): its d-characters cannot
hold the real names, which live in the Rock Ridge records (what Linux reads
when it finds them) and in the Joliet records (what Windows reads). Joliet
cannot hold every name: pycdlib limits a Joliet name to 64 UTF-8 bytes, UCS-2
has no characters beyond the BMP, and Joliet forbids control characters and
`* / : ; ? \\`. A file or directory whose name breaks those rules is recorded
in Rock Ridge only: it is absent from the Joliet tree (with everything under
it), never renamed there. `joliet_name_ok` says which names qualify.

Deterministic: pycdlib stamps the current local time into every directory
record, Rock Ridge TF record and volume descriptor (the modification date
only while writing). `IsoBuilder.to_bytes` sets them all to `FIXED_TIME`
(1970-01-01 00:00:00 UTC), so the output depends only on the files and the
order they were added in, not on when, or in which time zone, it was built.
Callers that want one image per set of files add them in a fixed order.
"""

from __future__ import annotations

import io
import re
import struct
import time
from typing import Iterator

import pycdlib
from pycdlib import dates

FIXED_TIME = time.gmtime(0)

# ECMA-119 8.4: a volume descriptor is one 2048-byte sector from sector 16 on; type 255 ends the set.
_SECTOR = 2048
_FIRST_VD_SECTOR = 16
_VD_TERMINATOR = 255
_VD_PRIMARY, _VD_SUPPLEMENTARY = 1, 2
_VD_DATE_LEN = 17
# ECMA-119 8.4.26-8.4.29: creation, modification, expiration, effective; expiration is left "not specified".
_VD_DATE_OFFSETS = (813, 830, 864)

_PVD_LABEL_BYTES = 32
_JOLIET_LABEL_CHARS = 16
_JOLIET_MAX_NAME_BYTES = 64  # pycdlib counts the UTF-8 bytes of a Joliet name
_JOLIET_FORBIDDEN = re.compile(r"[\x00-\x1f*/:;?\\]")


def _dr_date() -> dates.DirectoryRecordDate:
    d = dates.DirectoryRecordDate()
    t = FIXED_TIME
    d.parse(struct.pack("=BBBBBBb", t.tm_year - 1900, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, 0))
    return d


def _vd_date_bytes() -> bytes:
    # 16 digits YYYYMMDDHHMMSShh, then the offset from GMT in 15-minute steps.
    return time.strftime("%Y%m%d%H%M%S", FIXED_TIME).encode() + b"00" + b"\x00"


def _vd_date() -> dates.VolumeDescriptorDate:
    d = dates.VolumeDescriptorDate()
    d.parse(_vd_date_bytes())
    return d


def joliet_name_ok(name: str) -> bool:
    """Whether `name` (one path component) can be recorded in the Joliet tree as it is."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (0 < len(encoded) <= _JOLIET_MAX_NAME_BYTES and not _JOLIET_FORBIDDEN.search(name)
            and all(ord(c) <= 0xFFFF for c in name))


class IsoBuilder:
    """One ISO image: add files (directories are made on the way), then `to_bytes` once.

    `interchange_level` 3 keeps directories at most 8 levels deep (pycdlib
    relocates deeper ones into an `rr_moved` directory); 4 (ISO 9660:1999)
    has no depth limit and no relocation.
    """

    def __init__(self, volume_label: str, *, interchange_level: int = 3) -> None:
        label = volume_label.encode()
        if len(label) > _PVD_LABEL_BYTES:
            raise ValueError(f"ISO volume label {volume_label!r} is longer than {_PVD_LABEL_BYTES} bytes")
        self._iso = pycdlib.PyCdlib()
        # Joliet's label is UCS-2 in the same 32 bytes: its first 16 characters, as genisoimage does
        # (blkid joins the two); the primary and ISO 9660:1999 descriptors get all of it.
        self._iso.new(interchange_level=interchange_level, joliet=3, rock_ridge="1.09",
                      vol_ident=volume_label[:_JOLIET_LABEL_CHARS])
        for vd in (self._iso.pvd, self._iso.enhanced_vd):
            if vd is not None:
                vd.volume_identifier = label.ljust(_PVD_LABEL_BYTES, b" ")
        self._dir_paths: dict[str, str] = {}  # real path -> ISO9660 path
        self._joliet_dirs: set[str] = {"/"}  # real paths of directories present in the Joliet tree
        self._count = 0
        self._done = False

    def _iso_name(self, is_dir: bool) -> str:
        # A counter keeps the short names unique however the real names collide when mangled.
        self._count += 1
        return f"F{self._count:07d}" if is_dir else f"F{self._count:07d}.;1"

    def _ensure_dir(self, parts: list[str]) -> str:
        iso_path = ""
        for depth in range(1, len(parts) + 1):
            real = "/" + "/".join(parts[:depth])
            if real not in self._dir_paths:
                name = parts[depth - 1]
                parent = "/" + "/".join(parts[:depth - 1])
                joliet = parent in self._joliet_dirs and joliet_name_ok(name)
                child = f"{iso_path}/{self._iso_name(True)}"
                self._iso.add_directory(child, rr_name=name, joliet_path=real if joliet else None)
                self._dir_paths[real] = child
                if joliet:
                    self._joliet_dirs.add(real)
            iso_path = self._dir_paths[real]
        return iso_path

    def add_file(self, path: str, data: bytes, *, mode: int = 0o444) -> None:
        """Add `data` as the file `path` ('/'-separated, relative or absolute), Rock Ridge
        permissions `mode` (a regular file's 0o7777 bits)."""
        if self._done:
            raise RuntimeError("the ISO was already written")
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"ISO file path {path!r} must name a file")
        parent = self._ensure_dir(parts[:-1]) if len(parts) > 1 else ""
        parent_real = "/" + "/".join(parts[:-1])
        joliet = parent_real in self._joliet_dirs and joliet_name_ok(parts[-1])
        self._iso.add_fp(io.BytesIO(data), len(data), f"{parent}/{self._iso_name(False)}", rr_name=parts[-1],
                         joliet_path="/" + "/".join(parts) if joliet else None,
                         file_mode=0o100000 | (mode & 0o7777))

    def _records(self) -> Iterator:
        seen: set[int] = set()
        vds = [self._iso.pvd, self._iso.joliet_vd, self._iso.enhanced_vd, *self._iso.svds]
        stack = [vd.root_dir_record for vd in vds if vd is not None]
        while stack:
            rec = stack.pop()
            if id(rec) in seen:
                continue
            seen.add(id(rec))
            yield rec
            stack.extend(getattr(rec, "children", ()))

    def _fix_times(self) -> None:
        dr_date = _dr_date()
        for rec in self._records():
            rec.date = dr_date
            rr = rec.rock_ridge
            for entries in (rr.dr_entries, rr.ce_entries) if rr is not None else ():
                tf = entries.tf_record if entries is not None else None
                if tf is None:
                    continue
                for field in ("creation_time", "access_time", "modification_time", "attribute_change_time",
                              "backup_time", "expiration_time", "effective_time"):
                    old = getattr(tf, field)
                    if old is not None:
                        setattr(tf, field, dr_date if isinstance(old, dates.DirectoryRecordDate) else _vd_date())

    def to_bytes(self) -> bytes:
        """The image; the builder is finished afterwards."""
        if self._done:
            raise RuntimeError("the ISO was already written")
        self._done = True
        self._fix_times()
        out = io.BytesIO()
        try:
            self._iso.write_fp(out)
        finally:
            self._iso.close()
        image = out.getbuffer()
        stamp = _vd_date_bytes()
        # The volume descriptors' dates are made while writing (the modification date is "now"): patch them.
        for sector in range(_FIRST_VD_SECTOR, len(image) // _SECTOR):
            base = sector * _SECTOR
            vd_type = image[base]
            if bytes(image[base + 1:base + 6]) != b"CD001" or vd_type == _VD_TERMINATOR:
                break
            if vd_type in (_VD_PRIMARY, _VD_SUPPLEMENTARY):
                for offset in _VD_DATE_OFFSETS:
                    image[base + offset:base + offset + _VD_DATE_LEN] = stamp
        data = bytes(image)
        image.release()
        return data
