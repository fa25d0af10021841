#!/usr/bin/env python3
"""CRI proxy latency: Version and ListContainers (100 containers) through criproxy vs directly to containerd.

    .venv/bin/python bench/criproxy_latency.py [--iterations 2000] [--containers 100] [--quick]
                                                [--vmlet-socket /run/vmlet/vmlet.sock]

Needs the project's containerd (deploy/containerd/setup-containerd.sh). Creates one pod
with N created (not started) busybox containers in containerd, starts `criproxy` as a
process (as on a node) with containerd as the default backend, then measures both paths
in the same run, interleaved in blocks so drift hits both alike. With --vmlet-socket the
proxy also fans out to a running vmlet (a second backend) and that is measured as well.
Target: proxy p50 <= direct p50 + 0.5 ms and <= 1.5x direct p50. It reports whether the
target is met; it does not assert (the exit status says the bench ran, as for every bench).
Everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, print_ratio  # noqa: E402
from proto.runtime.v1 import api_pb2, api_pb2_grpc  # noqa: E402
from tests.support import netsupport  # noqa: E402 - the work dir names the bench process (leftover sweeps)

CONTAINERD = "/run/vmlet-containerd/containerd.sock"
IMAGE = "localhost/vmlet/busybox:1"


def stub(sock: str) -> tuple[grpc.Channel, api_pb2_grpc.RuntimeServiceStub]:
    ch = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.max_receive_message_length", 16 << 20)])
    return ch, api_pb2_grpc.RuntimeServiceStub(ch)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def start_proxy(sock: str, backends: list[str], log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "criproxy.main", "--listen", sock, "--log-level", "warning"]
    for b in backends:
        args += ["--backend", b]
    proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    ch, rt = stub(sock)
    deadline = time.monotonic() + 30
    while True:
        try:
            rt.Version(api_pb2.VersionRequest(), timeout=2)
            ch.close()
            return proc
        except grpc.RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"criproxy did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)


def measure(rt, call: str, req, n: int) -> list[float]:
    fn = getattr(rt, call)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(req, timeout=10)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    cli = BenchArgs(__doc__, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.count("--iterations", 2000, 100, "calls of each kind per path (in blocks of 100)")
    cli.count("--containers", 100, 5, "containers created in containerd")
    cli.add_argument("--containerd-socket", default=CONTAINERD)
    cli.add_argument("--vmlet-socket", help="also measure with a second backend (a running vmlet)")
    args = cli.parse()

    ch, direct = stub(args.containerd_socket)
    try:
        direct.Version(api_pb2.VersionRequest(), timeout=5)
    except grpc.RpcError as e:
        raise SystemExit(f"containerd not answering on {args.containerd_socket} "
                         f"(run deploy/containerd/setup-containerd.sh): {e.details()}")
    uid = str(uuid.uuid4())
    pod = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="criproxy-bench", namespace="bench",
                                                                       uid=uid),
                                   labels={"vmlet-bench": "criproxy"})
    pod.linux.cgroup_parent = f"/vmlet-bench/pod{uid}"
    tmp = Path(tempfile.mkdtemp(prefix=f"criproxy-bench-{netsupport.STATE_MARK}-"))
    pod.log_directory = str(tmp / "logs")  # per run: concurrent runs never remove each other's
    procs: list[subprocess.Popen] = []
    sb = None
    try:
        t0 = time.monotonic()
        sb = direct.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60).pod_sandbox_id
        for i in range(args.containers):
            direct.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=sb, sandbox_config=pod, config=(
                api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=f"c{i}"),
                                        image=api_pb2.ImageSpec(image=IMAGE), command=["/bin/true"],
                                        labels={"vmlet-bench": "criproxy", "i": str(i)}))), timeout=60)
        total = len(direct.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers)
        print(f"setup: pod + {args.containers} containers in {time.monotonic() - t0:.1f} s "
              f"(containerd lists {total} containers)")

        configs = [("proxy(containerd)", [f"containerd={args.containerd_socket}"])]
        if args.vmlet_socket:
            configs.append(("proxy(containerd+vmlet)", [f"containerd={args.containerd_socket}",
                                                        f"virtlet.cloud={args.vmlet_socket}"]))
        targets = [("direct", direct)]
        for i, (name, backends) in enumerate(configs):
            sock = str(tmp / f"p{i}.sock")
            procs.append(start_proxy(sock, backends, tmp / "criproxy.log"))
            targets.append((name, stub(sock)[1]))

        calls = [("Version", api_pb2.VersionRequest()), ("ListContainers", api_pb2.ListContainersRequest())]
        results: dict[tuple[str, str], list[float]] = {}
        for call, req in calls:
            block = min(100, args.iterations)
            for _, rt in targets:
                measure(rt, call, req, min(50, block))  # warm up
            for _ in range(max(1, args.iterations // block)):
                for name, rt in targets:
                    results.setdefault((call, name), []).extend(measure(rt, call, req, block))

        ok = True
        print(f"{'call':<16}{'path':<26}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}  vs direct: p50, p99")
        for call, _ in calls:
            d50, d99 = statistics.median(results[(call, "direct")]), percentile(results[(call, "direct")], 99)
            for name, _ in targets:
                xs = results[(call, name)]
                p50, p99 = statistics.median(xs), percentile(xs, 99)
                rel = ""
                if name != "direct":
                    delta, ratio = p50 - d50, p50 / d50
                    meets = delta <= 0.5 and ratio <= 1.5
                    if name == "proxy(containerd)":
                        ok = ok and meets
                    rel = f"+{delta:.3f} ms x{ratio:.2f}, {p99 - d99:+.3f} ms  {'OK' if meets else 'MISSES target'}"
                print(f"{call:<16}{name:<26}{p50:>9.3f}{p99:>9.3f}{statistics.fmean(xs):>9.3f}  {rel}")
        print("target (p50 <= direct + 0.5 ms and <= 1.5x direct, proxy with containerd):", "met" if ok else "NOT met")
        for call, _ in calls:
            print_ratio(f"proxy/direct p50, {call}", statistics.median(results[(call, "proxy(containerd)")]) /
                        statistics.median(results[(call, "direct")]), "target <= 1.5x and <= direct + 0.5 ms")
        return 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        if sb:
            direct.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sb), timeout=60)
            direct.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb), timeout=60)
        for d in sorted(Path("/sys/fs/cgroup").glob(f"*/vmlet-bench/pod{uid}*"), reverse=True) + \
                sorted(Path("/sys/fs/cgroup").glob("*/vmlet-bench")):
            try:
                d.rmdir()
            except OSError:
                pass
        ch.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    sys.exit(main())
