"""Benchmark: attach echo latency through the streaming URL vs the same keystroke over a raw libvirt console.

    .venv/bin/python bench/attach_echo.py [--keys 30] [--rounds 3] [--quick]

One vmlet daemon of the bench's own with one VM pod (bench/vm_pod.py); the test image runs a root shell
on its serial console once Enter is pressed there. A sample is one keystroke (a lower-case letter) typed
at that shell's prompt, timed until its echo comes back; an untimed backspace then erases it, so every
sample is the same keystroke on the same empty line:
- vmlet: the CRI Attach URL (stdin, stdout, tty) with the kubernetes Python client's WebSocket stream
  (kubernetes.stream.ws_client, v5/v4.channel.k8s.io) in this process: the client -> vmlet's streaming
  server -> its console hub -> libvirt's console stream -> the guest's serial line, and back;
- baseline: a libvirt console stream this process opens itself (`dom.openConsole`, non-blocking, read on
  libvirt's event loop as `virsh console` does).
The attach hub holds the domain's one console stream while a client is attached, so the two take turns: a
round is a block of --keys samples over the raw stream, then a block through vmlet (each block opens its
session, checks the shell answers, and closes it). The median and p90 over all rounds count (ratio of the
medians: vmlet/raw). It reports; it does not assert. The pod, the daemon and its network go at the end,
also on failure, and it exits non-zero if anything was left.
"""

from __future__ import annotations

import statistics
import string
import sys
import threading
import time
from pathlib import Path

import libvirt
import websocket
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, exit_status, print_ratio  # noqa: E402
from bench.vm_pod import percentile, running_vm  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import libvirt_env  # noqa: E402

KEY_TIMEOUT = 30.0  # s for one echo: TCG guests are slow, never forever
OPEN_TIMEOUT = 30.0  # s for the console to be free again after the other kind's session
BACKSPACE = b"\x7f"  # the tty's VERASE
_READ_EVENTS = libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP


class ConsoleGone(Exception):
    """The session ended (or was refused): `detail` says what the other side said."""


def start_event_loop() -> None:
    """libvirt's default event loop on a thread of its own (before any connection is opened)."""
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()


def on_loop(fn) -> None:
    """Run fn on the event loop thread and wait for it (stream callbacks and abort belong there)."""
    done = threading.Event()
    box: list[BaseException] = []

    def fire(timer, _opaque) -> None:
        libvirt.virEventRemoveTimeout(timer)
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            box.append(e)
        finally:
            done.set()

    libvirt.virEventAddTimeout(0, fire, None)
    if not done.wait(10):
        raise TimeoutError("libvirt's event loop did not run the call")
    if box:
        raise box[0]


class Side:
    """One way to the console: send bytes, wait on everything received so far."""

    def __init__(self) -> None:
        self.received = bytearray()

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def wait_until(self, done, timeout: float) -> bool:
        """Until done() (True) or the timeout (False); ConsoleGone when the session ended first."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def wait(self, offset: int, needle: bytes, timeout: float) -> None:
        if not self.wait_until(lambda: needle in self.received[offset:], timeout):
            raise TimeoutError(f"{needle!r} not echoed within {timeout}s ({type(self).__name__})")


class RawConsole(Side):
    def __init__(self, conn: libvirt.virConnect, domain: str) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._ended = ""
        dom = conn.lookupByName(domain)
        self.stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, self.stream, 0)  # no FORCE: vmlet's hub must have let go
        except libvirt.libvirtError as e:
            raise ConsoleGone(e.get_error_message() or str(e)) from None
        on_loop(lambda: self.stream.eventAddCallback(_READ_EVENTS, self._on_event, None))

    def _on_event(self, stream, _events, _opaque) -> None:
        while True:
            try:
                data = stream.recv(65536)
            except libvirt.libvirtError as e:
                data, why = b"", e.get_error_message() or str(e)
            else:
                why = "console stream ended"
            if data == -2:  # nothing more now
                return
            with self._cond:
                if not data:
                    self._ended = why
                    stream.eventRemoveCallback()
                else:
                    self.received += data
                self._cond.notify_all()
            if not data:
                return

    def send(self, data: bytes) -> None:
        while data:
            sent = self.stream.send(data)
            if sent == -2:  # the console's buffer is full: a TCG guest reads slowly
                time.sleep(0.001)
                continue
            data = data[sent:]

    def wait_until(self, done, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: done() or self._ended, timeout):
                return False
            if not done():
                raise ConsoleGone(self._ended)
            return True

    def close(self) -> None:
        def end() -> None:
            if not self._ended:
                self.stream.eventRemoveCallback()
            self.stream.abort()

        on_loop(end)


class VmletAttach(Side):
    def __init__(self, pod) -> None:
        super().__init__()
        url = pod.runtime.Attach(api_pb2.AttachRequest(container_id=pod.container_id, stdin=True, stdout=True,
                                                       tty=True), timeout=60).url
        self.ws = ws_client.WSClient(Configuration(), url.replace("http", "ws", 1), None, False, binary=True)

    def send(self, data: bytes) -> None:
        self.ws.write_stdin(data)

    def wait_until(self, done, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not done():
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            if not self.ws.is_open():
                raise ConsoleGone(self.ws.read_channel(ws_client.ERROR_CHANNEL).decode(errors="replace"))
            try:
                self.ws.update(timeout=left)
            except websocket.WebSocketConnectionClosedException:
                raise ConsoleGone("the streaming server closed the connection") from None
            self.received += self.ws.read_channel(ws_client.STDOUT_CHANNEL)
        return True

    def close(self) -> None:
        self.ws.close()


def settle(side: Side, offset: int, quiet: float = 0.05) -> None:
    """Wait for output after `offset`, then for `quiet` s without more (an erase may come in pieces)."""
    if not side.wait_until(lambda: len(side.received) > offset, KEY_TIMEOUT):
        raise TimeoutError(f"the guest did not echo the backspace within {KEY_TIMEOUT}s")
    while True:
        seen = len(side.received)
        if not side.wait_until(lambda: len(side.received) > seen, quiet):
            return


def shell_answers(side: Side, n: int) -> None:
    """The console's shell runs and reads this line (the first Enter starts it: console.sh)."""
    side.send(b"\n")
    offset = len(side.received)
    side.send(f"echo ECHO-BENCH-{n}-$((6*7))\n".encode())
    side.wait(offset, f"ECHO-BENCH-{n}-42".encode(), KEY_TIMEOUT * 2)
    time.sleep(0.2)  # the next prompt


def keystrokes(side: Side, count: int) -> list[float]:
    took = []
    for i in range(count):
        key = string.ascii_lowercase[i % 26].encode()
        offset = len(side.received)
        start = time.perf_counter()
        side.send(key)
        side.wait(offset, key, KEY_TIMEOUT)
        took.append(time.perf_counter() - start)
        offset = len(side.received)
        side.send(BACKSPACE)
        settle(side, offset)
    return took


def session(open_side, what: str) -> Side:
    """A session of one kind, retried while the other kind's session still holds the console."""
    deadline = time.monotonic() + OPEN_TIMEOUT
    n = 0
    while True:
        n += 1
        side = None
        try:
            side = open_side()
            shell_answers(side, n)
            return side
        except ConsoleGone as e:
            if side is not None:
                side.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: the console stayed unavailable: {e}") from None
            time.sleep(0.2)


def block(open_side, what: str, count: int) -> list[float]:
    side = session(open_side, what)
    try:
        return keystrokes(side, count)
    finally:
        side.close()


def line(what: str, xs: list[float]) -> str:
    return f"{what:<52}{statistics.median(xs) * 1000:9.2f}{percentile(xs, 90) * 1000:9.2f}"


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--keys", 30, 3, "keystrokes per block")
    cli.count("--rounds", 3, 1, "rounds (a raw block, then a vmlet block)")
    args = cli.parse()
    start_event_loop()
    raw, ours = [], []
    with running_vm("attach-bench", stdin=True) as pod:
        conn = libvirt.open(libvirt_env.LIBVIRT_URI)  # on the event loop: its streams get callbacks
        try:
            for _ in range(args.rounds):
                raw += block(lambda: RawConsole(conn, pod.domain), "raw console", args.keys)
                ours += block(lambda: VmletAttach(pod), "vmlet attach", args.keys)
        finally:
            conn.close()
    print(f"accelerator: {libvirt_env.DOMAIN_TYPE}, {args.rounds} round(s) of {args.keys} keystrokes each kind")
    print(f"{'keystroke to its echo (ms)':<52}{'median':>9}{'p90':>9}")
    print(line("vmlet attach URL, kubernetes ws_client (WebSocket)", ours))
    print(line("raw libvirt console stream (dom.openConsole)", raw))
    print_ratio("vmlet attach/raw console echo latency (median)", statistics.median(ours) / statistics.median(raw))
    return exit_status(pod.left)


if __name__ == "__main__":
    sys.exit(main())
