"""pod_volumes.plan: which CRI mounts become virtio-fs shares (no mounts are made here)."""

from pathlib import Path

import pytest

from cri_shim.storage import pod_volumes
from proto.runtime.v1 import api_pb2


def m(container_path: str, host_path, **kw) -> api_pb2.Mount:
    return api_pb2.Mount(container_path=container_path, host_path=str(host_path), **kw)


def test_directories_are_shared_files_skipped_missing_created(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    shares, skipped = pod_volumes.plan([
        m("/data", tmp_path / "data"), m("/cfg", tmp_path / "link", readonly=True),
        m("/etc/hosts", tmp_path / "hosts"), m("/new", tmp_path / "new" / "dir")])
    assert [(s.guest.container_path, s.host_dir, s.guest.read_only) for s in shares] == [
        ("/data", str(tmp_path / "data"), False),
        ("/cfg", str(tmp_path / "data"), True),      # symlinks resolved, as containerd does
        ("/new", str(tmp_path / "new" / "dir"), False)]
    assert (tmp_path / "new" / "dir").is_dir()
    assert [(k.container_path, "file" in k.reason) for k in skipped] == [("/etc/hosts", True)]
    vm_dir = tmp_path / "vm"
    assert pod_volumes.share_source(vm_dir, shares[0]) == str(tmp_path / "data")
    assert pod_volumes.share_source(vm_dir, shares[1]) == str(vm_dir / "shares" / shares[1].guest.tag)


def test_record_round_trips(tmp_path: Path):
    (tmp_path / "d").mkdir()
    shares, skipped = pod_volumes.plan([m("/d", tmp_path / "d", readonly=True), m("/dev/x", "/dev/null")])
    path = tmp_path / "volumes.json"
    path.write_bytes(pod_volumes.record(shares, skipped))
    loaded, skipped_loaded = pod_volumes.load(path)
    assert loaded == shares
    assert skipped_loaded == [{"containerPath": "/dev/x", "hostPath": "/dev/null",
                               "reason": "not a directory: only directories can be shared with a VM"}]
    assert pod_volumes.load(tmp_path / "missing.json") == ([], [])


@pytest.mark.parametrize("mount, field", [
    (m("/a", "rel/dir"), "config.mounts[0].host_path"),
    (m("/a", "/x\x00y"), "config.mounts[0].host_path"),
    (m("a/b", "/tmp"), "config.mounts[0]"),
    (m("/a b", "/tmp"), "config.mounts[0]"),
    (m("/a", "/tmp", propagation=api_pb2.PROPAGATION_BIDIRECTIONAL), "config.mounts[0].propagation"),
    (m("/a", "/tmp", recursive_read_only=True), "config.mounts[0].recursive_read_only"),
    (m("/a", "/tmp", image=api_pb2.ImageSpec(image="busybox")), "config.mounts[0].image"),
])
def test_bad_mounts_name_the_field(mount, field):
    with pytest.raises(pod_volumes.VolumeMountError, match=field.replace("[", r"\[").replace("]", r"\]")):
        pod_volumes.plan([mount])


def test_duplicate_container_path_names_both():
    with pytest.raises(pod_volumes.VolumeMountError, match=r"config.mounts\[1\].*config.mounts\[0\]"):
        pod_volumes.plan([m("/a", "/tmp"), m("/a", "/var")])


def test_mountinfo_unescape():
    assert pod_volumes._unescape(r"/var/lib/a\040b\134c") == "/var/lib/a b\\c"
    assert pod_volumes._unescape("/plain") == "/plain"
