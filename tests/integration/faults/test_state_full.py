"""The VMs' file system full at CreateContainer: a clear FAILED_PRECONDITION/RESOURCE_EXHAUSTED naming the file
system, nothing half-built (no domain, no VM directory, no image hold), the daemon serving, and the same
request working once space is freed."""

from __future__ import annotations

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri, libvirt_env

from .conftest import RPC_SLACK, TESTVM

pytestmark = pytest.mark.libvirt

MIB = 1 << 20


@pytest.mark.parametrize("leave, what, not_what", [
    (16 * 1024, "cannot create the VM's root disk", "cloud-init"),
    (228 * 1024, "cannot write the VM's cloud-init disk", "root disk"),
], ids=["no-room-for-the-overlay", "no-room-for-the-iso"])
def test_full_vms_file_system_fails_create_container_cleanly_and_recovers(
        tmpfs, vmlet_factory, vmlet_dir, libvirt_conn, leave, what, not_what):
    proc = vmlet_factory()
    fs = tmpfs(proc.state_dir / "vms", 4 * MIB)
    client = proc.start()
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=120)
    pod = cri.pod_config(name="full", log_directory=str(vmlet_dir / "pods" / "full"))
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=RPC_SLACK).pod_sandbox_id
    fs.fill(leave=leave)
    request = api_pb2.CreateContainerRequest(pod_sandbox_id=sid, config=cri.container_config(TESTVM),
                                             sandbox_config=pod)
    with pytest.raises(grpc.RpcError) as exc:
        client.runtime.CreateContainer(request, timeout=RPC_SLACK)
    err = exc.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert str(fs.target) in err.details() and "No space left on device" in err.details(), err.details()
    # The message says which of the VM's files did not fit.
    assert err.details().startswith(what) and not_what not in err.details(), err.details()

    assert proc.alive()
    assert [p.name for p in fs.target.iterdir()] == [fs.filler.name], "a half-built VM directory was left"
    assert [d.name() for d in libvirt_env.test_domains(libvirt_conn)
            if d.name().startswith(libvirt_env.RUN_PREFIX)] == []
    assert list(client.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=RPC_SLACK).containers) == []
    image = client.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=TESTVM), verbose=True),
                                      timeout=RPC_SLACK)
    assert '"holders": []' in image.info["info"], image.info

    fs.filler.unlink()  # space freed
    cid = client.runtime.CreateContainer(request, timeout=RPC_SLACK).container_id
    assert (fs.target / cid / "root.qcow2").exists()
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=RPC_SLACK)
    assert st.status.state == api_pb2.CONTAINER_CREATED
