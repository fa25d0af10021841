"""What the streaming benches share: one vmlet daemon of the bench's own with one running VM pod in it.

Not a bench itself (tests/integration/test_bench_quick.py lists it as a helper). `running_vm()` starts
bench/daemon.py's `vmlet_daemon()` (the test image on a loopback image server, a private CNI network,
`python -m cri_shim.main` with its CRI socket and streaming server on loopback), then one VM pod through
the CRI as the kubelet does, and waits for the guest's ready marker in the container's CRI log. On
leaving, also on failure or Ctrl-C, the pod goes through the CRI, the daemon stops and the sweep removes
and names anything still there (domains, pod networks, dnsmasq, pod IPs): `pod.left` is the list for
`cli.exit_status`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.daemon import IMAGE, TIMEOUT, vmlet_daemon  # noqa: E402
from cri_shim.network import NetworkManager  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, netsupport  # noqa: E402

READY = r"stdout F VMLET-TESTVM: ready$"


@dataclass
class VmPod:
    client: cri.Client
    work: Path
    sandbox_id: str
    container_id: str
    domain: str  # the libvirt domain's name
    log: Path  # the container's CRI log
    network: NetworkManager  # reads the daemon's pod network records (netns, guest address)
    left: list[str] = field(default_factory=list)  # filled in when running_vm() ends

    @property
    def runtime(self):
        return self.client.runtime


def wait_log(path: Path, pattern: str, timeout: float) -> re.Match:
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if m := regex.search(text):
            return m
        time.sleep(0.2)
    raise TimeoutError(f"{pattern!r} not in {path} after {timeout}s; its tail:\n{text[-2000:]}")


def wait_agent(pod: VmPod, timeout: float = TIMEOUT) -> None:
    """Until ExecSync reaches the guest agent (it connects a little after the ready marker)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pod.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=pod.container_id, cmd=["true"], timeout=10),
                                 timeout=60)
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def percentile(xs: list[float], p: float) -> float:
    """Nearest rank: p90 of 10 samples is the 9th smallest."""
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, math.ceil(len(xs) * p / 100) - 1))] if xs else float("nan")


@contextlib.contextmanager
def running_vm(name: str, annotations: dict[str, str] | None = None, stdin: bool = False) -> Iterator[VmPod]:
    """A vmlet daemon with one VM pod `name`, its guest booted (ready marker); everything removed after."""
    pod: VmPod | None = None
    with vmlet_daemon() as bench:
        def report_unclaimed() -> list[str]:  # nobody gets pod.left when the pod never came up
            if pod is None and bench.left:
                print(f"left behind (removed now): {bench.left}", file=sys.stderr)
            return []

        bench.after_stop.append(report_unclaimed)
        rt, work = bench.client.runtime, bench.work
        logs = work / "pods" / name
        pod_cfg = cri.pod_config(name=name, log_directory=str(logs), annotations=annotations)
        sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_cfg), timeout=TIMEOUT).pod_sandbox_id
        bench.sandboxes.append(sid)
        try:
            ccfg = cri.container_config(IMAGE)
            ccfg.stdin = stdin  # what the kubelet sets for `kubectl run -i`: attach may write
            cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=sid, config=ccfg, sandbox_config=pod_cfg), timeout=TIMEOUT).container_id
            rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=TIMEOUT)
            info = json.loads(rt.ContainerStatus(api_pb2.ContainerStatusRequest(
                container_id=cid, verbose=True), timeout=TIMEOUT).info["info"])
            # pod.left is the daemon's list: filled when the daemon stops, read by the bench after this block.
            pod = VmPod(bench.client, work, sid, cid, info["domain"], logs / "vm" / "0.log",
                        NetworkManager(work / "state", bench.conf_dir, [netsupport.CNI_BIN_DIR]), bench.left)
            wait_log(pod.log, READY, TIMEOUT)
            yield pod
        finally:
            try:
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=TIMEOUT)
            except grpc.RpcError as e:  # e.g. Ctrl-C reached the daemon too: the sweep removes it
                print(f"cannot remove pod {name} ({sid}): {e.code().name}", file=sys.stderr)
