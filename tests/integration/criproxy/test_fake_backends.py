"""The proxy's mechanics against in-process fake runtimes (no containerd, no libvirt):
raw pass-through of unknown fields, more than two backends, reconnect, merged event streams."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from criproxy.server import ProxyThread
from proto.runtime.v1 import api_pb2
from tests.support import cri

UNKNOWN = b"\xb8\x3e\x2a"  # field 999 = 42: a field from a newer CRI the proxy does not know


class FakeRuntime:
    """A CRI server answering every call from `answers[method](request bytes) -> bytes`,
    recording the raw requests it got."""

    def __init__(self, socket: Path, name: str):
        self.socket, self.name = socket, name
        self.requests: list[tuple[str, bytes]] = []
        self.answers = {}
        self.events: list[bytes] = []
        self.server = None

    def _handler(self, service, method):
        def unary(req: bytes, ctx):
            self.requests.append((method, req))
            fn = self.answers.get(method)
            if fn is None:
                ctx.abort(grpc.StatusCode.NOT_FOUND, f"{self.name}: no answer for {method}")
            return fn(req)

        def stream(req: bytes, ctx):
            self.requests.append((method, req))
            for e in self.events:
                yield e
            while ctx.is_active():
                time.sleep(0.05)
        return unary, stream

    def start(self) -> "FakeRuntime":
        server = grpc.server(futures.ThreadPoolExecutor(8))
        handlers = []
        for svc in api_pb2.DESCRIPTOR.services_by_name.values():
            methods = {}
            for m in svc.methods:
                unary, stream = self._handler(svc.full_name, m.name)
                methods[m.name] = (grpc.unary_stream_rpc_method_handler(stream) if m.server_streaming
                                   else grpc.unary_unary_rpc_method_handler(unary))
            handlers.append(grpc.method_handlers_generic_handler(svc.full_name, methods))
        server.add_generic_rpc_handlers(handlers)
        server.add_insecure_port(f"unix:{self.socket}")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server:
            self.server.stop(0).wait()
            self.server = None


@pytest.fixture
def fakes(tmp_path):
    made = {}

    def make(name):
        made[name] = FakeRuntime(tmp_path / f"{name}.sock", name).start()
        return made[name]
    ctr, vm, kata = make("containerd"), make("virtlet.cloud"), make("kata")
    sock = tmp_path / "proxy.sock"
    proxy = ProxyThread(str(sock), [(n, str(f.socket)) for n, f in made.items()]).start()
    client = cri.connect(sock)
    yield client, ctr, vm, kata
    client.close()
    proxy.stop()
    for f in made.values():
        f.stop()


def _list_pods(*ids):
    return api_pb2.ListPodSandboxResponse(items=[api_pb2.PodSandbox(id=i) for i in ids]).SerializeToString()


def test_unknown_fields_pass_through_both_ways(fakes):
    client, ctr, vm, _ = fakes
    status = api_pb2.ContainerStatusResponse(status=api_pb2.ContainerStatus(id="c1")).SerializeToString() + UNKNOWN
    ctr.answers["ContainerStatus"] = lambda req: status
    vm.answers["ContainerStatus"] = lambda req: status
    req = api_pb2.ContainerStatusRequest(container_id="c1").SerializeToString() + UNKNOWN
    call = client.channel.unary_unary("/runtime.v1.RuntimeService/ContainerStatus")
    # default backend: the very same bytes both ways
    assert call(req, timeout=5) == status
    assert ctr.requests[-1] == ("ContainerStatus", req)
    # prefixed: the prefix is removed, the unknown field kept; the answer's ID prefixed, unknown field kept
    preq = api_pb2.ContainerStatusRequest(container_id="virtlet.cloud__c1").SerializeToString() + UNKNOWN
    out = call(preq, timeout=5)
    assert vm.requests[-1] == ("ContainerStatus", req)
    assert UNKNOWN in out and api_pb2.ContainerStatusResponse.FromString(out).status.id == "virtlet.cloud__c1"
    # an RPC the proxy routes by nothing (Version): raw to the default
    ctr.answers["Version"] = lambda req: api_pb2.VersionResponse(runtime_name="fake").SerializeToString() + UNKNOWN
    vcall = client.channel.unary_unary("/runtime.v1.RuntimeService/Version")
    assert vcall(UNKNOWN, timeout=5).endswith(UNKNOWN) and ctr.requests[-1] == ("Version", UNKNOWN)
    # merged lists keep unknown fields of every backend
    ctr.answers["ListPodSandbox"] = lambda req: _list_pods("a") + UNKNOWN
    vm.answers["ListPodSandbox"] = lambda req: _list_pods("b")
    fakes[3].answers["ListPodSandbox"] = lambda req: _list_pods()
    lcall = client.channel.unary_unary("/runtime.v1.RuntimeService/ListPodSandbox")
    raw = lcall(b"", timeout=5)
    assert UNKNOWN in raw
    assert [p.id for p in api_pb2.ListPodSandboxResponse.FromString(raw).items] == ["a", "virtlet.cloud__b"]


def test_three_backends_route_by_annotation_and_id(fakes):
    client, ctr, vm, kata = fakes
    for f in (ctr, vm, kata):
        f.answers["RunPodSandbox"] = (lambda n: lambda req: api_pb2.RunPodSandboxResponse(
            pod_sandbox_id=f"{n}-pod").SerializeToString())(f.name)
        f.answers["StopPodSandbox"] = lambda req: b""
    rt = client.runtime
    for target, want in (("", "containerd-pod"), ("virtlet.cloud", "virtlet.cloud__virtlet.cloud-pod"),
                         ("kata", "kata__kata-pod")):
        cfg = api_pb2.PodSandboxConfig(annotations={"kubernetes.io/target-runtime": target} if target else {})
        assert rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg), timeout=5).pod_sandbox_id == want
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id="kata__kata-pod"), timeout=5)
    assert kata.requests[-1] == ("StopPodSandbox",
                                 api_pb2.StopPodSandboxRequest(pod_sandbox_id="kata-pod").SerializeToString())
    with pytest.raises(grpc.RpcError) as e:
        rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig(
            annotations={"kubernetes.io/target-runtime": "nope"})), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in e.value.details()
    # a backend's own error comes back as it is
    with pytest.raises(grpc.RpcError) as e:
        rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="kata__x"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == "kata: no answer for ContainerStatus"


def test_reconnects_when_a_backend_comes_back(fakes):
    client, ctr, vm, kata = fakes
    for f in (ctr, vm, kata):
        f.answers["ListPodSandbox"] = (lambda n: lambda req: _list_pods(n))(f.name)
    rt = client.runtime
    assert len(rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=5).items) == 3
    kata.stop()
    with pytest.raises(grpc.RpcError) as e:
        rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"backend kata ({kata.socket}) is unavailable" in e.value.details()
    # the others' objects still answer
    vm.answers["PodSandboxStatus"] = lambda req: b""
    rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id="virtlet.cloud__p"), timeout=5)
    time.sleep(1.5)  # longer than a reconnect backoff: still down, still the same answer
    with pytest.raises(grpc.RpcError):
        rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=5)
    kata.start()
    t0 = time.monotonic()
    while True:
        try:
            items = rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=5).items
            break
        except grpc.RpcError:
            assert time.monotonic() - t0 < 3, "the proxy did not reconnect within 3 s"
            time.sleep(0.05)
    assert sorted(p.id for p in items) == ["containerd", "kata__kata", "virtlet.cloud__virtlet.cloud"]


def test_container_events_merged_and_prefixed(fakes):
    client, ctr, vm, kata = fakes
    ctr.events = [api_pb2.ContainerEventResponse(container_id="c1").SerializeToString()]
    vm.events = [api_pb2.ContainerEventResponse(
        container_id="v1", pod_sandbox_status=api_pb2.PodSandboxStatus(id="p1")).SerializeToString()]
    stream = client.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=10)
    got = []
    for ev in stream:
        got.append((ev.container_id, ev.pod_sandbox_status.id))
        if len(got) == 2:
            break
    stream.cancel()
    assert sorted(got) == [("c1", ""), ("virtlet.cloud__v1", "virtlet.cloud__p1")]
    # a backend going away fails the merged stream with UNAVAILABLE naming it (the kubelet re-subscribes)
    stream = client.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=10)
    threading.Timer(0.5, kata.stop).start()
    with pytest.raises(grpc.RpcError) as e:
        for _ in stream:
            pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "backend kata" in e.value.details()
