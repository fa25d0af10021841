"""The controller SIGKILLed mid-reconcile: a real process, killed at a seeded instant of each flow.

Each round sets the scene with the live controller (`python -m vmapi.operator`, the
production entry point, as a subprocess of the test), then starts a flow — create,
stop, start, delete or restart a VM — and SIGKILLs the controller at its n-th write
(pod create/delete, VM patch, status patch, event), n and the instant seeded: just
before the write reaches the API server (it is lost) or just after it was applied
(the controller never learns it succeeded). A new controller then starts and every
VM of every round so far must converge: exactly the pod its runStrategy asks for,
a status matching it, never two pods for one VM, no pod left for a deleted VM.
Every other group of rounds the VMs have a claim template: a kill around the
claim's create must still end with one claim, owned by its VM, before the pod.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import kmock
import pytest

from tests.integration.vmapi import faults
from tests.integration.vmapi.convergence import GONE, RUNNING, STOPPED, AutoKubelet, check, converged, pods_of
from tests.integration.vmapi.harness import TIMEOUT_SCALE, WATCHED, vm_manifest, vm_with_claim, wait_for, watches
from tests.integration.vmapi.profile import LONG, SEED
from vmapi import requests

pytestmark = pytest.mark.asyncio

ROUNDS = 60 if LONG else 20
QUIET = 0.5  # seconds without a controller write after which a converged flow has no write left
FLOWS = ("create", "stop", "start", "delete", "restart")
WRITES = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
REPO = Path(__file__).resolve().parents[3]


class ControllerProcess:
    """`python -m vmapi.operator` against the emulator; its output goes to a file of the test's."""

    def __init__(self, server, kubeconfig: Path, log: Path):
        self.server, self.kubeconfig, self.log = server, kubeconfig, log
        self.proc: subprocess.Popen | None = None

    async def start(self) -> "ControllerProcess":
        before = {p: watches(self.server, p) for p in WATCHED}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmapi.operator", "--kubeconfig", str(self.kubeconfig), "--standalone",
                 "--resync", "2", "--crashloop-base", "0.5", "--request-timeout", "2"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            await wait_for(lambda: all(watches(self.server, p) > n for p, n in before.items())
                           or self.proc.poll() is not None, timeout=20, what="the controller's watches")
            assert self.proc.poll() is None, f"the controller exited: {self.log.read_text()[-3000:]}"
        except BaseException:  # not up (or the test was interrupted): no controller outlives the test
            await self.stop()
            raise
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.kill()
        await asyncio.to_thread(self.proc.wait, 10)
        self.proc = None


class KillSwitch:
    """Kills the controller at its n-th write request from now, before (dropped) or after (applied) it."""

    def __init__(self, controller: ControllerProcess, nth: int, phase: str):
        self.controller, self.nth, self.phase = controller, nth, phase
        self.count, self.fired, self.what = 0, False, None
        self.last_write = time.monotonic()

    def __call__(self, request, phase: str) -> bool:
        if self.fired or request.action not in WRITES or not faults.from_controller(request):
            return False
        self.last_write = time.monotonic()
        if phase == "before":
            self.count += 1
        if self.count == self.nth and phase == self.phase:
            self.fired, self.what = True, f"{phase} {faults.request_kind(request)} {request.name or ''}"
            self.controller.kill()
            return phase == "before"  # the request dies with its sender
        return False


def _manifest(name: str, run_strategy: str, claim: bool) -> dict:
    return vm_with_claim(name, run_strategy) if claim else vm_manifest(name, run_strategy)


async def _prepare(cluster, server, flow: str, name: str, claim: bool) -> None:
    """The state the flow starts from, made by the live controller."""
    start_rs = {"create": None, "start": "Halted"}.get(flow, "Always")
    if start_rs is None:
        return
    await cluster.create_vm_manifest(_manifest(name, start_rs, claim))
    await converged(server, {name: STOPPED if start_rs == "Halted" else RUNNING}, timeout=10)


async def _act(cluster, flow: str, name: str, claim: bool) -> str:
    """Start the flow; the state it must end in."""
    if flow == "create":
        await cluster.create_vm_manifest(_manifest(name, "Always", claim))
        return RUNNING
    if flow == "stop":
        await cluster.patch_vm(name, {"spec": {"runStrategy": "Halted"}})
        return STOPPED
    if flow == "start":
        await cluster.patch_vm(name, {"spec": {"runStrategy": "Always"}})
        return RUNNING
    if flow == "delete":
        await cluster.delete_vm(name)
        return GONE
    pod = await cluster.pod(name)
    await cluster.patch_vm(name, {"metadata": {"annotations": {requests.ANNOTATION: requests.dump(
        [requests.Request("Stop", pod["metadata"]["uid"]), requests.Request("Start")])}}})
    return RUNNING


def _done(server, flow: str, name: str, want: str, uid: str | None, pod_before: str | None) -> bool:
    """The flow reached its end state (a restart: with a pod other than the one it started with)."""
    if check(server, name, want, uid) is not None:
        return False
    return flow != "restart" or all(p["metadata"].get("uid") != pod_before for p in pods_of(server, name, uid))


async def test_controller_sigkilled_mid_flow_converges_after_restart(server, kubeconfig, cluster, tmp_path):
    rng = random.Random(SEED)
    want: dict[str, str] = {}
    uids: dict[str, str] = {}
    log = tmp_path / "controller.log"
    ctl = ControllerProcess(server, kubeconfig, log)  # always the current controller: `finally` stops it
    kills = []
    claimed: set[str] = set()
    try:
        await ctl.start()
        async with AutoKubelet(server, cluster) as kubelet:
            for r in range(ROUNDS):
                flow, name = FLOWS[r % len(FLOWS)], f"k{r}"
                claim = (r // len(FLOWS)) % 2 == 0
                if claim:
                    claimed.add(name)
                await _prepare(cluster, server, flow, name, claim)
                vm = await cluster.vm(name)
                if vm is not None:
                    uids[name] = vm["metadata"]["uid"]
                before = (await cluster.pod(name) or {}).get("metadata", {}).get("uid")
                switch = KillSwitch(ctl, nth=rng.randint(1, 7), phase=rng.choice(("before", "after")))
                server.on_request = switch
                want[name] = await _act(cluster, flow, name, claim)
                # Until the kill, or until the flow is done: converged and no write for QUIET seconds.
                deadline = time.monotonic() + 3 * TIMEOUT_SCALE
                while not switch.fired and time.monotonic() < deadline:
                    if time.monotonic() - switch.last_write > QUIET and _done(server, flow, name, want[name],
                                                                             uids.get(name), before):
                        break
                    await asyncio.sleep(0.02)
                server.on_request = None
                ctl.kill()  # the flow had fewer writes: killed now, wherever it is
                await ctl.stop()
                kills.append(f"{r} {flow}: {switch.what or 'after the flow'}")
                ctl = ControllerProcess(server, kubeconfig, log)
                await ctl.start()
                try:
                    await converged(server, want, timeout=20, uids=uids)
                except AssertionError as e:
                    raise AssertionError(f"round {r} ({kills[-1]}): {e}") from None
                if flow == "restart":
                    after = (await cluster.pod(name))["metadata"]["uid"]
                    assert after != before, f"round {r}: the restart did not replace the pod"
                    assert (await cluster.status(name))["restartCount"] == 1
            assert not kubelet.twins, f"VMs with two pods: {kubelet.twins}"
    finally:
        server.on_request = None
        await ctl.stop()
    fired = [k for k in kills if "after the flow" not in k]
    assert len(fired) >= ROUNDS // 2, f"the kill switch fired in only {len(fired)} rounds: {kills}"
    for name, state in want.items():
        if state == GONE:
            assert not pods_of(server, name, uids.get(name)), name
        elif name in claimed:  # one claim, made once, owned by its VM (a create applied twice would be a 409)
            claims = [c for c in server.objects.values() if not c.deleted and c.get("kind") == "PersistentVolumeClaim"
                      and c["metadata"]["name"] == f"data-{name}"]
            vm = await cluster.vm(name)
            assert len(claims) == 1 and [r["uid"] for r in claims[0]["metadata"]["ownerReferences"]] == [
                vm["metadata"]["uid"]], (name, [c.raw for c in claims])
            if state == RUNNING:
                volumes = (await cluster.pod(name))["spec"]["volumes"]
                assert volumes[0]["persistentVolumeClaim"]["claimName"] == f"data-{name}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
