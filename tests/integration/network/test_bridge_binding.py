"""Bridge binding (the default): the VM takes over the pod's CNI address through DHCP.

Real CNI plugins (bridge + host-local from Debian), real dnsmasq, a "fake VM"
namespace on the pod's host bridge in place of libvirt's tap.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cri_shim.network import DNSSettings, NetworkError, PodNetwork, dhcp, netns
from cri_shim.network.manager import DHCP_SERVER_CIDR
from cri_shim.network.names import link_alias
from tests.support import netsupport

DNS = DNSSettings.of(servers=["10.96.0.10", "10.96.0.11"], searches=["ns1.svc.cluster.local", "svc.cluster.local"],
                     options=["ndots:5"])


def setup(nm, sid, **kw) -> PodNetwork:
    return nm.setup(sid, pod_namespace="ns1", pod_name="vm-pod", pod_uid="uid-1", dns=kw.pop("dns", DNS),
                    hostname=kw.pop("hostname", "vm-pod"), **kw)


def test_setup_wires_netns_pod_bridge_and_host_bridge_then_teardown_and_remove_leave_nothing(
        make_manager, test_network, sandbox_id):
    nm = make_manager()
    assert nm.status()[0] is True
    pn = setup(nm, sandbox_id)

    # What the shim gets (and stores: the record round-trips through JSON).
    assert pn.netns_name == f"vmlet-{sandbox_id[:16]}" and netns.exists(pn.netns_name)
    assert ipaddress.ip_address(pn.pod_ip) in test_network.subnet
    assert pn.prefixlen == 24 and pn.gateway == test_network.gateway
    assert pn.vm_ip == pn.pod_ip and pn.vm_gateway == test_network.gateway
    assert pn.host_bridge == f"vb{sandbox_id[:12]}" and pn.cni_network == test_network.name
    assert PodNetwork.from_json(pn.to_json()) == pn == nm.get(sandbox_id)
    assert test_network.allocated_ips() == [pn.pod_ip]

    # Pod netns: eth0 and vm0 in br0, eth0 without its address and without the VM's MAC.
    pod = netsupport.pod_side(sandbox_id)
    assert pod["eth0"]["master"] == "br0" and pod["vm0"]["master"] == "br0"
    assert pod["eth0"]["addrs"] == [] and pod["br0"]["addrs"] == [DHCP_SERVER_CIDR]
    assert pod["eth0"]["mac"] != pn.vm_mac
    # The VM has eth0's original MAC: the one the CNI result reported for eth0.
    cached = nm.cni.cached(sandbox_id, "eth0")
    assert cached is not None
    assert [i["mac"] for i in cached.result["interfaces"] if i["name"] == "eth0"] == [pn.vm_mac]

    # Host: the bridge (no IP, STP off, no forward delay) with the veth as its only port, tagged as ours.
    sysfs = Path("/sys/class/net") / pn.host_bridge
    assert (sysfs / "bridge/stp_state").read_text().strip() == "0"
    assert (sysfs / "bridge/forward_delay").read_text().strip() == "0"
    assert (sysfs / "ifalias").read_text().strip() == link_alias(nm.tag, sandbox_id)
    from cri_shim.network.links import bridge_ports
    assert bridge_ports(pn.host_bridge) == [pn.host_veth]

    # One dnsmasq, in the pod's netns.
    assert dhcp.running_pid(nm.pidfile(sandbox_id)) == pn.dnsmasq_pid
    assert Path(f"/proc/{pn.dnsmasq_pid}/ns/net").stat().st_ino == Path(pn.netns_path).stat().st_ino

    nm.teardown(sandbox_id)
    assert not Path(f"/sys/class/net/{pn.host_bridge}").exists()
    assert not Path(f"/sys/class/net/{pn.host_veth}").exists()
    assert dhcp.running_pid(nm.pidfile(sandbox_id)) is None
    assert test_network.allocated_ips() == []
    assert nm.cni.cached(sandbox_id, "eth0") is None
    assert netns.exists(pn.netns_name)  # RemovePodSandbox removes it
    assert netsupport.pod_side(sandbox_id).keys() == {"lo"}
    nm.teardown(sandbox_id)  # idempotent

    nm.remove(sandbox_id)
    assert not netns.exists(pn.netns_name)
    assert not (nm.records_dir / sandbox_id).exists()
    nm.remove(sandbox_id)  # idempotent
    assert netsupport.leftovers() == [f"link {test_network.bridge}"]


def test_fake_vm_gets_exactly_the_pod_lease_and_the_pod_ip_answers_from_it(
        make_manager, fake_vms, test_network, sandbox_id, tmp_path):
    nm = make_manager()
    pn = setup(nm, sandbox_id)

    stranger = fake_vms(pn.host_bridge, "52:54:00:de:ad:01")
    with pytest.raises(subprocess.CalledProcessError):  # dnsmasq serves the VM's MAC only
        stranger.dhcp(tmp_path, timeout=6, tries=2)
    stranger.close()

    vm = fake_vms(pn.host_bridge, pn.vm_mac)
    lease = vm.dhcp(tmp_path)
    assert lease["ip"] == pn.pod_ip
    assert lease["mask"] == "24" and lease["subnet"] == "255.255.255.0"
    assert lease["router"] == test_network.gateway
    assert lease["dns"].split() == ["10.96.0.10", "10.96.0.11"]
    assert lease["search"].split() == ["ns1.svc.cluster.local", "svc.cluster.local"]
    assert lease["domain"] == "ns1.svc.cluster.local"
    assert lease["hostname"] == "vm-pod"
    assert lease["mtu"] == str(pn.mtu)
    assert lease["lease"] == str(0xFFFFFFFF)  # infinite
    assert lease["staticroutes"].split() == ["0.0.0.0/0", test_network.gateway,
                                             str(test_network.extra_route), test_network.gateway]
    assert lease["serverid"] == DHCP_SERVER_CIDR.split("/")[0]

    # The VM's gateway is the CNI network's, reached over the pod's segment: the host bridge (ARP off)
    # must not answer for the host's gateway address with its own MAC.
    vm.run("busybox", "ip", "neigh", "flush", "dev", "eth0")
    vm.run("busybox", "ping", "-c", "1", "-W", "3", test_network.gateway)
    neigh = vm.run("busybox", "ip", "neigh", "show", test_network.gateway).stdout
    gateway_mac = Path(f"/sys/class/net/{test_network.bridge}/address").read_text().strip()
    assert gateway_mac in neigh.lower(), (neigh, gateway_mac)

    # The pod IP now lives in the fake VM: the host reaches it there, over TCP too.
    assert netsupport.ping(pn.pod_ip, count=2)
    vm.spawn(sys.executable, "-c", (
        "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        "s.bind(('0.0.0.0', 8080)); s.listen(1); c, a = s.accept(); c.sendall(b'vm:' + a[0].encode()); c.close()"))
    assert netsupport.wait_tcp(pn.pod_ip, 8080) == f"vm:{test_network.gateway}".encode()


def test_dns_from_the_cni_result_fills_what_the_pod_config_leaves_empty(make_manager, conf_dir, test_network,
                                                                         sandbox_id, fake_vms, tmp_path):
    conf = test_network.conflist()
    conf["plugins"][0]["dns"] = {"nameservers": ["10.96.0.53"], "search": ["from-cni.example"]}
    netsupport.write_conf(conf_dir, "10-vmlet-nettest.conflist", conf)
    nm = make_manager()
    pn = setup(nm, sandbox_id, dns=DNSSettings.of(searches=["from-pod.example"]), hostname="")
    assert pn.dns.servers == ("10.96.0.53",) and pn.dns.searches == ("from-pod.example",)
    lease = fake_vms(pn.host_bridge, pn.vm_mac).dhcp(tmp_path, configure=False)
    assert lease["dns"] == "10.96.0.53" and lease["search"] == "from-pod.example"
    assert "hostname" not in lease


def test_two_pods_get_separate_netns_bridges_and_dhcp_servers(make_manager, test_network):
    nm = make_manager()
    a = setup(nm, netsupport.new_sandbox_id())
    b = setup(nm, netsupport.new_sandbox_id())
    assert a.pod_ip != b.pod_ip and a.host_bridge != b.host_bridge and a.dnsmasq_pid != b.dnsmasq_pid
    assert sorted(test_network.allocated_ips()) == sorted([a.pod_ip, b.pod_ip])
    assert netsupport.ping(a.pod_ip, timeout=1) is False  # no VM yet: nothing answers for the pod IP
    nm.remove(a)
    assert netns.exists(b.netns_name) and dhcp.running_pid(nm.pidfile(b.sandbox_id)) == b.dnsmasq_pid
    nm.remove(b)


def test_check_passes_on_a_healthy_pod_and_names_what_is_broken(make_manager, sandbox_id):
    nm = make_manager()
    pn = setup(nm, sandbox_id)
    nm.check(pn)
    record = json.loads((nm.records_dir / sandbox_id / "record.json").read_text())
    assert record["phase"] == "ready"
    dhcp.stop(nm.pidfile(sandbox_id))
    with pytest.raises(NetworkError, match="dnsmasq is not running"):
        nm.check(sandbox_id)
