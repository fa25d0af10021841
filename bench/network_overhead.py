"""Benchmark: time networking adds to a VM pod's start (RunPodSandbox with vs without CNI's work).

    .venv/bin/python bench/network_overhead.py [--runs 10]

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

import argparse
import ipaddress
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    forwarding = netns.read_sysctl("net/ipv4/ip_forward")
    with tempfile.TemporaryDirectory(prefix="vmlet-netbench-") as tmp:
        tmp = Path(tmp)
        net = netsupport.TestNetwork(name="vmlet-bench", bridge=netsupport.test_name(),
                                     subnet=netsupport.pick_subnet(),
                                     extra_route=ipaddress.IPv4Network("10.214.254.0/24"), ipam_dir=tmp / "ipam")
        netsupport.write_conf(tmp / "full", "10-bench.conflist", net.conflist())
        try:
            with_cni = timed_setups(NetworkManager(tmp / "s1", tmp / "full", [netsupport.CNI_BIN_DIR]), args.runs)
            masq = timed_setups(NetworkManager(tmp / "s3", tmp / "full", [netsupport.CNI_BIN_DIR]), args.runs,
                                "masquerade")
            lo_only = timed_bare_netns(args.runs)
        finally:
            netsupport.sweep()
            if forwarding is not None:
                netns.write_sysctl("net/ipv4/ip_forward", forwarding)
    med = statistics.median
    print(f"runs: {args.runs} (median ms)                 setup   teardown")
    print(f"pod network, bridge binding:              {med(with_cni[0]):7.1f}  {med(with_cni[1]):7.1f}")
    print(f"pod network, masquerade binding:          {med(masq[0]):7.1f}  {med(masq[1]):7.1f}")
    print(f"baseline: bare network namespace:         {med(lo_only[0]):7.1f}  {med(lo_only[1]):7.1f}")
    added = med(with_cni[0]) - med(lo_only[0])
    print(f"networking adds {med(with_cni[0]):.0f} ms to RunPodSandbox ({added:.0f} ms beyond a bare "
          f"namespace); ratio with/without: {med(with_cni[0]) / med(lo_only[0]):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
