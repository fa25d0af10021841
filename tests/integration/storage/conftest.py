"""Fixtures for the node's storage: filesystem volumes (directories; small file systems as tmpfs mounts),
block volumes (loop devices on sparse files), small qcow2 test images with known contents, and a child
process that runs a prepare_* call and dies at a crashpoint.

Everything a fixture makes goes in its finalizer, also when the test fails: mounts are unmounted and loop
devices detached (a leaked loop device outlives the test run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[3]
MIB = 1024 * 1024


def _need(*tools: str) -> None:
    for tool in tools:
        require(shutil.which(tool) is not None, f"{tool} not installed (run deploy/setup-host.sh)")


def run(*argv: str, timeout: float = 120) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TestImage:
    __test__ = False  # not a test class, whatever its name
    path: Path
    format: str
    digest: str  # sha256:<hex> of the file, as the image store names it
    virtual_size: int


@pytest.fixture
def qemu_tools() -> None:
    _need("qemu-img", "qemu-io")


@pytest.fixture
def volume(tmp_path: Path, qemu_tools) -> Path:
    """A filesystem volume: a directory, resolved as the caller of volume_image resolves it."""
    d = tmp_path / "volume"
    d.mkdir()
    return Path(os.path.realpath(d))


@pytest.fixture
def small_fs() -> Iterator[Callable[[int], Path]]:
    """small_fs(mib) → a directory on a tmpfs of that size (a file system that fills up); unmounted after."""
    require(os.geteuid() == 0, "needs root (mount)")
    made: list[Path] = []

    def make(mib: int) -> Path:
        d = Path(tempfile.mkdtemp(prefix="vmlet-test-fs-"))
        made.append(d)
        run("mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "vmlet-test-fs", str(d))
        return d

    yield make
    for d in made:
        if os.path.ismount(d):
            subprocess.run(["umount", str(d)], capture_output=True, timeout=60)
        if os.path.ismount(d):
            subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def block_volume(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """block_volume(bytes) → a loop device on a sparse file of that size; detached after."""
    require(os.geteuid() == 0, "needs root (losetup)")
    _need("losetup")
    devices: list[str] = []

    def make(size: int) -> Path:
        backing = tmp_path / f"block-{len(devices)}.raw"
        with open(backing, "wb") as f:
            f.truncate(size)
        dev = run("losetup", "-f", "--show", str(backing)).strip()
        devices.append(dev)
        return Path(dev)

    yield make
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
    left = [line for line in run("losetup", "-a").splitlines() if str(tmp_path) in line]
    assert not left, f"loop devices left attached: {left}"


@pytest.fixture(scope="session")
def hostile_images(tmp_path_factory) -> dict[str, Path]:
    """qcow2 images a volume's disk.img must not be accepted as, by the reason (tests/support/images.py
    makes the same ones, but its LUKS image fails about a third of the time: qemu-img's PBKDF benchmark
    says "Unable to get accurate CPU usage" when its first round takes under a millisecond of CPU)."""
    _need("qemu-img")
    d = tmp_path_factory.mktemp("volume-hostile")
    out = {name: d / f"{name}.qcow2" for name in ("backing-file", "data-file", "encrypted", "huge")}
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw",
        str(out["backing-file"]), "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'data.raw'},data_file_raw=on",
        str(out["data-file"]), "1M")
    (d / "data.raw").unlink()  # only the header's reference to a host path matters
    for attempt in range(20):
        try:
            run("qemu-img", "create", "-q", "--object", "secret,id=sec0,data=vmlet", "-f", "qcow2", "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(out["encrypted"]), "1M")
            break
        except RuntimeError as e:
            if "accurate CPU usage" not in str(e) or attempt == 19:
                raise
    run("qemu-img", "create", "-q", "-f", "qcow2", str(out["huge"]), "256T")
    return out


def make_image(path: Path, size: str, writes: list[tuple[int, int, int]]) -> TestImage:
    """A qcow2 of virtual `size` with `writes` = [(pattern byte, offset, length)] written by qemu-io."""
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), size)
    for pattern, offset, length in writes:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x{pattern:02x} {offset} {length}", str(path))
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "qcow2", str(path)))
    return TestImage(path, "qcow2", "sha256:" + sha256_of(path), int(info["virtual-size"]))


@pytest.fixture
def image_a(tmp_path: Path, qemu_tools) -> TestImage:
    """8 MiB virtual: 0xab in the first MiB, 0xcd at 5 MiB (data away from the start, holes between)."""
    return make_image(tmp_path / "a.qcow2", "8M", [(0xab, 0, MIB), (0xcd, 5 * MIB, 512 * 1024)])


@pytest.fixture
def image_b(tmp_path: Path, qemu_tools) -> TestImage:
    """Another image of the same size, other bytes: what a re-image writes."""
    return make_image(tmp_path / "b.qcow2", "8M", [(0x5a, 0, 2 * MIB), (0x33, 7 * MIB, MIB)])


def compare(base: TestImage, target_opts: str) -> subprocess.CompletedProcess:
    """qemu-img compare of the image against what the guest would see (qemu image options); exit 0 =
    identical (a larger target must be zero beyond the image)."""
    return subprocess.run(["qemu-img", "compare", "-U", "--image-opts",
                           f"driver={base.format},file.filename={base.path}", target_opts],
                          capture_output=True, text=True, timeout=120)


def raw_opts(path: Path, offset: int = 0, size: int | None = None, block: bool = False) -> str:
    opts = f"driver=raw,offset={offset}" + (f",size={size}" if size is not None else "")
    return opts + f",file.driver={'host_device' if block else 'file'},file.filename={path}"


CRASH_CHILD = """
import json, sys
from pathlib import Path
from cri_shim.storage import persistent_root
kw = json.loads(sys.argv[2])
for key in ("volume_dir", "device", "base"):
    if key in kw:
        kw[key] = Path(kw[key])
getattr(persistent_root, sys.argv[1])(**kw)
print("returned")
"""


def crash_at(point: str, func: str, **kwargs) -> subprocess.CompletedProcess:
    """Run persistent_root.<func>(**kwargs) in a child that SIGKILLs itself at crashpoint `point`."""
    env = {**os.environ, "VMLET_CRASHPOINT": point, "PYTHONPATH": str(REPO)}
    args = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    return subprocess.run([sys.executable, "-c", CRASH_CHILD, func, json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
