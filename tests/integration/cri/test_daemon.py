"""The vmlet daemon itself: socket mode, JSON logs, graceful shutdown that leaves VMs running."""

from __future__ import annotations

import json
import stat

import pytest

from proto.runtime.v1 import api_pb2

from .test_exits import domain_of, start_vm

pytestmark = pytest.mark.libvirt


def test_sigterm_leaves_vms_running_and_json_logs(vmlet_factory, vmlet_dir, libvirt_conn):
    vmlet = vmlet_factory(log_format="json")
    client = vmlet.start()
    assert stat.S_IMODE(vmlet.socket.stat().st_mode) == 0o660
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="virtlet.cloud/testvm")))
    cid = start_vm(client, vmlet_dir, "graceful")
    dom = domain_of(libvirt_conn, cid)
    qemu_id = dom.ID()

    vmlet.stop()  # SIGTERM
    assert vmlet.wait_dead() == 0
    assert dom.isActive() and dom.ID() == qemu_id, "a graceful shutdown of vmlet must not touch the VMs"
    assert not vmlet.socket.exists()

    client = vmlet.start()
    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid)).status
    assert st.state == api_pb2.CONTAINER_RUNNING

    entries = [json.loads(line) for line in vmlet.log().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)
    assert any("serving the CRI" in e["msg"] for e in entries)
    assert any("shutting down; VMs keep running" in e["msg"] for e in entries)
