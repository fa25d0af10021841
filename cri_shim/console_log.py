"""The VM's serial console, copied into the kubelet's log file in the CRI log format.

virtlogd appends the raw console to `<vm dir>/console.log` (it never blocks
the guest and keeps writing across libvirtd and vmlet restarts). A
`ConsoleCopier` thread per running container tails that file and appends CRI
log lines to the path the kubelet asked for:

    2026-11-25T19:05:01.123456789Z stdout F a full line
    2026-11-25T19:05:01.223456789Z stdout P a partial line (no newline yet, or too long)

The copier reports how far it got (`on_progress`) so the runtime can persist
the offset and resume after its own restart; `reopen()` serves the CRI
ReopenContainerLog call after the kubelet rotated the log file. virtlogd's own
rotation (console.log -> console.log.0) is followed by inode: the old file is
drained to its end before the new one is read from the start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

log = logging.getLogger("vmlet.console")

MAX_LINE = 16 * 1024  # containerd's default max_container_log_line_size
PARTIAL_FLUSH_AFTER = 0.5  # seconds a line may stay incomplete before it is written as P
POLL_INTERVAL = 0.1
PROGRESS_INTERVAL = 1.0


def cri_timestamp(t: float | None = None) -> str:
    ns = time.time_ns() if t is None else int(t * 1e9)
    dt = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ns % 1_000_000_000:09d}Z"


def format_lines(buffer: bytes, final: bool) -> tuple[list[bytes], bytes]:
    """Split raw console bytes into CRI log records.

    Returns (records, rest): complete lines become F records, over-long ones
    are cut into P records; `rest` is an incomplete tail to keep, unless
    `final` (flush it as a P record).
    """
    records = []
    stamp = cri_timestamp().encode()
    while True:
        nl = buffer.find(b"\n")
        if nl == -1 or nl > MAX_LINE:
            if len(buffer) > MAX_LINE:
                records.append(b"%s stdout P %s\n" % (stamp, buffer[:MAX_LINE]))
                buffer = buffer[MAX_LINE:]
                continue
            break
        line = buffer[:nl].rstrip(b"\r")
        records.append(b"%s stdout F %s\n" % (stamp, line))
        buffer = buffer[nl + 1:]
    if final and buffer:
        records.append(b"%s stdout P %s\n" % (stamp, buffer.rstrip(b"\r")))
        buffer = b""
    return records, buffer


class ConsoleCopier:
    def __init__(self, source: Path, target: Path, offset: int = 0,
                 on_progress: Callable[[int], None] | None = None) -> None:
        self.source = source
        self.target = target
        self.offset = offset
        self._on_progress = on_progress
        self._stop = threading.Event()
        self._reopen = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"console-{source.parent.name[:12]}", daemon=True)

    def start(self) -> "ConsoleCopier":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop copying, after copying what the console file holds now."""
        self._stop.set()
        self._thread.join(timeout=10)

    def reopen(self) -> None:
        """Reopen the target (the kubelet rotated it). Returns once the next write goes to a fresh file."""
        done = threading.Event()
        self._reopen_done = done
        self._reopen.set()
        if self._thread.is_alive() and not done.wait(timeout=30):
            raise TimeoutError(f"console copier for {self.source} did not reopen {self.target}")

    _reopen_done: threading.Event | None = None

    def _open_target(self):
        self.target.parent.mkdir(parents=True, exist_ok=True)
        return open(self.target, "ab", buffering=0)

    def _run(self) -> None:
        src = None
        src_ino = None
        out = self._open_target()
        pending = b""
        pending_since = 0.0
        last_progress = 0.0
        try:
            while True:
                if self._reopen.is_set():
                    out.close()
                    out = self._open_target()
                    self._reopen.clear()
                    if self._reopen_done:
                        self._reopen_done.set()
                if src is None:
                    try:
                        src = open(self.source, "rb")
                        src_ino = os.fstat(src.fileno()).st_ino
                        if os.fstat(src.fileno()).st_size < self.offset:
                            self.offset = 0  # rotated while we were not running
                        src.seek(self.offset)
                    except FileNotFoundError:
                        src = None
                chunk = src.read(1 << 16) if src is not None else b""
                if chunk:
                    self.offset += len(chunk)
                    if not pending:
                        pending_since = time.monotonic()
                    records, pending = format_lines(pending + chunk, final=False)
                    if records:
                        out.write(b"".join(records))
                        pending_since = time.monotonic()
                    continue
                # No new data: flush a lingering partial line, report progress, follow rotation.
                stopping = self._stop.is_set()
                if pending and (stopping or time.monotonic() - pending_since > PARTIAL_FLUSH_AFTER):
                    records, pending = format_lines(pending, final=True)
                    out.write(b"".join(records))
                now = time.monotonic()
                if self._on_progress and (stopping or now - last_progress > PROGRESS_INTERVAL):
                    last_progress = now
                    self._on_progress(self.offset - len(pending))  # resume before an unwritten tail
                if stopping:
                    return
                if src is not None and self._rotated(src_ino):
                    src.close()
                    src, self.offset = None, 0
                    continue
                self._stop.wait(POLL_INTERVAL)
        except Exception:  # noqa: BLE001 - a copier must never take the shim down
            log.exception("console copier for %s failed", self.source)
        finally:
            out.close()
            if src is not None:
                src.close()

    def _rotated(self, ino: int | None) -> bool:
        try:
            return os.stat(self.source).st_ino != ino
        except FileNotFoundError:
            return False
