"""Masquerade binding: the VM gets 10.0.2.2 behind NAT; the pod IP answers for it on every port."""

from __future__ import annotations

import subprocess
import sys

from cri_shim.network import DNSSettings, binding_from_annotations, netns
from cri_shim.network import masquerade
from tests.support import netsupport


def test_vm_gets_the_private_address_and_the_pod_ip_forwards_to_it(make_manager, fake_vms, test_network,
                                                                    sandbox_id, tmp_path):
    nm = make_manager()
    binding = binding_from_annotations({"vmlet.dev/network-binding": "masquerade"})
    pn = nm.setup(sandbox_id, pod_namespace="ns1", pod_name="nat-pod", pod_uid="uid-2", binding=binding,
                  dns=DNSSettings.of(["10.96.0.10"], ["ns1.svc.cluster.local"]), hostname="nat-pod")
    assert pn.binding == "masquerade" and pn.vm_ip == "10.0.2.2" and pn.vm_gateway == "10.0.2.1"
    assert pn.gateway == test_network.gateway  # the pod's own default gateway

    pod = netsupport.pod_side(sandbox_id)
    assert pod["eth0"]["addrs"] == [f"{pn.pod_ip}/24"] and pod["eth0"]["master"] is None
    assert pod["br0"]["addrs"] == ["10.0.2.1/24"] and pod["vm0"]["master"] == "br0"
    assert netns.run_in(pn.netns_path, netns.read_sysctl, "net/ipv4/ip_forward") == "1"
    assert netns.read_sysctl("net/ipv6/conf/" + pn.host_bridge + "/disable_ipv6") == "1"
    assert masquerade.present(pn.netns_path)

    vm = fake_vms(pn.host_bridge, pn.vm_mac)
    lease = vm.dhcp(tmp_path)
    assert (lease["ip"], lease["mask"], lease["router"]) == ("10.0.2.2", "24", "10.0.2.1")
    assert lease["dns"] == "10.96.0.10" and lease["search"] == "ns1.svc.cluster.local"
    assert lease["hostname"] == "nat-pod" and "staticroutes" not in lease

    # Any port of the pod IP reaches the VM (DNAT); the VM sees the client's real address.
    for port in (8080, 22):
        vm.spawn(sys.executable, "-c", (
            "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
            f"s.bind(('10.0.2.2', {port})); s.listen(1); c, a = s.accept();"
            "c.sendall(b'vm:' + a[0].encode()); c.close()"))
        assert netsupport.wait_tcp(pn.pod_ip, port) == f"vm:{test_network.gateway}".encode()
    assert netsupport.ping(pn.pod_ip)  # ICMP: answered by the pod netns itself

    # The VM reaches the pod network, masqueraded as the pod IP (the host sees the pod IP).
    listener = subprocess.Popen([sys.executable, "-c", (
        "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        f"s.bind(('{test_network.gateway}', 0)); s.listen(1); print(s.getsockname()[1], flush=True);"
        "s.settimeout(15); c, a = s.accept(); c.sendall(a[0].encode()); c.close()")],
        stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        out = vm.run(sys.executable, "-c", (
            f"import socket; s=socket.create_connection(('{test_network.gateway}', {port}), timeout=5);"
            "print(s.recv(100).decode())"))
        assert out.stdout.strip() == pn.pod_ip
    finally:
        listener.kill()
        listener.wait()

    nm.remove(sandbox_id)
    assert not netns.exists(pn.netns_name) and test_network.allocated_ips() == []
