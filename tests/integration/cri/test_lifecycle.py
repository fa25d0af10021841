"""A kubelet-like sequence through the CRI socket against the real daemon, libvirtd and QEMU.

pull → run sandbox → create → start → boot marker in the CRI log → status,
lists, stats, events → stop (ACPI) → remove, with nothing left behind.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri
from tests.support.libvirt_env import RUN_PREFIX

from .conftest import TESTVM

pytestmark = pytest.mark.libvirt

BOOT_TIMEOUT = 120
CRI_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z stdout [FP] ", re.MULTILINE)


def wait_for_log(path: Path, pattern: str, timeout: float) -> re.Match:
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if m := regex.search(text):
            return m
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout}s:\n" + (text[-3000:] if path.exists() else "(no file)"))


class EventCollector:
    def __init__(self, client: cri.Client) -> None:
        self.events: list[api_pb2.ContainerEventResponse] = []
        self._stream = client.runtime.GetContainerEvents(api_pb2.GetEventsRequest())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._stream:
                self.events.append(ev)
        except grpc.RpcError:
            pass

    def types_for(self, object_id: str) -> list[int]:
        return [e.container_event_type for e in self.events if e.container_id == object_id]

    def close(self) -> None:
        self._stream.cancel()


def test_vm_pod_lifecycle_through_the_cri_socket(client, pulled, vmlet, vmlet_dir, libvirt_conn):
    rt = client.runtime
    version = rt.Version(api_pb2.VersionRequest())
    assert (version.runtime_name, version.runtime_api_version) == ("vmlet", "v1")
    conditions = {c.type: c for c in rt.Status(api_pb2.StatusRequest()).status.conditions}
    assert conditions["RuntimeReady"].status is True

    image = client.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=TESTVM))).image
    assert image.id == pulled

    events = EventCollector(client)
    log_dir = vmlet_dir / "pods" / "default_lifecycle"
    pod = cri.pod_config(name="lifecycle", log_directory=str(log_dir), annotations={
        "VirtletRootVolumeSize": "64Mi",
        "VirtletCloudInitUserDataScript": "#!/bin/sh\necho SCRIPT-RAN-ON-$(hostname)\n",
    })
    sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    ccfg = cri.container_config(TESTVM, log_path="vm/0.log")
    container_id = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=ccfg, sandbox_config=pod)).container_id

    status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True))
    assert status.status.state == api_pb2.CONTAINER_CREATED
    assert status.status.image_ref == pulled
    assert status.status.labels["role"] == "vm" and status.status.annotations["test"] == "yes"
    assert status.status.log_path == str(log_dir / "vm/0.log")
    domain = status.status.id[:32]
    assert any(d.name().endswith(domain) and d.name().startswith(RUN_PREFIX) for d in libvirt_conn.listAllDomains())

    rt.StartContainer(api_pb2.StartContainerRequest(container_id=container_id))
    assert rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id)).status.state \
        == api_pb2.CONTAINER_RUNNING

    # The serial console, in the CRI log format, where the kubelet looks for it.
    log = log_dir / "vm" / "0.log"
    wait_for_log(log, r"stdout F VMLET-TESTVM: boot marker$", BOOT_TIMEOUT)
    pod_uid = pod.metadata.uid
    wait_for_log(log, rf"stdout F VMLET-TESTVM: instance-id {pod_uid}$", 60)
    wait_for_log(log, r"stdout F VMLET-TESTVM: hostname lifecycle$", 10)
    wait_for_log(log, r"stdout F SCRIPT-RAN-ON-lifecycle", 30)
    size = int(wait_for_log(log, r"stdout F VMLET-TESTVM: disk vda (\d+)", 10).group(1))
    assert size == 64 * 1024 * 1024
    lines = [l for l in log.read_text().splitlines() if l]
    assert all(CRI_LINE.match(l) for l in lines), [l for l in lines if not CRI_LINE.match(l)][:3]

    # Lists and filters.
    listed = rt.ListContainers(api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(
        pod_sandbox_id=sandbox_id[:12], label_selector={"role": "vm"}))).containers
    assert [c.id for c in listed] == [container_id]
    assert not rt.ListContainers(api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(
        state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED)))).containers
    assert [s.id for s in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=api_pb2.PodSandboxFilter(
        label_selector={"app": "vmlet-test"}))).items] == [sandbox_id]

    # Stats from libvirt: two samples give a CPU rate.
    first = rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=container_id)).stats
    time.sleep(1)
    second = rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=container_id)).stats
    assert second.cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value > 0
    assert second.cpu.usage_nano_cores.value > 0
    assert second.memory.working_set_bytes.value > 16 * 1024 * 1024
    assert second.writable_layer.used_bytes.value > 0
    pod_stats = rt.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=sandbox_id)).stats
    assert [c.attributes.id for c in pod_stats.linux.containers] == [container_id]
    names = {d.name for d in rt.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest()).descriptors}
    metrics = rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest()).pod_metrics
    got = {m.name: m.value.value for pm in metrics for cm in pm.container_metrics for m in cm.metrics}
    assert set(got) == names and got["container_cpu_usage_seconds_total"] > 0

    # Stop: ACPI power button, the guest powers off cleanly -> exit code 0.
    wait_for_log(log, r"stdout F VMLET-TESTVM: ready$", 60)
    rt.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=60))
    st = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id)).status
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 0, "Completed")
    assert st.finished_at >= st.started_at > st.created_at > 0
    wait_for_log(log, r"stdout F VMLET-TESTVM: acpi poweroff$", 10)
    rt.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=5))  # idempotent

    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id))
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id))  # idempotent
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    assert not rt.ListContainers(api_pb2.ListContainersRequest()).containers
    assert not rt.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    assert not [d for d in libvirt_conn.listAllDomains() if d.name().startswith(RUN_PREFIX)]
    assert not list((vmlet.state_dir / "vms").iterdir())
    # The image is free again and can be removed.
    client.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=pulled)))
    assert not list((vmlet.state_dir / "images" / "sha256").iterdir())

    time.sleep(1)
    events.close()
    assert events.types_for(container_id) == [api_pb2.CONTAINER_CREATED_EVENT, api_pb2.CONTAINER_STARTED_EVENT,
                                              api_pb2.CONTAINER_STOPPED_EVENT, api_pb2.CONTAINER_DELETED_EVENT]
    assert api_pb2.CONTAINER_DELETED_EVENT in events.types_for(sandbox_id)
