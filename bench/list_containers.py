"""Benchmark: ListContainers latency over the CRI socket with 1000 containers in the store.

    .venv/bin/python bench/list_containers.py [--containers 1000] [--calls 200] [--quick]

The store is filled with container records before the daemon starts (booting
1000 VMs is not the point: the cost measured is the daemon's listing), then
ListContainers is called --calls times, unfiltered and with a label selector.
Baseline in the same run: Version on the same socket (the gRPC round trip
alone). It reports p50/p99; it does not assert (target: < 50 ms).
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

from bench.cli import BenchArgs, print_ratio  # noqa: E402
from cri_shim.state import ContainerRecord, SandboxRecord, Store  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, libvirt_env, netsupport  # noqa: E402


def fill(db: Path, n: int) -> None:
    store = Store(db)
    for i in range(n):
        pod = cri.pod_config(name=f"pod-{i}", labels={"shard": str(i % 10)})
        sid = f"{i:064x}"
        store.add_sandbox(SandboxRecord(id=sid, name_key=f"pod-{i}", state=api_pb2.SANDBOX_NOTREADY, created_at=i,
                                        config=pod.SerializeToString()))
        cfg = cri.container_config("virtlet.cloud/testvm", labels={"shard": str(i % 10)})
        store.add_container(ContainerRecord(
            id=f"c{i:063x}", sandbox_id=sid, name_key=f"vm-{i}", state=api_pb2.CONTAINER_EXITED, created_at=i,
            image="virtlet.cloud/testvm", image_ref="sha256:" + "0" * 64, domain_name=f"vmlet-bench-{i}",
            domain_uuid="", config=cfg.SerializeToString()))
    store.close()


def timed(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))]


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--containers", 1000, 50, "container records in the store")
    cli.count("--calls", 200, 20, "calls of each kind")
    args = cli.parse()
    libvirt_env.WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{netsupport.STATE_MARK}-", dir=libvirt_env.WORK_ROOT))
    work.chmod(0o711)
    (work / "state").mkdir(mode=0o711)
    fill(work / "state" / "vmlet.db", args.containers)
    config = work / "vmlet.yaml"
    cri.write_config(config, work / "state", work / "vmlet.sock", None, log_level="warning")
    daemon = cri.VmletProcess(work / "state", work / "vmlet.sock", config, work / "vmlet.log")
    try:
        rt = daemon.start().runtime
        n = len(rt.ListContainers(api_pb2.ListContainersRequest()).containers)
        assert n == args.containers, n
        version = timed(lambda: rt.Version(api_pb2.VersionRequest()), args.calls)
        plain = timed(lambda: rt.ListContainers(api_pb2.ListContainersRequest()), args.calls)
        selector = timed(lambda: rt.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(label_selector={"shard": "3"}))), args.calls)
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", str(work)])
    print(f"{args.containers} containers, {args.calls} calls each")
    for name, xs in (("Version (baseline)", version), ("ListContainers", plain),
                     ("ListContainers label_selector", selector)):
        print(f"{name:32s} p50 {statistics.median(xs):7.2f} ms   p99 {pct(xs, 0.99):7.2f} ms")
    print_ratio("ListContainers/Version p50", statistics.median(plain) / statistics.median(version),
                f"ListContainers p50 {statistics.median(plain):.2f} ms, target < 50 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
