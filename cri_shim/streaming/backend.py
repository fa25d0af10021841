"""What the streaming server hands the runtime: one session's streams, transport-independent.

The server (SPDY or WebSocket, remotecommand or port-forward) turns a
client's streams into these objects; the runtime's session functions
(`container_exec.exec_stream`, `console_attach.attach_stream`,
`port_forward.forward_stream`) use only this interface, so every transport
reaches the VM the same way, as with the kubelet's `streaming.Runtime`.

Contract, for both sides:
- `Reader.read(n)` blocks until data, answers at most n bytes, and b"" at
  the client's EOF or once the session is closed.
- `Writer.write(data)` blocks while the client does not take the bytes (so a
  client that never reads holds back only its own session), at most the
  server's send timeout, and raises `BrokenPipeError` once the client has
  gone or the connection was aborted.
- A session function that raises RESOURCE_EXHAUSTED (attach: the client fell
  too far behind) gets its connection aborted at once, with no status.
- `Session.closed` is set when the client has gone or the server shuts the
  session down: a runtime function that waits on the guest checks it and
  returns (killing or leaving its guest process as the CRI says).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Protocol


class Reader(Protocol):
    def read(self, n: int = 65536) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...


@dataclass
class Session:
    """An exec or attach session (remotecommand)."""

    stdin: Reader | None
    stdout: Writer | None
    stderr: Writer | None  # None with tty=true: a terminal has one output stream
    tty: bool
    closed: threading.Event = field(default_factory=threading.Event)
    # Terminal sizes (width, height) from the client's resize stream; tty sessions only.
    resize: "queue.Queue[tuple[int, int]]" = field(default_factory=lambda: queue.Queue(maxsize=16))


class Duplex(Protocol):
    """One port-forward connection (a data stream and its error stream on the wire)."""

    closed: threading.Event

    def read(self, n: int = 65536) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close_write(self) -> None: ...
