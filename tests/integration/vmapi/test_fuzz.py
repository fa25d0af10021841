"""Hostile VirtualMachines through the real operator on kmock (hypothesis, seeded).

The emulator stores whatever it is sent, so off-schema specs, hostile names and
annotations reach the controller as they would through a CRD without its schema.
Each VM must become a pod the node runtime accepts or an ErrorInvalidSpec status
with a Failure condition, then go away with its pod when deleted; no pass may
crash. Bodies come from tests/unit/test_vmapi_fuzz.py's CRD-schema strategies.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from cri_shim import annotations as va
from tests.integration.vmapi.convergence import LogWatch, check, GONE
from tests.integration.vmapi.harness import NS, TIMEOUT_SCALE, vm_manifest
from tests.integration.vmapi.profile import LONG
from tests.unit.test_vmapi_fuzz import vm_bodies
from vmapi import podspec, requests, types

pytestmark = pytest.mark.asyncio
EXAMPLES = 300 if LONG else 25


def _routable(name) -> bool:
    # Names kmock can route in a URL path (a real API server refuses the rest at create).
    return isinstance(name, str) and 0 < len(name) <= 253 and "/" not in name and name not in (".", "..") \
        and name.isprintable() and name.strip() == name and "%" not in name and "?" not in name and "#" not in name


async def test_hostile_vms_become_a_pod_or_a_clear_condition(server, cluster, operator):
    counter = itertools.count()
    loop = asyncio.get_running_loop()

    def wait(pred, what, timeout=5.0):
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    @settings(max_examples=EXAMPLES, derandomize=not LONG, database=None, deadline=None,
              phases=list(Phase) if LONG else [Phase.explicit, Phase.generate],  # shrinking costs minutes here
              suppress_health_check=list(HealthCheck))
    @given(vm=vm_bodies())
    # Valid VMs whose runStrategy wants no pod: neither a pod nor InvalidSpec, but Stopped.
    @example(vm=vm_manifest("halted", "Halted"))
    @example(vm=vm_manifest("manual", "Manual"))
    def one(vm):
        name = vm["metadata"]["name"]
        if not _routable(name):
            name = "x"
        name = f"{name}-{next(counter)}" if len(name) < 240 else f"n{next(counter)}"
        body = {**vm, "metadata": {k: v for k, v in vm["metadata"].items() if k != "uid"} | {"name": name}}
        body.pop("status", None)
        cluster.custom.create_namespaced_custom_object(types.GROUP, types.VERSION, NS, types.PLURAL, body,
                                                       _preload_content=False)

        wants_no_pod = _wants_no_pod(body)

        def outcome():
            got = cluster.kube.get_vm(NS, name)
            st = (got or {}).get("status") or {}
            pod = cluster.kube.get_pod(NS, podspec.pod_name(name))
            if pod is not None:
                return ("pod", pod)
            conditions = [c for c in st.get("conditions") or [] if isinstance(c, dict)]
            if any(c.get("type") == "Failure" and c.get("reason") == "InvalidSpec" for c in conditions):
                return ("invalid", st)
            # Status, conditions and printableStatus come in one patch: Stopped without a Failure is final.
            if wants_no_pod and st.get("printableStatus") == "Stopped" and not any(
                    c.get("type") == "Failure" for c in conditions):
                return ("stopped", got)
            return None
        kind, what = wait(outcome, f"VM {name!r} to get a pod, an InvalidSpec condition or (its runStrategy "
                                   "wants no pod) to be Stopped", timeout=3)
        if kind == "pod":
            va.VMAnnotations.from_pod_annotations(what["metadata"]["annotations"])
        elif kind == "stopped":
            assert not what["status"].get("created") and not what["status"].get("ready"), what["status"]
            podspec.render(what)  # no InvalidSpec: the spec must be one that makes a pod when started
        else:
            failure = [c for c in what["conditions"] if c["type"] == "Failure" and c["status"] == "True"]
            assert failure and failure[0]["message"], what
            assert what["printableStatus"] in ("ErrorInvalidSpec", "Stopped") and not what["created"], what
        cluster.custom.delete_namespaced_custom_object(types.GROUP, types.VERSION, NS, types.PLURAL, name,
                                                       _preload_content=False)
        wait(lambda: asyncio.run_coroutine_threadsafe(_gone(server, name), loop).result() is None,
             f"VM {name!r} and its pod to be gone")

    with LogWatch() as logs:
        await asyncio.to_thread(one)
    assert operator.alive()
    assert not logs.crashes(), "\n".join(logs.crashes())


def _wants_no_pod(body) -> bool:
    """Halted, or Manual with no start request: a valid VM then stays Stopped, without a pod."""
    spec = body.get("spec")
    rs = spec.get("runStrategy", "Always") if isinstance(spec, dict) else None
    annotations = body["metadata"].get("annotations")
    queued = isinstance(annotations, dict) and requests.ANNOTATION in annotations
    return rs == "Halted" or (rs == "Manual" and not queued)


async def _gone(server, name):
    return check(server, name, GONE)
