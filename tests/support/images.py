"""Test images: the project's bootable test VM, and hostile variants made with qemu-img.

The bootable image is built by deploy/images/build-test-image.sh (cached,
rebuilt when its recipe changes). The hostile ones are what an image service
must refuse: each is a small file that lies about something.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "deploy" / "images" / "build-test-image.sh"


def build_test_image() -> Path:
    """Build (or reuse) the test VM image; return the qcow2's path."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"test image build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    if not path.is_file():
        raise RuntimeError(f"test image build printed {path}, which does not exist")
    return path


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def make_hostile_images(directory: Path) -> dict[str, Path]:
    """Images that must be rejected, by the reason they must be rejected for."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    # A backing file pointing at a host file: booting it would leak the host's data.
    out["backing-file"] = directory / "backing-file.qcow2"
    _qemu_img("create", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", str(out["backing-file"]), "1M")

    # An external data file: the image's contents live in a host path.
    data_file = directory / "data-file.raw"
    out["data-file"] = directory / "data-file.qcow2"
    _qemu_img("create", "-f", "qcow2", "-o", f"data_file={data_file},data_file_raw=on", str(out["data-file"]), "1M")
    data_file.unlink()  # only the header's reference to it matters

    # Encrypted: the runtime has no key, and LUKS headers make qemu-img work hard.
    out["encrypted"] = directory / "encrypted.qcow2"
    # qemu-img's PBKDF benchmark fails now and then ("Unable to get accurate CPU usage") when its first round
    # takes under a millisecond of CPU: retried.
    for attempt in range(20):
        try:
            _qemu_img("create", "--object", "secret,id=sec0,data=vmlet", "-f", "qcow2", "-o",
                      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(out["encrypted"]), "1M")
            break
        except subprocess.CalledProcessError as e:
            if b"accurate CPU usage" not in (e.stderr or b"") or attempt == 19:
                raise

    # A 4 MiB file claiming 256 TiB of virtual size.
    out["huge"] = directory / "huge.qcow2"
    _qemu_img("create", "-f", "qcow2", str(out["huge"]), "256T")

    # Not an image at all (qemu-img calls random bytes "raw": the service must not).
    out["not-an-image"] = directory / "not-an-image.bin"
    out["not-an-image"].write_bytes(b"<html>this is not a disk image</html>\n" + os.urandom(64 * 1024))

    # A vmdk: a real image format, but not one vmlet accepts.
    out["vmdk"] = directory / "disk.vmdk"
    _qemu_img("create", "-f", "vmdk", str(out["vmdk"]), "1M")

    # A well-formed small qcow2 and raw image, for positive tests.
    out["small-qcow2"] = directory / "small.qcow2"
    _qemu_img("create", "-f", "qcow2", str(out["small-qcow2"]), "16M")
    return out
