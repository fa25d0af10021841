"""Stand-ins for persistent volumes (there is no storage provisioner on these machines), with leak checks.

A block PV is a sparse file attached to a loop device (`losetup`), a filesystem PV a directory
(see ../shared/notes/machine.md, "Stand-ins for storage"). A loop device outlives the test run
that attached it, so every test that makes one checks in its finalizer, with `leaks(root)`, that
no loop device is backed by a file under its root and nothing is mounted under it, and frees what
is left with `release(root)`.

The kernel names a loop device's backing file by its real path (`/sys/block/loopN/loop/backing_file`,
with " (deleted)" after it once the file is unlinked), so roots are compared as real paths too.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from cri_shim.storage import pod_volumes

SECTOR = 512
_SYS_BLOCK = Path("/sys/block")
_DELETED = " (deleted)"


def attach_loop(file: Path | str, size: int) -> Path:
    """A sparse `file` of `size` bytes (created, or grown; never shrunk) attached to a free loop device.

    The file is opened without following a symlink and must be a regular file; losetup is handed the
    open file (/proc/self/fd), so what it attaches is the file that was checked. Returns /dev/loopN.
    """
    if not isinstance(size, int) or size <= 0 or size % SECTOR:
        raise ValueError(f"size {size!r}: a loop device needs a positive multiple of {SECTOR} bytes")
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{file}: not a regular file")
        if st.st_size < size:
            os.ftruncate(fd, size)
        out = subprocess.run(["losetup", "--find", "--show", f"/proc/self/fd/{fd}"], pass_fds=(fd,),
                             capture_output=True, text=True, timeout=30)
    finally:
        os.close(fd)
    if out.returncode != 0:
        raise RuntimeError(f"losetup --find --show {file} failed: {out.stderr.strip()}")
    return Path(out.stdout.strip())


def backing_file(dev: Path | str) -> str | None:
    """The real path of the file behind loop device `dev` (None when it is detached or not a loop device)."""
    try:
        text = (_SYS_BLOCK / Path(dev).name / "loop" / "backing_file").read_text().rstrip("\n")
    except OSError:
        return None
    return text.removesuffix(_DELETED) or None


def detach_loop(dev: Path | str) -> None:
    """Detach `dev` (a busy device is detached by the kernel once its last user closes it). Idempotent."""
    dev = Path(dev)
    if not (dev.name.startswith("loop") and dev.name[4:].isdigit()):
        raise ValueError(f"{dev}: not a loop device")
    if backing_file(dev) is None:
        return
    out = subprocess.run(["losetup", "--detach", str(dev)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 and backing_file(dev) is not None:
        raise RuntimeError(f"losetup --detach {dev} failed: {out.stderr.strip()}")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def loop_devices_of(prefix_dir: Path | str) -> list[Path]:
    """The loop devices whose backing file lies under `prefix_dir` (also ones whose file was deleted)."""
    root = os.path.realpath(prefix_dir)
    found = []
    for entry in sorted(_SYS_BLOCK.glob("loop*")):
        backing = backing_file(entry.name)
        if backing is not None and _under(backing, root):
            found.append(Path("/dev") / entry.name)
    return found


def mounts_under(root: Path | str) -> list[str]:
    """Mount points at or below `root`, from /proc/self/mountinfo."""
    return sorted(pod_volumes._mountpoints_under(Path(root)))


def leaks(root: Path | str) -> list[str]:
    """What a test under `root` must not leave: loop devices backed by files under it, mounts under it."""
    return ([f"loop device {d} ({backing_file(d)})" for d in loop_devices_of(root)]
            + [f"mount {m}" for m in mounts_under(root)])


def release(root: Path | str) -> list[str]:
    """Unmount everything under `root` and detach every loop device backed below it (a finalizer's
    safety net); returns what it found, as `leaks` describes it."""
    found = leaks(root)
    if Path(root).exists():
        pod_volumes.unmount_under(Path(root))
    for dev in loop_devices_of(root):
        detach_loop(dev)
    return found


def make_dir_volume(root: Path | str, name: str, mode: int = 0o755) -> Path:
    """A directory stand-in for a filesystem PV: a new directory `name` (one path component) under `root`."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"volume name {name!r}: must be one path component")
    path = Path(root) / name
    path.mkdir(mode=mode)  # a new one: FileExistsError for a name in use
    path.chmod(mode)  # mkdir's mode is cut by the umask
    return path
