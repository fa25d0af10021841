"""The proxy's mechanics against in-process fake runtimes (no containerd, no libvirt):
raw pass-through of unknown fields, more than two backends, reconnect, merged event streams,
calls without a deadline, and the kubelet's cancellation reaching the backend."""

from __future__ import annotations

import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from criproxy.backends import Backend, BackendError, Backends
from criproxy.server import Proxy, ProxyThread
from proto.runtime.v1 import api_pb2
from tests.integration.criproxy import raw_server
from tests.integration.criproxy.conftest import ProxyProcess
from tests.integration.criproxy.raw_server import until
from tests.support import cri

UNKNOWN = b"\xb8\x3e\x2a"  # field 999 = 42: a field from a newer CRI the proxy does not know


class FakeRuntime:
    """A CRI server answering every call from `answers[method](request bytes) -> bytes`,
    recording the raw requests it got. A method in `hang` never answers: it waits until its
    caller goes away (cancelled, deadline passed), which is then recorded in `gone`, as are
    event streams whose caller went away."""

    def __init__(self, socket: Path, name: str):
        self.socket, self.name = socket, name
        self.requests: list[tuple[str, bytes]] = []
        self.answers = {}
        self.events: list[bytes] = []
        self.hang: set[str] = set()
        self.gone: list[str] = []
        self.deadlines: dict[str, float | None] = {}  # method -> the time_remaining() its last call had
        self.server = None

    def _handler(self, method):
        def unary(req: bytes, ctx):
            self.requests.append((method, req))
            self.deadlines[method] = ctx.time_remaining()
            if method in self.hang:
                while ctx.is_active():
                    time.sleep(0.02)
                self.gone.append(method)
                return b""
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
            self.gone.append(method)
        return unary, stream

    def start(self) -> "FakeRuntime":
        self.server = raw_server.serve(self.socket, lambda m: self._handler(m.name))
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


NO_DEADLINE = 1e9  # grpcio's sync server reports "no deadline" as time_remaining() ~9.2e18 s


def test_calls_without_a_deadline(fakes):
    """The kubelet sets no deadline on PullImage and GetContainerEvents: the backend gets none either,
    whatever the handler (raw default, by ID, by image, fan-out, merged, stream)."""
    client, ctr, vm, kata = fakes
    for f in (ctr, vm, kata):
        f.answers.update({"Version": lambda req: b"", "ListContainers": lambda req: b"", "Status": lambda req: b"",
                          "PullImage": lambda req: b"", "ContainerStatus": lambda req: b""})
    rt, im = client.runtime, client.images
    rt.Version(api_pb2.VersionRequest())
    rt.ListContainers(api_pb2.ListContainersRequest())
    rt.Status(api_pb2.StatusRequest())
    rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="kata__c"))
    im.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="busybox")))
    im.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="virtlet.cloud/cirros")))
    for f, methods in ((ctr, ("Version", "ListContainers", "Status", "PullImage")),
                       (vm, ("ListContainers", "Status", "PullImage")), (kata, ("ContainerStatus",))):
        for m in methods:
            assert f.deadlines[m] is None or f.deadlines[m] > NO_DEADLINE, (f.name, m, f.deadlines[m])
    ctr.events = [api_pb2.ContainerEventResponse(container_id="c1").SerializeToString()]
    stream = rt.GetContainerEvents(api_pb2.GetEventsRequest())
    assert next(stream).container_id == "c1"
    stream.cancel()
    # a deadline is passed on
    rt.Version(api_pb2.VersionRequest(), timeout=30)
    assert 25 < ctr.deadlines["Version"] < 31  # (the wire format of a deadline rounds it up)


@pytest.mark.parametrize("method", ["PullImage", "StopContainer", "RunPodSandbox"])
def test_client_cancel_reaches_the_backend(fakes, method):
    """A call the kubelet cancels is cancelled on its backend, not left running there (no deadline:
    nothing else would ever end it)."""
    client, ctr, vm, _ = fakes
    rt, im = client.runtime, client.images
    call, req, backend = {
        "PullImage": (im.PullImage, api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="busybox")), ctr),
        "StopContainer": (rt.StopContainer, api_pb2.StopContainerRequest(container_id="virtlet.cloud__c"), vm),
        "RunPodSandbox": (rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig(
            annotations={"kubernetes.io/target-runtime": "virtlet.cloud"})), vm),
    }[method]
    backend.hang.add(method)
    fut = call.future(req)
    until(lambda: any(m == method for m, _ in backend.requests), what=f"{method} reached {backend.name}")
    assert backend.gone == []
    fut.cancel()
    until(lambda: backend.gone == [method], what=f"{backend.name} saw {method} cancelled")


def test_deadline_reaches_the_backend(fakes):
    client, ctr, _, _ = fakes
    ctr.hang.add("PullImage")
    with pytest.raises(grpc.RpcError) as e:
        client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="busybox")), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    until(lambda: ctr.gone == ["PullImage"], what="containerd saw PullImage end")


def test_events_failing_to_open_one_stream_cancels_the_others(fakes, monkeypatch):
    client, ctr, vm, kata = fakes
    real = Backend.stream

    def stream(self, path, request, timeout):
        if self.name == "kata":  # the last: containerd's and vmlet's streams are open by now
            until(lambda: all(any(m == "GetContainerEvents" for m, _ in f.requests) for f in (ctr, vm)),
                   what="the other streams opened")
            raise RuntimeError("cannot open kata's stream")
        return real(self, path, request, timeout)
    monkeypatch.setattr(Backend, "stream", stream)
    with pytest.raises(grpc.RpcError) as e:
        next(client.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    until(lambda: ctr.gone == vm.gone == ["GetContainerEvents"], what="the opened streams cancelled")


class _EndedContext:
    """A server context whose call is already over (the kubelet went away before the handler ran)."""

    def time_remaining(self):
        return None

    def add_callback(self, callback) -> bool:
        return False

    def abort(self, code, details):
        raise grpc.RpcError(code, details)


def _in_thread(fn, timeout: float = 5.0):
    out = futures.ThreadPoolExecutor(1)
    try:
        return out.submit(fn).result(timeout)
    finally:
        out.shutdown(wait=False)


def test_a_call_already_over_is_not_left_waiting(fakes):
    """add_callback() returning False (the call ended already): the backend calls are cancelled at once
    instead of waiting for a cancellation that never comes."""
    _, ctr, vm, kata = fakes
    ctr.hang.add("PullImage")
    backends = Backends([(f.name, str(f.socket)) for f in (ctr, vm, kata)])
    backends.open()
    proxy = Proxy(backends)
    try:
        with pytest.raises(BackendError) as e:
            _in_thread(lambda: backends["containerd"].unary_cancellable(
                "/runtime.v1.ImageService/PullImage", b"", None, _EndedContext().add_callback))
        assert e.value.code == grpc.StatusCode.CANCELLED
        events = proxy._events("/runtime.v1.RuntimeService/GetContainerEvents", api_pb2.ContainerEventResponse)
        assert _in_thread(lambda: list(events(b"", _EndedContext()))) == []
        stream = proxy._stream_from("containerd", "/runtime.v1.RuntimeService/StreamContainers", b"",
                                    api_pb2.StreamContainersResponse, _EndedContext())
        assert _in_thread(lambda: list(stream)) == []
    finally:
        proxy.close()


# ---------------------------------------------------------------- criproxy as a process (as on a node)

@pytest.fixture
def proxy_proc(tmp_path):
    """`python -m criproxy.main` (gRPC's I/O set by main.py's GRPC_EXPERIMENTS) in front of two fakes."""
    ctr, vm = (FakeRuntime(tmp_path / f"{n}.sock", n).start() for n in ("containerd", "virtlet.cloud"))
    for f in (ctr, vm):
        f.answers["Version"] = lambda req: api_pb2.VersionResponse(runtime_name="fake").SerializeToString()
        f.answers["PullImage"] = (lambda n: lambda req: api_pb2.PullImageResponse(
            image_ref=f"{n}-image").SerializeToString())(f.name)
    p = ProxyProcess(tmp_path / "proxy.sock", [f"containerd={ctr.socket}", f"virtlet.cloud={vm.socket}"],
                     tmp_path / "criproxy.log")
    client = p.start()
    yield p, client, ctr, vm
    client.close()
    p.kill()
    for f in (ctr, vm):
        f.stop()


def _blocked_signals(pid: int) -> list[int]:
    """SigBlk of every thread of `pid` but the main one (in sigwait(), the kernel shows the signals it
    waits for as unblocked there)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        for line in (task / "status").read_text().splitlines():
            if line.startswith("SigBlk:"):
                out.append(int(line.split()[1], 16))
    return out


def test_process_calls_without_deadline_and_stop_on_sigterm(proxy_proc):
    p, client, ctr, vm = proxy_proc
    assert client.runtime.Version(api_pb2.VersionRequest()).runtime_name == "fake"
    for image, want in (("busybox", "containerd-image"), ("virtlet.cloud/cirros", "virtlet.cloud__virtlet.cloud-image")):
        assert client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image))).image_ref == want
    # SIGTERM and SIGINT are blocked in every thread (gRPC's included), taken by the main thread's sigwait()
    masks = _blocked_signals(p.proc.pid)
    assert masks
    for sig in (signal.SIGTERM, signal.SIGINT):
        assert all(m & (1 << (sig - 1)) for m in masks), (sig, [hex(m) for m in masks])
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(10) == 0


def test_process_graceful_stop_then_forced(proxy_proc):
    p, client, ctr, _ = proxy_proc
    ctr.hang.add("PullImage")
    pull = client.images.PullImage.future(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="busybox")))
    until(lambda: any(m == "PullImage" for m, _ in ctr.requests), what="PullImage reached containerd")
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.proc.poll() is None, "the call in progress gets a grace period"
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGINT)  # a second signal: out at once
    assert p.proc.wait(5) == 128 + signal.SIGINT
    assert time.monotonic() - t0 < 2
    with pytest.raises(grpc.RpcError):
        pull.result(5)


def test_process_grace_period_ends_calls_in_progress(proxy_proc):
    p, client, ctr, _ = proxy_proc
    ctr.hang.add("PullImage")
    pull = client.images.PullImage.future(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="busybox")))
    until(lambda: any(m == "PullImage" for m, _ in ctr.requests), what="PullImage reached containerd")
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    assert 4 < time.monotonic() - t0 < 10  # GRACE (5 s) for the pull, then it is cancelled
    until(lambda: ctr.gone == ["PullImage"], what="containerd saw the pull cancelled")
    with pytest.raises(grpc.RpcError):
        pull.result(5)
