"""Exec, Attach and PortForward through the CRI proxy: the URL a runtime answers reaches the kubelet unchanged,
and a real client (the kubernetes Python client's WebSocket stream) uses it.

The VM backend is a stub CRI server (the raw_server style of the other proxy tests) whose streaming RPCs
answer with a real vmlet streaming server's URLs; behind that server is a fake runtime that records what
it was asked. The containerd side is a stub answering a fixed URL, as containerd's own server would.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

from criproxy.server import ProxyThread
from proto.runtime.v1 import api_pb2
from cri_shim.streaming.server import StreamingServer
from tests.integration.criproxy import raw_server
from tests.support import cri

VM = "virtlet.cloud"


class Recorder:
    """The streaming runtime: exec echoes its command, port-forward answers in upper case."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def exec(self, container_id, cmd, session):
        with self.lock:
            self.calls.append(("exec", container_id, cmd))
        session.stdout.write(" ".join(cmd).encode())
        return 7

    def attach(self, container_id, session):
        with self.lock:
            self.calls.append(("attach", container_id))
        session.stdout.write(b"console\n")

    def port_forward(self, pod_sandbox_id, port, stream):
        with self.lock:
            self.calls.append(("portforward", pod_sandbox_id, port))
        while data := stream.read():
            stream.write(data.upper())


CONTAINERD_URL = "http://127.0.0.1:1/exec/containerd-token"


@pytest.fixture
def setup(tmp_path):
    recorder = Recorder()
    streaming = StreamingServer(recorder).start()
    answered = {}

    def vm_handlers(method):
        def unary(raw: bytes, ctx):
            if method.name == "Exec":
                url = streaming.get_exec(api_pb2.ExecRequest.FromString(raw))
                answered["Exec"] = url
                return api_pb2.ExecResponse(url=url).SerializeToString()
            if method.name == "Attach":
                url = streaming.get_attach(api_pb2.AttachRequest.FromString(raw))
                answered["Attach"] = url
                return api_pb2.AttachResponse(url=url).SerializeToString()
            if method.name == "PortForward":
                url = streaming.get_port_forward(api_pb2.PortForwardRequest.FromString(raw))
                answered["PortForward"] = url
                return api_pb2.PortForwardResponse(url=url).SerializeToString()
            ctx.abort(grpc.StatusCode.UNIMPLEMENTED, method.name)
        return unary, lambda raw, ctx: iter(())

    def containerd_handlers(method):
        def unary(raw: bytes, ctx):
            if method.name == "Exec":
                return api_pb2.ExecResponse(url=CONTAINERD_URL).SerializeToString()
            ctx.abort(grpc.StatusCode.UNIMPLEMENTED, method.name)
        return unary, lambda raw, ctx: iter(())

    vm_sock, ctr_sock, proxy_sock = tmp_path / "vm.sock", tmp_path / "ctr.sock", tmp_path / "proxy.sock"
    servers = [raw_server.serve(vm_sock, vm_handlers), raw_server.serve(ctr_sock, containerd_handlers)]
    proxy = ProxyThread(str(proxy_sock), [("containerd", str(ctr_sock)), (VM, str(vm_sock))]).start()
    client = cri.connect(proxy_sock)
    yield client, recorder, answered
    client.close()
    proxy.stop()
    for s in servers:
        s.stop(0).wait()
    streaming.stop()


def test_urls_pass_through_unchanged_and_work(setup):
    client, recorder, answered = setup
    url = client.runtime.Exec(api_pb2.ExecRequest(container_id=f"{VM}__c1", cmd=["echo", "hi"], stdout=True,
                                                  stderr=True), timeout=10).url
    assert url == answered["Exec"] and url.startswith("http://127.0.0.1:")
    c = ws_client.WSClient(Configuration(), url.replace("http", "ws", 1), None, True)
    c.run_forever(timeout=10)
    assert (c.read_stdout(), c.returncode) == ("echo hi", 7)
    assert recorder.calls[-1] == ("exec", "c1", ["echo", "hi"])  # the proxy's prefix is not in the cached request

    url = client.runtime.Attach(api_pb2.AttachRequest(container_id=f"{VM}__c1", stdout=True), timeout=10).url
    assert url == answered["Attach"]
    c = ws_client.WSClient(Configuration(), url.replace("http", "ws", 1), None, True)
    c.run_forever(timeout=10)
    assert c.read_stdout() == "console\n" and c.returncode == 0

    url = client.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=f"{VM}__p1", port=[80]),
                                     timeout=10).url
    assert url == answered["PortForward"]
    pf = ws_client.portforward_call(Configuration(), "GET", url.replace("http", "ws", 1) + "?ports=80")
    s = pf.socket(80)
    s.settimeout(10)
    s.sendall(b"through the proxy")
    got = b""
    while len(got) < len(b"through the proxy"):
        got += s.recv(100)
    assert got == b"THROUGH THE PROXY"
    pf.close()
    assert ("portforward", "p1", 80) in recorder.calls

    # the default runtime's URL is passed on just as unchanged
    assert client.runtime.Exec(api_pb2.ExecRequest(container_id="ctr1", cmd=["x"], stdout=True),
                               timeout=10).url == CONTAINERD_URL
