"""The state dir's file system full under the real daemon (issue #12 follow-ups).

sqlite's "database or disk is full" writing vmlet.db is RESOURCE_EXHAUSTED
naming the file system (was INTERNAL), what the RPC built is rolled back (pod
network, IP, domain, VM files, image hold), the daemon keeps serving and the
same requests work once space is freed. A full VMs' file system says which
of the VM's files could not be written (not always "the root disk").
"""

from __future__ import annotations


import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.integration.faults.conftest import RPC_SLACK, tmpfs  # noqa: F401 - fixture
from tests.support import cri, libvirt_env

from .conftest import TESTVM

pytestmark = pytest.mark.libvirt

MIB = 1 << 20


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=RPC_SLACK)
    return e.value


def our_domains(libvirt_conn) -> list[str]:
    return [d.name() for d in libvirt_env.test_domains(libvirt_conn) if d.name().startswith(libvirt_env.RUN_PREFIX)]


def image_holders(client) -> str:
    image = client.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=TESTVM), verbose=True),
                                      timeout=RPC_SLACK)
    return image.info["info"]


@pytest.fixture
def db_only_full(tmpfs, vmlet_factory):
    """A daemon whose vmlet.db is alone on a small tmpfs: images, VMs and network state each have room of their own,
    so filling it fails exactly the metadata writes."""
    proc = vmlet_factory()
    state = tmpfs(proc.state_dir, 2 * MIB)
    for sub, size in (("images", 64 * MIB), ("vms", 64 * MIB), ("network", 8 * MIB), ("cni", 8 * MIB)):
        tmpfs(proc.state_dir / sub, size)
    return proc, state


def test_full_metadata_file_system_is_resource_exhausted_rolled_back_and_recovers(
        db_only_full, vmlet_dir, libvirt_conn, test_network):
    proc, state = db_only_full
    client = proc.start()
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=120)
    first = cri.pod_config(name="full-1", log_directory=str(vmlet_dir / "pods" / "full-1"))
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=first), timeout=RPC_SLACK).pod_sandbox_id
    state.fill(leave=0)
    assert state.free() == 0

    # RunPodSandbox: its network was set up, then recording the sandbox failed.
    second = cri.pod_config(name="full-2", log_directory=str(vmlet_dir / "pods" / "full-2"))
    err = rpc_error(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=second))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert f"the file system on {state.target} is full" in err.details(), err.details()
    assert str(proc.state_dir / "vmlet.db") in err.details() and "database or disk is full" in err.details()
    assert [sb.id for sb in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(),
                                                          timeout=RPC_SLACK).items] == [sid]
    assert sorted(p.name for p in (proc.state_dir / "network").iterdir() if not p.name.startswith(".")) == [sid]
    assert len(test_network.allocated_ips()) == 1, "the failed sandbox's IP was not released"

    # CreateContainer: overlay, ISO and domain were built, then recording the container failed.
    request = api_pb2.CreateContainerRequest(pod_sandbox_id=sid, config=cri.container_config(TESTVM),
                                             sandbox_config=first)
    err = rpc_error(client.runtime.CreateContainer, request)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert f"the file system on {state.target} is full" in err.details(), err.details()
    assert our_domains(libvirt_conn) == []
    assert [p.name for p in (proc.state_dir / "vms").iterdir()] == [], "a half-built VM directory was left"
    assert '"holders": []' in image_holders(client)
    assert list(client.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=RPC_SLACK).containers) == []
    assert proc.alive()

    state.filler.unlink()  # space freed: the same requests work, on the same daemon
    cid = client.runtime.CreateContainer(request, timeout=RPC_SLACK).container_id
    sid2 = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=second), timeout=RPC_SLACK).pod_sandbox_id
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=RPC_SLACK)
    assert st.status.state == api_pb2.CONTAINER_CREATED
    assert client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid2),
                                           timeout=RPC_SLACK).status.state == api_pb2.SANDBOX_READY
    proc.stop()  # and what was recorded survives a restart
    client = proc.start()
    assert [c.id for c in client.runtime.ListContainers(api_pb2.ListContainersRequest(),
                                                        timeout=RPC_SLACK).containers] == [cid]
    assert {sb.id for sb in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(),
                                                          timeout=RPC_SLACK).items} == {sid, sid2}
