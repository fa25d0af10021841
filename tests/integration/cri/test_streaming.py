"""Exec, Attach and PortForward end to end: the CRI socket hands out a URL, real clients use it on a real guest.

The clients are nobody's here: the Go SPDY client over Debian's spdystream
(tests/support/spdyclient) speaks what the kubelet and crictl speak to a
runtime, and the kubernetes Python client's ws_client speaks WebSocket. One VM
pod (TCG boots are slow) carries the story; the guest runs busybox httpd from
its user data for port-forward (masquerade binding).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

from proto.runtime.v1 import api_pb2
from tests.support import cri, spdyclient

from .conftest import TESTVM
from .test_lifecycle import wait_for_log

pytestmark = pytest.mark.libvirt

GUEST_SERVERS = """#!/bin/sh
mkdir -p /www && echo "served by $(hostname)" > /www/index.html
busybox httpd -p 8080 -h /www
echo GUEST-SERVERS-UP
"""


class Output:
    """A child's stdout read in a thread, so a test can wait for a pattern with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.data = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, pipe) -> None:
        while chunk := pipe.read1(65536):
            with self._lock:
                self.data += chunk

    def wait_for(self, needle: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if needle in self.data:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not seen in {timeout}s; got {self.data[-2000:]!r}")


def exec_sync(rt, cid, cmd, timeout=30):
    return rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=timeout + 60)


def guest_ps(rt, cid) -> str:
    return exec_sync(rt, cid, ["ps", "-o", "args"]).stdout.decode()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client_binary() -> Path:
    return spdyclient.require()


@pytest.fixture
def vm(client, pulled, vmlet_dir):
    rt = client.runtime
    log_dir = vmlet_dir / "pods" / "streams"
    pod = cri.pod_config(name="stream-pod", log_directory=str(log_dir), annotations={
        "vmlet.dev/network-binding": "masquerade", "VirtletCloudInitUserDataScript": GUEST_SERVERS})
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod)).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    log = log_dir / "vm" / "0.log"
    wait_for_log(log, r"stdout F GUEST-SERVERS-UP$", 240)
    wait_for_log(log, r"stdout F VMLET-TESTVM: ready$", 120)
    return rt, sid, cid, log


def spdy(binary: Path, mode: str, url: str, *args: str, input: bytes | None = None, status_file: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [str(binary), mode, *args]
    if status_file is not None:
        argv += ["--status-file", str(status_file)]
    return subprocess.run(argv + [url], input=input, capture_output=True, timeout=timeout)


def exec_url(rt, cid, cmd, *, stdin=False, tty=False) -> str:
    return rt.Exec(api_pb2.ExecRequest(container_id=cid, cmd=cmd, stdin=stdin, stdout=True, stderr=not tty,
                                       tty=tty)).url


def test_exec_attach_port_forward_in_a_real_guest(vm, client_binary, vmlet_dir):
    rt, sid, cid, log = vm
    status_file = vmlet_dir / "status.json"

    # Exec over SPDY (client-go's streams and offers): exit codes, stdout and stderr apart.
    for code in (0, 1, 42):
        url = exec_url(rt, cid, ["sh", "-c", f"echo to-out; echo to-err >&2; exit {code}"])
        assert url.startswith("http://127.0.0.1:") and "/exec/" in url
        done = spdy(client_binary, "exec", url, status_file=status_file)
        assert (done.returncode, done.stdout, done.stderr) == (code, b"to-out\n", b"to-err\n"), done
        status = json.loads(status_file.read_text())
        assert status["protocol"] == "v5.channel.k8s.io"  # offered first by the client; served as v4 on SPDY
        error = json.loads(status["error"])
        if code == 0:
            assert error["status"] == "Success"
        else:
            assert (error["status"], error["reason"]) == ("Failure", "NonZeroExitCode")
            assert error["details"]["causes"] == [{"reason": "ExitCode", "message": str(code)}]

    # The token was single-use: the same URL again is a 404.
    again = subprocess.run([str(client_binary), "raw", url], capture_output=True, timeout=30)
    assert b"404" in again.stdout + again.stderr, again

    # stdin to EOF, whole (the agent takes stdin at once), over SPDY.
    payload = b"".join(b"line %d of the input\n" % i for i in range(5000))
    done = spdy(client_binary, "exec", exec_url(rt, cid, ["sh", "-c", "tr a-z A-Z; echo done >&2"], stdin=True),
                "--stdin", input=payload)
    assert (done.returncode, done.stdout, done.stderr) == (0, payload.upper(), b"done\n")

    # Exec over WebSocket with the kubernetes client.
    url = exec_url(rt, cid, ["sh", "-c", "hostname; echo oops >&2; exit 3"])
    ws = ws_client.WSClient(Configuration(), url.replace("http", "ws", 1), None, True)
    ws.run_forever(timeout=120)
    assert (ws.read_stdout(), ws.read_stderr(), ws.returncode) == ("stream-pod\n", "oops\n", 3)

    # tty: qemu-ga has no terminal to give; the refusal names the console.
    with pytest.raises(grpc.RpcError) as e:
        exec_url(rt, cid, ["sh"], stdin=True, tty=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "kubectl attach" in e.value.details()

    # Concurrent sessions into one VM.
    results: dict[int, subprocess.CompletedProcess] = {}

    def one(i: int) -> None:
        results[i] = spdy(client_binary, "exec", exec_url(rt, cid, ["sh", "-c", f"echo session-{i}"]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert {i: (r.returncode, r.stdout) for i, r in results.items()} == {
        i: (0, b"session-%d\n" % i) for i in range(4)}

    # A client killed mid-stream: its command in the guest is killed too.
    proc = subprocess.Popen([str(client_binary), "exec", exec_url(rt, cid, ["sleep", "4545"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: "sleep 4545" in guest_ps(rt, cid), 60, "the exec'd sleep runs in the guest")
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: "sleep 4545" not in guest_ps(rt, cid), 60, "the guest's sleep is killed with its client")

    # Attach: type on the console through one client, both attached clients see the guest's answer.
    typing = rt.Attach(api_pb2.AttachRequest(container_id=cid, stdin=True, stdout=True, tty=True)).url
    watching = rt.Attach(api_pb2.AttachRequest(container_id=cid, stdout=True, stderr=True)).url
    typist = subprocess.Popen([str(client_binary), "attach", "--stdin", "--tty", typing],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    watcher = subprocess.Popen([str(client_binary), "attach", watching], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        typed, watched = Output(typist), Output(watcher)
        time.sleep(1)  # both attached before the guest answers
        typist.stdin.write(b"\necho attach-$((6*7))-answer\n")
        typist.stdin.flush()
        typed.wait_for(b"attach-42-answer", 60)
        watched.wait_for(b"attach-42-answer", 60)
    finally:
        for p in (typist, watcher):
            p.kill()
            p.wait(10)
    # ... and the CRI log still has the console's every line, the answer included.
    wait_for_log(log, r"stdout F attach-42-answer\r?$", 30)
    assert "VMLET-TESTVM: ready" in log.read_text()

    # PortForward over SPDY to busybox httpd in the guest (masquerade: the guest's private address).
    pf_url = rt.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=sid, port=[8080])).url
    assert "/portforward/" in pf_url
    done = subprocess.run([str(client_binary), "portforward", pf_url, "8080"],
                          input=b"GET /index.html HTTP/1.0\r\n\r\n", capture_output=True, timeout=120)
    assert done.returncode == 0, done
    assert done.stdout.startswith(b"HTTP/1.") and done.stdout.endswith(b"served by stream-pod\n"), done.stdout

    # A port nobody listens on: the error stream says so, as the kubelet's does.
    pf_url = rt.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=sid, port=[8081])).url
    done = subprocess.run([str(client_binary), "portforward", pf_url, "8081"], input=b"x", capture_output=True,
                          timeout=120)
    assert done.returncode == 1 and b"8081" in done.stderr and b"connection refused" in done.stderr, done

    # The VM is still healthy after all of it.
    assert exec_sync(rt, cid, ["echo", "still-here"]).stdout == b"still-here\n"

    # Last (it leaves the agent frozen): a connected agent that stops answering. What needs the agent fails
    # within its bounds; what does not need it answers as fast as ever.
    exec_sync(rt, cid, ["sh", "-c", "(sleep 1; kill -STOP $(pidof qemu-ga)) >/dev/null 2>&1 &"])
    time.sleep(3)
    started = time.monotonic()
    rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True), timeout=5)
    rt.ListContainers(api_pb2.ListContainersRequest(), timeout=5)
    rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True), timeout=5)
    assert time.monotonic() - started < 3
    # ExecSync with a timeout: DEADLINE_EXCEEDED from vmlet (the kubelet's timed-out probe; any other error is an
    # "unknown" probe result it drops), within the timeout (+ libvirt's whole seconds), never the gRPC deadline's.
    for timeout in (5, 1):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            exec_sync(rt, cid, ["true"], timeout=timeout)
        took = time.monotonic() - started
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
        assert f"timeout {timeout}s exceeded" in e.value.details() and "agent" in e.value.details(), \
            e.value.details()
        assert took < timeout + 2, f"answered after {took:.1f}s for a {timeout}s timeout"
    done = spdy(client_binary, "exec", exec_url(rt, cid, ["true"]), timeout=120)
    assert done.returncode != 0 and b"agent" in done.stderr, done
