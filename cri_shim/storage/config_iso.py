"""configVolume disks: the files of a ConfigMap/Secret/downwardAPI/projected volume as an ISO image.

The kubelet writes such a volume with its AtomicWriter: the real files live in
a timestamped directory (`..2024_01_01_00_00_00.123456789`), `..data` is a
symlink to it, and every top-level key is a symlink `key -> ..data/key` (a
nested path `a/b` gets `a -> ..data/a`). An update writes a new timestamped
directory and swaps `..data`. `files_of` reads what the pod sees: the visible
names, following their links; `build` packs those files into an ISO 9660
image with Rock Ridge and Joliet names (cri_shim/storage/iso9660.py), which
the VM gets as a read-only disk. The same files give the same bytes, whatever
order the directory lists them in and whenever the image is built.

The directory is treated as hostile: a pod spec can name an emptyDir or a
hostPath as a configVolume and fill it with anything. Rules:

- Names starting with `..` (the writer's internals) are skipped at every
  level, but followed when a visible name's symlink points into them.
- A symlink is followed only when it resolves (`os.path.realpath`) to a
  path inside the volume directory; a link pointing outside (absolute or
  relative, existing or not), a link loop, a dangling link, or a directory
  link that leads back into one of its own ancestors is a ConfigISOError.
  An absolute link that resolves inside the volume is followed (it escapes
  nothing). What is then opened is opened component by component from the
  volume's directory with O_NOFOLLOW, so a link swapped in meanwhile is
  refused instead of followed.
- Only regular files and directories: fifos, sockets and devices are
  refused (checked before they are opened; opened with O_NONBLOCK anyway).
- Names must be UTF-8. Rock Ridge keeps every name as it is; a name Joliet
  cannot hold (over 64 UTF-8 bytes, beyond the BMP, or with control
  characters or `* : ; ? \\`) is left out of the Joliet tree only, so a
  Linux guest (which reads Rock Ridge) sees every file and Windows sees the
  others. ConfigMap and Secret keys (at most 253 of `-._a-zA-Z0-9`) always
  fit Rock Ridge; only those over 64 characters miss Joliet.
- Rock Ridge permissions are the file's read and execute bits (a Secret
  with `defaultMode: 0400` stays readable by root only in the guest);
  owners are 0. Only files and the directories holding them are packed: an
  empty directory leaves no trace, and an empty volume gives a valid ISO
  with no files.
- `Limits`: files and directories counted as listed, bytes per file (read
  at most max_file_bytes + 1, whatever the file claims), bytes in all, and
  path depth. Exceeding one is a ConfigISOError with the numbers.

`volume_dir` itself (the kubelet's host path of the mount) is trusted as
given; everything under it is not. Error messages name the entry by its path
relative to the volume and the link text the pod wrote, never the host path.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cri_shim.storage.iso9660 import IsoBuilder

_LABEL_RE = re.compile(r"[A-Z0-9_]{1,32}", re.ASCII)
_READ_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class ConfigISOError(Exception):
    """The volume's files can't be packed; the message names the entry (relative to the volume) and why."""


@dataclass(frozen=True)
class Limits:
    max_files: int = 4096  # files and directories, as listed
    max_total_bytes: int = 64 * 1024 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_depth: int = 16  # path components: 'a/b/c' is 3 deep

    def __post_init__(self) -> None:
        for name in ("max_files", "max_total_bytes", "max_file_bytes", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class _File:
    path: str
    data: bytes
    mode: int


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return what
    return "not a regular file or directory"


class _Walk:
    def __init__(self, root_fd: int, real_root: str, limits: Limits) -> None:
        self.root_fd = root_fd
        self.real_root = real_root
        self.limits = limits
        self.entries = 0
        self.total = 0
        self.files: list[_File] = []

    def _fail(self, rel: str, why: str) -> ConfigISOError:
        return ConfigISOError(f"configVolume entry {rel!r}: {why}")

    def _open_at(self, dir_fd: int, name: str, rel: str, via: str) -> tuple[int, os.stat_result]:
        """Open `name` in `dir_fd` without following a symlink; only regular files and directories."""
        try:
            before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            raise self._fail(rel, f"{via}cannot be read: {e.strerror}") from None
        if not (stat.S_ISREG(before.st_mode) or stat.S_ISDIR(before.st_mode)):
            raise self._fail(rel, f"{via}is {_kind(before.st_mode)}: only regular files and directories "
                                  "can be packed")
        try:
            fd = os.open(name, _DIR_FLAGS if stat.S_ISDIR(before.st_mode) else _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            why = {errno.ELOOP: "changed into a symlink while being read", errno.ENOTDIR: "changed while being read",
                   errno.ENOENT: "changed while being read"}.get(e.errno, e.strerror)
            raise self._fail(rel, f"{via}cannot be opened: {why}") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)) != \
                (before.st_dev, before.st_ino, stat.S_IFMT(before.st_mode)):
            os.close(fd)
            raise self._fail(rel, f"{via}changed while being read")
        return fd, st

    def _open_inside(self, parts: tuple[str, ...], rel: str, via: str) -> tuple[int, os.stat_result]:
        """Open the volume's `parts` (a resolved path: no links expected), each step with O_NOFOLLOW."""
        if not parts:
            fd = os.open(".", _DIR_FLAGS, dir_fd=self.root_fd)
            return fd, os.fstat(fd)
        dir_fd = self.root_fd
        try:
            for part in parts[:-1]:
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError as e:
                    why = "changed while being read" if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT) \
                        else e.strerror
                    raise self._fail(rel, f"{via}cannot be opened: {why}") from None
                if dir_fd != self.root_fd:
                    os.close(dir_fd)
                dir_fd = next_fd
            return self._open_at(dir_fd, parts[-1], rel, via)
        finally:
            if dir_fd != self.root_fd:
                os.close(dir_fd)

    def _inside(self, path: str) -> bool:
        return os.path.commonpath([self.real_root, path]) == self.real_root

    def _resolve(self, phys: tuple[str, ...], rel: str) -> tuple[tuple[str, ...], str]:
        """Where the symlink at the volume's `phys` leads, as a path inside the volume, and its text."""
        link = os.path.join(self.real_root, *phys)
        try:
            text = os.readlink(link)
        except OSError as e:
            raise self._fail(rel, f"symlink cannot be read: {e.strerror}") from None
        shown = f"symlink to {text!r} "
        # Outside first (also when the target does not exist), then dangling or a loop.
        if not self._inside(os.path.realpath(link)):
            raise self._fail(rel, f"{shown}points outside the volume")
        try:
            target = os.path.realpath(link, strict=True)
        except FileNotFoundError:
            raise self._fail(rel, f"{shown}is dangling") from None
        except OSError as e:
            why = "is a symlink loop" if e.errno == errno.ELOOP else f"cannot be resolved: {e.strerror}"
            raise self._fail(rel, shown + why) from None
        if not self._inside(target):  # changed between the two looks
            raise self._fail(rel, f"{shown}points outside the volume")
        inside = os.path.relpath(target, self.real_root)
        return (() if inside == "." else tuple(inside.split(os.sep))), shown

    def _count(self, rel: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise self._fail(rel, f"more than {self.limits.max_files} files and directories "
                                  f"(limit max_files={self.limits.max_files})")

    def walk_dir(self, dir_fd: int, phys: tuple[str, ...], logical: tuple[str, ...],
                 ancestors: frozenset[tuple[int, int]]) -> None:
        names = []
        try:
            with os.scandir(dir_fd) as listing:
                for entry in listing:
                    if entry.name.startswith(".."):
                        continue
                    self._count("/".join(logical + (entry.name,)))
                    names.append(entry.name)
        except OSError as e:
            raise self._fail("/".join(logical) or ".", f"the directory cannot be listed: {e.strerror}") from None
        for name in sorted(names):
            rel = "/".join(logical + (name,))
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigISOError(f"configVolume entry {os.fsencode(rel)!r}: the name is not UTF-8") from None
            if len(logical) + 1 > self.limits.max_depth:
                raise self._fail(rel, f"{len(logical) + 1} levels deep (limit max_depth={self.limits.max_depth})")
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as e:
                raise self._fail(rel, f"cannot be read: {e.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                child_phys, via = self._resolve(phys + (name,), rel)
                fd, st = self._open_inside(child_phys, rel, via)
            else:
                child_phys, via = phys + (name,), ""
                fd, st = self._open_at(dir_fd, name, rel, via)
            try:
                if stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in ancestors:
                        raise self._fail(rel, f"{via}leads back into a directory above it (a loop)")
                    self.walk_dir(fd, child_phys, logical + (name,), ancestors | {key})
                else:
                    self._read(fd, st, rel)
            finally:
                os.close(fd)

    def _read(self, fd: int, st: os.stat_result, rel: str) -> None:
        limit = self.limits.max_file_bytes
        too_big = self._fail(rel, f"larger than {limit} bytes (limit max_file_bytes)")
        if st.st_size > limit:
            raise too_big
        chunks, size = [], 0
        while True:
            try:
                chunk = os.read(fd, min(_READ_CHUNK, limit + 1 - size))
            except OSError as e:
                raise self._fail(rel, f"cannot be read: {e.strerror}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise too_big
        self.total += size
        if self.total > self.limits.max_total_bytes:
            raise self._fail(rel, f"the files so far hold {self.total} bytes, more than "
                                  f"{self.limits.max_total_bytes} (limit max_total_bytes)")
        self.files.append(_File(rel, b"".join(chunks), stat.S_IMODE(st.st_mode) & 0o555))


def _collect(volume_dir: Path, limits: Limits) -> list[_File]:
    if not isinstance(limits, Limits):
        raise TypeError("limits must be a config_iso.Limits")
    real_root = os.path.realpath(volume_dir)
    try:
        root_fd = os.open(real_root, _DIR_FLAGS)
    except OSError as e:
        raise ConfigISOError(f"configVolume directory {str(volume_dir)!r}: {e.strerror}") from None
    try:
        st = os.fstat(root_fd)
        walk = _Walk(root_fd, real_root, limits)
        walk.walk_dir(root_fd, (), (), frozenset({(st.st_dev, st.st_ino)}))
    finally:
        os.close(root_fd)
    # files_of's order: by the path's UTF-8 bytes (the walk's per-directory order differs: 'a-b' < 'a/b').
    return sorted(walk.files, key=lambda f: f.path.encode())


def files_of(volume_dir: Path, limits: Limits = Limits()) -> list[tuple[str, bytes]]:
    """The volume's files as the pod sees them: (path relative to the volume, content), sorted by path.
    This is what `build` packs. Raises ConfigISOError (see the module doc for the rules)."""
    return [(f.path, f.data) for f in _collect(Path(volume_dir), limits)]


def check_volume_label(volume_label: str) -> str:
    """`volume_label` if it is 1 to 32 ISO 9660 d-characters (A-Z, 0-9, _); else ConfigISOError."""
    if not isinstance(volume_label, str) or not _LABEL_RE.fullmatch(volume_label):
        raise ConfigISOError(f"volume_label {volume_label!r} must be 1 to 32 of A-Z, 0-9 and _ "
                             "(ISO 9660 d-characters)")
    return volume_label


def build(volume_dir: Path, *, volume_label: str, limits: Limits = Limits()) -> bytes:
    """The ISO image of the volume's files (`files_of`), Rock Ridge + Joliet, labelled `volume_label`.
    The same files give the same bytes. Raises ConfigISOError."""
    check_volume_label(volume_label)
    files = _collect(Path(volume_dir), limits)
    # Level 4 (ISO 9660:1999) has no depth limit: level 3 would relocate directories deeper than 8
    # into an 'rr_moved' directory, which shows up in the guest next to the volume's own names.
    iso = IsoBuilder(volume_label, interchange_level=4)
    for f in files:
        iso.add_file(f.path, f.data, mode=f.mode)
    return iso.to_bytes()
