"""The test VM image recipe: build, cache, hash and image layout (no QEMU run).

deploy/images/build-test-image.sh builds the image into the shared cache
(VMLET_IMAGE_CACHE, default /var/cache/vmlet/images, the same one the
integration tests use), so the build is done once and reused. Recipe edits are
made on a copy of deploy/images/testvm passed as VMLET_TESTVM_RECIPE, never on
the repository's files.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "images" / "build-test-image.sh"
RECIPE = REPO / "deploy" / "images" / "testvm"
CACHE = Path(os.environ.get("VMLET_IMAGE_CACHE", "/var/cache/vmlet/images"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "cpio", "mkfs.vfat", "syslinux", "mcopy", "sfdisk", "qemu-img")


def _require_host_tools() -> None:
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if not missing:
        return
    reason = f"image build tools missing: {missing} (run deploy/setup-host.sh)"
    if IN_CI:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def run_builder(*args: str, recipe: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMLET_IMAGE_CACHE=str(CACHE))
    if recipe is not None:
        env["VMLET_TESTVM_RECIPE"] = str(recipe)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=1200)


def recipe_hash(recipe: Path | None = None) -> str:
    proc = run_builder("--hash", recipe=recipe)
    assert proc.returncode == 0, proc.stderr
    value = proc.stdout.strip().splitlines()[-1]
    assert len(value) == 12 and all(c in "0123456789abcdef" for c in value), value
    return value


@pytest.fixture(scope="module")
def image() -> Path:
    _require_host_tools()
    proc = run_builder()
    assert proc.returncode == 0, f"image build failed:\n{proc.stderr[-4000:]}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_absolute()
    return path


@pytest.fixture
def recipe_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "testvm"
    shutil.copytree(RECIPE, copy, symlinks=True)
    return copy


def test_build_gives_a_standalone_qcow2(image: Path):
    assert image.is_file()
    assert image.parent == CACHE.resolve()
    assert image.name == f"vmlet-testvm-{recipe_hash()}.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     check=True, capture_output=True, text=True, timeout=60).stdout)
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info and "full-backing-filename" not in info
    assert info["virtual-size"] == 64 * 1024 * 1024
    # Readable by QEMU running as another user (libvirt-qemu).
    assert image.stat().st_mode & 0o004
    link = CACHE / "vmlet-testvm.qcow2"
    assert link.is_symlink() and link.resolve() == image.resolve()


def test_second_run_is_a_cache_hit(image: Path):
    mtime = image.stat().st_mtime_ns
    started = time.monotonic()
    proc = run_builder()
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == image
    assert "cache hit" in proc.stderr
    assert image.stat().st_mtime_ns == mtime
    assert elapsed < 10, f"cache hit took {elapsed:.1f}s"


def test_hash_follows_the_recipe_not_its_location(recipe_copy: Path):
    _require_host_tools()
    original = recipe_hash()
    assert recipe_hash(recipe_copy) == original

    boot = recipe_copy / "rootfs" / "etc" / "vmlet" / "boot.sh"
    text = boot.read_text()
    boot.write_text(text + "\n# an edit to the guest's init\n")
    edited = recipe_hash(recipe_copy)
    assert edited != original

    boot.write_text(text)
    assert recipe_hash(recipe_copy) == original

    (recipe_copy / "rootfs" / "etc" / "motd").write_text("a new file\n")
    assert recipe_hash(recipe_copy) not in (original, edited)


def test_incomplete_recipe_fails_clearly(recipe_copy: Path):
    (recipe_copy / "syslinux.cfg").unlink()
    proc = run_builder(recipe=recipe_copy)
    assert proc.returncode != 0
    assert "ERROR" in proc.stderr and "syslinux.cfg" in proc.stderr
    assert proc.stdout.strip() == ""


def test_failed_build_leaves_no_image(image: Path, recipe_copy: Path):
    with (recipe_copy / "modules").open("a") as f:
        f.write("no_such_module_vmlet\n")
    bad_hash = recipe_hash(recipe_copy)
    link_before = os.readlink(CACHE / "vmlet-testvm.qcow2")
    proc = run_builder(recipe=recipe_copy)
    assert proc.returncode != 0
    assert "no_such_module_vmlet" in proc.stderr and "no image was written" in proc.stderr
    assert not (CACHE / f"vmlet-testvm-{bad_hash}.qcow2").exists()
    assert not list(CACHE.glob(f".build-{bad_hash}.*")), "temporary build directory left behind"
    assert os.readlink(CACHE / "vmlet-testvm.qcow2") == link_before


def test_image_layout(image: Path, tmp_path: Path):
    """MBR + bootable FAT partition with SYSLINUX, kernel, initramfs and config."""
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True, timeout=120)
    data = raw.read_bytes()
    assert data[510:512] == b"\x55\xaa"
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True,
                                      text=True, timeout=60).stdout)["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["start"] == 2048 and part.get("bootable") is True

    fat = f"{raw}@@{part['start'] * 512}"
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    listing = subprocess.run(["mdir", "-a", "-b", "-i", fat, "::"], check=True, capture_output=True, text=True,
                             env=env, timeout=60).stdout
    names = {line.strip().lstrip(":/").lower() for line in listing.splitlines()}
    assert {"ldlinux.sys", "ldlinux.c32", "vmlinuz", "initrd.gz", "syslinux.cfg"} <= names, names

    def mtype(name: str) -> bytes:
        out = tmp_path / name
        subprocess.run(["mcopy", "-n", "-i", fat, f"::{name}", str(out)], check=True, env=env, timeout=60)
        return out.read_bytes()

    cfg = mtype("syslinux.cfg").decode()
    assert "console=ttyS0" in cfg and "SERIAL 0 115200" in cfg
    assert "TIMEOUT 0" in cfg and "PROMPT 0" in cfg

    initrd = gzip.decompress(mtype("initrd.gz"))
    files = subprocess.run(["cpio", "-t", "--quiet"], input=initrd, check=True, capture_output=True,
                           timeout=60).stdout.decode().split()
    for expected in ("init", "bin/busybox", "sbin/acpid", "sbin/udhcpc", "etc/inittab",
                     "etc/vmlet/boot.sh", "etc/vmlet/modules.load"):
        assert expected in files, expected
    # /dev/console comes from a second, hand-made cpio archive appended to the first.
    assert b"dev/console\x00" in initrd
    modules = [f for f in files if f.endswith(".ko")]
    for mod in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "sr_mod", "isofs", "vfat", "button"):
        assert any(f.endswith(f"/{mod}.ko") for f in modules), mod
    assert any(f.endswith("/modules.dep") for f in files)
