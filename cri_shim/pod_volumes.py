"""Pod volumes for a VM: the kubelet's mounts become virtio-fs shares.

The kubelet hands every container its volumes as host paths
(`ContainerConfig.mounts`). A VM pod gets each *directory* as a virtio-fs
share: libvirt runs one virtiofsd per share, and cloud-init mounts it at the
container path (`mounts:` and the mount script, see cri_shim/cloudinit.py).
virtlet used virtio-9p; virtio-fs is what KubeVirt uses and what cloud
kernels without 9p (Debian's) can mount.

What is not a directory cannot be shared that way: the kubelet's file mounts
(`/etc/hosts`, `/dev/termination-log`, subPath files) are left out and
reported (ContainerStatus verbose info), as virtlet did. A host path that
does not exist is created as a directory, as containerd does.

Read-only: virtiofsd cannot refuse writes itself, and a guest's `ro` mount
option is only a promise of the guest. So a read-only volume is shared
through a read-only bind mount under the VM's directory
(`<vm dir>/shares/<tag>`), which the kernel enforces. Those mounts live as
long as the VM's files: `unmount_under` runs before the directory is removed
(RemoveContainer, rollback, recovery of orphans), and a directory that still
has a mount under it is never deleted (it would reach into the pod's volume).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from proto.runtime.v1 import api_pb2

from .cloudinit import CloudInitError, Mount

log = logging.getLogger("vmlet.cri")

# <linux/mount.h>
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class VolumeMountError(Exception):
    """A pod volume can't be given to the VM because the host refused (mount, mkdir, ...)."""


class BadMount(VolumeMountError):
    """The request's mount can't be honoured by a VM at all (names the field)."""


@dataclass(frozen=True)
class Share:
    """One directory volume: the guest's mount and the host directory behind it."""

    guest: Mount
    host_dir: str


@dataclass(frozen=True)
class Skipped:
    container_path: str
    host_path: str
    reason: str


def plan(mounts: Sequence[api_pb2.Mount]) -> tuple[list[Share], list[Skipped]]:
    """Which CRI mounts become shares and which are left out (and why).

    Every mount is checked before the host is touched: BadMount names the
    field (config.mounts[i].…). Then missing host directories are created
    (VolumeMountError if the host refuses).
    """
    checked: list[tuple[str, api_pb2.Mount]] = []
    seen: dict[str, int] = {}
    for i, m in enumerate(mounts):
        field = f"config.mounts[{i}]"
        if m.HasField("image") and m.image.image:
            raise BadMount(f"{field}.image: image volumes are not supported by VM pods")
        if m.uidMappings or m.gidMappings:
            raise BadMount(f"{field}: ID-mapped mounts (user namespaces) are not supported by VM pods")
        if m.recursive_read_only:
            raise BadMount(f"{field}.recursive_read_only is not supported by VM pods "
                           "(vmlet does not announce it in RuntimeHandlerFeatures)")
        if m.propagation == api_pb2.PROPAGATION_BIDIRECTIONAL:
            raise BadMount(f"{field}.propagation: Bidirectional propagation is impossible into a VM "
                           "(mounts made by the guest cannot reach the host)")
        if not m.host_path.startswith("/") or "\x00" in m.host_path:
            raise BadMount(f"{field}.host_path {m.host_path!r} must be an absolute path")
        if m.container_path in seen:
            raise BadMount(f"{field}.container_path {m.container_path!r} is also "
                           f"config.mounts[{seen[m.container_path]}]'s")
        seen[m.container_path] = i
        try:
            Mount(host_path=m.host_path, container_path=m.container_path, read_only=m.readonly)
        except CloudInitError as e:
            raise BadMount(f"{field}: {e}") from None
        checked.append((field, m))

    shares: list[Share] = []
    skipped: list[Skipped] = []
    for field, m in checked:
        host = os.path.realpath(m.host_path)
        try:
            try:
                st = os.stat(host)
            except FileNotFoundError:
                os.makedirs(host, mode=0o755, exist_ok=True)
                st = os.stat(host)
        except OSError as e:
            raise VolumeMountError(f"{field}.host_path {m.host_path!r}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            kind = "a file" if stat.S_ISREG(st.st_mode) else "not a directory"
            skipped.append(Skipped(m.container_path, m.host_path,
                                   f"{kind}: only directories can be shared with a VM"))
            continue
        shares.append(Share(Mount(host_path=host, container_path=m.container_path, read_only=m.readonly), host))
    return shares, skipped


def record(shares: Sequence[Share], skipped: Sequence[Skipped]) -> bytes:
    """The VM directory's volumes.json: what was shared and what was left out (self-describing
    for StartContainer after a host reboot, for ContainerStatus, and for a node taking the VM over)."""
    return json.dumps({
        "shares": [{"tag": s.guest.tag, "hostPath": s.host_dir, "containerPath": s.guest.container_path,
                    "readOnly": s.guest.read_only} for s in shares],
        "skipped": [{"containerPath": k.container_path, "hostPath": k.host_path, "reason": k.reason}
                    for k in skipped],
    }, indent=1, sort_keys=True).encode()


def load(path: Path) -> tuple[list[Share], list[dict]]:
    """(shares, skipped entries) from a volumes.json; nothing if the file is missing."""
    try:
        data = json.loads(path.read_bytes())
        shares = [Share(Mount(s["hostPath"], s["containerPath"], bool(s["readOnly"])), s["hostPath"])
                  for s in data.get("shares", [])]
        return shares, list(data.get("skipped", []))
    except FileNotFoundError:
        return [], []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise VolumeMountError(f"{path} is unreadable or corrupt: {e}") from None


def share_source(vm_dir: Path, share: Share) -> str:
    """The directory virtiofsd serves: the host directory itself, or for a read-only
    volume a read-only bind mount of it (made by `prepare`)."""
    return str(vm_dir / "shares" / share.guest.tag) if share.guest.read_only else share.host_dir


def prepare(vm_dir: Path, shares: Sequence[Share]) -> None:
    """Make the read-only bind mounts of `shares` under `vm_dir` (idempotent).

    Each is a private mount: a bind of a shared mount would join its peer
    group, so later host mounts under the volume would appear in it
    (writable) and unmounting it would unmount the originals.
    """
    for share in shares:
        if not share.guest.read_only:
            continue
        target = Path(share_source(vm_dir, share))
        if _is_mountpoint(target):
            if _read_only(target):
                continue
            _umount(str(target))  # left writable by a crash half-way: redo it
        try:
            # The source's nosuid/nodev/noexec are kept: dropping them needs privileges and widens access.
            flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _mount_flags(share.host_dir)
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VolumeMountError(f"cannot prepare {target}: {e.strerror}") from None
        _mount(share.host_dir, str(target), None, _MS_BIND)
        try:
            _mount(None, str(target), None, _MS_PRIVATE)
            # A bind mount takes the read-only flag only on a remount.
            _mount(None, str(target), None, flags)
        except VolumeMountError:
            _umount(str(target))
            raise


def release(vm_dir: Path) -> None:
    """Detach the VM's read-only bind mounts once the VM is down, so the kubelet can tear the
    volumes down (a bind would keep a CSI file system or a Secret's tmpfs mounted). Idempotent and
    best effort: RemoveContainer detaches whatever is left before it deletes the directory."""
    try:
        unmount_under(vm_dir / "shares")
    except VolumeMountError as e:
        log.warning("%s", e)


def unmount_under(directory: Path) -> None:
    """Detach every mount at or below `directory` (deepest first).

    Raises VolumeMountError if one stays, so the caller does not delete
    through it into a pod's volume.
    """
    for point in sorted(_mountpoints_under(directory), key=len, reverse=True):
        try:
            _umount(point)
        except VolumeMountError:
            pass  # e.g. detached meanwhile by another thread seeing the same exit; checked below
    left = _mountpoints_under(directory)
    if left:
        raise VolumeMountError(f"still mounted under {directory}: {', '.join(sorted(left))}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(),
                   fstype.encode() if fstype else None, flags, None) != 0:
        err = ctypes.get_errno()
        raise VolumeMountError(f"cannot bind-mount {source or target} at {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    # MNT_DETACH: a virtiofsd that still has the directory open must not make this fail.
    if _libc.umount2(target.encode(), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise VolumeMountError(f"cannot unmount {target}: {os.strerror(err)}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _mount_flags(path: str) -> int:
    vfs = os.statvfs(path)
    flags = 0
    for st_flag, ms_flag in ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC)):
        if vfs.f_flag & st_flag:
            flags |= ms_flag
    return flags


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountpoints_under(directory: Path) -> set[str]:
    root = os.path.realpath(directory)
    prefix = root.rstrip("/") + "/"
    points = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split(" ", 5)[4])
            if point == root or point.startswith(prefix):
                points.add(point)
    return points


def _is_mountpoint(path: Path) -> bool:
    return os.path.realpath(path) in _mountpoints_under(path)
