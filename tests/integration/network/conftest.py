"""Fixtures for the pod network tests: real kernel, real CNI plugins (Debian's), real dnsmasq.

Needs root, /usr/lib/cni (containernetworking-plugins), dnsmasq (dnsmasq-base), busybox
(busybox-static: udhcpc, ping, nc), nsenter and nft. Under CI=true a missing one fails the
tests; elsewhere they are skipped. Every test ends with a check that it left nothing behind
(netns, links, dnsmasq, host-local allocations); the session sweeps leftovers of crashed
runs at both ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from cri_shim.network import NetworkManager, netns
from tests.support import netsupport
from tests.support.netsupport import FakeVM, TestNetwork


@pytest.fixture
def conf_dir(tmp_path: Path, test_network: TestNetwork) -> Path:
    """A CNI config dir holding the test network's conflist (tests may add or replace files)."""
    d = tmp_path / "net.d"
    netsupport.write_conf(d, "10-vmlet-nettest.conflist", test_network.conflist())
    return d


@pytest.fixture
def make_manager(tmp_path_factory, conf_dir: Path,
                 test_network: TestNetwork) -> Iterator[Callable[..., NetworkManager]]:
    """NetworkManager factory (own state dir, test conf dir, Debian's plugins). After the test: every
    manager sweeps, and nothing of the test may remain — no netns, link, dnsmasq or IP allocation."""
    made: list[NetworkManager] = []
    forwarding = netns.read_sysctl("net/ipv4/ip_forward")

    def make(conf: Path | None = None, bin_dirs: list[str] | None = None, timeout: float = 10.0,
             state_dir: Path | None = None) -> NetworkManager:
        state = state_dir or tmp_path_factory.mktemp(netsupport.STATE_MARK) / "state"
        nm = NetworkManager(state, conf or conf_dir, bin_dirs or [netsupport.CNI_BIN_DIR], plugin_timeout=timeout)
        made.append(nm)
        return nm

    yield make
    problems = []
    for nm in made:
        try:
            nm.sweep([])
        except Exception as e:  # noqa: BLE001
            problems.append(f"sweep failed: {e!r}")
    if forwarding is not None:  # the bridge plugin (isGateway) switches host forwarding on
        netns.write_sysctl("net/ipv4/ip_forward", forwarding)
    left = [x for x in netsupport.leftovers() if not x.startswith(f"link {test_network.bridge}")]
    held = test_network.allocated_ips()
    netsupport.sweep()
    for d in test_network.ipam_dir.glob("*/[0-9]*"):
        d.unlink()
    assert not problems and not left and not held, (
        f"test left things behind: {left}; host-local still holds {held}; {problems}")


@pytest.fixture
def fake_vms(make_manager) -> Iterator[Callable[[str, str], FakeVM]]:
    """Fake VM factory: fake_vms(host_bridge, mac) -> FakeVM; all closed after the test (before the
    managers' leftover check, which this fixture therefore depends on)."""
    made: list[FakeVM] = []

    def make(host_bridge: str, mac: str) -> FakeVM:
        vm = FakeVM(host_bridge, mac)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.close()


@pytest.fixture
def sandbox_id() -> str:
    return netsupport.new_sandbox_id()
