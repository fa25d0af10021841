"""The image store: content-addressed files plus a small sqlite metadata database.

    <root>/sha256/<hex>   image files, named by the sha256 of their bytes (the image id); nothing else
    <root>/tmp/           downloads in progress (random names); emptied at start
    <root>/metadata.db    sqlite (WAL): images, their refs (repo tags and digests) and their holders
    <root>/lock           flock'ed while a service owns the store (two services on one store would race)

Names never become paths: a file's name is always a 64-hex digest we computed ourselves.

Holders are the VMs using an image: a VM's root overlay has the image as its backing file, so the file must
outlive RemoveImage while any VM uses it. RemoveImage drops the image's refs at once (the kubelet sees it gone)
and deletes the file when the last holder releases it. Holders are persisted, so a restart keeps them.

One lock serialises every change that touches both files and rows, so a pull re-adding an image cannot race
the deletion of the same file by a release.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from image_service import names
from image_service.errors import ImageError, ImageNotFound, InvalidName, StoreFull, shorten
from image_service.names import HEX64_RE, ImageName

log = logging.getLogger("vmlet.image")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, size INTEGER NOT NULL, format TEXT NOT NULL, virtual_size INTEGER NOT NULL,
    source_url TEXT NOT NULL, name TEXT NOT NULL, pulled_at REAL NOT NULL, removed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS refs (
    ref TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest')),
    image_id TEXT NOT NULL REFERENCES images(id));
CREATE TABLE IF NOT EXISTS holders (
    image_id TEXT NOT NULL REFERENCES images(id), holder TEXT NOT NULL, PRIMARY KEY (image_id, holder));
"""
_HEX_PREFIX_RE = re.compile(r"(?:sha256:)?([0-9a-f]{1,64})", re.ASCII)


@dataclass(frozen=True)
class Image:
    id: str  # hex sha256
    size: int
    format: str
    virtual_size: int
    source_url: str
    name: str  # the name it was last pulled by
    pulled_at: float
    tags: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)


class TempImage:
    """A download in progress: an unbuffered file under tmp/, deleted unless the store adopts it."""

    def __init__(self, directory: Path):
        self.path = directory / f"pull-{secrets.token_hex(8)}"
        # Opened by name ("x": O_EXCL) so that `file.name` tells a write error where it happened.
        self.file = open(self.path, "xb", buffering=0)
        os.chmod(self.path, 0o600)
        self.adopted = False

    def sync(self) -> None:
        try:
            os.fsync(self.file.fileno())
        except OSError as e:
            raise store_error(e, self.path) from None
        self.file.close()

    def __enter__(self) -> TempImage:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if not self.adopted:
            self.path.unlink(missing_ok=True)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blobs, self.tmp = self.root / "sha256", self.root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(mode=0o755, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # downloads of a previous run cannot be resumed
        self.tmp.mkdir(mode=0o700)
        self._lockfile = open(self.root / "lock", "a")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise RuntimeError(f"image store {self.root} is in use by another process") from None
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "metadata.db", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._reconcile()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lockfile.close()

    def path(self, image_id: str) -> Path:
        if not HEX64_RE.fullmatch(image_id):  # only digests ever become paths
            raise ValueError(f"not an image id: {shorten(image_id)}")
        return self.blobs / image_id

    # ------------------------------------------------------------ adding

    def new_temp(self) -> TempImage:
        return TempImage(self.tmp)

    def add(self, temp: TempImage, image_id: str, size: int, fmt: str, virtual_size: int,
            source_url: str, name: ImageName) -> Image:
        """Move a validated, fsynced download into place and record it under `name`."""
        with self._lock:
            target = self.path(image_id)
            created = False
            try:
                if target.exists():  # same bytes already stored: keep the inode VMs may have open
                    temp.path.unlink()
                else:
                    os.chmod(temp.path, 0o644)  # QEMU (another user) reads base images
                    os.rename(temp.path, target)
                    created = True
                    _fsync_dir(self.blobs)
            except OSError as e:
                raise store_error(e, target) from None
            temp.adopted = True
            try:
                self._record(image_id, size, fmt, virtual_size, source_url, name)
            except BaseException:
                if created:  # no row will ever point at it
                    target.unlink(missing_ok=True)
                raise
            return self._load(image_id)

    def _record(self, image_id, size, fmt, virtual_size, source_url, name) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO images (id, size, format, virtual_size, source_url, name, pulled_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET source_url = excluded.source_url,"
                " name = excluded.name, pulled_at = excluded.pulled_at, removed = 0",
                (image_id, size, fmt, virtual_size, source_url, str(name), time.time()))
            self._add_refs(image_id, name)

    def add_refs(self, image_id: str, name: ImageName) -> Image | None:
        """Record `name` for an image already stored (a shared or skipped download); None if it is gone."""
        with self._lock, self._tx():
            row = self._db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None or not self.path(image_id).exists():
                return None
            self._db.execute("UPDATE images SET removed = 0, name = ?, pulled_at = ? WHERE id = ?",
                             (str(name), time.time(), image_id))
            self._add_refs(image_id, name)
        return self._load(image_id)

    def _add_refs(self, image_id: str, name: ImageName) -> None:
        # A tag names one image: re-pulling a tag whose content changed moves it (the old image keeps its digest).
        if name.tagged:
            self._db.execute("INSERT OR REPLACE INTO refs (ref, kind, image_id) VALUES (?, 'tag', ?)",
                             (name.tagged, image_id))
        self._db.execute("INSERT OR REPLACE INTO refs (ref, kind, image_id) VALUES (?, 'digest', ?)",
                         (name.with_digest(image_id), image_id))

    # ------------------------------------------------------------ reading

    def get(self, ref: str) -> Image | None:
        """Resolve a tag, repo digest, `sha256:<hex>`, `<hex>` or unique id prefix; None when unknown."""
        image_id = self._resolve(ref)
        return self._load(image_id) if image_id else None

    def list(self) -> list[Image]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM images WHERE removed = 0 ORDER BY pulled_at")]
            return [self._load(i) for i in ids]

    def _resolve(self, ref: str) -> str | None:
        with self._lock:
            if names.is_name(ref):
                name = names.parse(ref)
                key = name.with_digest(name.digest) if name.digest else name.tagged
                row = self._db.execute("SELECT r.image_id FROM refs r JOIN images i ON i.id = r.image_id"
                                       " WHERE r.ref = ? AND i.removed = 0", (key,)).fetchone()
                return row[0] if row else None
            m = _HEX_PREFIX_RE.fullmatch(ref)
            if m is None:
                raise InvalidName(f"image: {shorten(ref)} is neither a {names.DOMAIN}/ image name nor an image id")
            rows = self._db.execute("SELECT id FROM images WHERE removed = 0 AND substr(id, 1, ?) = ? LIMIT 2",
                                    (len(m[1]), m[1])).fetchall()
            if len(rows) > 1:
                raise InvalidName(f"image: id prefix {ref!r} is ambiguous")
            return rows[0][0] if rows else None

    def _load(self, image_id: str) -> Image | None:
        with self._lock:
            row = self._db.execute("SELECT id, size, format, virtual_size, source_url, name, pulled_at"
                                   " FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                return None
            refs = self._db.execute("SELECT ref, kind FROM refs WHERE image_id = ? ORDER BY rowid", (image_id,))
            tags, digests = [], []
            for ref, kind in refs:
                (tags if kind == "tag" else digests).append(ref)
            holders = [h for (h,) in self._db.execute("SELECT holder FROM holders WHERE image_id = ?", (image_id,))]
            return Image(*row, tags=tags, digests=digests, holders=holders)

    # ------------------------------------------------------------ removing and holding

    def remove(self, image_id: str) -> None:
        """Forget the image; its file goes now, or with its last holder."""
        with self._lock, self._tx():
            self._db.execute("DELETE FROM refs WHERE image_id = ?", (image_id,))
            self._db.execute("UPDATE images SET removed = 1 WHERE id = ?", (image_id,))
            self._delete_if_unused(image_id)

    def acquire(self, ref: str, holder: str) -> Path:
        """Mark the image as used by `holder` (e.g. a VM's id); returns the file to use as backing file."""
        with self._lock, self._tx():
            image_id = self._resolve(ref)
            if image_id is None:
                raise ImageNotFound(f"image {shorten(ref)} is not in the store")
            self._db.execute("INSERT OR IGNORE INTO holders (image_id, holder) VALUES (?, ?)", (image_id, holder))
            return self.path(image_id)

    def release(self, image_id: str, holder: str) -> None:
        """Drop `holder`'s use of the image (`sha256:<hex>` or `<hex>`, as acquire's path names it)."""
        image_id = image_id.removeprefix("sha256:")
        with self._lock, self._tx():
            self._db.execute("DELETE FROM holders WHERE image_id = ? AND holder = ?", (image_id, holder))
            self._delete_if_unused(image_id)

    def holdings(self) -> list[tuple[str, str]]:
        """Every (image id, holder) pair, removed-but-held images included: for the shim's recovery."""
        with self._lock:
            return list(self._db.execute("SELECT image_id, holder FROM holders ORDER BY image_id, holder"))

    def release_holder(self, holder: str) -> None:
        """Release every image `holder` uses (a VM went away)."""
        with self._lock:
            ids = [i for (i,) in self._db.execute("SELECT image_id FROM holders WHERE holder = ?", (holder,))]
            for image_id in ids:
                self.release(image_id, holder)

    def _delete_if_unused(self, image_id: str) -> None:
        row = self._db.execute("SELECT i.removed, (SELECT count(*) FROM holders h WHERE h.image_id = i.id)"
                               " FROM images i WHERE i.id = ?", (image_id,)).fetchone()
        if row is None or not row[0] or row[1]:
            return
        self._db.execute("DELETE FROM images WHERE id = ?", (image_id,))
        self.path(image_id).unlink(missing_ok=True)
        log.info("image sha256:%s deleted", image_id)

    # ------------------------------------------------------------ usage and start-up

    def usage(self) -> tuple[int, int]:
        """(bytes allocated, inodes) under the store's root, as `du -sB1` and `find | wc -l` count them."""
        used, inodes = 0, 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for n in [None, *filenames]:  # the directory itself, then its files
                try:
                    st = os.lstat(os.path.join(dirpath, n) if n else dirpath)
                except FileNotFoundError:  # a download finished or failed meanwhile
                    continue
                used += st.st_blocks * 512
                inodes += 1
        return used, inodes

    def _reconcile(self) -> None:
        """Make files and rows agree after a crash: each side only keeps what the other confirms."""
        with self._lock, self._tx():
            known = {i for (i,) in self._db.execute("SELECT id FROM images")}
            for f in self.blobs.iterdir():
                if f.name not in known:  # renamed into place, crashed before the row was written
                    log.warning("image store: removing unrecorded file %s", f)
                    if f.is_dir() and not f.is_symlink():
                        shutil.rmtree(f, ignore_errors=True)
                    else:
                        f.unlink(missing_ok=True)
            for image_id in known:
                if not self.path(image_id).exists():
                    log.warning("image store: sha256:%s is recorded but its file is missing; forgetting it", image_id)
                    for table, col in (("refs", "image_id"), ("holders", "image_id"), ("images", "id")):
                        self._db.execute(f"DELETE FROM {table} WHERE {col} = ?", (image_id,))
                else:
                    self._delete_if_unused(image_id)

    def _tx(self):
        return _Transaction(self._db)

    def info(self, image: Image) -> str:
        return json.dumps({"sourceURL": image.source_url, "format": image.format, "virtualSize": image.virtual_size,
                           "pulledAt": image.pulled_at, "path": str(self.path(image.id)), "holders": image.holders})


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, re-entrant (nested uses join the outer transaction)."""

    def __init__(self, db: sqlite3.Connection):
        self.db, self.outer = db, False

    def __enter__(self):
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        if self.outer:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mount_point(path: str | os.PathLike) -> str:
    """The mount point of the file system `path` is on (the file system an operator has to free)."""
    p = os.path.realpath(path)
    while not os.path.ismount(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def store_error(e: OSError, path: str | os.PathLike | None = None) -> ImageError:
    """An OS error writing the store: a full file system is RESOURCE_EXHAUSTED and names the file system."""
    where = f" ({path})" if path is not None else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fs = f" on {mount_point(os.path.dirname(path))}" if path is not None else ""
        return StoreFull(f"the image store's file system{fs} is full: {e.strerror} writing {path or 'the store'}")
    return ImageError(f"image store: cannot write{where}: {e.strerror or e}")
