"""Benchmark: importing an image onto a block persistent root (prepare_block_root) vs a plain `qemu-img convert -n`.

    .venv/bin/python bench/root_import.py [--device-mib 1024] [--data-mib 256] [--runs 3] [--quick]

Makes a qcow2 with --data-mib of written data (qemu-io, patterns; virtual size twice that, the rest holes)
and a loop device on a sparse file of --device-mib, and measures in the same run, on the same device:
- the baseline: `qemu-img convert -n -f qcow2 -O raw IMAGE DEVICE` (the image's bytes onto the device, whole);
- vmlet: cri_shim.storage.persistent_root.prepare_block_root onto the blank device (qemu-img info of the
  image, the convert at the 1 MiB offset, fsync, the header, fsync).
The device's first MiB is cleared between runs (not timed) so every vmlet run is a first import. Each is run
--runs times, alternating; the best run counts. It reports; it does not assert (target: ≥ 0.9×).
Each run starts after an untimed fsync of the device, so none pays for the previous one's write-out.
qemu-img convert's default cache is "unsafe" (page cache, no flush): the baseline's data is not on the
device when it ends, vmlet's is (its convert uses O_DIRECT, then fsync, then the header). For context it
also times the baseline followed by an fsync of the device: a durable plain copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, exit_status, print_ratio  # noqa: E402
from cri_shim.storage import persistent_root  # noqa: E402
from tests.support import netsupport  # noqa: E402 - the work dir names the bench process (leftover sweeps)

MIB = 1024 * 1024


def run(*argv: str, timeout: float = 600) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def make_image(path: Path, data_mib: int) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{2 * data_mib}M")
    # Data in 8 MiB extents with holes between, as an OS image has: the convert reads and skips both.
    step, done, offset = 8, 0, 0
    while done < data_mib:
        n = min(step, data_mib - done)
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x{(offset // step) % 255 + 1:02x} {offset}M {n}M", str(path))
        done, offset = done + n, offset + 2 * step


def clear_header(device: Path) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(persistent_root.HEADER_SIZE), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def settle(device: Path) -> None:
    """Untimed: what the previous run left in the page cache goes to the device first, so no run pays
    for another's write-out."""
    fd = os.open(device, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_baseline(image: Path, device: Path, flush: bool = False) -> float:
    settle(device)
    start = time.perf_counter()
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(image), str(device))
    if flush:
        settle(device)
    return time.perf_counter() - start


def time_vmlet(image: Path, device: Path) -> float:
    clear_header(device)
    settle(device)
    start = time.perf_counter()
    disk = persistent_root.prepare_block_root(device, base=image, base_format="qcow2", digest="sha256:" + "0" * 64,
                                              image="virtlet.cloud/bench", reimage=False)
    took = time.perf_counter() - start
    if not disk.imported:
        raise SystemExit(f"prepare_block_root did not import onto {device}: {disk}")
    return took


def attached_to(backing: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(backing)], capture_output=True, text=True, timeout=60).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--device-mib", 1024, 64, "size of the loop device")
    cli.count("--data-mib", 256, 16, "MiB of data written in the image")
    cli.count("--runs", 3, 1, "imports of each kind; the best counts")
    args = cli.parse()
    if 2 * args.data_mib * MIB > args.device_mib * MIB - persistent_root.HEADER_SIZE:
        raise SystemExit(f"--device-mib {args.device_mib} cannot hold the image's {2 * args.data_mib} MiB "
                         "virtual size and the 1 MiB header")
    left: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"vmlet-bench-{netsupport.STATE_MARK}-") as tmp:
        tmp = Path(tmp)
        image, backing = tmp / "bench.qcow2", tmp / "device.raw"
        print(f"creating a qcow2 with {args.data_mib} MiB of data and a {args.device_mib} MiB loop device…",
              flush=True)
        make_image(image, args.data_mib)
        with open(backing, "wb") as f:
            f.truncate(args.device_mib * MIB)
        device = Path(run("losetup", "-f", "--show", str(backing)).strip())
        try:
            baseline, durable, vmlet = [], [], []
            for _ in range(args.runs):
                baseline.append(time_baseline(image, device))
                vmlet.append(time_vmlet(image, device))
                durable.append(time_baseline(image, device, flush=True))
        finally:
            subprocess.run(["losetup", "-d", str(device)], capture_output=True, timeout=60)
            left = [f"loop device {d}" for d in attached_to(backing)]
            for d in left:
                subprocess.run(["losetup", "-d", d.split()[-1]], capture_output=True, timeout=60)
    mib_s = lambda t: args.data_mib / t  # noqa: E731 - the data written per second
    print(f"runs: {args.runs} (best)                  seconds   MiB/s of data")
    print(f"baseline: qemu-img convert -n        {min(baseline):8.3f}  {mib_s(min(baseline)):8.1f}")
    print(f"context: the same, then fsync        {min(durable):8.3f}  {mib_s(min(durable)):8.1f}")
    print(f"vmlet: prepare_block_root            {min(vmlet):8.3f}  {mib_s(min(vmlet)):8.1f}")
    print_ratio("prepare_block_root/qemu-img convert -n throughput", min(baseline) / min(vmlet),
                "target ≥ 0.9")
    return exit_status(left)


if __name__ == "__main__":
    sys.exit(main())
