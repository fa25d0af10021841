"""CRI list filters: one matcher serves the list and the stats filter messages."""

from types import SimpleNamespace

from cri_shim.filters import container_matches, sandbox_matches
from proto.runtime.v1 import api_pb2


class FakeRuntime:
    def __init__(self, labels):
        self.labels = labels

    def container_config(self, _c):
        return SimpleNamespace(labels=self.labels)

    sandbox_config = container_config


def test_container_filters():
    rt = FakeRuntime({"app": "web", "tier": "1"})
    c = SimpleNamespace(id="abc123", sandbox_id="sb999", state=api_pb2.CONTAINER_RUNNING)
    assert container_matches(rt, c, None)
    assert container_matches(rt, c, api_pb2.ContainerFilter(id="abc", pod_sandbox_id="sb9"))
    assert not container_matches(rt, c, api_pb2.ContainerFilter(id="abd"))
    assert not container_matches(rt, c, api_pb2.ContainerFilter(
        state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED)))
    assert container_matches(rt, c, api_pb2.ContainerFilter(
        state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING)))
    # CONTAINER_CREATED is 0: a state filter set to it must still filter.
    assert not container_matches(rt, c, api_pb2.ContainerFilter(
        state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_CREATED)))
    assert container_matches(rt, c, api_pb2.ContainerStatsFilter(label_selector={"app": "web"}))
    assert not container_matches(rt, c, api_pb2.ContainerStatsFilter(label_selector={"app": "db"}))


def test_sandbox_filters():
    rt = FakeRuntime({"app": "web"})
    sb = SimpleNamespace(id="sb999", state=api_pb2.SANDBOX_NOTREADY)
    assert sandbox_matches(rt, sb, api_pb2.PodSandboxFilter(id="sb"))
    assert not sandbox_matches(rt, sb, api_pb2.PodSandboxFilter(
        state=api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)))
    assert sandbox_matches(rt, sb, api_pb2.PodSandboxStatsFilter(label_selector={"app": "web"}))
