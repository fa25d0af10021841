"""configVolume ISOs from kubelet-style volume directories: real files, real pycdlib, and isoinfo (genisoimage)
to read the image back the way other tools do."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pycdlib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cri_shim.storage import config_iso
from cri_shim.storage.config_iso import ConfigISOError, Limits
from cri_shim.storage.iso9660 import joliet_name_ok
from tests.support.prereq import require

LABEL = "CONFIG_APP"


# ---- a volume written the way the kubelet's AtomicWriter writes one

def atomic_write(vol: Path, payload: dict[str, bytes], *, mode: int = 0o644, reverse: bool = False,
                 keep_old: bool = False) -> Path:
    """Write `payload` (relative path -> bytes) like pkg/volume/util/atomic_writer.go: a new timestamped
    directory holding the files, `..data` swapped to it through `..data_tmp`, a `key -> ..data/key` link per
    top-level name, stale links and the old timestamped directory removed. `reverse` creates everything in
    the opposite order."""
    vol.mkdir(parents=True, exist_ok=True)
    data_link = vol / "..data"
    old_ts = os.readlink(data_link) if data_link.is_symlink() else None
    stamp = datetime.now(timezone.utc).strftime("..%Y_%m_%d_%H_%M_%S.")
    ts_dir = Path(tempfile.mkdtemp(prefix=stamp, dir=vol))
    ts_dir.chmod(0o755)
    for rel in sorted(payload, reverse=reverse):
        path = ts_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload[rel])
        path.chmod(mode)
    tmp_link = vol / "..data_tmp"
    tmp_link.symlink_to(ts_dir.name)
    tmp_link.rename(data_link)
    top = {rel.split("/")[0] for rel in payload}
    for name in sorted(top, reverse=reverse):
        if not (vol / name).is_symlink():
            (vol / name).symlink_to(f"..data/{name}")
    for entry in vol.iterdir():
        if not entry.name.startswith("..") and entry.name not in top:
            entry.unlink()
    if old_ts and not keep_old:
        shutil.rmtree(vol / old_ts)
    return ts_dir


def read_rr(data: bytes) -> dict[str, bytes]:
    """Every file of the ISO by its Rock Ridge path."""
    return {path: content for path, (content, _mode) in read_rr_modes(data).items()}


def read_rr_modes(data: bytes) -> dict[str, tuple[bytes, int]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        facade = iso.get_rock_ridge_facade()
        files = {}
        for dirpath, _dirs, names in facade.walk("/"):
            for name in names:
                path = f"{dirpath.rstrip('/')}/{name}"
                out = io.BytesIO()
                facade.get_file_from_iso_fp(out, path)
                mode = facade.get_record(path).rock_ridge.get_file_mode()
                files[path.lstrip("/")] = (out.getvalue(), mode)
        return files
    finally:
        iso.close()


def read_joliet(data: bytes) -> dict[str, bytes]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        facade = iso.get_joliet_facade()
        files = {}
        for dirpath, _dirs, names in facade.walk("/"):
            for name in names:
                path = f"{dirpath.rstrip('/')}/{name}"
                out = io.BytesIO()
                facade.get_file_from_iso_fp(out, path)
                files[path.lstrip("/")] = out.getvalue()
        return files
    finally:
        iso.close()


def volume_label(data: bytes) -> str:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        return iso.pvd.volume_identifier.decode().strip()
    finally:
        iso.close()


# `isoinfo -l` lines: mode, links, uid, gid, size, date, [extent flags], name
_LISTING_RE = re.compile(r"^([-dlrwx]{10})\s+\d+\s+\d+\s+\d+\s+(\d+)\s+(\w{3}\s+\d+\s+\d{4})\s+\[\s*\d+\s+\d+\]\s\s(.*) $")


def isoinfo_listing(iso_file: Path, tree: str) -> dict[str, tuple[str, int, str]]:
    """isoinfo's view of one tree (`-R` Rock Ridge, `-J` Joliet): path -> (mode, size, date), '.'/'..' left out."""
    require(shutil.which("isoinfo") is not None, "isoinfo not installed (Debian: genisoimage)")
    out = subprocess.run(["isoinfo", tree, "-l", "-i", str(iso_file)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    entries, current = {}, None
    for line in out.splitlines():
        if line.startswith("Directory listing of "):
            current = line[len("Directory listing of "):]
            continue
        m = _LISTING_RE.match(line)
        if m is None:
            assert not line.strip(), f"unexpected isoinfo line {line!r}"
            continue
        mode, size, date, name = m.groups()
        if name not in (".", ".."):
            entries[(current + name).lstrip("/")] = (mode, int(size), date)
    return entries


def isoinfo_extract(iso_file: Path, tree: str, path: str) -> bytes:
    return subprocess.run(["isoinfo", tree, "-i", str(iso_file), "-x", "/" + path], capture_output=True,
                          check=True, timeout=60).stdout


PAYLOAD = {
    "app.properties": b"color=blue\nsize=3\n",
    "secret.bin": bytes(range(256)) * 9,
    "empty": b"",
    "nested/deeper/file.txt": b"deep\n",
    "nested/other": "héllo ✓\n".encode(),
}


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    vol = tmp_path / "vol"
    atomic_write(vol, PAYLOAD)
    return vol


# ---- the kubelet layout

def test_kubelet_layout_read_back_by_rock_ridge_name(volume):
    assert config_iso.files_of(volume) == sorted(PAYLOAD.items())
    image = config_iso.build(volume, volume_label=LABEL)
    assert read_rr(image) == PAYLOAD  # no ..data, no timestamped directory
    assert volume_label(image) == LABEL


def test_joliet_tree_holds_the_same_files(volume):
    assert read_joliet(config_iso.build(volume, volume_label=LABEL)) == PAYLOAD


def test_rock_ridge_modes_keep_the_read_and_execute_bits(tmp_path):
    secret, config, script = tmp_path / "secret", tmp_path / "config", tmp_path / "script"
    atomic_write(secret, {"token": b"t"}, mode=0o400)
    atomic_write(config, {"a": b"a"}, mode=0o644)
    atomic_write(script, {"run.sh": b"#!/bin/sh\n"}, mode=0o4775)  # setuid and write bits are dropped
    modes = {name: read_rr_modes(config_iso.build(vol, volume_label=LABEL))
             for name, vol in (("secret", secret), ("config", config), ("script", script))}
    assert modes["secret"]["token"][1] == 0o100400
    assert modes["config"]["a"][1] == 0o100444
    assert modes["script"]["run.sh"][1] == 0o100555


def test_empty_volume_gives_an_iso_without_files(tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "emptydir").mkdir()  # holds no file: leaves no trace
    assert config_iso.files_of(vol) == []
    image = config_iso.build(vol, volume_label=LABEL)
    assert read_rr(image) == {} and read_joliet(image) == {}
    iso_file = tmp_path / "empty.iso"
    iso_file.write_bytes(image)
    assert isoinfo_listing(iso_file, "-R") == {}


def test_update_gives_the_new_content(tmp_path):
    vol = tmp_path / "vol"
    atomic_write(vol, {"a": b"one", "b": b"gone soon", "d/x": b"x1"})
    before = config_iso.build(vol, volume_label=LABEL)
    assert read_rr(before) == {"a": b"one", "b": b"gone soon", "d/x": b"x1"}
    # The old timestamped directory is still there (a kubelet that died before cleaning up): ignored.
    atomic_write(vol, {"a": b"two", "c": b"new", "d/x": b"x2"}, keep_old=True)
    assert read_rr(config_iso.build(vol, volume_label=LABEL)) == {"a": b"two", "c": b"new", "d/x": b"x2"}


# ---- determinism

@pytest.fixture
def other_time_zone():
    """A zone half an hour off the hour (POSIX TZ string: no tzdata needed); restored afterwards."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "IST-5:30"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_same_bytes_for_other_orders_times_and_zones(tmp_path, request):
    first, second = tmp_path / "first", tmp_path / "second"
    atomic_write(first, PAYLOAD)
    image = config_iso.build(first, volume_label=LABEL)
    time.sleep(1.1)  # the records' clock has whole seconds
    atomic_write(second, PAYLOAD, reverse=True)  # other creation order, other timestamped directory name
    assert sorted(os.listdir(first)) != sorted(os.listdir(second))
    request.getfixturevalue("other_time_zone")
    assert config_iso.build(second, volume_label=LABEL) == image


def test_every_timestamp_is_the_fixed_one(volume, tmp_path):
    image = config_iso.build(volume, volume_label=LABEL)
    iso_file = tmp_path / "v.iso"
    iso_file.write_bytes(image)
    for tree in ("-R", "-J"):
        assert {date for _mode, _size, date in isoinfo_listing(iso_file, tree).values()} == {"Jan  1 1970"}
    # ECMA-119 8.4: volume descriptors from sector 16; creation, modification, effective date at 813, 830, 864.
    sector, seen = 16, []
    while image[sector * 2048] != 255:
        vd = image[sector * 2048:(sector + 1) * 2048]
        assert vd[1:6] == b"CD001"
        if vd[0] in (1, 2):
            seen.append(vd[0])
            for offset in (813, 830, 864):
                assert vd[offset:offset + 17] == b"1970010100000000\x00"
        sector += 1
    assert seen.count(1) == 1 and seen.count(2) >= 1  # the primary and Joliet's (and level 4's) descriptors


# ---- hostile directories

def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A volume with one good key (`good`), and its timestamped directory for the test to add to."""
    vol = tmp_path / "vol"
    ts_dir = atomic_write(vol, {"good": b"ok"})
    return vol, ts_dir


def refused(vol: Path, *patterns: str) -> str:
    with pytest.raises(ConfigISOError) as info:
        config_iso.files_of(vol)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), message
    with pytest.raises(ConfigISOError):  # build refuses the same way
        config_iso.build(vol, volume_label=LABEL)
    return message


def test_symlink_to_an_absolute_path_outside(tmp_path):
    vol, _ = hostile(tmp_path)
    (vol / "shadow").symlink_to("/etc/shadow")
    message = refused(vol, r"'shadow'", "outside the volume", "'/etc/shadow'")
    assert str(tmp_path) not in message  # the host's path of the volume stays out of the pod's events


@pytest.mark.parametrize("target", ["../outside.txt", "../../x", "..data/../../outside.txt"])
def test_symlink_relative_outside(tmp_path, target):
    vol, _ = hostile(tmp_path)
    (tmp_path / "outside.txt").write_bytes(b"host secret")
    (vol / "key").symlink_to(target)
    refused(vol, r"'key'", "outside the volume")


def test_internal_link_pointing_outside(tmp_path):
    """A visible key into `..data`, with `..data` itself swapped to /etc: still outside."""
    vol, _ = hostile(tmp_path)
    (vol / "..data").unlink()
    (vol / "..data").symlink_to("/etc")
    (vol / "good").unlink()
    (vol / "passwd").symlink_to("..data/passwd")
    refused(vol, r"'passwd'", "outside the volume")


def test_directory_link_outside(tmp_path):
    vol, _ = hostile(tmp_path)
    (vol / "etc").symlink_to("/etc")
    refused(vol, r"'etc'", "outside the volume")


def test_symlink_loop(tmp_path):
    vol, _ = hostile(tmp_path)
    (vol / "a").symlink_to("b")
    (vol / "b").symlink_to("a")
    refused(vol, r"'a'", "loop")


def test_self_loop(tmp_path):
    vol, _ = hostile(tmp_path)
    (vol / "self").symlink_to("self")
    refused(vol, r"'self'", "loop")


def test_dangling_symlink(tmp_path):
    vol, _ = hostile(tmp_path)
    (vol / "missing").symlink_to("..data/missing")
    refused(vol, r"'missing'", "dangling")


def test_directory_link_to_the_volume_itself(tmp_path):
    vol, _ = hostile(tmp_path)
    (vol / "again").symlink_to(".")
    refused(vol, r"'again'", "loop")


def test_directory_loop_inside_the_data(tmp_path):
    vol, ts_dir = hostile(tmp_path)
    (ts_dir / "sub").mkdir()
    (ts_dir / "sub" / "up").symlink_to("..")
    (vol / "sub").symlink_to("..data/sub")
    refused(vol, r"'sub/up/sub'", "loop")


def test_fifo_is_refused_without_blocking(tmp_path):
    vol, ts_dir = hostile(tmp_path)
    os.mkfifo(vol / "fifo")
    refused(vol, r"'fifo'", "a fifo")
    (vol / "fifo").unlink()
    os.mkfifo(ts_dir / "key")
    (vol / "key").symlink_to("..data/key")
    refused(vol, r"'key'", r"symlink to '..data/key' is a fifo")


def test_socket_is_refused(tmp_path, monkeypatch):
    vol, _ = hostile(tmp_path)
    monkeypatch.chdir(vol)  # a relative name: the socket path limit is 108 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")
        refused(vol, r"'sock'", "a socket")


def test_device_is_refused(tmp_path):
    vol, ts_dir = hostile(tmp_path)
    try:
        os.mknod(ts_dir / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        require(False, "mknod needs CAP_MKNOD")
    (vol / "null").symlink_to("..data/null")
    refused(vol, r"'null'", "character device")


def test_name_that_is_not_utf8(tmp_path):
    vol, ts_dir = hostile(tmp_path)
    (ts_dir / "latin1").mkdir()
    with open(os.fsencode(ts_dir / "latin1") + b"/caf\xe9", "wb") as f:
        f.write(b"x")
    (vol / "latin1").symlink_to("..data/latin1")
    refused(vol, r"latin1/caf\\xe9", "not UTF-8")


def test_absolute_link_that_stays_inside_is_followed(tmp_path):
    vol, ts_dir = hostile(tmp_path)
    (vol / "alias").symlink_to(ts_dir / "good")
    assert config_iso.files_of(vol) == [("alias", b"ok"), ("good", b"ok")]


def test_a_link_swapped_in_after_resolution_is_not_followed(tmp_path):
    """The open after resolving goes component by component with O_NOFOLLOW: a directory replaced by a
    link to /etc between the check and the open is refused, not followed."""
    vol, ts_dir = hostile(tmp_path)
    (ts_dir / "d").symlink_to("/etc")
    walk = config_iso._Walk(os.open(vol, os.O_RDONLY | os.O_DIRECTORY), os.path.realpath(vol), Limits())
    try:
        with pytest.raises(ConfigISOError, match="'key': .*changed while being read"):
            walk._open_inside((ts_dir.name, "d", "passwd"), "key", "")
        with pytest.raises(ConfigISOError, match="'key': .*symlink"):
            walk._open_inside((ts_dir.name, "d"), "key", "")
    finally:
        os.close(walk.root_fd)


def test_volume_directory_missing_or_not_a_directory(tmp_path):
    with pytest.raises(ConfigISOError, match="No such file"):
        config_iso.files_of(tmp_path / "nope")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigISOError, match="Not a directory"):
        config_iso.files_of(tmp_path / "file")


# ---- limits

def test_max_files(tmp_path):
    vol = tmp_path / "vol"
    atomic_write(vol, {"a": b"", "b": b"", "c": b""})
    assert len(config_iso.files_of(vol, Limits(max_files=3))) == 3
    atomic_write(vol, {"a": b"", "b": b"", "c": b"", "d": b""})
    with pytest.raises(ConfigISOError, match=r"more than 3 files and directories \(limit max_files=3\)"):
        config_iso.files_of(vol, Limits(max_files=3))
    # directories count too: d/ and d/x are two
    atomic_write(vol, {"a": b"", "d/x": b""})
    with pytest.raises(ConfigISOError, match="'d/x'.*more than 2"):
        config_iso.files_of(vol, Limits(max_files=2))


def test_max_file_bytes(tmp_path):
    vol = tmp_path / "vol"
    atomic_write(vol, {"ten": b"0123456789"})
    assert config_iso.files_of(vol, Limits(max_file_bytes=10)) == [("ten", b"0123456789")]
    atomic_write(vol, {"eleven": b"0123456789a"})
    with pytest.raises(ConfigISOError, match=r"'eleven': larger than 10 bytes \(limit max_file_bytes\)"):
        config_iso.files_of(vol, Limits(max_file_bytes=10))


def test_huge_sparse_file_is_refused_without_reading_it(tmp_path):
    vol, ts_dir = hostile(tmp_path)
    with open(ts_dir / "huge", "wb") as f:
        f.truncate(1 << 40)
    (vol / "huge").symlink_to("..data/huge")
    started = time.monotonic()
    refused(vol, r"'huge'", f"larger than {16 * 1024 * 1024} bytes")
    assert time.monotonic() - started < 5


def test_max_total_bytes(tmp_path):
    vol = tmp_path / "vol"
    atomic_write(vol, {"a": b"x" * 8, "b": b"y" * 7})
    assert len(config_iso.files_of(vol, Limits(max_total_bytes=15))) == 2
    atomic_write(vol, {"a": b"x" * 8, "b": b"y" * 8})
    with pytest.raises(ConfigISOError, match=r"'b': the files so far hold 16 bytes, more than 15"):
        config_iso.files_of(vol, Limits(max_total_bytes=15))


def test_max_depth(tmp_path):
    vol = tmp_path / "vol"
    atomic_write(vol, {"a/b/c": b"3"})
    assert config_iso.files_of(vol, Limits(max_depth=3)) == [("a/b/c", b"3")]
    atomic_write(vol, {"a/b/c/d": b"4"})
    with pytest.raises(ConfigISOError, match=r"'a/b/c/d': 4 levels deep \(limit max_depth=3\)"):
        config_iso.files_of(vol, Limits(max_depth=3))


def test_sixteen_levels_deep_without_relocation(tmp_path):
    """The default depth fits: no 'rr_moved' directory appears next to the volume's names."""
    deep = "/".join(f"d{i}" for i in range(15)) + "/leaf"
    vol = tmp_path / "vol"
    atomic_write(vol, {deep: b"deep", "top": b"t"})
    image = config_iso.build(vol, volume_label=LABEL)
    assert read_rr(image) == {deep: b"deep", "top": b"t"}
    assert read_joliet(image) == {deep: b"deep", "top": b"t"}
    iso_file = tmp_path / "deep.iso"
    iso_file.write_bytes(image)
    listing = isoinfo_listing(iso_file, "-R")
    assert listing[deep][1] == 4 and not any("rr_moved" in path.lower() for path in listing)


@pytest.mark.parametrize("field", ["max_files", "max_total_bytes", "max_file_bytes", "max_depth"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_bad_limits(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field}"):
        Limits(**{field: value})


# ---- the volume label

@pytest.mark.parametrize("label", ["CONFIG_APP", "A", "X" * 32, "DISK_0_CFG"])
def test_good_labels(tmp_path, label):
    vol = tmp_path / "vol"
    atomic_write(vol, {"k": b"v"})
    assert volume_label(config_iso.build(vol, volume_label=label)) == label


@pytest.mark.parametrize("label", ["", "config", "CONFIG-APP", "X" * 33, "CONFIG APP", "CONFÌG", "A\n", None, 7])
def test_bad_labels(tmp_path, label):
    vol = tmp_path / "vol"
    atomic_write(vol, {"k": b"v"})
    with pytest.raises(ConfigISOError, match="volume_label"):
        config_iso.build(vol, volume_label=label)


# ---- names Joliet cannot hold

LONG_KEY = "a-very-long-configmap-key." + "x" * 74  # 100 characters: a valid key, over Joliet's 64


def test_names_joliet_cannot_hold_are_in_rock_ridge_only(tmp_path):
    vol = tmp_path / "vol"
    payload = {LONG_KEY: b"long", "a:b": b"colon", "semi;1": b"version-like", "short": b"s",
               "dir:x/inner": b"under a Rock Ridge-only directory", "é" * 40: b"80 bytes of UTF-8"}
    atomic_write(vol, payload)
    image = config_iso.build(vol, volume_label=LABEL)
    assert read_rr(image) == payload
    assert read_joliet(image) == {"short": b"s"}
    iso_file = tmp_path / "names.iso"
    iso_file.write_bytes(image)
    assert set(isoinfo_listing(iso_file, "-J")) == {"short"}


# ---- read by another tool

def test_isoinfo_sees_the_names_sizes_and_contents(volume, tmp_path):
    iso_file = tmp_path / "v.iso"
    iso_file.write_bytes(config_iso.build(volume, volume_label=LABEL))
    for tree in ("-R", "-J"):
        listing = isoinfo_listing(iso_file, tree)
        files = {path: size for path, (mode, size, _date) in listing.items() if not mode.startswith("d")}
        assert files == {path: len(content) for path, content in PAYLOAD.items()}, tree
        assert {path for path, (mode, _s, _d) in listing.items() if mode.startswith("d")} == \
            {"nested", "nested/deeper"}
        for path, content in PAYLOAD.items():
            assert isoinfo_extract(iso_file, tree, path) == content, (tree, path)
    assert isoinfo_listing(iso_file, "-R")["app.properties"][0] == "-r--r--r--"
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso_file)], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert f"Volume id: {LABEL}\n" in info
    assert "Rock Ridge signatures" in info and "Joliet" in info


# ---- any kubelet-style payload round-trips

_component = st.text(alphabet="abcXYZ019-._", min_size=1, max_size=70).filter(
    lambda s: s != "." and not s.startswith(".."))
_payloads = st.dictionaries(
    st.lists(_component, min_size=1, max_size=4).map("/".join),
    st.binary(max_size=300), min_size=0, max_size=12,
).filter(lambda d: not any(a != b and b.startswith(a + "/") for a in d for b in d))  # a file is no directory


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_payloads)
def test_any_payload_round_trips(payload):
    with tempfile.TemporaryDirectory() as tmp:
        vol = Path(tmp) / "vol"
        atomic_write(vol, payload)
        assert config_iso.files_of(vol) == sorted(payload.items(), key=lambda kv: kv[0].encode())
        assert read_rr(config_iso.build(vol, volume_label=LABEL)) == payload


# Any name Linux can hold (UTF-8, no '/' or NUL, up to 255 bytes): Rock Ridge keeps it, Joliet keeps the ones
# it can hold (cri_shim/storage/iso9660.joliet_name_ok), and nothing crashes inside pycdlib.
_any_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                    max_size=90).filter(lambda s: s != "." and not s.startswith("..") and len(s.encode()) <= 255)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(_any_name, min_size=1, max_size=6, unique=True))
def test_any_file_name(names):
    payload = {name: name.encode() for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        vol = Path(tmp) / "vol"
        atomic_write(vol, payload)
        image = config_iso.build(vol, volume_label=LABEL)
    assert read_rr(image) == payload
    assert read_joliet(image) == {name: data for name, data in payload.items() if joliet_name_ok(name)}
