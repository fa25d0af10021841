"""Fault injection on the environment of the real vmlet daemon (issue #12).

The daemon, its state dir, CNI network and image server are the CRI suite's
fixtures (tests/integration/cri/conftest.py), re-exported here; this file adds
what the faults need: a small tmpfs to fill, a CNI plugin that hangs, and the
host daemons (libvirtd, virtlogd) stopped and started the way
deploy/setup-host.sh starts them on a machine without systemd.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.integration.cri.conftest import (  # noqa: F401 - fixtures
    TESTVM, client, cni_conf_dir, pulled, vmlet, vmlet_dir, vmlet_factory)
from tests.support.prereq import require

RPC_SLACK = 30  # a faulty environment may slow an RPC down, never hang it: every call has a deadline


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- tmpfs

class Tmpfs:
    """A tmpfs of a given size mounted over a directory; `fill()` leaves only `free` bytes."""

    def __init__(self, target: Path, size: int) -> None:
        self.target = target
        self.size = size
        self.filler = target / ".filler"

    def mount(self) -> "Tmpfs":
        self.target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0711", "vmlet-test-full",
                        str(self.target)], check=True, capture_output=True)
        return self

    def free(self) -> int:
        st = os.statvfs(self.target)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        with open(self.filler, "ab") as f:
            while self.free() > leave:
                try:
                    f.write(b"\0" * min(1 << 20, max(4096, self.free() - leave)))
                    f.flush()
                except OSError:
                    break

    def grow(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.target)], check=True, capture_output=True)
        self.size = size

    def unmount(self) -> None:
        if os.path.ismount(self.target):
            subprocess.run(["umount", "-l", str(self.target)], check=False, capture_output=True)


@pytest.fixture
def tmpfs(vmlet_dir) -> Iterator[Callable[[Path, int], Tmpfs]]:
    """Mounts tmpfs file systems; request it before `vmlet_factory` so they outlive the daemon's teardown."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mounted: list[Tmpfs] = []

    def make(target: Path, size: int) -> Tmpfs:
        t = Tmpfs(target, size).mount()
        mounted.append(t)
        return t

    yield make
    for t in reversed(mounted):
        t.unmount()


# ---------------------------------------------------------------- host daemons (shared with everyone on the machine)

DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
LIBVIRTD_PID, VIRTLOGD_PID = Path("/run/libvirtd.pid"), Path("/run/virtlogd.pid")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")


def daemon_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def start_daemon(binary: str) -> None:
    """As deploy/setup-host.sh does without systemd: `<binary> -d` (it daemonises and writes its pidfile)."""
    subprocess.run([binary, "-d"], env=DAEMON_ENV, cwd="/", check=True, capture_output=True, timeout=60,
                   start_new_session=True)


def stop_daemon(pidfile: Path, sig: int) -> None:
    pid = daemon_pid(pidfile)
    assert pid, f"no daemon runs per {pidfile}"
    os.kill(pid, sig)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 60, f"{pidfile.stem} (pid {pid}) to exit")


def libvirtd_answers() -> bool:
    from tests.support import libvirt_env
    return subprocess.run(["virsh", "-c", libvirt_env.LIBVIRT_URI, "version"], capture_output=True,
                          timeout=30).returncode == 0


def virtlogd_answers() -> bool:
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(VIRTLOGD_SOCK))
        return True
    except OSError:
        return False
    finally:
        s.close()


def restart_libvirtd() -> None:
    stop_daemon(LIBVIRTD_PID, signal.SIGTERM)  # VMs keep running: libvirtd never stops them on exit
    start_daemon("/usr/sbin/libvirtd")
    wait_until(libvirtd_answers, 60, "libvirtd to answer again", interval=0.5)


@pytest.fixture
def host_daemons() -> Iterator[None]:
    """For tests that stop libvirtd or virtlogd: both run again afterwards, also when the test failed."""
    require(os.geteuid() == 0 and os.access("/usr/sbin/libvirtd", os.X_OK) and os.access("/usr/sbin/virtlogd", os.X_OK),
            "restarting libvirtd/virtlogd needs root and the daemons in /usr/sbin (deploy/setup-host.sh)")
    require(daemon_pid(LIBVIRTD_PID) is not None and daemon_pid(VIRTLOGD_PID) is not None,
            "libvirtd and virtlogd must run as `-d` daemons with pidfiles in /run (no systemd; deploy/setup-host.sh)")
    yield
    if daemon_pid(VIRTLOGD_PID) is None:
        start_daemon("/usr/sbin/virtlogd")
    wait_until(virtlogd_answers, 30, "virtlogd to accept connections")
    if daemon_pid(LIBVIRTD_PID) is None:
        start_daemon("/usr/sbin/libvirtd")
    wait_until(libvirtd_answers, 60, "libvirtd to answer")


# ---------------------------------------------------------------- VMs

BOOT_TIMEOUT = 180


def console_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def create_vm(client, vmlet_dir: Path, name: str) -> tuple[str, str, Path]:
    """RunPodSandbox + CreateContainer, kubelet-style; returns (sandbox id, container id, its CRI log)."""
    from proto.runtime.v1 import api_pb2
    from tests.support import cri
    pod = cri.pod_config(name=name, log_directory=str(vmlet_dir / "pods" / name))
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=RPC_SLACK).pod_sandbox_id
    cid = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod), timeout=RPC_SLACK).container_id
    return sid, cid, vmlet_dir / "pods" / name / "vm" / "0.log"


def boot_vm(client, vmlet_dir: Path, name: str) -> tuple[str, str, Path]:
    from proto.runtime.v1 import api_pb2
    sid, cid, log = create_vm(client, vmlet_dir, name)
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=RPC_SLACK)
    wait_until(lambda: "VMLET-TESTVM: ready" in console_text(log), BOOT_TIMEOUT, f"VM {name} to boot")
    return sid, cid, log


def container_state(client, cid: str):
    from proto.runtime.v1 import api_pb2
    return client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=RPC_SLACK).status


def conditions(client) -> dict:
    from proto.runtime.v1 import api_pb2
    return {c.type: c for c in client.runtime.Status(api_pb2.StatusRequest(), timeout=RPC_SLACK).status.conditions}
