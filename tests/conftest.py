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

from cri_shim.network import netns as network_netns

from tests.support import images, libvirt_env, netsupport
from tests.support.http_server import ImageServer
from tests.support.netsupport import TestNetwork
from tests.support.prereq import require



# ---------------------------------------------------------------- libvirt

@pytest.fixture(scope="session")
def libvirt_conn():
    try:
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
    libvirt_env.release_work_dir(root)
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


# ---------------------------------------------------------------- pod networking (CNI)

def _read_forwarding() -> str | None:
    return network_netns.read_sysctl("net/ipv4/ip_forward")


@pytest.fixture(scope="session")
def net_prereqs() -> Iterator[None]:
    require(os.geteuid() == 0, "the network tests need root (network namespaces, bridges)")
    for plugin in ("bridge", "host-local"):
        require(os.access(f"{netsupport.CNI_BIN_DIR}/{plugin}", os.X_OK),
                f"CNI plugin {plugin} missing in {netsupport.CNI_BIN_DIR} (Debian: containernetworking-plugins)")
    for tool, pkg in (("dnsmasq", "dnsmasq-base"), ("nsenter", "util-linux"), ("nft", "nftables")):
        require(shutil.which(tool) is not None, f"{tool} not installed (Debian: {pkg})")
    require(os.access(netsupport.BUSYBOX, os.X_OK), "busybox not installed (Debian: busybox-static)")
    netsupport.sweep()
    forwarding = _read_forwarding()
    yield
    if forwarding is not None:
        network_netns.write_sysctl("net/ipv4/ip_forward", forwarding)
    left = netsupport.leftovers()
    netsupport.sweep()
    assert not left, f"network tests left things behind: {left}"


@pytest.fixture(scope="session")
def test_network(net_prereqs, tmp_path_factory) -> Iterator[TestNetwork]:
    subnet = netsupport.pick_subnet()
    third = int(str(subnet.network_address).split(".")[2])
    net = TestNetwork(name="vmlet-nettest", bridge=netsupport.test_name(), subnet=subnet,
                      extra_route=netsupport.ipaddress.IPv4Network(f"10.214.{(third + 128) % 256}.0/24"),
                      ipam_dir=tmp_path_factory.mktemp(netsupport.STATE_MARK) / "ipam")
    yield net
    netsupport.sweep()  # the CNI bridge is one of the session's vmlt-<pid> links
