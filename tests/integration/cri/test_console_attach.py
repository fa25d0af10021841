"""Attach (cri_shim/console_attach.py) on a real VM's serial console, driven in-process.

The vmlet daemon runs in this process (cri_shim.server.Daemon: the real
runtime, CRI socket, libvirt connection and console copier) so the test can
call `attach_stream(daemon.runtime, ...)` the way the streaming server will;
the pod is made through the CRI socket as the kubelet would. The session
objects below play the streaming server's side of backend.Session: a reader
fed by the test, writers that collect (or, for the client that never reads,
block until the server closes them), and the server closing a session's
streams once the runtime function returns.
"""

from __future__ import annotations

import contextlib
import queue
import re
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from cri_shim import config as config_mod
from cri_shim import console_attach, errors
from cri_shim.network import NetworkManager
from cri_shim.server import Daemon
from cri_shim.streaming.backend import Session
from proto.runtime.v1 import api_pb2
from tests.support import cri, libvirt_env, netsupport

from .conftest import TESTVM

pytestmark = pytest.mark.libvirt

BOOT_TIMEOUT = 180


class FedReader:
    """The client's stdin as the server hands it over: what the test feeds, b"" at EOF or once closed."""

    def __init__(self) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue()

    def feed(self, data: bytes) -> None:
        self._q.put(data)

    def eof(self) -> None:
        self._q.put(None)

    def read(self, n: int = 65536) -> bytes:
        data = self._q.get()
        if data is None:
            self._q.put(None)  # EOF stays EOF
            return b""
        return data[:n]


class CollectingWriter:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.closed = False

    def write(self, data: bytes) -> None:
        with self._cond:
            if self.closed:
                raise BrokenPipeError("client gone")
            self._buf += data
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True

    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(self._buf.decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{pattern!r} not seen within {timeout}s; got:\n{self.text()[-2000:]}")
                self._cond.wait(left)


class NeverReadingWriter:
    """A client whose window stays full: every write blocks until the server closes the stream."""

    def __init__(self) -> None:
        self._closed = threading.Event()
        self.writes = 0
        self.blocked = threading.Event()  # a write is waiting

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.blocked.set()
        self._closed.wait()
        self.blocked.clear()
        raise BrokenPipeError("client gone")

    def close(self) -> None:
        self._closed.set()


class PauseAt:
    """Holds the thread that installs it at its first call of the libvirt C function `name` until released: a
    libvirt call that does not come back (a domain stuck in libvirtd), with nothing in the code replaced."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached = threading.Event()
        self.release = threading.Event()

    def install(self) -> None:
        sys.setprofile(self._profile)  # this thread only

    def _profile(self, _frame, event: str, arg) -> None:
        if event == "c_call" and getattr(arg, "__name__", None) == self.name and not self.reached.is_set():
            self.reached.set()
            self.release.wait(300)


class Attached:
    """One attach session run the way the streaming server runs it: attach_stream on a thread of its own,
    then (like the server) the session closed and its streams shut once the function returned."""

    def __init__(self, rt, container_id: str, stdin=True, stdout=None, tty=False, before=None) -> None:
        self.stdin = FedReader() if stdin else None
        self.stdout = stdout if stdout is not None else CollectingWriter()
        self.session = Session(stdin=self.stdin, stdout=self.stdout, stderr=None if tty else CollectingWriter(),
                               tty=tty)
        self.error: BaseException | None = None
        self.returned = threading.Event()
        self.returned_at = 0.0
        self.writer_blocked_at_return = False
        self._thread = threading.Thread(target=self._run, args=(rt, container_id, before), daemon=True)
        self._thread.start()

    def _run(self, rt, container_id: str, before) -> None:
        try:
            if before is not None:
                before()
            console_attach.attach_stream(rt, container_id, self.session)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.error = e
        finally:
            self.returned_at = time.monotonic()
            blocked = getattr(self.stdout, "blocked", None)
            self.writer_blocked_at_return = blocked is not None and blocked.is_set()
            self.returned.set()
            self.session.closed.set()
            if self.stdin:
                self.stdin.eof()
            self.stdout.close()

    def type(self, text: str) -> None:
        self.stdin.feed(text.encode())

    def wait(self, timeout: float) -> None:
        assert self.returned.wait(timeout), "attach_stream did not return"
        self._thread.join(5)


@pytest.fixture
def daemon(libvirt_conn, test_image, image_server, vmlet_dir: Path, cni_conf_dir: Path, test_network):
    """The vmlet daemon in this process; teardown removes its pods through the CRI and sweeps what is left."""
    url = image_server.serve_file("/testvm.qcow2", test_image)
    translations = cri.translations_for(vmlet_dir / "translations.yaml", {"testvm": url})
    state, socket, cfg = vmlet_dir / "state", vmlet_dir / "vmlet.sock", vmlet_dir / "vmlet.yaml"
    cri.write_config(cfg, state, socket, translations, cni_conf_dir=str(cni_conf_dir),
                     cni_bin_dirs=[netsupport.CNI_BIN_DIR])
    d = Daemon(config_mod.load(cfg))
    client = None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: NetworkManager(state, cni_conf_dir, [netsupport.CNI_BIN_DIR]).sweep([]))
        cleanup.callback(libvirt_env.sweep, libvirt_conn)
        cleanup.callback(d.stop)
        d.serve()
        client = cri.connect(socket)
        cleanup.callback(client.close)
        cleanup.callback(_remove_pods, client)
        yield d, client
    held = test_network.allocated_ips()
    for f in test_network.ipam_dir.glob("*/[0-9]*"):
        f.unlink()
    assert not held, f"pod IPs not released: {held}"


def _remove_pods(client: cri.Client) -> None:
    for sb in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
        client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)


def _wait_log(path: Path, pattern: str, timeout: float) -> re.Match:
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if m := regex.search(text):
            return m
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout}s:\n{text[-3000:]}")


def _run_vm(client: cri.Client, log_dir: Path, name: str, annotations: dict[str, str] | None = None,
            port_mappings=(), stdin_once: bool = False) -> tuple[str, str]:
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=120)
    pod = cri.pod_config(name=name, log_directory=str(log_dir), annotations=annotations)
    pod.port_mappings.extend(port_mappings)
    sandbox_id = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    ccfg = cri.container_config(TESTVM, log_path="vm/0.log")
    ccfg.stdin = ccfg.stdin_once = stdin_once
    container_id = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=ccfg, sandbox_config=pod), timeout=120).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id), timeout=120)
    return sandbox_id, container_id


def _pump_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("attach-")]


def test_console_attach_shared_by_clients_log_intact_slow_client_dropped_ends_when_vm_stops(
        daemon, vmlet_dir, libvirt_conn, monkeypatch):
    d, client = daemon
    rt = d.runtime
    log = vmlet_dir / "pods" / "attach" / "vm" / "0.log"
    _, cid = _run_vm(client, log.parent.parent, "attach")

    with pytest.raises(errors.CRIError) as e:  # a created-but-unknown ID and an empty one: named
        console_attach.check_attach(rt, "f" * 64)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(errors.CRIError) as e:
        console_attach.check_attach(rt, "")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "container_id" in e.value.message
    console_attach.check_attach(rt, cid)
    _wait_log(log, r"stdout F VMLET-TESTVM: ready$", BOOT_TIMEOUT)

    # Someone else (virsh console, here a second libvirt client) holds the console: refused, not stolen.
    dom = libvirt_conn.lookupByName(rt.container(cid).domain_name)
    foreign = libvirt_conn.newStream(0)
    dom.openConsole(None, foreign, 0)
    try:
        refused = Attached(rt, cid)
        refused.wait(30)
        assert isinstance(refused.error, errors.CRIError), refused.error
        assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "in use by another client" in refused.error.message
    finally:
        foreign.abort()

    # Two clients; one types, both see the guest's answer (computed by the guest: not an echo of the input).
    a = Attached(rt, cid)
    b = Attached(rt, cid, stdin=False, tty=True)  # a terminal: one output stream, the same console
    a.type("\n")  # console.sh starts the shell on the first line
    time.sleep(2)
    a.type("echo ATTACH-$((6*7))-OK\n")
    a.stdout.wait_for(r"ATTACH-42-OK\r?\n", 60)
    b.stdout.wait_for(r"ATTACH-42-OK\r?\n", 10)
    _wait_log(log, r"stdout F ATTACH-42-OK$", 10)  # the CRI log has it as well
    assert a.session.stderr.text() == "" and b.session.stderr is None  # the console is stdout, stderr gets nothing

    # A client that never reads is dropped once its queue is over the bound; the others lose nothing.
    monkeypatch.setattr(console_attach, "CLIENT_QUEUE_BYTES", 16 * 1024)
    domain = rt.container(cid).domain_name
    before = set(console_attach._hubs[rt][domain].hub._clients)
    stuck = Attached(rt, cid, stdin=True, stdout=NeverReadingWriter())
    assert _eventually(lambda: len(console_attach._hubs[rt][domain].hub._clients) == 3, 10)
    (stuck_client,) = set(console_attach._hubs[rt][domain].hub._clients) - before
    lines = 4000
    a.type(f"seq 1 {lines} | sed 's/^/FLOOD-/'; echo FLOOD-DONE-$((1+1))\n")
    assert stuck_client.done.wait(120), "the client that never reads was not dropped"
    dropped_at = time.monotonic()
    stuck.wait(10)
    assert isinstance(stuck.error, errors.CRIError) and stuck.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "unread" in stuck.error.message
    # The error comes back at once, while the writer is still stuck (its stdin never ended either): the
    # server can abort the connection then instead of waiting on a write that never finishes.
    assert stuck.writer_blocked_at_return, "attach_stream waited for the stuck write"
    assert stuck.returned_at - dropped_at < 1.0, f"returned {stuck.returned_at - dropped_at:.2f}s after the drop"
    for s in (a, b):
        s.stdout.wait_for(r"FLOOD-DONE-2\r?\n", 180)
        got = [int(n) for n in re.findall(r"^FLOOD-(\d+)\r?$", s.stdout.text(), re.MULTILINE)]
        assert got == list(range(1, lines + 1)), f"{len(got)} lines, first gaps: " + str(
            sorted(set(range(1, lines + 1)) - set(got))[:5])
    _wait_log(log, r"stdout F FLOOD-DONE-2$", 30)
    in_log = [int(n) for n in re.findall(r" stdout F FLOOD-(\d+)$", log.read_text(), re.MULTILINE)]
    assert in_log == list(range(1, lines + 1))

    # The server closing a session ends it; stdin EOF ends the other (stdin_once is off).
    b.session.closed.set()
    b.wait(10)
    assert b.error is None
    a.stdin.eof()
    a.wait(10)
    assert a.error is None
    assert not console_attach._hubs.get(rt), "the console stayed open with nobody attached"
    assert _eventually(lambda: not _pump_threads(), 10), _pump_threads()

    # Attached again (a fresh console stream), then the VM stops: the session ends by itself.
    c = Attached(rt, cid)
    c.type("echo AGAIN-$((2*3))\n")
    c.stdout.wait_for(r"AGAIN-6\r?\n", 60)
    client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=120)
    c.wait(60)
    assert c.error is None
    assert not console_attach._hubs.get(rt)
    assert _eventually(lambda: not _pump_threads(), 10), _pump_threads()
    with pytest.raises(errors.CRIError) as e:
        console_attach.check_attach(rt, cid)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not running" in e.value.message


def test_stdin_once_without_tty_keeps_the_output_after_stdin_ends_until_the_vm_stops(daemon, vmlet_dir):
    """containerd's rule: stdin_once && !tty closes the container's stdin and keeps the output attached."""
    d, client = daemon
    rt = d.runtime
    log = vmlet_dir / "pods" / "once" / "vm" / "0.log"
    _, cid = _run_vm(client, log.parent.parent, "once", stdin_once=True)
    _wait_log(log, r"stdout F VMLET-TESTVM: ready$", BOOT_TIMEOUT)
    once = Attached(rt, cid)
    other = Attached(rt, cid)  # same container, so the same rule: it types, once only watches after its EOF
    once.type("\n")
    time.sleep(2)
    once.type("echo ONCE-$((3*3))\n")
    once.stdout.wait_for(r"ONCE-9\r?\n", 60)
    once.stdin.eof()
    assert not once.returned.wait(3), "the session ended at stdin's EOF despite stdin_once"
    other.type("echo AFTER-EOF-$((4*4))\n")
    once.stdout.wait_for(r"AFTER-EOF-16\r?\n", 60)
    other.session.closed.set()
    other.wait(10)
    client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=120)
    once.wait(60)
    assert once.error is None and other.error is None
    assert not console_attach._hubs.get(rt)
    assert _eventually(lambda: not _pump_threads(), 10), _pump_threads()


def test_attach_to_one_vm_never_waits_for_another_vms_console(daemon, vmlet_dir):
    """One VM's console open that does not come back (paused in its libvirt call) holds up no attach to,
    and no detach from, another VM; once it comes back that attach works too."""
    d, client = daemon
    rt = d.runtime
    pods = vmlet_dir / "pods"
    _, slow_id = _run_vm(client, pods / "slow", "slow")
    _, quick_id = _run_vm(client, pods / "quick", "quick")
    slow_dom, quick_dom = rt.container(slow_id).domain_name, rt.container(quick_id).domain_name

    pause = PauseAt("virDomainOpenConsole")
    slow = Attached(rt, slow_id, before=pause.install)
    try:
        assert pause.reached.wait(30), "the slow VM's attach never reached virDomainOpenConsole"

        def quick_open() -> bool:
            entry = console_attach._hubs.get(rt, {}).get(quick_dom)
            return entry is not None and entry.hub is not None

        quick = Attached(rt, quick_id)
        assert _eventually(quick_open, 5), "attaching to one VM waited for another VM's console"
        watcher = Attached(rt, quick_id, stdin=False)  # the same VM's hub, shared
        quick.stdout.wait_for(r"VMLET-TESTVM: ready", BOOT_TIMEOUT)  # the console flows meanwhile
        quick.type("\n")
        time.sleep(2)
        quick.type("echo QUICK-$((5*5))\n")
        watcher.stdout.wait_for(r"QUICK-25\r?\n", 60)
        # Leaving: the last client closes the console and waits for libvirt to release it; not blocked either.
        watcher.session.closed.set()
        watcher.wait(10)
        quick.stdin.eof()
        quick.wait(10)
        assert quick.error is None and watcher.error is None
        assert not quick_open(), "the quick VM's console stayed open with nobody attached"
        assert not slow.returned.is_set()
    finally:
        pause.release.set()

    # The paused call returns: that attach opens its console and works like any other.
    _wait_log(pods / "slow" / "vm" / "0.log", r"stdout F VMLET-TESTVM: ready$", BOOT_TIMEOUT)
    slow.type("\n")
    time.sleep(2)
    slow.type("echo SLOW-$((8*8))\n")
    slow.stdout.wait_for(r"SLOW-64\r?\n", 60)
    slow.session.closed.set()
    slow.wait(10)
    assert slow.error is None
    assert slow_dom not in console_attach._hubs.get(rt, {}) and not console_attach._hubs.get(rt)
    assert _eventually(lambda: not _pump_threads(), 10), _pump_threads()


def _eventually(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


