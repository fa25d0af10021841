"""Fixtures for the CRI proxy: the project's containerd, a vmlet daemon, the proxy in-process or as a process,
and a container registry on loopback.

containerd is the long-running daemon deploy/containerd/setup-containerd.sh starts (like
libvirtd); if it is not answering, the fixture runs that (idempotent) script once. Tests only
use it: every pod they create carries the label RUN_LABEL and is removed at teardown.
The registry (tests/support/registry.py: Debian's docker-registry) is started per test; the
images a test pulls from it into containerd are removed at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from criproxy.server import ProxyThread
from proto.runtime.v1 import api_pb2
# vmlet's fixtures (vmlet_dir, vmlet_factory, vmlet and what they need), maintained with the CRI shim's tests.
from tests.integration.cri.conftest import *  # noqa: F401,F403
from tests.support import cri
from tests.support import registry as registry_support
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[3]
CONTAINERD_SOCKET = Path(os.environ.get("VMLET_TEST_CONTAINERD_SOCKET", "/run/vmlet-containerd/containerd.sock"))
SETUP_CONTAINERD = REPO / "deploy/containerd/setup-containerd.sh"
BUSYBOX = "localhost/vmlet/busybox:1"
VM = "virtlet.cloud"
PREFIX = VM + "__"  # what the proxy puts before vmlet's IDs
RUN_LABEL = "vmlet-test-criproxy"
RUN_ID = f"{os.getpid()}"


def _answering(socket: Path) -> bool:
    if not socket.exists():
        return False
    client = cri.connect(socket)
    try:
        client.runtime.Version(api_pb2.VersionRequest(), timeout=5)
        return True
    except grpc.RpcError:
        return False
    finally:
        client.close()


def _remove_our_pods(client: cri.Client, run_id: str | None = None) -> None:
    """Remove the containerd pods of this run (or, with run_id None, of runs no longer alive)."""
    for sb in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
        owner = sb.labels.get(RUN_LABEL)
        if owner is None:
            continue
        if run_id is not None and owner != run_id:
            continue
        if run_id is None and owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue
        try:
            client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
            client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise


CGROUP_PARENT = "vmlet-test-criproxy"


def _remove_pod_cgroups() -> None:
    """The kubelet removes pod cgroups, not containerd: do it for the test pods (busy ones stay)."""
    for controller in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
        for d in sorted(controller.glob("pod*"), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            controller.rmdir()
        except OSError:
            pass


@pytest.fixture(scope="session")
def containerd_socket() -> Iterator[Path]:
    if not _answering(CONTAINERD_SOCKET) and os.geteuid() == 0 and SETUP_CONTAINERD.exists():
        subprocess.run(["bash", str(SETUP_CONTAINERD)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=600, check=False)
    require(_answering(CONTAINERD_SOCKET),
            f"containerd not answering on {CONTAINERD_SOCKET} (run deploy/containerd/setup-containerd.sh as root)")
    client = cri.connect(CONTAINERD_SOCKET)
    try:
        _remove_our_pods(client)  # leftovers of crashed runs
        image = client.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=BUSYBOX)),
                                          timeout=30).image
        require(bool(image.id), f"{BUSYBOX} is not imported in containerd (run deploy/containerd/setup-containerd.sh)")
    finally:
        client.close()
    yield CONTAINERD_SOCKET
    _remove_pod_cgroups()


@pytest.fixture
def containerd(containerd_socket) -> Iterator[cri.Client]:
    """A direct CRI client to containerd; the test's pods are removed at teardown."""
    client = cri.connect(containerd_socket)
    yield client
    try:
        _remove_our_pods(client, RUN_ID)
    finally:
        client.close()


@pytest.fixture
def proxy_socket(vmlet_dir) -> Path:
    return vmlet_dir / "criproxy.sock"


@pytest.fixture
def proxy(containerd, vmlet, proxy_socket) -> Iterator[cri.Client]:
    """The proxy in-process (its own event loop thread): containerd default, vmlet as virtlet.cloud."""
    p = ProxyThread(str(proxy_socket), [("containerd", str(CONTAINERD_SOCKET)), (VM, str(vmlet.socket))]).start()
    client = cri.connect(proxy_socket)
    yield client
    client.close()
    p.stop()


class ProxyProcess:
    """`criproxy` as a process, as a node runs it."""

    def __init__(self, socket: Path, backends: list[str], log: Path):
        self.socket, self.backends, self.log_file = socket, backends, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> cri.Client:
        args = [sys.executable, "-m", "criproxy.main", "--listen", str(self.socket), "--log-level", "debug"]
        for b in self.backends:
            args += ["--backend", b]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                         stdout=log, stderr=log)
        client = cri.connect(self.socket)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.runtime.Version(api_pb2.VersionRequest(), timeout=2)
                return client
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    client.close()
                    self.kill()  # one that hangs at start-up is not left running
                    raise RuntimeError(f"criproxy did not start: {self.log_file.read_text()[-3000:]}")
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def proxy_process(containerd, vmlet, vmlet_dir) -> Iterator[ProxyProcess]:
    p = ProxyProcess(vmlet_dir / "criproxy-proc.sock",
                     [f"containerd={CONTAINERD_SOCKET}", f"{VM}={vmlet.socket}"], vmlet_dir / "criproxy.log")
    yield p
    p.stop()


# ---------------------------------------------------------------- a registry on loopback

REGISTRY_REPOSITORY = "vmlet-test/busybox"  # tags: <pid of the test run>-<token>


def _remove_registry_images(client: cri.Client, host: str | None = None) -> None:
    """Remove containerd's images of REGISTRY_REPOSITORY: those from `host`, or (host None) those of dead runs."""
    def stale(ref: str) -> bool:
        ref_host, _, rest = ref.partition("/")
        repo, _, tag = rest.rpartition(":")
        pid = tag.split("-", 1)[0]
        return (ref_host.startswith("127.0.0.1:") and repo == REGISTRY_REPOSITORY and pid.isdigit()
                and not Path(f"/proc/{pid}").exists())

    for image in client.images.ListImages(api_pb2.ListImagesRequest(), timeout=30).images:
        if host is not None:
            ours = any(r.startswith(f"{host}/") for r in (*image.repo_tags, *image.repo_digests))
        else:
            ours = any(stale(r) for r in image.repo_tags)
        if not ours:
            continue
        try:  # by ID: containerd removes every name of the image
            client.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image.id)), timeout=60)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise


@pytest.fixture
def registry(containerd_socket) -> Iterator[registry_support.Registry]:
    """Debian's docker-registry on 127.0.0.1:<free port> (plain HTTP, storage in a temp dir), for containerd.

    Teardown removes this run's containerd pods, then every image containerd holds from this registry,
    then stops the registry and deletes its storage.
    """
    for tool, pkg in (("docker-registry", "docker-registry"), ("ctr", "containerd"), ("setpriv", "util-linux")):
        require(shutil.which(tool) is not None, f"{tool} not installed (Debian: {pkg}; run deploy/setup-host.sh)")
    client = cri.connect(containerd_socket)
    reg = registry_support.Registry()
    try:
        registry_support.sweep_stale(containerd_socket)
        _remove_registry_images(client)  # leftovers of crashed runs
        reg.start()
        yield reg
    finally:
        try:
            _remove_our_pods(client, RUN_ID)  # pods first, as the kubelet does before removing images
            if reg.port:
                _remove_registry_images(client, reg.host)
        finally:
            client.close()
            reg.stop()


# ---------------------------------------------------------------- request builders

def rpc_error(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    """(code, details) of the RpcError that the call must raise."""
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value.code(), e.value.details()


def container_pod(name: str | None = None, labels: dict[str, str] | None = None) -> api_pb2.PodSandboxConfig:
    name = name or f"ctr-{uuid.uuid4().hex[:6]}"
    uid = str(uuid.uuid4())
    cfg = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="default", uid=uid),
        hostname=name, log_directory=f"/tmp/vmlet-test-criproxy-logs/{name}",
        labels={"app": "vmlet-test", RUN_LABEL: RUN_ID, **(labels or {})})
    # As the kubelet does (cgroupfs driver): containerd's pod stats need the pod's cgroup.
    cfg.linux.cgroup_parent = f"/{CGROUP_PARENT}/pod{uid}"
    return cfg


def busybox_container(name: str = "c", command: list[str] | None = None,
                      labels: dict[str, str] | None = None) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=BUSYBOX),
        command=command or ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
        log_path=f"{name}.log", labels={"role": "ctr", **(labels or {})})
