"""The pod's volumes as the VM's disks: plan → build → record (docs/storage.md).

`plan` checks the `vmlet.dev/disks` entries against the container's CRI mounts and devices before
anything on the host changes: an entry naming no mount, a device that is not a block device, two
disks with one serial, too many disks → `DiskPlanError` naming the field (InvalidArgument).
`build` then makes each disk usable by QEMU: disk images on filesystem volumes (created when
absent), persistent roots (the image imported once), emptyDisks, configVolume ISOs; failures of the
host or of a volume's content are `DiskBuildError` (FailedPrecondition). What was attached is
written to the VM directory's `disks.json`, so StartContainer after a host reboot, the stats, the
status and recovery know the disks without the request.

QEMU runs unprivileged and cannot traverse the kubelet's 0750 pod directories, so a disk image on a
volume, and a device node outside /dev, are bind-mounted into the VM directory (`disks/<name>`).
The binds go away when the VM stops (pod_volumes.release) and are made again at start. Nothing here
ever deletes or rewrites data on a volume: the only writes are a missing disk.img, its record and a
persistent root's first import (or an explicitly asked re-image).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from proto.runtime.v1 import api_pb2

from ..domain_xml import Disk
from . import config_iso, persistent_root, pod_volumes, volume_image
from .disk_spec import DISKS, DiskSpec, default_serial, device_disk_name
from .vm_files import PodFiles, VMFiles, VolumeError, _qemu_img, write_file_atomic

DISK_PERMISSIONS = frozenset("rwm")


class DiskPlanError(ValueError):
    """The request cannot give the VM these disks (names the field): InvalidArgument."""


class DiskBuildError(Exception):
    """The host or a volume's content refused (names the disk and why): FailedPrecondition."""


@dataclass(frozen=True)
class Planned:
    spec: DiskSpec
    field: str  # where the disk comes from, for messages
    host_path: str  # the volume directory or the device, resolved
    read_only: bool


@dataclass(frozen=True)
class Attached:
    """One disk as the domain has it; a line of disks.json."""

    name: str
    kind: str  # volume | device | configVolume | emptyDisk
    serial: str
    bus: str
    target: str
    source: str  # file | block: what libvirt opens
    path: str  # what libvirt opens: a bind in the VM directory, a device, an ISO, an emptyDisk
    host_path: str  # the volume's file or device itself
    format: str
    readonly: bool
    cache: str
    io: str | None = None
    boot_order: int | None = None
    slice_offset: int | None = None
    slice_size: int | None = None
    bind: bool = False  # `path` is a bind mount of `host_path`, made again at every start
    persistent: bool = False  # the data lives on a volume: never vmlet's to delete
    root: bool = False
    container_path: str | None = None  # devices: where the guest links the disk (mount script)
    digest: str | None = None  # persistent root: the image digest it holds per vmlet's record

    def disk(self) -> Disk:
        return Disk(self.path, self.target, bus=self.bus, format=self.format, readonly=self.readonly,  # type: ignore[arg-type]
                    serial=self.serial, source=self.source, cache=self.cache, io=self.io,  # type: ignore[arg-type]
                    boot_order=self.boot_order, slice_offset=self.slice_offset, slice_size=self.slice_size,
                    no_backing=True)


# ------------------------------------------------------------------ plan


def _check_devices(devices: Sequence[api_pb2.Device]) -> None:
    seen: dict[str, int] = {}
    for i, d in enumerate(devices):
        field = f"config.devices[{i}]"
        if not d.host_path.startswith("/"):
            raise DiskPlanError(f"{field}.host_path {d.host_path!r} must be an absolute path")
        cpath = d.container_path
        if (not cpath.startswith("/") or cpath == "/" or posixpath.normpath(cpath) != cpath
                or any(c.isspace() for c in cpath)):
            raise DiskPlanError(f"{field}.container_path {cpath!r} must be a normalised absolute path other than / "
                                "without whitespace (the guest gets a link to the disk there)")
        perms = d.permissions or "rwm"
        if not set(perms) <= DISK_PERMISSIONS:
            raise DiskPlanError(f"{field}.permissions {d.permissions!r} may only hold r, w and m")
        if "r" not in perms:
            raise DiskPlanError(f"{field}.permissions {d.permissions!r}: a VM disk must be readable (r)")
        if d.container_path in seen:
            raise DiskPlanError(f"{field}.container_path {d.container_path!r} is also "
                                f"config.devices[{seen[d.container_path]}]'s")
        seen[d.container_path] = i


def _block_device(field: str, host_path: str) -> str:
    real = os.path.realpath(host_path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise DiskPlanError(f"{field}.host_path {host_path!r}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" if stat.S_ISREG(st.st_mode) \
            else "not a block device"
        raise DiskPlanError(f"{field}.host_path {host_path!r} is {kind}, not a block device "
                            "(a volumeMode: Block volume)")
    return real


def _volume_dir(field: str, host_path: str) -> str:
    real = os.path.realpath(host_path)
    if not os.path.isdir(real):
        raise DiskPlanError(f"{field}.host_path {host_path!r} is not a directory: a disk volume is a "
                            "filesystem volume that holds (or will hold) disk.img")
    return real


def plan(disks: Sequence[DiskSpec], mounts: Sequence[api_pb2.Mount], devices: Sequence[api_pb2.Device],
         *, max_disks: int) -> tuple[list[Planned], set[str]]:
    """The disks from the pod's volumes, in domain order (annotation order, then devices no entry
    names), and the container paths of the mounts they consume (not shared over virtio-fs)."""
    _check_devices(devices)
    mount_at = {m.container_path: (i, m) for i, m in enumerate(mounts)}
    device_at = {d.container_path: (i, d) for i, d in enumerate(devices)}
    planned: list[Planned] = []
    consumed: set[str] = set()
    used_devices: set[str] = set()
    for i, spec in enumerate(disks):
        where = f"pod annotation {DISKS}[{i}]"
        if spec.source in ("volume", "configVolume"):
            if spec.path not in mount_at:
                known = ", ".join(sorted(mount_at)) or "none"
                raise DiskPlanError(f"{where}.{spec.source}: the container has no mount at {spec.path!r} "
                                    f"(its mounts' container paths: {known})")
            j, m = mount_at[spec.path]
            field = f"config.mounts[{j}]"
            host = _volume_dir(field, m.host_path)
            if spec.root and m.readonly:
                raise DiskPlanError(f"{where}.root: {field} is read-only; the image is written onto the root")
            planned.append(Planned(spec, field, host, spec.readonly or m.readonly or spec.source == "configVolume"))
            consumed.add(spec.path)  # type: ignore[arg-type]
        elif spec.source == "device":
            if spec.path not in device_at:
                known = ", ".join(sorted(device_at)) or "none"
                raise DiskPlanError(f"{where}.device: the container has no device at {spec.path!r} "
                                    f"(its devices' container paths: {known})")
            j, d = device_at[spec.path]
            field = f"config.devices[{j}]"
            host = _block_device(field, d.host_path)
            writable = "w" in (d.permissions or "rwm")
            if spec.root and not writable:
                raise DiskPlanError(f"{where}.root: {field}.permissions {d.permissions!r} lack w; the image is "
                                    "written onto the root")
            planned.append(Planned(spec, field, host, spec.readonly or not writable))
            used_devices.add(spec.path)  # type: ignore[arg-type]
        else:
            planned.append(Planned(spec, where, "", spec.readonly))
    taken = {p.spec.name for p in planned} | {p.spec.effective_serial for p in planned}
    for j, d in enumerate(devices):
        if d.container_path in used_devices:
            continue
        field = f"config.devices[{j}]"
        name = device_disk_name(d.container_path)
        if name in taken or default_serial(name) in taken:
            name = f"dev{j}-" + name[:50].rstrip("-")
        taken |= {name, default_serial(name)}
        spec = DiskSpec(name=name, source="device", path=d.container_path)
        planned.append(Planned(spec, field, _block_device(field, d.host_path), "w" not in (d.permissions or "rwm")))
    serials: dict[str, str] = {}
    volumes: dict[str, str] = {}
    for p in planned:
        other = serials.setdefault(p.spec.effective_serial, p.field)
        if other != p.field:
            raise DiskPlanError(f"{p.field}: serial {p.spec.effective_serial!r} is also {other}'s")
        # One disk per volume: QEMU would refuse the second at start (image locking), after an import.
        other = volumes.setdefault(p.host_path, p.field) if p.host_path else p.field
        if other != p.field:
            raise DiskPlanError(f"{p.field}.host_path is the same volume as {other}'s ({p.host_path}): "
                                "a volume can be one disk only")
    own = ["cloud-init"] if any(p.spec.root for p in planned) else ["root", "cloud-init"]
    if len(planned) + len(own) > max_disks:
        raise DiskPlanError(f"pod annotation {DISKS} and config.devices: {len(planned)} disks plus the "
                            f"{len(own)} of vmlet ({', '.join(own)}) are more than this node's max_disks of "
                            f"{max_disks}")
    return planned, consumed


def root_boot_order(disks: Sequence[DiskSpec]) -> int:
    """The root's boot order when its entry gives none: the first one no disk has (1, usually)."""
    root = next((d for d in disks if d.root), None)
    if root is not None and root.boot_order is not None:
        return root.boot_order
    used = {d.boot_order for d in disks if d.boot_order is not None}
    return next(n for n in range(1, len(used) + 2) if n not in used)


# ------------------------------------------------------------------ targets


class Targets:
    """Guest device names by bus: vda, vdb... for virtio; sda, sdb... shared by scsi and sata."""

    def __init__(self) -> None:
        self._next = {"vd": 0, "sd": 0}

    def take(self, bus: str) -> str:
        prefix = "vd" if bus == "virtio" else "sd"
        n = self._next[prefix]
        self._next[prefix] += 1
        return prefix + _letters(n)


def _letters(n: int) -> str:
    out = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


# ------------------------------------------------------------------ build


@dataclass(frozen=True)
class RootImage:
    """What a persistent root gets written onto it: the image store's file of the pod's image."""

    base: Path
    format: str
    digest: str  # sha256:<hex>
    name: str
    reimage: bool


def build(planned: Sequence[Planned], *, files: VMFiles, pod: PodFiles, default_bus: str, targets: Targets,
          root_image: RootImage | None, root_boot_order: int = 1) -> list[Attached]:
    """Make every planned disk usable; DiskBuildError names the disk. The root (if any) first."""
    ordered = sorted(planned, key=lambda p: not p.spec.root)
    out: list[Attached] = []
    for p in ordered:
        spec = p.spec
        bus = spec.bus or default_bus
        base = dict(name=spec.name, kind=spec.source, serial=spec.effective_serial, bus=bus,
                    target=targets.take(bus), readonly=p.read_only, cache=spec.cache, io=spec.io,
                    boot_order=root_boot_order if spec.root else spec.boot_order, root=spec.root)
        try:
            out.append(_build_one(p, base, files, pod, root_image))
        except (volume_image.VolumeImageError, persistent_root.RootError, config_iso.ConfigISOError,
                VolumeError, pod_volumes.VolumeMountError, OSError) as e:
            what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
            raise DiskBuildError(f"disk {spec.name!r} ({p.field}): {what}") from None
    return out


def _build_one(p: Planned, base: dict, files: VMFiles, pod: PodFiles, root_image: RootImage | None) -> Attached:
    spec = p.spec
    if spec.source == "volume":
        vdir = Path(p.host_path)
        if spec.root:
            assert root_image is not None
            root = persistent_root.prepare_file_root(
                vdir, base=root_image.base, base_format=root_image.format, digest=root_image.digest,
                image=root_image.name, capacity=spec.capacity, reimage=root_image.reimage)
            path = files.disks_dir / spec.name
            attached = Attached(**base, source="file", path=str(path), host_path=str(vdir / volume_image.IMAGE_NAME),
                                format=root.format, bind=True, persistent=True, digest=root.digest)
            bind(files, attached)  # checks the image it binds
            return attached
        # The inode checked is the inode bound: a co-tenant's rename in between changes nothing.
        fd, img = volume_image.ensure_open(vdir, spec.capacity, read_only=p.read_only)
        try:
            attached = Attached(**base, source="file", path=str(files.disks_dir / spec.name),
                                host_path=str(vdir / volume_image.IMAGE_NAME), format=img.format, bind=True,
                                persistent=True)
            bind(files, attached, source_fd=fd)
        finally:
            os.close(fd)
        return attached
    if spec.source == "device":
        offset = size = digest = None
        if spec.root:
            assert root_image is not None
            root = persistent_root.prepare_block_root(
                Path(p.host_path), base=root_image.base, base_format=root_image.format,
                digest=root_image.digest, image=root_image.name, reimage=root_image.reimage)
            offset, size, digest = (root.offset or None), root.size, root.digest
        outside_dev = not p.host_path.startswith("/dev/")
        path = str(files.disks_dir / spec.name) if outside_dev else p.host_path
        attached = Attached(**base, source="block", path=path, host_path=p.host_path, format="raw", bind=outside_dev,
                            persistent=True, slice_offset=offset, slice_size=size, container_path=spec.path,
                            digest=digest)
        if outside_dev:
            bind(files, attached)
        return attached
    if spec.source == "configVolume":
        label = spec.name.upper().replace("-", "_")[:32]
        iso = files.config_iso(spec.name)
        write_file_atomic(iso, config_iso.build(Path(p.host_path), volume_label=label))
        return Attached(**base, source="file", path=str(iso), host_path=p.host_path, format="raw")
    # emptyDisk: lives as long as the sandbox, so a restarted container finds the guest's data.
    path = pod.empty_disk(spec.name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        for d in (pod.dir.parent, pod.dir, path.parent):
            d.chmod(0o711)
        tmp = path.with_name(f".{path.name}.tmp")
        _qemu_img("create", "-q", "-f", "qcow2", str(tmp), str(spec.capacity))
        os.replace(tmp, path)
    return Attached(**base, source="file", path=str(path), host_path=str(path), format="qcow2")


def bind(files: VMFiles, d: Attached, *, source_fd: int | None = None,
         validator: volume_image.Validator | None = None) -> None:
    """Bind `d.host_path` at `d.path` in the VM directory (idempotent; again after a host reboot).

    A disk image is bound from the fd of exactly the inode that was checked: `source_fd` from the
    caller's volume_image.open_checked/ensure_open, else checked here as `d.format`. Looking the name
    up again after a check would bind whatever another pod on the volume renamed into place meanwhile
    (a qcow2 with an external data file: QEMU opens that even with an empty <backingStore/>)."""
    target = Path(d.path)
    if pod_volumes.is_mountpoint(target):
        return
    fd = None
    if d.kind == "volume" and source_fd is None:
        fd, _ = volume_image.open_checked(Path(d.host_path).parent, validator=validator, read_only=d.readonly,
                                          expect_format=d.format)
    try:
        files.disks_dir.mkdir(parents=True, exist_ok=True)
        files.disks_dir.chmod(0o711)
        target.touch(mode=0o600, exist_ok=True)  # a mount point for a file or a device node
        if d.kind == "volume":
            checked = source_fd if fd is None else fd
            try:
                pod_volumes.attach_clone(d.host_path, str(target), read_only=d.readonly, source_fd=checked)
            except pod_volumes.VolumeMountError:
                if os.fstat(checked).st_nlink == 0:  # the kernel binds no deleted file
                    raise volume_image.VolumeImageError(
                        f"{d.host_path} was replaced after vmlet checked it (another pod on the volume?); "
                        "nothing was bound") from None
                raise
        else:
            pod_volumes.attach_clone(d.host_path, str(target), read_only=d.readonly)
    finally:
        if fd is not None:
            os.close(fd)


def rebind(files: VMFiles, *, validator: volume_image.Validator | None = None) -> None:
    """StartContainer: the binds are gone after the VM stopped or the host rebooted. Every disk image
    is checked again, as the inode QEMU will open: another pod on the volume may have rewritten it
    since the last check. DiskBuildError names the disk when it is no longer usable."""
    for d in load(files.disks_record):
        if not d.bind:
            continue
        try:
            if d.kind == "volume" and pod_volumes.is_mountpoint(Path(d.path)):
                # The create's bind is still there: its inode, not the name's, is what QEMU gets.
                volume_image.check_file(Path(d.path), d.format, validator=validator)
            else:
                bind(files, d, validator=validator)
        except (volume_image.VolumeImageError, pod_volumes.VolumeMountError, OSError) as e:
            raise DiskBuildError(f"disk {d.name!r}: {e}") from None


# ------------------------------------------------------------------ record


def record(disks: Sequence[Attached]) -> bytes:
    return json.dumps({"disks": [dataclasses.asdict(d) for d in disks]}, indent=1, sort_keys=True).encode()


def load(path: Path) -> list[Attached]:
    """The disks of a VM directory; [] when it has no disks.json (no volume disks, or an older vmlet).
    DiskBuildError when it is unreadable or corrupt."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise DiskBuildError(f"{path} is unreadable or corrupt: {e}") from None
    try:
        return [Attached(**d) for d in data["disks"]]
    except (KeyError, TypeError) as e:
        raise DiskBuildError(f"{path} is corrupt: {e}") from None
