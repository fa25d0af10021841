"""Fault injection on the environment of the real vmlet daemon (issue #12).

The daemon, its state dir, CNI network and image server are the CRI suite's
fixtures (tests/integration/cri/conftest.py), re-exported here; this file adds
what the faults need: a small tmpfs to fill, a CNI plugin that hangs, and the
host daemons (libvirtd, virtlogd) stopped and started the way
deploy/setup-host.sh starts them on a machine without systemd.
"""

from __future__ import annotations

import os
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
