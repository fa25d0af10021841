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
from pyroute2 import IPRoute

from cri_shim import errors, port_forward
from cri_shim.config import Config
from cri_shim.libvirt_host import LibvirtHost
from cri_shim.network import netns
from cri_shim.network.manager import DHCP_SERVER_CIDR
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

# In the fake VM: 7000 answers once the client's half is closed (half-close both ways), 7001 echoes.
SERVER = r"""
import socket, threading
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
def serve(port, fn):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(7000, once), daemon=True).start()
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

    deadline = time.monotonic() + 5
    while (open_fds(), threading.active_count()) != (fds, threads) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds() == fds, "file descriptors leaked"
    assert threading.active_count() == threads, [t.name for t in threading.enumerate()]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "bridge binding: the pod netns holds no address on the pod's subnet (only 169.254.75.10/32 on br0) and no "
    "route to the pod IP, and the guest's replies to 169.254.75.10 go to its default gateway; network/ needs an "
    "on-link route to the pod IP from br0 and a bridge-level local delivery of the guest's frames for "
    "169.254.75.10, and the host bridge must not answer the guest's ARP (see docs/attach.md and the test "
    "below). Strict: passes once that lands, and this marker must go."))
def test_bridge_binding_forward_reaches_the_pod_ip(runtime, fake_vms, tmp_path):
    sid, pn = ready_pod(runtime, "bridge")
    guest(fake_vms, pn, tmp_path)
    s = Duplex()
    box = forward(runtime, sid, 7000, s)
    s.send(b"abc")
    s.send_eof()
    box["thread"].join(20)
    assert "error" not in box, box["error"]
    assert s.received(10) == b"got 3 bytes: cba"


def apply_proposed_bridge_fix(pn) -> None:
    """What docs/attach.md proposes for cri_shim/network/ (bridge binding), applied by hand until it lands there.

    1. the host bridge does not answer ARP (else, with the host's arp_ignore=0, it answers the guest's ARP for
       the gateway with its own MAC and the guest's traffic skips the pod's segment);
    2. an on-link route from br0 to the pod IP with dnsmasq's address as the source;
    3. the guest's frames for that address (sent to its gateway's MAC) delivered to br0, not bridged out of eth0.
    """
    server = DHCP_SERVER_CIDR.split("/")[0]
    subprocess.run(["ip", "link", "set", "dev", pn.host_bridge, "arp", "off"], check=True)
    ns = netns.nsenter_argv(pn.netns_path)
    subprocess.run(ns + ["ip", "route", "replace", f"{pn.pod_ip}/32", "dev", "br0", "src", server], check=True)

    def br0_mac() -> str:
        with IPRoute() as ipr:  # netlink on the namespace's thread (/sys shows the host's links)
            return ipr.get_links(ipr.link_lookup(ifname="br0")[0])[0].get_attr("IFLA_ADDRESS")

    mac = netns.run_in(pn.netns_path, br0_mac)
    script = "\n".join([
        "table bridge vmlet_local {}", "delete table bridge vmlet_local", "table bridge vmlet_local {",
        "  chain prerouting {", "    type filter hook prerouting priority dstnat; policy accept;",
        f'    iifname "vm0" ip daddr {server} meta pkttype set host ether daddr set {mac}', "  }", "}", ""])
    subprocess.run(ns + ["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


def test_bridge_binding_forward_with_the_proposed_network_fix(runtime, fake_vms, tmp_path):
    sid, pn = ready_pod(runtime, "bridge")
    apply_proposed_bridge_fix(pn)
    guest(fake_vms, pn, tmp_path)
    s = Duplex()
    box = forward(runtime, sid, 7000, s)
    s.send(b"over the bridge")
    s.send_eof()
    assert s.received(20) == b"got 15 bytes: egdirb eht revo"
    box["thread"].join(10)
    assert "error" not in box
    with pytest.raises(errors.CRIError) as e:
        port_forward.forward_stream(runtime, sid, 7999, Duplex())
    assert e.value.message.endswith("connection refused") and pn.pod_ip in e.value.message


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
