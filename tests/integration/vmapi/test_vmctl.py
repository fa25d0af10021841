"""vmctl against kmock and the running controller, through a kubeconfig, for every runStrategy."""

from __future__ import annotations

import asyncio
import json

import pytest

from vmapi import vmctl
from tests.integration.vmapi.test_run_strategies import running

pytestmark = pytest.mark.asyncio


class Vmctl:
    def __init__(self, kubeconfig, capsys):
        self.kubeconfig, self.capsys = kubeconfig, capsys

    async def __call__(self, *args: str, ok: bool = True) -> str:
        self.capsys.readouterr()
        rc = await asyncio.to_thread(vmctl.main, ["--kubeconfig", str(self.kubeconfig), *args])
        out, err = self.capsys.readouterr()
        assert (rc == 0) == ok, f"vmctl {' '.join(args)} -> {rc}: {out}{err}"
        return out if ok else err


@pytest.fixture
def ctl(kubeconfig, capsys):
    return Vmctl(kubeconfig, capsys)


async def test_always_and_halted_flip_the_run_strategy(cluster, operator, ctl):
    await cluster.create_vm("a", "Always")
    pod = await running(cluster, "a")
    assert "already running" in await ctl("start", "a", ok=False)
    assert "Stop + Start requested" in await ctl("restart", "a")
    pod = await running(cluster, "a", other_than=pod["metadata"]["uid"])
    assert "runStrategy set to Halted" in await ctl("stop", "a")
    await cluster.wait_no_pod("a")
    await cluster.wait_status("a", "Stopped")
    assert "not running" in await ctl("stop", "a", ok=False)
    assert "does not support manual restart" in await ctl("restart", "a", ok=False)
    assert "runStrategy set to Always" in await ctl("start", "a")
    await running(cluster, "a", other_than=pod["metadata"]["uid"])


async def test_manual_and_rerun_on_failure_use_requests(cluster, operator, ctl):
    await cluster.create_vm("m", "Manual")
    await cluster.wait_status("m", "Stopped")
    assert "not running" in await ctl("stop", "m", ok=False)
    assert "Start requested" in await ctl("start", "m")
    pod = await running(cluster, "m")
    assert "Stop requested" in await ctl("stop", "m")
    await cluster.wait_no_pod("m")
    await cluster.wait_status("m", "Stopped")

    await cluster.create_vm("r", "RerunOnFailure")
    pod = await running(cluster, "r")
    await cluster.kubelet("r", "Succeeded")
    await cluster.wait_status("r", "Stopped")
    assert "Stop + Start requested" in await ctl("start", "r")  # remove the finished pod, start anew
    pod = await running(cluster, "r", other_than=pod["metadata"]["uid"])
    assert "Stop + Start requested" in await ctl("restart", "r")
    pod = await running(cluster, "r", other_than=pod["metadata"]["uid"])
    assert "Stop requested" in await ctl("stop", "r")
    await cluster.wait_no_pod("r")
    await cluster.wait_status("r", "Stopped")


async def test_once_refuses_start_and_restart(cluster, operator, ctl):
    await cluster.create_vm("o", "Once")
    await running(cluster, "o")
    assert "already running" in await ctl("start", "o", ok=False)
    assert "does not support manual restart" in await ctl("restart", "o", ok=False)
    assert "runStrategy set to Halted" in await ctl("stop", "o")
    await cluster.wait_no_pod("o")


async def test_list_and_status(cluster, operator, ctl):
    await cluster.create_vm("l1", "Always")
    await cluster.create_vm("l2", "Halted")
    await running(cluster, "l1")
    await cluster.wait_status("l2", "Stopped")
    out = await ctl("list")
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAMESPACE", "NAME", "STATUS", "READY", "STRATEGY"]
    assert any(line.split()[1:5] == ["l1", "Running", "true", "Always"] for line in lines)
    assert any(line.split()[1:5] == ["l2", "Stopped", "false", "Halted"] for line in lines)
    text = await ctl("status", "l1")
    assert "Status:          Running" in text and "Node:            node-1" in text
    st = json.loads(await ctl("status", "l1", "-o", "json"))
    assert st["printableStatus"] == "Running" and st["podName"] == "l1-vm"
    assert "not found" in await ctl("status", "nope", ok=False)
    assert "No VirtualMachines" in await ctl("-n", "elsewhere", "list")
