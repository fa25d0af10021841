"""`vmctl console` and exec probes on a real VM through the node path.

The node is test_node_e2e's (kmock + the unchanged controller, the test kubelet agent on the CRI proxy with
containerd and vmlet behind it); `tests.support.pod_streams.PodStreams` is the API server's and the
kubelet's part of the pods' attach/exec/portforward subresources in front of kmock, so `vmctl console`
and the kubernetes client reach the VM's console the way they would on a cluster.

One VM (guests are slow under TCG) whose probes the test steers from the VM's own console:
readiness `cat /etc/os-release` (and no /tmp/unready), liveness "no /tmp/dead".
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import kubernetes
import pytest
import pytest_asyncio
from kubernetes.stream import portforward, stream

from tests.integration.vmapi.harness import NS, vm_manifest
from tests.integration.vmapi.test_node_e2e import NODE, node, until  # noqa: F401
from tests.support import libvirt_env
from tests.support.pod_streams import PodStreams
from vmapi import podspec
from vmapi.client import load_api_client

from tests.integration.cri.conftest import TESTVM, cni_conf_dir, vmlet, vmlet_dir, vmlet_factory  # noqa: F401
from tests.integration.criproxy.conftest import containerd, containerd_socket, proxy_process  # noqa: F401

pytestmark = [pytest.mark.asyncio, pytest.mark.libvirt]
# Fixtures of the node path, imported for pytest (named here so that linters see them used).
NODE_FIXTURES = (node, cni_conf_dir, vmlet, vmlet_dir, vmlet_factory, containerd, containerd_socket, proxy_process)

NAME = "con"
GRACE = 30
BOOT_TIMEOUT = 240
READINESS = {"exec": {"command": ["sh", "-c", "cat /etc/os-release && ! test -e /tmp/unready"]},
             "periodSeconds": 2, "timeoutSeconds": 10, "failureThreshold": 1}
LIVENESS = {"exec": {"command": ["sh", "-c", "! test -e /tmp/dead"]},
            "periodSeconds": 2, "timeoutSeconds": 10, "failureThreshold": 2}


@pytest_asyncio.fixture
async def front(server, kubeconfig, node, proxy_process, tmp_path):  # noqa: F811
    """PodStreams for NODE in front of kmock, and a kubeconfig that names it (stopped and joined at the end)."""
    ps = PodStreams(str(server.url), kubeconfig, proxy_process.socket, NODE).start()
    try:
        yield ps, ps.write_kubeconfig(kubeconfig, tmp_path / "front.kubeconfig")
    finally:
        await asyncio.to_thread(ps.stop)


class Console:
    """`vmctl console` in a pty of its own: what it prints, and its terminal's mode."""

    def __init__(self, kubeconfig: Path, *args: str) -> None:
        self.master, self.slave = pty.openpty()
        self.mode_before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen([sys.executable, "-m", "vmapi.vmctl", "--kubeconfig", str(kubeconfig),
                                      "console", *args], stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     start_new_session=True, cwd=Path(__file__).resolve().parents[3])
        self.out = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every slave fd closed
                return
            if not data:
                return
            self.out += data

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    async def expect(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while (m := re.search(pattern, self.text())) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s in: {self.text()[-2000:]!r}"
            assert self.proc.poll() is None or self._reader.is_alive(), self.text()
            await asyncio.sleep(0.1)
        return m

    async def exited(self, timeout: float) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass
        self._reader.join(5)


@pytest.fixture
def consoles():
    made: list[Console] = []
    yield made
    for c in made:
        c.close()


async def vmctl_console(kubeconfig: Path, *args: str) -> tuple[int, str]:
    """vmctl console without a terminal, its stdin open and silent (an EOF would make it leave)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "vmapi.vmctl", "--kubeconfig", str(kubeconfig),
                                                "console", *args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out = await asyncio.wait_for(proc.stdout.read(), 60)
        return await asyncio.wait_for(proc.wait(), 10), out.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_console_and_exec_probes_on_a_vm(cluster, node, operator, front, libvirt_conn, consoles):  # noqa: F811
    agent, (streams, kc) = node, front
    # --- errors before any VM runs: a missing VM, a stopped one (no pod), the front's own answers.
    rc, out = await vmctl_console(kc, "nosuch")
    assert rc == 1 and f"VirtualMachine {NS}/nosuch not found" in out, out
    await cluster.create_vm("halted", "Halted")
    rc, out = await vmctl_console(kc, "halted")
    assert rc == 1 and "console halted: VM is not running (it has no pod)" in out, out

    manifest = vm_manifest(NAME, "Always", terminationGracePeriodSeconds=GRACE,
                           domain={"cpu": {"cores": 1}, "memory": {"guest": "256Mi"},
                                   "rootDisk": {"image": TESTVM}, "interface": {"binding": "bridge"}},
                           readinessProbe=READINESS, livenessProbe=LIVENESS)
    await cluster.create_vm_manifest(manifest)

    async def ready(value: bool, restarts: int = 0):
        st = await cluster.status(NAME)
        return st if st.get("ready") is value and (st.get("restartCount") or 0) == restarts \
            and st.get("printableStatus") in ("Running", "Starting") else None
    st = await until(lambda: ready(True), BOOT_TIMEOUT, f"VM {NAME} ready (its readiness probe passed)", agent)
    pod = await cluster.pod(NAME)
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"]["exec"] == READINESS["exec"] and c["livenessProbe"]["exec"] == LIVENESS["exec"]
    cs = pod["status"]["containerStatuses"][0]
    conds = {x["type"]: x["status"] for x in pod["status"]["conditions"]}
    assert cs["ready"] is True and conds["Ready"] == conds["ContainersReady"] == "True"
    cid = cs["containerID"].split("://", 1)[1]
    readiness = agent.prober.worker(cid, "readinessProbe")
    assert readiness is not None and readiness.probes >= 1 and readiness.result is True

    # --- exec through the front (the kubelet's untranslated proxying to vmlet's WebSocket server).
    api = load_api_client(str(kc))
    core = kubernetes.client.CoreV1Api(api)
    out = await asyncio.to_thread(stream, core.connect_get_namespaced_pod_exec, pod["metadata"]["name"], NS,
                                  container=podspec.CONTAINER, command=["cat", "/etc/os-release"],
                                  stdout=True, stderr=True, stdin=False, tty=False)
    assert "VMLET" in out.upper() or "NAME=" in out, out
    with pytest.raises(kubernetes.client.ApiException, match="container nope is not valid for pod"):
        await asyncio.to_thread(stream, core.connect_get_namespaced_pod_exec, pod["metadata"]["name"], NS,
                                container="nope", command=["true"], stdout=True)
    with pytest.raises(kubernetes.client.ApiException, match=r'pods \\"nosuch-vm\\" not found|pods "nosuch-vm"'):
        await asyncio.to_thread(stream, core.connect_get_namespaced_pod_attach, "nosuch-vm", NS,
                                container=podspec.CONTAINER, stdout=True)
    # port-forward through the front: nothing listens on port 9 in the guest, and the runtime says so.
    pf = await asyncio.to_thread(portforward, core.connect_get_namespaced_pod_portforward, pod["metadata"]["name"],
                                 NS, ports="9")
    sock = pf.socket(9)
    sock.settimeout(60)
    await asyncio.to_thread(sock.sendall, b"x")
    assert await asyncio.to_thread(sock.recv, 10) == b""
    await until(lambda: pf.error(9), 30, "the port-forward's error", agent)
    assert re.search(r"9|connect|unreachable", pf.error(9)), pf.error(9)
    pf.close()

    # --- the console held elsewhere (virsh console's stand-in): the runtime ends the session with its
    # reason on the error channel, and vmctl says it.
    [dom] = [d for d in libvirt_conn.listAllDomains() if d.name().startswith(libvirt_env.RUN_PREFIX)]
    foreign = libvirt_conn.newStream(0)
    dom.openConsole(None, foreign, 0)
    try:
        rc, out = await vmctl_console(kc, NAME)
    finally:
        foreign.abort()
    assert rc == 1 and f"the console of VM {NAME} was closed by the server: " in out, out
    assert "in use by another client" in out, out

    # --- the console in a terminal: raw mode, a command typed on the guest's console, its answer.
    con = Console(kc, NAME)
    consoles.append(con)
    await con.expect(rf"Successfully connected to {NAME} console\. The escape sequence is \^\]", 60)
    mode = termios.tcgetattr(con.slave)
    assert not mode[3] & (termios.ICANON | termios.ECHO | termios.ISIG), "the terminal is raw while connected"
    con.type(b"\r")  # console.sh starts the shell on the first line
    await asyncio.sleep(2)
    con.type(b"echo CONSOLE-$((6*7))-OK\r")
    await con.expect(r"CONSOLE-42-OK\r?\n", 60)  # computed by the guest: not the echo of what was typed
    con.type(b"\x03")  # Ctrl+C goes to the guest (raw mode), vmctl stays
    await asyncio.sleep(1)
    assert con.proc.poll() is None

    # Readiness from the guest's state: failing → not ready, passing again → ready.
    con.type(b"touch /tmp/unready\r")
    await until(lambda: ready(False), 60, "VM not ready (its readiness probe fails)", agent)
    pod_now = await cluster.pod(NAME)
    assert pod_now["metadata"]["uid"] == pod["metadata"]["uid"], "readiness does not restart anything"
    assert pod_now["status"]["containerStatuses"][0]["ready"] is False
    assert {x["type"]: x["status"] for x in pod_now["status"]["conditions"]}["Ready"] == "False"
    con.type(b"rm /tmp/unready\r")
    await until(lambda: ready(True), 60, "VM ready again", agent)

    # Liveness: make it fail, then leave with ^] (the VM keeps running until the probe's verdict).
    con.type(b"touch /tmp/dead\r")
    await asyncio.sleep(0.5)
    con.type(b"\x1d")
    assert await con.exited(30) == 0, con.text()
    assert termios.tcgetattr(con.slave) == con.mode_before, "the terminal mode is restored"

    t0 = time.monotonic()
    st = await until(lambda: ready(True, restarts=1), GRACE + 60 + BOOT_TIMEOUT,
                     "VM restarted after its liveness probe failed, ready again", agent)
    assert any(x.startswith(f"StopContainer {podspec.CONTAINER} timeout={GRACE} (failed liveness probe)")
               for x in agent.calls), agent.calls
    new_pod = await cluster.pod(NAME)
    assert new_pod["metadata"]["uid"] != pod["metadata"]["uid"] and st["podUID"] == new_pod["metadata"]["uid"]
    events = [e for e in await cluster.events("Unhealthy") if e["involvedObject"]["uid"] == pod["metadata"]["uid"]]
    assert events and "Liveness probe failed" in events[0]["message"], events
    # The old container's probe workers ended with it; the new one's run.
    assert agent.prober.worker(cid, "livenessProbe") is None and agent.prober.worker(cid, "readinessProbe") is None
    new_cid = new_pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    assert agent.prober.worker(new_cid, "readinessProbe").result is True
    assert not agent.errors, agent.errors
    print(f"\nconsole test: restarted and ready {time.monotonic() - t0:.1f}s after the liveness probe was failed; "
          f"front: {json.dumps(streams.requests[-3:])}")


async def test_the_front_answers_junk_and_bounds_its_reads(server, kubeconfig, cluster, tmp_path):
    """No VM needed: junk request heads, an oversize head, a pod that does not exist, a non-upgrade request,
    and the API through the front; every connection's thread ends with stop()."""
    import socket
    ps = PodStreams(str(server.url), kubeconfig, tmp_path / "no-cri.sock", NODE).start()
    host, port = ps.url.removeprefix("http://").split(":")

    def exchange(data: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except ConnectionResetError:  # closed with our bytes unread: the kernel resets
                pass
            return out
    try:
        assert (await asyncio.to_thread(exchange, b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await asyncio.to_thread(exchange, b"GET / HTTP/1.1\r\nbad header\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert await asyncio.to_thread(exchange, b"GET / HTTP/1.1\r\nX: " + b"a" * 70000) == b""  # closed
        path = f"/api/v1/namespaces/{NS}/pods/nosuch/attach?container=vm&stdin=true"
        out = await asyncio.to_thread(exchange, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 404 ") and b'pods \\"nosuch\\" not found' in out, out
        out = await asyncio.to_thread(exchange, f"GET {path.replace('stdin=true', 'stdin=maybe')} HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 400 ") and b"stdin" in out, out
        await cluster.create_vm("front", "Halted")
        await cluster.call(cluster.core.create_namespaced_pod, NS, {  # a pod no node runs
            "metadata": {"name": "front-vm", "namespace": NS},
            "spec": {"containers": [{"name": "vm", "image": "virtlet.cloud/testvm"}]}}, _preload_content=False)
        pod_path = f"/api/v1/namespaces/{NS}/pods/front-vm/exec?command=true&stdout=1"
        out = await asyncio.to_thread(exchange, f"GET {pod_path} HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 400 ") and b"pod front-vm does not have a host assigned" in out, out
        # Everything else reaches kmock unchanged: the VM through the front, with the official client.
        api = load_api_client(str(ps.write_kubeconfig(kubeconfig, tmp_path / "front.kubeconfig")))
        vm = await asyncio.to_thread(kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object,
                                     "vmlet.dev", "v1alpha1", NS, "virtualmachines", "front")
        assert vm["metadata"]["name"] == "front"
        api.close()
        assert any("refused 404" in r for r in ps.requests) and any("refused 400" in r for r in ps.requests)
    finally:
        await asyncio.to_thread(ps.stop)
    assert not ps._threads, ps._threads
