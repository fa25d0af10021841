"""Images of both kinds through the proxy, the container one pulled from a real registry on loopback.

The registry is Debian's docker-registry on 127.0.0.1 (plain HTTP: containerd 1.6's CRI plugin uses
http:// for localhost and loopback hosts without any registry configuration). The pushed image is
new for every run (a second layer with a token), so containerd has to fetch its manifest, config and
token layer from the registry, and the container's log proves its root filesystem is that image.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.integration.cri.conftest import TESTVM
from tests.integration.criproxy.conftest import (CONTAINERD_SOCKET, PREFIX, REGISTRY_REPOSITORY, VM, container_pod,
                                                 rpc_error)
from tests.support import cri
from tests.support.registry import TOKEN_FILE

pytestmark = pytest.mark.libvirt



def _spec(image: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=image)


def _status(client: cri.Client, image: str) -> api_pb2.Image:
    return client.images.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(image)), timeout=30).image


def _wait_for_text(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {path} after {timeout}s: {content[-2000:]!r}")
        time.sleep(0.1)


def test_container_image_from_registry_and_vm_image_through_proxy(proxy, containerd, vmlet, registry, tmp_path):
    im, rt = proxy.images, proxy.runtime
    token = uuid.uuid4().hex[:12]
    pushed = registry.push_busybox(CONTAINERD_SOCKET, REGISTRY_REPOSITORY, f"{os.getpid()}-{token}", token)
    repo_digest = f"{registry.host}/{REGISTRY_REPOSITORY}@{pushed.manifest_digest}"
    assert not _status(proxy, pushed.ref).id and not _status(containerd, pushed.ref).id

    # PullImage of the container image: routed to containerd (the default), which fetches it from the registry
    ref = im.PullImage(api_pb2.PullImageRequest(image=_spec(pushed.ref)), timeout=120).image_ref
    assert ref == pushed.config_digest  # containerd's image ID, unprefixed: the default backend's
    base = f"/v2/{REGISTRY_REPOSITORY}"
    assert registry.served("GET", f"{base}/manifests/{pushed.manifest_digest}")
    assert registry.served("GET", f"{base}/blobs/{pushed.config_digest}")
    assert registry.served("GET", f"{base}/blobs/{pushed.layer_digests[1]}")  # the token layer
    direct = _status(containerd, pushed.ref)
    assert direct.id == ref and pushed.ref in direct.repo_tags and repo_digest in direct.repo_digests
    assert ref not in {i.id for i in vmlet.client.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images}

    # ImageStatus through the proxy, by name and by ID
    for name in (pushed.ref, ref):
        st = _status(proxy, name)
        assert st.id == ref and pushed.ref in st.repo_tags and repo_digest in st.repo_digests, name

    # A VM image pulled in the same test, routed to vmlet by its name
    vm_ref = im.PullImage(api_pb2.PullImageRequest(image=_spec(TESTVM)), timeout=180).image_ref
    assert vm_ref.startswith(PREFIX + "sha256:")

    # ListImages through the proxy: both kinds, each under its backend's ID
    images = {i.id: i for i in im.ListImages(api_pb2.ListImagesRequest(), timeout=30).images}
    assert pushed.ref in images[ref].repo_tags and repo_digest in images[ref].repo_digests
    assert "virtlet.cloud/testvm:latest" in images[vm_ref].repo_tags
    assert [i for i in images.values() if pushed.ref in i.repo_tags] == [images[ref]]

    # A container pod running the pulled image, through the proxy (containerd creates and runs it)
    pod = container_pod(name=f"reg-{token[:6]}")
    pod.log_directory = str(tmp_path / "logs")
    csb = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60).pod_sandbox_id
    assert not csb.startswith(PREFIX)
    cfg = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="from-registry"),
                                  image=_spec(pushed.ref), log_path="from-registry.log",
                                  labels={"role": "registry"})  # no command: the image's Cmd
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=csb, config=cfg, sandbox_config=pod),
                             timeout=60).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
    st = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
    assert st.state == api_pb2.CONTAINER_RUNNING and st.image.image == pushed.ref and st.image_ref == repo_digest
    assert containerd.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid),
                                              timeout=10).status.state == api_pb2.CONTAINER_RUNNING
    # The image's Cmd ran and read the token from the image's second layer
    _wait_for_text(Path(pod.log_directory) / cfg.log_path, f"registry-image {token}")
    out = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["cat", TOKEN_FILE], timeout=10), timeout=30)
    assert out.exit_code == 0 and out.stdout == token.encode()
    rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=5), timeout=60)
    assert rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status.exit_code == 0
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=csb), timeout=60)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=csb), timeout=60)
    assert csb not in {p.id for p in containerd.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(),
                                                                          timeout=30).items}
    assert cid not in {c.id for c in containerd.runtime.ListContainers(api_pb2.ListContainersRequest(),
                                                                           timeout=30).containers}

    # RemoveImage of the container image through the proxy, by ID (as the kubelet's image GC): gone from containerd
    im.RemoveImage(api_pb2.RemoveImageRequest(image=_spec(ref)), timeout=60)
    left = containerd.images.ListImages(api_pb2.ListImagesRequest(), timeout=30).images
    assert ref not in {i.id for i in left}
    assert not [r for i in left for r in (*i.repo_tags, *i.repo_digests) if r.startswith(registry.host + "/")]
    assert not _status(proxy, pushed.ref).id and not _status(containerd, ref).id
    # ... and only from containerd: the VM image is still vmlet's, then removed through the proxy as well
    assert [i.id for i in vmlet.client.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images] == \
        [vm_ref.removeprefix(PREFIX)]
    im.RemoveImage(api_pb2.RemoveImageRequest(image=_spec(vm_ref)), timeout=30)
    assert not vmlet.client.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images

    # A name the registry does not have: containerd's error comes back through the proxy unchanged
    for missing in (f"{registry.host}/{REGISTRY_REPOSITORY}:{os.getpid()}-no-such-tag",
                    f"{registry.host}/vmlet-test/no-such-repository:1"):
        code, details = rpc_error(im.PullImage, api_pb2.PullImageRequest(image=_spec(missing)), timeout=60)
        assert code == grpc.StatusCode.NOT_FOUND, (missing, code, details)
        assert f'failed to pull and unpack image "{missing}"' in details and details.endswith(f"{missing}: not found")
        assert not _status(containerd, missing).id
