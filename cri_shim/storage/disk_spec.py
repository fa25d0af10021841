"""The `vmlet.dev/disks` pod annotation: which of the pod's volumes the VM gets as disks, and how.

Pure: no files, no libvirt. `parse_disks(annotation, raw)` turns the annotation's YAML/JSON list into
a tuple of `DiskSpec`, or raises `AnnotationError` naming the entry (`vmlet.dev/disks[2].bus: ...`).
Whether the volume an entry names exists, is a block device, fits the image... is the node's business
(cri_shim/storage/disks.py); docs/storage.md describes the whole feature.

Each entry has a `name` and exactly one source:

* `volume: <path>`: the container path of one of the container's mounts (a filesystem volume, KubeVirt's
  filesystem-mode PVC). The disk is `disk.img` in it: created sparse at `capacity` when absent, used as
  it is (after the hostile-image checks) when present.
* `device: <path>`: the container path of one of the container's devices (a `volumeMode: Block` PVC).
  Devices that no entry names are still attached, with the defaults (virtlet's behaviour).
* `configVolume: <path>`: the container path of a mount (ConfigMap, Secret, downwardAPI) whose files are
  packed into an ISO 9660 image, attached read-only.
* `emptyDisk: {capacity: <quantity>}`: a sparse qcow2 that lives as long as the pod sandbox (it survives
  guest reboots and container restarts, not the pod: KubeVirt's emptyDisk).

Options: `root` (volume/device only: the persistent root; the pod's image is written onto it on first
boot), `capacity` (volume only), `bus`, `bootOrder`, `readonly`, `serial`, `cache`, `io`. Unknown keys
are errors, so a typo does not silently do nothing.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

DISKS = "vmlet.dev/disks"
ROOT_REIMAGE = "vmlet.dev/root-reimage"

MAX_DISKS_CHARS = 64 * 1024
MAX_DISK_ENTRIES = 32
MAX_SERIAL = 20  # virtio-blk's serial is 20 bytes (VIRTIO_BLK_ID_BYTES)
MAX_BOOT_ORDER = 1000

Bus = Literal["virtio", "scsi", "sata"]
Cache = Literal["none", "writethrough", "writeback", "directsync", "unsafe"]
IO = Literal["native", "threads", "io_uring"]
Source = Literal["volume", "device", "configVolume", "emptyDisk"]

BUSES: tuple[str, ...] = Bus.__args__  # type: ignore[attr-defined]
CACHES: tuple[str, ...] = Cache.__args__  # type: ignore[attr-defined]
IOS: tuple[str, ...] = IO.__args__  # type: ignore[attr-defined]
SOURCES: tuple[str, ...] = Source.__args__  # type: ignore[attr-defined]
_KEYS = ("name", *SOURCES, "root", "capacity", "bus", "bootOrder", "readonly", "serial", "cache", "io")

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)  # a DNS-1123 label, like KubeVirt's
SERIAL_RE = re.compile(r"[A-Za-z0-9_.+-]{1,20}", re.ASCII)
_PATH_BAD = re.compile(r"[\x00-\x20\x7f]")


class DiskSpec(BaseModel):
    """One entry of `vmlet.dev/disks`, validated. `path` is the container path for volume, device and
    configVolume; None for emptyDisk. `capacity` is bytes (emptyDisk: required; volume: optional)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: Source
    path: str | None = None
    capacity: int | None = None
    root: bool = False
    bus: Bus | None = None  # None: the pod's VirtletDiskDriver
    boot_order: int | None = None
    readonly: bool = False
    serial: str | None = None  # None: default_serial(name)
    cache: Cache = "none"
    io: IO | None = None  # None: libvirt's default

    @property
    def effective_serial(self) -> str:
        return self.serial or default_serial(self.name)


def default_serial(name: str) -> str:
    """The disk's serial when the entry gives none: its name, or for names over 20 characters a
    shortened name with a hash (stable: the guest finds the disk at /dev/disk/by-id/virtio-<serial>)."""
    if len(name) <= MAX_SERIAL:
        return name
    return name[:11] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


def device_disk_name(container_path: str) -> str:
    """The name of a CRI device that no entry names: its container path's last part as a DNS label
    (`/dev/data-1` → `data-1`), or a hash when nothing usable is left."""
    base = container_path.rstrip("/").rsplit("/", 1)[-1].lower()
    base = re.sub(r"[^a-z0-9-]+", "-", base).strip("-")[:63].strip("-")
    return base or "dev-" + hashlib.sha256(container_path.encode()).hexdigest()[:8]


class DiskSpecError(ValueError):
    """Where (`[i].field`) and what; annotations.py wraps it into AnnotationError."""


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _bool(where: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DiskSpecError(f"{where}: {_show(value)} is not true or false")


def _enum(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in {a.lower() for a in allowed}:
        raise DiskSpecError(f"{where}: {_show(value)} is not one of {', '.join(allowed)}")
    low = value.strip().lower()
    return next(a for a in allowed if a.lower() == low)


def _path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 4096 or _PATH_BAD.search(value):
        raise DiskSpecError(f"{where}: {_show(value)} is not an absolute path without spaces or control characters")
    if value == "/" or posixpath.normpath(value) != value:
        raise DiskSpecError(f"{where}: {_show(value)} must be a normalised path other than / (no trailing /, "
                            "//, . or ..): it is matched exactly against the container's mounts and devices")
    return value


def _quantity(where: str, value: Any, parse_quantity) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DiskSpecError(f"{where}: {_show(value)} is not a quantity such as 10Gi")
    try:
        size = parse_quantity(str(value).strip())
    except ValueError as e:
        raise DiskSpecError(f"{where}: {e}") from None
    if size <= 0:
        raise DiskSpecError(f"{where}: {_show(value)} must be greater than zero")
    return size


def parse_entries(data: Any, parse_quantity, max_size: int) -> tuple[DiskSpec, ...]:
    """The entries of an already-parsed annotation value (a list of mappings)."""
    if not isinstance(data, list):
        raise DiskSpecError(": must be a YAML list of disks (- name: ..., volume: ...)")
    if len(data) > MAX_DISK_ENTRIES:
        raise DiskSpecError(f": {len(data)} disks, at most {MAX_DISK_ENTRIES}")
    out: list[DiskSpec] = []
    for i, item in enumerate(data):
        at = f"[{i}]"
        if not isinstance(item, dict):
            raise DiskSpecError(f"{at}: must be a mapping with name and one of {', '.join(SOURCES)}")
        unknown = [k for k in item if k not in _KEYS]
        if unknown:
            raise DiskSpecError(f"{at}: unknown key {_show(unknown[0])} (known: {', '.join(_KEYS)})")
        name = item.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise DiskSpecError(f"{at}.name: {_show(name)} is not a DNS label (a-z, 0-9, '-', at most 63)")
        sources = [s for s in SOURCES if item.get(s) is not None]
        if len(sources) != 1:
            raise DiskSpecError(f"{at}: needs exactly one of {', '.join(SOURCES)}"
                                + (f", not {' and '.join(sources)}" if sources else ""))
        source = sources[0]
        fields: dict[str, Any] = {"name": name, "source": source}
        if source == "emptyDisk":
            ed = item["emptyDisk"]
            if not isinstance(ed, dict) or set(ed) != {"capacity"}:
                raise DiskSpecError(f"{at}.emptyDisk: must be a mapping with capacity (and nothing else)")
            fields["capacity"] = _quantity(f"{at}.emptyDisk.capacity", ed["capacity"], parse_quantity)
        else:
            fields["path"] = _path(f"{at}.{source}", item[source])
        if item.get("capacity") is not None:
            if source != "volume":
                raise DiskSpecError(f"{at}.capacity: only a volume disk (disk.img) has a capacity"
                                    + ("; an emptyDisk's is emptyDisk.capacity" if source == "emptyDisk" else ""))
            fields["capacity"] = _quantity(f"{at}.capacity", item["capacity"], parse_quantity)
        if fields.get("capacity") and fields["capacity"] > max_size:
            where = f"{at}.emptyDisk.capacity" if source == "emptyDisk" else f"{at}.capacity"
            raise DiskSpecError(f"{where}: {fields['capacity']} bytes is over the limit of {max_size // 1024 ** 4}Ti")
        if item.get("root") is not None:
            fields["root"] = _bool(f"{at}.root", item["root"])
            if fields["root"] and source not in ("volume", "device"):
                raise DiskSpecError(f"{at}.root: only a volume or device disk can hold the persistent root")
        if item.get("bus") is not None:
            fields["bus"] = _enum(f"{at}.bus", item["bus"], BUSES)
        if item.get("bootOrder") is not None:
            order = item["bootOrder"]
            if isinstance(order, str) and order.strip().isdigit():
                order = int(order.strip())
            if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_BOOT_ORDER:
                raise DiskSpecError(f"{at}.bootOrder: {_show(order)} is not a whole number from 1 to "
                                    f"{MAX_BOOT_ORDER}")
            fields["boot_order"] = order
        if item.get("readonly") is not None:
            fields["readonly"] = _bool(f"{at}.readonly", item["readonly"])
            if source == "configVolume" and not fields["readonly"]:
                raise DiskSpecError(f"{at}.readonly: a configVolume disk is always read-only")
            if fields["readonly"] and fields.get("root"):
                raise DiskSpecError(f"{at}.readonly: the persistent root cannot be read-only "
                                    "(the image is written onto it)")
        if source == "configVolume":
            fields["readonly"] = True
        if item.get("serial") is not None:
            serial = item["serial"]
            if not isinstance(serial, str) or not SERIAL_RE.fullmatch(serial):
                raise DiskSpecError(f"{at}.serial: {_show(serial)} is not 1 to {MAX_SERIAL} of A-Z a-z 0-9 _ . + -")
            fields["serial"] = serial
        if item.get("cache") is not None:
            fields["cache"] = _enum(f"{at}.cache", item["cache"], CACHES)
        if item.get("io") is not None:
            fields["io"] = _enum(f"{at}.io", item["io"], IOS)
            if fields["io"] == "native" and fields.get("cache", "none") not in ("none", "directsync"):
                raise DiskSpecError(f"{at}.io: native I/O needs cache none or directsync "
                                    f"(QEMU opens the file with O_DIRECT), not {fields['cache']}")
        out.append(DiskSpec(**fields))
    _check_unique(out)
    return tuple(out)


def _check_unique(disks: list[DiskSpec]) -> None:
    seen: dict[tuple[str, Any], int] = {}
    for i, d in enumerate(disks):
        keys = [("name", d.name), ("serial", d.effective_serial)]
        if d.path is not None:
            keys.append(("path", d.path))
        if d.boot_order is not None:
            keys.append(("bootOrder", d.boot_order))
        for kind, value in keys:
            j = seen.setdefault((kind, value), i)
            if j != i:
                what = {"path": "volume or device path"}.get(kind, kind)
                raise DiskSpecError(f"[{i}].{kind if kind != 'path' else d.source}: {what} {_show(value)} "
                                    f"is also disk [{j}]'s")
    roots = [i for i, d in enumerate(disks) if d.root]
    if len(roots) > 1:
        raise DiskSpecError(f"[{roots[1]}].root: disk [{roots[0]}] is the root already; a VM has one")
