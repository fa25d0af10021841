"""The host side of read-only pod volumes: real bind mounts, no VM (needs root, as vmlet does).

A read-only volume reaches virtiofsd as a read-only bind mount under the VM's
directory. It must stay read-only, must not join the volume's propagation
peer group (host mounts made later under the volume must not show up in it,
and detaching it must not detach the host's originals), and a bind left
writable by a crash is redone.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from cri_shim.storage import pod_volumes
from cri_shim.cloudinit import Mount


def mounted(path: Path) -> bool:
    return str(path) in pod_volumes._mountpoints_under(path)


@pytest.fixture
def shared_volume(vmlet_dir: Path) -> Iterator[Path]:
    """A volume on a mount with shared propagation, as /var/lib/kubelet is on a systemd host."""
    base = vmlet_dir / "kubelet"
    base.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vmlet-test", str(base)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(base)], check=True)
        vol = base / "volume"
        vol.mkdir()
        (vol / "data").write_text("original\n")
        yield vol
    finally:
        subprocess.run(["umount", "-R", "-l", str(base)], check=False)


def share_of(vol: Path) -> pod_volumes.Share:
    return pod_volumes.Share(Mount(str(vol), "/etc/app", read_only=True), str(vol))


def test_read_only_bind_is_read_only_and_private(shared_volume: Path, vmlet_dir: Path):
    vm = vmlet_dir / "vm"
    share = share_of(shared_volume)
    pod_volumes.prepare(vm, [share])
    target = Path(pod_volumes.share_source(vm, share))
    assert mounted(target) and (target / "data").read_text() == "original\n"
    with pytest.raises(OSError) as e:
        (target / "new").write_text("x")
    assert e.value.errno == errno.EROFS

    # A mount made on the host under the volume afterwards: not in the VM's view (private) ...
    sub = shared_volume / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vmlet-test-sub", str(sub)], check=True)
    assert not mounted(target / "sub")
    # ... and detaching the VM's view leaves the host's mounts alone.
    pod_volumes.unmount_under(vm)
    assert not mounted(target) and mounted(sub) and mounted(shared_volume.parent)
    assert (shared_volume / "data").read_text() == "original\n"


def test_a_writable_leftover_at_the_target_is_redone_read_only(shared_volume: Path, vmlet_dir: Path):
    """What a crash between the bind and the read-only remount leaves behind."""
    vm = vmlet_dir / "vm"
    share = share_of(shared_volume)
    target = Path(pod_volumes.share_source(vm, share))
    target.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(shared_volume), str(target)], check=True)
    assert os.access(target, os.W_OK) and not os.statvfs(target).f_flag & os.ST_RDONLY

    pod_volumes.prepare(vm, [share])
    assert os.statvfs(target).f_flag & os.ST_RDONLY
    assert sorted(pod_volumes._mountpoints_under(vm)) == [str(target)], "one mount, not a stack"
    pod_volumes.prepare(vm, [share])  # idempotent
    assert sorted(pod_volumes._mountpoints_under(vm)) == [str(target)]
    pod_volumes.release(vm)
    assert not pod_volumes._mountpoints_under(vm)


def test_a_state_dir_on_a_shared_mount_propagates_only_the_read_only_bind(
        shared_volume: Path, vmlet_dir: Path):
    """The node DaemonSet: vmlet's /var/lib/vmlet is Bidirectional, libvirtd sees it HostToContainer.
    Here `state` is a shared mount and `libvirtd_view` a peer of it: libvirtd's virtiofsd must only
    ever see the read-only bind, and detaching it in vmlet's view must detach libvirtd's copy too."""
    state, libvirtd_view = vmlet_dir / "state", vmlet_dir / "libvirtd-view"
    state.mkdir()
    libvirtd_view.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vmlet-test-state", str(state)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(state)], check=True)
        subprocess.run(["mount", "--bind", str(state), str(libvirtd_view)], check=True)
        share = share_of(shared_volume)
        pod_volumes.prepare(state / "vm", [share])
        seen_by_libvirtd = libvirtd_view / Path(pod_volumes.share_source(state / "vm", share)).relative_to(state)
        assert mounted(seen_by_libvirtd) and (seen_by_libvirtd / "data").read_text() == "original\n"
        assert os.statvfs(seen_by_libvirtd).f_flag & os.ST_RDONLY
        with pytest.raises(OSError) as e:
            (seen_by_libvirtd / "new").write_text("x")
        assert e.value.errno == errno.EROFS

        pod_volumes.unmount_under(state / "vm")
        assert not mounted(seen_by_libvirtd), "the copy in libvirtd's view must go with vmlet's"
        assert (shared_volume / "data").read_text() == "original\n"
    finally:
        subprocess.run(["umount", "-R", "-l", str(libvirtd_view)], check=False)
        subprocess.run(["umount", "-R", "-l", str(state)], check=False)
