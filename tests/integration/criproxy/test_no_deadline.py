"""Calls without a deadline through the proxy, in front of the real containerd and vmlet.

The kubelet sets no deadline on PullImage and GetContainerEvents. grpcio's sync server reports that as a
remaining time of ~9.2e18 s, which, passed on as the backend call's timeout, used to fail every such call
at once with DEADLINE_EXCEEDED. Checked for the proxy in-process and as a process (`python -m
criproxy.main`, which runs gRPC's older I/O layer through GRPC_EXPERIMENTS).
"""

from __future__ import annotations

import os
import uuid

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.integration.cri.conftest import TESTVM
from tests.integration.criproxy.conftest import BUSYBOX, CONTAINERD_SOCKET, REGISTRY_REPOSITORY, rpc_error
from tests.support import cri

pytestmark = pytest.mark.libvirt


def _spec(image: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=image)


def _calls_without_deadline(client: cri.Client, containerd: cri.Client, pulled_ref: str, pulled_id: str) -> None:
    rt, im = client.runtime, client.images
    v = rt.Version(api_pb2.VersionRequest())
    assert v.runtime_name == "containerd" and v.runtime_api_version == "v1"
    rt.ListContainers(api_pb2.ListContainersRequest())  # a fan-out to both backends
    rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())
    assert {c.type for c in rt.Status(api_pb2.StatusRequest()).status.conditions} >= {"RuntimeReady", "NetworkReady"}
    assert BUSYBOX in im.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(BUSYBOX))).image.repo_tags
    im.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(TESTVM)))  # vmlet's (not pulled: an empty answer)
    assert len(im.ImageFsInfo(api_pb2.ImageFsInfoRequest()).image_filesystems) == 2

    # PullImage, as the kubelet calls it: from the registry on loopback
    assert im.PullImage(api_pb2.PullImageRequest(image=_spec(pulled_ref))).image_ref == pulled_id
    # containerd's own answer for a local-only image (it resolves every pull against the registry)
    direct = rpc_error(containerd.images.PullImage, api_pb2.PullImageRequest(image=_spec(BUSYBOX)))
    assert direct[0] != grpc.StatusCode.DEADLINE_EXCEEDED
    assert rpc_error(im.PullImage, api_pb2.PullImageRequest(image=_spec(BUSYBOX))) == direct

    # GetContainerEvents: the merged stream ends with containerd 1.6's own answer (it does not have the
    # method: UNIMPLEMENTED); vmlet's stream, opened too, is cancelled with it
    direct = rpc_error(next, containerd.runtime.GetContainerEvents(api_pb2.GetEventsRequest()))
    assert direct[0] == grpc.StatusCode.UNIMPLEMENTED
    stream = rt.GetContainerEvents(api_pb2.GetEventsRequest())
    assert rpc_error(next, stream) == direct


def test_calls_without_deadline(proxy, proxy_process, containerd, vmlet, registry):
    token = uuid.uuid4().hex[:12]
    pushed = registry.push_busybox(CONTAINERD_SOCKET, REGISTRY_REPOSITORY, f"{os.getpid()}-{token}", token)
    _calls_without_deadline(proxy, containerd, pushed.ref, pushed.config_digest)  # in-process
    client = proxy_process.start()
    try:
        _calls_without_deadline(client, containerd, pushed.ref, pushed.config_digest)
    finally:
        client.close()
