"""Benchmark: RunPodSandbox → boot marker in the CRI log, vs a bare QEMU boot of the same image.

    .venv/bin/python bench/cri_boot.py [--runs 3] [--quick]

Baseline: `qemu-system-x86_64` started directly on a snapshot of the test
image, with its serial console in a file, until the guest prints its boot
marker. vmlet: the kubelet's sequence through the CRI socket (RunPodSandbox,
CreateContainer, StartContainer) until the same marker appears in the
container's CRI log. Same image, memory and accelerator, same run; the best of
--runs counts for each. It reports; it does not assert (target ≤ 1.25×).
The pods get a CNI network of the bench's own (bridge + host-local on a
private range, no NAT, no route out of the machine; the node's
/etc/cni/net.d is not used), so it runs on a fresh machine after the set-up.
It removes what it made (pods, domains, pod networks) and exits non-zero if
anything is left.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, exit_status, print_ratio  # noqa: E402
from bench.daemon import vmlet_daemon  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, libvirt_env  # noqa: E402

MARKER = b"VMLET-TESTVM: boot marker"
TIMEOUT = 180


def wait_marker(path: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if path.exists() and MARKER in path.read_bytes():
            return
        time.sleep(0.02)
    raise TimeoutError(f"no boot marker in {path}")


def bare_qemu(image: Path, accel: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        console = Path(tmp) / "console"
        start = time.monotonic()
        proc = subprocess.Popen(["qemu-system-x86_64", "-accel", accel, "-m", "256", "-display", "none",
                                 "-nic", "none", "-serial", f"file:{console}", "-monitor", "none",
                                 "-drive", f"file={image},if=virtio,snapshot=on,format=qcow2"])
        try:
            wait_marker(console, start + TIMEOUT)
            return time.monotonic() - start
        finally:
            proc.kill()
            proc.wait()


def vmlet_boot(client, work: Path, n: int, sandboxes: list[str]) -> float:
    rt = client.runtime
    pod = cri.pod_config(name=f"bench-{n}", log_directory=str(work / "pods" / str(n)))
    start = time.monotonic()
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=TIMEOUT).pod_sandbox_id
    sandboxes.append(sid)
    try:
        cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=sid, config=cri.container_config("virtlet.cloud/testvm"), sandbox_config=pod),
            timeout=TIMEOUT).container_id
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=TIMEOUT)
        wait_marker(work / "pods" / str(n) / "vm" / "0.log", start + TIMEOUT)
        return time.monotonic() - start
    finally:
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=TIMEOUT)


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--runs", 3, 1, "boots of each kind; the best counts")
    args = cli.parse()
    accel = "tcg" if libvirt_env.DOMAIN_TYPE == "qemu" else "kvm"
    bare, ours = [], []
    with vmlet_daemon() as bench:
        for n in range(args.runs):  # interleaved, so load changes hit both alike
            bare.append(bare_qemu(bench.image, accel))
            ours.append(vmlet_boot(bench.client, bench.work, n, bench.sandboxes))
    network = bench.network
    print(f"accelerator: {accel}, runs: {args.runs}, CNI network {network.name} {network.subnet}")
    print(f"bare qemu-system-x86_64 to boot marker: best {min(bare):.2f}s  median {statistics.median(bare):.2f}s")
    print(f"vmlet RunPodSandbox to marker in CRI log: best {min(ours):.2f}s  median {statistics.median(ours):.2f}s")
    print_ratio("vmlet/bare (best)", min(ours) / min(bare), "target <= 1.25x")
    return exit_status(bench.left)


if __name__ == "__main__":
    sys.exit(main())
