"""A VM that stops by itself is seen as an exited container, from libvirt's lifecycle events.

ListContainers does not ask libvirt about each VM: the state it reports comes
from the events the daemon recorded, so these tests prove the event path.
"""

from __future__ import annotations

import time

import grpc
import libvirt
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri

from .conftest import TESTVM
from .test_lifecycle import wait_for_log

pytestmark = pytest.mark.libvirt


def start_vm(client, vmlet_dir, name):
    pod = cri.pod_config(name=name, log_directory=str(vmlet_dir / "pods" / name))
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    cid = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod)).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    wait_for_log(vmlet_dir / "pods" / name / "vm" / "0.log", r"VMLET-TESTVM: ready$", 120)
    return cid


def wait_listed_exited(client, cid, timeout=60):
    flt = api_pb2.ContainerFilter(id=cid, state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.runtime.ListContainers(api_pb2.ListContainersRequest(filter=flt)).containers:
            return
        time.sleep(0.2)
    raise AssertionError("container not listed as exited")


def domain_of(libvirt_conn, cid):
    return next(d for d in libvirt_conn.listAllDomains() if d.name().endswith(cid[:32]))


def test_guest_poweroff_is_a_clean_exit(client, pulled, vmlet_dir, libvirt_conn):
    cid = start_vm(client, vmlet_dir, "poweroff")
    domain_of(libvirt_conn, cid).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    wait_listed_exited(client, cid)
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid)).status
    assert (st.exit_code, st.reason) == (0, "Completed")


def test_destroyed_vm_is_killed(client, pulled, vmlet_dir, libvirt_conn):
    cid = start_vm(client, vmlet_dir, "destroyed")
    domain_of(libvirt_conn, cid).destroy()
    wait_listed_exited(client, cid)
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid)).status
    assert (st.exit_code, st.reason) == (137, "Killed")


def test_the_kubelet_restarts_an_exited_vm_as_its_next_attempt(client, pulled, vmlet_dir, libvirt_conn):
    """restartPolicy Always: after the guest powered off, the kubelet creates attempt 1 beside the dead container."""
    name = "restarted"
    pod = cri.pod_config(name=name, log_directory=str(vmlet_dir / "pods" / name))
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    first = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM, log_path="vm/0.log"), sandbox_config=pod),
        timeout=120).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=first), timeout=120)
    wait_for_log(vmlet_dir / "pods" / name / "vm" / "0.log", r"VMLET-TESTVM: ready$", 180)
    domain_of(libvirt_conn, first).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    wait_listed_exited(client, first)

    again = cri.container_config(TESTVM, log_path="vm/1.log")
    again.metadata.attempt = 1
    second = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=again, sandbox_config=pod), timeout=120).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=second), timeout=120)
    wait_for_log(vmlet_dir / "pods" / name / "vm" / "1.log", r"VMLET-TESTVM: ready$", 180)
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=second), timeout=10).status
    assert st.state == api_pb2.CONTAINER_RUNNING and st.metadata.attempt == 1
    # A second live VM in the pod is still refused.
    third = cri.container_config(TESTVM, log_path="vm/2.log")
    third.metadata.attempt = 2
    with pytest.raises(grpc.RpcError) as e:
        client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=sid, config=third, sandbox_config=pod), timeout=120)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and second in e.value.details()
    client.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=first), timeout=60)  # the GC
