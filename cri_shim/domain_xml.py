"""libvirt domain XML, built from data with ElementTree.

Pure: no libvirt calls, no file access. The runtime describes a VM as a
`DomainSpec`; `build_domain_xml` renders it. Everything vmlet needs to rebuild
its state from libvirt alone (sandbox/container IDs, pod identity) goes into
the domain's `<metadata>` under vmlet's own XML namespace, so a domain
definition is self-describing (another node can take it over).
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

METADATA_NS = "https://vmlet.dev/xmlns/libvirt/domain/1.0"
METADATA_PREFIX = "vmlet"

# Characters outside XML 1.0's Char production: C0 controls but tab/LF/CR, lone surrogates, U+FFFE, U+FFFF.
# ElementTree writes them as they are and libvirt then refuses the whole document.
XML_UNSAFE_RE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

DomainType = Literal["kvm", "qemu"]

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


class UnsafeText(ValueError):
    """A value the domain XML cannot carry (names where it would go)."""

DiskBus = Literal["virtio", "scsi", "ide", "sata"]


@dataclass(frozen=True)
class Disk:
    """A disk or CD-ROM backed by a file (`source="file"`) or a host block device (`"block"`).

    `slice_offset`/`slice_size`: the guest sees only that byte range of a raw source (libvirt's
    storage slice; vmlet keeps its persistent-root header in front of it). `boot_order`: per-device
    boot order; once any disk has one, the domain boots by device order only (libvirt refuses a
    mix with <os><boot dev=...>).
    """

    path: str
    target: str  # guest device name, e.g. "vda", "sda", "hdc"
    bus: DiskBus = "virtio"
    device: Literal["disk", "cdrom"] = "disk"
    format: Literal["qcow2", "raw"] = "qcow2"
    readonly: bool = False
    serial: str | None = None
    source: Literal["file", "block"] = "file"
    cache: str | None = None  # None: none for disks, unsafe for CD-ROMs
    io: str | None = None  # None: libvirt's default
    boot_order: int | None = None
    slice_offset: int | None = None
    slice_size: int | None = None
    # An empty <backingStore/>: QEMU opens no backing file whatever the image's header says by then
    # (a qcow2 disk.img on a volume another pod can rewrite; vmlet's own disks never have one).
    no_backing: bool = False


@dataclass(frozen=True)
class Interface:
    """A NIC. `kind` follows libvirt's interface types.

    network:  `source` is a libvirt network name.
    bridge:   `source` is a host bridge.
    ethernet: `target` is an existing tap device (managed="no").
    """

    kind: Literal["network", "bridge", "ethernet"]
    source: str | None = None
    mac: str | None = None
    model: str = "virtio"
    target: str | None = None


@dataclass(frozen=True)
class SharedDir:
    """A host directory shared with the guest over virtio-fs; the guest mounts it by `tag`.

    libvirt starts one virtiofsd per share. virtiofsd cannot refuse writes
    itself, so a read-only share's `source` must already be read-only on the
    host (vmlet shares a read-only bind mount; see cri_shim/storage/pod_volumes.py).
    """

    source: str
    tag: str


@dataclass(frozen=True)
class CPUFeature:
    name: str
    policy: str | None = None  # force | require | optional | disable | forbid


@dataclass(frozen=True)
class CPU:
    """libvirt `<cpu>`; None fields are left out."""

    mode: str | None = None  # host-model | host-passthrough | custom | maximum
    match: str | None = None
    check: str | None = None
    model: str | None = None
    fallback: str | None = None
    features: Sequence[CPUFeature] = ()


@dataclass(frozen=True)
class DomainSpec:
    name: str
    memory_kib: int
    vcpus: int
    domain_type: DomainType = "kvm"
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    disks: Sequence[Disk] = ()
    interfaces: Sequence[Interface] = ()
    shared_dirs: Sequence[SharedDir] = ()
    # The serial console is a pty (so `virsh console` works) whose output
    # virtlogd also appends to this file; virtlogd keeps writing across
    # libvirtd and vmlet restarts.
    console_log: str | None = None
    cpu: CPU | None = None  # None: host-model under KVM, QEMU's default under TCG
    # The pod's CPU limit as a CFS quota for the whole VM (all vCPUs and QEMU's own threads).
    cpu_period_us: int = 0
    cpu_quota_us: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)


def _checked(value: str, where: str) -> str:
    bad = XML_UNSAFE_RE.search(value)
    if bad:
        raise UnsafeText(f"{where} contains U+{ord(bad.group()):04X} at position {bad.start()}, "
                         "which XML 1.0 cannot carry")
    return value


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: _checked(v, f"<{tag} {k}=...>") for k, v in attrs.items()})
    if text is not None:
        el.text = _checked(text, f"<{tag}>")
    return el


def _disk(devices: ET.Element, disk: Disk) -> None:
    el = _sub(devices, "disk", type=disk.source, device=disk.device)
    driver = {"name": "qemu", "type": disk.format,
              "cache": disk.cache or ("none" if disk.device == "disk" else "unsafe")}
    if disk.io:
        driver["io"] = disk.io
    _sub(el, "driver", **driver)
    source = _sub(el, "source", **({"dev": disk.path} if disk.source == "block" else {"file": disk.path}))
    if disk.slice_offset is not None:
        bounds = {"offset": str(disk.slice_offset)}
        if disk.slice_size is not None:
            bounds["size"] = str(disk.slice_size)
        _sub(_sub(source, "slices"), "slice", type="storage", **bounds)
    if disk.no_backing:
        _sub(el, "backingStore")
    _sub(el, "target", dev=disk.target, bus=disk.bus)
    if disk.readonly or disk.device == "cdrom":
        _sub(el, "readonly")
    if disk.serial:
        _sub(el, "serial", disk.serial)
    if disk.boot_order is not None:
        _sub(el, "boot", order=str(disk.boot_order))


def _interface(devices: ET.Element, nic: Interface) -> None:
    el = _sub(devices, "interface", type=nic.kind)
    if nic.mac:
        _sub(el, "mac", address=nic.mac)
    if nic.kind == "network":
        _sub(el, "source", network=nic.source or "default")
    elif nic.kind == "bridge":
        _sub(el, "source", bridge=nic.source or "")
    if nic.target:
        attrs = {"dev": nic.target}
        if nic.kind == "ethernet":
            attrs["managed"] = "no"
        _sub(el, "target", **attrs)
    _sub(el, "model", type=nic.model)


def _shared_dir(devices: ET.Element, share: SharedDir) -> None:
    el = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
    _sub(el, "driver", type="virtiofs", queue="1024")
    _sub(el, "source", dir=share.source)
    _sub(el, "target", dir=share.tag)


def _cpu(dom: ET.Element, cpu: CPU) -> None:
    attrs = {k: v for k, v in (("mode", cpu.mode), ("match", cpu.match), ("check", cpu.check)) if v}
    el = _sub(dom, "cpu", **attrs)
    if cpu.model:
        model_attrs = {"fallback": cpu.fallback} if cpu.fallback else {}
        _sub(el, "model", cpu.model, **model_attrs)
    for feature in cpu.features:
        _sub(el, "feature", name=feature.name, **({"policy": feature.policy} if feature.policy else {}))


def cpu_xml(cpu: CPU) -> str:
    """The `<cpu>` element alone (what libvirt's CPU comparison APIs take)."""
    holder = ET.Element("domain")
    _cpu(holder, cpu)
    return ET.tostring(holder[0], encoding="unicode")


def build_domain_xml(spec: DomainSpec) -> str:
    """The domain definition; UnsafeText when a value cannot be written as XML 1.0."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    dom = ET.Element("domain", {"type": spec.domain_type})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    if spec.metadata:
        md = ET.SubElement(_sub(dom, "metadata"), f"{{{METADATA_NS}}}vm")
        for key, value in spec.metadata.items():
            ET.SubElement(md, f"{{{METADATA_NS}}}{key}").text = _checked(value, f"metadata {key}")
    _sub(dom, "memory", str(spec.memory_kib), unit="KiB")
    _sub(dom, "currentMemory", str(spec.memory_kib), unit="KiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    if spec.cpu_quota_us > 0 and spec.cpu_period_us > 0:
        tune = _sub(dom, "cputune")
        _sub(tune, "global_period", str(spec.cpu_period_us))
        _sub(tune, "global_quota", str(spec.cpu_quota_us))
    if spec.shared_dirs:
        # vhost-user (virtiofsd) maps the guest's RAM: it must be shareable.
        backing = _sub(dom, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    if not any(d.boot_order is not None for d in spec.disks):
        _sub(os_el, "boot", dev="hd")

    features = _sub(dom, "features")
    _sub(features, "acpi")  # ACPI power button: graceful shutdown
    _sub(features, "apic")

    if spec.cpu is not None:
        _cpu(dom, spec.cpu)
    elif spec.domain_type == "kvm":
        _sub(dom, "cpu", mode="host-model")

    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for disk in spec.disks:
        _disk(devices, disk)
    if any(d.bus == "scsi" for d in spec.disks):
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for nic in spec.interfaces:
        _interface(devices, nic)
    for share in spec.shared_dirs:
        _shared_dir(devices, share)

    serial = _sub(devices, "serial", type="pty")
    if spec.console_log:
        _sub(serial, "log", file=spec.console_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    # The guest agent's virtio-serial port (cri_shim/guest_agent.py). No <source>: libvirt picks the host
    # socket under its own channel directory and talks to the agent itself (qemuAgentCommand).
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)

    _sub(devices, "memballoon", model="virtio")  # balloon stats for memory usage
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def read_metadata(domain_xml: str) -> dict[str, str]:
    """The vmlet metadata of a domain definition (empty when it has none)."""
    root = ET.fromstring(domain_xml)
    vm = root.find(f"metadata/{{{METADATA_NS}}}vm")
    if vm is None:
        return {}
    prefix = f"{{{METADATA_NS}}}"
    return {child.tag.removeprefix(prefix): child.text or "" for child in vm}
