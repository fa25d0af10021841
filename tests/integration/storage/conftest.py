"""Fixtures for the node's storage: filesystem volumes (directories; small file systems as tmpfs mounts;
ext4 file systems made with mkfs.ext4 on loop devices, as a CSI driver makes a claim's, also read-only),
block volumes (loop devices on sparse files), small qcow2 test images with known contents, a child
process that runs a storage call and dies at a crashpoint, and one that runs a call while the test waits.

Everything a fixture makes goes in its finalizer, also when the test fails: mounts are unmounted and loop
devices detached (a leaked loop device outlives the test run).
"""

from __future__ import annotations

import dataclasses
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

from image_service.validate import Validator
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
        _unmount(d)
        shutil.rmtree(d, ignore_errors=True)


def _unmount(d: Path) -> None:
    for argv in (["umount", str(d)], ["umount", "-l", str(d)]):
        if os.path.ismount(d):
            subprocess.run(argv, capture_output=True, timeout=60)


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """ext4_fs(size, read_only=False, content=None) → the mount point of an ext4 that mkfs.ext4 made on a loop
    device of a sparse file of `size` bytes (defaults, as a CSI driver formats a claim: metadata and 5%
    reserved blocks included), filled from the directory `content` (mkfs.ext4 -d), mounted read-only when
    asked. Unmounted and detached after, also when the test fails."""
    require(os.geteuid() == 0, "needs root (losetup, mount)")
    _need("losetup", "mkfs.ext4")
    made: list[tuple[Path, str, Path]] = []

    def make(size: int, read_only: bool = False, content: Path | None = None) -> Path:
        backing = tmp_path / f"ext4-{len(made)}.raw"
        with open(backing, "wb") as f:
            f.truncate(size)
        run("mkfs.ext4", "-q", *(["-d", str(content)] if content is not None else []), str(backing))
        mnt = Path(tempfile.mkdtemp(prefix="vmlet-test-ext4-"))
        dev = run("losetup", "-f", "--show", *(["-r"] if read_only else []), str(backing)).strip()
        made.append((mnt, dev, backing))
        run("mount", "-t", "ext4", "-o", "ro" if read_only else "rw", dev, str(mnt))
        return mnt

    yield make
    for mnt, dev, _ in made:
        _unmount(mnt)
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
        if not os.path.ismount(mnt):
            shutil.rmtree(mnt, ignore_errors=True)
    left = [line for line in run("losetup", "-a").splitlines() if str(tmp_path) in line]
    assert not left, f"loop devices left attached: {left}"
    assert not any(os.path.ismount(m) for m, _, _ in made), "ext4 file systems left mounted"


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


@dataclasses.dataclass(frozen=True)
class SwapAfterCheck(Validator):
    """The real validator, and then, right after its check passed, what a co-tenant pod on the volume does
    at the worst instant: move disk.img aside (to `keep`, or unlink it) and rename another file in (once)."""

    swap: tuple = ()  # (replacement file, disk.img path)
    keep: Path | None = None  # where the checked file goes; None: it is deleted

    def validate_volume_image(self, path, fmt):
        info = super().validate_volume_image(path, fmt)
        if self.swap and self.swap[0].exists():
            if self.keep is not None:
                os.rename(self.swap[1], self.keep)
            os.rename(*self.swap)
        return info


def qemu_info(path: Path) -> dict:
    """qemu-img info of a qcow2 (-U: also one a VM or a bind holds)."""
    return json.loads(run("qemu-img", "info", "--output=json", "-U", "-f", "qcow2", str(path)))


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


CALL_CHILD = """
import dataclasses, importlib, json, sys
from pathlib import Path
module, _, name = sys.argv[1].rpartition(".")
func = getattr(importlib.import_module("cri_shim.storage." + (module or "persistent_root")), name)
kw = json.loads(sys.argv[2])
for key in ("volume_dir", "device", "base"):
    if key in kw:
        kw[key] = Path(kw[key])
print("calling", flush=True)
try:
    got = func(**kw)
except Exception as e:
    print("raised", type(e).__name__, e, flush=True)
    sys.exit(3)
print("returned", json.dumps(dataclasses.asdict(got) if dataclasses.is_dataclass(got) else got, default=str))
"""


def _child(func: str, kwargs: dict) -> list[str]:
    args = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    return [sys.executable, "-c", CALL_CHILD, func, json.dumps(args)]


def crash_at(point: str, func: str, **kwargs) -> subprocess.CompletedProcess:
    """Run <func>(**kwargs) in a child that SIGKILLs itself at crashpoint `point`; `func` is a function of
    persistent_root, or `volume_image.<name>`."""
    env = {**os.environ, "VMLET_CRASHPOINT": point, "PYTHONPATH": str(REPO)}
    return subprocess.run(_child(func, kwargs), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """spawn(func, **kwargs) → a running child calling <func>(**kwargs) (as crash_at names it) once it has
    printed "calling"; its output ends with "returned <result as JSON>" or "raised <error>". Children still
    running at the end are killed."""
    children: list[subprocess.Popen] = []

    def start(func: str, **kwargs) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("VMLET_CRASHPOINT", None)
        child = subprocess.Popen(_child(func, kwargs), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        children.append(child)
        line = child.stdout.readline()  # "calling", or "" when the child died first
        if line.strip() != "calling":
            child.kill()
            pytest.fail(f"the child calling {func} did not start: {child.communicate(timeout=60)[1]}")
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=60)
