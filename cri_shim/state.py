"""The shim's metadata store: sandboxes and containers, crash-safe.

sqlite in WAL mode under the state dir is the source of truth on disk; an
in-memory copy serves reads (List* must stay fast with thousands of records).
Every change is written through in one transaction before it is visible in
memory, so a kill -9 at any point leaves the store at the last committed
state; recovery (recovery.py) then reconciles it with libvirt and the disks.

Records keep the kubelet's configs as serialized protobuf, so labels,
annotations and everything the CRI returns round-trip unchanged.

A write that sqlite cannot make because the file system is full is
RESOURCE_EXHAUSTED naming that file system (what the operator has to free);
the in-memory copy is untouched, so the store works again once there is room.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import grpc

from image_service.store import mount_point

from .errors import CRIError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    name_key TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    config BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    name_key TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    config BLOB NOT NULL
);
"""


class NameConflict(Exception):
    """A sandbox or container with the same name key already exists."""

    def __init__(self, name_key: str, owner_id: str) -> None:
        super().__init__(name_key)
        self.name_key = name_key
        self.owner_id = owner_id


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    name_key: str  # name_namespace_uid_attempt: unique per kubelet semantics
    state: int  # runtime.v1 PodSandboxState
    created_at: int  # ns since the epoch
    runtime_handler: str = ""
    config: bytes = b""  # serialized PodSandboxConfig
    # Networking (filled by the network setup): pod IPs, netns path.
    ips: list[str] = field(default_factory=list)
    netns: str = ""


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    sandbox_id: str
    name_key: str
    state: int  # runtime.v1 ContainerState
    created_at: int
    image: str  # the image as the kubelet asked for it
    image_ref: str  # the resolved image ID (sha256:...)
    domain_name: str
    domain_uuid: str
    log_path: str = ""  # absolute CRI log path, "" when the kubelet gave none
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    config: bytes = b""  # serialized ContainerConfig
    console_offset: int = 0  # how far the console log has been copied to the CRI log


def _encode(rec) -> tuple[str, bytes]:
    d = dataclasses.asdict(rec)
    config = d.pop("config")
    return json.dumps(d, sort_keys=True), config


def _decode(cls, record: str, config: bytes):
    return cls(config=bytes(config), **json.loads(record))


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._lock = threading.RLock()
        self.sandboxes: dict[str, SandboxRecord] = {}
        self.containers: dict[str, ContainerRecord] = {}
        for rec, cfg in self._db.execute("SELECT record, config FROM sandboxes"):
            sb = _decode(SandboxRecord, rec, cfg)
            self.sandboxes[sb.id] = sb
        for rec, cfg in self._db.execute("SELECT record, config FROM containers"):
            c = _decode(ContainerRecord, rec, cfg)
            self.containers[c.id] = c

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -------------------------------------------------------------- writes

    @contextlib.contextmanager
    def _writing(self):
        """sqlite's "database or disk is full" (SQLITE_FULL) -> RESOURCE_EXHAUSTED naming the file system."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            raise CRIError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the file system on {mount_point(self.path.parent)} is full: cannot write vmlet's "
                           f"metadata ({self.path}): {e}") from None

    def _insert(self, table: str, rec, extra_cols: dict[str, str]) -> None:
        record, config = _encode(rec)
        cols = ["id", "name_key", *extra_cols, "record", "config"]
        values = [rec.id, rec.name_key, *extra_cols.values(), record, config]
        try:
            self._db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                             values)
        except sqlite3.IntegrityError:
            owner = self._db.execute(f"SELECT id FROM {table} WHERE name_key = ?", (rec.name_key,)).fetchone()
            if owner:
                raise NameConflict(rec.name_key, owner[0]) from None
            raise

    def add_sandbox(self, sb: SandboxRecord) -> None:
        with self._lock, self._writing():
            self._insert("sandboxes", sb, {})
            self.sandboxes[sb.id] = sb

    def add_container(self, c: ContainerRecord) -> None:
        with self._lock, self._writing():
            self._insert("containers", c, {"sandbox_id": c.sandbox_id})
            self.containers[c.id] = c

    def update_sandbox(self, sb: SandboxRecord) -> None:
        with self._lock, self._writing():
            record, config = _encode(sb)
            self._db.execute("UPDATE sandboxes SET record = ?, config = ? WHERE id = ?", (record, config, sb.id))
            self.sandboxes[sb.id] = sb

    def update_container(self, c: ContainerRecord) -> None:
        with self._lock, self._writing():
            record, config = _encode(c)
            self._db.execute("UPDATE containers SET record = ?, config = ? WHERE id = ?", (record, config, c.id))
            self.containers[c.id] = c

    def delete_container(self, container_id: str) -> None:
        with self._lock, self._writing():
            self._db.execute("DELETE FROM containers WHERE id = ?", (container_id,))
            self.containers.pop(container_id, None)

    def delete_sandbox(self, sandbox_id: str) -> None:
        with self._lock, self._writing():
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM containers WHERE sandbox_id = ?", (sandbox_id,))
                self._db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLITE_FULL may have rolled it back already
                    self._db.execute("ROLLBACK")
                raise
            for cid in [c.id for c in self.containers.values() if c.sandbox_id == sandbox_id]:
                del self.containers[cid]
            self.sandboxes.pop(sandbox_id, None)

    # -------------------------------------------------------------- reads

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        with self._lock:
            return [c for c in self.containers.values() if c.sandbox_id == sandbox_id]

    def snapshot(self) -> tuple[list[SandboxRecord], list[ContainerRecord]]:
        with self._lock:
            return list(self.sandboxes.values()), list(self.containers.values())


def resolve_id(candidates: Iterable[str], given: str) -> str | None | list[str]:
    """containerd-style ID lookup: an exact ID, or a unique prefix of one.

    Returns the ID, None when nothing matches, or the list of matches when the
    prefix is ambiguous.
    """
    ids = list(candidates)
    if given in ids:
        return given
    if not given:
        return None
    matches = [i for i in ids if i.startswith(given)]
    if len(matches) == 1:
        return matches[0]
    return matches or None
