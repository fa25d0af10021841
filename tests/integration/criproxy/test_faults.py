"""Faults around the proxy, against scripted fake runtimes (hostile.py): a backend restarting under load, a
backend that hangs, a kubelet that cancels (unary, fan-out, streams, events), the proxy killed -9 with calls
in flight, answers too big to merge."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from criproxy.backends import MAX_MESSAGE
from criproxy.server import ProxyThread
from proto.runtime.v1 import api_pb2
from tests.integration.criproxy.conftest import ProxyProcess
from tests.integration.criproxy.hostile import Behaviour, ScriptedRuntime
from tests.integration.criproxy.raw_server import until
from tests.support import cri

DEFAULT, VM = "containerd", "virtlet.cloud"
MARGIN = 0.5


@pytest.fixture
def fakes(tmp_path):
    made = {n: ScriptedRuntime(tmp_path / f"{n}.sock", n).start() for n in (DEFAULT, VM)}
    yield made
    for f in made.values():
        f.stop()


@pytest.fixture
def proxied(fakes, tmp_path):
    sock = tmp_path / "proxy.sock"
    proxy = ProxyThread(str(sock), [(n, str(f.socket)) for n, f in fakes.items()]).start()
    client = cri.connect(sock)
    yield client, fakes
    client.close()
    proxy.stop()


def _pods(*ids) -> bytes:
    return api_pb2.ListPodSandboxResponse(items=[api_pb2.PodSandbox(id=i) for i in ids]).SerializeToString()


def test_backend_restarting_under_load(proxied):
    """Calls keep coming while vmlet restarts: none gets stuck, those in the gap fail fast with
    UNAVAILABLE naming the backend, and the proxy uses the backend again once it is back."""
    client, fakes = proxied
    fakes[DEFAULT].behaviour = Behaviour(items=[_pods("c")])
    fakes[VM].behaviour = Behaviour(items=[_pods("v")])
    rt = client.runtime
    stop = threading.Event()
    results: list[tuple[float, float, grpc.StatusCode, str]] = []  # (start, seconds, code, details)

    def load(kind):
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                if kind == "list":
                    rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=3)
                else:
                    rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id="virtlet.cloud__v"), timeout=3)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            results.append((t0, time.monotonic() - t0, code, details))
    pool = futures.ThreadPoolExecutor(4)
    workers = [pool.submit(load, k) for k in ("list", "status", "list", "status")]
    try:
        time.sleep(0.5)
        stopping_at = time.monotonic()
        fakes[VM].stop()  # grace 0: the calls it is serving end CANCELLED, as a killed vmlet's would
        down_at = time.monotonic()
        time.sleep(1.5)
        fakes[VM].start()
        up_at = time.monotonic()
        until(lambda: any(t0 > up_at and c == grpc.StatusCode.OK for t0, _, c, _ in list(results)), 5,
               "calls succeed again after the backend came back")
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.result(10)  # none stuck
        pool.shutdown()
    assert all(took < 3 + MARGIN for _, took, _, _ in results)
    # CANCELLED comes from the backend itself, and only to a call it was serving when it stopped
    unexpected = [(c, d[:200]) for t0, took, c, d in results
                  if c not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
                  and not (c == grpc.StatusCode.CANCELLED and t0 <= down_at and t0 + took >= stopping_at)]
    assert not unexpected, unexpected
    gap = [(took, d) for t0, took, c, d in results if down_at + 0.1 < t0 < up_at - 0.1]
    assert gap and all(took < 0.5 for took, _ in gap), "calls while the backend is down fail fast"
    assert all(c == grpc.StatusCode.UNAVAILABLE and f"backend {VM}" in d
               for t0, _, c, d in results if down_at + 0.1 < t0 < up_at - 0.1)
    assert sum(1 for t0, _, c, _ in results if t0 > up_at and c == grpc.StatusCode.OK) > 0


HANGING = [
    ("PodSandboxStatus", lambda rt, t: rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id="virtlet.cloud__p"), timeout=t)),
    ("ListPodSandbox", lambda rt, t: rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=t)),
    ("StopContainer", lambda rt, t: rt.StopContainer(
        api_pb2.StopContainerRequest(container_id="virtlet.cloud__c"), timeout=t)),
    ("StreamContainers", lambda rt, t: list(rt.StreamContainers(api_pb2.StreamContainersRequest(), timeout=t))),
    ("GetContainerEvents", lambda rt, t: list(rt.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=t))),
    ("Status", lambda rt, t: rt.Status(api_pb2.StatusRequest(), timeout=t)),
]


@pytest.mark.parametrize("method,fn", HANGING, ids=[m for m, _ in HANGING])
def test_hanging_backend_ends_at_the_callers_deadline(proxied, method, fn):
    client, fakes = proxied
    fakes[VM].behaviour = Behaviour(hang=True)
    t0 = time.monotonic()
    if method == "Status":  # a hanging backend is a not-ready one, answered by the deadline
        conds = {c.type: c for c in fn(client.runtime, 1.0).status.conditions}
        assert not conds["RuntimeReady"].status and f"backend {VM}" in conds["RuntimeReady"].message
    else:
        with pytest.raises(grpc.RpcError) as e:
            fn(client.runtime, 1.0)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 1.0 + MARGIN
    until(lambda: method in fakes[VM].gone or (method == "Status" and fakes[VM].gone), 3,
           f"{VM} saw {method} end")


CANCELLED = [
    # unary fan-out without a deadline: nothing but the cancel ends it
    ("ListContainers", lambda rt: rt.ListContainers.future(api_pb2.ListContainersRequest())),
    ("Version", lambda rt: rt.Version.future(api_pb2.VersionRequest())),
    ("ContainerStatus", lambda rt: rt.ContainerStatus.future(
        api_pb2.ContainerStatusRequest(container_id="virtlet.cloud__c"))),
    # stream fan-out, with and without a deadline
    ("StreamContainers", lambda rt: rt.StreamContainers(api_pb2.StreamContainersRequest())),
    ("StreamPodSandboxes", lambda rt: rt.StreamPodSandboxes(api_pb2.StreamPodSandboxesRequest(), timeout=60)),
    ("GetContainerEvents", lambda rt: rt.GetContainerEvents(api_pb2.GetEventsRequest())),
]


@pytest.mark.parametrize("method,start", CANCELLED, ids=[m for m, _ in CANCELLED])
def test_kubelet_cancel_reaches_every_backend(proxied, method, start):
    client, fakes = proxied
    called = [f for f in fakes.values()] if method not in ("Version", "ContainerStatus") else (
        [fakes[DEFAULT]] if method == "Version" else [fakes[VM]])
    for f in fakes.values():
        f.behaviour = Behaviour(hang=True)
    call = start(client.runtime)
    if hasattr(call, "__next__"):  # a stream: start reading it
        reader = threading.Thread(target=lambda: [None for _ in _swallow(call)], daemon=True)
        reader.start()
    until(lambda: all(any(m == method for m, _ in f.calls) for f in called), what=f"{method} reached the backends")
    time.sleep(0.2)
    assert not any(f.gone for f in called)
    call.cancel()
    until(lambda: all(f.gone == [method] for f in called), what=f"every backend saw {method} cancelled")


def _swallow(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return
    except ValueError:  # grpc's "Internal gRPC call error 8": the test closed the channel under the reader
        return


def test_merged_answer_too_big(proxied):
    """Two lists that fit the 16 MiB limit each but not together: RESOURCE_EXHAUSTED saying so, not a
    transport error."""
    client, fakes = proxied
    big = "x" * (1 << 20)
    fakes[DEFAULT].behaviour = Behaviour(items=[_pods(*[f"c{i}{big}" for i in range(9)])])
    fakes[VM].behaviour = Behaviour(items=[_pods(*[f"v{i}{big}" for i in range(9)])])
    ch = grpc.insecure_channel(f"unix://{fakes[VM].socket.parent}/proxy.sock",
                               options=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/runtime.v1.RuntimeService/ListPodSandbox")(b"", timeout=30)
    finally:
        ch.close()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MAX_MESSAGE) in e.value.details()


def test_proxy_killed_with_calls_in_flight(fakes, tmp_path):
    """kill -9 of criproxy while calls wait on a backend: the callers get UNAVAILABLE at once, the backends
    see their calls end, a restarted proxy serves on the same socket, and no proxy process is left."""
    fakes[DEFAULT].behaviour = Behaviour(items=[b""])
    fakes[VM].by_method["StopContainer"] = Behaviour(hang=True)
    fakes[VM].by_method["ListContainers"] = Behaviour(hang=True)
    for f in fakes.values():
        f.by_method["GetContainerEvents"] = Behaviour(hang=True, items=[])
    p = ProxyProcess(tmp_path / "proxy.sock", [f"{n}={f.socket}" for n, f in fakes.items()], tmp_path / "proxy.log")
    try:
        client = p.start()
        try:
            rt = client.runtime
            stop = rt.StopContainer.future(api_pb2.StopContainerRequest(container_id="virtlet.cloud__c",
                                                                        timeout=3600))
            lst = rt.ListContainers.future(api_pb2.ListContainersRequest(), timeout=120)
            events = rt.GetContainerEvents(api_pb2.GetEventsRequest())
            until(lambda: {m for m, _ in fakes[VM].calls} >= {"StopContainer", "ListContainers",
                                                                 "GetContainerEvents"},
                   what="the calls reached vmlet")
            pid = p.proc.pid
            t0 = time.monotonic()
            p.kill()
            for fut in (stop, lst):
                with pytest.raises(grpc.RpcError) as e:
                    fut.result(5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as e:
                next(events)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 2
            until(lambda: sorted(fakes[VM].gone) == ["GetContainerEvents", "ListContainers", "StopContainer"],
                   what="vmlet saw every call of the dead proxy end")
            assert not Path(f"/proc/{pid}").exists()
        finally:
            client.close()
        client = p.start()  # the stale socket file is replaced
        try:
            assert client.runtime.Version(api_pb2.VersionRequest(), timeout=5) is not None
        finally:
            client.close()
    finally:
        p.stop()  # also when anything above failed before the kill: no proxy process outlives the test
    assert p.proc.poll() is not None
