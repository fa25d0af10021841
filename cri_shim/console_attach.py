"""Attach: the VM's serial console, both ways, for every client attached at once.

The serial is a pty whose output QEMU also hands to virtlogd for
`console.log`, which the ConsoleCopier tails into the CRI log (see
console_log.py and domain_xml.py). Attaching reads the pty through libvirt
(`virDomainOpenConsole`), so the log is a separate copy: attaching never costs
the log a byte, and the log never costs a client one. virtlet attached the
same console through its own unix socket, fanned out to the log writer and
the clients.

One `ConsoleHub` per domain holds the one libvirt console stream: opened when
the first client attaches, closed after the last one leaves, both under that
domain's own lock (never a process-wide one: a domain stuck in libvirt holds
up attaching to that VM only). Its output goes
to every client through a bounded per-client queue; a client that lets more
than CLIENT_QUEUE_BYTES pile up (it does not read) is disconnected, so it
never slows the console, the others or the guest (a pty nobody drains stalls
the guest's serial output). Every client's stdin is written into the console.

The stream is VIR_STREAM_NONBLOCK and every operation on it (recv, send,
removing its callback, abort) runs on libvirt's default event loop thread
(libvirt_host.py runs it), as `virsh console` does with its own loop: a
blocking virStreamRecv would hold the connection's lock while it waits, and
send and recv from two threads on one stream is not what libvirt promises.
Client threads only queue input and ask the loop to flush it.

A console held by someone else (`virsh console`) is answered with a clear
FailedPrecondition, not taken over (no VIR_DOMAIN_CONSOLE_FORCE): KubeVirt's
console kicks out an older connection of its own, but a foreign holder here is
an administrator debugging the VM, and vmlet's own clients share the hub.

A session ends when the client goes (`session.closed`), when the VM stops (the
console stream ends), or when the client's stdin reaches EOF — unless the
container's config says stdin_once without a tty: containerd then closes the
container's stdin and keeps the output flowing until the container stops; a
serial line has no EOF to pass on (and other clients share it), so the output
keeps flowing here too and stdin simply stops. There is no in-band detach
key: every byte typed reaches the guest (vmctl console has its own escape).
tty or not, the console goes to stdout; stderr gets nothing. Terminal resizes
cannot travel over a serial line and are dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref

import grpc
import libvirt

from proto.runtime.v1 import api_pb2

from . import errors

log = logging.getLogger("vmlet.attach")

CLIENT_QUEUE_BYTES = 1 << 20  # console output a client may leave unread before it is disconnected
INPUT_BUFFER_BYTES = 64 * 1024  # typed input waiting for the console (a writer blocks beyond it)
CHUNK = 64 * 1024
RECV_ROUNDS = 16  # reads per readable event, so one busy console cannot hog libvirt's event loop
CLOSE_TIMEOUT = 5.0

_READ_EVENTS = libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP

# runtime -> {domain name: _Domain}; a runtime that goes away takes its entries with it. _hubs_lock guards only
# these dicts and the users counts: it is never held across a libvirt call or a wait (one domain stuck in
# libvirt must not hold up attaching to any other).
_hubs: "weakref.WeakKeyDictionary[object, dict[str, _Domain]]" = weakref.WeakKeyDictionary()
_hubs_lock = threading.Lock()


def _call_soon(fn) -> None:
    """Run fn on libvirt's event loop thread (a zero timeout fires on the next loop iteration)."""
    def fire(timer, _opaque) -> None:
        libvirt.virEventRemoveTimeout(timer)
        try:
            fn()
        except Exception:  # noqa: BLE001 - never let a bug stop libvirt's event loop
            log.exception("console hub callback failed")

    libvirt.virEventAddTimeout(0, fire, None)


class _Client:
    """One attached session's view of the hub: its output queue and how it ended."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.ended: str | None = None  # None while attached; else why: "overrun", "console", "detached"
        self.done = threading.Event()  # the session should end now

    def offer(self, data: bytes) -> None:
        """Queue console output (libvirt's loop thread: never blocks)."""
        with self.cond:
            if self.ended:
                return
            if self.queued + len(data) > self.limit:
                self.chunks.clear()
                self.queued = 0
                self._end("overrun")
                return
            self.chunks.append(data)
            self.queued += len(data)
            self.cond.notify()

    def end(self, why: str) -> None:
        with self.cond:
            self._end(why)

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        self.cond.notify_all()
        self.done.set()

    def take(self) -> bytes | None:
        """Queued output, up to CHUNK bytes (blocks); None once the client ended and nothing is left."""
        with self.cond:
            while not self.chunks:
                if self.ended:
                    return None
                self.cond.wait()
            out = []
            size = 0
            while self.chunks and (not out or size + len(self.chunks[0]) <= CHUNK):
                chunk = self.chunks.popleft()
                out.append(chunk)
                size += len(chunk)
            self.queued -= size
            return b"".join(out)


class ConsoleHub:
    """The one libvirt console stream of a domain, shared by every attached client."""

    def __init__(self, conn: libvirt.virConnect, domain: str) -> None:
        self.domain = domain
        self._conn = conn
        self._stream: libvirt.virStream | None = None
        self._clients: list[_Client] = []
        self._lock = threading.Condition()  # clients, input buffer, state
        self._input = bytearray()
        self._flush_scheduled = False
        self._want_write = False
        self.ended: str | None = None  # why the console stream ended
        self._closed = threading.Event()  # the stream is released (on the loop thread)

    # ------------------------------------------------------------ client side

    def open(self) -> None:
        """Open the console (raises libvirt.libvirtError: no domain, held by someone else, ...)."""
        dom = self._conn.lookupByName(self.domain)
        stream = self._conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, stream, 0)  # 0: no FORCE, see the module docstring
            self._stream = stream  # before the callback: its first event must find it
            stream.eventAddCallback(_READ_EVENTS, self._on_event, None)
        except BaseException:
            self._stream = None
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
            raise

    def add(self, client: _Client) -> None:
        with self._lock:
            if self.ended:
                client.end("console")
            self._clients.append(client)

    def remove(self, client: _Client) -> int:
        """Take the client off; returns how many remain."""
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
            return len(self._clients)

    def write(self, data: bytes, client: _Client) -> bool:
        """Queue input for the console; blocks while the input buffer is full. False once the console ended
        or the client did."""
        with self._lock:
            while len(self._input) >= INPUT_BUFFER_BYTES and not self.ended and not client.done.is_set():
                self._lock.wait(0.5)
            if self.ended or client.done.is_set():
                return False
            self._input += data
            if not self._flush_scheduled:
                self._flush_scheduled = True
                schedule = True
            else:
                schedule = False
        if schedule:
            _call_soon(self._flush)
        return True

    def close(self) -> None:
        """Release the stream (on the loop thread) and wait until it is."""
        _call_soon(self._release)
        if not self._closed.wait(CLOSE_TIMEOUT):
            log.warning("console of %s: libvirt's event loop did not release the stream within %ss",
                        self.domain, CLOSE_TIMEOUT)

    # ------------------------------------------------------------ libvirt's event loop thread

    def _on_event(self, stream: libvirt.virStream, events: int, _opaque) -> None:
        if self._stream is None:
            return
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            for _ in range(RECV_ROUNDS):
                try:
                    data = stream.recv(CHUNK)
                except libvirt.libvirtError as e:
                    self._end(f"console read failed: {e}")
                    return
                if data == -2:
                    break
                if not data:
                    self._end("the console closed (the VM stopped)")
                    return
                with self._lock:
                    clients = list(self._clients)
                for c in clients:
                    c.offer(data)
        if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
            self._flush()
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._end("the console stream hung up (the VM stopped)")

    def _flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            if self._stream is None or self.ended:
                return
            while self._input:
                try:
                    sent = self._stream.send(bytes(self._input[:CHUNK]))
                except libvirt.libvirtError as e:
                    self._end_locked(f"console write failed: {e}")
                    return
                if sent == -2 or sent <= 0:
                    break
                del self._input[:sent]
            self._lock.notify_all()
            want_write = bool(self._input)
            if want_write != self._want_write:
                self._want_write = want_write
                events = _READ_EVENTS | (libvirt.VIR_STREAM_EVENT_WRITABLE if want_write else 0)
                try:
                    self._stream.eventUpdateCallback(events)
                except libvirt.libvirtError as e:
                    self._end_locked(f"console stream failed: {e}")

    def _end(self, why: str) -> None:
        with self._lock:
            self._end_locked(why)

    def _end_locked(self, why: str) -> None:
        if self.ended:
            return
        self.ended = why
        log.info("console of %s ended: %s", self.domain, why)
        if self._stream is not None:  # (on the loop thread) no more events: an ended stream keeps firing HANGUP
            try:
                self._stream.eventUpdateCallback(0)
            except libvirt.libvirtError:
                pass
        for c in self._clients:
            c.end("console")
        self._lock.notify_all()

    def _release(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            for release in (stream.eventRemoveCallback, stream.abort):
                try:
                    release()
                except libvirt.libvirtError:
                    pass  # the VM stopped: libvirt ended the stream already
        self._closed.set()


def _domain_of(rt, container_id: str):
    c = rt.container(container_id)
    if c.state != api_pb2.CONTAINER_RUNNING:
        raise errors.failed_precondition(
            f"container {errors.show(container_id)} is not running (state "
            f"{api_pb2.ContainerState.Name(c.state)}): attach needs a running VM")
    return c


def check_attach(rt, container_id: str) -> None:
    """Called by the Attach RPC before a URL is handed out: NotFound, FailedPrecondition (not running)."""
    c = _domain_of(rt, container_id)
    if not rt.host.is_active(c.domain_name):
        raise errors.failed_precondition(f"container {errors.show(container_id)}: its VM is not running")


class _Domain:
    """One domain's attach state. Its lock is held across that domain's libvirt calls (open) and its close
    wait, so a client attaching while the last one leaves waits for this domain only, and then finds the
    console released rather than still held by vmlet's own closing stream."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hub: ConsoleHub | None = None  # the open hub (under lock)
        self.users = 0  # clients joining, attached or leaving (under _hubs_lock); the entry goes at 0


def _enter(rt, name: str) -> _Domain:
    with _hubs_lock:
        d = _hubs.setdefault(rt, {}).setdefault(name, _Domain())
        d.users += 1
        return d


def _exit(rt, name: str, d: _Domain) -> None:
    with _hubs_lock:
        d.users -= 1
        domains = _hubs.get(rt)
        if d.users == 0 and domains is not None and domains.get(name) is d:
            del domains[name]


def _join(rt, c) -> tuple[_Domain, ConsoleHub, _Client]:
    client = _Client(CLIENT_QUEUE_BYTES)
    d = _enter(rt, c.domain_name)
    try:
        with d.lock:
            hub = d.hub
            if hub is None or hub.ended:
                if hub is not None:  # the VM stopped under it; release our stream before opening a new one
                    d.hub = None
                    hub.close()
                try:
                    hub = ConsoleHub(rt.host.conn(), c.domain_name)
                    hub.open()
                except libvirt.libvirtError as e:
                    raise _open_error(c, e) from None
                d.hub = hub
            hub.add(client)
    except BaseException:
        _exit(rt, c.domain_name, d)
        raise
    return d, hub, client


def _leave(rt, d: _Domain, hub: ConsoleHub, client: _Client) -> None:
    client.end("detached")
    try:
        with d.lock:
            if hub.remove(client):
                return
            if d.hub is hub:
                d.hub = None
            hub.close()  # under this domain's lock only (see _Domain)
    finally:
        _exit(rt, hub.domain, d)


def _open_error(c, e: libvirt.libvirtError) -> errors.CRIError:
    detail = e.get_error_message() or str(e)
    if "Active console session" in detail:
        return errors.failed_precondition(
            f"the console of container {c.id[:12]} is in use by another client (virsh console?); "
            "vmlet does not take it over: close that session and attach again")
    if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
        return errors.failed_precondition(f"container {c.id[:12]}: its VM no longer exists")
    return errors.from_libvirt(e, f"cannot open the console of container {c.id[:12]}")


def attach_stream(rt, container_id: str, session) -> None:
    """Attach the session to the VM's serial console; returns when the session ends (see the module docstring).

    Raises errors.CRIError when the console cannot be opened (VM not running, console held elsewhere) and,
    RESOURCE_EXHAUSTED, when the client was disconnected for not reading. On return, a pump thread blocked
    in the session's read or write ends as soon as the server closes the session's streams."""
    c = _domain_of(rt, container_id)
    stdin_once = rt.container_config(c).stdin_once
    d, hub, client = _join(rt, c)
    tag = c.id[:12]
    out = inp = None
    try:
        if session.stdout is not None:
            out = threading.Thread(target=_pump_out, args=(client, session.stdout), name=f"attach-out-{tag}",
                                   daemon=True)
            out.start()
        if session.stdin is not None:
            keep_output = stdin_once and not session.tty
            inp = threading.Thread(target=_pump_in, args=(hub, client, session.stdin, keep_output),
                                   name=f"attach-in-{tag}", daemon=True)
            inp.start()
        while not client.done.wait(0.2):
            if session.closed.is_set():
                break
            _drain(session.resize)
    finally:
        why = client.ended
        _leave(rt, d, hub, client)
        # A dropped client's output pump is stuck in stdout.write by definition and its input pump most
        # likely in stdin.read: return the error at once (the server then aborts the connection, which ends
        # both). Otherwise give the pumps a moment to finish.
        if why != "overrun":
            for t in (out, inp):
                if t is not None:
                    t.join(0.5)
    log.info("attach to container %s ended: %s", tag, why or "session closed")
    if why == "overrun":
        raise errors.CRIError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"attach to container {tag}: disconnected, the client left more than "
                              f"{CLIENT_QUEUE_BYTES} bytes of console output unread")


def _pump_out(client: _Client, stdout) -> None:
    try:
        while True:
            data = client.take()
            if data is None:
                return
            stdout.write(data)
    except OSError:  # BrokenPipeError: the client went away
        pass
    finally:
        client.end("output closed")


def _pump_in(hub: ConsoleHub, client: _Client, stdin, keep_output: bool) -> None:
    try:
        while not client.done.is_set():
            data = stdin.read(4096)
            if not data:
                break
            if not hub.write(data, client):
                return
    except OSError:
        client.end("input failed")
        return
    if not keep_output:
        client.end("stdin closed")


def _drain(resize) -> None:
    # A serial line carries no window size; drain so the server's bounded queue never blocks on us.
    try:
        while True:
            resize.get_nowait()
    except Exception:  # noqa: BLE001 - queue.Empty
        return
