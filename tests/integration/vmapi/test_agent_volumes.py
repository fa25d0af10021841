"""The test kubelet's volumes and the stand-in provisioner, against kmock and the real node.

`tests.support.kubelet_agent` lays pod volumes out as the kubelet does and hands them to the CRI as
mounts and devices; `tests.support.provisioner` binds claims to loop devices and directories. Checked
with real pieces only:

* the provisioner alone (kmock + losetup): what a bound claim and its PV say, sizes, delays and
  on-demand binding, bad claims refused naming the field, pvc-protection, reclaim and stop();
* ordinary pods on containerd (busybox, through the agent): what containerd got in CreateContainer
  (its verbose ContainerStatus echoes the request), the kubelet's directory layout, what the
  container reads and writes — the block devices too, read-only refused by the device cgroup — a
  ConfigMap update swapped in atomically, pods waiting on unbound claims and missing objects, bad
  volume specs named in the pod's status;
* a VM pod on the node (criproxy → vmlet): the guest reads its ConfigMap, Secret, emptyDir and
  filesystem claim over virtio-fs and its block claim as a disk, and prints them on its console.

Every fixture checks at teardown that no loop device backed under the test's root, no mount under it
and no directory of the agent or the provisioner is left.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import stat
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import pytest_asyncio

from proto.runtime.v1 import api_pb2
from tests.integration.vmapi.harness import NS, TIMEOUT_SCALE, wait_for
from tests.support import storage
from tests.support.kubelet_agent import CONFIGMAP, EMPTY_DIR, LOCAL, SECRET, KubeletAgent
from tests.support.provisioner import PROVISIONER, PVC_PROTECTION, Provisioner, leftover_volumes
from vmapi import podspec
from vmapi.client import MERGE

from tests.integration.cri import conftest as cri_fixtures
from tests.integration.criproxy import conftest as proxy_fixtures
from tests.integration.cri.conftest import TESTVM
from tests.integration.criproxy.conftest import BUSYBOX, CGROUP_PARENT, RUN_ID, RUN_LABEL

# The node's pieces, as test_node_e2e.py takes them (fixtures: pytest finds them among the module's
# names): vmlet on the test image and its CNI network, containerd, criproxy.
vmlet_factory, vmlet, vmlet_dir, cni_conf_dir = (cri_fixtures.vmlet_factory, cri_fixtures.vmlet,
                                                 cri_fixtures.vmlet_dir, cri_fixtures.cni_conf_dir)
containerd_socket, containerd, proxy_process = (proxy_fixtures.containerd_socket, proxy_fixtures.containerd,
                                                proxy_fixtures.proxy_process)

pytestmark = [pytest.mark.asyncio]

MIB = 1024 * 1024
POD_TIMEOUT = 60  # an ordinary pod Running (scaled by TIMEOUT_SCALE)
BOOT_TIMEOUT = 240  # a VM pod created → its user-data done, under TCG on a busy 2-core machine
TS_DIR = re.compile(r"^\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\S+$")  # the AtomicWriter's ..<timestamp>.<random>


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def root(work_root: Path):
    """The test's directory for PV stand-ins, the agent's root and logs; must end with nothing in it."""
    d = work_root / f"agentvol-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    try:
        yield d
    finally:
        left = storage.release(d)  # frees what is left either way, then fails the test if anything was
        shutil.rmtree(d, ignore_errors=True)
        assert not left, f"left behind under {d}: {left}"


@pytest_asyncio.fixture
async def provisioners(server, kubeconfig, root):
    """Make provisioners on root/pvs (stopped at teardown, after the agents: they use its volumes)."""
    made: list[Provisioner] = []

    async def make(**opts: Any) -> Provisioner:
        p = Provisioner(kubeconfig, root / "pvs", node_name=opts.pop("node_name", "agentvol"), interval=0.2, **opts)
        made.append(p)
        await asyncio.to_thread(p.start)
        return p

    yield make
    try:
        for p in made:
            await asyncio.to_thread(p.stop)
            assert not leftover_volumes(p.root), leftover_volumes(p.root)
    finally:
        for p in made:
            p.close()


@pytest_asyncio.fixture
async def agents(server, kubeconfig, root, provisioners):
    """Make kubelet agents with their root at root/kubelet; stopped, their pods removed, at teardown."""
    made: list[KubeletAgent] = []

    def make(socket: Path, node: str, **opts: Any) -> KubeletAgent:
        opts.setdefault("log_root", root / "logs")
        a = KubeletAgent(kubeconfig, socket, node, root_dir=root / "kubelet", interval=0.2, **opts)
        made.append(a)
        return a.start()

    yield make
    try:
        for a in made:
            try:
                await asyncio.to_thread(a.stop)
            finally:
                await asyncio.to_thread(a.remove_all)
        for a in made:  # stop() and remove_all() take down every pod directory and mount
            assert not storage.mounts_under(a.volumes.root) and not a.volumes.pods_dir.exists(), \
                storage.mounts_under(a.volumes.root)
    finally:
        for a in made:
            a.close()


# ---------------------------------------------------------------- API helpers

async def call(cluster, fn, *args: Any, **kw: Any) -> Any:
    resp = await cluster.call(fn, *args, _preload_content=False, **kw)
    return json.loads(resp.data) if resp.data else None


async def get(cluster, fn, *args: Any) -> dict[str, Any] | None:
    try:
        return await call(cluster, fn, *args)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise


def claim(name: str, size: str, mode: str = "Filesystem", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NS},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": mode,
                     "resources": {"requests": {"storage": size}}, **spec}}


async def create_claim(cluster, body: dict[str, Any]) -> dict[str, Any]:
    return await call(cluster, cluster.core.create_namespaced_persistent_volume_claim, NS, body)


async def bound(cluster, name: str, timeout: float = 10) -> tuple[dict[str, Any], dict[str, Any]]:
    """The claim once Bound, and its PV."""
    async def check():
        c = await get(cluster, cluster.core.read_namespaced_persistent_volume_claim, name, NS)
        return c if c and (c.get("status") or {}).get("phase") == "Bound" else None
    c = await wait_for(check, timeout, f"claim {name} Bound")
    return c, await call(cluster, cluster.core.read_persistent_volume, c["spec"]["volumeName"])


async def events(cluster, reason: str) -> list[dict[str, Any]]:
    return [e for e in (await call(cluster, cluster.core.list_namespaced_event, NS)).get("items") or []
            if e.get("reason") == reason]


async def until(pred, timeout: float, what: str, *workers) -> Any:
    """harness.wait_for (timeout scaled for a busy machine), and on timeout what the agent/provisioner did
    and what failed."""
    try:
        return await wait_for(pred, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; " + "; ".join(f"{type(w).__name__} did {w.calls[-15:]}, errors {w.errors[-5:]}"
                                                  for w in workers)) from None


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def says(path: Path, prefix: str) -> dict[str, str]:
    """`<prefix> <key> <value>` lines of a CRI log: key → last value."""
    out = {}
    for m in re.finditer(rf"^\S+ std(?:out|err) [FP] {re.escape(prefix)} (\S+) ?(.*)$", log_text(path), re.MULTILINE):
        out[m.group(1)] = m.group(2)
    return out


def write_at(dev: Path, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(dev: Path, offset: int, size: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the provisioner alone

async def test_provisioner_binds_claims_to_loop_devices_and_directories_and_reclaims_them(
        cluster, provisioners, root):
    prov = await provisioners(delay=1.5)
    await create_claim(cluster, claim("fs", "2Gi", accessModes=["ReadWriteMany"]))
    await create_claim(cluster, claim("blk", "3Mi", "Block"))
    await create_claim(cluster, claim("odd", f"{3 * MIB + 1}", "Block", storageClassName=prov.storage_class))
    await create_claim(cluster, claim("other", "1Gi", storageClassName="someone-elses"))
    await create_claim(cluster, claim("static", "1Gi", storageClassName=""))

    # delay: Pending first (a claim waiting for its volume), then Bound.
    await asyncio.sleep(0.5)
    first = await get(cluster, cluster.core.read_namespaced_persistent_volume_claim, "fs", NS)
    assert (first.get("status") or {}).get("phase") != "Bound" and not first["spec"].get("volumeName")
    fs, fs_pv = await bound(cluster, "fs")
    blk, blk_pv = await bound(cluster, "blk")
    odd, odd_pv = await bound(cluster, "odd")

    for c, pv, mode in ((fs, fs_pv, "Filesystem"), (blk, blk_pv, "Block")):
        assert pv["metadata"]["name"] == f"pvc-{c['metadata']['uid']}" == c["spec"]["volumeName"]
        assert pv["spec"]["volumeMode"] == c["spec"]["volumeMode"] == mode
        assert pv["spec"]["claimRef"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": NS,
                                          "name": c["metadata"]["name"], "uid": c["metadata"]["uid"]}
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
        assert pv["spec"]["storageClassName"] == prov.storage_class
        assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == PROVISIONER
        assert (pv.get("status") or {}).get("phase") == "Bound"
        assert c["status"]["capacity"] == pv["spec"]["capacity"]
        assert c["status"]["accessModes"] == pv["spec"]["accessModes"] == c["spec"]["accessModes"]
        assert PVC_PROTECTION in c["metadata"]["finalizers"]
        assert c["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] == "yes"
    assert fs_pv["spec"]["capacity"] == {"storage": "2Gi"} and fs_pv["spec"]["accessModes"] == ["ReadWriteMany"]
    fs_dir = Path(fs_pv["spec"]["local"]["path"])
    assert fs_dir.is_dir() and fs_dir.parent == prov.root and not any(fs_dir.iterdir())

    # Block: a loop device over a sparse file of the size asked for, rounded up to a MiB.
    blk_dev, odd_dev = Path(blk_pv["spec"]["local"]["path"]), Path(odd_pv["spec"]["local"]["path"])
    assert stat.S_ISBLK(os.stat(blk_dev).st_mode) and storage.backing_file(blk_dev) == str(prov.root / f"{blk_pv['metadata']['name']}.img")
    assert blk_pv["spec"]["capacity"] == {"storage": "3Mi"} and odd_pv["spec"]["capacity"] == {"storage": "4Mi"}
    assert int(Path(f"/sys/block/{blk_dev.name}/size").read_text()) * 512 == 3 * MIB
    assert int(Path(f"/sys/block/{odd_dev.name}/size").read_text()) * 512 == 4 * MIB
    assert sorted(storage.loop_devices_of(prov.root)) == sorted([blk_dev, odd_dev])
    assert os.stat(storage.backing_file(blk_dev)).st_blocks == 0, "sparse"

    # Other classes, and "" (static binding only), are someone else's.
    for name in ("other", "static"):
        c = await get(cluster, cluster.core.read_namespaced_persistent_volume_claim, name, NS)
        assert not c["spec"].get("volumeName") and (c.get("status") or {}).get("phase") != "Bound", c

    # pvc-protection: a claim a pod names stays (deletionTimestamp) until the pod is gone.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user", "namespace": NS},
           "spec": {"nodeSelector": {"kubernetes.io/hostname": "nowhere"}, "containers": [{"name": "c", "image": "x"}],
                    "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "blk"}}]}}
    await call(cluster, cluster.core.create_namespaced_pod, NS, pod)
    for name in ("fs", "blk"):
        await call(cluster, cluster.core.delete_namespaced_persistent_volume_claim, name, NS)

    async def fs_reclaimed():
        return not fs_dir.exists() and await get(cluster, cluster.core.read_persistent_volume,
                                                 fs_pv["metadata"]["name"]) is None
    await until(fs_reclaimed, 10, "the unused claim's PV and directory gone", prov)
    held = await get(cluster, cluster.core.read_namespaced_persistent_volume_claim, "blk", NS)
    assert held is not None and held["metadata"].get("deletionTimestamp"), "a claim in use must stay"
    assert blk_dev in storage.loop_devices_of(prov.root), "the loop device of a claim in use must stay"

    await call(cluster, cluster.core.delete_namespaced_pod, "user", NS)

    async def blk_reclaimed():
        return blk_dev not in storage.loop_devices_of(prov.root) and await get(
            cluster, cluster.core.read_namespaced_persistent_volume_claim, "blk", NS) is None
    await until(blk_reclaimed, 10, "the claim released once its pod is gone, its loop device detached", prov)
    assert not (prov.root / f"{blk_pv['metadata']['name']}.img").exists()
    assert await get(cluster, cluster.core.read_persistent_volume, blk_pv["metadata"]["name"]) is None
    assert not prov.errors, prov.errors

    # stop() frees what is still provisioned ("odd"), whatever the API says.
    await asyncio.to_thread(prov.stop)
    assert not storage.loop_devices_of(prov.root) and not list(prov.root.iterdir())
    assert not prov.volumes


async def test_provisioner_refuses_bad_claims_naming_the_field_and_binds_on_demand(cluster, provisioners, root):
    prov = await provisioners(on_demand=True)
    bad = {"size": claim("size", "lots"), "zero": claim("zero", "0"), "mode": claim("mode", "1Gi", "Tape"),
           "huge": claim("huge", "1Pi", "Block"), "nosize": claim("nosize", "1Gi")}
    del bad["nosize"]["spec"]["resources"]
    for body in bad.values():
        await create_claim(cluster, body)
        prov.provision(NS, body["metadata"]["name"])
    await create_claim(cluster, claim("later", "1Mi", "Block"))

    expect = {"size": "spec.resources.requests.storage: 'lots' is not a quantity",
              "zero": "spec.resources.requests.storage: '0' must be more than 0",
              "mode": "spec.volumeMode 'Tape' is not one of Filesystem, Block",
              "huge": "spec.resources.requests.storage: ", "nosize": "spec.resources.requests.storage is missing"}

    async def all_failed():
        got = {e["involvedObject"]["name"]: e["message"] for e in await events(cluster, "ProvisioningFailed")}
        return got if set(got) == set(expect) else None
    got = await until(all_failed, 10, "a ProvisioningFailed event per bad claim", prov)
    for name, text in expect.items():
        assert got[name].startswith(text), (name, got[name])
        assert any(e.startswith(f"claim {NS}/{name}: {text}") for e in prov.errors), prov.errors
    assert not storage.loop_devices_of(prov.root) and not list(prov.root.iterdir()), "nothing made for a bad claim"
    assert not (await call(cluster, cluster.core.list_persistent_volume)).get("items")

    # on_demand: "later" waits for provision().
    await asyncio.sleep(1)
    c = await get(cluster, cluster.core.read_namespaced_persistent_volume_claim, "later", NS)
    assert (c.get("status") or {}).get("phase") != "Bound"
    prov.provision(NS, "later")
    _, pv = await bound(cluster, "later")
    assert Path(pv["spec"]["local"]["path"]) in storage.loop_devices_of(prov.root)
    await asyncio.to_thread(prov.stop)
    assert not storage.loop_devices_of(prov.root)


async def test_loop_helpers_refuse_what_is_not_theirs(root):
    with pytest.raises(ValueError, match="size"):
        storage.attach_loop(root / "f.img", 1000)
    os.symlink("/etc/passwd", root / "link.img")
    with pytest.raises(OSError):  # O_NOFOLLOW: never attach (or grow) what a symlink points at
        storage.attach_loop(root / "link.img", MIB)
    with pytest.raises(ValueError, match="not a loop device"):
        storage.detach_loop("/dev/sda")
    with pytest.raises(ValueError, match="one path component"):
        storage.make_dir_volume(root, "../x")
    dev = storage.attach_loop(root / "f.img", MIB)
    try:
        assert storage.loop_devices_of(root) == [dev] and storage.leaks(root) == [f"loop device {dev} ({root / 'f.img'})"]
        (root / "f.img").unlink()  # a deleted backing file still counts
        assert storage.loop_devices_of(root) == [dev]
    finally:
        storage.detach_loop(dev)
    storage.detach_loop(dev)  # idempotent
    assert not storage.leaks(root)


# ---------------------------------------------------------------- ordinary pods on containerd

CTR_SCRIPT = r"""
trap 'exit 0' TERM
say() { echo "AGENTVOL: $*"; }
try() { if "$@" 2>/dev/null; then echo ok; else echo refused; fi; }
say cfg-greeting "$(cat /cfg/greeting)"
say cfg-colour "$(cat /cfg/sub/colour)"
say cfg-ignored "$(ls /cfg/ignored 2>/dev/null || echo absent)"
say cfg-write "$(try touch /cfg/new)"
say secret "$(cat /sec/token)-$(cat /sec/plain)"
say data "$(cat /data/from-host)"
say data-write "$(try sh -c 'echo from-ctr > /data/from-ctr')"
say scratch-write "$(try sh -c 'echo from-ctr > /scratch/from-ctr')"
say scratch-ro-write "$(try sh -c 'echo x > /scratch-ro/x')"
say rodata "$(cat /rodata/from-host)"
say rodata-write "$(try sh -c 'echo x > /rodata/x')"
say hostpath "$(cat /hp/from-host)"
say mem "$(grep ' /mem ' /proc/mounts | cut -d' ' -f3)"
say disk-node "$(if [ -b /dev/xvda ]; then echo block; else echo missing; fi)"
say disk "$(dd if=/dev/xvda bs=16 count=1 2>/dev/null)"
say disk-write "$(try sh -c 'printf CTR-WROTE-DISK | dd of=/dev/xvda bs=512 seek=1 conv=notrunc')"
say rodisk "$(dd if=/dev/xvdb bs=16 count=1 2>/dev/null)"
say rodisk-write "$(try sh -c 'printf x | dd of=/dev/xvdb bs=512 seek=1 conv=notrunc')"
say done yes
last=
while :; do
    g=$(cat /cfg/greeting)
    [ "$g" != "$last" ] && say greeting "$g"
    last=$g
    sleep 1
done
"""


def ctr_pod(name: str, node: str, script: str, volumes: list, mounts: list = (), devices: list = ()) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {RUN_LABEL: RUN_ID}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [{"name": "c", "image": BUSYBOX, "imagePullPolicy": "IfNotPresent",
                                     "command": ["/bin/sh", "-c", script],
                                     "volumeMounts": list(mounts), "volumeDevices": list(devices)}],
                     "volumes": list(volumes)}}


async def pod_of(cluster, name: str) -> dict[str, Any] | None:
    return await get(cluster, cluster.core.read_namespaced_pod, name, NS)


async def waiting(cluster, name: str, reason: str, *workers) -> dict[str, Any]:
    """The pod once its container waits with `reason`: that state."""
    async def check():
        p = await pod_of(cluster, name)
        cs = ((p or {}).get("status") or {}).get("containerStatuses") or []
        w = cs[0]["state"].get("waiting") if cs else None
        return w if w and w.get("reason") == reason and w.get("message") else None
    return await until(check, 10, f"pod {name} waiting with {reason}", *workers)


async def running(cluster, name: str, timeout: float, *workers) -> dict[str, Any]:
    async def check():
        p = await pod_of(cluster, name)
        return p if p and (p.get("status") or {}).get("phase") == "Running" else None
    return await until(check, timeout, f"pod {name} Running", *workers)


async def deleted(cluster, name: str, timeout: float, *workers) -> None:
    await call(cluster, cluster.core.delete_namespaced_pod, name, NS)

    async def gone():
        return await pod_of(cluster, name) is None
    await until(gone, timeout, f"pod {name} gone", *workers)


def propagation(mountpoint: Path) -> str:
    return subprocess.run(["findmnt", "--noheadings", "--output", "PROPAGATION", "--mountpoint", str(mountpoint)],
                          capture_output=True, text=True, check=True).stdout.strip()


def vols_of(agent: KubeletAgent, pod: dict[str, Any]) -> Path:
    return agent.volumes.pod_dir(pod["metadata"]["uid"]) / "volumes"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_container_pod_gets_its_volumes_as_the_kubelet_lays_them_out(
        containerd_socket, containerd, cluster, provisioners, agents, root):
    node = f"agentvol-{uuid.uuid4().hex[:6]}"
    prov = await provisioners(node_name=node)
    await call(cluster, cluster.core.create_namespaced_config_map, NS, {
        "metadata": {"name": "app", "namespace": NS},
        "data": {"greeting": "hello", "colour": "blue", "ignored": "no"}})
    await call(cluster, cluster.core.create_namespaced_secret, NS, {
        "metadata": {"name": "creds", "namespace": NS},
        "data": {"token": base64.b64encode(b"s3cr3t").decode()}, "stringData": {"plain": "p"}})
    for body in (claim("data", "1Gi"), claim("rodata", "1Gi"), claim("disk", "4Mi", "Block"),
                 claim("rodisk", "2Mi", "Block")):
        await create_claim(cluster, body)
    (_, data_pv), (_, rodata_pv), (_, disk_pv), (_, rodisk_pv) = [
        await bound(cluster, n) for n in ("data", "rodata", "disk", "rodisk")]
    data_dir, rodata_dir = Path(data_pv["spec"]["local"]["path"]), Path(rodata_pv["spec"]["local"]["path"])
    disk, rodisk = Path(disk_pv["spec"]["local"]["path"]), Path(rodisk_pv["spec"]["local"]["path"])
    (data_dir / "from-host").write_text("host-data\n")
    (rodata_dir / "from-host").write_text("host-rodata\n")
    # A statically bound hostPath PV (no provisioner): the kubelet passes its path as it is.
    hostpath = storage.make_dir_volume(root, "hostpath")
    (hostpath / "from-host").write_text("host-path\n")
    await call(cluster, cluster.core.create_persistent_volume, {
        "metadata": {"name": "static-hp"}, "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                                                    "hostPath": {"path": str(hostpath)}}})
    hp = await create_claim(cluster, claim("hp", "1Gi", storageClassName="", volumeName="static-hp"))
    await call(cluster, cluster.core.patch_persistent_volume, "static-hp", {"spec": {"claimRef": {
        "namespace": NS, "name": "hp", "uid": hp["metadata"]["uid"]}}}, _content_type=MERGE)
    await call(cluster, cluster.core.patch_namespaced_persistent_volume_claim_status, "hp", NS,
               {"status": {"phase": "Bound"}}, _content_type=MERGE)
    write_at(disk, 0, b"DISK-MARKER-0001")
    write_at(rodisk, 0, b"RODISK-MARKER-02")

    volumes = [
        {"name": "cfg", "configMap": {"name": "app", "defaultMode": 0o444,
                                      "items": [{"key": "greeting", "path": "greeting"},
                                                {"key": "colour", "path": "sub/colour", "mode": 0o640}]}},
        {"name": "sec", "secret": {"secretName": "creds"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "rodata", "persistentVolumeClaim": {"claimName": "rodata", "readOnly": True}},
        {"name": "hp", "persistentVolumeClaim": {"claimName": "hp"}},
        {"name": "disk", "persistentVolumeClaim": {"claimName": "disk"}},
        {"name": "rodisk", "persistentVolumeClaim": {"claimName": "rodisk", "readOnly": True}},
    ]
    mounts = [{"name": "cfg", "mountPath": "/cfg"}, {"name": "sec", "mountPath": "/sec"},
              {"name": "scratch", "mountPath": "/scratch"}, {"name": "mem", "mountPath": "/mem"},
              {"name": "data", "mountPath": "/data", "mountPropagation": "HostToContainer"},
              {"name": "scratch", "mountPath": "/scratch-ro", "readOnly": True},
              {"name": "rodata", "mountPath": "/rodata"}, {"name": "hp", "mountPath": "/hp"}]
    devices = [{"name": "disk", "devicePath": "/dev/xvda"}, {"name": "rodisk", "devicePath": "/dev/xvdb"}]
    agent = agents(containerd_socket, node, cgroup_root=CGROUP_PARENT)
    await call(cluster, cluster.core.create_namespaced_pod, NS, ctr_pod("vols", node, CTR_SCRIPT, volumes, mounts,
                                                                         devices))
    pod = await running(cluster, "vols", POD_TIMEOUT, agent, prov)
    uid = pod["metadata"]["uid"]
    log = agent.log_file(pod, "c")
    await until(lambda: "done" in says(log, "AGENTVOL:"), 30, f"the container's checks in {log}", agent)
    seen = says(log, "AGENTVOL:")
    assert seen == {**seen, "cfg-greeting": "hello", "cfg-colour": "blue", "cfg-ignored": "absent",
                    "cfg-write": "refused", "secret": "s3cr3t-p", "data": "host-data", "data-write": "ok",
                    "scratch-write": "ok", "scratch-ro-write": "refused", "rodata": "host-rodata",
                    "rodata-write": "refused", "hostpath": "host-path", "mem": "tmpfs", "disk-node": "block", "disk": "DISK-MARKER-0001",
                    "disk-write": "ok", "rodisk": "RODISK-MARKER-02", "rodisk-write": "refused"}, log_text(log)
    assert read_at(disk, 512, 14) == b"CTR-WROTE-DISK"
    assert read_at(rodisk, 512, 1) == b"\0", "a read-only claim's device must not be written"
    assert (data_dir / "from-ctr").read_text() == "from-ctr\n"
    assert sorted(os.listdir(rodata_dir)) == ["from-host"]
    assert not (vols_of(agent, pod) / EMPTY_DIR / "scratch" / "x").exists()

    # What CreateContainer carried, as containerd echoes it: the kubelet's host paths and flags.
    [ctr] = containerd.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(label_selector={"io.kubernetes.pod.uid": uid})), timeout=30).containers
    info = json.loads(containerd.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(
        container_id=ctr.id, verbose=True), timeout=30).info["info"])
    pod_dir = agent.volumes.pod_dir(uid)
    vols = pod_dir / "volumes"
    sent_mounts = {m["container_path"]: (m["host_path"], m.get("readonly", False), m.get("propagation", 0))
                   for m in info["config"]["mounts"]}
    private, host_to_container = api_pb2.PROPAGATION_PRIVATE, api_pb2.PROPAGATION_HOST_TO_CONTAINER
    assert sent_mounts == {
        "/cfg": (str(vols / CONFIGMAP / "cfg"), True, private), "/sec": (str(vols / SECRET / "sec"), True, private),
        "/scratch": (str(vols / EMPTY_DIR / "scratch"), False, private),
        "/scratch-ro": (str(vols / EMPTY_DIR / "scratch"), True, private),
        "/mem": (str(vols / EMPTY_DIR / "mem"), False, private),
        "/data": (str(vols / LOCAL / data_pv["metadata"]["name"]), False, host_to_container),
        "/rodata": (str(vols / LOCAL / rodata_pv["metadata"]["name"]), True, private),
        "/hp": (str(hostpath), False, private)}
    links = pod_dir / "volumeDevices" / LOCAL
    assert sorted((d["container_path"], d["host_path"], d["permissions"]) for d in info["config"]["devices"]) == [
        ("/dev/xvda", str(links / disk_pv["metadata"]["name"]), "mrw"),
        ("/dev/xvdb", str(links / rodisk_pv["metadata"]["name"]), "r")]
    assert os.readlink(links / disk_pv["metadata"]["name"]) == str(disk)

    # The kubelet's layout: its root an rshared bind onto itself (HostToContainer needs it), 0750
    # directories, a bind per filesystem claim (local PVs; hostPath: none), tmpfs for Secret and Memory.
    assert propagation(agent.volumes.root) == "shared"
    assert mode_of(agent.volumes.pods_dir) == mode_of(pod_dir) == mode_of(vols) == 0o750
    assert os.stat(agent.volumes.pods_dir).st_uid == 0
    assert storage.mounts_under(pod_dir) == sorted(str(p) for p in (
        vols / EMPTY_DIR / "mem", vols / LOCAL / data_pv["metadata"]["name"],
        vols / LOCAL / rodata_pv["metadata"]["name"], vols / SECRET / "sec"))
    assert (vols / EMPTY_DIR / "scratch" / "from-ctr").read_text() == "from-ctr\n"
    assert mode_of(vols / EMPTY_DIR / "scratch") == 0o777
    cfg = vols / CONFIGMAP / "cfg"
    ts = os.readlink(cfg / "..data")
    assert TS_DIR.match(ts), ts
    assert sorted(os.listdir(cfg)) == sorted(["..data", ts, "greeting", "sub"])
    assert os.readlink(cfg / "greeting") == "..data/greeting" and os.readlink(cfg / "sub") == "..data/sub"
    assert mode_of(cfg / ts / "greeting") == 0o444 and mode_of(cfg / ts / "sub" / "colour") == 0o640
    assert (cfg / "sub" / "colour").read_text() == "blue"

    # A ConfigMap update: a new timestamped directory swapped in, the old one gone; the container sees it.
    await call(cluster, cluster.core.patch_namespaced_config_map, "app", NS, {"data": {"greeting": "hello-again"}},
               _content_type=MERGE)
    await until(lambda: says(log, "AGENTVOL:").get("greeting") == "hello-again", 30,
                "the container reading the updated ConfigMap", agent)
    new_ts = os.readlink(cfg / "..data")
    assert new_ts != ts and TS_DIR.match(new_ts) and not (cfg / ts).exists()
    assert (cfg / "greeting").read_text() == "hello-again" and mode_of(cfg / new_ts / "greeting") == 0o444
    calls_before = len(agent.calls)
    await asyncio.sleep(1)  # passes go on; nothing changed, so nothing is rewritten
    assert os.readlink(cfg / "..data") == new_ts and len(agent.calls) == calls_before

    # Deleted: the container stopped, the sandbox removed, then the volumes: unmounted, directory gone.
    await deleted(cluster, "vols", 30, agent)
    assert not pod_dir.exists() and not storage.mounts_under(agent.volumes.pods_dir)
    order = [c.split()[0] for c in agent.calls if c.split()[0] in ("RemovePodSandbox", "unmount")]
    assert order == ["RemovePodSandbox", "unmount"], agent.calls
    assert (data_dir / "from-ctr").exists() and read_at(disk, 0, 16) == b"DISK-MARKER-0001", "the claims' data stays"

    # The claims deleted: their PVs, directories and loop devices go.
    for name in ("data", "rodata", "disk", "rodisk", "hp"):
        await call(cluster, cluster.core.delete_namespaced_persistent_volume_claim, name, NS)

    async def reclaimed():
        return not storage.loop_devices_of(prov.root) and not prov.volumes and not data_dir.exists()
    await until(reclaimed, 10, "the claims' volumes removed", prov)
    left = [pv["metadata"]["name"] for pv in (await call(cluster, cluster.core.list_persistent_volume)).get("items")]
    assert left == ["static-hp"], "the provisioner deletes its own PVs only"
    assert (hostpath / "from-host").exists()
    assert not agent.errors and not prov.errors, (agent.errors, prov.errors)


async def test_a_pod_waits_for_unbound_claims_and_missing_objects_before_its_sandbox(
        containerd_socket, containerd, cluster, provisioners, agents, root):
    node = f"agentvol-{uuid.uuid4().hex[:6]}"
    prov = await provisioners(node_name=node, on_demand=True)
    await create_claim(cluster, claim("late", "1Gi"))
    volumes = [{"name": "late", "persistentVolumeClaim": {"claimName": "late"}},
               {"name": "cfg", "configMap": {"name": "later"}},
               {"name": "opt", "secret": {"secretName": "never", "optional": True}},
               {"name": "gone", "persistentVolumeClaim": {"claimName": "nonexistent"}}]
    mounts = [{"name": v["name"], "mountPath": f"/{v['name']}"} for v in volumes]
    script = "trap 'exit 0' TERM; echo \"AGENTVOL: cfg $(cat /cfg/k)\"; echo \"AGENTVOL: opt $(ls /opt | wc -l)\"; " \
             "while :; do sleep 1; done"
    agent = agents(containerd_socket, node, cgroup_root=CGROUP_PARENT)
    await call(cluster, cluster.core.create_namespaced_pod, NS, ctr_pod("waits", node, script, volumes, mounts))

    w = await waiting(cluster, "waits", "ContainerCreating", agent, prov)
    for text in ("FailedMount: spec.volumes[0].persistentVolumeClaim: persistentvolumeclaim default/late is Pending, "
                 "not bound to a volume",
                 "spec.volumes[1].configMap: configmap default/later not found",
                 "spec.volumes[3].persistentVolumeClaim: persistentvolumeclaim default/nonexistent not found"):
        assert text in w["message"], w["message"]
    assert "volumes[2]" not in w["message"], "an optional Secret that is missing is an empty volume"
    pod = await pod_of(cluster, "waits")
    assert pod["status"]["phase"] == "Pending" and pod["spec"]["nodeName"] == node
    assert not [c for c in agent.calls if c.startswith("RunPodSandbox")], "no sandbox before the volumes"
    failed = await events(cluster, "FailedMount")
    assert failed and all(e["involvedObject"]["uid"] == pod["metadata"]["uid"] and e["type"] == "Warning"
                          for e in failed)

    # One by one: still waiting on what is left.
    await call(cluster, cluster.core.create_namespaced_config_map, NS,
               {"metadata": {"name": "later", "namespace": NS}, "data": {"k": "v"}})
    prov.provision(NS, "late")
    await bound(cluster, "late")

    async def only_missing_claim():
        w = await waiting(cluster, "waits", "ContainerCreating", agent)
        return w if "late" not in w["message"] and "later" not in w["message"] else None
    w = await until(only_missing_claim, 10, "only the missing claim left", agent)
    assert "nonexistent not found" in w["message"]
    assert not [c for c in agent.calls if c.startswith("RunPodSandbox")]

    await create_claim(cluster, claim("nonexistent", "1Gi"))
    prov.provision(NS, "nonexistent")
    pod = await running(cluster, "waits", POD_TIMEOUT, agent, prov)
    log = agent.log_file(pod, "c")
    await until(lambda: says(log, "AGENTVOL:").get("opt") == "0", 30, "the container's output", agent)
    assert says(log, "AGENTVOL:")["cfg"] == "v"
    await deleted(cluster, "waits", 30, agent)
    assert not agent.errors and not prov.errors, (agent.errors, prov.errors)


async def test_bad_volume_specs_are_named_in_the_pod_status_and_touch_nothing_outside(
        containerd_socket, containerd, cluster, provisioners, agents, root):
    node = f"agentvol-{uuid.uuid4().hex[:6]}"
    prov = await provisioners(node_name=node)
    await call(cluster, cluster.core.create_namespaced_config_map, NS,
               {"metadata": {"name": "cm", "namespace": NS}, "data": {"k": "v", "../../../escape": "x"}})
    await create_claim(cluster, claim("blk", "1Mi", "Block"))
    await create_claim(cluster, claim("fs", "1Mi"))
    await bound(cluster, "blk")
    await bound(cluster, "fs")
    sh = "trap 'exit 0' TERM; while :; do sleep 1; done"
    cm = lambda **src: {"name": "cfg", "configMap": {"name": "cm", **src}}  # noqa: E731
    # (pod, volumes, mounts, devices, waiting reason, what the message must say)
    cases = [
        ("items-escape", [cm(items=[{"key": "k", "path": "../../../escape"}])], [], [], "ContainerCreating",
         "spec.volumes[0].configMap.items[0].path: '../../../escape' must not start with '..'"),
        ("items-absolute", [cm(items=[{"key": "k", "path": "/etc/escape"}])], [], [], "ContainerCreating",
         "spec.volumes[0].configMap.items[0].path: '/etc/escape' must be a relative path"),
        ("key-escape", [cm()], [], [], "ContainerCreating", "configmap default/cm key: '../../../escape'"),
        ("bad-mode", [cm(items=[{"key": "k", "path": "k"}], defaultMode=0o1777)], [], [], "ContainerCreating",
         "spec.volumes[0].configMap.defaultMode: 1023 is not a file mode"),
        ("no-key", [cm(items=[{"key": "nope", "path": "k"}])], [], [], "ContainerCreating",
         "spec.volumes[0].configMap.items[0].key: configmap default/cm has no key 'nope'"),
        ("two-sources", [{"name": "v", "emptyDir": {}, "configMap": {"name": "cm"}}], [], [], "ContainerCreating",
         "spec.volumes[0] (v): needs exactly one volume source"),
        ("nfs", [{"name": "v", "nfs": {"server": "x", "path": "/"}}], [], [], "ContainerCreating",
         "spec.volumes[0].nfs (v): not supported"),
        ("hostile-name", [{"name": "../../x", "emptyDir": {}}], [], [], "ContainerCreating",
         "spec.volumes[0].name: '../../x' cannot name a directory"),
        ("dot-name", [{"name": ".", "emptyDir": {}}], [], [], "ContainerCreating",
         "spec.volumes[0].name: '.' cannot name a directory"),
        ("no-claim-name", [{"name": "c", "persistentVolumeClaim": {"claimName": ""}}], [], [], "ContainerCreating",
         "spec.volumes[0].persistentVolumeClaim.claimName: '' is not a name"),
        ("hostile-cm-name", [{"name": "c", "configMap": {"name": "../secrets/x"}}], [], [], "ContainerCreating",
         "spec.volumes[0].configMap.name: '../secrets/x' cannot name a directory"),
        ("no-volume", [], [{"name": "missing", "mountPath": "/m"}], [], "CreateContainerConfigError",
         "spec.containers[0].volumeMounts[0].name: 'missing' is not one of the pod's volumes"),
        ("block-mounted", [{"name": "b", "persistentVolumeClaim": {"claimName": "blk"}}],
         [{"name": "b", "mountPath": "/b"}], [], "CreateContainerConfigError",
         "spec.containers[0].volumeMounts[0]: volume 'b' has volumeMode Block: it goes in volumeDevices"),
        ("fs-as-device", [{"name": "f", "persistentVolumeClaim": {"claimName": "fs"}}],
         [], [{"name": "f", "devicePath": "/dev/xvdf"}], "CreateContainerConfigError",
         "spec.containers[0].volumeDevices[0]: volume 'f' is not a block volume"),
        ("relative-device", [{"name": "b", "persistentVolumeClaim": {"claimName": "blk"}}],
         [], [{"name": "b", "devicePath": "xvdb"}], "CreateContainerConfigError",
         "spec.containers[0].volumeDevices[0].devicePath: 'xvdb' must be an absolute path"),
        ("sub-path", [{"name": "e", "emptyDir": {}}], [{"name": "e", "mountPath": "/e", "subPath": "x"}], [],
         "CreateContainerConfigError", "spec.containers[0].volumeMounts[0].subPath: not supported"),
    ]
    agent = agents(containerd_socket, node, cgroup_root=CGROUP_PARENT)
    for name, volumes, mounts, devices, _, _ in cases:
        await call(cluster, cluster.core.create_namespaced_pod, NS, ctr_pod(name, node, sh, volumes, mounts, devices))
    hostile = ctr_pod("hostile-uid", node, sh, [{"name": "e", "emptyDir": {}}])
    hostile["metadata"]["uid"] = "../../../hostile"  # kmock takes any uid: the agent must not use it as a path
    await call(cluster, cluster.core.create_namespaced_pod, NS, hostile)
    cases.append(("hostile-uid", [], [], [], "ContainerCreating", "metadata.uid: '../../../hostile' cannot name"))

    for name, _, _, _, reason, text in cases:
        w = await waiting(cluster, name, reason, agent)
        assert text in w["message"], (name, w["message"])
        p = await pod_of(cluster, name)
        assert p["status"]["phase"] == "Pending", (name, p["status"])
    sandboxes = {c.split()[1] for c in agent.calls if c.startswith("RunPodSandbox")}
    assert sandboxes == {f"{NS}/{c[0]}" for c in cases if c[4] == "CreateContainerConfigError"}, agent.calls
    assert not [c for c in agent.calls if c.startswith("CreateContainer")], agent.calls
    escaped = [*root.rglob("*escape*"), *root.rglob("*hostile*"), *root.parent.glob("*hostile*")]
    assert not escaped, escaped

    for name, *_ in cases:
        await call(cluster, cluster.core.delete_namespaced_pod, name, NS)

    async def all_gone():
        return not (await call(cluster, cluster.core.list_namespaced_pod, NS)).get("items")
    await until(all_gone, 30, "every pod deleted", agent)
    assert not agent.volumes.uids() and not storage.mounts_under(agent.volumes.pods_dir)
    assert not agent.errors and not prov.errors, (agent.errors, prov.errors)


async def test_stop_takes_every_volume_down_and_a_restarted_agent_cleans_up_orphans(
        containerd_socket, containerd, cluster, provisioners, agents, root):
    node = f"agentvol-{uuid.uuid4().hex[:6]}"
    prov = await provisioners(node_name=node)
    await create_claim(cluster, claim("data", "1Gi"))
    await call(cluster, cluster.core.create_namespaced_secret, NS,
               {"metadata": {"name": "s", "namespace": NS}, "stringData": {"k": "v"}})
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
               {"name": "sec", "secret": {"secretName": "s"}}, {"name": "mem", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": v["name"], "mountPath": f"/{v['name']}"} for v in volumes]
    sh = "trap 'exit 0' TERM; while :; do sleep 1; done"
    first = agents(containerd_socket, node, cgroup_root=CGROUP_PARENT)
    await call(cluster, cluster.core.create_namespaced_pod, NS, ctr_pod("p", node, sh, volumes, mounts))
    pod = await running(cluster, "p", POD_TIMEOUT, first, prov)
    uid = pod["metadata"]["uid"]
    pods_dir = first.volumes.pods_dir
    assert len(storage.mounts_under(pods_dir)) == 3

    def sandboxes() -> list[str]:
        return [sb.id for sb in containerd.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(
            filter=api_pb2.PodSandboxFilter(label_selector={"io.kubernetes.pod.uid": uid})), timeout=30).items]

    # stop(): every mount and directory gone, also under a pod that still runs (its sandbox stays).
    await asyncio.to_thread(first.stop)
    assert not storage.mounts_under(first.volumes.root) and not pods_dir.exists()
    assert len(sandboxes()) == 1

    # A restarted agent sets the running pod's volumes up again...
    second = agents(containerd_socket, node, cgroup_root=CGROUP_PARENT)
    await until(lambda: len(storage.mounts_under(pods_dir)) == 3, 10, "the volumes back", second)
    assert not [c for c in second.calls if c.startswith("RunPodSandbox")], "the pod keeps its sandbox"
    # ...and once the pod is gone without it (its finalizer removed, deleted), tears down the orphans.
    await call(cluster, cluster.core.patch_namespaced_pod, "p", NS, {"metadata": {"finalizers": []}},
               _content_type=MERGE)
    await call(cluster, cluster.core.delete_namespaced_pod, "p", NS)

    async def orphans_gone():
        return not sandboxes() and not (pods_dir / uid).exists()
    await until(orphans_gone, 30, "the orphan sandbox and pod directory removed", second)
    assert [c for c in second.calls if c.startswith("orphan sandbox")] and f"remove orphan pod dir {uid}" in second.calls
    assert not storage.mounts_under(pods_dir)
    assert not first.errors and not second.errors and not prov.errors, (first.errors, second.errors, prov.errors)


# ---------------------------------------------------------------- a VM pod on the node

GUEST_SCRIPT = """#!/bin/sh
@virtlet-mount-script@
say() { echo "AGENTVOL: $*"; }
say cfg "$(cat /etc/app/greeting)"
say secret "$(cat /etc/creds/token)"
say data "$(cat /data/from-host)"
echo from-guest > /data/from-guest && say data-write ok
echo from-guest > /scratch/from-guest && say scratch-write ok
say disk-link "$(readlink /dev/vmlet/disk)"
say disk "$(dd if=/dev/vmlet/disk bs=16 count=1 2>/dev/null)"
"""


@pytest.mark.libvirt
async def test_a_vm_pod_reads_its_volumes_and_block_claim_on_its_console(
        proxy_process, vmlet, vmlet_dir, libvirt_conn, cluster, provisioners, agents, root):
    node = "agentvol-vm-node"
    await asyncio.to_thread(lambda: proxy_process.start().close())
    prov = await provisioners(node_name=node)
    await call(cluster, cluster.core.create_namespaced_config_map, NS,
               {"metadata": {"name": "app", "namespace": NS}, "data": {"greeting": "hello-vm"}})
    await call(cluster, cluster.core.create_namespaced_secret, NS,
               {"metadata": {"name": "creds", "namespace": NS}, "data": {"token": base64.b64encode(b"vm-s3cr3t").decode()}})
    await create_claim(cluster, claim("data", "1Gi"))
    await create_claim(cluster, claim("disk", "8Mi", "Block"))
    (_, data_pv), (_, disk_pv) = await bound(cluster, "data"), await bound(cluster, "disk")
    data_dir, disk = Path(data_pv["spec"]["local"]["path"]), Path(disk_pv["spec"]["local"]["path"])
    (data_dir / "from-host").write_text("host-data-vm\n")
    write_at(disk, 0, b"VM-DISK-MARKER-1")

    pod_body = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "volvm", "namespace": NS,
                     "annotations": {"kubernetes.io/target-runtime": podspec.TARGET_RUNTIME,
                                     "VirtletCloudInitUserDataScript": GUEST_SCRIPT}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0, "nodeSelector": podspec.NODE_SELECTOR,
                 "containers": [{"name": "vm", "image": TESTVM, "resources": {"limits": {"memory": "256Mi"}},
                                 "volumeMounts": [{"name": "cfg", "mountPath": "/etc/app"},
                                                  {"name": "sec", "mountPath": "/etc/creds"},
                                                  {"name": "scratch", "mountPath": "/scratch"},
                                                  {"name": "data", "mountPath": "/data"}],
                                 "volumeDevices": [{"name": "disk", "devicePath": "/dev/vmlet/disk"}]}],
                 "volumes": [{"name": "cfg", "configMap": {"name": "app"}},
                             {"name": "sec", "secret": {"secretName": "creds"}},
                             {"name": "scratch", "emptyDir": {}},
                             {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                             {"name": "disk", "persistentVolumeClaim": {"claimName": "disk"}}]}}
    agent = agents(proxy_process.socket, node, node_labels=podspec.NODE_SELECTOR, log_root=vmlet_dir / "pods")
    await call(cluster, cluster.core.create_namespaced_pod, NS, pod_body)
    pod = await running(cluster, "volvm", BOOT_TIMEOUT / TIMEOUT_SCALE, agent, prov)
    log = agent.log_file(pod, "vm")
    await until(lambda: re.search(r"VMLET-TESTVM: user-data exit \d+$", log_text(log), re.MULTILINE),
                BOOT_TIMEOUT / TIMEOUT_SCALE,
                f"the guest's user-data done ({log})", agent)
    seen = says(log, "AGENTVOL:")
    assert seen == {**seen, "cfg": "hello-vm", "secret": "vm-s3cr3t", "data": "host-data-vm", "data-write": "ok",
                    "scratch-write": "ok", "disk": "VM-DISK-MARKER-1"}, log_text(log)[-3000:]
    assert (data_dir / "from-guest").read_text() == "from-guest\n"
    pod_dir = agent.volumes.pod_dir(pod["metadata"]["uid"])
    assert (pod_dir / "volumes" / EMPTY_DIR / "scratch" / "from-guest").read_text() == "from-guest\n"

    # The block claim is the VM's disk: the loop device behind the agent's symlink, named by the CRI path.
    [sb] = vmlet.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    [ctr] = vmlet.client.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=sb.id)), timeout=30).containers
    info = json.loads(vmlet.client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(
        container_id=ctr.id, verbose=True), timeout=30).info["info"])
    dom = ET.fromstring(libvirt_conn.lookupByName(info["domain"]).XMLDesc())
    disks = {d.findtext("serial"): d for d in dom.iterfind("devices/disk")}
    assert "disk" in disks, ET.tostring(dom.find("devices"), encoding="unicode")
    source = disks["disk"].find("source")
    assert os.path.realpath(source.get("dev") or source.get("file")) == str(disk)
    shares = {s["containerPath"] for s in info["volumes"]["shares"]}
    assert shares == {"/etc/app", "/etc/creds", "/scratch", "/data"}, info["volumes"]

    await deleted(cluster, "volvm", 120, agent)
    assert not pod_dir.exists() and not storage.mounts_under(agent.volumes.pods_dir)
    assert read_at(disk, 0, 16) == b"VM-DISK-MARKER-1" and (data_dir / "from-guest").exists()
    assert not agent.errors and not prov.errors, (agent.errors, prov.errors)
