"""Benchmark: PullImage of a 512 MiB image over loopback vs `curl -s URL | sha256sum`.

    .venv/bin/python bench/image_pull.py [--size-mib 512] [--runs 3] [--quick]

Builds a qcow2 full of random data (incompressible), serves it with the tests' loopback HTTP server, and
measures in the same run: the baseline (curl piped into sha256sum: download + hash, nothing written), and
PullImage through a separate image-service process (download + hash + write + fsync + validation + store),
whose peak RSS growth is read from /proc/<pid>/status (VmHWM at the end minus VmRSS before the first pull).
Each is run --runs times; the best run counts. It reports; it does not assert (targets: ≥ 0.8×, < 64 MiB).
For context it also times `curl -s URL -o /dev/null` (the transfer alone): coreutils' sha256sum does not use
the CPU's SHA instructions, so on many machines it, not the network, bounds the baseline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, print_ratio  # noqa: E402
from proto.runtime.v1 import api_pb2, api_pb2_grpc  # noqa: E402
from tests.support import netsupport  # noqa: E402 - the work dir names the bench process (leftover sweeps)
from tests.support.http_server import ImageServer  # noqa: E402


def make_image(directory: Path, size_mib: int) -> Path:
    raw, image = directory / "random.raw", directory / "bench.qcow2"
    with raw.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return image


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def wait_for_socket(stub, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stub.ListImages(api_pb2.ListImagesRequest(), timeout=1)
            return
        except grpc.RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("image service did not start; see its log") from None
            time.sleep(0.1)


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--size-mib", 512, 16, "image size")
    cli.count("--runs", 3, 1, "pulls (and baselines); the best counts")
    args = cli.parse()

    with tempfile.TemporaryDirectory(prefix=f"vmlet-bench-{netsupport.STATE_MARK}-") as tmp:
        tmp = Path(tmp)
        print(f"creating a {args.size_mib} MiB qcow2 of random data…", flush=True)
        image = make_image(tmp, args.size_mib)
        size = image.stat().st_size
        http = ImageServer().start()
        url = http.serve_file("/bench.qcow2", image)
        (tmp / "translations.yaml").write_text(
            f"translations:\n- name: bench\n  url: {url}\n  transport: local\n"
            "transports:\n  local:\n    allowHTTP: true\n")
        sock = tmp / "image.sock"
        log = (tmp / "service.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "image_service", "--socket", str(sock), "--state-dir", str(tmp / "state"),
             "--translations", str(tmp / "translations.yaml"), "--allow-network", "127.0.0.1/32"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            channel = grpc.insecure_channel(f"unix://{sock}")
            stub = api_pb2_grpc.ImageServiceStub(channel)
            wait_for_socket(stub, proc)
            rss_before = status_kib(proc.pid, "VmRSS")

            curl_times, pull_times, raw_times = [], [], []
            for _ in range(args.runs):
                t = time.perf_counter()
                subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True)
                raw_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                out = subprocess.run(f"curl -s {url} | sha256sum", shell=True, check=True,
                                     capture_output=True, text=True).stdout
                curl_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                ref = stub.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="virtlet.cloud/bench")))
                pull_times.append(time.perf_counter() - t)
                assert ref.image_ref == "sha256:" + out.split()[0], (ref.image_ref, out)
                stub.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref.image_ref)))
            peak = status_kib(proc.pid, "VmHWM")
            channel.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            http.stop()

    mib = size / 2**20
    curl_rate, pull_rate, raw_rate = mib / min(curl_times), mib / min(pull_times), mib / min(raw_times)
    growth = (peak - rss_before) / 1024
    print(f"image: {mib:.0f} MiB qcow2 over loopback, best of {args.runs}")
    print(f"curl -s URL | sha256sum : {curl_rate:7.1f} MiB/s  ({', '.join(f'{t:.2f}s' for t in curl_times)})")
    print(f"PullImage               : {pull_rate:7.1f} MiB/s  ({', '.join(f'{t:.2f}s' for t in pull_times)})")
    print(f"for context: curl -s URL -o /dev/null : {raw_rate:.1f} MiB/s (transfer only; PullImage reaches "
          f"{pull_rate / raw_rate:.2f}x of it while also hashing, writing, fsyncing and validating)")
    print(f"service peak RSS growth : {growth:.1f} MiB  (RSS {rss_before / 1024:.1f} MiB before, "
          f"peak {peak / 1024:.1f} MiB; target < 64 MiB)")
    print_ratio("PullImage/curl|sha256sum throughput", pull_rate / curl_rate, "target >= 0.8x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
