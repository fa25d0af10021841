"""The CRI fuzz suite's daemon, its live objects, and the hypothesis profiles.

One real vmlet daemon per test module (starting one per example would cost more than
the examples), with the same set-up as tests/integration/cri/conftest.py: the test image
on a loopback HTTP server, the tests' own CNI network, names scoped to the pytest pid.
Around every example `Fuzzer.check` snapshots the host, sends the request, removes
whatever the example made, and fails on a wrong code, a missed deadline, a dead daemon or
anything left on the host; the module's teardown then proves nothing is left at all.

Profiles (VMLET_FUZZ, shared with the proxy and controller suites): `ci` (default) is
derandomized with bounded example counts; `long` multiplies the counts and draws new
examples on every run (hypothesis prints the seed of a failure). No example database
is written (the repo stays clean).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, Phase, settings

from cri_shim.storage import pod_volumes
from cri_shim.network import NetworkManager
from proto.runtime.v1 import api_pb2
from tests.support import cri, libvirt_env, netsupport
from tests.support.fuzz_profile import PROFILE
from tests.support.http_server import ImageServer

from . import calls, hostwatch
from .protofuzz import Pools, Rpc, rpcs

TESTVM = "virtlet.cloud/testvm"
SCALE = {"ci": 1, "long": 20}

# No explain phase: it re-runs a failing example many times against the daemon (minutes per failure).
_common = dict(deadline=None, database=None, print_blob=True,
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=10, derandomize=True, **_common)
settings.register_profile("long", max_examples=200, derandomize=False, **_common)
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """n examples in CI, more in the long profile."""
    return n * SCALE[PROFILE]


RPCS = {r.name: r for r in rpcs()}


class Live:
    """The objects fuzzed requests may name by their real ID: kept in a known state between examples.

    - `busy`: a READY sandbox with one CREATED container (not started: nothing boots);
    - `empty`: a READY sandbox without a container;
    - `stopped`: a NOTREADY sandbox.
    An example that removes or changes one gets it rebuilt before the next example.
    """

    def __init__(self, client: cri.Client, log_dir: Path) -> None:
        self.client = client
        self.log_dir = log_dir
        self.sandboxes: dict[str, str] = {}  # role -> id
        self.container = ""
        self.pod_configs: dict[str, api_pb2.PodSandboxConfig] = {}
        self.image_ref = ""
        self.known_ids: set[str] = set()  # every ID the daemon ever gave out in this module

    def pod_config(self) -> api_pb2.PodSandboxConfig:
        return cri.pod_config(log_directory=str(self.log_dir))

    def container_config(self) -> api_pb2.ContainerConfig:
        return cri.container_config(TESTVM)

    def pools(self) -> Pools:
        return Pools(sandboxes=list(self.sandboxes.values()), containers=[self.container] if self.container else [],
                     images=[TESTVM, self.image_ref, self.image_ref.removeprefix("sha256:")[:12],
                             "virtlet.cloud/not-there"])

    def ids(self) -> set[str]:
        return set(self.sandboxes.values()) | ({self.container} if self.container else set())

    def ensure(self) -> None:
        rt, im = self.client.runtime, self.client.images
        status = im.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=20)
        if not status.image.id:
            self.image_ref = im.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)),
                                          timeout=120).image_ref
        else:
            self.image_ref = status.image.id if status.image.id.startswith("sha256:") else "sha256:" + status.image.id
        sandboxes = {s.id: s for s in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=20).items}
        containers = {c.id: c for c in rt.ListContainers(api_pb2.ListContainersRequest(), timeout=20).containers}
        in_sb = {}
        for c in containers.values():
            in_sb.setdefault(c.pod_sandbox_id, []).append(c)

        def fine(role: str) -> bool:
            sid = self.sandboxes.get(role)
            sb = sandboxes.get(sid)
            if sb is None:
                return False
            cs = in_sb.get(sid, [])
            if role == "busy":
                return sb.state == api_pb2.SANDBOX_READY and len(cs) == 1 and cs[0].id == self.container \
                    and cs[0].state == api_pb2.CONTAINER_CREATED
            if role == "empty":
                return sb.state == api_pb2.SANDBOX_READY and not cs
            return sb.state == api_pb2.SANDBOX_NOTREADY and not cs

        keep = {self.sandboxes[r] for r in ("busy", "empty", "stopped") if r in self.sandboxes and fine(r)}
        for sid in sandboxes:
            if sid not in keep:
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        for role in ("busy", "empty", "stopped"):
            if self.sandboxes.get(role) in keep:
                continue
            pod = self.pod_config()
            sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
            self.known_ids.add(sid)
            self.sandboxes[role], self.pod_configs[sid] = sid, pod
            if role == "busy":
                self.container = rt.CreateContainer(api_pb2.CreateContainerRequest(
                    pod_sandbox_id=sid, config=self.container_config(), sandbox_config=pod),
                    timeout=120).container_id
                self.known_ids.add(self.container)
            if role == "stopped":
                rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)

    def remove_strays(self) -> None:
        """Remove every sandbox and container that is not one of the live ones (an example made it)."""
        rt = self.client.runtime
        live = self.ids()
        for c in rt.ListContainers(api_pb2.ListContainersRequest(), timeout=20).containers:
            self.known_ids.add(c.id)
            if c.id not in live:
                rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=c.id), timeout=120)
        for s in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=20).items:
            self.known_ids.add(s.id)
            if s.id not in live:
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=s.id), timeout=120)


class Fuzzer:
    def __init__(self, proc: cri.VmletProcess, daemon_dir: Path, watch: hostwatch.HostWatch, live: Live) -> None:
        self.proc, self.daemon_dir, self.watch, self.live = proc, daemon_dir, watch, live
        self.answers: list[calls.Answer] = []

    @property
    def client(self) -> cri.Client:
        return self.proc.client

    def check(self, requests: list[tuple[Rpc, object]], allowed=None, follow=None,
              extra=None) -> list[calls.Answer]:
        """Send the requests in order (live objects in place first); fail on any wrong answer or stray.

        `follow(answer)` may return more (rpc, request) pairs to send after an answer (what a kubelet
        does next); `extra(rpc, request, answer)` returns more problems (e.g. a message not naming the field).
        """
        self.live.ensure()
        before = self.watch.snapshot()
        log_offset = self._log_size()
        answers, errors, strings = [], [], []
        queue = list(requests)
        while queue:
            rpc, request = queue.pop(0)
            answer = calls.invoke(self.client, rpc, request)
            answers.append(answer)
            self.answers.append(answer)
            strings += hostwatch.strings_of(request)
            found = calls.problems(answer, allowed(rpc, request) if allowed else None)
            found += extra(rpc, request, answer) if extra else []
            for p in found:
                errors.append(f"{p}\n  request: {_short(request)}")
            for field_name in ("pod_sandbox_id", "container_id"):
                value = getattr(answer.response, field_name, "") if answer.response is not None else ""
                if isinstance(value, str) and value and rpc.name in ("RunPodSandbox", "CreateContainer"):
                    self.live.known_ids.add(value)
            if not self.alive():
                errors.append(f"the daemon died after {rpc.name}\n  request: {_short(request)}")
                break
            if follow and not found:
                queue += follow(answer) or []
        if self.alive():
            self.live.remove_strays()
            after = self.watch.snapshot()
            strays = self.watch.strays(before, after, strings, self.live.known_ids, self.live.ids(),
                                       hostwatch.absolute_paths(strings))
            errors += [f"left on the host: {s}" for s in strays]
        if errors:
            tracebacks = self._tracebacks(log_offset)
            raise AssertionError("\n".join(errors) + (f"\n--- daemon log:\n{tracebacks}" if tracebacks else ""))
        return answers

    def alive(self) -> bool:
        if not self.proc.alive():
            return False
        try:
            self.client.runtime.Version(api_pb2.VersionRequest(), timeout=10)
            return True
        except grpc.RpcError:
            return False

    def _log_size(self) -> int:
        try:
            return self.proc.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def _tracebacks(self, offset: int) -> str:
        with open(self.proc.log_file, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        lines = text.splitlines()
        keep = [i for i, line in enumerate(lines) if "Traceback" in line]
        if not keep:
            return ""
        return "\n".join(lines[keep[0]:keep[0] + 60])[-6000:]


def _short(msg) -> str:
    return shown(msg)


def shown(msg) -> str:
    """A request in text format, long strings cut: hypothesis' report and ours stay readable."""
    text = text_format.MessageToString(msg, as_one_line=True, as_utf8=False)
    text = re.sub(r'"((?:[^"\\]|\\.){120})(?:[^"\\]|\\.)+"', lambda m: f'"{m.group(1)}..."', text)
    text = f"{type(msg).__name__}({text})"
    return text if len(text) < 2000 else text[:2000] + f"... ({len(text)} chars)"


class Shown:
    """Wraps a drawn message so hypothesis prints it short (a 64 KiB string would flood the report)."""

    def __init__(self, msg) -> None:
        self.msg = msg

    def __repr__(self) -> str:
        return shown(self.msg)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_image_server() -> Iterator[ImageServer]:
    server = ImageServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzzer(libvirt_conn, test_image, fuzz_image_server, work_root, test_network) -> Iterator[Fuzzer]:
    daemon_dir = work_root / f"fuzz-{uuid.uuid4().hex[:8]}"
    daemon_dir.mkdir(mode=0o711)
    cni_dir = daemon_dir / "net.d"
    netsupport.write_conf(cni_dir, "10-vmlet-test.conflist", test_network.conflist())
    url = fuzz_image_server.serve_file("/testvm.qcow2", test_image)
    translations = cri.translations_for(daemon_dir / "translations.yaml", {"testvm": url})
    state, socket, config = daemon_dir / "state", daemon_dir / "vmlet.sock", daemon_dir / "vmlet.yaml"
    cri.write_config(config, state, socket, translations, cni_conf_dir=str(cni_dir),
                     cni_bin_dirs=[netsupport.CNI_BIN_DIR], log_level="info")
    log_dir = daemon_dir / "logs"
    log_dir.mkdir()
    proc = cri.VmletProcess(state, socket, config, daemon_dir / "vmlet.log")
    watch = hostwatch.HostWatch(daemon_dir, state)
    live = None
    try:
        proc.start()
        live = Live(proc.client, log_dir)
        yield Fuzzer(proc, daemon_dir, watch, live)
    finally:
        # Every cleanup step runs even if a check before it raised (a libvirtd restarted under the suite).
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, daemon_dir, ignore_errors=True)
            cleanup.callback(pod_volumes.unmount_under, daemon_dir)
            cleanup.callback(watch.close)
            cleanup.callback(proc.kill)  # stopped gracefully by _teardown; this only acts if a check there raised
            problems = _teardown(proc, live, watch, cni_dir, test_network, daemon_dir)
    assert not problems, "the fuzzed daemon left things behind:\n" + "\n".join(problems)


def _teardown(proc, live, watch, cni_dir, test_network, daemon_dir) -> list[str]:
    problems = []
    if proc.alive():
        rt = proc.client.runtime
        try:
            for sb in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
                rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
        except grpc.RpcError as e:
            problems.append(f"removing the pods failed: {e.code().name}: {e.details()}")
        after = watch.snapshot()  # daemon still up, every pod removed: nothing of theirs may remain
        known = live.known_ids if live else set()
        problems += [f"domain {d}" for d in after.domains]
        problems += [f"link {link}" for link in after.links]
        problems += [f"dnsmasq {p}" for p in after.dnsmasq]
        problems += [f"qemu {q}" for q in after.qemu]
        problems += [f"netns {n}" for n in after.netns if n.startswith("vmlet-") and n[6:] in {i[:16] for i in known}]
        problems += [f"mount {m}" for m in after.mounts if m.startswith(str(daemon_dir) + "/")]
        vms = proc.state_dir / "vms"
        problems += [f"VM dir {p}" for p in (vms.iterdir() if vms.exists() else [])]
        proc.stop()
    else:
        problems.append(f"the daemon was dead at teardown; log:\n{proc.log()[-3000:]}")
    conn = libvirt_env.connect()  # a fresh one: libvirtd may have been restarted by another suite meanwhile
    try:
        problems += [f"swept: {x}" for x in libvirt_env.sweep(conn)]
    finally:
        conn.close()
    if proc.state_dir.exists():
        problems += [f"swept: {x}" for x in NetworkManager(proc.state_dir, cni_dir, [netsupport.CNI_BIN_DIR]).sweep([])]
    held = test_network.allocated_ips()
    for f in test_network.ipam_dir.glob("*/[0-9]*"):
        f.unlink()
    problems += [f"pod IP not released: {ip}" for ip in held]
    return problems

