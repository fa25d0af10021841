"""PortForward (cri_shim/port_forward.py) into a real pod network: real netns, real CNI, real dnsmasq, and a
real TCP server in a fake VM (a netns on the pod's host bridge with the VM's MAC, its address from the pod's
DHCP server), driven through a real Runtime over a temp state dir.

The Duplex below plays the streaming server's side of one port-forward stream (backend.Duplex): the test
feeds what the client sends and reads what reaches it, EOFs included.
"""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

from cri_shim import errors, port_forward
from cri_shim.config import Config
from cri_shim.libvirt_host import LibvirtHost
from cri_shim.network import netns
from cri_shim.network import NetworkError
from cri_shim.network.manager import DHCP_SERVER_IP
from cri_shim.runtime import Runtime
from cri_shim.state import SandboxRecord
from image_service.store import Store as ImageStore
from proto.runtime.v1 import api_pb2
from tests.integration.cri import conftest as cri_fixtures
from tests.integration.cri import test_console_attach as attach_test
from tests.support import libvirt_env, netsupport

# The in-process vmlet daemon of the attach test, with the fixtures it needs, for the real-guest test.
vmlet_dir = cri_fixtures.vmlet_dir
cni_conf_dir = cri_fixtures.cni_conf_dir
daemon = attach_test.daemon

# In the fake VM: 7000 answers once the client's half is closed (half-close both ways), 7001 echoes, 7002 sends a
# banner and closes without reading, 7003 holds each connection and never reads.
SERVER = r"""
import socket, threading, time
def once(c):
    data = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        data += d
    c.sendall(b"got %d bytes: " % len(data) + data[::-1])
    c.close()
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
    c.close()
def banner(c):
    c.sendall(b"banner\n")
    c.close()
def hold(c):
    time.sleep(3600)
def serve(port, fn):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(7000, once), daemon=True).start()
threading.Thread(target=serve, args=(7002, banner), daemon=True).start()
threading.Thread(target=serve, args=(7003, hold), daemon=True).start()
print("listening", flush=True)
serve(7001, echo)
"""


class Duplex:
    def __init__(self) -> None:
        self.closed = threading.Event()
        self._in: queue.Queue[bytes | None] = queue.Queue()
        self._out = bytearray()
        self._cond = threading.Condition()
        self.write_closed = False

    # the client's side, driven by the test
    def send(self, data: bytes) -> None:
        self._in.put(data)

    def send_eof(self) -> None:
        self._in.put(None)

    def received(self, timeout: float) -> bytes:
        """Everything until the runtime's close_write()."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.write_closed, timeout):
                raise AssertionError(f"no EOF from the guest within {timeout}s; got {bytes(self._out)[:200]!r}")
            return bytes(self._out)

    # backend.Duplex, called by the runtime
    def read(self, n: int = 65536) -> bytes:
        while not self.closed.is_set():
            try:
                data = self._in.get(timeout=0.2)
            except queue.Empty:
                continue
            if data is None:
                self._in.put(None)
                return b""
            return data
        return b""

    def write(self, data: bytes) -> None:
        if self.closed.is_set():
            raise BrokenPipeError("client gone")
        with self._cond:
            self._out += data

    def close_write(self) -> None:
        with self._cond:
            self.write_closed = True
            self._cond.notify_all()


def forward(rt, sandbox_id: str, port: int, stream: Duplex) -> dict:
    """forward_stream on a thread, as the server runs it; the result box says how it ended."""
    box: dict = {}

    def run() -> None:
        try:
            port_forward.forward_stream(rt, sandbox_id, port, stream)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            box["error"] = e
        finally:
            stream.closed.set()  # the server closes the stream once the function returned

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


@pytest.fixture
def runtime(tmp_path_factory, conf_dir: Path, make_manager):
    """A real Runtime over a temp state dir (libvirt is never asked: nothing here needs a domain)."""
    state = tmp_path_factory.mktemp(netsupport.STATE_MARK) / "state"
    state.mkdir()
    config = Config(state_dir=state, cni_conf_dir=conf_dir, cni_bin_dirs=[netsupport.CNI_BIN_DIR],
                    libvirt_uri=libvirt_env.LIBVIRT_URI)
    make_manager(state_dir=state)  # its finalizer sweeps this state dir and checks nothing is left
    images = ImageStore(state / "images")
    host = LibvirtHost(config.libvirt_uri)
    rt = Runtime(config, host, images, "qemu")
    yield rt
    for sb in list(rt.store.sandboxes):
        rt.network.remove(sb)
    rt.close()
    images.close()
    host.close()


def ready_pod(rt, binding: str, port_mappings=()) -> tuple[str, object]:
    sid = netsupport.new_sandbox_id()
    pn = rt.network.setup(sid, pod_namespace="default", pod_name="pf", pod_uid=str(uuid.uuid4()), binding=binding)
    cfg = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="pf", namespace="default"),
                                   port_mappings=list(port_mappings))
    rt.store.add_sandbox(SandboxRecord(id=sid, name_key=f"pf_default_{sid[:8]}_0", state=api_pb2.SANDBOX_READY,
                                       created_at=time.time_ns(), config=cfg.SerializeToString(),
                                       ips=[pn.pod_ip], netns=pn.netns_path))
    return sid, pn


def guest(fake_vms, pn, tmp_path: Path):
    vm = fake_vms(pn.host_bridge, pn.vm_mac)
    lease = vm.dhcp(tmp_path)
    assert lease["ip"] == pn.vm_ip
    server = vm.spawn(sys.executable, "-c", SERVER)
    assert server.stdout.readline().strip() == "listening"
    return vm


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled(fds: int, threads: int, timeout: float = 5) -> None:
    """Our fds and threads are back to what they were (copy threads end once their stream is closed)."""
    deadline = time.monotonic() + timeout
    while (open_fds(), threading.active_count()) != (fds, threads) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds() == fds, "file descriptors leaked"
    assert threading.active_count() == threads, [t.name for t in threading.enumerate()]


def test_checks_name_the_field(runtime):
    sid, _ = ready_pod(runtime, "masquerade", [
        api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=53, host_port=53),
        api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=80),
        api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=80)])
    port_forward.check_port_forward(runtime, sid, [22, 80, 65535])

    def refused(ports, sandbox=sid):
        with pytest.raises(errors.CRIError) as e:
            port_forward.check_port_forward(runtime, sandbox, ports)
        return e.value

    for bad in (0, 65536, -1, 2**31):
        err = refused([22, bad])
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "port[1]" in err.message, err.message
    err = refused([53])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "port[0]" in err.message and "UDP" in err.message and "TCP only" in err.message
    assert refused([22], "0" * 64).code == grpc.StatusCode.NOT_FOUND
    assert refused([22], "").code == grpc.StatusCode.INVALID_ARGUMENT

    with runtime.store_lock():
        sb = runtime.store.sandboxes[sid]
        runtime.store.update_sandbox(SandboxRecord(**{**sb.__dict__, "state": api_pb2.SANDBOX_NOTREADY}))
    err = refused([22])
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "not ready" in err.message
    with pytest.raises(errors.CRIError) as e:  # the stream call checks again (the pod may have gone meanwhile)
        port_forward.forward_stream(runtime, sid, 22, Duplex())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_masquerade_forward_both_ways_half_close_refused_port_many_at_once_no_leak(
        runtime, fake_vms, tmp_path):
    sid, pn = ready_pod(runtime, "masquerade")
    guest(fake_vms, pn, tmp_path)
    fds, threads = open_fds(), threading.active_count()

    # The client's half-close reaches the guest (it answers only after EOF), the guest's reaches the client.
    s = Duplex()
    box = forward(runtime, sid, 7000, s)
    s.send(b"hello ")
    s.send(b"guest")
    s.send_eof()
    assert s.received(10) == b"got 11 bytes: tseug olleh"
    box["thread"].join(10)
    assert not box["thread"].is_alive() and "error" not in box

    # Refused: the kubelet-like message names the address, the port and the namespace.
    with pytest.raises(errors.CRIError) as e:
        port_forward.forward_stream(runtime, sid, 7999, Duplex())
    assert e.value.message == (f"failed to connect to 10.0.2.2:7999 inside namespace {pn.netns_name} of pod "
                               f"sandbox {sid[:12]}: connection refused")

    # Many at once, megabytes each way, through bounded copies.
    payloads = [os.urandom(256 * 1024 + i) for i in range(24)]
    streams = [Duplex() for _ in payloads]
    boxes = [forward(runtime, sid, 7001, st) for st in streams]
    for st, data in zip(streams, payloads):
        for off in range(0, len(data), 50_000):
            st.send(data[off:off + 50_000])
        st.send_eof()
    for st, data, b in zip(streams, payloads, boxes):
        assert hashlib.sha256(st.received(60)).hexdigest() == hashlib.sha256(data).hexdigest()
        b["thread"].join(10)
        assert not b["thread"].is_alive() and "error" not in b

    # The client going away mid-stream ends the forward too.
    gone = Duplex()
    box = forward(runtime, sid, 7001, gone)
    gone.send(b"ping")
    time.sleep(0.5)
    gone.closed.set()
    box["thread"].join(5)
    assert not box["thread"].is_alive()
    _settled(fds, threads)


def test_guest_closing_first_ends_the_forward_after_a_grace(runtime, fake_vms, tmp_path):
    """client-go closes the local connection only once the error stream ends, i.e. once forward_stream returns:
    a guest that sends and closes while the client keeps its side open must still end the forward."""
    sid, pn = ready_pod(runtime, "masquerade")
    guest(fake_vms, pn, tmp_path)
    fds, threads = open_fds(), threading.active_count()

    # The client never half-closes: the forward ends GRACE after the guest's EOF, not at the client's leisure.
    s = Duplex()
    box = forward(runtime, sid, 7002, s)
    assert s.received(10) == b"banner\n"
    eof_at = time.monotonic()
    box["thread"].join(port_forward.GRACE + 5)
    assert not box["thread"].is_alive(), "the forward waits for the client's EOF after the guest closed"
    assert "error" not in box, box["error"]
    waited = time.monotonic() - eof_at
    assert port_forward.GRACE * 0.8 <= waited < port_forward.GRACE + 2, waited

    # The client's EOF within the grace ends it at once: a grace, not a fixed delay.
    s = Duplex()
    box = forward(runtime, sid, 7002, s)
    assert s.received(10) == b"banner\n"
    eof_at = time.monotonic()
    s.send_eof()
    box["thread"].join(port_forward.GRACE + 5)
    assert not box["thread"].is_alive() and "error" not in box
    assert time.monotonic() - eof_at < port_forward.GRACE * 0.8
    _settled(fds, threads)


def _copy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pf-")]


def _established(vm, port: int) -> str:
    return vm.run("ss", "-tnH", "state", "established", f"( sport = :{port} )").stdout.strip()


def test_client_gone_while_the_guest_does_not_read_ends_the_copy_and_the_guest_connection(
        runtime, fake_vms, tmp_path):
    sid, pn = ready_pod(runtime, "masquerade")
    vm = guest(fake_vms, pn, tmp_path)
    fds, threads = open_fds(), threading.active_count()

    s = Duplex()
    box = forward(runtime, sid, 7003, s)
    for _ in range(256):  # 16 MiB: more than the guest's receive and our send buffers hold
        s.send(b"x" * 65536)
    deadline = time.monotonic() + 10
    while not _established(vm, 7003) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert _established(vm, 7003)
    assert not s._in.empty(), "the copy to the guest should be blocked: the guest does not read"

    s.closed.set()  # the client is gone
    box["thread"].join(5)
    assert not box["thread"].is_alive() and "error" not in box
    _settled(fds, threads)
    assert not _copy_threads()
    assert _established(vm, 7003) == "", "the guest's connection outlived the forward"


def test_bridge_binding_forward_reaches_the_pod_ip(runtime, fake_vms, tmp_path):
    sid, pn = ready_pod(runtime, "bridge")
    guest(fake_vms, pn, tmp_path)
    s = Duplex()
    box = forward(runtime, sid, 7000, s)
    s.send(b"over the bridge")
    s.send_eof()
    box["thread"].join(20)
    assert "error" not in box, box["error"]
    assert s.received(10) == b"got 15 bytes: egdirb eht revo"
    with pytest.raises(errors.CRIError) as e:
        port_forward.forward_stream(runtime, sid, 7999, Duplex())
    assert e.value.message == (f"failed to connect to {pn.pod_ip}:7999 inside namespace {pn.netns_name} of pod "
                               f"sandbox {sid[:12]}: connection refused")


def _echo_once(rt, sid: str, data: bytes) -> bytes:
    s = Duplex()
    box = forward(rt, sid, 7000, s)
    s.send(data)
    s.send_eof()
    box["thread"].join(20)
    assert "error" not in box, box["error"]
    return s.received(10)


def _in_pod(pn, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(netns.nsenter_argv(pn.netns_path) + list(argv), capture_output=True, text=True,
                          check=check, timeout=30)


def test_bridge_binding_reach_is_repaired_by_ensure_and_gone_after_teardown(runtime, fake_vms, tmp_path):
    sid, pn = ready_pod(runtime, "bridge")
    guest(fake_vms, pn, tmp_path)
    nm = runtime.network
    assert _echo_once(runtime, sid, b"one") == b"got 3 bytes: eno"
    assert nm.ensure(pn) == []

    # Each of the three pieces lost (an older vmlet's pod, or someone's hands): ensure puts them back.
    subprocess.run(["ip", "link", "set", "dev", pn.host_bridge, "arp", "on"], check=True)
    _in_pod(pn, "ip", "route", "del", f"{pn.pod_ip}/32", "dev", "br0")
    _in_pod(pn, "nft", "delete", "table", "bridge", "vmlet_local")
    with pytest.raises(NetworkError) as e:
        nm.check(pn)
    assert "local delivery rule" in str(e.value) and "not wired" in str(e.value)
    assert nm.ensure(pn) == [f"host bridge {pn.host_bridge} / veth {pn.host_veth}", f"br0 in {pn.netns_name}",
                             f"local delivery for {DHCP_SERVER_IP}"]
    assert "NOARP" in subprocess.run(["ip", "link", "show", "dev", pn.host_bridge], capture_output=True,
                                     text=True, check=True).stdout
    nm.check(pn)
    assert _echo_once(runtime, sid, b"two") == b"got 3 bytes: owt"

    # br0 re-created gets a new random MAC: the rule follows it.
    _in_pod(pn, "ip", "link", "del", "br0")
    repaired = nm.ensure(pn)
    assert repaired == [f"br0 in {pn.netns_name}", f"local delivery for {DHCP_SERVER_IP}"], repaired
    assert _echo_once(runtime, sid, b"three") == b"got 5 bytes: eerht"

    # Teardown takes the rule and the route with br0 (the netns itself goes at remove).
    nm.teardown(pn)
    assert _in_pod(pn, "nft", "list", "table", "bridge", "vmlet_local", check=False).returncode != 0
    assert pn.pod_ip not in _in_pod(pn, "ip", "route", "show").stdout


# Started by the guest's user data (the test image runs a #! script at boot): busybox httpd and an nc echo.
GUEST_SERVERS = """#!/bin/sh
mkdir -p /www && echo "served by $(hostname)" > /www/index.html
busybox httpd -p 8080 -h /www
busybox nc -ll -p 7000 -e /bin/cat </dev/null >/dev/null 2>&1 &
echo GUEST-SERVERS-UP
"""


@pytest.mark.libvirt
def test_forward_to_servers_in_a_real_guest_masquerade(daemon, vmlet_dir):
    d, client = daemon
    rt = d.runtime
    log = vmlet_dir / "pods" / "pf" / "vm" / "0.log"
    sid, _ = attach_test._run_vm(client, log.parent.parent, "pf-guest", annotations={
        "vmlet.dev/network-binding": "masquerade", "VirtletCloudInitUserDataScript": GUEST_SERVERS},
        port_mappings=[api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=5353)])
    attach_test._wait_log(log, r"stdout F GUEST-SERVERS-UP$", 180)
    attach_test._wait_log(log, r"stdout F VMLET-TESTVM: ready$", 60)
    port_forward.check_port_forward(rt, sid, [8080, 7000])
    with pytest.raises(errors.CRIError) as e:
        port_forward.check_port_forward(rt, sid, [8080, 5353])
    assert "port[1]" in e.value.message and "TCP only" in e.value.message

    web = Duplex()
    box = forward(rt, sid, 8080, web)
    web.send(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
    answer = web.received(60)
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert answer.endswith(b"served by pf-guest\n")
    web.send_eof()
    box["thread"].join(10)
    assert "error" not in box

    data = os.urandom(200_000)
    echo = Duplex()
    box = forward(rt, sid, 7000, echo)
    for off in range(0, len(data), 16_384):
        echo.send(data[off:off + 16_384])
    echo.send_eof()
    assert hashlib.sha256(echo.received(120)).hexdigest() == hashlib.sha256(data).hexdigest()
    box["thread"].join(10)
    assert "error" not in box

    with pytest.raises(errors.CRIError) as e:
        port_forward.forward_stream(rt, sid, 7999, Duplex())
    assert e.value.message.startswith("failed to connect to 10.0.2.2:7999 inside namespace ")
    assert e.value.message.endswith(": connection refused")


# A server that speaks first and closes (nc runs echo per connection), and httpd for an HTTP/1.0 request.
BRIDGE_GUEST_SERVERS = """#!/bin/sh
mkdir -p /www && echo "served by $(hostname)" > /www/index.html
busybox httpd -p 8080 -h /www
busybox nc -ll -p 7002 -e /bin/echo banner </dev/null >/dev/null 2>&1 &
echo GUEST-SERVERS-UP
"""


@pytest.mark.libvirt
def test_real_guest_under_the_bridge_binding_closing_first_ends_the_forward(daemon, vmlet_dir):
    """The pod IP reached from the pod netns on a real guest whose servers close first; the client never
    half-closes (a v4 WebSocket client cannot; client-go before it reset the data stream waited for the
    forward's end to close the local connection): the guest's close ends each forward."""
    d, client = daemon
    rt = d.runtime
    log = vmlet_dir / "pods" / "pfb" / "vm" / "0.log"
    sid, _ = attach_test._run_vm(client, log.parent.parent, "pfb-guest", annotations={
        "vmlet.dev/network-binding": "bridge", "VirtletCloudInitUserDataScript": BRIDGE_GUEST_SERVERS})
    attach_test._wait_log(log, r"stdout F GUEST-SERVERS-UP$", 180)
    attach_test._wait_log(log, r"stdout F VMLET-TESTVM: ready$", 60)
    pod_ip = rt.network.get(sid).pod_ip
    assert rt.network.get(sid).vm_ip == pod_ip
    assert not _copy_threads()

    def ended_by_the_guest(port: int, request: bytes) -> bytes:
        s = Duplex()
        box = forward(rt, sid, port, s)
        if request:
            s.send(request)
        answer = s.received(60)
        box["thread"].join(port_forward.GRACE + 10)
        assert not box["thread"].is_alive(), f"port {port}: the forward waits for the client's EOF"
        assert "error" not in box, box["error"]
        return answer

    assert ended_by_the_guest(7002, b"") == b"banner\n"

    # The same through the daemon's streaming server over WebSocket with the kubernetes Python client: v4
    # channels carry no half-close, so the client hears of the guest's close only when the forward ends and
    # the server closes the connection. (spdystream clients reset the data stream once the guest's EOF came.)
    url = client.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=sid, port=[7002])).url
    pf = ws_client.portforward_call(Configuration(), "GET", url.replace("http", "ws", 1) + "?ports=7002")
    try:
        sock = pf.socket(7002)
        sock.settimeout(port_forward.GRACE + 20)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        assert got == b"banner\n"
    finally:
        pf.close()
    answer = ended_by_the_guest(8080, b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert answer.endswith(b"served by pfb-guest\n")
    # The daemon's own threads come and go: look at the copy threads only.
    deadline = time.monotonic() + 5
    while _copy_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _copy_threads()

    with pytest.raises(errors.CRIError) as e:
        port_forward.forward_stream(rt, sid, 7999, Duplex())
    assert e.value.message.startswith(f"failed to connect to {pod_ip}:7999 inside namespace ")
