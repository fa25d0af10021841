"""The VM API end to end on this node: VirtualMachine → controller → pod → CRI proxy → vmlet → a booted VM.

Everything is real except the API server (kmock, with the harness's bookkeeping) and the kubelet, which
cannot be installed here: `tests.support.kubelet_agent.KubeletAgent` plays scheduler and kubelet for
one node, turning the pod the controller made into the CRI calls a kubelet makes, on the socket of the
CRI proxy (`criproxy` as a process, containerd as its default runtime and a vmlet daemon as
`virtlet.cloud`), and writing the pod's status back. The controller is the unchanged operator.

Proves: the pod the controller renders is one the node runtime accepts and boots as a VM (annotations,
image, resources, network binding); the proxy routes it to vmlet; the VM's status reaches Running/ready
with the IP the guest itself leased on the pod network; `vmctl stop` makes the controller delete the
pod, the guest is shut down through ACPI within the grace period, and nothing of it is left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio

from cri_shim.network import names as netnames, netns
from proto.runtime.v1 import api_pb2
from tests.integration.vmapi.harness import TIMEOUT_SCALE, vm_manifest, wait_for
from tests.support import libvirt_env, netsupport
from tests.support.kubelet_agent import KubeletAgent
from vmapi import podspec

# The node's runtime pieces, maintained with the CRI shim's and the proxy's tests: vmlet on the test
# image (served on loopback as virtlet.cloud/testvm) and the test CNI network, containerd, criproxy.
from tests.integration.cri.conftest import TESTVM, cni_conf_dir, vmlet, vmlet_dir, vmlet_factory  # noqa: F401
from tests.integration.criproxy.conftest import VM, containerd, containerd_socket, proxy_process  # noqa: F401

pytestmark = [pytest.mark.asyncio, pytest.mark.libvirt]

NODE = "vmlet-e2e-node"
NAME = "e2e"
DNS = "10.214.255.53"  # never queried: only checked on the guest's console (it got it by DHCP)
GRACE = 60  # terminationGracePeriodSeconds: the guest's time for an ACPI shutdown
BOOT_TIMEOUT = 240  # VM created → guest leased its IP, under TCG on a busy 2-core machine


@pytest_asyncio.fixture
async def node(server, kubeconfig, proxy_process, vmlet, vmlet_dir, test_network):  # noqa: F811
    """The CRI proxy (containerd + vmlet) and the kubelet agent for NODE on its socket.

    Teardown, also after a failure: the agent stops (off the event loop: kmock serves its last
    requests there), then every sandbox it still has is removed through the proxy, VMs destroyed
    at once; the vmlet, proxy and network fixtures then check and sweep what is below.
    """
    await asyncio.to_thread(lambda: proxy_process.start().close())
    agent = KubeletAgent(kubeconfig, proxy_process.socket, NODE, log_root=vmlet_dir / "pods",
                         node_labels=podspec.NODE_SELECTOR, host_ip=test_network.gateway, dns_servers=(DNS,))
    agent.start()
    try:
        yield agent
    finally:
        try:
            await asyncio.to_thread(agent.stop)
        finally:
            try:
                await asyncio.to_thread(agent.remove_all)
            finally:
                agent.close()


async def until(pred, timeout: float, what: str, agent: KubeletAgent):
    """harness.wait_for with `timeout` as given (these are a VM's boot times, not the emulator's), and on
    timeout what the agent did and what failed."""
    try:
        return await wait_for(pred, timeout / TIMEOUT_SCALE, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; agent did {agent.calls}; agent errors: {agent.errors[-5:]}") from None


def log_match(path: Path, pattern: str) -> re.Match | None:
    text = path.read_text(errors="replace") if path.exists() else ""
    return re.search(pattern, text, re.MULTILINE)


async def vmctl(kubeconfig: Path, *args: str) -> str:
    """The installed `vmctl` command (python -m vmapi.vmctl where the venv has no script)."""
    script = Path(sys.executable).with_name("vmctl")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "vmapi.vmctl"]
    proc = await asyncio.create_subprocess_exec(*argv, "--kubeconfig", str(kubeconfig), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"vmctl {' '.join(args)} -> {proc.returncode}: {out.decode()}{err.decode()}"
    return out.decode()


async def test_a_virtual_machine_boots_on_the_node_and_stops(cluster, node, operator, kubeconfig, vmlet,  # noqa: F811
                                                             libvirt_conn, test_network):
    agent = node
    manifest = vm_manifest(NAME, "Always", terminationGracePeriodSeconds=GRACE,
                           domain={"cpu": {"cores": 1}, "memory": {"guest": "256Mi"},
                                   "rootDisk": {"image": TESTVM}, "interface": {"binding": "bridge"}})
    vm = await cluster.create_vm_manifest(manifest)
    t0 = time.monotonic()

    # --- Running: the controller's pod, bound and run by the agent, the VM booted by vmlet.
    async def running():
        st = await cluster.status(NAME)
        return st if st.get("printableStatus") == "Running" and st.get("ready") is True else None
    st = await until(running, BOOT_TIMEOUT, f"VM {NAME} Running and ready", agent)
    pod = await cluster.pod(NAME)
    assert pod["spec"]["nodeName"] == NODE and st["nodeName"] == NODE
    assert st["podUID"] == pod["metadata"]["uid"] and podspec.is_owned_by(pod, vm)
    cs = pod["status"]["containerStatuses"][0]
    assert cs["name"] == podspec.CONTAINER and "running" in cs["state"] and cs["imageID"].startswith(
        f"{VM}__sha256:")  # the image vmlet pulled, its ID prefixed by the proxy

    # The status IP is the address the guest leased on the pod network (its own console says so).
    log = agent.log_file(pod, podspec.CONTAINER)
    m = await until(lambda: log_match(log, r"stdout F VMLET-TESTVM: ip eth0 (\S+)/(\d+)$"), BOOT_TIMEOUT,
                    f"the guest's IP on its console ({log})", agent)
    booted = time.monotonic() - t0
    assert st["podIP"] == m.group(1) == pod["status"]["podIP"], (st, m.group(0))
    assert ipaddress.ip_address(st["podIP"]) in test_network.subnet
    assert int(m.group(2)) == test_network.subnet.prefixlen
    # The agent's sandbox config reached the guest: pod UID as instance-id, pod name as hostname, DNS.
    for marker in (f"instance-id {pod['metadata']['uid']}", f"hostname {podspec.pod_name(NAME)}", f"dns {DNS}"):
        assert await until(lambda: log_match(log, rf"stdout F VMLET-TESTVM: {re.escape(marker)}$"), 30, marker, agent)
    assert await asyncio.to_thread(netsupport.ping, st["podIP"], 3), f"no answer from the VM at {st['podIP']}"

    # Below the proxy: one vmlet sandbox for this pod, one running QEMU domain of this run.
    sandboxes = vmlet.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    assert [(s.metadata.name, s.metadata.uid) for s in sandboxes] == [(pod["metadata"]["name"],
                                                                       pod["metadata"]["uid"])]
    sandbox_id = sandboxes[0].id
    assert sandboxes[0].annotations["kubernetes.io/target-runtime"] == VM
    assert sandboxes[0].annotations["VirtletVCPUCount"] == "1"
    domains = [d for d in libvirt_conn.listAllDomains() if d.name().startswith(libvirt_env.RUN_PREFIX)]
    assert len(domains) == 1 and domains[0].isActive()
    # domain.memory.guest → the pod's memory limit → the agent's linux resources → the VM's RAM (KiB).
    assert domains[0].maxMemory() == 256 * 1024

    # --- vmctl stop: runStrategy Halted → the controller deletes the pod → the agent shuts the VM down.
    assert "runStrategy set to Halted" in await vmctl(kubeconfig, "stop", NAME)
    t1 = time.monotonic()
    seen: dict[str, float] = {}  # printableStatus → when first seen

    async def stopped():
        st, now = await cluster.status(NAME), await cluster.pod(NAME)
        if now is not None and now["metadata"].get("deletionTimestamp"):
            seen.setdefault(f"pod terminating, VM {st.get('printableStatus')}", time.monotonic() - t1)
        seen.setdefault(st.get("printableStatus"), time.monotonic() - t1)
        return st if st.get("printableStatus") == "Stopped" and now is None else None
    st = await until(stopped, GRACE + 60, f"VM {NAME} Stopped and its pod gone", agent)
    assert st["ready"] is False and st["created"] is False and st.get("podIP") is None
    assert st["runStrategy"] == "Halted"
    # The deleted pod stayed (deletionTimestamp, the agent's finalizer) while the guest shut down, and
    # the VM said Stopping meanwhile — a real API server's graceful deletion, which kmock lacks.
    assert "pod terminating, VM Stopping" in seen, seen
    # Graceful: the guest saw the ACPI power button and powered off (exit 0), it was not destroyed.
    assert log_match(log, r"stdout F VMLET-TESTVM: acpi poweroff$"), log.read_text()[-2000:]
    teardown = [c.split()[0] for c in agent.calls if c.split()[0] in (
        "StopContainer", "RemoveContainer", "StopPodSandbox", "RemovePodSandbox", "finish")]
    assert teardown == ["StopContainer", "RemoveContainer", "StopPodSandbox", "RemovePodSandbox", "finish"], \
        agent.calls
    assert f"StopContainer {podspec.CONTAINER} timeout={GRACE}" in agent.calls

    # Nothing of the VM is left: no sandbox, no domain, no netns, links or dnsmasq, its IP released.
    assert not vmlet.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    assert not vmlet.client.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers
    assert not [d.name() for d in libvirt_conn.listAllDomains() if d.name().startswith(libvirt_env.RUN_PREFIX)]
    assert netnames.netns_name(sandbox_id) not in netns.list_names()
    from tests.integration.cri.test_network import network_leftovers
    assert not network_leftovers([sandbox_id])
    assert not test_network.allocated_ips()
    assert not agent.errors, agent.errors
    print(f"\nnode e2e: guest IP on its console {booted:.1f}s after the VirtualMachine was created; "
          f"after vmctl stop: {seen}")


# ---------------------------------------------------------------- disks on claims (docs/storage.md)
# Imports of the tests below (kept here: the tests above are another part's).
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import uuid  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402

import kubernetes  # noqa: E402

from tests.support import storage  # noqa: E402
from tests.support.provisioner import Provisioner, leftover_volumes  # noqa: E402

PVM = "pvm"
# The guest prints what its block disk held (the previous pod's mark) and writes a new mark; the
# ConfigMap is a virtio-fs share cloud-init mounted at /etc/app.
PVM_SCRIPT = """#!/bin/sh
@virtlet-mount-script@
say() { echo "PVMTEST: $*"; }
say cfg "$(cat /etc/app/greeting)"
say before "$(dd if=/dev/vmlet/data bs=512 count=1 2>/dev/null | tr -d '\\000' | head -n1)"
m="MARK-$(cat /proc/sys/kernel/random/uuid)"
# The persistent root (vda) keeps a file on its FAT partition too.
mkdir -p /mnt/root && mount -t vfat /dev/vda1 /mnt/root && say root "$(cat /mnt/root/pvm-mark 2>/dev/null)" &&
    printf '%s\\n' "$m" > /mnt/root/pvm-mark && sync && umount /mnt/root
printf '%s\\n' "$m" | dd of=/dev/vmlet/data bs=512 count=1 conv=sync,fsync 2>/dev/null && say wrote "$m"
"""


@pytest_asyncio.fixture
async def provisioner(server, kubeconfig, work_root):
    """The stand-in provisioner for NODE, binding claims only when told (on_demand); its loop devices and
    directories under a root of its own, checked and freed at teardown (after the node's agent: ask
    for it before `node`)."""
    root = work_root / f"e2e-pvs-{uuid.uuid4().hex[:8]}"
    prov = Provisioner(kubeconfig, root, node_name=NODE, on_demand=True)
    await asyncio.to_thread(prov.start)
    try:
        yield prov
    finally:
        try:
            await asyncio.to_thread(prov.stop)
            assert not leftover_volumes(root), leftover_volumes(root)
        finally:
            prov.close()
            left = storage.release(root)
            shutil.rmtree(root, ignore_errors=True)
            assert not left, f"left behind: {left}"


async def _get(cluster, fn, *args):
    try:
        return json.loads((await cluster.call(fn, *args, _preload_content=False)).data)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise


def _says(path: Path, key: str) -> str | None:
    m = None
    for m in re.finditer(rf"stdout F PVMTEST: {key} ?(.*)$", path.read_text(errors="replace") if path.exists()
                         else "", re.MULTILINE):
        pass
    return m.group(1) if m else None


async def test_a_virtual_machine_keeps_its_claims_disks_across_pods(provisioner, cluster, node, operator,  # noqa: F811
                                                                    kubeconfig, vmlet, libvirt_conn):
    """volumeClaimTemplates → claims (Pending: the VM waits for them, its pod held by the kubelet) →
    bound by the provisioner → a VM whose root is imported onto a claim, with a block claim as a disk
    and a ConfigMap shared; after vmctl stop/start the new pod's guest finds what the old one wrote."""
    agent = node
    await cluster.call(cluster.core.create_namespaced_config_map, "default",
                       {"metadata": {"name": "pvm-config", "namespace": "default"},
                        "data": {"greeting": "hello-from-configmap"}}, _preload_content=False)
    manifest = vm_manifest(
        PVM, "Always", terminationGracePeriodSeconds=GRACE,
        domain={"cpu": {"cores": 1}, "memory": {"guest": "256Mi"}, "rootDisk": {"image": TESTVM, "volume": "root"},
                "disks": [{"name": "data"}], "filesystems": [{"name": "cfg", "mountPath": "/etc/app"}],
                "interface": {"binding": "bridge"}},
        volumes=[{"name": "root", "persistentVolumeClaim": {"claimName": "root"}},
                 {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                 {"name": "cfg", "configMap": {"name": "pvm-config"}}],
        cloudInit={"userData": PVM_SCRIPT})
    manifest["spec"]["volumeClaimTemplates"] = [
        {"metadata": {"name": "root"}, "spec": {"accessModes": ["ReadWriteOnce"],
                                                "resources": {"requests": {"storage": "2Gi"}}}},
        {"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                                                "resources": {"requests": {"storage": "16Mi"}}}}]
    await cluster.create_vm_manifest(manifest)
    claims = (f"root-{PVM}", f"data-{PVM}")

    # Claims Pending: the VM says so, the pod waits for its volumes before any sandbox.
    async def waiting_for_volumes():
        st, pod = await cluster.status(PVM), await cluster.pod(PVM)
        cs = ((pod or {}).get("status") or {}).get("containerStatuses") or [{}]
        msg = ((cs[0].get("state") or {}).get("waiting") or {}).get("message") or ""
        return (st, msg) if st.get("printableStatus") == "WaitingForVolumeBinding" and "FailedMount" in msg else None
    st, msg = await until(waiting_for_volumes, 60, "VM WaitingForVolumeBinding, its pod held", agent)
    assert f"persistentvolumeclaim default/{claims[0]} is Pending" in msg, msg
    assert not [c for c in agent.calls if c.startswith("RunPodSandbox")], agent.calls
    for c in claims:
        provisioner.provision("default", c)

    async def running():
        st = await cluster.status(PVM)
        return st if st.get("printableStatus") == "Running" and st.get("ready") is True else None
    await until(running, BOOT_TIMEOUT, f"VM {PVM} Running", agent)
    pod1 = await cluster.pod(PVM)
    log1 = agent.log_file(pod1, podspec.CONTAINER)
    await until(lambda: _says(log1, "wrote"), BOOT_TIMEOUT, f"the guest's mark on its data disk ({log1})", agent)
    assert _says(log1, "cfg") == "hello-from-configmap" and _says(log1, "before") == ""
    assert _says(log1, "root") == "", "a freshly imported root"
    mark = _says(log1, "wrote")
    root_claim = await _get(cluster, cluster.core.read_namespaced_persistent_volume_claim, claims[0], "default")
    data_claim = await _get(cluster, cluster.core.read_namespaced_persistent_volume_claim, claims[1], "default")
    root_dir = Path(provisioner.volumes[root_claim["spec"]["volumeName"]].local_path)
    data_dev = Path(provisioner.volumes[data_claim["spec"]["volumeName"]].local_path)
    with open(data_dev, "rb") as f:
        assert f.read(512).rstrip(b"\0").decode().strip() == mark, "the guest's mark is on the loop device"
    disk_img = root_dir / "disk.img"
    record = json.loads((root_dir / ".vmlet-disk.json").read_text())
    inode = disk_img.stat().st_ino
    # The node's domain: the imported root and the block claim are its disks.
    [dom] = [d for d in libvirt_conn.listAllDomains() if d.name().startswith(libvirt_env.RUN_PREFIX)]
    sources = {(s.get("file") or s.get("dev")) for s in ET.fromstring(dom.XMLDesc()).iterfind("devices/disk/source")}
    assert str(data_dev) in {os.path.realpath(s) for s in sources if s}, sources

    # vmctl stop: the pod goes, the claims and their data stay; vmctl start: a new pod on the same claims.
    assert "runStrategy set to Halted" in await vmctl(kubeconfig, "stop", PVM)

    async def stopped():
        st = await cluster.status(PVM)
        return st if st.get("printableStatus") == "Stopped" and await cluster.pod(PVM) is None else None
    await until(stopped, GRACE + 60, f"VM {PVM} Stopped and its pod gone", agent)
    assert not agent.volumes.pod_dir(pod1["metadata"]["uid"]).exists()
    assert not storage.mounts_under(agent.volumes.pods_dir)
    assert data_dev in storage.loop_devices_of(provisioner.root), "a claim outlives the pod"
    await vmctl(kubeconfig, "start", PVM)
    await until(running, BOOT_TIMEOUT, f"VM {PVM} Running again", agent)
    pod2 = await cluster.pod(PVM)
    assert pod2["metadata"]["uid"] != pod1["metadata"]["uid"]
    log2 = agent.log_file(pod2, podspec.CONTAINER)
    await until(lambda: _says(log2, "wrote"), BOOT_TIMEOUT, f"the second guest's mark ({log2})", agent)
    assert _says(log2, "before") == mark, "the new pod's guest reads what the old one wrote"
    assert _says(log2, "root") == mark, "and what it wrote on its persistent root"
    assert disk_img.stat().st_ino == inode and json.loads((root_dir / ".vmlet-disk.json").read_text()) == record, \
        "the persistent root is imported once"

    # The pod deleted behind the controller's back (a node failure's stand-in): the controller makes a new
    # one on the same claims, and its guest finds both marks.
    mark2 = _says(log2, "wrote")
    await cluster.call(cluster.core.delete_namespaced_pod, pod2["metadata"]["name"], "default",
                       _preload_content=False)

    async def replaced():
        pod = await cluster.pod(PVM)
        if pod is None or pod["metadata"]["uid"] == pod2["metadata"]["uid"]:
            return None
        return await running() and pod
    pod3 = await until(replaced, GRACE + BOOT_TIMEOUT, f"VM {PVM} running on a new pod", agent)
    log3 = agent.log_file(pod3, podspec.CONTAINER)
    await until(lambda: _says(log3, "wrote"), BOOT_TIMEOUT, f"the third guest's mark ({log3})", agent)
    assert _says(log3, "before") == mark2 and _says(log3, "root") == mark2, log3.read_text()[-2000:]
    assert disk_img.stat().st_ino == inode, "still not imported again"

    # The VM deleted: its pod goes; the claims are the garbage collector's (their owner is the VM),
    # which kmock lacks — deleted here as it would, then the provisioner reclaims the volumes.
    await cluster.delete_vm(PVM)
    await until(lambda: _no_pod(cluster), GRACE + 60, "the VM's pod gone", agent)
    for c in claims:
        claim = await _get(cluster, cluster.core.read_namespaced_persistent_volume_claim, c, "default")
        assert any(r.get("kind") == "VirtualMachine" for r in claim["metadata"].get("ownerReferences") or []), claim
        await cluster.call(cluster.core.delete_namespaced_persistent_volume_claim, c, "default", _preload_content=False)

    async def reclaimed():
        return not provisioner.volumes and not storage.loop_devices_of(provisioner.root)
    await until(reclaimed, 30, "the claims' volumes removed", agent)
    assert not root_dir.exists()
    assert not agent.errors and not provisioner.errors, (agent.errors, provisioner.errors)


async def _no_pod(cluster) -> bool:
    return await cluster.pod(PVM) is None
