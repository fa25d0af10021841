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

from ..cloudinit import CloudInitError, Mount

log = logging.getLogger("vmlet.cri")

# <linux/mount.h>, <fcntl.h>; the new mount API's syscall numbers are the same on every architecture.
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 0x1
_MOUNT_ATTR_RDONLY = 0x1
_MS_PRIVATE = 0x40000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442  # Linux 5.12

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
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


def plan(mounts: Sequence[api_pb2.Mount], disk_paths: frozenset[str] | set[str] = frozenset()
         ) -> tuple[list[Share], list[Skipped]]:
    """Which CRI mounts become shares and which are left out (and why).

    Every mount is checked before the host is touched: BadMount names the
    field (config.mounts[i].…). Then missing host directories are created
    (VolumeMountError if the host refuses). Mounts at `disk_paths` are the
    VM's disks (cri_shim/storage/disks.py), not shares.
    """
    checked: list[tuple[str, api_pb2.Mount]] = []
    seen: dict[str, int] = {}
    for i, m in enumerate(mounts):
        field = f"config.mounts[{i}]"
        if m.container_path in disk_paths:
            continue
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


def read_record(path: Path) -> dict:
    """A volumes.json as written by `record`; {} if the file is missing (a VM of an older vmlet)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}


def load(path: Path) -> tuple[list[Share], list[dict]]:
    """(shares, skipped entries) from a volumes.json; nothing if the file is missing."""
    try:
        data = read_record(path)
        shares = [Share(Mount(s["hostPath"], s["containerPath"], bool(s["readOnly"])), s["hostPath"])
                  for s in data.get("shares", [])]
        return shares, list(data.get("skipped", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise VolumeMountError(f"{path} is unreadable or corrupt: {e}") from None


def share_source(vm_dir: Path, share: Share) -> str:
    """The directory virtiofsd serves: the host directory itself, or for a read-only
    volume a read-only bind mount of it (made by `prepare`)."""
    return str(vm_dir / "shares" / share.guest.tag) if share.guest.read_only else share.host_dir


def prepare(vm_dir: Path, shares: Sequence[Share]) -> None:
    """Make the read-only bind mounts of `shares` under `vm_dir` (idempotent).

    Each is cloned detached, made read-only, then attached (the kernel's
    open_tree/mount_setattr/move_mount): it is never writable anywhere. With
    bind-then-remount, a state dir on a shared mount (the node DaemonSet's
    Bidirectional /var/lib/vmlet) would hand libvirtd's virtiofsd a copy of
    the bind while still writable. The clone is not in the volume's
    propagation peer group, so later host mounts under the volume don't show
    up in it and detaching it leaves the host's mounts alone.
    """
    for share in shares:
        if not share.guest.read_only:
            continue
        target = Path(share_source(vm_dir, share))
        if _is_mountpoint(target):
            if _read_only(target):
                continue
            _umount(str(target))  # not ours (or a broken one): redo it
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VolumeMountError(f"cannot prepare {target}: {e.strerror}") from None
        _attach_read_only_clone(share.host_dir, str(target))


def release(vm_dir: Path) -> None:
    """Detach the VM's bind mounts (read-only shares, disk images and devices from volumes) once the
    VM is down, so the kubelet can tear the volumes down (a bind would keep a CSI file system or a
    Secret's tmpfs mounted). Idempotent and best effort: RemoveContainer detaches whatever is left
    before it deletes the directory."""
    for sub in ("shares", "disks"):
        try:
            unmount_under(vm_dir / sub)
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


class _MountAttr(ctypes.Structure):  # struct mount_attr, <linux/mount.h>
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(nr: int, *args) -> int:
    ret = _libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _attach_read_only_clone(source: str, target: str) -> None:
    """A read-only bind of `source` (nosuid/nodev/noexec kept) attached at `target`, atomically."""
    attach_clone(source, target, read_only=True)


def attach_clone(source: str, target: str, *, read_only: bool, source_fd: int | None = None) -> None:
    """A private bind of `source` attached at `target` (an existing file or directory), atomically;
    read-only from the first instant when asked. With `source_fd` (an O_PATH fd, e.g. opened with
    O_NOFOLLOW) the bind is of exactly that inode: no path is looked up again (no symlink race)."""
    try:
        if source_fd is None:
            fd = _syscall(_SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD), source.encode(),
                          ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC))
        else:
            fd = _syscall(_SYS_OPEN_TREE, ctypes.c_int(source_fd), b"",
                          ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH))
    except OSError as e:
        raise VolumeMountError(f"cannot bind-mount {source}: {e.strerror}") from None
    try:
        # Private: a clone of a shared mount would stay in its peer group.
        attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY if read_only else 0, propagation=_MS_PRIVATE)
        _syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"", ctypes.c_uint(_AT_EMPTY_PATH),
                 ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        _syscall(_SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(_AT_FDCWD), target.encode(),
                 ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH))
    except OSError as e:
        ro = " read-only" if read_only else ""
        raise VolumeMountError(f"cannot bind-mount {source}{ro} at {target}: {e.strerror}") from None
    finally:
        os.close(fd)  # a clone never attached goes away with its last fd


def is_mountpoint(path: Path) -> bool:
    return _is_mountpoint(path)


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
