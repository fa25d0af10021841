"""Every benchmark runs on this machine as set up by the README, in its quick mode, as a user runs it.

`.venv/bin/python bench/X.py --quick` in a session of its own, without PYTHONPATH: it must exit 0
and print its ratio line (bench/cli.py `print_ratio`), and leave nothing behind — no process of
its session, no libvirt domain, netns, link or dnsmasq named after its pid. No timing is asserted:
quick mode measures too little for the figures to mean anything.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri, libvirt_env, netsupport
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
RATIO_LINE = re.compile(r"^ratio [^:\n]+: (\d+\.\d+)x", re.MULTILINE)
TIMEOUT = 600  # generous: a quick cri_boot is two TCG boots on a loaded 2-core machine
CONTAINERD_SOCKET = Path(os.environ.get("VMLET_TEST_CONTAINERD_SOCKET", "/run/vmlet-containerd/containerd.sock"))

# bench -> what it needs besides the venv (checked first, so a missing piece is named, not a traceback)
BENCHES = {
    "cri_boot": "libvirt",
    "criproxy_latency": "containerd",
    "image_pull": None,
    "list_containers": None,
    "network_overhead": "root",
    "vmapi_reconcile": None,
}


def test_every_bench_is_covered():
    assert sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "cli") == sorted(BENCHES)


def require_for(what: str | None) -> None:
    require(PYTHON.is_file(), f"{PYTHON} missing (run deploy/setup-host.sh)")
    if what == "libvirt":
        try:
            libvirt_env.connect().close()
        except Exception as e:  # noqa: BLE001 - libvirtError or ImportError
            require(False, f"libvirtd not reachable at {libvirt_env.LIBVIRT_URI}: {e} (run deploy/setup-host.sh)")
    elif what == "containerd":
        client = cri.connect(CONTAINERD_SOCKET)
        try:
            client.runtime.Version(api_pb2.VersionRequest(), timeout=5)
        except grpc.RpcError as e:
            require(False, f"containerd not answering on {CONTAINERD_SOCKET}: {e.code()} "
                           "(run deploy/containerd/setup-containerd.sh)")
        finally:
            client.close()
    if what in ("root", "libvirt"):
        require(os.geteuid() == 0, "needs root (network namespaces, bridges)")


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.split(None, 1)[0] == str(sid)]


def _libvirt_leftovers(pid: int) -> list[str]:
    prefix = f"{libvirt_env.TEST_PREFIX}{pid}-"
    try:
        conn = libvirt_env.connect()
    except Exception:  # noqa: BLE001 - no libvirt here: nothing can be left in it
        return []
    try:
        doms = [d for d in conn.listAllDomains() if d.name().startswith(prefix)]
        for d in doms:
            libvirt_env.remove_domain(d)
        return [f"domain {d.name()}" for d in doms]
    finally:
        conn.close()


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGINT first (the bench's finally blocks clean up), then SIGKILL of whatever its session still runs."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_as_user(argv: list[str], timeout: float = TIMEOUT) -> tuple[int, str, list[str]]:
    """Run a program of the repo as a user would (from the repo, no PYTHONPATH, a session of its own):
    (exit status, output, what it left: processes of its session, domains/netns/links/dnsmasq named
    after its pid — removed here). A run past `timeout` fails the test."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_session(proc)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv)} did not end within {timeout}s; output:\n{out[-4000:]}")
    finally:
        left = _session_processes(proc.pid)
        if left:
            _stop_session(proc)
    left += _libvirt_leftovers(proc.pid)
    left += netsupport.sweep_owned_by(proc.pid)
    return proc.returncode, out, left


@pytest.mark.parametrize("bench", [pytest.param(b, marks=pytest.mark.libvirt) if need == "libvirt" else b
                                   for b, need in BENCHES.items()])
def test_bench_runs_in_quick_mode(bench):
    require_for(BENCHES[bench])
    started = time.monotonic()
    rc, out, left = run_as_user([str(PYTHON), f"bench/{bench}.py", "--quick"])
    sys.stderr.write(f"bench/{bench}.py --quick: {time.monotonic() - started:.1f}s\n")  # CI cost, shown with -s
    assert rc == 0, f"bench/{bench}.py --quick exited {rc}; output:\n{out[-4000:]}"
    ratios = RATIO_LINE.findall(out)
    assert ratios, f"bench/{bench}.py --quick printed no ratio line; output:\n{out[-4000:]}"
    assert all(float(r) > 0 for r in ratios), ratios
    assert not left, f"bench/{bench}.py left behind: {left}"
