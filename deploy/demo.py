"""The main job: a VM pod booted through vmlet's CRI socket, the way the kubelet drives it.

Starts the vmlet daemon on a socket of its own with a CNI network of its own
(Debian's bridge + host-local plugins on a private range, no NAT, no route
out of this host), serves the project's test VM image over HTTP on loopback,
then plays the kubelet: PullImage, RunPodSandbox, CreateContainer,
StartContainer, follows the container's CRI log (the VM's serial console),
shows the pod IP (and pings the VM there), status and stats, stops the VM
through its ACPI power button and removes everything.

Run via deploy/demo.sh (which sets the host up and builds the image first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, netsupport  # noqa: E402
from tests.support.http_server import ImageServer  # noqa: E402

IMAGE = "virtlet.cloud/testvm"
STATE_ROOT = Path("/var/lib/vmlet-demo")


def follow(log: Path, until: str, timeout: float, shown: int) -> tuple[int, bool]:
    """Print new lines of the CRI log from line `shown` until one contains `until`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").split("\n")[:-1] if log.exists() else []
        for index in range(shown, len(lines)):
            print("  | " + lines[index], flush=True)
            if until in lines[index]:
                return index + 1, True
        shown = max(shown, len(lines))
        time.sleep(0.2)
    return shown, False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="the test VM qcow2 (deploy/images/build-test-image.sh)")
    parser.add_argument("--accelerator", default="auto", choices=("auto", "kvm", "qemu"))
    args = parser.parse_args()

    STATE_ROOT.mkdir(mode=0o711, exist_ok=True)
    # STATE_MARK in the path marks the pod's dnsmasq (pid file in the state dir) for the network's sweep.
    work = Path(tempfile.mkdtemp(prefix=f"run-{netsupport.STATE_MARK}-", dir=STATE_ROOT))
    work.chmod(0o711)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        server = ImageServer().start()
        cleanup.callback(server.stop)
        # No NAT, no route out of this host; swept (the host bridge) and ip_forward restored on the way out.
        network, conf_dir = cleanup.enter_context(netsupport.private_network(work, "vmlet-demo"))
        return run(args, work, server.serve_file("/testvm.qcow2", args.image), network, conf_dir)


def run(args: argparse.Namespace, work: Path, url: str, network: netsupport.TestNetwork, conf_dir: Path) -> int:
    config = work / "vmlet.yaml"
    cri.write_config(config, work / "state", work / "vmlet.sock",
                     cri.translations_for(work / "translations.yaml", {"testvm": url}),
                     accelerator=args.accelerator, domain_prefix="vmlet-demo-", log_level="info",
                     cni_conf_dir=str(conf_dir), cni_bin_dirs=[netsupport.CNI_BIN_DIR])
    daemon = cri.VmletProcess(work / "state", work / "vmlet.sock", config, work / "vmlet.log")
    sandbox_id = None
    try:
        print(f"vmlet     starting on unix://{daemon.socket} (log: {daemon.log_file})")
        client = daemon.start()
        rt = client.runtime
        v = rt.Version(api_pb2.VersionRequest())
        info = json.loads(rt.Status(api_pb2.StatusRequest(verbose=True)).info["config"])
        print(f"runtime   {v.runtime_name} {v.runtime_version}, CRI {v.runtime_api_version}, "
              f"accelerator {info['accelerator']} -> libvirt domain type {info['domainType']}")
        ref = client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=IMAGE))).image_ref
        print(f"image     {IMAGE} -> {ref} (from {url})")

        # A pod volume, as the kubelet would mount it: a host directory, read-only, shared over virtio-fs.
        volume = work / "volumes" / "motd"
        volume.mkdir(parents=True)
        (volume / "motd").write_text("hello from a pod volume on the host\n")
        pod = cri.pod_config(name="demo-vm", uid=str(uuid.uuid4()), log_directory=str(work / "pods"), annotations={
            "VirtletVCPUCount": "1",
            "VirtletCloudInitUserDataScript": "#!/bin/sh\n@virtlet-mount-script@\n"
                                              "echo \"hello from user-data on $(hostname)\"\n"
                                              "echo \"/etc/motd.d/motd: $(cat /etc/motd.d/motd)\"\n",
        })
        sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
        print(f"sandbox   {sandbox_id[:13]} pod default/demo-vm")
        container = cri.container_config(IMAGE, memory_mib=256, envs={"GREETING": "hi"})
        container.mounts.add(container_path="/etc/motd.d", host_path=str(volume), readonly=True)
        cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=container, sandbox_config=pod)).container_id
        started = time.monotonic()
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True))
        print(f"container {cid[:13]} {api_pb2.ContainerState.Name(status.status.state)}; "
              f"CRI log {status.status.log_path}:")
        log = Path(status.status.log_path)
        shown, ready = follow(log, "VMLET-TESTVM: ready", 180, 0)
        if not ready:
            print("the VM did not finish booting", file=sys.stderr)
            return 1
        print(f"booted    in {time.monotonic() - started:.1f}s")
        stats = rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid)).stats
        print(f"stats     cpu {stats.cpu.usage_core_nano_seconds.value / 1e9:.2f}s, "
              f"memory {stats.memory.working_set_bytes.value // 2**20} MiB, "
              f"disk {stats.writable_layer.used_bytes.value // 2**10} KiB")
        sb = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
        answered = netsupport.ping(sb.network.ip, count=3)
        print(f"pod       {api_pb2.PodSandboxState.Name(sb.state)}, IP {sb.network.ip} "
              f"(CNI network {network.name} {network.subnet}); ping from the host: "
              f"{'answered' if answered else 'NO ANSWER'}")
        print("stopping  (ACPI power button, 30 s grace)")
        rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=30))
        follow(log, "VMLET-TESTVM: shutdown complete", 5, shown)
        st = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid)).status
        print(f"container {api_pb2.ContainerState.Name(st.state)}, exit code {st.exit_code} ({st.reason})")
        return 0 if st.exit_code == 0 and answered else 1
    finally:
        if sandbox_id and daemon.alive():
            daemon.client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
            print("removed   pod sandbox, its VM and disks")
        daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
