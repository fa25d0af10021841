"""Shared fixtures: real libvirt, the test VM image, isolated networks, the image HTTP server.

Under CI=true a missing prerequisite (libvirtd not answering, the image build
failing) fails the tests that need it; elsewhere they are skipped with the
reason, so a developer without libvirt can still run the unit tests.
Every fixture that creates something removes it in its finalizer, also when
the test fails; the session sweeps leftovers of crashed runs at both ends and
fails if any test domain, network or QEMU process survives.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support import images, libvirt_env
from tests.support.http_server import ImageServer
from tests.support.prereq import require



# ---------------------------------------------------------------- libvirt

@pytest.fixture(scope="session")
def libvirt_conn():
    try:
        import libvirt  # noqa: F401
        conn = libvirt_env.connect()
    except Exception as e:  # ImportError or libvirtError
        require(False, f"libvirtd not reachable at {libvirt_env.LIBVIRT_URI}: {e} "
                       "(run deploy/setup-host.sh as root)")
        return
    libvirt_env.sweep(conn)
    yield conn
    leftovers = libvirt_env.sweep(conn)
    qemus = libvirt_env.leftover_qemu_processes()
    conn.close()
    assert not leftovers, f"tests left libvirt objects behind: {leftovers}"
    assert not qemus, f"tests left QEMU processes behind: {qemus}"


@pytest.fixture(scope="session")
def work_root() -> Iterator[Path]:
    """A per-session directory QEMU can read (it runs as libvirt-qemu, not root)."""
    libvirt_env.remove_stale_work_dirs()
    root = libvirt_env.WORK_ROOT / f"run-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    for p in (libvirt_env.WORK_ROOT, root):
        p.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vm_dir(work_root: Path) -> Iterator[Path]:
    d = work_root / uuid.uuid4().hex[:12]
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def test_image() -> Path:
    try:
        return images.build_test_image()
    except Exception as e:
        require(False, f"cannot build the test VM image: {e}")
        raise


@pytest.fixture
def isolated_network(libvirt_conn) -> Iterator[libvirt_env.IsolatedNetwork]:
    net = libvirt_env.create_isolated_network(libvirt_conn)
    yield net
    libvirt_env.remove_network(libvirt_conn.networkLookupByName(net.name))


@pytest.fixture
def start_domain(libvirt_conn) -> Iterator[Callable[[str], "object"]]:
    """Define and start a domain from XML; destroyed and undefined at teardown."""
    started = []

    def _start(xml: str):
        dom = libvirt_conn.defineXML(xml)
        started.append(dom)
        dom.create()
        return dom

    yield _start
    for dom in started:
        libvirt_env.remove_domain(dom)


# ---------------------------------------------------------------- HTTP image server

@pytest.fixture(scope="session")
def hostile_images(tmp_path_factory) -> dict[str, Path]:
    require(shutil.which("qemu-img") is not None, "qemu-img not installed (run deploy/setup-host.sh)")
    return images.make_hostile_images(tmp_path_factory.mktemp("hostile-images"))


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    """A fresh loopback HTTP server per test (routes and request counts are per test)."""
    server = ImageServer().start()
    yield server
    server.stop()
