"""What the benches that start VM pods share: a vmlet daemon of the bench's own, and the sweep after it.

Not a bench itself (tests/integration/test_bench_quick.py lists it as a helper). `vmlet_daemon()`
sets up the test image on a loopback image server, a private CNI network (no NAT, no route out of
the machine; the node's /etc/cni/net.d is not used), `python -m cri_shim.main` as a process with its
CRI socket, and pulls the test image. On leaving, also on failure or Ctrl-C, it prints the daemon's
log tail if something failed, stops the daemon, runs the bench's `after_stop` callbacks (once the
domains are gone) and `leftovers` removes and names anything still there: `left` is the list for
`cli.exit_status`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cri_shim.network import NetworkManager, netns  # noqa: E402
from cri_shim.network.names import netns_name  # noqa: E402
from cri_shim.storage import pod_volumes  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import cri, images, libvirt_env, netsupport  # noqa: E402
from tests.support.http_server import ImageServer  # noqa: E402

IMAGE = "virtlet.cloud/testvm"
TIMEOUT = 180  # s: a TCG boot on a loaded 2-core machine, an RPC


def leftovers(conn, state_dir: Path, network: netsupport.TestNetwork, conf_dir: Path,
              sandboxes: list[str]) -> list[str]:
    """What the run left once the daemon is stopped (all of it removed here): domains, pod
    networks, dnsmasq, pod IPs. The bench's CNI bridge goes with the network."""
    left = libvirt_env.sweep(conn)  # this run's domains (libvirt_env.RUN_PREFIX) and dead test runs'
    if state_dir.exists():
        pod_volumes.unmount_under(state_dir)
        left += NetworkManager(state_dir, conf_dir, [netsupport.CNI_BIN_DIR]).sweep([])
    left += [f"netns of sandbox {sid}" for sid in sandboxes if netns.exists(netns.path_of(netns_name(sid)))]
    left += [f"pod IP {ip}" for ip in network.allocated_ips()]
    return left + [x for x in netsupport.leftovers() if x != f"link {network.bridge}"]


@dataclass
class BenchDaemon:
    client: cri.Client
    image: Path
    image_ref: str  # the pulled test image's digest
    work: Path
    network: netsupport.TestNetwork
    conf_dir: Path
    sandboxes: list[str] = field(default_factory=list)  # every pod the bench made: checked by the sweep
    # Run after the daemon stopped, before the sweep's results are final; each returns what it found left.
    after_stop: list[Callable[[], list[str]]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # filled on leaving


@contextlib.contextmanager
def vmlet_daemon() -> Iterator[BenchDaemon]:
    image = images.build_test_image()
    conn = libvirt_env.connect()
    libvirt_env.WORK_ROOT.mkdir(parents=True, exist_ok=True)
    libvirt_env.WORK_ROOT.chmod(0o755)
    # STATE_MARK in the path marks the pods' dnsmasq (its pid file is in the state dir) as this process's.
    work = Path(tempfile.mkdtemp(prefix=f"bench-{netsupport.STATE_MARK}-", dir=libvirt_env.WORK_ROOT))
    work.chmod(0o711)
    server = ImageServer().start()
    bench: BenchDaemon | None = None
    try:
        with netsupport.private_network(work, "vmlet-bench") as (network, conf_dir):
            config = work / "vmlet.yaml"
            cri.write_config(config, work / "state", work / "vmlet.sock",
                             cri.translations_for(work / "t.yaml", {"testvm": server.serve_file("/t.qcow2", image)}),
                             log_level="warning", cni_conf_dir=str(conf_dir), cni_bin_dirs=[netsupport.CNI_BIN_DIR])
            daemon = cri.VmletProcess(work / "state", work / "vmlet.sock", config, work / "vmlet.log")
            sandboxes: list[str] = []
            after_stop: list[Callable[[], list[str]]] = []
            left: list[str] = []
            try:
                client = daemon.start()
                ref = client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=IMAGE)),
                                              timeout=TIMEOUT).image_ref
                bench = BenchDaemon(client, image, ref, work, network, conf_dir, sandboxes, after_stop, left)
                yield bench
            except BaseException:
                print(f"vmlet's log (tail):\n{daemon.log()[-3000:]}", file=sys.stderr)
                raise
            finally:
                daemon.stop()
                left += leftovers(conn, work / "state", network, conf_dir, sandboxes)
                for callback in after_stop:  # after the domains are gone: none holds what it releases
                    left += callback()
    finally:
        server.stop()
        conn.close()
        subprocess.run(["rm", "-rf", str(work)])
