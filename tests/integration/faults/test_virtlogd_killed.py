"""virtlogd killed under a running VM (libvirt logs every VM's console through it).

What vmlet can and cannot do: the running VM keeps running and stays manageable; Status says that virtlogd is
gone (VirtlogdReady, informational: a NotReady node would have its pods evicted); a VM started meanwhile fails
at StartContainer with a clear FAILED_PRECONDITION naming virtlogd's socket (never a stuck call). Who restarts
virtlogd: the host's service manager (systemd socket-activates it; here the test plays that part), not vmlet.
Once it is back, new VMs start and their consoles reach the CRI log again. The VM that ran through the outage
has lost its console log for good: QEMU's log pipe went with the old virtlogd and libvirt never reopens it
(restart virtlogd with SIGUSR1, which re-executes it keeping its pipes, never by killing it).
"""

from __future__ import annotations

import signal

import grpc
import pytest

from proto.runtime.v1 import api_pb2

from .conftest import (RPC_SLACK, VIRTLOGD_PID, VIRTLOGD_SOCK, boot_vm, conditions, container_state, create_vm,
                       start_daemon, stop_daemon, virtlogd_answers, wait_until)

pytestmark = pytest.mark.libvirt


def test_virtlogd_killed_under_a_running_vm(host_daemons, client, pulled, vmlet_dir, libvirt_conn):
    assert conditions(client)["VirtlogdReady"].status is True
    _, running, _ = boot_vm(client, vmlet_dir, "through")
    stop_daemon(VIRTLOGD_PID, signal.SIGKILL)

    down = conditions(client)["VirtlogdReady"]
    assert (down.status, down.reason) == (False, "VirtlogdUnavailable") and str(VIRTLOGD_SOCK) in down.message, down
    assert conditions(client)["RuntimeReady"].status is True
    assert container_state(client, running).state == api_pb2.CONTAINER_RUNNING

    _, refused, _ = create_vm(client, vmlet_dir, "meanwhile")
    with pytest.raises(grpc.RpcError) as exc:
        client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=refused), timeout=RPC_SLACK)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.value
    assert "virtlogd" in exc.value.details(), exc.value.details()
    st = container_state(client, refused)
    assert (st.state, st.reason) == (api_pb2.CONTAINER_EXITED, "StartError")
    client.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=refused), timeout=RPC_SLACK)

    start_daemon("/usr/sbin/virtlogd")  # the service manager's part
    wait_until(virtlogd_answers, 30, "virtlogd to accept connections")
    assert conditions(client)["VirtlogdReady"].status is True
    _, after, _ = boot_vm(client, vmlet_dir, "after")  # its console reaches the CRI log: boot_vm waits for it
    assert container_state(client, running).state == api_pb2.CONTAINER_RUNNING

    for cid in (running, after):
        client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=RPC_SLACK)
        st = container_state(client, cid)
        assert st.state == api_pb2.CONTAINER_EXITED, st
