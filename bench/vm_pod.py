"""What the streaming benches share: one vmlet daemon of the bench's own with one running VM pod in it.

Not a bench itself (tests/integration/test_bench_quick.py lists it as a helper). `running_vm()` sets up
what bench/cri_boot.py sets up — the test image on a loopback image server, a private CNI network (no
NAT, no route out of the machine), `python -m cri_shim.main` as a process with its CRI socket and
streaming server on loopback — then starts one VM pod through the CRI as the kubelet does and waits for
the guest's ready marker in the container's CRI log. On leaving, also on failure or Ctrl-C, the pod goes
through the CRI, the daemon stops and cri_boot's `leftovers` removes and names anything still there
(domains, pod networks, dnsmasq, pod IPs): `pod.left` is the list for `cli.exit_status`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cri_boot import leftovers  # noqa: E402
from cri_shim.network import NetworkManager  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, images, libvirt_env, netsupport  # noqa: E402
from tests.support.http_server import ImageServer  # noqa: E402

IMAGE = "virtlet.cloud/testvm"
TIMEOUT = 180  # s: a TCG boot on a loaded 2-core machine, an RPC
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
    image = images.build_test_image()
    conn = libvirt_env.connect()
    libvirt_env.WORK_ROOT.mkdir(parents=True, exist_ok=True)
    libvirt_env.WORK_ROOT.chmod(0o755)
    # STATE_MARK in the path marks the pods' dnsmasq (its pid file is in the state dir) as this process's.
    work = Path(tempfile.mkdtemp(prefix=f"bench-{netsupport.STATE_MARK}-", dir=libvirt_env.WORK_ROOT))
    work.chmod(0o711)
    server = ImageServer().start()
    sandboxes: list[str] = []
    pod: VmPod | None = None
    try:
        with netsupport.private_network(work, "vmlet-bench") as (network, conf_dir):
            config = work / "vmlet.yaml"
            cri.write_config(config, work / "state", work / "vmlet.sock",
                             cri.translations_for(work / "t.yaml", {"testvm": server.serve_file("/t.qcow2", image)}),
                             log_level="warning", cni_conf_dir=str(conf_dir), cni_bin_dirs=[netsupport.CNI_BIN_DIR])
            daemon = cri.VmletProcess(work / "state", work / "vmlet.sock", config, work / "vmlet.log")
            try:
                client = daemon.start()
                rt = client.runtime
                client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=IMAGE)),
                                        timeout=TIMEOUT)
                logs = work / "pods" / name
                pod_cfg = cri.pod_config(name=name, log_directory=str(logs), annotations=annotations)
                sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_cfg), timeout=TIMEOUT).pod_sandbox_id
                sandboxes.append(sid)
                try:
                    ccfg = cri.container_config(IMAGE)
                    ccfg.stdin = stdin  # what the kubelet sets for `kubectl run -i`: attach may write
                    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
                        pod_sandbox_id=sid, config=ccfg, sandbox_config=pod_cfg), timeout=TIMEOUT).container_id
                    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=TIMEOUT)
                    info = json.loads(rt.ContainerStatus(api_pb2.ContainerStatusRequest(
                        container_id=cid, verbose=True), timeout=TIMEOUT).info["info"])
                    pod = VmPod(client, work, sid, cid, info["domain"], logs / "vm" / "0.log",
                                NetworkManager(work / "state", conf_dir, [netsupport.CNI_BIN_DIR]))
                    wait_log(pod.log, READY, TIMEOUT)
                    yield pod
                finally:
                    try:
                        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=TIMEOUT)
                    except grpc.RpcError as e:  # e.g. Ctrl-C reached the daemon too: the sweep below removes it
                        print(f"cannot remove pod {name} ({sid}): {e.code().name}", file=sys.stderr)
            except BaseException:
                print(f"vmlet's log (tail):\n{daemon.log()[-3000:]}", file=sys.stderr)
                raise
            finally:
                daemon.stop()
                left = leftovers(conn, work / "state", network, conf_dir, sandboxes)
                if pod is not None:
                    pod.left = left
                elif left:
                    print(f"left behind (removed now): {left}", file=sys.stderr)
    finally:
        server.stop()
        conn.close()
        subprocess.run(["rm", "-rf", str(work)])
