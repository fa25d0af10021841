"""VM pods on the pod network, end to end: CNI (Debian's bridge + host-local), dnsmasq, libvirt, the guest.

The guests print the addresses they leased; they must be the pod IPs the CRI
reports. The host reaches each VM at its pod IP, VMs reach each other, a
masquerade-bound VM answers on its pod IP, and nothing of the network is left
after the pods are removed. All traffic stays between this host's own
namespaces and bridges.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import urllib.request

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri, netsupport

from .conftest import TESTVM
from .test_lifecycle import wait_for_log

pytestmark = pytest.mark.libvirt


def run_vm(client, vmlet_dir, name, script="", annotations=None):
    ann = dict(annotations or {})
    if script:
        ann["VirtletCloudInitUserDataScript"] = "#!/bin/sh\n" + script
    pod = cri.pod_config(name=name, log_directory=str(vmlet_dir / "pods" / name), annotations=ann)
    pod.dns_config.servers.append("10.214.255.53")
    pod.dns_config.searches.append("vmlet.test")
    rt = client.runtime
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod)).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    ip = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid)).status.network.ip
    return sid, ip, vmlet_dir / "pods" / name / "vm" / "0.log"


def network_leftovers(sandbox_ids: list[str]) -> list[str]:
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    links = set(os.listdir("/sys/class/net"))
    procs = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    left = []
    for sid in sandbox_ids:
        left += [f"netns {n}" for n in netns if sid[:16] in n]
        left += [f"link {l}" for l in links if sid[:12] in l]
        left += [f"process {p}" for p in procs.splitlines() if "dnsmasq" in p and sid[:12] in p]
    return left


def test_vm_pods_get_their_pod_ips_and_reach_each_other(client, pulled, vmlet_dir, test_network):
    conditions = {c.type: c for c in client.runtime.Status(api_pb2.StatusRequest()).status.conditions}
    assert conditions["NetworkReady"].status is True, conditions["NetworkReady"]

    prefix = test_network.subnet.prefixlen
    sid1, ip1, log1 = run_vm(client, vmlet_dir, "net-a")
    wait_for_log(log1, rf"stdout F VMLET-TESTVM: ip eth0 {ip1}/{prefix}$", 120)  # up before its peer pings it
    sid2, ip2, log2 = run_vm(client, vmlet_dir, "net-b", script=(
        f"for i in $(seq 1 30); do ping -c 1 -W 2 {ip1} >/dev/null && echo PING-PEER-OK && exit 0; done\n"
        "echo PING-PEER-FAILED\n"))
    for ip, log in ((ip1, log1), (ip2, log2)):
        assert ipaddress.ip_address(ip) in test_network.subnet
        wait_for_log(log, rf"stdout F VMLET-TESTVM: ip eth0 {ip}/{prefix}$", 120)
        wait_for_log(log, rf"stdout F VMLET-TESTVM: gateway eth0 {test_network.gateway}$", 10)
        wait_for_log(log, r"stdout F VMLET-TESTVM: dns 10.214.255.53$", 10)
    assert ip1 != ip2
    # The host reaches each VM at its pod IP; the second VM reached the first.
    for ip in (ip1, ip2):
        assert netsupport.ping(ip, count=3), f"no answer from the VM at {ip}"
    wait_for_log(log2, r"stdout F PING-PEER-OK$", 60)

    for sid in (sid1, sid2):
        client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid))
        assert not netsupport.ping(ip1 if sid == sid1 else ip2, count=1, timeout=1)
        client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert not network_leftovers([sid1, sid2])
    assert not test_network.allocated_ips()


def test_masquerade_binding_answers_on_the_pod_ip(client, pulled, vmlet_dir, test_network):
    sid, ip, log = run_vm(client, vmlet_dir, "masq", annotations={"vmlet.dev/network-binding": "masquerade"},
                          script="mkdir -p /www && echo VM-HTTP-OK > /www/index.html && httpd -p 8080 -h /www\n")
    # The guest sits on the internal segment; the pod IP is NATed to it.
    wait_for_log(log, r"stdout F VMLET-TESTVM: ip eth0 10\.0\.2\.2/24$", 120)
    wait_for_log(log, r"stdout F VMLET-TESTVM: ready$", 60)
    body = urllib.request.urlopen(f"http://{ip}:8080/", timeout=10).read()
    assert body.strip() == b"VM-HTTP-OK"
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert not network_leftovers([sid])


def test_broken_cni_config_fails_run_pod_sandbox_and_rolls_back(client, vmlet_dir, cni_conf_dir, test_network):
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    netsupport.write_conf(cni_conf_dir, "10-vmlet-test.conflist", test_network.conflist(
        extra_plugins=[{"type": "no-such-plugin"}]))
    with pytest.raises(grpc.RpcError) as e:
        client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cri.pod_config(name="broken")))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no-such-plugin" in e.value.details()
    assert not client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    assert not test_network.allocated_ips()
    netns_after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not {n for n in netns_after - netns_before if n.startswith("vmlet-")}
