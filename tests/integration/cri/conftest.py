"""Fixtures for driving the real vmlet daemon over its CRI socket."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from cri_shim.storage import pod_volumes
from cri_shim.network import NetworkManager
from tests.support import cri, libvirt_env, netsupport

TESTVM = "virtlet.cloud/testvm"


@pytest.fixture
def vmlet_dir(work_root: Path) -> Iterator[Path]:
    d = work_root / f"vmlet-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o711)
    yield d
    # A test that failed with vmlet dead may leave a VM's read-only volume bind mounted in here.
    pod_volumes.unmount_under(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cni_conf_dir(vmlet_dir: Path, test_network) -> Path:
    """The node's CNI config for the daemon: the tests' own bridge network (no NAT, no way out)."""
    d = vmlet_dir / "net.d"
    netsupport.write_conf(d, "10-vmlet-test.conflist", test_network.conflist())
    return d


@pytest.fixture
def vmlet_factory(libvirt_conn, test_image, image_server, vmlet_dir, cni_conf_dir, test_network):
    """Make (not start) a vmlet daemon whose `virtlet.cloud/testvm` is the test image on loopback.

    Teardown removes every pod through the CRI (as the kubelet would), stops
    the daemon, sweeps any domain and pod network it left (a test that killed
    it) and checks that the test network's IPs were all given back.
    """
    url = image_server.serve_file("/testvm.qcow2", test_image)
    translations = cri.translations_for(vmlet_dir / "translations.yaml", {"testvm": url})
    made: list[cri.VmletProcess] = []

    def make(**config_extra) -> cri.VmletProcess:
        state = vmlet_dir / "state"
        socket = vmlet_dir / "vmlet.sock"
        config = vmlet_dir / "vmlet.yaml"
        config_extra.setdefault("cni_conf_dir", str(cni_conf_dir))
        config_extra.setdefault("cni_bin_dirs", [netsupport.CNI_BIN_DIR])
        cri.write_config(config, state, socket, translations, **config_extra)
        proc = cri.VmletProcess(state, socket, config, vmlet_dir / "vmlet.log")
        made.append(proc)
        return proc

    yield make
    # Every step runs even when an earlier one fails (libvirtd restarted by a fault test, a stuck daemon):
    # the first failure is raised at the end.
    with contextlib.ExitStack() as cleanup:
        for proc in made:
            cleanup.callback(_sweep_network, proc, cni_conf_dir)
        cleanup.callback(libvirt_env.sweep, libvirt_conn)
        for proc in made:
            cleanup.callback(_remove_pods_and_stop, proc)
    held = test_network.allocated_ips()
    for f in test_network.ipam_dir.glob("*/[0-9]*"):
        f.unlink()
    assert not held, f"pod IPs not released: {held}"


def _remove_pods_and_stop(proc: cri.VmletProcess) -> None:
    """What the kubelet does to a node's pods before the daemon goes: remove them all."""
    try:
        if proc.alive():
            client = proc.client or cri.connect(proc.socket)
            for sb in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
                client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
    except grpc.RpcError:
        pass
    finally:
        proc.stop()


def _sweep_network(proc: cri.VmletProcess, cni_conf_dir: Path) -> None:
    if proc.state_dir.exists():
        NetworkManager(proc.state_dir, cni_conf_dir, [netsupport.CNI_BIN_DIR]).sweep([])


@pytest.fixture
def vmlet(vmlet_factory) -> cri.VmletProcess:
    proc = vmlet_factory()
    proc.start()
    return proc


@pytest.fixture
def client(vmlet) -> cri.Client:
    return vmlet.client


@pytest.fixture
def pulled(client) -> str:
    """The test image, pulled; returns its image ref (sha256:...)."""
    resp = client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=120)
    return resp.image_ref
