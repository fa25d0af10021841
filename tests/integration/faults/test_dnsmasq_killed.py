"""dnsmasq killed under a running VM: vmlet restarts it while it runs (noticed at the kubelet's next Status
poll), and the lease is still right: the guest, rebooted, asks for an address again and gets the pod's IP."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from cri_shim.network import dhcp
from proto.runtime.v1 import api_pb2
from tests.support import cri

from .conftest import RPC_SLACK, TESTVM, wait_until

pytestmark = pytest.mark.libvirt

BOOT_TIMEOUT = 180


def log_text(path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_killed_dnsmasq_is_restarted_while_vmlet_runs_and_the_guest_gets_its_ip_again(
        client, pulled, vmlet, vmlet_dir, libvirt_conn):
    pod = cri.pod_config(name="dhcp", log_directory=str(vmlet_dir / "pods" / "dhcp"))
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=RPC_SLACK).pod_sandbox_id
    cid = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod), timeout=RPC_SLACK).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=RPC_SLACK)
    console = vmlet_dir / "pods" / "dhcp" / "vm" / "0.log"
    pod_ip = client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                             timeout=RPC_SLACK).status.network.ip
    ip_line = re.compile(rf"stdout F VMLET-TESTVM: ip eth0 {re.escape(pod_ip)}/\d+$", re.MULTILINE)
    wait_until(lambda: "VMLET-TESTVM: ready" in log_text(console), BOOT_TIMEOUT, "the guest to boot")
    assert len(ip_line.findall(log_text(console))) == 1, log_text(console)[-3000:]

    pidfile = str(vmlet.state_dir / "network" / sid / "dnsmasq.pid")
    old = dhcp.running_pid(pidfile)
    assert old, "the pod has no dnsmasq"
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: dhcp.running_pid(pidfile) != old, 10, "dnsmasq to die")

    def restarted():
        client.runtime.Status(api_pb2.StatusRequest(), timeout=RPC_SLACK)  # the kubelet's periodic poll
        return dhcp.running_pid(pidfile)

    new = wait_until(restarted, 30, "vmlet to restart the pod's dnsmasq", interval=1)
    assert new != old

    # The guest's lease is infinite, so it would never ask again: reboot it to make it.
    dom = next(d for d in libvirt_conn.listAllDomains() if d.name().endswith(cid[:32]))
    boots = log_text(console).count("VMLET-TESTVM: boot marker")
    dom.reset(0)
    wait_until(lambda: log_text(console).count("VMLET-TESTVM: ready") >= 2
               and log_text(console).count("VMLET-TESTVM: boot marker") > boots, BOOT_TIMEOUT,
               "the guest to boot again")
    text = log_text(console)
    assert len(ip_line.findall(text)) == 2, f"the guest did not get {pod_ip} again:\n" + text[-3000:]
    assert "dhcp-failed" not in text
    assert dhcp.running_pid(pidfile) == new
    st = client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    assert (st.status.state, st.status.network.ip) == (api_pb2.SANDBOX_READY, pod_ip)
    cst = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=RPC_SLACK)
    assert cst.status.state == api_pb2.CONTAINER_RUNNING
