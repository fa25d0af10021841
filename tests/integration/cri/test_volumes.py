"""Pod volumes reach the VM over virtio-fs, through the CRI socket, checked from inside the guest.

The guest's user-data script mounts the shares (virtlet's
`@virtlet-mount-script@`), reads what the host wrote, writes back, and tries
to write to the read-only volume — also after remounting it read-write, as a
hostile guest would: the host's read-only bind mount must refuse.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import pytest

from cri_shim.storage import pod_volumes
from proto.runtime.v1 import api_pb2
from tests.support import cri

from .conftest import TESTVM
from .test_lifecycle import wait_for_log
from .test_restart import domains, vm_dirs

pytestmark = pytest.mark.libvirt

GUEST_SCRIPT = """#!/bin/sh
@virtlet-mount-script@
say() { echo "VOLTEST: $*"; }
# busybox has no mountpoint(1): /proc/mounts tells (a path with spaces would be octal-escaped there; ours have none)
mounted() { if grep -qs " $1 " /proc/mounts; then echo mounted; else echo not-mounted; fi; }
say "read $(cat /data/greeting)"
echo written-by-guest > /data/from-guest && say "wrote"
if echo x > /config/attempt 2>/dev/null; then say "ro-write succeeded"; else say "ro-write refused"; fi
if mount -o remount,rw /config 2>/dev/null && echo x > /config/attempt 2>/dev/null; then
    say "remounted-write succeeded"
else
    say "remounted-write refused"
fi
say "config $(cat /config/setting)"
say "created-dir $(ls -A /fresh | wc -l)"
say "data-dir $(mounted /data)"
say "hosts-file $(mounted /etc/hosts)"
"""


def mounts_under(path: Path) -> list[str]:
    return sorted(pod_volumes._mountpoints_under(path))


def volume(container_path: str, host_path: Path, readonly: bool = False, **extra) -> api_pb2.Mount:
    return api_pb2.Mount(container_path=container_path, host_path=str(host_path), readonly=readonly, **extra)


def test_directory_volumes_are_shared_and_read_only_is_enforced_by_the_host(
        client, vmlet, vmlet_dir, pulled, libvirt_conn):
    rt = client.runtime
    data, config, fresh = vmlet_dir / "vol" / "data", vmlet_dir / "vol" / "config", vmlet_dir / "vol" / "fresh"
    data.mkdir(parents=True)
    config.mkdir()
    (data / "greeting").write_text("hello-from-host\n")
    (config / "setting").write_text("colour=blue\n")
    hosts_file = vmlet_dir / "vol" / "etc-hosts"
    hosts_file.write_text("127.0.0.1 localhost\n")

    log_dir = vmlet_dir / "pods" / "volumes"
    pod = cri.pod_config(name="volumes", log_directory=str(log_dir),
                         annotations={"VirtletCloudInitUserDataScript": GUEST_SCRIPT})
    sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    ccfg = cri.container_config(TESTVM)
    ccfg.mounts.extend([
        volume("/data", data),
        volume("/config", config, readonly=True),
        volume("/fresh", fresh),                # missing on the host: created, as containerd does
        volume("/etc/hosts", hosts_file),       # a file, as the kubelet always sends: left out
    ])
    container_id = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=ccfg, sandbox_config=pod)).container_id
    assert fresh.is_dir()

    info = json.loads(rt.ContainerStatus(api_pb2.ContainerStatusRequest(
        container_id=container_id, verbose=True)).info["info"])
    shares = {s["containerPath"]: s for s in info["volumes"]["shares"]}
    assert set(shares) == {"/data", "/config", "/fresh"}
    assert shares["/config"]["readOnly"] and not shares["/data"]["readOnly"]
    assert [s["containerPath"] for s in info["volumes"]["skipped"]] == ["/etc/hosts"]
    assert "file" in info["volumes"]["skipped"][0]["reason"]
    vm_dir = Path(info["vmDir"])
    assert len(mounts_under(vm_dir)) == 1, "one read-only bind mount, for /config"

    dom = ET.fromstring(libvirt_conn.lookupByName(info["domain"]).XMLDesc())
    sources = {fs.find("target").get("dir"): fs.find("source").get("dir")
               for fs in dom.iterfind("devices/filesystem") if fs.find("driver").get("type") == "virtiofs"}
    assert len(sources) == 3
    assert str(data) in sources.values() and str(config) not in sources.values(), "read-only: the bind mount"
    assert dom.find("memoryBacking/access").get("mode") == "shared"

    rt.StartContainer(api_pb2.StartContainerRequest(container_id=container_id))
    log = log_dir / "vm" / "0.log"
    wait_for_log(log, r"VMLET-TESTVM: user-data exit 0$", 240)
    text = log.read_text()
    for line in ("read hello-from-host", "wrote", "ro-write refused", "remounted-write refused",
                 "config colour=blue", "created-dir 0",
                 "data-dir mounted",  # the probe sees a shared volume's mount, so its "not-mounted" below means it
                 "hosts-file not-mounted"):  # the file mount was left out: nothing over the guest's /etc/hosts
        assert f"VOLTEST: {line}" in text, f"{line!r} missing from the console:\n{text[-3000:]}"
    assert (data / "from-guest").read_text() == "written-by-guest\n"
    assert not (config / "attempt").exists()

    rt.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=30))
    assert not mounts_under(vm_dir), "a stopped VM must not keep the volume mounted (the kubelet tears it down)"
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id))
    assert not mounts_under(vmlet.state_dir)
    assert not vm_dirs(vmlet)
    # Removing the VM must never reach into the pod's volumes.
    assert (data / "greeting").read_text() == "hello-from-host\n"
    assert (config / "setting").read_text() == "colour=blue\n"
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    assert not domains(libvirt_conn)


@pytest.mark.parametrize("mutate, field", [
    (lambda m, d: setattr(m, "host_path", "relative/dir"), "config.mounts[1].host_path"),
    (lambda m, d: setattr(m, "container_path", "/data"), "config.mounts[1].container_path"),
    (lambda m, d: setattr(m, "container_path", "/srv/../etc"), "config.mounts[1]"),
    (lambda m, d: setattr(m, "propagation", api_pb2.PROPAGATION_BIDIRECTIONAL), "config.mounts[1].propagation"),
    (lambda m, d: m.image.CopyFrom(api_pb2.ImageSpec(image="busybox")), "config.mounts[1].image"),
    (lambda m, d: setattr(m, "recursive_read_only", True), "config.mounts[1].recursive_read_only"),
    (lambda m, d: m.uidMappings.add(host_id=1000, container_id=0, length=1), "config.mounts[1]"),
])
def test_bad_mounts_are_invalid_argument_and_leave_nothing(
        client, vmlet, vmlet_dir, pulled, libvirt_conn, mutate, field):
    rt = client.runtime
    good, other = vmlet_dir / "vol" / "good", vmlet_dir / "vol" / "other"
    good.mkdir(parents=True)
    other.mkdir()
    pod = cri.pod_config(name="badmount", log_directory=str(vmlet_dir / "pods" / "badmount"))
    sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    ccfg = cri.container_config(TESTVM)
    # The first mount is good and read-only: no bind mount of it may stay behind either.
    ccfg.mounts.extend([volume("/data", good, readonly=True), volume("/other", other, readonly=True)])
    mutate(ccfg.mounts[1], vmlet_dir)
    with pytest.raises(grpc.RpcError) as e:
        rt.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=ccfg, sandbox_config=pod))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert field in e.value.details()
    assert not rt.ListContainers(api_pb2.ListContainersRequest()).containers
    assert not domains(libvirt_conn) and not vm_dirs(vmlet) and not mounts_under(vmlet.state_dir)
    assert good.is_dir() and other.is_dir()


def test_failure_after_the_bind_mounts_rolls_them_back(client, vmlet, vmlet_dir, pulled, libvirt_conn):
    """The mounts are fine, a later step is not (an env name cloud-init can't write): InvalidArgument,
    and the read-only bind mount already made is gone with the half-built VM."""
    rt = client.runtime
    vol = vmlet_dir / "vol" / "ro"
    vol.mkdir(parents=True)
    pod = cri.pod_config(name="rollback", log_directory=str(vmlet_dir / "pods" / "rollback"))
    sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    ccfg = cri.container_config(TESTVM, envs={"1-not-a-name": "x"})
    ccfg.mounts.append(volume("/ro", vol, readonly=True))
    with pytest.raises(grpc.RpcError) as e:
        rt.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=ccfg, sandbox_config=pod))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1-not-a-name" in e.value.details()
    assert not mounts_under(vmlet.state_dir) and not vm_dirs(vmlet) and not domains(libvirt_conn)
    assert vol.is_dir()


def test_crash_with_a_read_only_volume_mounted_leaves_no_mount_and_keeps_the_volume(
        vmlet_factory, vmlet_dir, libvirt_conn):
    """kill -9 after the bind mount and the domain exist, before the record: recovery detaches the
    mount before deleting the orphan VM directory (and so never deletes through it)."""
    vmlet = vmlet_factory()
    client = vmlet.start()
    client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)))
    secret = vmlet_dir / "vol" / "secret"
    secret.mkdir(parents=True)
    (secret / "token").write_text("s3cr3t")
    pod = cri.pod_config(name="crashvol", log_directory=str(vmlet_dir / "pods" / "crashvol"))
    sandbox_id = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    vmlet.stop()
    client = vmlet.start(crashpoint="create.after-define")
    ccfg = cri.container_config(TESTVM)
    ccfg.mounts.append(volume("/var/run/secrets/token", secret, readonly=True))
    with pytest.raises(grpc.RpcError) as e:
        client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=ccfg, sandbox_config=pod))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and vmlet.wait_dead() == -9
    assert len(mounts_under(vmlet.state_dir)) == 1, "the crash should have left the bind mount behind"

    client = vmlet.start()
    assert not client.runtime.ListContainers(api_pb2.ListContainersRequest()).containers
    assert not mounts_under(vmlet.state_dir) and not vm_dirs(vmlet) and not domains(libvirt_conn)
    assert (secret / "token").read_text() == "s3cr3t"
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    vmlet.stop()
