"""Both runtimes behind the proxy: a container pod on containerd and a VM pod on vmlet, through one socket."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.integration.cri.conftest import TESTVM
from tests.integration.criproxy.conftest import BUSYBOX, PREFIX, VM, busybox_container, container_pod, rpc_error
from tests.support import cri

pytestmark = pytest.mark.libvirt



def _run_both(client: cri.Client, vm_image_ref: str, labels: dict[str, str], log_dir: Path):
    """A container pod with a running busybox, a VM pod with a started VM; returns their IDs."""
    rt = client.runtime
    vpod_name = f"vm-{uuid.uuid4().hex[:6]}"
    cpod = container_pod(labels=labels)
    csb = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cpod), timeout=60).pod_sandbox_id
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=csb, config=busybox_container(labels=labels), sandbox_config=cpod), timeout=60).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
    vpod = cri.pod_config(labels=labels, log_directory=str(log_dir / vpod_name))
    vsb = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=vpod), timeout=120).pod_sandbox_id
    vcfg = cri.container_config(vm_image_ref, labels=labels)
    vid = rt.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=vsb, config=vcfg, sandbox_config=vpod),
                             timeout=120).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=vid), timeout=120)
    return csb, cid, vsb, vid


def test_container_pod_and_vm_pod_through_one_socket(proxy, containerd, vmlet):
    rt, im = proxy.runtime, proxy.images
    # Version: the default backend's
    v = rt.Version(api_pb2.VersionRequest(), timeout=10)
    assert v.runtime_name == "containerd" and v.runtime_api_version == "v1"

    # Images of both kinds: the VM image is pulled through the proxy, routed to vmlet by its name
    ref = im.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)), timeout=180).image_ref
    assert ref.startswith(PREFIX + "sha256:")
    direct_vm_images = vmlet.client.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images
    assert [i.id for i in direct_vm_images] == [ref.removeprefix(PREFIX)]
    images = im.ListImages(api_pb2.ListImagesRequest(), timeout=30).images
    by_id = {i.id: i for i in images}
    assert ref in by_id and "virtlet.cloud/testvm:latest" in by_id[ref].repo_tags
    assert any(BUSYBOX in i.repo_tags for i in images)
    assert not any(i.id.startswith(PREFIX) for i in images if BUSYBOX in i.repo_tags)
    for name in (TESTVM, ref):
        st = im.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=name)), timeout=10).image
        assert st.id == ref
    bb = im.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=BUSYBOX)), timeout=10).image
    assert bb.id.startswith("sha256:") and BUSYBOX in bb.repo_tags
    filtered = im.ListImages(api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=api_pb2.ImageSpec(
        image=TESTVM))), timeout=10).images
    assert [i.id for i in filtered] == [ref]
    fs = im.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10)
    mounts = [f.fs_id.mountpoint for f in fs.image_filesystems]
    assert len(mounts) == 2 and "containerd" in mounts[0] and str(vmlet.state_dir) in mounts[1]

    # Status: a condition is true only if true on both; a false one names the failing backend(s)
    merged = {c.type: c for c in rt.Status(api_pb2.StatusRequest(), timeout=10).status.conditions}
    direct = {name: {c.type: c for c in client.runtime.Status(api_pb2.StatusRequest(), timeout=10).status.conditions}
              for name, client in (("containerd", containerd), (VM, vmlet.client))}
    for t in ("RuntimeReady", "NetworkReady"):
        assert merged[t].status == all(d[t].status for d in direct.values()), t
        for name, d in direct.items():
            assert (f"backend {name}" in merged[t].message) == (not d[t].status), (t, merged[t].message)

    labels = {"suite": "criproxy"}
    csb, cid, vsb, vid = _run_both(proxy, ref, labels, vmlet.state_dir.parent)
    assert not csb.startswith(PREFIX) and not cid.startswith(PREFIX)
    assert vsb.startswith(PREFIX) and vid.startswith(PREFIX)
    # Each backend knows its objects under the unprefixed ID
    assert vmlet.client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(
        pod_sandbox_id=vsb.removeprefix(PREFIX)), timeout=10).status.id == vsb.removeprefix(PREFIX)
    assert containerd.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status.id == cid

    # Listed together
    pods = {p.id: p for p in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items}
    assert {csb, vsb} <= set(pods)
    ctrs = {c.id: c for c in rt.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers}
    assert {cid, vid} <= set(ctrs)
    assert ctrs[vid].pod_sandbox_id == vsb and ctrs[cid].pod_sandbox_id == csb
    # Filters and label selectors across both
    sel = rt.ListContainers(api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(
        label_selector=labels)), timeout=30).containers
    assert sorted(c.id for c in sel) == sorted([cid, vid])
    vm_only = rt.ListContainers(api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(
        label_selector={**labels, "role": "vm"})), timeout=30).containers
    assert [c.id for c in vm_only] == [vid]
    for f, want in ((api_pb2.ContainerFilter(id=vid), [vid]), (api_pb2.ContainerFilter(id=cid), [cid]),
                    (api_pb2.ContainerFilter(pod_sandbox_id=vsb), [vid]),
                    (api_pb2.ContainerFilter(pod_sandbox_id=csb), [cid]),
                    (api_pb2.ContainerFilter(id=vid, pod_sandbox_id=csb), []),
                    (api_pb2.ContainerFilter(pod_sandbox_id=vsb, state=api_pb2.ContainerStateValue(
                        state=api_pb2.CONTAINER_RUNNING)), [vid])):
        got = rt.ListContainers(api_pb2.ListContainersRequest(filter=f), timeout=30).containers
        assert [c.id for c in got] == want, f
    for f, want in ((api_pb2.PodSandboxFilter(id=vsb), [vsb]), (api_pb2.PodSandboxFilter(id=csb), [csb]),
                    (api_pb2.PodSandboxFilter(label_selector=labels), sorted([csb, vsb]))):
        got = rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=f), timeout=30).items
        assert sorted(p.id for p in got) == want, f

    # Status and stats by ID
    ps = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=vsb), timeout=10).status
    assert ps.id == vsb and ps.annotations["kubernetes.io/target-runtime"] == VM
    cs = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=vid), timeout=10).status
    assert cs.id == vid and cs.state == api_pb2.CONTAINER_RUNNING and cs.image_ref.startswith(PREFIX)
    assert rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status.state == \
        api_pb2.CONTAINER_RUNNING
    stats = {s.attributes.id for s in rt.ListContainerStats(api_pb2.ListContainerStatsRequest(
        filter=api_pb2.ContainerStatsFilter(label_selector=labels)), timeout=30).stats}
    assert stats == {cid, vid}
    assert rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=vid), timeout=10).stats.attributes.id == vid
    sb_stats = {s.attributes.id for s in rt.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
        filter=api_pb2.PodSandboxStatsFilter(label_selector=labels)), timeout=30).stats}
    assert sb_stats == {csb, vsb}

    # Streaming: each backend's URL comes back unchanged (containerd's and vmlet's own servers); ExecSync works
    out = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["echo", "hi"], timeout=10), timeout=30)
    assert out.stdout == b"hi\n" and out.exit_code == 0
    url = rt.Exec(api_pb2.ExecRequest(container_id=cid, cmd=["sh"], stdout=True), timeout=10).url
    assert url.startswith("http://127.0.0.1:") and "/exec/" in url
    vm_url = rt.Attach(api_pb2.AttachRequest(container_id=vid, stdout=True), timeout=10).url
    assert vm_url.startswith("http://127.0.0.1:") and "/attach/" in vm_url
    assert vm_url.split("/")[2] != url.split("/")[2]  # vmlet's streaming server, not containerd's

    # Stopped and removed through the proxy, each by its backend
    rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=5), timeout=60)
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=csb), timeout=60)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=csb), timeout=60)
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=vsb), timeout=120)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=vsb), timeout=120)
    left = {p.id for p in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items}
    assert csb not in left and vsb not in left
    assert not vmlet.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert rpc_error(rt.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=vid), timeout=10)[0] == \
        grpc.StatusCode.NOT_FOUND
    # The VM image can be removed by its prefixed ID (what the kubelet's image GC does)
    im.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=30)
    assert not vmlet.client.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images


def _wait(fn, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_vmlet_down_then_back(proxy, containerd, vmlet):
    rt = proxy.runtime
    ref = proxy.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)),
                                 timeout=180).image_ref
    csb, cid, vsb, vid = _run_both(proxy, ref, {"suite": "criproxy-down"}, vmlet.state_dir.parent)
    vmlet.kill()  # SIGKILL: its VMs keep running under libvirt

    # The VM backend's objects and merged lists: UNAVAILABLE naming the backend
    for call, req in ((rt.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id=vsb)),
                      (rt.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=vid)),
                      (rt.StopPodSandbox, api_pb2.StopPodSandboxRequest(pod_sandbox_id=vsb)),
                      (rt.ListPodSandbox, api_pb2.ListPodSandboxRequest()),
                      (rt.ListContainers, api_pb2.ListContainersRequest()),
                      (rt.ListContainerStats, api_pb2.ListContainerStatsRequest()),
                      (proxy.images.ListImages, api_pb2.ListImagesRequest()),
                      (proxy.images.ImageStatus, api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=TESTVM)))):
        code, details = rpc_error(call, req, timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE, (call, details)
        assert f"backend {VM} ({vmlet.socket}) is unavailable" in details
    new_vm = cri.pod_config()
    code, details = rpc_error(rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=new_vm), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE and VM in details
    conds = {c.type: c for c in rt.Status(api_pb2.StatusRequest(), timeout=10).status.conditions}
    assert not conds["RuntimeReady"].status and f"backend {VM}" in conds["RuntimeReady"].message

    # containerd's objects keep working, including a new pod; lists scoped to containerd by ID work
    assert rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status.state == \
        api_pb2.CONTAINER_RUNNING
    assert [c.id for c in rt.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=csb)), timeout=10).containers] == [cid]
    cpod = container_pod()
    csb2 = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cpod), timeout=60).pod_sandbox_id
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=csb2), timeout=60)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=csb2), timeout=60)
    assert rt.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "containerd"

    # vmlet comes back: the proxy reconnects by itself, nothing was lost
    vmlet.start()
    t0 = time.monotonic()
    pods = _wait(lambda: rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items)
    assert time.monotonic() - t0 < 5
    assert {csb, vsb} <= {p.id for p in pods}
    assert rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=vid), timeout=10).status.state == \
        api_pb2.CONTAINER_RUNNING
    for sb in (vsb, csb):
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sb), timeout=120)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb), timeout=120)


def test_default_backend_down_vm_pods_keep_working(containerd, vmlet, vmlet_dir):
    """containerd (the default) unreachable: VM pods still work; merged lists and Version fail naming it."""
    from criproxy.server import ProxyThread
    dead = vmlet_dir / "no-containerd.sock"
    sock = vmlet_dir / "p2.sock"
    p = ProxyThread(str(sock), [("containerd", str(dead)), (VM, str(vmlet.socket))]).start()
    client = cri.connect(sock)
    try:
        rt = client.runtime
        code, details = rpc_error(rt.Version, api_pb2.VersionRequest(), timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE and f"backend containerd ({dead}) is unavailable" in details
        code, details = rpc_error(rt.ListPodSandbox, api_pb2.ListPodSandboxRequest(), timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE and "backend containerd" in details
        code, _ = rpc_error(rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=container_pod()), timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE
        vsb = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cri.pod_config()), timeout=60).pod_sandbox_id
        assert vsb.startswith(PREFIX)
        assert rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=vsb), timeout=10).status.id == vsb
        assert [x.id for x in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(
            filter=api_pb2.PodSandboxFilter(id=vsb)), timeout=10).items] == [vsb]
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=vsb), timeout=60)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=vsb), timeout=60)
    finally:
        client.close()
        p.stop()


def test_proxy_restart_loses_nothing(proxy_process, containerd, vmlet):
    client = proxy_process.start()
    rt = client.runtime
    ref = client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=TESTVM)),
                                  timeout=180).image_ref
    csb, cid, vsb, vid = _run_both(client, ref, {"suite": "criproxy-restart"}, vmlet.state_dir.parent)
    before = sorted((c.id, c.pod_sandbox_id, c.state) for c in rt.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(label_selector={"suite": "criproxy-restart"})), timeout=30).containers)
    client.close()
    proxy_process.kill()  # SIGKILL: no chance to save anything (there is nothing to save)
    client = proxy_process.start()
    rt = client.runtime
    after = sorted((c.id, c.pod_sandbox_id, c.state) for c in rt.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(label_selector={"suite": "criproxy-restart"})), timeout=30).containers)
    assert after == before and {cid, vid} == {c[0] for c in after}
    for sb in (vsb, csb):
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sb), timeout=120)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb), timeout=120)
    client.close()
