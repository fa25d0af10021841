"""criproxy.merge: list concatenation, Status conditions, ImageFsInfo, metric descriptors."""

from __future__ import annotations

from criproxy import merge
from proto.runtime.v1 import api_pb2


def _status(**conds) -> api_pb2.StatusResponse:
    r = api_pb2.StatusResponse()
    for t, (ok, reason, msg) in conds.items():
        r.status.conditions.add(type=t, status=ok, reason=reason, message=msg)
    return r


def _cond(resp, t):
    return next(c for c in resp.status.conditions if c.type == t)


def test_list_concat_is_a_wire_merge():
    a = api_pb2.ListContainersResponse(containers=[api_pb2.Container(id="a")]).SerializeToString()
    b = api_pb2.ListContainersResponse(containers=[api_pb2.Container(id="v__b"), api_pb2.Container(id="v__c")])
    merged = api_pb2.ListContainersResponse.FromString(merge.concat([a, b.SerializeToString(), b""]))
    assert [c.id for c in merged.containers] == ["a", "v__b", "v__c"]


def test_status_true_only_if_true_everywhere():
    ok = ("", "", "")
    parts = [
        ("containerd", _status(RuntimeReady=(True, *ok[1:]), NetworkReady=(True, *ok[1:])), ""),
        ("virtlet.cloud", _status(RuntimeReady=(True, "", ""), NetworkReady=(False, "NoNetwork", "no CNI yet")), ""),
    ]
    out = merge.status(parts, "containerd")
    assert _cond(out, "RuntimeReady").status is True
    nr = _cond(out, "NetworkReady")
    assert nr.status is False and nr.reason == "NoNetwork"
    assert "virtlet.cloud" in nr.message and "no CNI yet" in nr.message and "containerd" not in nr.message


def test_status_down_backend_and_missing_conditions():
    parts = [
        ("containerd", _status(RuntimeReady=(True, "", ""), NetworkReady=(True, "", ""), Extra=(True, "", "")), ""),
        ("kata", _status(RuntimeReady=(True, "", "")), ""),
        ("virtlet.cloud", None, "backend virtlet.cloud (/s) is unavailable: gone"),
    ]
    out = merge.status(parts, "containerd")
    rr = _cond(out, "RuntimeReady")
    assert rr.status is False and rr.reason == "BackendUnavailable" and "virtlet.cloud (/s) is unavailable" in rr.message
    nr = _cond(out, "NetworkReady")
    assert nr.status is False and nr.reason == "MultipleBackends"
    assert "kata" in nr.message and "virtlet.cloud" in nr.message
    assert _cond(out, "Extra").status is True  # optional conditions: true where reported


def test_status_handlers_features_info():
    a = _status(RuntimeReady=(True, "", ""), NetworkReady=(True, "", ""))
    a.runtime_handlers.add(name="runc")
    a.features.supplemental_groups_policy = True
    a.info["config"] = "{}"
    b = _status(RuntimeReady=(True, "", ""), NetworkReady=(True, "", ""))
    b.runtime_handlers.add(name="runc")
    b.runtime_handlers.add(name="vm")
    b.info["config"] = "{vm}"
    out = merge.status([("containerd", a, ""), ("virtlet.cloud", b, "")], "containerd")
    assert [h.name for h in out.runtime_handlers] == ["runc", "vm"]
    assert out.features.supplemental_groups_policy
    assert dict(out.info) == {"config": "{}", "virtlet.cloud/config": "{vm}"}


def test_imagefs_default_first_and_same_mountpoint_summed():
    def fs(mp, used, inodes):
        return api_pb2.FilesystemUsage(fs_id=api_pb2.FilesystemIdentifier(mountpoint=mp),
                                       used_bytes=api_pb2.UInt64Value(value=used),
                                       inodes_used=api_pb2.UInt64Value(value=inodes))
    a = api_pb2.ImageFsInfoResponse(image_filesystems=[fs("/var/lib/containerd", 10, 1)],
                                    container_filesystems=[fs("/var/lib/containerd", 5, 1)])
    b = api_pb2.ImageFsInfoResponse(image_filesystems=[fs("/var/lib/vmlet/images", 7, 2)])
    c = api_pb2.ImageFsInfoResponse(image_filesystems=[fs("/var/lib/containerd", 1, 1)])
    out = merge.imagefs([a, b, c])
    assert [(f.fs_id.mountpoint, f.used_bytes.value, f.inodes_used.value) for f in out.image_filesystems] == [
        ("/var/lib/containerd", 11, 2), ("/var/lib/vmlet/images", 7, 2)]
    assert len(out.container_filesystems) == 1


def test_metric_descriptors_dedup():
    a = api_pb2.ListMetricDescriptorsResponse(descriptors=[api_pb2.MetricDescriptor(name="x", help="a")])
    b = api_pb2.ListMetricDescriptorsResponse(descriptors=[api_pb2.MetricDescriptor(name="x", help="b"),
                                                           api_pb2.MetricDescriptor(name="y")])
    out = merge.metric_descriptors([a, b])
    assert [(d.name, d.help) for d in out.descriptors] == [("x", "a"), ("y", "")]
