"""Benchmark: a VM pod's start on a persistent root (first boot with the import, later boots) vs the overlay.

    .venv/bin/python bench/root_boot.py [--runs 3] [--device-mib 512] [--quick]

One vmlet daemon of the bench's own (as bench/cri_boot.py starts it), one image (virtlet.cloud/testvm),
and in the same run, each timed from RunPodSandbox to the guest's boot marker in the container's CRI log
(RunPodSandbox, CreateContainer, StartContainer: the kubelet's sequence, measured as cri_boot.py does):
- overlay: today's ephemeral root, a qcow2 overlay of the image in the VM's directory (the baseline);
- block root: `vmlet.dev/disks` `root: true` on a CRI device, a loop device on a sparse file of
  --device-mib. Its first boot imports the image onto the blank device in CreateContainer; a later boot
  is a new pod on the same device, which it only uses;
- volume root: the same on a filesystem volume (a directory: `disk.img` created at --device-mib).
A round is one boot of each: overlay, block first, block later, volume first, volume later. Before its
first boot a root is made blank again (untimed: the device's first MiB zeroed; disk.img and its record
deleted), so every round has a real first boot. After each boot the root is checked: a first boot must
have recorded the pod's image digest, a later boot must have left that record (and disk.img) as it was.
One untimed overlay boot comes first, so no timed boot pays for cold caches.
It prints the median of --runs rounds per kind and phase, the import (a first boot's CreateContainer
less a later one's) and the ratios to the overlay. It reports; it does not assert (target: later boot
≤ 1.1× overlay). Pods go through the CRI; the daemon, the loop device and the files go at the end, also
on failure or Ctrl-C, and it exits non-zero if anything was left.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, exit_status, print_ratio  # noqa: E402
from bench.cri_boot import TIMEOUT, wait_marker  # noqa: E402
from bench.daemon import vmlet_daemon  # noqa: E402
from bench.root_import import MIB, attached_to, clear_header  # noqa: E402
from cri_shim.storage import persistent_root, volume_image  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, images, libvirt_env  # noqa: E402

IMAGE = "virtlet.cloud/testvm"
DEVICE_PATH = "/dev/vmlet/root"  # the CRI device's container path, as the VM API renders a block PVC
VOLUME_PATH = "/vmlet/disks/root"  # the volume's container path, as the VM API renders a filesystem PVC
PHASES = ("RunPodSandbox", "CreateContainer", "StartContainer", "guest to marker")


@dataclass(frozen=True)
class Boot:
    """The seconds of one pod start, per phase (PHASES)."""

    sandbox: float
    create: float
    start: float
    guest: float  # from StartContainer's answer to the marker: the guest's boot, vmlet does nothing then

    def phases(self) -> tuple[float, ...]:
        return self.sandbox, self.create, self.start, self.guest

    @property
    def total(self) -> float:
        return sum(self.phases())


@dataclass(frozen=True)
class Root:
    """A persistent root of one kind: what the pod asks for, how to make it blank, what vmlet recorded on it."""

    kind: str  # block | volume
    entry: dict  # its vmlet.dev/disks entry
    blank: Callable[[], None]
    # (the image digest vmlet recorded or None, all that a re-import would change)
    state: Callable[[], tuple[str | None, object]]
    devices: tuple[api_pb2.Device, ...] = ()
    mounts: tuple[api_pb2.Mount, ...] = ()


def block_root(device: Path) -> Root:
    def state() -> tuple[str | None, object]:
        header = persistent_root.read_block_header(device)
        return (header["imageDigest"] if header else None), header  # importedAt is in the header

    return Root("block", {"name": "root", "device": DEVICE_PATH, "root": True},
                blank=lambda: clear_header(device), state=state,
                devices=(api_pb2.Device(container_path=DEVICE_PATH, host_path=str(device), permissions="rw"),))


def volume_root(directory: Path, capacity_mib: int) -> Root:
    def blank() -> None:
        for name in (volume_image.IMAGE_NAME, volume_image.RECORD_NAME):
            (directory / name).unlink(missing_ok=True)

    def state() -> tuple[str | None, object]:
        record = volume_image.read_record(directory)
        image = directory / volume_image.IMAGE_NAME
        if record is None or not image.exists():
            return None, None
        st = image.lstat()  # a re-import renames a new file onto disk.img
        return record.get("root", {}).get("imageDigest"), (record, st.st_dev, st.st_ino)

    directory.mkdir()
    return Root("volume", {"name": "root", "volume": VOLUME_PATH, "root": True, "capacity": f"{capacity_mib}Mi"},
                blank=blank, state=state,
                mounts=(api_pb2.Mount(container_path=VOLUME_PATH, host_path=str(directory)),))


def boot_pod(client, work: Path, name: str, sandboxes: list[str], root: Root | None = None) -> Boot:
    """One pod start, from RunPodSandbox to the boot marker in its CRI log; the pod is removed after."""
    rt = client.runtime
    annotations = {"vmlet.dev/disks": json.dumps([root.entry])} if root else {}
    logs = work / "pods" / name
    pod = cri.pod_config(name=name, log_directory=str(logs), annotations=annotations)
    config = cri.container_config(IMAGE)
    if root:
        config.devices.extend(root.devices)
        config.mounts.extend(root.mounts)
    start = time.monotonic()
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=TIMEOUT).pod_sandbox_id
    sandboxes.append(sid)
    remove = api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid)
    try:
        ran = time.monotonic()
        cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=sid, config=config, sandbox_config=pod), timeout=TIMEOUT).container_id
        created = time.monotonic()
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=TIMEOUT)
        started = time.monotonic()
        wait_marker(logs / "vm" / "0.log", start + TIMEOUT)
        took = Boot(ran - start, created - ran, started - created, time.monotonic() - started)
    except BaseException:
        try:
            rt.RemovePodSandbox(remove, timeout=TIMEOUT)
        except grpc.RpcError as e:  # e.g. Ctrl-C reached the daemon too: the sweep at the end removes the pod
            print(f"cannot remove pod {name} ({sid}): {e.code().name}", file=sys.stderr)
        raise
    rt.RemovePodSandbox(remove, timeout=TIMEOUT)
    return took


def first_boot(client, work: Path, name: str, sandboxes: list[str], root: Root, digest: str) -> tuple[Boot, object]:
    """A boot onto the root made blank: the import is in it. Returns the boot and the root's state after."""
    root.blank()
    if root.state()[0] is not None:
        raise RuntimeError(f"the {root.kind} root still has vmlet's record after it was made blank")
    took = boot_pod(client, work, name, sandboxes, root)
    recorded, state = root.state()
    if recorded != digest:
        raise RuntimeError(f"the {root.kind} root's first boot did not import {digest}: it records {recorded}")
    return took, state


def later_boot(client, work: Path, name: str, sandboxes: list[str], root: Root, imported: object) -> Boot:
    """A new pod on the root a first boot left (`imported`, its state): it must not import again."""
    took = boot_pod(client, work, name, sandboxes, root)
    now = root.state()[1]
    if now != imported:  # importedAt has seconds, a boot takes longer: a re-import would show
        raise RuntimeError(f"a later boot of the {root.kind} root imported it again: {imported} became {now}")
    return took


def measure(client, work: Path, roots: list[Root], runs: int, digest: str,
            sandboxes: list[str]) -> dict[str, list[Boot]]:
    boots: dict[str, list[Boot]] = {"overlay": []}
    for r in roots:
        boots[f"{r.kind} first"], boots[f"{r.kind} later"] = [], []
    boot_pod(client, work, "warm-up", sandboxes)
    for n in range(runs):  # interleaved, so load changes hit every kind alike
        boots["overlay"].append(boot_pod(client, work, f"overlay-{n}", sandboxes))
        for r in roots:
            took, imported = first_boot(client, work, f"{r.kind}-first-{n}", sandboxes, r, digest)
            boots[f"{r.kind} first"].append(took)
            boots[f"{r.kind} later"].append(later_boot(client, work, f"{r.kind}-later-{n}", sandboxes, r, imported))
        print(f"round {n + 1}/{runs}: " + ", ".join(f"{k} {v[-1].total:.2f}s" for k, v in boots.items()), flush=True)
    return boots


def median(boots: list[Boot], phase: Callable[[Boot], float] = lambda b: b.total) -> float:
    return statistics.median(phase(b) for b in boots)


def report(boots: dict[str, list[Boot]], kinds: list[str]) -> None:
    print(f"{'median of the rounds (s)':<26}{'total':>8}" + "".join(f"{p:>17}" for p in PHASES)
          + f"{'best total':>12}")
    for what, got in boots.items():
        print(f"{what:<26}{median(got):8.2f}"
              + "".join(f"{statistics.median(b.phases()[i] for b in got):17.2f}" for i in range(len(PHASES)))
              + f"{min(b.total for b in got):12.2f}")
    create = lambda b: b.create  # noqa: E731 - the phase the import happens in
    for kind in kinds:
        print(f"{kind} root import (first CreateContainer less a later one's): "
              f"{median(boots[f'{kind} first'], create) - median(boots[f'{kind} later'], create):.2f}s")
    overlay = median(boots["overlay"])
    for kind in kinds:
        print_ratio(f"{kind} root later boot/overlay (median)", median(boots[f"{kind} later"]) / overlay,
                    "target <= 1.1x")
        print_ratio(f"{kind} root first boot/overlay (median)", median(boots[f"{kind} first"]) / overlay,
                    "for information: includes the import")


def detach(device: Path | None, backing: Path) -> list[str]:
    """The bench's loop device goes; any other still on its file is a leftover (detached as well)."""
    if device is not None:
        subprocess.run(["losetup", "-d", str(device)], capture_output=True, timeout=60)
    left = attached_to(backing)
    for d in left:
        subprocess.run(["losetup", "-d", d], capture_output=True, timeout=60)
    return [f"loop device {d}" for d in left]


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--runs", 3, 1, "rounds (one boot of each kind each); the medians count")
    cli.count("--device-mib", 512, 128, "size of the loop device and of the volume's disk.img")
    args = cli.parse()
    accel = "tcg" if libvirt_env.DOMAIN_TYPE == "qemu" else "kvm"
    image = images.build_test_image()
    virtual = persistent_root.base_virtual_size(image, "qcow2")
    needed = virtual + persistent_root.HEADER_SIZE
    if args.device_mib * MIB < needed:
        raise SystemExit(f"--device-mib {args.device_mib} cannot hold the image's virtual size and the 1 MiB "
                         f"header ({-(-needed // MIB)} MiB)")
    with vmlet_daemon() as bench:
        backing, device = bench.work / "root-device.raw", None
        # Registered first: after the domains are gone (none holds the device open), even if losetup failed.
        bench.after_stop.append(lambda: detach(device, backing))
        with open(backing, "wb") as f:
            f.truncate(args.device_mib * MIB)  # sparse: the blank device reads as zeros
        device = Path(subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                                     text=True, timeout=60).stdout.strip())
        roots = [block_root(device), volume_root(bench.work / "root-volume", args.device_mib)]
        boots = measure(bench.client, bench.work, roots, args.runs, bench.image_ref, bench.sandboxes)
    network = bench.network
    print(f"accelerator: {accel}, rounds: {args.runs}, image {IMAGE} ({image.stat().st_size // MIB} MiB qcow2, "
          f"{virtual // MIB} MiB virtual), "
          f"roots of {args.device_mib} MiB (loop device, volume disk.img), CNI network {network.name} {network.subnet}")
    report(boots, [r.kind for r in roots])
    return exit_status(bench.left)


if __name__ == "__main__":
    sys.exit(main())
