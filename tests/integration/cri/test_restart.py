"""kill -9 of the daemon at each lifecycle step, restart, and the VM and the store agree; nothing leaks.

Between RPCs the daemon is SIGKILLed from outside; inside RPCs it kills
itself at a named crashpoint (VMLET_CRASHPOINT), so each step of
CreateContainer, StartContainer, StopContainer and RemoveContainer is hit
exactly, not by a racing timer.
"""

from __future__ import annotations

import os
import sqlite3
import time

import grpc
import pytest

from cri_shim import guest_agent
from proto.runtime.v1 import api_pb2
from tests.support import cri
from tests.support.libvirt_env import RUN_PREFIX

from .conftest import TESTVM
from .test_exec import guest_agent_leftovers, wait_for_agent
from .test_lifecycle import wait_for_log

pytestmark = pytest.mark.libvirt


def domains(libvirt_conn) -> dict[str, bool]:
    return {d.name(): bool(d.isActive()) for d in libvirt_conn.listAllDomains() if d.name().startswith(RUN_PREFIX)}


def vm_dirs(vmlet) -> list[str]:
    vms = vmlet.state_dir / "vms"
    return sorted(p.name for p in vms.iterdir()) if vms.exists() else []


def image_holders(vmlet) -> list[str]:
    db = sqlite3.connect(vmlet.state_dir / "images" / "metadata.db")
    try:
        return sorted(h for (h,) in db.execute("SELECT holder FROM holders"))
    finally:
        db.close()


def run_pod(client, vmlet_dir, name="crash"):
    pod = cri.pod_config(name=name, log_directory=str(vmlet_dir / "pods" / name))
    return pod, client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id


def create(client, pod, sandbox_id) -> str:
    return client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=cri.container_config(TESTVM), sandbox_config=pod)).container_id


def status(client, container_id):
    return client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id)).status


def remove_all(client, vmlet, libvirt_conn):
    for sb in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items:
        client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sb.id))
        client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb.id))
    assert not domains(libvirt_conn)
    assert not vm_dirs(vmlet)
    assert not image_holders(vmlet)


def test_running_vm_survives_kill_and_restart_between_steps(vmlet_factory, vmlet_dir, libvirt_conn):
    vmlet = vmlet_factory()
    client = vmlet.start()
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)))
    pod, sandbox_id = run_pod(client, vmlet_dir)

    vmlet.kill()  # after RunPodSandbox
    client = vmlet.start()
    assert [s.id for s in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items] == [sandbox_id]
    container_id = create(client, pod, sandbox_id)

    vmlet.kill()  # after CreateContainer
    client = vmlet.start()
    assert status(client, container_id).state == api_pb2.CONTAINER_CREATED
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id))
    log = vmlet_dir / "pods" / "crash" / "vm" / "0.log"
    wait_for_log(log, r"stdout F VMLET-TESTVM: boot marker$", 120)
    domain = libvirt_conn.lookupByName(next(iter(domains(libvirt_conn))))
    qemu_id = domain.ID()

    vmlet.kill()  # while the VM runs
    client = vmlet.start()
    st = status(client, container_id)
    assert st.state == api_pb2.CONTAINER_RUNNING
    assert domain.ID() == qemu_id, "the VM must not have been restarted"
    # The console copier is back: later console output reaches the CRI log.
    wait_for_log(log, r"stdout F VMLET-TESTVM: ready$", 120)

    # The VM powers off while the daemon is down: the restart records the clean exit.
    vmlet.kill()
    domain.shutdownFlags(0)
    for _ in range(300):
        if not domain.isActive():
            break
        time.sleep(0.2)
    client = vmlet.start()
    st = status(client, container_id)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 0, "Completed")
    assert image_holders(vmlet) == [container_id]
    remove_all(client, vmlet, libvirt_conn)
    vmlet.stop()


@pytest.mark.parametrize("point, expect", [
    ("run.after-network", "no-sandbox"),
    ("create.after-acquire", "gone"),
    ("create.after-overlay", "gone"),
    ("create.after-disks", "gone"),
    ("create.after-define", "gone"),
    ("create.after-record", "created"),
    ("start.after-boot", "running"),
    ("stop.after-acpi", "exited"),
    ("remove.after-undefine", "removable"),
])
def test_crash_inside_an_rpc_is_reconciled_on_restart(vmlet_factory, vmlet_dir, libvirt_conn, point, expect):
    vmlet = vmlet_factory()
    client = vmlet.start()
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)))
    if point.startswith("run."):
        vmlet.stop()
        client = vmlet.start(crashpoint=point)
        netns_before = set(os.listdir("/run/netns"))
        with pytest.raises(grpc.RpcError) as e:
            run_pod(client, vmlet_dir)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and vmlet.wait_dead() == -9
        leaked = {n for n in set(os.listdir("/run/netns")) - netns_before if n.startswith("vmlet-")}
        assert leaked, "the crash should have left the new pod's netns behind"
        client = vmlet.start()
        assert not client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
        assert not leaked & set(os.listdir("/run/netns")), "recovery must sweep the unknown sandbox's network"
        vmlet.stop()
        return
    pod, sandbox_id = run_pod(client, vmlet_dir)
    container_id = None
    if point.startswith(("start.", "stop.", "remove.")):
        container_id = create(client, pod, sandbox_id)
        if not point.startswith("start."):
            client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id))
            wait_for_log(vmlet_dir / "pods" / "crash" / "vm" / "0.log", r"VMLET-TESTVM: ready$", 120)

    vmlet.stop()
    client = vmlet.start(crashpoint=point)
    with pytest.raises(grpc.RpcError) as e:
        if point.startswith("create."):
            create(client, pod, sandbox_id)
        elif point.startswith("start."):
            client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id))
        elif point.startswith("stop."):
            client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=30))
        else:
            client.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert vmlet.wait_dead() == -9

    client = vmlet.start()
    containers = client.runtime.ListContainers(api_pb2.ListContainersRequest()).containers
    if expect == "gone":
        assert not containers
        assert not domains(libvirt_conn) and not vm_dirs(vmlet) and not image_holders(vmlet)
    elif expect == "created":
        [c] = containers
        assert c.state == api_pb2.CONTAINER_CREATED
        assert list(domains(libvirt_conn).values()) == [False]
        client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=c.id))
        wait_for_log(vmlet_dir / "pods" / "crash" / "vm" / "0.log", r"VMLET-TESTVM: boot marker$", 120)
    elif expect == "running":
        assert status(client, container_id).state == api_pb2.CONTAINER_RUNNING
        assert list(domains(libvirt_conn).values()) == [True]
        wait_for_log(vmlet_dir / "pods" / "crash" / "vm" / "0.log", r"VMLET-TESTVM: boot marker$", 120)
    elif expect == "exited":
        # The guest got the power button before the crash; the stop completes (again) after restart.
        client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=60))
        st = status(client, container_id)
        assert (st.state, st.exit_code) == (api_pb2.CONTAINER_EXITED, 0)
    else:  # removable: the domain is gone but the record stays until the kubelet retries
        st = status(client, container_id)
        assert st.state == api_pb2.CONTAINER_EXITED
        client.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id))
        assert not client.runtime.ListContainers(api_pb2.ListContainersRequest()).containers
    remove_all(client, vmlet, libvirt_conn)
    vmlet.stop()


def guest_ps(domain) -> str:
    """The guest's processes, asked from the test (vmlet may be down)."""
    return guest_agent.run(domain, ["ps", "-o", "args"], timeout=30).stdout.decode()


def test_a_command_running_when_vmlet_dies_is_killed_after_the_restart(vmlet_factory, vmlet_dir, libvirt_conn):
    vmlet = vmlet_factory()
    client = vmlet.start()
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)))
    pod, sandbox_id = run_pod(client, vmlet_dir, name="exec-crash")
    container_id = create(client, pod, sandbox_id)
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id))
    wait_for_log(vmlet_dir / "pods" / "exec-crash" / "vm" / "0.log", r"VMLET-TESTVM: ready$", 240)
    domain = libvirt_conn.lookupByName(next(iter(domains(libvirt_conn))))
    records = vmlet.state_dir / "exec-inflight" / domain.name()
    wait_for_agent(domain)

    call = client.runtime.ExecSync.future(api_pb2.ExecSyncRequest(
        container_id=container_id, cmd=["sh", "-c", "sleep 4848 & sleep 4949"], timeout=600), timeout=700)
    deadline = time.monotonic() + 60
    while "sleep 4949" not in guest_ps(domain):
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.5)
    [record] = list(records.iterdir())  # the wrapper's pid, on record while it runs
    pid = int(record.name)

    vmlet.kill()
    with pytest.raises(grpc.RpcError) as e:
        call.result()
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)  # (kill closes the channel)
    ps = guest_ps(domain)
    assert "sleep 4848" in ps and "sleep 4949" in ps, "nothing kills it while vmlet is down"

    client = vmlet.start()
    deadline = time.monotonic() + 30
    while True:
        ps = guest_ps(domain)
        if "sleep 4848" not in ps and "sleep 4949" not in ps:
            break
        assert time.monotonic() < deadline, f"the command outlived the restart: {ps}"
        time.sleep(0.5)
    # Its exit was drained from qemu-ga (which keeps it until asked) and the record went.
    with pytest.raises(guest_agent.AgentCommandFailed):
        guest_agent.call(domain, "guest-exec-status", {"pid": pid})
    deadline = time.monotonic() + 10
    while list(records.iterdir()) if records.exists() else []:
        assert time.monotonic() < deadline, list(records.iterdir())
        time.sleep(0.2)
    assert guest_agent.run(domain, ["sh", "-c", guest_agent_leftovers()]).stdout == b""
    remove_all(client, vmlet, libvirt_conn)
    deadline = time.monotonic() + 10
    while records.exists():  # the VM's stop event drops its records
        assert time.monotonic() < deadline, list(records.iterdir())
        time.sleep(0.2)
    vmlet.stop()
