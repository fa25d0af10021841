"""Image validation: our header checks on crafted bytes, the qemu-img checks on crafted info, limits applied."""

import shutil
import struct

import pytest

from tests.support.prereq import require

from image_service.errors import ImageRejected
from image_service.validate import Validator

@pytest.fixture
def qemu_img():
    require(shutil.which("qemu-img") is not None, "qemu-img not installed (run deploy/setup-host.sh)")


needs_qemu_img = pytest.mark.usefixtures("qemu_img")


def qcow2_header(version=3, backing=0, crypt=0, size=1 << 30, incompat=0) -> bytes:
    h = bytearray(4096)
    struct.pack_into(">4sIQIIQI", h, 0, b"QFI\xfb", version, backing, 12 if backing else 0, 16, size, crypt)
    struct.pack_into(">Q", h, 72, incompat)
    if backing:
        h[backing:backing + 12] = b"/etc/shadow\x00"
    return bytes(h)


@pytest.mark.parametrize("header, reason", [
    (qcow2_header(backing=512), "backing file ('/etc/shadow"),
    (qcow2_header(crypt=1), "encrypted (AES)"),
    (qcow2_header(crypt=2), "encrypted (LUKS)"),
    (qcow2_header(incompat=1 << 2), "external data file"),
    (qcow2_header(incompat=1 << 1), "marked corrupt"),
    (qcow2_header(incompat=1 << 9), "unknown incompatible features"),
    (qcow2_header(version=1), "unsupported qcow2 version 1"),
    (qcow2_header(size=1 << 50), "virtual size 1.0 PiB"),
    (b"QFI\xfb\x00\x00", "truncated qcow2 header"),
    (b"", "the file is empty"),
    (b"KDMV" + bytes(1020), "format vmdk is not accepted"),
    (b"conectix" + bytes(1016), "format vpc (vhd) is not accepted"),
    (b"<!DOCTYPE html><html>404</html>" + bytes(1024), "HTML"),
    (b"\x1f\x8b\x08" + bytes(1021), "gzip"),
    (bytes(1024), "no qcow2 header and no MBR or GPT"),
    (bytes(510) + b"\x55\xaa" + bytes(100), "not a multiple of 512"),
])
def test_header_checks_refuse_before_qemu_img_runs(tmp_path, header, reason):
    f = tmp_path / "image"
    f.write_bytes(header)
    with pytest.raises(ImageRejected) as e:
        Validator(qemu_img="/nonexistent/qemu-img").validate(f)  # never reached
    assert reason in str(e.value)


GOOD = {"format": "qcow2", "virtual-size": 1 << 20, "format-specific": {"type": "qcow2", "data": {"corrupt": False}}}


@pytest.mark.parametrize("change, reason", [
    ({"format": "raw"}, "reads it as 'raw'"),
    ({"backing-filename": "/etc/shadow"}, "backing file"),
    ({"full-backing-filename": "/etc/shadow"}, "backing file"),
    ({"format-specific": {"data": {"data-file": "/dev/sda"}}}, "external data file"),
    ({"encrypted": True}, "encrypted"),
    ({"format-specific": {"data": {"encrypt": {"format": "luks"}}}}, "encrypted"),
    ({"format-specific": {"data": {"corrupt": True}}}, "corrupt"),
    ({"virtual-size": 1 << 50}, "exceeds the limit"),
    ({"virtual-size": None}, "no virtual size"),
])
def test_qemu_img_info_checks_are_independent_of_the_header_checks(change, reason):
    with pytest.raises(ImageRejected, match=reason):
        Validator()._check_info({**GOOD, **change}, "qcow2")
    Validator()._check_info(GOOD, "qcow2")


@needs_qemu_img
def test_qemu_img_runs_under_resource_limits(tmp_path):
    import subprocess
    f = tmp_path / "ok.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(f), "16M"], check=True, capture_output=True)
    assert Validator().validate(f).virtual_size == 16 << 20
    # An address-space limit too small for qemu-img to start proves the limit is applied to it.
    with pytest.raises(ImageRejected, match="qemu-img"):
        Validator(address_space=4 << 20).validate(f)


@needs_qemu_img
def test_raw_disk_with_mbr_is_accepted_and_size_cap_applies(tmp_path):
    f = tmp_path / "disk.raw"
    data = bytearray(1 << 20)
    data[510:512] = b"\x55\xaa"
    f.write_bytes(bytes(data))
    info = Validator().validate(f)
    assert (info.format, info.virtual_size) == ("raw", 1 << 20)
    with pytest.raises(ImageRejected, match="virtual size 1.0 MiB"):
        Validator(max_virtual_size=1 << 19).validate(f)
    gpt = bytearray(1 << 20)
    gpt[512:520] = b"EFI PART"
    f.write_bytes(bytes(gpt))
    assert Validator().validate(f).format == "raw"


def fake_qemu_img(tmp_path, body: str):
    script = tmp_path / "qemu-img"
    script.write_text(f"#!/bin/bash\n{body}\n")
    script.chmod(0o755)
    image = tmp_path / "image.qcow2"
    image.write_bytes(qcow2_header())
    return str(script), image


def test_cpu_limit_kills_a_spinning_qemu_img(tmp_path):
    script, image = fake_qemu_img(tmp_path, "while :; do :; done")
    with pytest.raises(ImageRejected, match="exceeded its resource limits"):
        Validator(qemu_img=script, cpu_seconds=1, wall_timeout=20).validate(image)


def test_wall_timeout_stops_a_hanging_qemu_img(tmp_path):
    script, image = fake_qemu_img(tmp_path, "exec sleep 30")
    with pytest.raises(ImageRejected, match="longer than 0.5s"):
        Validator(qemu_img=script, wall_timeout=0.5).validate(image)


@pytest.mark.parametrize("output, reason", [("not json", "invalid JSON"), ("{}", "reads it as None")])
def test_unexpected_qemu_img_output_is_a_rejection(tmp_path, output, reason):
    script, image = fake_qemu_img(tmp_path, f"echo '{output}'")
    with pytest.raises(ImageRejected, match=reason):
        Validator(qemu_img=script).validate(image)


# ---------------------------------------------------------------- validate_volume_image (disk.img on a volume)

@pytest.mark.parametrize("header, reason", [
    (qcow2_header(backing=512), "backing file ('/etc/shadow"),
    (qcow2_header(crypt=2), "encrypted (LUKS)"),
    (qcow2_header(incompat=1 << 2), "external data file"),
    (qcow2_header(incompat=1 << 1), "marked corrupt"),
    (qcow2_header(size=1 << 50), "virtual size 1.0 PiB"),
    (bytes(510) + b"\x55\xaa" + bytes(512), "not a qcow2 image"),
])
def test_volume_qcow2_header_checks_refuse_before_qemu_img_runs(tmp_path, header, reason):
    f = tmp_path / "disk.img"
    f.write_bytes(header)
    with pytest.raises(ImageRejected) as e:
        Validator(qemu_img="/nonexistent/qemu-img").validate_volume_image(f, "qcow2")  # never reached
    assert reason in str(e.value)


@pytest.mark.parametrize("size", [512, 1 << 20, 3 * 512])
def test_volume_raw_needs_no_partition_table_and_no_qemu_img(tmp_path, size):
    f = tmp_path / "disk.img"
    f.write_bytes(b"QFI\xfb" + bytes(size - 4))  # a qcow2 header a guest wrote: raw is what the caller says
    info = Validator(qemu_img="/nonexistent/qemu-img", max_virtual_size=1).validate_volume_image(f, "raw")
    assert (info.format, info.virtual_size) == ("raw", size)


@pytest.mark.parametrize("size", [0, 1, 1000])
def test_volume_raw_of_a_size_no_disk_has_is_refused(tmp_path, size):
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(size))
    with pytest.raises(ImageRejected, match=f"raw disk size {size} bytes is not a positive multiple of 512"):
        Validator().validate_volume_image(f, "raw")


def test_volume_image_of_another_format_is_a_caller_error(tmp_path):
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(512))
    with pytest.raises(ValueError, match="'vmdk' is not raw or qcow2"):
        Validator().validate_volume_image(f, "vmdk")


@needs_qemu_img
def test_volume_qcow2_goes_through_qemu_img_under_limits(tmp_path):
    import subprocess
    f = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(f), "16M"], check=True, capture_output=True)
    assert Validator().validate_volume_image(f, "qcow2").virtual_size == 16 << 20
    with pytest.raises(ImageRejected, match="qemu-img"):
        Validator(address_space=4 << 20).validate_volume_image(f, "qcow2")
