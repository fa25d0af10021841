"""End to end through libvirt: the test VM, on the pod's host bridge, boots with the pod IP.

The domain's NIC is `<interface type='bridge'><source bridge='vb…'/>` with the VM MAC
from the PodNetwork: libvirtd (host netns) creates the tap itself, the VM's DHCP
request crosses the veth into the pod netns, where the pod's dnsmasq answers with the
CNI address; then the host reaches the VM on the pod IP.
"""

from __future__ import annotations

import subprocess

import pytest

from cri_shim import cloudinit
from cri_shim.domain_xml import Disk, DomainSpec, Interface, build_domain_xml
from cri_shim.network import DNSSettings, links
from tests.support import netsupport
from tests.support import libvirt_env
from tests.support.libvirt_env import ConsoleLog

pytestmark = pytest.mark.libvirt

BOOT_TIMEOUT = 120


def test_vm_on_the_host_bridge_gets_the_pod_ip_and_answers_on_it(
        make_manager, test_network, sandbox_id, test_image, vm_dir, start_domain):
    nm = make_manager()
    pn = nm.setup(sandbox_id, pod_namespace="ns1", pod_name="libvirt-pod", pod_uid="uid-5",
                  dns=DNSSettings.of(["10.96.0.10"], ["ns1.svc.cluster.local"]), hostname="libvirt-pod")

    seed = vm_dir / "cidata.iso"
    seed.write_bytes(cloudinit.build_iso("nocloud", instance_id=sandbox_id, hostname="libvirt-pod"))
    overlay = vm_dir / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(test_image), str(overlay)],
                   check=True, timeout=60)
    spec = DomainSpec(
        name=libvirt_env.unique_name("vm"), memory_kib=256 * 1024, vcpus=1, domain_type=libvirt_env.DOMAIN_TYPE,
        disks=[Disk(str(overlay), "vda"), Disk(str(seed), "sda", bus="scsi", device="cdrom", format="raw")],
        interfaces=[Interface("bridge", source=pn.host_bridge, mac=pn.vm_mac)],
        console_log=str(vm_dir / "console.log"))
    dom = start_domain(build_domain_xml(spec))
    tap = [p for p in links.bridge_ports(pn.host_bridge) if p != pn.host_veth]
    assert len(tap) == 1, f"libvirt did not put a tap into {pn.host_bridge}: {links.bridge_ports(pn.host_bridge)}"

    console = ConsoleLog(vm_dir / "console.log")
    m = console.wait_for(r"^VMLET-TESTVM: ip eth0 ([\d.]+)/(\d+)", BOOT_TIMEOUT, dom)
    assert (m.group(1), int(m.group(2))) == (pn.pod_ip, pn.prefixlen)
    assert console.wait_for(r"^VMLET-TESTVM: gateway eth0 (\S+)", 10, dom).group(1) == test_network.gateway
    assert console.wait_for(r"^VMLET-TESTVM: dns (\S+)", 10, dom).group(1) == "10.96.0.10"
    assert netsupport.ping(pn.pod_ip, count=3, timeout=2), "the VM does not answer on the pod IP"

    libvirt_env.remove_domain(dom)  # the tap goes with the domain; then the pod network
    assert links.bridge_ports(pn.host_bridge) == [pn.host_veth]
    nm.remove(pn)
