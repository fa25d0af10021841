"""kill -9 of vmlet inside StopPodSandbox, after CNI DEL began: the next start recovers, never bricks the node.

CNI DEL deletes eth0 and releases the pod IP and finishes even when vmlet dies
(the plugin is a process of its own). A sandbox still recorded READY then has
a network that cannot be repaired: recovery must start anyway (the bridge
binding used to crash it), must not hand out a released IP as the pod's (the
masquerade binding used to "repair" it back to READY), and marks the sandbox
NOTREADY so the kubelet stops and recreates the pod.
"""

from __future__ import annotations

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri
from tests.support.libvirt_env import RUN_PREFIX

from .conftest import TESTVM

pytestmark = pytest.mark.libvirt


def sandbox_state(client, sid):
    return client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10).status


@pytest.mark.parametrize("binding", ["bridge", "masquerade"])
@pytest.mark.parametrize("crashpoint", ["network.teardown.after-cni-del", "sandbox-stop.after-network"])
def test_kill_in_stop_pod_sandbox_after_cni_del(vmlet_factory, vmlet_dir, test_network, libvirt_conn,
                                                binding, crashpoint):
    vmlet = vmlet_factory()
    client = vmlet.start(crashpoint=crashpoint)
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=120)
    pod = cri.pod_config(name=f"stop-{binding}", log_directory=str(vmlet_dir / "pods" / binding),
                         annotations={"vmlet.dev/network-binding": binding})
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    cid = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod), timeout=120).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
    assert len(test_network.allocated_ips()) == 1

    with pytest.raises(grpc.RpcError) as e:
        client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the daemon died at the crashpoint
    vmlet.wait_dead()
    vmlet.kill()
    assert test_network.allocated_ips() == [], "CNI DEL had released the IP before the crash"

    client = vmlet.start()  # used to exit with "LookupError: eth0 is missing" under the bridge binding
    st = sandbox_state(client, sid)
    assert st.state == api_pb2.SANDBOX_NOTREADY, "a sandbox whose IP is released must not be READY"
    assert "marking it not ready" in vmlet.log()
    c = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
    assert c.state == api_pb2.CONTAINER_EXITED

    # The kubelet's retry, then removal: nothing is left, and the IP stays released.
    client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    assert not client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert not [d for d in libvirt_conn.listAllDomains() if d.name().startswith(RUN_PREFIX)]
    assert not list((vmlet.state_dir / "network").iterdir())
    assert test_network.allocated_ips() == []


def test_one_broken_sandbox_does_not_keep_the_daemon_from_starting(vmlet_factory, vmlet_dir, test_network):
    """A ready sandbox whose network record is garbage: the daemon starts, that sandbox is NOTREADY, others fine."""
    vmlet = vmlet_factory()
    client = vmlet.start()
    sids = [client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cri.pod_config(name=f"p{i}")),
                                         timeout=120).pod_sandbox_id for i in range(2)]
    vmlet.kill()
    (vmlet.state_dir / "network" / sids[0] / "record.json").write_text('{"phase": "ready", "network": {"x": 1}}')
    client = vmlet.start()
    assert sandbox_state(client, sids[0]).state == api_pb2.SANDBOX_NOTREADY
    assert sandbox_state(client, sids[1]).state == api_pb2.SANDBOX_READY
