"""UpdateContainerResources on a running VM, and ReopenContainerLog after the kubelet rotates the log."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri

from .conftest import TESTVM

from .test_exits import domain_of, start_vm
from .test_lifecycle import wait_for_log

pytestmark = pytest.mark.libvirt

MIB = 1024 * 1024


def update(client, cid, **resources):
    return client.runtime.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
        container_id=cid, linux=api_pb2.LinuxContainerResources(**resources)))


def test_memory_change_applies_live_and_limits_are_refused_clearly(client, pulled, vmlet_dir, libvirt_conn):
    cid = start_vm(client, vmlet_dir, "update")
    update(client, cid, memory_limit_in_bytes=200 * MIB)
    # The guest's balloon driver gives the memory back; libvirt reports what it has reached.
    dom = domain_of(libvirt_conn, cid)
    deadline = time.monotonic() + 60
    while int(ET.fromstring(dom.XMLDesc()).findtext("currentMemory")) != 200 * 1024:
        assert time.monotonic() < deadline, ET.fromstring(dom.XMLDesc()).findtext("currentMemory")
        time.sleep(0.5)
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid)).status
    assert st.resources.linux.memory_limit_in_bytes == 200 * MIB

    with pytest.raises(grpc.RpcError) as e:
        update(client, cid, memory_limit_in_bytes=1024 * MIB)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot grow beyond" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        update(client, cid, cpu_period=100000, cpu_quota=200000)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "vCPU" in e.value.details()


def test_reopen_container_log_after_rotation(client, pulled, vmlet_dir):
    cid = start_vm(client, vmlet_dir, "rotate")
    log = vmlet_dir / "pods" / "rotate" / "vm" / "0.log"
    log.rename(log.with_suffix(".log.1"))
    client.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid))
    client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=60))
    wait_for_log(log, r"stdout F VMLET-TESTVM: acpi poweroff$", 30)
    assert "boot marker" not in log.read_text()
    with pytest.raises(grpc.RpcError) as e:
        client.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cpu_limit_becomes_vcpus_and_a_quota_on_the_running_vm(client, pulled, vmlet_dir, libvirt_conn):
    pod = cri.pod_config(name="cpulimit", log_directory=str(vmlet_dir / "pods" / "cpulimit"))
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    cid = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM, cpu_quota=150000), sandbox_config=pod)).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    dom = domain_of(libvirt_conn, cid)
    assert dom.maxVcpus() == 2  # 1.5 CPUs -> 2 vCPUs, capped at 1.5 CPUs of time
    params = dom.schedulerParameters()
    assert (params["global_period"], params["global_quota"]) == (100000, 150000)
    wait_for_log(vmlet_dir / "pods" / "cpulimit" / "vm" / "0.log", r"VMLET-TESTVM: boot marker$", 120)
