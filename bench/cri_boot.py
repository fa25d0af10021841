"""Benchmark: RunPodSandbox → boot marker in the CRI log, vs a bare QEMU boot of the same image.

    .venv/bin/python bench/cri_boot.py [--runs 3]

Baseline: `qemu-system-x86_64` started directly on a snapshot of the test
image, with its serial console in a file, until the guest prints its boot
marker. vmlet: the kubelet's sequence through the CRI socket (RunPodSandbox,
CreateContainer, StartContainer) until the same marker appears in the
container's CRI log. Same image, memory and accelerator, same run; the best of
--runs counts for each. It reports; it does not assert (target ≤ 1.25×).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, images, libvirt_env  # noqa: E402
from tests.support.http_server import ImageServer  # noqa: E402

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


def vmlet_boot(client, work: Path, n: int) -> float:
    rt = client.runtime
    pod = cri.pod_config(name=f"bench-{n}", log_directory=str(work / "pods" / str(n)))
    start = time.monotonic()
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config("virtlet.cloud/testvm"), sandbox_config=pod)).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    try:
        wait_marker(work / "pods" / str(n) / "vm" / "0.log", start + TIMEOUT)
        return time.monotonic() - start
    finally:
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    accel = "tcg" if libvirt_env.DOMAIN_TYPE == "qemu" else "kvm"
    image = images.build_test_image()
    libvirt_env.WORK_ROOT.mkdir(parents=True, exist_ok=True)
    libvirt_env.WORK_ROOT.chmod(0o755)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=libvirt_env.WORK_ROOT))
    work.chmod(0o711)
    server = ImageServer().start()
    config = work / "vmlet.yaml"
    cri.write_config(config, work / "state", work / "vmlet.sock",
                     cri.translations_for(work / "t.yaml", {"testvm": server.serve_file("/t.qcow2", image)}),
                     log_level="warning")
    daemon = cri.VmletProcess(work / "state", work / "vmlet.sock", config, work / "vmlet.log")
    try:
        client = daemon.start()
        client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="virtlet.cloud/testvm")))
        bare, ours = [], []
        for n in range(args.runs):  # interleaved, so load changes hit both alike
            bare.append(bare_qemu(image, accel))
            ours.append(vmlet_boot(client, work, n))
    finally:
        daemon.stop()
        server.stop()
        subprocess.run(["rm", "-rf", str(work)])
    print(f"accelerator: {accel}, runs: {args.runs}")
    print(f"bare qemu-system-x86_64 to boot marker: best {min(bare):.2f}s  median {statistics.median(bare):.2f}s")
    print(f"vmlet RunPodSandbox to marker in CRI log: best {min(ours):.2f}s  median {statistics.median(ours):.2f}s")
    print(f"ratio vmlet/bare (best): {min(ours) / min(bare):.2f}x  (target <= 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
