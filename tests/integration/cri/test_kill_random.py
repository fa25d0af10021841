"""SIGKILL of vmlet at random instants inside every lifecycle RPC, for both network bindings.

Each round drives one pod the way the kubelet does (pull, RunPodSandbox,
CreateContainer, StartContainer, StopContainer, RemoveContainer,
StopPodSandbox, RemovePodSandbox), picks one of those RPCs and kills the
daemon with SIGKILL at a random instant inside it (uniform over the RPC's
duration measured in the same run, a little past its end too, so the kill
also lands between RPCs). Then:

1. the daemon must start again (recovery never refuses to start);
2. what it reports agrees with the facts: every container it lists is
   running exactly when its libvirt domain runs, every domain and VM directory
   belongs to a listed container, every ready sandbox's IP is held by IPAM and
   IPAM holds no IP of a sandbox vmlet does not list, a dnsmasq runs only for a
   ready sandbox, an image's holders are listed containers;
3. the kubelet's next steps finish the pod from wherever it was (retrying the
   killed RPC where the kubelet would);
4. nothing is left: no domain, VM directory, network record, netns, host
   link, dnsmasq, pod IP or image holder.

Seeded: VMLET_FUZZ_SEED (default fixed) and VMLET_FUZZ=long for more rounds.
A failure prints the seed, round and kill point to replay it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cri_shim.network import dhcp, links, netns
from cri_shim.storage import persistent_root, pod_volumes
from cri_shim.network.names import netns_name, owner_tag
from proto.runtime.v1 import api_pb2
from tests.support import cri
from tests.support.fuzz_profile import LONG, SEED
from tests.support.libvirt_env import RUN_PREFIX

from .conftest import TESTVM

pytestmark = pytest.mark.libvirt

ROUNDS = int(os.environ.get("VMLET_KILL_ROUNDS", 100 if LONG else 20))  # per binding: 40 in CI
STEPS = ("PullImage", "RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer",
         "StopPodSandbox", "RemovePodSandbox")
CALL_TIMEOUT = 120
MIB = 1024 * 1024
DISK_ROUNDS = int(os.environ.get("VMLET_KILL_ROUNDS", 40 if LONG else 12))


@dataclass
class Pod:
    config: api_pb2.PodSandboxConfig
    sandbox_id: str = ""
    container_id: str = ""
    seen_sandboxes: set[str] = field(default_factory=set)
    mounts: list = field(default_factory=list)
    devices: list = field(default_factory=list)


class Volumes:
    """The "disks" rounds' stand-ins for PVs: a data block device and a filesystem volume that every pod gets,
    and for each pod a blank block device for its persistent root (so a kill can land inside the import)."""

    ANNOTATION = "\n".join([
        "- {name: root, device: /dev/vmlet/root, root: true}",
        "- {name: blk, device: /dev/vmlet/blk}",
        "- {name: vol, volume: /vmlet/disks/vol, capacity: 16Mi}",
        "- {name: scratch, emptyDisk: {capacity: 16Mi}}",
        "- {name: cfg, configVolume: /vmlet/config/cfg}",
    ])
    MARK = b"KEEP-this-data\n"

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.loops: list[Path] = []
        self.roots: dict[int, Path] = {}
        self.blk = self._loop("blk.img", 16 * MIB)
        with open(self.blk, "r+b") as f:
            f.write(self.MARK)
        self.vol = root / "vol"
        self.vol.mkdir()
        self.cfg = root / "cfg"
        self.cfg.mkdir()
        (self.cfg / "key").write_text("value\n")

    def _loop(self, name: str, size: int) -> Path:
        backing = self.root / name
        with open(backing, "wb") as f:
            f.truncate(size)
        dev = Path(subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                                  text=True).stdout.strip())
        self.loops.append(dev)
        return dev

    def for_pod(self, pod: Pod, n: int) -> None:
        pod.config.annotations["vmlet.dev/disks"] = self.ANNOTATION
        root = self._loop(f"root-{n}.img", 128 * MIB)
        self.roots[n] = root
        pod.devices = [api_pb2.Device(container_path="/dev/vmlet/root", host_path=str(root), permissions="rw"),
                       api_pb2.Device(container_path="/dev/vmlet/blk", host_path=str(self.blk), permissions="rw")]
        pod.mounts = [api_pb2.Mount(container_path="/vmlet/disks/vol", host_path=str(self.vol)),
                      api_pb2.Mount(container_path="/vmlet/config/cfg", host_path=str(self.cfg), readonly=True)]

    def check_kept(self, where: str) -> None:
        with open(self.blk, "rb") as f:
            assert f.read(len(self.MARK)) == self.MARK, f"{where}: the data volume was written by vmlet"

    def check_root(self, n: int, image: Path, digest: str, where: str) -> None:
        """The round's root is blank (never imported: its pod ended before a create) or holds the image whole
        under a header naming its digest; never a header over a partial import."""
        dev = self.roots[n]
        header = persistent_root.read_block_header(dev)
        if header is None:
            with open(dev, "rb") as f:
                assert not f.read(persistent_root.HEADER_SIZE).strip(b"\0"), f"{where}: a root with data, no header"
            return
        assert header["imageDigest"] == digest, f"{where}: {header}"
        size = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True,
                                         capture_output=True, text=True).stdout)["virtual-size"]
        compare = subprocess.run(
            ["qemu-img", "compare", "--image-opts", f"driver=qcow2,file.filename={image}",
             f"driver=raw,offset={persistent_root.HEADER_SIZE},size={size},file.driver=host_device,"
             f"file.filename={dev}"], capture_output=True, text=True)
        assert compare.returncode == 0, f"{where}: the root's header says imported, its data differs: " \
                                        f"{compare.stdout}{compare.stderr}"

    def close(self) -> None:
        for dev in self.loops:
            subprocess.run(["losetup", "-d", str(dev)], check=False)


class Node:
    """The daemon under test plus what the checks need to know about its state dir."""

    def __init__(self, vmlet: cri.VmletProcess, test_network):
        self.vmlet, self.net = vmlet, test_network
        self.client = vmlet.start()
        self.tag = owner_tag(str(vmlet.state_dir.resolve()))

    @property
    def rt(self):
        return self.client.runtime

    def restart(self) -> None:
        self.vmlet.kill()
        self.client = self.vmlet.start()  # raises if the daemon cannot start: the bug class this suite is for

    # ------------------------------------------------------------ facts

    def domains(self, conn) -> dict[str, bool]:
        return {d.name(): bool(d.isActive()) for d in conn.listAllDomains() if d.name().startswith(RUN_PREFIX)}

    def dirs(self, sub: str) -> set[str]:
        d = self.vmlet.state_dir / sub
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def holders(self) -> set[str]:
        db = sqlite3.connect(self.vmlet.state_dir / "images" / "metadata.db")
        try:
            return {h for (h,) in db.execute("SELECT holder FROM holders")}
        finally:
            db.close()

    def dnsmasq_sandboxes(self) -> set[str]:
        prefix = str(self.vmlet.state_dir / "network") + "/"
        return {(dhcp.pidfile_of(pid) or "")[len(prefix):].split("/", 1)[0] for pid in dhcp.find_processes(prefix)}

    def host_links(self) -> set[str]:
        return set(links.host_links(self.tag))

    def netns_of(self, sandbox_ids) -> set[str]:
        return {sid for sid in sandbox_ids if netns.exists(netns_name(sid))}


def check_agrees(node: Node, conn, where: str) -> None:
    """After a restart: the daemon's answers agree with libvirt, CNI/IPAM, dnsmasq, the disks, the image store."""
    sandboxes = node.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    containers = node.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    sids, cids = {s.id for s in sandboxes}, {c.id for c in containers}
    domains = node.domains(conn)
    by_cid = {name[len(RUN_PREFIX):]: active for name, active in domains.items()}
    problems = []
    for c in containers:
        st = node.rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=c.id), timeout=10).status
        active = by_cid.get(c.id[:32])
        if st.state == api_pb2.CONTAINER_RUNNING and not active:
            problems.append(f"container {c.id[:12]} RUNNING but its domain is {'off' if active is False else 'gone'}")
        if st.state != api_pb2.CONTAINER_RUNNING and active:
            problems.append(f"container {c.id[:12]} {api_pb2.ContainerState.Name(st.state)} but its domain runs")
        if c.pod_sandbox_id not in sids:
            problems.append(f"container {c.id[:12]} of an unknown sandbox")
    if extra := set(by_cid) - {c[:32] for c in cids}:
        problems.append(f"domains without a container: {sorted(extra)}")
    if extra := node.dirs("vms") - cids:
        problems.append(f"VM directories without a container: {sorted(extra)}")
    ready = {s.id for s in sandboxes if s.state == api_pb2.SANDBOX_READY}
    ready_ips, all_ips = set(), set()
    for s in sandboxes:
        st = node.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=s.id), timeout=10).status
        all_ips.add(st.network.ip)
        if s.id in ready:
            ready_ips.add(st.network.ip)
    held = set(node.net.allocated_ips())
    # A ready sandbox holds its IP; a not-ready one may still (its teardown is the kubelet's StopPodSandbox to
    # finish); nothing else may.
    if not ready_ips <= held:
        problems.append(f"ready sandboxes have {sorted(ready_ips - held)}, which IPAM does not hold (released)")
    if not held <= all_ips:
        problems.append(f"IPAM holds {sorted(held - all_ips)} for no sandbox vmlet knows")
    if extra := node.dnsmasq_sandboxes() - ready:
        problems.append(f"dnsmasq runs for sandboxes that are not ready: {sorted(extra)}")
    if extra := node.dirs("network") - sids:
        problems.append(f"network records of unknown sandboxes: {sorted(extra)}")
    if extra := node.host_links() - sids:
        problems.append(f"host links of unknown sandboxes: {sorted(extra)}")
    if extra := node.holders() - cids:
        problems.append(f"image holders that are no containers: {sorted(extra)}")
    if extra := node.dirs("pods") - sids:
        problems.append(f"pod directories (emptyDisks) of unknown sandboxes: {sorted(extra)}")
    assert not problems, f"{where}: " + "; ".join(problems) + "\n" + node.vmlet.log()[-3000:]


def check_nothing_left(node: Node, conn, pods: list[Pod], where: str) -> None:
    seen = set().union(*(p.seen_sandboxes for p in pods)) if pods else set()
    left = {
        "domains": sorted(node.domains(conn)),
        "VM dirs": sorted(node.dirs("vms")),
        "network records": sorted(node.dirs("network")),
        "netns": sorted(node.netns_of(seen)),
        "host links": sorted(node.host_links()),
        "dnsmasq": sorted(node.dnsmasq_sandboxes()),
        "pod IPs": node.net.allocated_ips(),
        "image holders": sorted(node.holders()),
        "pod dirs": sorted(node.dirs("pods")),
        "mounts": sorted(pod_volumes._mountpoints_under(node.vmlet.state_dir)),
    }
    assert not any(left.values()), f"{where}: left behind: { {k: v for k, v in left.items() if v} }"


class Lifecycle:
    """The kubelet's side: the RPCs of one pod, each either called or called and killed half-way."""

    def __init__(self, node: Node, pod: Pod):
        self.node, self.pod = node, pod

    def call(self, step: str):
        rt, images, pod = self.node.rt, self.node.client.images, self.pod
        if step == "PullImage":
            return images.PullImage.future(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)),
                                           timeout=CALL_TIMEOUT)
        if step == "RunPodSandbox":
            return rt.RunPodSandbox.future(api_pb2.RunPodSandboxRequest(config=pod.config), timeout=CALL_TIMEOUT)
        if step == "CreateContainer":
            config = cri.container_config(TESTVM)
            config.mounts.extend(pod.mounts)
            config.devices.extend(pod.devices)
            return rt.CreateContainer.future(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod.sandbox_id, config=config, sandbox_config=pod.config), timeout=CALL_TIMEOUT)
        if step == "StartContainer":
            return rt.StartContainer.future(api_pb2.StartContainerRequest(container_id=pod.container_id),
                                            timeout=CALL_TIMEOUT)
        if step == "StopContainer":
            return rt.StopContainer.future(api_pb2.StopContainerRequest(container_id=pod.container_id, timeout=1),
                                           timeout=CALL_TIMEOUT)
        if step == "RemoveContainer":
            return rt.RemoveContainer.future(api_pb2.RemoveContainerRequest(container_id=pod.container_id),
                                             timeout=CALL_TIMEOUT)
        if step == "StopPodSandbox":
            return rt.StopPodSandbox.future(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id),
                                            timeout=CALL_TIMEOUT)
        if step == "RemovePodSandbox":
            return rt.RemovePodSandbox.future(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id),
                                              timeout=CALL_TIMEOUT)
        raise ValueError(step)

    def record(self, step: str, response) -> None:
        if step == "RunPodSandbox":
            self.pod.sandbox_id = response.pod_sandbox_id
            self.pod.seen_sandboxes.add(response.pod_sandbox_id)
        elif step == "CreateContainer":
            self.pod.container_id = response.container_id

    def run(self, step: str) -> float:
        start = time.monotonic()
        self.record(step, self.call(step).result())
        return time.monotonic() - start

    def run_killed(self, step: str, after: float) -> bool:
        """Call `step`, SIGKILL the daemon `after` seconds in; True if the call had already returned."""
        future = self.call(step)
        time.sleep(after)
        done = future.done()
        self.node.vmlet.proc.kill()
        self.node.vmlet.proc.wait()
        try:
            self.record(step, future.result())
            return done
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), \
                f"{step} answered {e.code().name}: {e.details()}"
            return False

    def rediscover(self) -> None:
        """After a kill, find the pod the kubelet knows by its metadata (the IDs may never have reached us)."""
        rt, md = self.node.rt, self.pod.config.metadata
        mine = [s for s in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
                if (s.metadata.name, s.metadata.uid) == (md.name, md.uid)]
        self.pod.seen_sandboxes.update(s.id for s in mine)
        self.pod.sandbox_id = mine[0].id if mine else ""
        cs = rt.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(pod_sandbox_id=self.pod.sandbox_id)), timeout=10).containers \
            if self.pod.sandbox_id else []
        self.pod.container_id = cs[0].id if cs else ""

    def finish(self) -> None:
        """The kubelet's next steps from wherever the pod is, to a pod that ran and is gone."""
        rt, pod = self.node.rt, self.pod
        self.rediscover()
        sandbox_ready = False
        if pod.sandbox_id:
            sb = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id), timeout=10)
            sandbox_ready = sb.status.state == api_pb2.SANDBOX_READY
        if not pod.sandbox_id:
            self.run("RunPodSandbox")  # the kubelet retries a failed RunPodSandbox: the name must be free again
            sandbox_ready = True
        if sandbox_ready and not pod.container_id:
            self.run("CreateContainer")
        if pod.container_id:
            st = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=pod.container_id), timeout=10).status
            if sandbox_ready and st.state == api_pb2.CONTAINER_CREATED:
                self.run("StartContainer")
                st = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=pod.container_id),
                                        timeout=10).status
                assert st.state in (api_pb2.CONTAINER_RUNNING, api_pb2.CONTAINER_EXITED)
            self.run("StopContainer")
            st = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=pod.container_id), timeout=10).status
            assert st.state == api_pb2.CONTAINER_EXITED, api_pb2.ContainerState.Name(st.state)
            self.run("RemoveContainer")
        self.run("StopPodSandbox")
        self.run("RemovePodSandbox")
        assert not rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items


@pytest.mark.parametrize("binding", ["bridge", "masquerade", "disks"])
def test_sigkill_at_random_instants_in_every_lifecycle_rpc(vmlet_factory, vmlet_dir, test_network, libvirt_conn,
                                                           binding, test_image):
    """"disks": bridge pods with every kind of disk (docs/storage.md), each with a blank persistent root, so
    kills land in the import, the binds and the emptyDisk's life too; the data volume must never change."""
    with contextlib.ExitStack() as stack:
        volumes = None
        if binding == "disks":
            volumes = Volumes(vmlet_dir / "pv")
            stack.callback(volumes.close)
        _kill_rounds(vmlet_factory, vmlet_dir, test_network, libvirt_conn, binding, volumes, test_image)


def _kill_rounds(vmlet_factory, vmlet_dir, test_network, libvirt_conn, binding: str, volumes: Volumes | None,
                 test_image: Path):
    rng = random.Random(f"{SEED}-{binding}")
    node = Node(vmlet_factory(), test_network)
    rounds = DISK_ROUNDS if volumes else ROUNDS

    def new_pod(n: int) -> Pod:
        pod = Pod(cri.pod_config(name=f"kill-{binding[:4]}-{n}", log_directory=str(vmlet_dir / "pods" / str(n)),
                                 annotations={"vmlet.dev/network-binding": "bridge" if volumes else binding}))
        if volumes:
            volumes.for_pod(pod, n)
        return pod

    # Calibration: one undisturbed lifecycle measures how long each RPC takes here, now.
    durations: dict[str, float] = {}
    calib = Lifecycle(node, new_pod(0))
    for step in STEPS:
        durations[step] = calib.run(step)
    check_nothing_left(node, libvirt_conn, [calib.pod], "after the calibration lifecycle")
    image_ref = node.client.images.ImageStatus(api_pb2.ImageStatusRequest(
        image=api_pb2.ImageSpec(image=TESTVM)), timeout=10).image.id
    if volumes:
        volumes.check_root(0, test_image, image_ref, "after the calibration lifecycle")

    pods = [calib.pod]
    for n in range(1, rounds + 1):
        step = STEPS[(n - 1) % len(STEPS)] if n <= len(STEPS) else rng.choice(STEPS)
        after = rng.uniform(0, durations[step] * 1.3)
        where = f"seed {SEED} {binding} round {n}: SIGKILL {after * 1000:.0f} ms into {step}"
        pod = new_pod(n)
        pods.append(pod)
        life = Lifecycle(node, pod)
        if step == "PullImage":
            node.client.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=TESTVM)),
                                           timeout=30)
        for before in STEPS[1:STEPS.index(step)]:
            life.run(before)
        finished = life.run_killed(step, after)
        node.restart()
        check_agrees(node, libvirt_conn, where + (" (after it returned)" if finished else ""))
        if step == "PullImage":
            assert not list((node.vmlet.state_dir / "images" / "tmp").iterdir()), f"{where}: partial download"
            life.run("PullImage")
        life.finish()
        check_nothing_left(node, libvirt_conn, pods, where)
        if volumes:
            volumes.check_kept(where)
            volumes.check_root(n, test_image, image_ref, where)
