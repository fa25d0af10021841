"""Hostile values through the real daemon's CRI socket get a clear refusal up front, never INTERNAL later.

Issue #12, defects 5 and 7: strings the domain XML cannot carry, CPU and
memory limits outside libvirt's ranges, CPU settings this host can never
start, and huge IDs echoed back in a status message the client cannot read.
"""

from __future__ import annotations

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri, libvirt_env

from .conftest import TESTVM
from .test_errors import assert_nothing_built, code_of
from .test_exits import start_vm

pytestmark = pytest.mark.libvirt

MIB = 1024 * 1024
MAX_MESSAGE = 2048
XML_CANNOT_CARRY = ["\ufffe", "\uffff", "\x01", "\x1b"]


def run(client, pod):
    return client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id


def create(client, sid, pod, cfg):
    return client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cfg, sandbox_config=pod), timeout=120).container_id


@pytest.mark.parametrize("char", XML_CANNOT_CARRY, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("field", ["name", "namespace", "uid"])
def test_pod_identity_xml_cannot_carry_is_refused_by_run_pod_sandbox(client, vmlet, libvirt_conn, field, char):
    pod = cri.pod_config()
    setattr(pod.metadata, field, f"a{char}b")
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert f"config.metadata.{field}" in message and f"U+{ord(char):04X}" in message
    assert not client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    assert_nothing_built(vmlet, libvirt_conn)


def test_other_pod_strings_are_checked_too(client, vmlet, libvirt_conn):
    pod = cri.pod_config(log_directory=str(vmlet.state_dir.parent / "logs\ufffe"))
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "config.log_directory" in message
    pod = cri.pod_config()
    pod.dns_config.searches.append("example.org\nnameserver 10.0.0.1")
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "config.dns_config.searches[0]" in message
    assert not client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    assert_nothing_built(vmlet, libvirt_conn)


def test_labels_and_unread_annotations_are_opaque_and_echoed_as_given(client, vmlet):
    # They never reach the domain XML: stored and answered verbatim, as containerd does.
    labels = {"odd": "a\ufffeb\x01c", "k\uffff": "v"}
    pod = cri.pod_config(labels=labels, annotations={"example.com/note": "x\x02y\ufffe"})
    sid = run(client, pod)
    status = client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status
    assert dict(status.labels) == dict(pod.labels)
    assert status.annotations["example.com/note"] == "x\x02y\ufffe"
    (listed,) = client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    assert dict(listed.labels) == dict(pod.labels)
    # An annotation vmlet reads is checked like every value it uses.
    code, message = code_of(client.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(
        config=cri.pod_config(annotations={"VirtletDiskDriver": "virtio\x01"})))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "VirtletDiskDriver" in message


def _container_cases(vol: str):
    def name(c):
        c.metadata.name = "vm\ufffe"

    def host_path(c):
        c.mounts.append(api_pb2.Mount(container_path="/mnt/data", host_path=vol + "\uffff"))

    def container_path(c):
        c.mounts.append(api_pb2.Mount(container_path="/mnt/\ufffe", host_path=vol))

    def log_path(c):
        c.log_path = "vm/0\ufffe.log"

    return [(name, "config.metadata.name"), (host_path, "config.mounts[0].host_path"),
            (container_path, "config.mounts[0].container_path"), (log_path, "config.log_path")]


def test_container_strings_xml_cannot_carry_are_refused(client, pulled, vmlet, vmlet_dir, libvirt_conn):
    pod = cri.pod_config(log_directory=str(vmlet_dir / "pods" / "hostile"))
    sid = run(client, pod)
    for mutate, field in _container_cases(str(vmlet_dir / "vol")):
        cfg = cri.container_config(TESTVM)
        mutate(cfg)
        code, message = code_of(client.runtime.CreateContainer, api_pb2.CreateContainerRequest(
            pod_sandbox_id=sid, config=cfg, sandbox_config=pod))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, message)
        assert field in message, message
        assert_nothing_built(vmlet, libvirt_conn)


@pytest.mark.parametrize("period, quota, named", [
    (999, 100000, "cpu_period"),
    (1000001, 2000000, "cpu_period"),
    (-5, 50000, "cpu_period"),
    (2**63 - 1, 2**63 - 1, "cpu_period"),
    (100000, 999, "cpu_quota"),
    (100000, 2**44, "cpu_quota"),
])
def test_cpu_limit_outside_libvirts_ranges(client, pulled, vmlet, libvirt_conn, period, quota, named):
    pod = cri.pod_config()
    sid = run(client, pod)
    cfg = cri.container_config(TESTVM)
    cfg.linux.resources.cpu_period, cfg.linux.resources.cpu_quota = period, quota
    code, message = code_of(client.runtime.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cfg, sandbox_config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert f"config.linux.resources.{named} is {period if named == 'cpu_period' else quota};" in message, message
    wanted = "from 1000 to 1000000 µs" if named == "cpu_period" else f"from 1000 to {2**44 - 1} µs"
    assert wanted in message, message
    assert_nothing_built(vmlet, libvirt_conn)


def test_cpu_limit_defaults_and_no_limit_are_accepted(client, pulled, libvirt_conn):
    import xml.etree.ElementTree as ET
    pod = cri.pod_config()
    sid = run(client, pod)
    cfg = cri.container_config(TESTVM, log_path="")
    cfg.linux.resources.cpu_period, cfg.linux.resources.cpu_quota = 0, 50000  # period 0: the kernel's 100 ms
    cid = create(client, sid, pod, cfg)
    dom = next(d for d in libvirt_conn.listAllDomains() if d.name().endswith(cid[:32]))
    tune = ET.fromstring(dom.XMLDesc()).find("cputune")
    assert (tune.findtext("global_period"), tune.findtext("global_quota")) == ("100000", "50000")


@pytest.mark.parametrize("memory", [2**63 - 1, 2**62, 1, 64 * MIB - 1, -1])
def test_memory_limit_one_rule_with_the_range(client, pulled, vmlet, libvirt_conn, memory):
    pod = cri.pod_config()
    sid = run(client, pod)
    cfg = cri.container_config(TESTVM)
    cfg.linux.resources.memory_limit_in_bytes = memory
    code, message = code_of(client.runtime.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cfg, sandbox_config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert "config.linux.resources.memory_limit_in_bytes" in message and str(64 * MIB) in message
    assert_nothing_built(vmlet, libvirt_conn)


def test_update_resources_follows_the_same_rules(client, pulled, vmlet_dir):
    cid = start_vm(client, vmlet_dir, "hostile-update")

    def update(**resources):
        return code_of(client.runtime.UpdateContainerResources, api_pb2.UpdateContainerResourcesRequest(
            container_id=cid, linux=api_pb2.LinuxContainerResources(**resources)))

    for memory in (1, 64 * MIB - 1, 2**63 - 1, -1):
        code, message = update(memory_limit_in_bytes=memory)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (memory, message)
        assert "linux.memory_limit_in_bytes" in message and str(64 * MIB) in message
    for period, quota in ((999, 100000), (100000, 999), (1000001, 2000000)):
        code, message = update(cpu_period=period, cpu_quota=quota)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (period, quota, message)
        assert "linux.cpu_" in message
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=30).status
    assert st.resources.linux.memory_limit_in_bytes == 256 * MIB  # nothing refused was recorded


def _cpu_cases():
    cases = [
        ({"VirtletCPUModel": "NoSuchModel"}, grpc.StatusCode.FAILED_PRECONDITION, "NoSuchModel"),
        ({"VirtletLibvirtCPUSetting": "Mode: custom\nModel: qemu64\nFeatures:\n- Name: nosuchfeature\n"
                                      "  Policy: require\n"},
         grpc.StatusCode.INVALID_ARGUMENT, "nosuchfeature"),
        ({"VirtletLibvirtCPUSetting": "Mode: host-model\nFeatures:\n- Name: bogus\n  Policy: optional\n"},
         grpc.StatusCode.INVALID_ARGUMENT, "bogus"),
    ]
    if libvirt_env.DOMAIN_TYPE == "qemu":  # TCG: no host CPU to pass through, QEMU's CPUs lack AVX-512
        cases += [
            ({"VirtletCPUModel": "host-passthrough"}, grpc.StatusCode.FAILED_PRECONDITION, "host-passthrough"),
            ({"VirtletLibvirtCPUSetting": "Mode: custom\nCheck: full\nModel: qemu64\nFeatures:\n"
                                          "- Name: avx512f\n  Policy: require\n"},
             grpc.StatusCode.FAILED_PRECONDITION, "check full"),
        ]
    return cases


@pytest.mark.parametrize("annotations, code, fragment", _cpu_cases(), ids=lambda v: str(v)[:30])
def test_cpu_settings_that_can_never_start_are_refused_at_create(client, pulled, vmlet, libvirt_conn,
                                                                 annotations, code, fragment):
    pod = cri.pod_config(annotations=annotations)
    sid = run(client, pod)  # valid annotation syntax: the sandbox is fine, the host decides at CreateContainer
    got, message = code_of(client.runtime.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod))
    assert got == code, message
    assert fragment in message and next(iter(annotations)) in message
    assert_nothing_built(vmlet, libvirt_conn)


def test_cpu_settings_the_host_offers_are_created(client, pulled):
    pod = cri.pod_config(annotations={"VirtletLibvirtCPUSetting": "Mode: custom\nModel: qemu64\nFeatures:\n"
                                                                  "- Name: sse4.2\n  Policy: optional\n"})
    sid = run(client, pod)
    assert create(client, sid, pod, cri.container_config(TESTVM, log_path=""))


HUGE = "f" * 65536


def _id_calls(rt, images):
    by_container = ["ContainerStatus", "StartContainer", "StopContainer", "ContainerStats", "ReopenContainerLog",
                    "UpdateContainerResources"]
    by_sandbox = ["PodSandboxStatus", "StopPodSandbox", "PodSandboxStats", "UpdatePodSandboxResources"]
    calls = [(getattr(rt, n), getattr(api_pb2, n + "Request")(container_id=HUGE), grpc.StatusCode.NOT_FOUND)
             for n in by_container]
    calls += [(getattr(rt, n), getattr(api_pb2, n + "Request")(pod_sandbox_id=HUGE), grpc.StatusCode.NOT_FOUND)
              for n in by_sandbox]
    calls += [
        (rt.CreateContainer, api_pb2.CreateContainerRequest(pod_sandbox_id=HUGE, config=cri.container_config(TESTVM)),
         grpc.StatusCode.NOT_FOUND),
        (rt.ExecSync, api_pb2.ExecSyncRequest(container_id=HUGE, cmd=["ls"]), grpc.StatusCode.NOT_FOUND),
        (rt.Exec, api_pb2.ExecRequest(container_id=HUGE, cmd=["ls"], stdout=True), grpc.StatusCode.NOT_FOUND),
        (rt.Attach, api_pb2.AttachRequest(container_id=HUGE, stdout=True), grpc.StatusCode.NOT_FOUND),
        (rt.PortForward, api_pb2.PortForwardRequest(pod_sandbox_id=HUGE), grpc.StatusCode.NOT_FOUND),
        (rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=cri.pod_config(), runtime_handler=HUGE),
         grpc.StatusCode.INVALID_ARGUMENT),
        (rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=cri.pod_config(log_directory=HUGE)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (images.PullImage, api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=HUGE)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (images.RemoveImage, api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=HUGE)),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    return calls


def test_huge_values_are_echoed_shortened(client):
    for call, req, want in _id_calls(client.runtime, client.images):
        code, message = code_of(call, req, timeout=30)
        assert code == want, (call, code, message[:200])
        assert len(message.encode()) <= MAX_MESSAGE, (call, len(message))
        assert "message truncated" not in message, (call, "the echo was not shortened: the cap cut it")
    # Still names the value (its start) and says it was cut.
    code, message = code_of(client.runtime.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=HUGE))
    assert "container 'ffffffff" in message and "…(" in message


def test_huge_values_in_a_container_request(client, pulled):
    pod = cri.pod_config()
    sid = run(client, pod)
    cfg = cri.container_config("docker.io/" + "a" * 65536)
    code, message = code_of(client.runtime.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cfg, sandbox_config=pod))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "config.image.image" in message
    assert len(message.encode()) <= MAX_MESSAGE
