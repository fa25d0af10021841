"""Bad input through the CRI socket gets the right gRPC code and a message naming the problem.

Nothing half-built stays behind: after each refused request there is no
domain, no VM directory and no extra record.
"""

from __future__ import annotations

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri
from tests.support.libvirt_env import RUN_PREFIX

from .conftest import TESTVM

pytestmark = pytest.mark.libvirt


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()


def assert_nothing_built(vmlet, libvirt_conn) -> None:
    assert not [d.name() for d in libvirt_conn.listAllDomains() if d.name().startswith(RUN_PREFIX)]
    vms = vmlet.state_dir / "vms"
    assert not vms.exists() or not list(vms.iterdir())


@pytest.mark.parametrize("annotation, value", [
    ("VirtletVCPUCount", "many"),
    ("VirtletVCPUCount", "0"),
    ("VirtletDiskDriver", "ide"),
    ("VirtletRootVolumeSize", "-1Gi"),
    ("VirtletCloudInitUserData", "[not, a, mapping]"),
    ("VirtletCloudInitImageType", "floppy"),
    ("VirtletSSHKeys", "not a key"),
    ("VirtletLibvirtCPUSetting", "mode: [1, 2]"),
])
def test_bad_annotation_is_invalid_argument_naming_it(client, vmlet, libvirt_conn, annotation, value):
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(
        config=cri.pod_config(annotations={annotation: value})))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert annotation in message
    assert not client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    assert_nothing_built(vmlet, libvirt_conn)


def test_unknown_and_ambiguous_ids(client):
    rt = client.runtime
    for call, req in [
        (rt.ContainerStatus, api_pb2.ContainerStatusRequest(container_id="deadbeef")),
        (rt.StartContainer, api_pb2.StartContainerRequest(container_id="deadbeef")),
        (rt.StopContainer, api_pb2.StopContainerRequest(container_id="deadbeef")),
        (rt.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id="deadbeef")),
        (rt.StopPodSandbox, api_pb2.StopPodSandboxRequest(pod_sandbox_id="deadbeef")),
        (rt.CreateContainer, api_pb2.CreateContainerRequest(pod_sandbox_id="deadbeef",
                                                           config=cri.container_config(TESTVM))),
        (rt.ContainerStats, api_pb2.ContainerStatsRequest(container_id="deadbeef")),
    ]:
        code, message = code_of(call, req)
        assert code == grpc.StatusCode.NOT_FOUND, (call, message)
        assert "deadbeef" in message
    # Remove of an unknown ID succeeds (CRI: idempotent).
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id="deadbeef"))
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id="deadbeef"))
    code, message = code_of(rt.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "container_id" in message


def test_duplicate_sandbox_name_is_already_exists(client):
    pod = cri.pod_config()
    first = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=pod))
    assert code == grpc.StatusCode.ALREADY_EXISTS and first in message
    # A new attempt of the same pod is a new sandbox.
    pod.metadata.attempt = 1
    client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod))


def test_host_network_and_bad_metadata_are_refused(client):
    pod = cri.pod_config()
    pod.linux.security_context.namespace_options.network = api_pb2.NODE
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=pod))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "host-network" in message
    pod = cri.pod_config()
    pod.metadata.uid = ""
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "config.metadata.uid" in message
    pod = cri.pod_config(name="x\nevil")
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "control characters" in message
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(
        config=cri.pod_config(), runtime_handler="runc"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "runtime_handler" in message


def test_missing_image_second_container_and_bad_log_path(client, pulled, vmlet, libvirt_conn):
    rt = client.runtime
    pod = cri.pod_config(log_directory=str(vmlet.state_dir.parent / "logs"))
    sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id

    code, message = code_of(rt.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=cri.container_config("virtlet.cloud/not-pulled"), sandbox_config=pod))
    assert code == grpc.StatusCode.NOT_FOUND and "virtlet.cloud/not-pulled" in message
    code, message = code_of(rt.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=cri.container_config(TESTVM, log_path="../../etc/x"), sandbox_config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "config.log_path" in message
    code, message = code_of(rt.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=cri.container_config(TESTVM, memory_mib=16), sandbox_config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "memory_limit_in_bytes" in message
    assert_nothing_built(vmlet, libvirt_conn)

    first = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=cri.container_config(TESTVM), sandbox_config=pod)).container_id
    code, message = code_of(rt.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=cri.container_config(TESTVM, name="second"), sandbox_config=pod))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "exactly one container" in message and first in message

    code, message = code_of(rt.StartContainer, api_pb2.StartContainerRequest(container_id=first[:8] + "x"))
    assert code == grpc.StatusCode.NOT_FOUND
    # Exec & co. need a running VM: FAILED_PRECONDITION saying so, before any URL is handed out.
    for call, req in [(rt.ExecSync, api_pb2.ExecSyncRequest(container_id=first, cmd=["ls"])),
                      (rt.Exec, api_pb2.ExecRequest(container_id=first, cmd=["ls"], stdout=True)),
                      (rt.Attach, api_pb2.AttachRequest(container_id=first, stdout=True))]:
        code, message = code_of(call, req)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not running" in message, message
    # The image cannot be removed from under the VM's overlay.
    client.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=pulled)))
    files = list((vmlet.state_dir / "images" / "sha256").iterdir())
    assert [f.name for f in files] == [pulled.removeprefix("sha256:")]
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    assert not list((vmlet.state_dir / "images" / "sha256").iterdir())
    assert_nothing_built(vmlet, libvirt_conn)
