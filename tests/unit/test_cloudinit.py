"""cloudinit builds NoCloud / ConfigDrive ISOs; read back with pycdlib (no mount needed)."""

import io
import json

import pycdlib
import pytest
import yaml

from cri_shim import cloudinit


def read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    label = iso.pvd.volume_identifier.decode().strip()
    files = {}
    facade = iso.get_rock_ridge_facade()
    for dirpath, _dirs, names in facade.walk("/"):
        for name in names:
            path = f"{dirpath.rstrip('/')}/{name}"
            out = io.BytesIO()
            facade.get_file_from_iso_fp(out, path)
            files[path.lstrip("/")] = out.getvalue()
    iso.close()
    return label, files


def test_nocloud_layout():
    label, files = read_iso(cloudinit.build_iso("nocloud", "uid-1", "web-0", "#!/bin/sh\necho hi\n",
                                                {"version": 2, "ethernets": {}}))
    assert label == "cidata"
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "uid-1", "local-hostname": "web-0"}
    assert files["user-data"] == b"#!/bin/sh\necho hi\n"
    assert yaml.safe_load(files["network-config"]) == {"version": 2, "ethernets": {}}


def test_nocloud_always_has_user_data_and_no_network_config_unless_given():
    _, files = read_iso(cloudinit.build_iso("nocloud", "uid-1", "web-0"))
    assert files["user-data"] == b""
    assert "network-config" not in files


def test_configdrive_layout():
    label, files = read_iso(cloudinit.build_iso("configdrive", "uid-2", "db-1", "#cloud-config\n{}\n"))
    assert label == "config-2"
    assert json.loads(files["openstack/latest/meta_data.json"])["uuid"] == "uid-2"
    assert json.loads(files["openstack/latest/meta_data.json"])["hostname"] == "db-1"
    assert files["openstack/latest/user_data"] == b"#cloud-config\n{}\n"


def test_hostile_metadata_stays_data():
    hostile = "x\ninstance-id: evil\n"
    _, files = read_iso(cloudinit.build_iso("nocloud", hostile, "h"))
    assert yaml.safe_load(files["meta-data"])["instance-id"] == hostile


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match="nocloud or configdrive"):
        cloudinit.build_iso("iso", "u", "h")
