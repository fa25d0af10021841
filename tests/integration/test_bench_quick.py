"""Every benchmark runs on this machine as set up by the README, in its quick mode, as a user runs it.

`.venv/bin/python bench/X.py --quick` in a session of its own, without PYTHONPATH: it must exit 0
and print its ratio line (bench/cli.py `print_ratio`), and leave nothing behind — no process of
its session, no libvirt domain, netns, link or dnsmasq named after its pid, no work dir named after it
nor a pod network in one (its vmlet's pods are named after random sandbox IDs). A run that hangs is
stopped and cleaned up the same way, and fails. No timing is asserted: quick mode measures too little
for the figures to mean anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from cri_shim.storage import pod_volumes
from cri_shim.network import netns
from cri_shim.network.names import host_bridge, host_veth, netns_name
from proto.runtime.v1 import api_pb2
from tests.support import cri, libvirt_env, netsupport, spdyclient, storage
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
RATIO_LINE = re.compile(r"^ratio [^:\n]+: (\d+\.\d+)x", re.MULTILINE)
TIMEOUT = 600  # generous: a quick cri_boot is two TCG boots on a loaded 2-core machine
# Where the repo's programs put their work dirs, named after their pid (netsupport.state_dirs_of): the
# benches (libvirt_env.WORK_ROOT, the system temp dir) and deploy/demo.py (its STATE_ROOT).
WORK_ROOTS = (libvirt_env.WORK_ROOT, Path("/var/lib/vmlet-demo"), Path(tempfile.gettempdir()))
CONTAINERD_SOCKET = Path(os.environ.get("VMLET_TEST_CONTAINERD_SOCKET", "/run/vmlet-containerd/containerd.sock"))

# bench -> what it needs besides the venv (checked first, so a missing piece is named, not a traceback)
BENCHES = {
    "attach_echo": "libvirt",
    "cri_boot": "libvirt",
    "criproxy_latency": "containerd",
    "exec_sync": "libvirt",
    "image_pull": None,
    "list_containers": None,
    "network_overhead": "root",
    "port_forward": "libvirt+spdy",
    "root_boot": "libvirt",
    "root_import": "root",
    "vmapi_reconcile": None,
}
# bench modules that are not benches: what the others share
HELPERS = {"cli", "daemon", "vm_pod"}


def test_every_bench_is_covered():
    assert sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem not in HELPERS) == sorted(BENCHES)


def require_for(what: str | None) -> None:
    require(PYTHON.is_file(), f"{PYTHON} missing (run deploy/setup-host.sh)")
    if what == "libvirt+spdy":  # the SPDY test client (tests/support/spdyclient) as well
        why = spdyclient.missing()
        require(why is None, why or "")
        what = "libvirt"
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


def _attached_loops() -> list[Path]:
    return [Path("/dev") / e.name for e in Path("/sys/block").glob("loop*") if (e / "loop" / "backing_file").exists()]


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


def _work_dir_leftovers(pid: int) -> list[str]:
    """What the process `pid` left in its work dirs (named after it, see netsupport.state_dirs_of): the pod
    networks of its vmlet daemons, found only through their state dirs, then the dirs themselves."""
    left = netsupport.sweep_state_dirs_of(pid, WORK_ROOTS)
    for d in netsupport.state_dirs_of(pid, WORK_ROOTS):
        pod_volumes.unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)
        left.append(f"work dir {d}")
    return left


def _stop_session(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGINT first (the bench's finally blocks clean up), then SIGKILL of whatever its session still runs."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_as_user(argv: list[str], timeout: float = TIMEOUT, grace: float = 60) -> tuple[int, str, list[str]]:
    """Run a program of the repo as a user would (from the repo, no PYTHONPATH, a session of its own):
    (exit status, output, what it left: processes of its session, domains/netns/links/dnsmasq named
    after its pid, the pod networks in its work dirs and the dirs — removed here). A run past `timeout`
    is stopped (SIGINT, `grace` s, SIGKILL), cleaned up like any other, and fails the test."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, timed_out, left = "", False, []
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_session(proc, grace)
        out, _ = proc.communicate()
    finally:
        # Also when the run hung or this test is interrupted: a hung bench's VMs and pod networks go too.
        left = _session_processes(proc.pid)
        if left:
            _stop_session(proc, grace)
        left += _libvirt_leftovers(proc.pid)
        left += _work_dir_leftovers(proc.pid)  # before the sweep by pid: CNI DEL wants the bench's bridge
        left += netsupport.sweep_owned_by(proc.pid)
    if timed_out:
        pytest.fail(f"{' '.join(argv)} did not end within {timeout}s; it left: {left}; output:\n{out[-4000:]}")
    return proc.returncode, out, left


@pytest.mark.parametrize("bench", [pytest.param(b, marks=pytest.mark.libvirt) if need and need.startswith("libvirt")
                                   else b for b, need in BENCHES.items()])
def test_bench_runs_in_quick_mode(bench):
    require_for(BENCHES[bench])
    started = time.monotonic()
    loops_before = set(_attached_loops())
    rc, out, left = run_as_user([str(PYTHON), f"bench/{bench}.py", "--quick"])
    for dev in set(_attached_loops()) - loops_before:  # the storage benches' block PV stand-ins
        storage.detach_loop(dev)
        left.append(f"loop device {dev}")
    sys.stderr.write(f"bench/{bench}.py --quick: {time.monotonic() - started:.1f}s\n")  # CI cost, shown with -s
    assert rc == 0, f"bench/{bench}.py --quick exited {rc}; output:\n{out[-4000:]}"
    ratios = RATIO_LINE.findall(out)
    assert ratios, f"bench/{bench}.py --quick printed no ratio line; output:\n{out[-4000:]}"
    assert all(float(r) > 0 for r in ratios), ratios
    assert not left, f"bench/{bench}.py left behind: {left}"


HUNG_BENCH = """
import json, os, secrets, signal, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from cri_shim.network import NetworkManager
from tests.support import libvirt_env, netsupport

libvirt_env.WORK_ROOT.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp(prefix=f"bench-{{netsupport.STATE_MARK}}-", dir=libvirt_env.WORK_ROOT))
report = Path({report!r})
report.write_text(json.dumps({{"pid": os.getpid(), "work": str(work)}}))
with netsupport.private_network(work, "vmlet-hung") as (net, conf_dir):
    # as cri_boot's vmlet does: a pod network under <work>/state, named after a random sandbox ID
    sid = secrets.token_hex(32)
    NetworkManager(work / "state", conf_dir, [netsupport.CNI_BIN_DIR]).setup(
        sid, pod_namespace="bench", pod_name="hung", pod_uid="uid-hung")
    report.write_text(json.dumps({{"pid": os.getpid(), "work": str(work), "sid": sid}}))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # hung where SIGINT does not reach its finally blocks
    time.sleep(3600)
"""


def test_a_hung_bench_is_cleaned_up_and_what_it_left_reported(tmp_path):
    """A bench past its timeout that ignores SIGINT: the run fails naming what it left, and its pod
    network (netns and host links named after a random sandbox ID, dnsmasq, its bridge) and work dir are
    gone all the same."""
    require_for("root")
    report, script = tmp_path / "hung.json", tmp_path / "hung_bench.py"
    script.write_text(HUNG_BENCH.format(repo=str(REPO), report=str(report)))
    try:
        with pytest.raises(pytest.fail.Exception) as failed:
            run_as_user([str(PYTHON), str(script)], timeout=20, grace=2)
        info = json.loads(report.read_text())
        assert "sid" in info, f"the fake bench did not set its pod network up within 20 s:\n{failed.value}"
        sid, work = info["sid"], Path(info["work"])
        message = str(failed.value)
        assert "did not end within 20s" in message
        assert f"sandbox {sid} (state dir {work / 'state'})" in message, message
        assert f"work dir {work}" in message, message
        assert not netns.exists(netns.path_of(netns_name(sid)))
        assert not any(Path(f"/sys/class/net/{n}").exists() for n in (host_bridge(sid), host_veth(sid)))
        assert not work.exists()
        assert netsupport.owned_by(info["pid"]) == []
    finally:  # whatever the harness missed (old code: all of it)
        if report.exists():
            pid = json.loads(report.read_text())["pid"]
            _work_dir_leftovers(pid)
            netsupport.sweep_owned_by(pid)
