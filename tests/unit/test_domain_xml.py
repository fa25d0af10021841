"""domain_xml renders data into libvirt XML; no libvirt needed."""

import xml.etree.ElementTree as ET

from cri_shim.domain_xml import (CPU, CPUFeature, Disk, DomainSpec, Interface, SharedDir, build_domain_xml,
                                 read_metadata)


def spec(**overrides) -> DomainSpec:
    base = dict(name="vm-1", memory_kib=262144, vcpus=2, domain_type="qemu", uuid="0b9e2f5e-3c55-4ad9-8d3c-8b4e1c1f6a01",
                disks=[Disk("/var/lib/vmlet/root.qcow2", "vda"),
                       Disk("/var/lib/vmlet/seed.iso", "sda", bus="scsi", device="cdrom", format="raw")],
                interfaces=[Interface("ethernet", target="tap0", mac="52:54:00:00:00:01")],
                console_log="/var/log/vm.log",
                metadata={"sandbox-id": "abc", "pod-namespace": "default"})
    base.update(overrides)
    return DomainSpec(**base)


def test_renders_identity_resources_and_devices():
    root = ET.fromstring(build_domain_xml(spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vm-1"
    assert root.findtext("uuid") == "0b9e2f5e-3c55-4ad9-8d3c-8b4e1c1f6a01"
    assert root.findtext("memory") == "262144" and root.find("memory").get("unit") == "KiB"
    assert root.findtext("vcpu") == "2"
    assert root.find("features/acpi") is not None, "ACPI is needed for graceful shutdown"
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "sda"]
    assert disks[0].find("driver").get("type") == "qcow2"
    assert disks[1].get("device") == "cdrom" and disks[1].find("readonly") is not None
    assert root.find("devices/controller[@model='virtio-scsi']") is not None
    nic = root.find("devices/interface")
    assert nic.get("type") == "ethernet"
    assert nic.find("target").attrib == {"dev": "tap0", "managed": "no"}
    assert nic.find("mac").get("address") == "52:54:00:00:00:01"
    assert root.find("devices/serial/log").attrib == {"file": "/var/log/vm.log", "append": "on"}


def test_cpu_limit_becomes_a_global_quota():
    tune = ET.fromstring(build_domain_xml(spec(cpu_period_us=100000, cpu_quota_us=150000))).find("cputune")
    assert (tune.findtext("global_period"), tune.findtext("global_quota")) == ("100000", "150000")
    assert ET.fromstring(build_domain_xml(spec())).find("cputune") is None


def test_shared_dirs_are_virtiofs_with_shared_memory():
    root = ET.fromstring(build_domain_xml(spec(shared_dirs=[SharedDir("/host/a b", "vmlettag1")])))
    fs = root.find("devices/filesystem")
    assert fs.attrib == {"type": "mount", "accessmode": "passthrough"}
    assert fs.find("driver").get("type") == "virtiofs"
    assert (fs.find("source").get("dir"), fs.find("target").get("dir")) == ("/host/a b", "vmlettag1")
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    plain = ET.fromstring(build_domain_xml(spec()))
    assert plain.find("memoryBacking") is None and plain.find("devices/filesystem") is None


def test_no_scsi_controller_without_scsi_disks():
    root = ET.fromstring(build_domain_xml(spec(disks=[Disk("/x.qcow2", "vda")])))
    assert root.find("devices/controller") is None


def test_cpu_mode_follows_accelerator_and_model():
    assert ET.fromstring(build_domain_xml(spec(domain_type="kvm"))).find("cpu").get("mode") == "host-model"
    assert ET.fromstring(build_domain_xml(spec(domain_type="qemu"))).find("cpu") is None
    cpu = ET.fromstring(build_domain_xml(spec(cpu=CPU(mode="custom", model="Haswell", fallback="allow",
                                                      features=[CPUFeature("vmx", "disable")])))).find("cpu")
    assert cpu.get("mode") == "custom" and cpu.findtext("model") == "Haswell"
    assert cpu.find("model").get("fallback") == "allow"
    assert cpu.find("feature").attrib == {"name": "vmx", "policy": "disable"}
    assert ET.fromstring(build_domain_xml(spec(cpu=CPU(mode="host-passthrough")))).find("cpu").attrib \
        == {"mode": "host-passthrough"}


def test_metadata_round_trips_and_hostile_values_stay_data():
    hostile = {"pod-name": "</vm><evil attr='x'>&amp;", "sandbox-id": "abc"}
    xml = build_domain_xml(spec(name="a<b>&c", metadata=hostile))
    root = ET.fromstring(xml)
    assert root.findtext("name") == "a<b>&c"
    assert read_metadata(xml) == hostile
    assert read_metadata(build_domain_xml(spec(metadata={}))) == {}


def test_values_xml_cannot_carry_are_refused_naming_where():
    import pytest

    from cri_shim.domain_xml import UnsafeText
    for bad in ("\ufffe", "\uffff", "\x01", "\ud800"):
        with pytest.raises(UnsafeText, match="metadata pod-name contains U\\+"):
            build_domain_xml(spec(metadata={"pod-name": f"a{bad}"}))
        with pytest.raises(UnsafeText, match="<source dir=...>"):
            build_domain_xml(spec(shared_dirs=[SharedDir(f"/host/{bad}", "tag")]))
    # What XML 1.0 carries goes through and reads back unchanged.
    root = ET.fromstring(build_domain_xml(spec(metadata={"pod-name": "名前\t\U0001F600\x85"})))
    assert read_metadata(ET.tostring(root, encoding="unicode"))["pod-name"] == "名前\t\U0001F600\x85"


def test_cpu_xml_alone():
    from cri_shim.domain_xml import cpu_xml
    el = ET.fromstring(cpu_xml(CPU(mode="custom", model="qemu64", features=[CPUFeature("sse4.2", "require")])))
    assert el.tag == "cpu" and el.get("mode") == "custom" and el.findtext("model") == "qemu64"
    assert el.find("feature").attrib == {"name": "sse4.2", "policy": "require"}


def test_block_disks_slices_cache_io_and_boot_order():
    root = ET.fromstring(build_domain_xml(spec(disks=[
        Disk("/dev/loop7", "vda", source="block", format="raw", serial="root", boot_order=1,
             slice_offset=1048576, slice_size=267386880, cache="writeback", io="threads"),
        Disk("/var/lib/vmlet/vms/x/disks/data", "vdb", format="qcow2", serial="data", readonly=True,
             no_backing=True),
    ])))
    first, second = root.findall("devices/disk")
    assert first.get("type") == "block" and first.find("source").get("dev") == "/dev/loop7"
    assert first.find("source/slices/slice").attrib == {"type": "storage", "offset": "1048576", "size": "267386880"}
    assert first.find("driver").attrib == {"name": "qemu", "type": "raw", "cache": "writeback", "io": "threads"}
    assert first.find("boot").get("order") == "1"
    assert root.find("os/boot") is None, "libvirt refuses per-device boot order next to <os><boot dev>"
    assert second.get("type") == "file" and second.find("source").get("file").endswith("/disks/data")
    assert second.find("readonly") is not None and second.findtext("serial") == "data"
    assert second.find("boot") is None and second.find("driver").get("cache") == "none"
    assert second.find("backingStore") is not None and len(second.find("backingStore")) == 0
    assert first.find("backingStore") is None


def test_without_boot_order_the_domain_boots_from_the_first_disk():
    root = ET.fromstring(build_domain_xml(spec()))
    assert root.find("os/boot").get("dev") == "hd"


def test_every_domain_has_the_guest_agent_channel_without_a_socket_path():
    for s in (spec(), spec(disks=[], interfaces=[], console_log=None, metadata={})):
        channels = ET.fromstring(build_domain_xml(s)).findall("devices/channel")
        assert len(channels) == 1
        assert channels[0].get("type") == "unix"
        # libvirt picks the host socket itself (under its channel dir) when no <source> is given.
        assert channels[0].find("source") is None
        assert channels[0].find("target").attrib == {"type": "virtio", "name": "org.qemu.guest_agent.0"}
