"""Benchmark: port-forward throughput through the streaming URL vs a direct TCP connection from the pod netns.

    .venv/bin/python bench/port_forward.py [--mib 48] [--runs 5] [--quick]

One vmlet daemon of the bench's own with one VM pod (bench/vm_pod.py) under the masquerade binding (the
one port-forward reaches today, docs/attach.md), whose user data starts a sink in the guest: busybox
`nc -ll -p 7000` running `wc -c` on each connection, which reads to EOF and answers the byte count. Bulk
goes one way, into the guest, as that is where a TCG guest is fastest; both kinds send --mib MiB of
random bytes, half-close, and are timed until the guest's count came back (and must equal what was sent):
- vmlet: the CRI PortForward URL (asked once, untimed, as kubectl does per session) with the SPDY client
  tests/support/spdyclient (client-go's port-forward over moby/spdystream) piping a file on stdin:
  spdyclient -> vmlet's streaming server -> its TCP connection from the pod netns -> guest, timed from
  the client's start (its start and the SPDY handshake, a few ms, are in it);
- baseline: a TCP connection this process opens inside the pod's netns to the same address vmlet's
  port_forward.py connects to (the pod network record's vm_ip), fed from memory.
Interleaved --runs times; the medians count (target vmlet/direct >= 0.7x). It reports; it does not
assert. The pod, the daemon and its network go at the end, also on failure, and it exits non-zero if
anything was left.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, exit_status, print_ratio  # noqa: E402
from bench.vm_pod import TIMEOUT, running_vm, wait_log  # noqa: E402
from cri_shim.network import netns  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import spdyclient  # noqa: E402

PORT = 7000
MIB = 1 << 20
# The test image runs a #! user data script at boot; -e must be last, so the sink is a script of its own.
GUEST_SINK = f"""#!/bin/sh
printf '#!/bin/sh\\nexec wc -c\\n' > /bench-sink.sh
chmod +x /bench-sink.sh
busybox nc -ll -p {PORT} -e /bench-sink.sh </dev/null >/dev/null 2>&1 &
echo BENCH-SINK-UP
"""


def counted(answer: bytes, sent: int, what: str) -> None:
    if answer.strip() != str(sent).encode():
        raise RuntimeError(f"{what}: the guest's sink counted {answer[:200]!r}, {sent} bytes were sent")


def through_vmlet(client_bin: Path, url: str, payload: Path, size: int) -> float:
    with open(payload, "rb") as stdin:
        start = time.perf_counter()
        proc = subprocess.run([str(client_bin), "portforward", url, str(PORT)], stdin=stdin,
                              capture_output=True, timeout=TIMEOUT)
        took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"spdyclient portforward exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    counted(proc.stdout, size, "through vmlet's port-forward")
    return took


def direct(ns_path: str, host: str, data: bytes) -> float:
    start = time.perf_counter()
    sock = netns.connect_tcp(ns_path, host, PORT, 10)
    try:
        sock.settimeout(TIMEOUT)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the sink answers at EOF
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    finally:
        sock.close()
    took = time.perf_counter() - start
    counted(answer, len(data), f"direct to {host}:{PORT}")
    return took


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--mib", 48, 1, "MiB sent into the guest per transfer")
    cli.count("--runs", 5, 1, "transfers of each kind; the medians count")
    args = cli.parse()
    client_bin = spdyclient.build()  # fails naming the Debian package when Go or spdystream is missing
    size = args.mib * MIB
    data = os.urandom(size)
    ours, base = [], []
    with running_vm("pf-bench", {"vmlet.dev/network-binding": "masquerade",
                                 "VirtletCloudInitUserDataScript": GUEST_SINK}) as pod:
        payload = pod.work / "payload"  # the client's stdin, in the work dir: removed with it
        payload.write_bytes(data)
        wait_log(pod.log, r"stdout F BENCH-SINK-UP$", TIMEOUT)
        pn = pod.network.get(pod.sandbox_id)
        if pn is None or not pn.vm_ip:
            raise RuntimeError(f"no pod network recorded for sandbox {pod.sandbox_id}")

        def url() -> str:
            return pod.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod.sandbox_id, port=[PORT]),
                                           timeout=60).url

        # Warm-up, untimed: the guest's first connections (ARP, nc's first fork) cost both kinds alike.
        through_vmlet(client_bin, url(), payload, size)
        direct(pn.netns_path, pn.vm_ip, data)
        for _ in range(args.runs):  # interleaved, so load changes hit both alike
            ours.append(through_vmlet(client_bin, url(), payload, size))
            base.append(direct(pn.netns_path, pn.vm_ip, data))
    med_ours, med_base = size / MIB / statistics.median(ours), size / MIB / statistics.median(base)
    print(f"runs: {args.runs}, {args.mib} MiB into the guest's sink ({pn.vm_ip}:{PORT}, masquerade binding) each")
    print(f"{'MB/s (MiB/s)':<56}{'median':>9}{'best':>9}")
    print(f"{'vmlet port-forward URL, SPDY client (spdyclient)':<56}{med_ours:9.1f}{size / MIB / min(ours):9.1f}")
    print(f"{'direct TCP from the pod netns':<56}{med_base:9.1f}{size / MIB / min(base):9.1f}")
    print_ratio("vmlet port-forward/direct throughput (median)", med_ours / med_base, "target >= 0.7x")
    return exit_status(pod.left)


if __name__ == "__main__":
    sys.exit(main())
