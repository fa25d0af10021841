"""vmlet's own CRI socket, where the ImageService is served beside the RuntimeService (the real daemon).

Issue #12 follow-ups: bytes that are not valid protobuf (a string field that
is not UTF-8) are the client's mistake: InvalidArgument naming the field, on
either service, never grpc's own INTERNAL "Exception deserializing request!";
and the exec/attach/port-forward refusals echo a huge ID shortened, keeping
their reason readable.
"""

from __future__ import annotations

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri

pytestmark = pytest.mark.libvirt

RT, IMG = "/runtime.v1.RuntimeService/", "/runtime.v1.ImageService/"
BAD = "BAD-VALUE"  # replaced on the wire by bytes that are not UTF-8
NOT_UTF8 = b"B\xffD-VALUE"


def named_pod(name: str) -> api_pb2.PodSandboxConfig:
    pod = cri.pod_config(name=name)
    pod.hostname = "vm"
    return pod


# (method path, request with BAD in one string field, the field's path as the message names it, server-streaming)
CASES = [
    (IMG + "ImageStatus", api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=BAD)), "image.image", False),
    (IMG + "PullImage", api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="virtlet.cloud/x"),
                                                 sandbox_config=api_pb2.PodSandboxConfig(hostname=BAD)),
     "sandbox_config.hostname", False),
    (IMG + "RemoveImage", api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=BAD)), "image.image", False),
    (IMG + "ListImages", api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=api_pb2.ImageSpec(image=BAD))),
     "filter.image.image", False),
    (IMG + "StreamImages", api_pb2.StreamImagesRequest(
        filter=api_pb2.ImageFilter(image=api_pb2.ImageSpec(image=BAD))), "filter.image.image", True),
    (RT + "RunPodSandbox", api_pb2.RunPodSandboxRequest(config=named_pod(BAD)), "config.metadata.name", False),
    (RT + "RunPodSandbox", api_pb2.RunPodSandboxRequest(config=cri.pod_config(annotations={"a": BAD})),
     "config.annotations (a value)", False),
    (RT + "CreateContainer", api_pb2.CreateContainerRequest(
        pod_sandbox_id="x", config=cri.container_config("virtlet.cloud/x", name=BAD)), "config.metadata.name", False),
    (RT + "ContainerStatus", api_pb2.ContainerStatusRequest(container_id=BAD), "container_id", False),
    (RT + "ExecSync", api_pb2.ExecSyncRequest(container_id="x", cmd=["ls", BAD]), "cmd[1]", False),
    (RT + "ListContainers", api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(label_selector={BAD: "v"})), "filter.label_selector (a key)", False),
    (RT + "StreamPodSandboxes", api_pb2.StreamPodSandboxesRequest(filter=api_pb2.PodSandboxFilter(id=BAD)),
     "filter.id", True),
]


def raw_call(channel: grpc.Channel, method: str, payload: bytes, streaming: bool):
    """Send `payload` as it is (identity serializers): what a client with another protobuf library could send."""
    if streaming:
        return list(channel.unary_stream(method)(payload, timeout=30))
    return channel.unary_unary(method)(payload, timeout=30)


@pytest.mark.parametrize("method, request_, field, streaming", CASES,
                         ids=[f"{c[0].rsplit('/', 1)[-1]}-{c[2]}" for c in CASES])
def test_a_string_field_that_is_not_utf8_is_invalid_argument_naming_the_field(vmlet, method, request_, field,
                                                                              streaming):
    payload = request_.SerializeToString()
    assert payload.count(BAD.encode()) == 1
    channel = vmlet.client.channel
    with pytest.raises(grpc.RpcError) as e:
        raw_call(channel, method, payload.replace(BAD.encode(), NOT_UTF8), streaming)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert "request is not valid protobuf" in e.value.details()
    assert f"field {field} is not valid UTF-8" in e.value.details(), e.value.details()
    if not method.endswith(("RunPodSandbox", "PullImage")):  # (those would make a pod, fetch an image)
        # The same bytes with the field valid are an ordinary request again (the wrapper passes them through).
        try:
            raw_call(channel, method, payload, streaming)
        except grpc.RpcError as ordinary:
            assert ordinary.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), ordinary.details()
            assert "not valid protobuf" not in ordinary.details()
    assert vmlet.alive()
    assert not vmlet.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items


@pytest.mark.parametrize("payload", [b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b"],
                         ids=["truncated", "overlong-length", "group-start"])
def test_malformed_protobuf_is_invalid_argument(vmlet, payload):
    for method in (IMG + "ImageStatus", RT + "ContainerStatus"):
        with pytest.raises(grpc.RpcError) as e:
            raw_call(vmlet.client.channel, method, payload, False)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value.code(), e.value.details())
        assert "request is not valid protobuf" in e.value.details()
    assert vmlet.client.runtime.Version(api_pb2.VersionRequest(), timeout=30).runtime_name


HUGE = "f" * 65536
def test_exec_attach_port_forward_echo_a_huge_id_shortened(vmlet):
    rt = vmlet.client.runtime
    for call, req, code in [
            (rt.ExecSync, api_pb2.ExecSyncRequest(container_id=HUGE, cmd=["ls"]), grpc.StatusCode.NOT_FOUND),
            (rt.Exec, api_pb2.ExecRequest(container_id=HUGE, cmd=["ls"], stdout=True), grpc.StatusCode.NOT_FOUND),
            (rt.Attach, api_pb2.AttachRequest(container_id=HUGE, stdout=True), grpc.StatusCode.NOT_FOUND),
            (rt.PortForward, api_pb2.PortForwardRequest(pod_sandbox_id=HUGE), grpc.StatusCode.NOT_FOUND),
            (rt.CheckpointContainer, api_pb2.CheckpointContainerRequest(container_id=HUGE),
             grpc.StatusCode.UNIMPLEMENTED)]:
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        details = e.value.details()
        assert e.value.code() == code, details[:200]
        assert "'ffffffff" in details and "…(65536 chars)" in details, details[:200]
        assert "message truncated" not in details and len(details) < 400, details[:200]  # the reason is whole
