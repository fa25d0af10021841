"""libvirtd restarted under running VMs: the VMs keep running, vmlet reconnects by itself, status/stop/remove
work, a guest powering off after the restart is recorded as EXITED from lifecycle events (ListContainers only
reads what events recorded), and a new VM starts.

libvirtd is shared by everything on the machine: the restart is done the way deploy/setup-host.sh starts it
(`libvirtd -d`, no systemd), and the test waits until it answers again.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from proto.runtime.v1 import api_pb2

from .conftest import RPC_SLACK, boot_vm, conditions, container_state, create_vm, restart_libvirtd, wait_until

pytestmark = pytest.mark.libvirt


def qemu_pid_of(domain: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())


def domain_of(libvirt_conn, cid):
    return next(d for d in libvirt_conn.listAllDomains() if d.name().endswith(cid[:32]))


def listed_exited(client, cid) -> bool:
    flt = api_pb2.ContainerFilter(id=cid, state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED))
    return bool(client.runtime.ListContainers(api_pb2.ListContainersRequest(filter=flt), timeout=RPC_SLACK).containers)


def test_libvirtd_restart_under_running_vms(host_daemons, client, pulled, vmlet, vmlet_dir, libvirt_conn):
    sid, cid, _ = boot_vm(client, vmlet_dir, "survivor")
    dom = domain_of(libvirt_conn, cid)
    domain_id, qemu_pid = dom.ID(), qemu_pid_of(dom.name())
    restart_libvirtd()

    dom = domain_of(libvirt_conn, cid)  # the test's own connection reconnects too
    assert dom.isActive() and (dom.ID(), qemu_pid_of(dom.name())) == (domain_id, qemu_pid), \
        "the VM did not survive the libvirtd restart"
    assert Path(f"/proc/{qemu_pid}").exists()

    # The guest powers off by itself right after the restart, before any CRI call could make vmlet touch
    # libvirt (ListContainers reads only what events recorded): vmlet must have reconnected on its own.
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    wait_until(lambda: listed_exited(client, cid), 60, "the powered-off VM to be listed EXITED")
    st = container_state(client, cid)
    assert (st.exit_code, st.reason) == (0, "Completed"), st
    assert conditions(client)["RuntimeReady"].status is True

    # A new VM after the restart: define and start work on the new connection.
    _, new, _ = create_vm(client, vmlet_dir, "newcomer")
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=new), timeout=RPC_SLACK)
    assert container_state(client, new).state == api_pb2.CONTAINER_RUNNING
    client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=new, timeout=0), timeout=RPC_SLACK)
    assert container_state(client, new).state == api_pb2.CONTAINER_EXITED
    for c in (cid, new):
        client.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=c), timeout=RPC_SLACK)
    client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    assert not any(d.name().endswith(c[:32]) for d in libvirt_conn.listAllDomains() for c in (cid, new))
