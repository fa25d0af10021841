"""The pod's volumes as the VM's disks, through the CRI socket, checked from inside the guest (docs/storage.md).

Loop devices stand in for block PVs and directories for filesystem PVs (no provisioner here). The guest's
user-data script writes a marker to each disk and prints what it found there, so a later VM (a container
restart, a new pod on the same volumes) shows what survived. The host side checks the bytes on the volumes
themselves, and that nothing is left behind (domains, mounts, VM and pod directories).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from cri_shim.storage import pod_volumes
from proto.runtime.v1 import api_pb2
from tests.support import cri

from .conftest import TESTVM
from .test_lifecycle import wait_for_log
from .test_restart import domains, vm_dirs

pytestmark = pytest.mark.libvirt

MIB = 1024 * 1024

# Finds a disk by serial the way the mount script does (the test image has no udev), then reads the
# marker a previous VM left in its first sector and writes this VM's.
GUEST_SCRIPT = """#!/bin/sh
@virtlet-mount-script@
say() { echo "DISKTEST: $*"; }
by_serial() { for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && echo /dev/${d##*/}; done; }
first_sector() { dd if="$1" bs=512 count=1 2>/dev/null | tr -d '\\000' | head -n1; }
mark() { printf '%s\\n' "$2" | dd of="$1" bs=512 count=1 conv=sync,fsync 2>/dev/null; }
say "link $(readlink /dev/vmlet/blk)"
for serial in blk vol scratch; do
    dev=$(by_serial $serial)
    say "found $serial ${dev:-none}"
    [ -n "$dev" ] || continue
    say "before $serial $(first_sector $dev)"
    mark $dev "MARK-$serial-@ROUND@" && say "wrote $serial"
done
cfg=$(by_serial cfg)
mkdir -p /mnt/cfg && mount -t iso9660 -o ro "$cfg" /mnt/cfg && say "config $(cat /mnt/cfg/greeting)"
"""


def guest_script(round_: str) -> str:
    return GUEST_SCRIPT.replace("@ROUND@", round_)


@contextlib.contextmanager
def loop_device(path: Path, size: int) -> Iterator[Path]:
    with open(path, "wb") as f:
        f.truncate(size)
    dev = Path(subprocess.run(["losetup", "-f", "--show", str(path)], check=True, capture_output=True,
                              text=True).stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def device_link(dev: Path, at: Path) -> Path:
    """A kubelet-style device path: a symlink to the device in a pod directory."""
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(dev)
    return at


def first_sector(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(512).rstrip(b"\0").strip()


def run_vm(rt, pod: api_pb2.PodSandboxConfig, sandbox_id: str, mounts=(), devices=(), attempt: int = 0) -> str:
    ccfg = cri.container_config(TESTVM)
    ccfg.metadata.attempt = attempt
    ccfg.log_path = f"vm/{attempt}.log"
    ccfg.mounts.extend(mounts)
    ccfg.devices.extend(devices)
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=ccfg, sandbox_config=pod), timeout=300).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
    return cid


def status_info(rt, cid: str) -> dict:
    return json.loads(rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True)).info["info"])


def stop_remove(rt, cid: str) -> None:
    rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=60), timeout=120)
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)


def kubelet_config_volume(root: Path, files: dict[str, str]) -> Path:
    """A ConfigMap volume as the kubelet's AtomicWriter lays it out."""
    ts = root / "..2026_12_01_00_00_00.000000001"
    ts.mkdir(parents=True)
    for key, value in files.items():
        (ts / key).write_text(value)
    (root / "..data").symlink_to(ts.name)
    for key in files:
        (root / key).symlink_to(f"..data/{key}")
    return root


DISKS = """
- {name: blk, device: /dev/vmlet/blk}
- {name: vol, volume: /vmlet/disks/vol, capacity: 64Mi}
- {name: scratch, emptyDisk: {capacity: 64Mi}}
- {name: cfg, configVolume: /vmlet/config/cfg}
"""


def test_data_disks_survive_what_they_should_and_nothing_leaks(client, vmlet, vmlet_dir, pulled, libvirt_conn):
    rt = client.runtime
    vol_dir = vmlet_dir / "pv" / "vol"
    vol_dir.mkdir(parents=True)
    cfg_dir = kubelet_config_volume(vmlet_dir / "pv" / "cfg", {"greeting": "hello-from-configmap\n"})
    with loop_device(vmlet_dir / "pv" / "blk.img", 32 * MIB) as dev:
        kubelet_pods = vmlet_dir / "kubelet" / "pods"
        link = device_link(dev, kubelet_pods / "uid1" / "volumeDevices" / "kubernetes.io~local-volume" / "blk")
        (vmlet_dir / "kubelet").chmod(0o750)  # as /var/lib/kubelet: QEMU cannot go through it

        def mounts():
            return [api_pb2.Mount(container_path="/vmlet/disks/vol", host_path=str(vol_dir)),
                    api_pb2.Mount(container_path="/vmlet/config/cfg", host_path=str(cfg_dir), readonly=True)]

        devices = [api_pb2.Device(container_path="/dev/vmlet/blk", host_path=str(link), permissions="mrw")]

        def pod(name: str, round_: str) -> api_pb2.PodSandboxConfig:
            return cri.pod_config(name=name, log_directory=str(vmlet_dir / "logs" / name), annotations={
                "VirtletCloudInitUserDataScript": guest_script(round_), "vmlet.dev/disks": DISKS})

        # Pod 1, first container.
        pod1 = pod("disks1", "r1")
        sb1 = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod1), timeout=120).pod_sandbox_id
        cid = run_vm(rt, pod1, sb1, mounts(), devices)
        log = vmlet_dir / "logs" / "disks1" / "vm" / "0.log"
        wait_for_log(log, r"DISKTEST: config ", 300)
        text = log.read_text()
        assert "DISKTEST: config hello-from-configmap" in text
        for serial in ("blk", "vol", "scratch"):
            assert f"DISKTEST: wrote {serial}" in text, text[-3000:]
        assert "DISKTEST: link /dev/vd" in text, "the device disk is linked at its container path"

        info = status_info(rt, cid)
        disks = {d["name"]: d for d in info["disks"]}
        assert set(disks) == {"blk", "vol", "scratch", "cfg"}
        assert disks["blk"]["persistent"] and disks["vol"]["persistent"]
        assert not disks["scratch"]["persistent"] and disks["cfg"]["readOnly"]
        dom = ET.fromstring(libvirt_conn.lookupByName(info["domain"]).XMLDesc())
        serials = {d.findtext("serial"): d for d in dom.iterfind("devices/disk")}
        assert serials["blk"].get("type") == "block" and serials["blk"].find("source").get("dev") == str(dev)
        assert serials["vol"].find("source").get("file").startswith(info["vmDir"]), "disk.img reached by a bind"
        assert serials["cfg"].find("readonly") is not None
        assert not dom.findall("devices/filesystem"), "mounts that are disks are not also shared over virtio-fs"
        assert (vol_dir / "disk.img").stat().st_size == 64 * MIB

        metrics = rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest()).pod_metrics
        devices_seen = {m.label_values[-1] for pm in metrics for cm in pm.container_metrics for m in cm.metrics
                        if m.name == "container_fs_writes_bytes_total"}
        assert {serials[s].find("target").get("dev") for s in ("blk", "vol", "scratch")} <= devices_seen

        # A container restart in the same sandbox: every disk keeps its data, emptyDisk included.
        stop_remove(rt, cid)
        assert not pod_volumes._mountpoints_under(vmlet.state_dir), "a stopped VM keeps no bind mounts"
        assert first_sector(dev) == b"MARK-blk-r1"
        assert first_sector(vol_dir / "disk.img") == b"MARK-vol-r1"
        cid = run_vm(rt, pod1, sb1, mounts(), devices, attempt=1)  # the sandbox's script again: it writes r1 again
        log = vmlet_dir / "logs" / "disks1" / "vm" / "1.log"
        wait_for_log(log, r"DISKTEST: config ", 300)
        text = log.read_text()
        for serial in ("blk", "vol", "scratch"):
            assert f"DISKTEST: before {serial} MARK-{serial}-r1" in text, text[-3000:]
        stop_remove(rt, cid)
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sb1), timeout=60)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb1), timeout=60)
        assert not list((vmlet.state_dir / "pods").iterdir()), "the emptyDisk ends with its pod"

        # A new pod on the same volumes (the node-failure stand-in): the volumes' data is there, the emptyDisk new.
        pod2 = pod("disks2", "r3")
        sb2 = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod2), timeout=120).pod_sandbox_id
        cid = run_vm(rt, pod2, sb2, mounts(), devices)
        log = vmlet_dir / "logs" / "disks2" / "vm" / "0.log"
        wait_for_log(log, r"DISKTEST: config ", 300)
        text = log.read_text()
        assert "DISKTEST: before blk MARK-blk-r1" in text and "DISKTEST: before vol MARK-vol-r1" in text, text[-2500:]
        assert "DISKTEST: before scratch \n" in text or "DISKTEST: before scratch\n" in text, text[-3000:]
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb2), timeout=120)
        assert first_sector(dev) == b"MARK-blk-r3", "RemovePodSandbox never touches a volume"
        assert first_sector(vol_dir / "disk.img") == b"MARK-vol-r3"
    assert not domains(libvirt_conn)
    assert not vm_dirs(vmlet)
    assert not pod_volumes._mountpoints_under(vmlet_dir)


# ---------------------------------------------------------------------------------------------- persistent roots

ROOT_SCRIPT = """#!/bin/sh
say() { echo "ROOTTEST: $*"; }
mkdir -p /mnt/root && mount -t vfat /dev/vda1 /mnt/root || say "mount failed"
say "before $(cat /mnt/root/marker 2>/dev/null || echo none)"
echo "@MARK@" > /mnt/root/marker && sync && say "wrote"
umount /mnt/root
"""


@pytest.fixture
def alt_image(vmlet_factory, image_server, test_image, vmlet_dir) -> Path:
    """The test image with other bytes (another cluster size), so another digest, served as testvm-alt."""
    alt = vmlet_dir / "testvm-alt.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=131072", str(test_image), str(alt)],
                   check=True)
    return alt


def vmlet_with_alt(vmlet_factory, image_server, test_image, alt_image, vmlet_dir):
    cri.translations_for(vmlet_dir / "translations.yaml", {
        "testvm": image_server.serve_file("/testvm.qcow2", test_image),
        "testvm-alt": image_server.serve_file("/testvm-alt.qcow2", alt_image)})
    proc = vmlet_factory()
    proc.start()
    return proc


@pytest.mark.parametrize("kind", ["device", "volume"])
def test_persistent_root_is_imported_once_and_never_reimaged_unless_asked(
        vmlet_factory, image_server, test_image, alt_image, vmlet_dir, libvirt_conn, kind):
    proc = vmlet_with_alt(vmlet_factory, image_server, test_image, alt_image, vmlet_dir)
    rt, images = proc.client.runtime, proc.client.images
    ref = images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=120).image_ref
    alt_ref = images.PullImage(api_pb2.PullImageRequest(
        image=api_pb2.ImageSpec(image="virtlet.cloud/testvm-alt")), timeout=120).image_ref
    assert ref != alt_ref
    with contextlib.ExitStack() as stack:
        if kind == "device":
            dev = stack.enter_context(loop_device(vmlet_dir / "root.img", 256 * MIB))
            entry = "- {name: root, device: /dev/vmlet/root, root: true}"
            mounts, devices = [], [api_pb2.Device(container_path="/dev/vmlet/root", host_path=str(dev),
                                                  permissions="rw")]
        else:
            root_dir = vmlet_dir / "pv" / "root"
            root_dir.mkdir(parents=True)
            entry = "- {name: root, volume: /vmlet/disks/root, root: true, capacity: 256Mi}"
            mounts, devices = [api_pb2.Mount(container_path="/vmlet/disks/root", host_path=str(root_dir))], []

        def boot(name: str, mark: str, image: str = TESTVM, reimage: bool = False) -> tuple[str, dict]:
            ann = {"VirtletCloudInitUserDataScript": ROOT_SCRIPT.replace("@MARK@", mark), "vmlet.dev/disks": entry}
            if reimage:
                ann["vmlet.dev/root-reimage"] = "true"
            pod = cri.pod_config(name=name, log_directory=str(vmlet_dir / "logs" / name), annotations=ann)
            sb = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
            ccfg = cri.container_config(image)
            ccfg.mounts.extend(mounts)
            ccfg.devices.extend(devices)
            try:
                cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
                    pod_sandbox_id=sb, config=ccfg, sandbox_config=pod), timeout=300).container_id
                info = status_info(rt, cid)
                rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
                log = vmlet_dir / "logs" / name / "vm" / "0.log"
                wait_for_log(log, r"ROOTTEST: wrote", 300)
                text = log.read_text()
                stop_remove(rt, cid)
                return text, info
            finally:
                rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sb), timeout=60)
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb), timeout=60)

        text, info = boot("root1", "first")
        assert "ROOTTEST: before none" in text, "a freshly imported root"
        root = next(d for d in info["disks"] if d["root"])
        assert root["imageDigest"] == ref and root["target"] == "vda"
        text, _ = boot("root2", "second")
        assert "ROOTTEST: before first" in text, "the second pod boots the same root, not a new import"

        with pytest.raises(grpc.RpcError) as e:
            boot("root3", "third", image="virtlet.cloud/testvm-alt")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ref in e.value.details() and alt_ref in e.value.details() and "vmlet.dev/root-reimage" in e.value.details()

        text, info = boot("root4", "fourth", image="virtlet.cloud/testvm-alt", reimage=True)
        assert "ROOTTEST: before none" in text, "re-imaged: the old root's files are gone"
        assert next(d for d in info["disks"] if d["root"])["imageDigest"] == alt_ref
        text, _ = boot("root5", "fifth", image="virtlet.cloud/testvm-alt", reimage=True)
        assert "ROOTTEST: before fourth" in text, "root-reimage is idempotent: the same image is not written again"
    assert not domains(libvirt_conn)
    assert not pod_volumes._mountpoints_under(vmlet_dir)


# ---------------------------------------------------------------------------------------------- bad input

def _request(rt, vmlet_dir: Path, annotations: dict[str, str], mounts=(), devices=()):
    pod = cri.pod_config(name="baddisk", log_directory=str(vmlet_dir / "logs" / "baddisk"), annotations=annotations)
    sb = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    ccfg = cri.container_config(TESTVM)
    ccfg.mounts.extend(mounts)
    ccfg.devices.extend(devices)
    return sb, api_pb2.CreateContainerRequest(pod_sandbox_id=sb, config=ccfg, sandbox_config=pod)


def test_bad_disks_are_refused_naming_the_field_and_leave_nothing(client, vmlet, vmlet_dir, pulled, libvirt_conn):
    rt = client.runtime
    vol = vmlet_dir / "pv" / "vol"
    vol.mkdir(parents=True)
    afile = vmlet_dir / "pv" / "afile"
    afile.write_bytes(b"x" * 4096)
    hostile = vmlet_dir / "pv" / "hostile"
    hostile.mkdir()
    (hostile / "disk.img").symlink_to("/etc/passwd")
    small = vmlet_dir / "pv" / "small"
    small.mkdir()
    vol_mount = api_pb2.Mount(container_path="/vmlet/disks/vol", host_path=str(vol))
    cases = [
        # (annotations, mounts, devices, code, what the message must name)
        ({"vmlet.dev/disks": "- {name: d, volume: /nowhere}"}, [vol_mount], [],
         grpc.StatusCode.INVALID_ARGUMENT, "vmlet.dev/disks[0].volume"),
        ({"vmlet.dev/disks": "- {name: d, device: /dev/x}"}, [], [],
         grpc.StatusCode.INVALID_ARGUMENT, "vmlet.dev/disks[0].device"),
        ({}, [], [api_pb2.Device(container_path="/dev/x", host_path=str(afile), permissions="rw")],
         grpc.StatusCode.INVALID_ARGUMENT, "config.devices[0].host_path"),
        ({}, [], [api_pb2.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwz")],
         grpc.StatusCode.INVALID_ARGUMENT, "config.devices[0].permissions"),
        ({"vmlet.dev/disks": "- {name: a, volume: /vmlet/disks/vol, serial: s1}\n- {name: b, emptyDisk: {capacity: 1Mi}, serial: s1}"},
         [vol_mount], [], grpc.StatusCode.INVALID_ARGUMENT, "vmlet.dev/disks[1].serial"),
        ({"vmlet.dev/disks": "- {name: a, volume: /vmlet/disks/vol, bus: ide}"}, [vol_mount], [],
         grpc.StatusCode.INVALID_ARGUMENT, "vmlet.dev/disks[0].bus"),
        ({"vmlet.dev/disks": "- {name: a, volume: /vmlet/disks/vol, root: true}", "VirtletRootVolumeSize": "1Gi"},
         [vol_mount], [], grpc.StatusCode.INVALID_ARGUMENT, "VirtletRootVolumeSize"),
        ({"vmlet.dev/disks": "- {name: a, volume: /vmlet/disks/h}"},
         [api_pb2.Mount(container_path="/vmlet/disks/h", host_path=str(hostile))], [],
         grpc.StatusCode.FAILED_PRECONDITION, "disk.img"),
        ({}, [], [api_pb2.Device(container_path="/dev/x", host_path="/dev/nu\x00ll", permissions="rw")],
         grpc.StatusCode.INVALID_ARGUMENT, "config.devices[0].host_path"),
        ({}, [], [api_pb2.Device(container_path="/dev/my disk", host_path="/dev/null", permissions="rw")],
         grpc.StatusCode.INVALID_ARGUMENT, "config.devices[0].container_path"),
        ({"vmlet.dev/disks": "- {name: d, device: /dev/x/}"}, [], [],
         grpc.StatusCode.INVALID_ARGUMENT, "vmlet.dev/disks[0].device"),
        ({"vmlet.dev/disks": "- {name: a, volume: /vmlet/disks/a}\n- {name: b, volume: /vmlet/disks/b}"},
         [api_pb2.Mount(container_path="/vmlet/disks/a", host_path=str(vol)),
          api_pb2.Mount(container_path="/vmlet/disks/b", host_path=str(vol))], [],
         grpc.StatusCode.INVALID_ARGUMENT, "same volume"),
        ({"vmlet.dev/disks": "- {name: a, volume: /vmlet/disks/s, capacity: 15Ti}"},
         [api_pb2.Mount(container_path="/vmlet/disks/s", host_path=str(small))], [],
         grpc.StatusCode.FAILED_PRECONDITION, "available"),
    ]
    for ann, mounts, devices, code, named in cases:
        sb = None
        with pytest.raises(grpc.RpcError) as e:
            # An annotation that cannot be parsed is refused by RunPodSandbox already; the rest by CreateContainer.
            sb, req = _request(rt, vmlet_dir, ann, mounts, devices)
            rt.CreateContainer(req, timeout=120)
        assert e.value.code() == code, (ann, e.value.details())
        assert named in e.value.details(), e.value.details()
        if sb is not None:
            rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb), timeout=60)
        assert not domains(libvirt_conn) and not vm_dirs(vmlet)
        assert not pod_volumes._mountpoints_under(vmlet_dir)
    assert (hostile / "disk.img").is_symlink() and os.readlink(hostile / "disk.img") == "/etc/passwd"
    assert not (small / "disk.img").exists(), "a disk.img the file system cannot hold is not created"


def test_a_qcow2_on_a_volume_rewritten_with_a_backing_file_before_start_is_refused(
        client, vmlet, vmlet_dir, pulled, libvirt_conn):
    """The user's qcow2 disk.img is accepted at create; another pod sharing the volume then points its header at a
    host file. StartContainer checks the image again and refuses; the domain never names a backing file anyway."""
    rt = client.runtime
    vol = vmlet_dir / "pv" / "q"
    vol.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vol / "disk.img"), "32M"], check=True)
    sb, req = _request(rt, vmlet_dir, {"vmlet.dev/disks": "- {name: q, volume: /vmlet/disks/q}"},
                       [api_pb2.Mount(container_path="/vmlet/disks/q", host_path=str(vol))])
    cid = rt.CreateContainer(req, timeout=120).container_id
    info = status_info(rt, cid)
    assert next(d for d in info["disks"] if d["name"] == "q")["format"] == "qcow2"
    dom = ET.fromstring(libvirt_conn.lookupByName(info["domain"]).XMLDesc(0))
    disk = next(d for d in dom.iterfind("devices/disk") if d.findtext("serial") == "q")
    assert disk.find("backingStore") is not None and len(disk.find("backingStore")) == 0
    # The create's bind of disk.img stays until the VM runs and stops; another pod rewrites the file meanwhile.
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
                    str(vol / "disk.img")], check=True)
    pod_volumes.unmount_under(Path(info["vmDir"]) / "disks")  # as after a host reboot: start binds it again
    with pytest.raises(grpc.RpcError) as e:
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "backing" in e.value.details(), e.value.details()
    status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid)).status
    assert status.state == api_pb2.CONTAINER_EXITED and status.reason == "StartError"
    # A new container on the volume now is refused at create.
    sb2, req2 = _request(rt, vmlet_dir, {"vmlet.dev/disks": "- {name: q, volume: /vmlet/disks/q}"},
                         [api_pb2.Mount(container_path="/vmlet/disks/q", host_path=str(vol))])
    with pytest.raises(grpc.RpcError) as e:
        rt.CreateContainer(req2, timeout=120)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "backing" in e.value.details()
    for s in (sb, sb2):
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=s), timeout=60)
    assert not domains(libvirt_conn) and not pod_volumes._mountpoints_under(vmlet_dir)


REBOOT_SCRIPT = """#!/bin/sh
say() { echo "REBOOTTEST: $*"; }
by_serial() { for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && echo /dev/${d##*/}; done; }
first_sector() { dd if="$1" bs=512 count=1 2>/dev/null | tr -d '\\000' | head -n1; }
mark() { printf '%s\\n' "$2" | dd of="$1" bs=512 count=1 conv=sync,fsync 2>/dev/null; }
scratch=$(by_serial scratch)
seen=$(first_sector $scratch)
if [ -z "$seen" ]; then
    mark $scratch "written-before-reboot" && say "rebooting"
    reboot
    exit 0
fi
say "after-reboot $seen"
if mark $(by_serial ro) "guest-was-here"; then say "ro-write succeeded"; else say "ro-write refused"; fi
say "done"
"""


def test_emptydisk_survives_a_guest_reboot_and_a_read_only_device_stays_read_only(
        client, vmlet, vmlet_dir, pulled, libvirt_conn):
    rt = client.runtime
    with loop_device(vmlet_dir / "ro.img", 8 * MIB) as dev:
        with open(dev, "r+b") as f:
            f.write(b"host-data\n")
        pod = cri.pod_config(name="reboot", log_directory=str(vmlet_dir / "logs" / "reboot"), annotations={
            "VirtletCloudInitUserDataScript": REBOOT_SCRIPT,
            "vmlet.dev/disks": "- {name: scratch, emptyDisk: {capacity: 16Mi}}"})
        sb = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
        # An unnamed device with read-only permissions (a read-only block claim): attached read-only, as "ro".
        cid = run_vm(rt, pod, sb, devices=[api_pb2.Device(container_path="/dev/ro", host_path=str(dev),
                                                          permissions="r")])
        log = vmlet_dir / "logs" / "reboot" / "vm" / "0.log"
        wait_for_log(log, r"REBOOTTEST: done", 300)
        text = log.read_text()
        assert "REBOOTTEST: rebooting" in text and "REBOOTTEST: after-reboot written-before-reboot" in text, \
            text[-3000:]
        assert "REBOOTTEST: ro-write refused" in text
        assert first_sector(dev) == b"host-data"
        info = status_info(rt, cid)
        assert next(d for d in info["disks"] if d["name"] == "ro")["readOnly"]

        # Resources change under a VM with disks, and every disk is still in its stats.
        rt.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
            container_id=cid, linux=api_pb2.LinuxContainerResources(memory_limit_in_bytes=256 * MIB)), timeout=60)
        dom = ET.fromstring(libvirt_conn.lookupByName(info["domain"]).XMLDesc())
        assert {d.findtext("serial") for d in dom.iterfind("devices/disk")} >= {"scratch", "ro"}
        metrics = rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest()).pod_metrics
        targets = {d["target"] for d in info["disks"]}
        reads = {m.label_values[-1]: m.value.value for pm in metrics for cm in pm.container_metrics
                 for m in cm.metrics if m.name == "container_fs_reads_bytes_total"}
        assert targets <= set(reads) and all(reads[t] > 0 for t in targets), reads
        stats = rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid)).stats
        empty_disk = vmlet.state_dir / "pods" / sb / "empty-disks" / "scratch.qcow2"
        assert stats.writable_layer.used_bytes.value >= empty_disk.stat().st_blocks * 512 > 0
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb), timeout=120)
        assert not empty_disk.exists()
    assert not domains(libvirt_conn) and not pod_volumes._mountpoints_under(vmlet_dir)
