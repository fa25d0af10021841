"""The controller under API faults: every request kind it sends gets every fault that kind can get.

Faults hit only the controller's requests (the users' and the kubelet's go through),
deterministically by request count per kind (the whole menu in turn, kept on until
every kind's menu is used up, which the test checks) or as a seeded random mix. Once they stop, each VM must have exactly what its
runStrategy asks for, a status that matches its pod and no Failure condition left;
meanwhile no VM ever had two pods, no handler crashed and retries backed off.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.integration.vmapi import faults
from tests.integration.vmapi.convergence import (GONE, RUNNING, STOPPED, AutoKubelet, LogWatch, converged,
                                                 controller_requests)
from tests.integration.vmapi.harness import TIMEOUT_SCALE, Operator, vm_with_claim as with_claim
from tests.integration.vmapi.profile import LONG, SEED
from vmapi import requests

pytestmark = pytest.mark.asyncio

SEEDS = range(12) if LONG else range(2)
MIX_SEEDS = [SEED + i for i in (range(20) if LONG else range(3))]


# The kinds the scenario sends while the faults are on (kopf's initial lists come before them). Claim creates
# and patches happen once per claim: the random mix covers them.
SCENARIO_KINDS = ("pods:create", "pods:delete", "pods:get", "virtualmachines:get", "virtualmachines/status:patch",
                  "virtualmachines:patch", "events:create", "pods:watch", "virtualmachines:watch",
                  "persistentvolumeclaims:get", "persistentvolumeclaims:watch")

MENU_TIMEOUT = 60.0  # seconds the faults stay on at most, waiting for every menu to be used up


def every_fault_in_turn(seed: int) -> faults.Schedule:
    """Kind k's requests get each fault of k's menu once (order rotated by the seed), every other one
    answered normally in between so that retries make progress. Watches go without the gaps: a watch
    answered normally stays open for good, so no further watch would come; for the same reason the one
    watch fault that ends in a normal stream (slow) comes last."""
    plan: dict[str, list[faults.Fault | None]] = {}
    for kind in faults.CONTROLLER_KINDS:
        menu = faults.menu(kind)
        rot = seed % len(menu)
        menu = menu[rot:] + menu[:rot]
        if kind.endswith(":watch"):
            plan[kind] = [f for f in menu if f.kind != "slow"] + [f for f in menu if f.kind == "slow"]
        else:
            plan[kind] = [f for fault in menu for f in (fault, None)]
    return faults.Schedule(plan)


async def _churn(cluster, schedule: faults.Schedule) -> str:
    """Start and stop a Manual VM through its request queue until every menu is used up: pod creates and
    deletes, and the controller's own VM patches, come only with such work. The state it must end in."""
    await cluster.create_vm_manifest(with_claim("churn", "Manual"))
    deadline = time.monotonic() + MENU_TIMEOUT * TIMEOUT_SCALE
    while not schedule.used_up(SCENARIO_KINDS) and time.monotonic() < deadline:
        if await _queued(cluster, "churn"):  # the controller has not consumed the last pair yet
            await asyncio.sleep(0.1)
            continue
        await cluster.patch_vm("churn", {"metadata": {"annotations": {requests.ANNOTATION: requests.dump(
            [requests.Request("Start"), requests.Request("Stop")])}}})
    return STOPPED


async def _queued(cluster, name: str) -> bool:
    vm = await cluster.vm(name)
    return requests.ANNOTATION in ((vm or {}).get("metadata", {}).get("annotations") or {})


async def _scenario(server, cluster, rng: random.Random) -> tuple[dict[str, str], str]:
    """Create, stop, start, restart and delete VMs while the faults are on; the expected end state."""
    want: dict[str, str] = {}
    for name, rs in (("keep", "Always"), ("stop", "Always"), ("start", "Halted"), ("restart", "Always"),
                     ("manual", "Manual"), ("gone", "Always")):
        if name in ("keep", "restart"):  # their claims are made under faults too
            await cluster.create_vm_manifest(with_claim(name, rs))
        else:
            await cluster.create_vm(name, rs)
    await cluster.patch_vm("manual", {"metadata": {"annotations": {
        requests.ANNOTATION: requests.dump([requests.Request("Start")])}}})
    await asyncio.sleep(rng.uniform(0.2, 1.0))
    await cluster.patch_vm("stop", {"spec": {"runStrategy": "Halted"}})
    await cluster.patch_vm("start", {"spec": {"runStrategy": "Always"}})
    pod = await cluster.wait_pod("restart", timeout=20)
    await cluster.patch_vm("restart", {"metadata": {"annotations": {requests.ANNOTATION: requests.dump(
        [requests.Request("Stop", pod["metadata"]["uid"]), requests.Request("Start")])}}})
    await asyncio.sleep(rng.uniform(0.0, 0.5))
    await cluster.delete_vm("gone")
    want.update(keep=RUNNING, stop=STOPPED, start=RUNNING, restart=RUNNING, manual=RUNNING, gone=GONE)
    return want, pod["metadata"]["uid"]


async def _run(server, kubeconfig, cluster, schedule: faults.Schedule, seed: int, fault_seconds: float | None):
    """fault_seconds None: the faults stay on until every menu is used up (see _churn)."""
    rng = random.Random(seed)
    with LogWatch() as logs:
        async with AutoKubelet(server, cluster) as kubelet:
            server.faults = schedule
            op = await Operator(server, kubeconfig).start()
            try:
                want, first_uid = await _scenario(server, cluster, rng)
                if fault_seconds is None:
                    want["churn"] = await _churn(cluster, schedule)
                else:
                    t_end = time.monotonic() + fault_seconds
                    while time.monotonic() < t_end:
                        await asyncio.sleep(0.1)
                schedule.active = False
                await converged(server, want, timeout=30)
                # The restart replaced the pod. (restartCount is not checked here: when every status patch
                # of the first pod's life failed, no status ever recorded it, and the count misses it.)
                assert (await cluster.pod("restart"))["metadata"]["uid"] != first_uid
                # Quiet now: a few resyncs' worth of requests, not a retry loop.
                quiet_from = len(server.log)
                await asyncio.sleep(2.0)
                quiet = controller_requests(server, quiet_from)
                assert len(quiet) <= 60, f"{len(quiet)} controller requests in 2 s of quiet: {_kinds(quiet)}"
                assert op.alive(), "the operator stopped"
            finally:
                server.faults = None
                await op.stop()
        assert not kubelet.twins, f"VMs with two pods: {kubelet.twins}"
    assert not logs.crashes(), "handlers crashed:\n" + "\n".join(logs.crashes())
    assert schedule.injected, "no fault was injected"
    return schedule


def _kinds(reqs) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reqs:
        k = faults.request_kind(r) or r.url.path
        out[k] = out.get(k, 0) + 1
    return out


@pytest.mark.parametrize("seed", SEEDS)
async def test_every_fault_on_every_request_kind_converges(server, kubeconfig, cluster, seed):
    schedule = every_fault_in_turn(seed)
    await _run(server, kubeconfig, cluster, schedule, seed, fault_seconds=None)
    # Each kind the scenario sends got its whole menu (the test would silently test less otherwise).
    got = {kind: sorted({str(f) for k, f in schedule.injected if k == kind}) for kind in SCENARIO_KINDS}
    want = {kind: sorted({str(f) for f in faults.menu(kind)}) for kind in SCENARIO_KINDS}
    assert got == want, f"menus not used up within {MENU_TIMEOUT * TIMEOUT_SCALE:.0f}s: " \
                        f"{schedule.left(SCENARIO_KINDS)}"


@pytest.mark.parametrize("seed", MIX_SEEDS)
async def test_a_seeded_random_mix_of_faults_converges(server, kubeconfig, cluster, seed):
    await _run(server, kubeconfig, cluster, faults.random_mix(seed, rate=0.3), seed, fault_seconds=3.0)
