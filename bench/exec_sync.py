"""Benchmark: ExecSync of `true` through the CRI socket vs `virsh qemu-agent-command` doing the same guest-exec.

    .venv/bin/python bench/exec_sync.py [--runs 30] [--quick]

One vmlet daemon of the bench's own with one VM pod (bench/vm_pod.py), and in the same run on the same
guest, interleaved so load changes hit every kind alike:
- vmlet: `ExecSync(cmd=["true"])` over the CRI socket, timed from the call to its answer (the kubelet's
  exec probe: gRPC, the daemon, libvirt's qemuAgentCommand, the agent, polling until it exited);
- baseline: `virsh -c qemu:///system qemu-agent-command DOMAIN` (one process per agent command, as an
  administrator would run it) sending the very `guest-exec` request vmlet sends for `true` (its output-capping
  wrapper included: cri_shim/guest_agent.py `exec_request`), then `guest-exec-status` polled on vmlet's
  schedule (20 ms, growing 1.5x, at most 250 ms) until it exited with code 0;
- for information: the same two agent commands through libvirt_qemu.qemuAgentCommand in this process
  (guest_agent.run, the code vmlet runs), so the gRPC + daemon share shows apart from virsh's process starts.
It prints the median and p90 of each and the ratio of the medians (target vmlet/virsh <= 1.3x); it does not
assert. The pod, the daemon and its network go at the end, also on failure, and it exits non-zero if
anything was left.
"""

from __future__ import annotations

import base64
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import BenchArgs, exit_status, print_ratio  # noqa: E402
from bench.vm_pod import percentile, running_vm, wait_agent  # noqa: E402
from cri_shim import guest_agent  # noqa: E402
from proto.runtime.v1 import api_pb2  # noqa: E402
from tests.support import libvirt_env  # noqa: E402

CMD = ["true"]


def vmlet_exec(pod) -> float:
    start = time.perf_counter()
    resp = pod.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=pod.container_id, cmd=CMD, timeout=30),
                                timeout=60)
    took = time.perf_counter() - start
    if resp.exit_code != 0 or resp.stdout or resp.stderr:
        raise RuntimeError(f"ExecSync {CMD}: exit {resp.exit_code}, stdout {resp.stdout!r}, stderr {resp.stderr!r}")
    return took


def virsh_agent(domain: str, command: str, arguments: dict):
    out = subprocess.run(["virsh", "-c", libvirt_env.LIBVIRT_URI, "qemu-agent-command", domain, "--timeout", "5",
                          json.dumps({"execute": command, "arguments": arguments})],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"virsh qemu-agent-command {command}: {out.stderr.strip()}")
    return guest_agent.parse_reply(out.stdout, command)


def virsh_exec(domain: str) -> float:
    start = time.perf_counter()
    pid = virsh_agent(domain, "guest-exec", guest_agent.exec_request(CMD, None, None, None))["pid"]
    delay = 0.02
    while True:
        status = virsh_agent(domain, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            break
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    took = time.perf_counter() - start
    out = base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))
    if status.get("exitcode") != 0 or out:
        raise RuntimeError(f"guest-exec {CMD} via virsh: {status}")
    return took


def in_process_exec(dom) -> float:
    start = time.perf_counter()
    result = guest_agent.run(dom, CMD, timeout=30)
    took = time.perf_counter() - start
    if result.exit_code != 0 or result.stdout or result.stderr:
        raise RuntimeError(f"guest_agent.run {CMD}: {result}")
    return took


def line(what: str, xs: list[float]) -> str:
    return f"{what:<48}{statistics.median(xs) * 1000:9.1f}{percentile(xs, 90) * 1000:9.1f}"


def main() -> int:
    cli = BenchArgs(__doc__)
    cli.count("--runs", 30, 3, "round trips of each kind; median and p90 count")
    args = cli.parse()
    ours, virsh, direct = [], [], []
    with running_vm("exec-bench") as pod:
        wait_agent(pod)
        conn = libvirt_env.connect()
        try:
            dom = conn.lookupByName(pod.domain)
            # Warm-up, untimed (the first guest-exec after boot pays for the guest's cold caches).
            vmlet_exec(pod)
            virsh_exec(pod.domain)
            in_process_exec(dom)
            for _ in range(args.runs):  # interleaved, so load changes hit each kind alike
                ours.append(vmlet_exec(pod))
                virsh.append(virsh_exec(pod.domain))
                direct.append(in_process_exec(dom))
        finally:
            conn.close()
    print(f"accelerator: {libvirt_env.DOMAIN_TYPE}, runs: {args.runs}, command {CMD}")
    print(f"{'round trip (ms)':<48}{'median':>9}{'p90':>9}")
    print(line("vmlet ExecSync through the CRI socket", ours))
    print(line("virsh qemu-agent-command guest-exec + status", virsh))
    print(line("qemuAgentCommand in-process (guest_agent.run)", direct))
    print_ratio("vmlet ExecSync/virsh qemu-agent-command (median)",
                statistics.median(ours) / statistics.median(virsh), "target <= 1.3x")
    print_ratio("vmlet ExecSync/in-process qemuAgentCommand (median)",
                statistics.median(ours) / statistics.median(direct), "for information: gRPC and the daemon")
    return exit_status(pod.left)


if __name__ == "__main__":
    sys.exit(main())
