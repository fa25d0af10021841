"""criproxy.routing: backend choice, ID prefixes, image routing, filter plans, unknown fields."""

from __future__ import annotations

import pytest

from criproxy import routing
from criproxy.routing import Routes
from proto.runtime.v1 import api_pb2

R = Routes("containerd", ("virtlet.cloud", "kata"))
VM = {"kubernetes.io/target-runtime": "virtlet.cloud"}


def test_sandbox_backend_by_annotation():
    assert R.sandbox_backend({}) == "containerd"
    assert R.sandbox_backend(None) == "containerd"
    assert R.sandbox_backend(VM) == "virtlet.cloud"
    assert R.sandbox_backend({"kubernetes.io/target-runtime": "kata"}) == "kata"
    assert R.sandbox_backend({"kubernetes.io/target-runtime": "containerd"}) == "containerd"
    with pytest.raises(routing.UnknownRuntime, match="nope.*configured: containerd, virtlet.cloud, kata"):
        R.sandbox_backend({"kubernetes.io/target-runtime": "nope"})


def test_id_prefix_roundtrip():
    assert R.add_prefix("virtlet.cloud", "abc") == "virtlet.cloud__abc"
    assert R.add_prefix("containerd", "abc") == "abc"
    assert R.add_prefix("kata", "") == ""
    assert R.split_id("virtlet.cloud__abc") == ("virtlet.cloud", "abc")
    assert R.split_id("kata__x__y") == ("kata", "x__y")
    assert R.split_id("abc") == ("containerd", "abc")
    assert R.split_id("other__abc") == ("containerd", "other__abc")  # unknown prefix: the default's
    assert R.split_id("") == ("containerd", "")


def test_image_routing():
    assert R.image_backend("virtlet.cloud/cirros:1") == ("virtlet.cloud", "virtlet.cloud/cirros:1")
    assert R.image_backend("docker.io/library/busybox") == ("containerd", "docker.io/library/busybox")
    assert R.image_backend("virtlet.cloud__sha256:ab") == ("virtlet.cloud", "sha256:ab")
    assert R.image_backend("sha256:ab") == ("containerd", "sha256:ab")
    assert R.image_backend("virtlet.cloudy/x") == ("containerd", "virtlet.cloudy/x")
    assert R.add_image_prefix("virtlet.cloud", "virtlet.cloud/x") == "virtlet.cloud/x"
    assert R.add_image_prefix("virtlet.cloud", "sha256:ab") == "virtlet.cloud__sha256:ab"


def test_bad_backend_names():
    with pytest.raises(ValueError, match="unique"):
        Routes("a", ("a",))
    with pytest.raises(ValueError, match="bad backend name"):
        Routes("a", ("b__c",))


def test_prefixes_on_nested_responses():
    resp = api_pb2.PodSandboxStatusResponse()
    resp.status.id = "s1"
    resp.containers_statuses.add(id="c1", image_ref="sha256:aa", image_id="sha256:aa").image.image = "sha256:aa"
    routing.add_prefixes(R, "virtlet.cloud", resp)
    assert resp.status.id == "virtlet.cloud__s1"
    c = resp.containers_statuses[0]
    assert (c.id, c.image_ref, c.image_id, c.image.image) == (
        "virtlet.cloud__c1", "virtlet.cloud__sha256:aa", "virtlet.cloud__sha256:aa", "virtlet.cloud__sha256:aa")
    assert not resp.status.HasField("metadata")  # no presence created
    routing.strip_prefixes(R, "virtlet.cloud", resp)
    assert resp.status.id == "s1" and resp.containers_statuses[0].image.image == "sha256:aa"


def test_image_names_and_stats_and_metrics():
    img = api_pb2.ListImagesResponse(images=[api_pb2.Image(id="sha256:1", repo_tags=["virtlet.cloud/x:latest"])])
    routing.add_prefixes(R, "virtlet.cloud", img)
    assert img.images[0].id == "virtlet.cloud__sha256:1"
    assert img.images[0].repo_tags == ["virtlet.cloud/x:latest"]
    stats = api_pb2.ListPodSandboxStatsResponse()
    s = stats.stats.add()
    s.attributes.id = "p"
    s.linux.containers.add().attributes.id = "c"
    routing.add_prefixes(R, "kata", stats)
    assert s.attributes.id == "kata__p" and s.linux.containers[0].attributes.id == "kata__c"
    m = api_pb2.ListPodSandboxMetricsResponse()
    pm = m.pod_metrics.add(pod_sandbox_id="p")
    pm.container_metrics.add(container_id="c")
    routing.add_prefixes(R, "kata", m)
    assert pm.pod_sandbox_id == "kata__p" and pm.container_metrics[0].container_id == "kata__c"


def test_default_backend_untouched_and_urls_kept():
    resp = api_pb2.ExecResponse(url="http://127.0.0.1:1234/exec/abc")
    routing.add_prefixes(R, "virtlet.cloud", resp)
    assert resp.url == "http://127.0.0.1:1234/exec/abc"
    c = api_pb2.Container(id="x")
    routing.add_prefixes(R, "containerd", c)
    assert c.id == "x"


def test_uint32_container_id_in_idmapping_is_not_an_id():
    plan = routing.ID_FIELDS.plan(api_pb2.IDMapping.DESCRIPTOR)
    assert plan == ()


def test_request_route_field():
    assert routing.request_route_field(api_pb2.StopPodSandboxRequest.DESCRIPTOR) == "pod_sandbox_id"
    assert routing.request_route_field(api_pb2.CreateContainerRequest.DESCRIPTOR) == "pod_sandbox_id"
    assert routing.request_route_field(api_pb2.ExecRequest.DESCRIPTOR) == "container_id"
    assert routing.request_route_field(api_pb2.PortForwardRequest.DESCRIPTOR) == "pod_sandbox_id"
    assert routing.request_route_field(api_pb2.VersionRequest.DESCRIPTOR) is None
    assert routing.request_route_field(api_pb2.ListContainersRequest.DESCRIPTOR) is None


def test_list_plan():
    assert routing.plan_list(R, {}) == [("containerd", {}), ("virtlet.cloud", {}), ("kata", {})]
    assert routing.plan_list(R, {"id": "virtlet.cloud__c"}) == [("virtlet.cloud", {"id": "c"})]
    assert routing.plan_list(R, {"id": "c"}) == [("containerd", {"id": "c"})]
    assert routing.plan_list(R, {"id": "kata__c", "pod_sandbox_id": "kata__p"}) == [
        ("kata", {"id": "c", "pod_sandbox_id": "p"})]
    assert routing.plan_list(R, {"id": "kata__c", "pod_sandbox_id": "p"}) == []  # no container is in both
    f = api_pb2.ContainerFilter(pod_sandbox_id="x", label_selector={"a": "b"})
    assert routing.filter_ids(f) == {"pod_sandbox_id": "x"}
    assert routing.filter_ids(api_pb2.PodSandboxStatsFilter(id="p")) == {"id": "p"}


def test_image_filter_plan():
    assert routing.image_filter_backends(R, "") == [("containerd", ""), ("virtlet.cloud", ""), ("kata", "")]
    assert routing.image_filter_backends(R, "virtlet.cloud/x") == [("virtlet.cloud", "virtlet.cloud/x")]
    assert routing.image_filter_backends(R, "busybox") == [("containerd", "busybox")]


UNKNOWN_FIELD = b"\xb8\x3e\x2a"  # field 999, varint 42: not in runtime.v1


def test_unknown_fields_survive_strip_and_prefix():
    raw = api_pb2.ContainerStatusRequest(container_id="virtlet.cloud__c1", verbose=True).SerializeToString()
    raw += UNKNOWN_FIELD
    msg = api_pb2.ContainerStatusRequest.FromString(raw)
    routing.strip_prefixes(R, "virtlet.cloud", msg)
    out = msg.SerializeToString()
    assert UNKNOWN_FIELD in out
    assert api_pb2.ContainerStatusRequest.FromString(out).container_id == "c1"
    # nested unknown field inside a repeated sub-message of a response
    c = api_pb2.Container(id="c").SerializeToString() + UNKNOWN_FIELD
    resp_raw = b"\x0a" + bytes([len(c)]) + c  # ListContainersResponse.containers[0]
    resp = api_pb2.ListContainersResponse.FromString(resp_raw)
    routing.add_prefixes(R, "kata", resp)
    out = resp.SerializeToString()
    assert UNKNOWN_FIELD in out and b"kata__c" in out


def test_parse_backends():
    assert routing.parse_backends(["containerd=unix:///run/c.sock", "virtlet.cloud=/run/v.sock"]) == [
        ("containerd", "/run/c.sock"), ("virtlet.cloud", "/run/v.sock")]
    with pytest.raises(ValueError, match="NAME=SOCKET"):
        routing.parse_backends(["nosocket"])
