"""Benchmark: VM controller reconciles per second with 200 VMs, against the kmock API emulator.

    .venv/bin/python bench/vmapi_reconcile.py [--vms 200] [--in-process [-v]] [--quick]

The real operator (the code of python -m vmapi.operator: kopf + the kubernetes client) runs in
this process; kmock, playing the API server, runs in a process of its own, as an API server
would (`--in-process` puts it on this process's loop, and `-v` then lists the requests of
each phase). Three phases, each timed until every VM's status shows the result, counting
the controller's reconcile passes:

  create   200 VMs created (runStrategy Always) → every VM has its pod, status Starting
  running  the "kubelet" reports all 200 pods Running → every VM Running and ready
  resync   all 200 workers woken at once (nothing to change: reads only)

A pass = read VM + read pod + decide + the writes needed. Target: >= 50 passes/s
(the issue's figure); the ratio to it is printed per phase. It reports, it does not assert.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kmock  # noqa: E402

from bench.cli import BenchArgs, print_ratio  # noqa: E402
from tests.integration.vmapi.harness import (  # noqa: E402
    NS, ApiServer, Cluster, Operator, declare_resources, vm_manifest, write_kubeconfig)
from vmapi import reconcile, types  # noqa: E402

TARGET = 50.0


class RemoteServer:
    """The emulator in a subprocess; `url` as kmock's."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.vmapi.harness"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        self.log: list = []

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


@contextlib.asynccontextmanager
async def emulator(in_process: bool):
    if in_process:
        async with ApiServer() as server, kmock.Server(server):
            declare_resources(server)
            yield server
    else:
        server = RemoteServer()
        try:
            yield server
        finally:
            server.close()


async def until(check, timeout: float, interval: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s")
        await asyncio.sleep(interval)


async def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--vms", 200, 10, "VirtualMachines")
    cli.add_argument("--in-process", action="store_true", help="run kmock on this process's event loop")
    cli.add_argument("-v", "--verbose", action="store_true", help="with --in-process: the requests of each phase")
    args = cli.parse()
    n = args.vms
    names = [f"bench-{i:03d}" for i in range(n)]
    pool = ThreadPoolExecutor(8)  # the test side's client calls, off the loop
    loop = asyncio.get_running_loop()
    results = []
    async with emulator(args.in_process) as server:
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = write_kubeconfig(server, Path(tmp) / "kubeconfig")
            cluster = Cluster(server, kubeconfig)

            def call(fn, *a, **kw):
                return loop.run_in_executor(pool, lambda: fn(*a, **kw))

            async def vms():
                resp = await call(cluster.custom.list_namespaced_custom_object, types.GROUP, types.VERSION, NS,
                                  types.PLURAL, _preload_content=False)
                return [i.get("status") or {} for i in json.loads(resp.data)["items"]
                        if i["metadata"]["name"].startswith("bench-")]

            async def all_vms(pred):
                sts = await vms()
                return len(sts) == n and all(pred(s) for s in sts)

            interval = 0.01 if args.in_process else 0.25
            op = Operator(server, kubeconfig, reconcile.Options(resync_seconds=600))
            if args.in_process:
                await op.start()
            else:  # no request log to watch for kopf's WATCH: wait until a probe VM is served
                await op.start_unobserved()
                await call(cluster.custom.create_namespaced_custom_object, types.GROUP, types.VERSION, NS,
                           types.PLURAL, vm_manifest("probe", "Halted"), _preload_content=False)
                await until(lambda: _probe_served(cluster, call), 30, 0.1)
            try:
                p0, t0 = op.passes, time.monotonic()
                await asyncio.gather(*(call(cluster.custom.create_namespaced_custom_object, types.GROUP,
                                            types.VERSION, NS, types.PLURAL, vm_manifest(nm),
                                            _preload_content=False) for nm in names))
                await until(lambda: all_vms(lambda s: s.get("printableStatus") == "Starting" and s.get("podName")),
                            300, interval)
                results.append(("create", op.passes - p0, time.monotonic() - t0, len(server.log)))

                p0, t0 = op.passes, time.monotonic()
                await asyncio.gather(*(cluster.kubelet(nm, "Running") for nm in names))
                await until(lambda: all_vms(lambda s: s.get("printableStatus") == "Running" and s.get("ready")),
                            300, interval)
                results.append(("running", op.passes - p0, time.monotonic() - t0, len(server.log)))

                p0, t0 = op.passes, time.monotonic()
                woken = op.wake_all()

                async def done():
                    return op.passes - p0 >= woken
                await until(done, 300, 0.01)
                results.append(("resync", op.passes - p0, time.monotonic() - t0, len(server.log)))
            finally:
                await op.stop()
                pool.shutdown()

            print(f"vmapi reconcile benchmark: {n} VMs, kmock {'in this process' if args.in_process else 'in its own process'}"
                  f" (target {TARGET:.0f} reconciles/s)")
            print(f"{'phase':8} {'passes':>7} {'seconds':>8} {'passes/s':>9} {'VMs/s':>7} {'ratio':>7}")
            start = 0
            for phase, passes, secs, logged in results:
                rate = passes / secs
                print(f"{phase:8} {passes:7d} {secs:8.2f} {rate:9.1f} {n / secs:7.1f} {rate / TARGET:6.2f}x")
                if args.verbose and args.in_process:
                    seen = collections.Counter(
                        (r.headers.get("User-Agent", "?").split("/")[0], str(r.action).split(".")[-1],
                         (r.resource.plural if r.resource else "-") or "-", r.subresource or "")
                        for r in server.log[start:logged])
                    for key, count in seen.most_common():
                        print(f"    {count:6d}  {' '.join(key)}")
                start = logged
    worst = min(r[1] / r[2] for r in results)
    print(f"slowest phase: {worst:.1f} reconciles/s")
    print_ratio(f"slowest phase/target ({TARGET:.0f} reconciles/s)", worst / TARGET, "target >= 1x")
    return 0


async def _probe_served(cluster, call) -> bool:
    vm = await call(cluster.kube.get_vm, NS, "probe")
    return bool(vm and (vm.get("status") or {}).get("printableStatus"))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
