"""The test VM image boots under the real libvirtd like any cloud image.

Driven through libvirt-python with a domain built by cri_shim.domain_xml:
boot marker and DHCP lease on the console (isolated libvirt network, no
forwarding), cloud-init data from a NoCloud and a ConfigDrive disk, and a
clean ACPI power-off.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from cri_shim import cloudinit, guest_agent
from cri_shim.domain_xml import Disk, DomainSpec, Interface, build_domain_xml, read_metadata
from tests.support import libvirt_env
from tests.support.libvirt_env import ConsoleLog

pytestmark = pytest.mark.libvirt

BOOT_TIMEOUT = 120  # TCG on a loaded 2-core machine; a normal boot takes a few seconds


def make_overlay(base: Path, vm_dir: Path) -> Path:
    overlay = vm_dir / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)],
                   check=True, timeout=60)
    return overlay


def virtual_size(image: Path) -> int:
    info = subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                          check=True, capture_output=True, text=True, timeout=60).stdout
    return json.loads(info)["virtual-size"]


def test_boots_gets_dhcp_lease_runs_user_data_and_powers_off_on_acpi(
        libvirt_conn, test_image, vm_dir, isolated_network, start_domain):
    instance_id = str(uuid.uuid4())
    seed = vm_dir / "cidata.iso"
    seed.write_bytes(cloudinit.build_iso(
        "nocloud", instance_id=instance_id, hostname="boot-test",
        user_data="#!/bin/sh\necho USER-DATA-RAN-$(hostname)\n"))
    mac = "52:54:00:%02x:%02x:%02x" % tuple(uuid.uuid4().bytes[:3])
    name = libvirt_env.unique_name("vm")
    spec = DomainSpec(
        name=name, memory_kib=256 * 1024, vcpus=1, domain_type=libvirt_env.DOMAIN_TYPE,
        disks=[Disk(str(make_overlay(test_image, vm_dir)), "vda"),
               Disk(str(seed), "sda", bus="scsi", device="cdrom", format="raw")],
        interfaces=[Interface("network", source=isolated_network.name, mac=mac)],
        console_log=str(vm_dir / "console.log"),
        metadata={"sandbox-id": "sb-1", "pod-name": "boot-test"},
    )
    dom = start_domain(build_domain_xml(spec))
    assert read_metadata(dom.XMLDesc()) == {"sandbox-id": "sb-1", "pod-name": "boot-test"}

    console = ConsoleLog(vm_dir / "console.log")
    console.wait_for(r"^VMLET-TESTVM: boot marker", BOOT_TIMEOUT, dom)
    assert "console=ttyS0" in console.wait_for(r"^VMLET-TESTVM: cmdline (.*)$", 10, dom).group(1)

    # DHCP: the guest prints the address it got; libvirt's dnsmasq has the same lease.
    m = console.wait_for(r"^VMLET-TESTVM: ip eth0 ([\d.]+)/(\d+)", BOOT_TIMEOUT, dom)
    guest_ip = ipaddress.ip_address(m.group(1))
    assert guest_ip in isolated_network.subnet
    assert int(m.group(2)) == isolated_network.subnet.prefixlen
    # libvirt learns the lease from dnsmasq's lease helper, a moment after the guest has its address.
    deadline = time.monotonic() + 15
    while True:
        leases = libvirt_conn.networkLookupByName(isolated_network.name).DHCPLeases()
        if any(l["mac"] == mac and l["ipaddr"] == str(guest_ip) for l in leases) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any(l["mac"] == mac and l["ipaddr"] == str(guest_ip) for l in leases), leases

    # Cloud-init data from the NoCloud disk.
    assert console.wait_for(r"^VMLET-TESTVM: datasource (\S+)", 30, dom).group(1) == "nocloud"
    assert console.wait_for(r"^VMLET-TESTVM: instance-id (\S+)", 5, dom).group(1) == instance_id
    assert console.wait_for(r"^VMLET-TESTVM: hostname (\S+)", 5, dom).group(1) == "boot-test"
    console.wait_for(r"^USER-DATA-RAN-boot-test", 30, dom)
    console.wait_for(r"^VMLET-TESTVM: ready", 60, dom)

    # The guest agent is up on its virtio-serial port (found by name, no udev) and answers through libvirt.
    assert console.wait_for(r"^VMLET-TESTVM: qemu-ga (\S+)", 5, dom).group(1).startswith("vport")
    guest_agent.ping(dom)
    assert guest_agent.os_info(dom)["id"] == "vmlet-testvm"
    assert guest_agent.host_name(dom) == "boot-test"

    # ACPI power button -> the guest powers itself off; libvirt records a clean shutdown.
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    assert libvirt_env.wait_inactive(dom, 60), "guest ignored the ACPI power button:\n" + console.text()[-2000:]
    state, reason = dom.state()
    assert state == libvirt.VIR_DOMAIN_SHUTOFF
    assert reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, f"shut off for reason {reason}, not a guest shutdown"
    assert "VMLET-TESTVM: acpi poweroff" in console.text()


def test_configdrive_on_a_virtio_disk(test_image, vm_dir, start_domain):
    instance_id = str(uuid.uuid4())
    seed = vm_dir / "config-2.iso"
    seed.write_bytes(cloudinit.build_iso("configdrive", instance_id=instance_id, hostname="cd-test",
                                         user_data="#!/bin/sh\necho CONFIGDRIVE-USER-DATA\n"))
    spec = DomainSpec(
        name=libvirt_env.unique_name("vm"), memory_kib=256 * 1024, vcpus=1,
        domain_type=libvirt_env.DOMAIN_TYPE,
        disks=[Disk(str(make_overlay(test_image, vm_dir)), "vda"),
               Disk(str(seed), "vdb", format="raw", readonly=True)],
        console_log=str(vm_dir / "console.log"),
    )
    dom = start_domain(build_domain_xml(spec))
    console = ConsoleLog(vm_dir / "console.log")
    assert console.wait_for(r"^VMLET-TESTVM: datasource (\S+)", BOOT_TIMEOUT, dom).group(1) == "configdrive"
    assert console.wait_for(r"^VMLET-TESTVM: instance-id (\S+)", 5, dom).group(1) == instance_id
    assert console.wait_for(r"^VMLET-TESTVM: hostname (\S+)", 5, dom).group(1) == "cd-test"
    console.wait_for(r"^CONFIGDRIVE-USER-DATA", 30, dom)
    # The root disk is visible with its virtual size (later: VirtletRootVolumeSize).
    m = console.wait_for(r"^VMLET-TESTVM: disk vda (\d+)", 5, dom)
    assert int(m.group(1)) == virtual_size(test_image)
