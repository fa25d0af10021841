"""The guest agent's facts in the VM's status: `python -m vmapi.guest_info` on the node path.

The node of test_node_e2e.py (kmock + the unchanged operator, criproxy with containerd and a vmlet
daemon, the kubelet agent) and the reporter as a process of its own, pointed at vmlet's CRI socket and
kmock with the test's kubeconfig. One real VM: its status gets the test image's OS (`id` vmlet-testvm)
and the pod IP on eth0 from its guest agent — the same facts the runtime's verbose ContainerStatus
gives —, the AgentConnected condition, and `vmctl status` shows them; unchanged facts are not written
again; after `vmctl stop` they are gone. A second VM whose pod is bound to another node (the test plays
that node's kubelet and reporter) is never touched, and every call the reporter makes is one its role
grants (vmapi.guest_info.PERMISSIONS).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import kmock
import pytest
import pytest_asyncio

from proto.runtime.v1 import api_pb2
from tests.integration.vmapi.harness import vm_manifest
from vmapi import guest_info, podspec

# The node path's fixtures and helpers, maintained with test_node_e2e.py.
from tests.integration.vmapi.test_node_e2e import BOOT_TIMEOUT, GRACE, NODE, node, until, vmctl  # noqa: F401
from tests.integration.cri.conftest import TESTVM, cni_conf_dir, vmlet, vmlet_dir, vmlet_factory  # noqa: F401
from tests.integration.criproxy.conftest import containerd, containerd_socket, proxy_process  # noqa: F401
FIXTURES = (node, vmlet, vmlet_dir, vmlet_factory, cni_conf_dir, containerd, containerd_socket, proxy_process)

pytestmark = [pytest.mark.asyncio, pytest.mark.libvirt]

NAME = "gi"
OTHER = "elsewhere"
OTHER_NODE = "node-b"
INTERVAL = 3  # s between the reporter's full passes
USER_AGENT = "vmlet-guest-info"
REPO = Path(__file__).resolve().parents[3]


@pytest_asyncio.fixture
async def reporter(server, kubeconfig, vmlet, tmp_path):  # noqa: F811
    """The reporter process for NODE on vmlet's socket; stopped with SIGTERM at teardown (it must exit 0)."""
    log_path = tmp_path / "guest-info.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vmapi.guest_info", "--cri-socket", str(vmlet.socket), "--node", NODE,
            "--kubeconfig", str(kubeconfig), "--interval", str(INTERVAL), "--log-level", "DEBUG",
            stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.log_path = log_path
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                raise AssertionError("the reporter did not stop on SIGTERM") from None
            assert proc.returncode == 0, (proc.returncode, log_path.read_text()[-3000:])


VERBS = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
         kmock.action.CREATE: "create", kmock.action.UPDATE: "patch", kmock.action.DELETE: "delete"}


def reporter_requests(server) -> list:
    return [r for r in server.log if r.headers.get("User-Agent", "").startswith(USER_AGENT)]


def status_patches(server, name: str) -> list:
    return [r for r in reporter_requests(server)
            if r.action == kmock.action.UPDATE and r.subresource == "status" and r.name == name]


def agent_condition(st: dict) -> dict | None:
    return next((c for c in st.get("conditions") or [] if c.get("type") == guest_info.CONDITION), None)


async def test_the_guest_agents_facts_reach_the_vm_status_and_go_with_the_vm(
        cluster, node, operator, kubeconfig, vmlet, reporter, server):  # noqa: F811
    agent = node
    # --- A VM on another node, with facts its node's reporter wrote: this node's never touches it.
    await cluster.create_vm_manifest(vm_manifest(
        OTHER, "Always", nodeSelector={"kubernetes.io/hostname": OTHER_NODE},
        domain={"memory": {"guest": "256Mi"}, "rootDisk": {"image": TESTVM}}))
    await cluster.wait_pod(OTHER, timeout=30)
    await cluster.kubelet(OTHER, "Running", node=OTHER_NODE, ip="10.214.0.99")
    await cluster.wait_status(OTHER, "Running", timeout=30)
    theirs = {"guestOSInfo": {"id": "other-os", "name": "Other"},
              "interfaces": [{"name": "default", "interfaceName": "eth0", "ipAddress": "10.214.0.99",
                              "ipAddresses": ["10.214.0.99"], "infoSource": "guest-agent"}]}
    st = await cluster.status(OTHER)
    conds = [*st["conditions"], {"type": "AgentConnected", "status": "True", "reason": "GuestAgentConnected",
                                 "message": "node-b's", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    await cluster.call(cluster.custom.patch_namespaced_custom_object_status, "vmlet.dev", "v1alpha1", "default",
                       "virtualmachines", OTHER, {"status": {**theirs, "conditions": conds}},
                       _content_type="application/merge-patch+json", _preload_content=False)

    # --- The real VM on this node: Running, then the agent's facts in its status.
    await cluster.create_vm_manifest(vm_manifest(
        NAME, "Always", terminationGracePeriodSeconds=GRACE,
        domain={"cpu": {"cores": 1}, "memory": {"guest": "256Mi"}, "rootDisk": {"image": TESTVM},
                "interface": {"binding": "bridge"}}))

    async def reported():
        st = await cluster.status(NAME)
        nics = {n.get("interfaceName"): n for n in st.get("interfaces") or []}
        ok = (st.get("printableStatus") == "Running" and (st.get("guestOSInfo") or {}).get("id") == "vmlet-testvm"
              and st.get("podIP") and (nics.get("eth0") or {}).get("ipAddress") == st["podIP"]
              and (agent_condition(st) or {}).get("status") == "True")
        return st if ok else None
    st = await until(reported, BOOT_TIMEOUT, f"VM {NAME}'s guest facts in its status "
                     f"(reporter log {reporter.log_path})", agent)
    eth0 = next(n for n in st["interfaces"] if n["interfaceName"] == "eth0")
    assert eth0["name"] == "default" and eth0["infoSource"] == "guest-agent" and eth0["mac"]
    assert eth0["ipAddresses"][0] == st["podIP"]
    pod = await cluster.pod(NAME)
    assert pod["spec"]["nodeName"] == NODE and st["podIP"] == pod["status"]["podIP"]

    # The same facts the runtime gives the kubelet (its verbose ContainerStatus), in KubeVirt's names.
    [c] = vmlet.client.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers
    info = json.loads(vmlet.client.runtime.ContainerStatus(
        api_pb2.ContainerStatusRequest(container_id=c.id, verbose=True), timeout=30).info["info"])
    assert st["guestOSInfo"] == {k: v for k, v in info["guestAgent"]["guestOSInfo"].items()
                                 if k in guest_info.OS_FIELDS and v}
    runtime_eth0 = next(i for i in info["guestAgent"]["interfaces"] if i["name"] == "eth0")
    assert eth0["mac"] == runtime_eth0["mac"].lower()
    assert {a.split("/")[0] for a in runtime_eth0["ipAddresses"]} == set(eth0["ipAddresses"])
    # The controller's own conditions are all still there, the reporter's last.
    assert [c["type"] for c in st["conditions"]][:2] == ["Ready", "Paused"]
    assert st["conditions"][-1]["type"] == "AgentConnected"

    out = await vmctl(kubeconfig, "status", NAME)
    assert "id vmlet-testvm" in out and f"eth0 (default) {st['podIP']}" in out, out

    # Unchanged facts are not written again (several full passes later).
    written = len(status_patches(server, NAME))
    await asyncio.sleep(3 * INTERVAL)
    assert len(status_patches(server, NAME)) == written, [r.data for r in status_patches(server, NAME)]
    assert (await cluster.status(NAME))["guestOSInfo"] == st["guestOSInfo"]

    # --- vmctl stop: the guest powers off, the pod goes, and the facts with them.
    assert "runStrategy set to Halted" in await vmctl(kubeconfig, "stop", NAME)

    async def cleared():
        st = await cluster.status(NAME)
        done = st.get("printableStatus") == "Stopped" and await cluster.pod(NAME) is None
        return st if done and not guest_info.reports(st) else None
    st = await until(cleared, GRACE + 60, f"VM {NAME} Stopped without guest facts", agent)
    assert st.get("guestOSInfo") is None and st.get("interfaces") is None and agent_condition(st) is None
    assert [c["type"] for c in st["conditions"]] == ["Ready", "Paused"]

    # --- The other node's VM: never asked about, never written; its facts as its reporter left them.
    assert not [r for r in reporter_requests(server) if r.name in (OTHER, podspec.pod_name(OTHER))]
    st = await cluster.status(OTHER)
    assert {k: st.get(k) for k in theirs} == theirs and agent_condition(st)["message"] == "node-b's"

    # Every call the reporter made is one its role grants; it wrote; it is still running, no tracebacks.
    seen = {(r.resource.group, r.resource.plural + (f"/{r.subresource}" if r.subresource else ""), VERBS[r.action])
            for r in reporter_requests(server) if r.resource is not None}
    assert ("vmlet.dev", "virtualmachines/status", "patch") in seen
    assert seen <= set(guest_info.PERMISSIONS), seen - set(guest_info.PERMISSIONS)
    assert reporter.returncode is None
    assert "Traceback" not in reporter.log_path.read_text(), reporter.log_path.read_text()[-3000:]
    assert not agent.errors, agent.errors
