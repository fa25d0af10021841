"""Benchmark: time networking adds to a VM pod's start (RunPodSandbox with vs without CNI's work).

    .venv/bin/python bench/network_overhead.py [--runs 10] [--quick]

Measured in the same run on this host, with Debian's bridge + host-local
plugins on a private test range:
- "with": NetworkManager.setup + teardown of a pod network (netns, CNI ADD, the
  bridge binding's links, dnsmasq), as RunPodSandbox/StopPodSandbox run them;
- "without": what a sandbox without a pod network would still cost: creating
  and removing its bare network namespace.
The added time is also shown against a whole VM pod start (bench/cri_boot.py
measures that one). It reports; it does not assert.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, exit_status, print_ratio  # noqa: E402
from cri_shim.network import NetworkManager, netns  # noqa: E402
from tests.support import netsupport  # noqa: E402


def timed_setups(nm: NetworkManager, runs: int, binding: str = "bridge") -> tuple[list[float], list[float]]:
    setups, teardowns = [], []
    for i in range(runs):
        sid = netsupport.new_sandbox_id()
        t = time.perf_counter()
        nm.setup(sid, pod_namespace="bench", pod_name=f"pod-{i}", pod_uid=f"uid-{i}", hostname=f"pod-{i}",
                 binding=binding)
        setups.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        nm.remove(sid)
        teardowns.append((time.perf_counter() - t) * 1000)
    return setups, teardowns


def timed_bare_netns(runs: int) -> tuple[list[float], list[float]]:
    creates, removes = [], []
    for _ in range(runs):
        name = f"vmlet-{netsupport.new_sandbox_id()[:16]}"
        t = time.perf_counter()
        netns.create(name)
        creates.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        netns.remove(name)
        removes.append((time.perf_counter() - t) * 1000)
    return creates, removes


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--runs", 10, 1, "set-ups of each kind; the median counts")
    args = cli.parse()
    # STATE_MARK in the path marks the pods' dnsmasq (pid file in the state dir) as this process's.
    with tempfile.TemporaryDirectory(prefix=f"{netsupport.STATE_MARK}-netbench-") as tmp:
        tmp = Path(tmp)
        with netsupport.private_network(tmp, "vmlet-bench") as (net, conf_dir):
            managers = [NetworkManager(tmp / s, conf_dir, [netsupport.CNI_BIN_DIR]) for s in ("s1", "s2")]
            try:
                with_cni = timed_setups(managers[0], args.runs)
                masq = timed_setups(managers[1], args.runs, "masquerade")
                lo_only = timed_bare_netns(args.runs)
            finally:
                # What teardown missed (removed here; the rest goes with the network): pod networks,
                # netns, links, dnsmasq, IPs.
                left = [x for nm in managers for x in nm.sweep([])]
                left += [x for x in netsupport.leftovers() if x != f"link {net.bridge}"]
                left += [f"pod IP {ip}" for ip in net.allocated_ips()]
    med = statistics.median
    print(f"runs: {args.runs} (median ms)                 setup   teardown")
    print(f"pod network, bridge binding:              {med(with_cni[0]):7.1f}  {med(with_cni[1]):7.1f}")
    print(f"pod network, masquerade binding:          {med(masq[0]):7.1f}  {med(masq[1]):7.1f}")
    print(f"baseline: bare network namespace:         {med(lo_only[0]):7.1f}  {med(lo_only[1]):7.1f}")
    added = med(with_cni[0]) - med(lo_only[0])
    print(f"networking adds {med(with_cni[0]):.0f} ms to RunPodSandbox ({added:.0f} ms beyond a bare namespace)")
    print_ratio("pod network/bare namespace setup (bridge binding)", med(with_cni[0]) / med(lo_only[0]))
    return exit_status(left)


if __name__ == "__main__":
    sys.exit(main())
