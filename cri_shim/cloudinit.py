"""Cloud-init data disks, built in Python (pycdlib): data in, ISO bytes out.

Two formats, as virtlet's `VirtletCloudInitImageType` offers:
- NoCloud: volume label `cidata`, files `meta-data`, `user-data`, `network-config`.
- ConfigDrive (OpenStack): volume label `config-2`, files under `openstack/latest/`.

Pure: no file system access; the caller writes the bytes where libvirt can
read them. The ISO carries Rock Ridge and Joliet names so guests see the
lower-case, hyphenated file names cloud-init expects.
"""

from __future__ import annotations

import io
import json
from typing import Literal, Mapping

import pycdlib
import yaml

ImageType = Literal["nocloud", "configdrive"]


class _IsoBuilder:
    def __init__(self, volume_label: str) -> None:
        self._iso = pycdlib.PyCdlib()
        self._iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=volume_label)
        self._dir_paths: dict[str, str] = {}  # real path -> ISO9660 path
        self._count = 0

    def _iso_name(self, name: str, is_dir: bool) -> str:
        # ISO9660 level-3 names must be upper-case d-characters; the real
        # names live in the Rock Ridge and Joliet records. A counter keeps
        # the short names unique however the real names collide when mangled.
        self._count += 1
        return f"F{self._count:07d}" if is_dir else f"F{self._count:07d}.;1"

    def _ensure_dir(self, parts: list[str]) -> str:
        iso_path = ""
        for depth in range(1, len(parts) + 1):
            real = "/" + "/".join(parts[:depth])
            if real not in self._dir_paths:
                child = f"{iso_path}/{self._iso_name(parts[depth - 1], True)}"
                self._iso.add_directory(child, rr_name=parts[depth - 1], joliet_path=real)
                self._dir_paths[real] = child
            iso_path = self._dir_paths[real]
        return iso_path

    def add_file(self, path: str, data: bytes) -> None:
        parts = [p for p in path.split("/") if p]
        parent = self._ensure_dir(parts[:-1]) if len(parts) > 1 else ""
        iso_path = f"{parent}/{self._iso_name(parts[-1], False)}"
        self._iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=parts[-1], joliet_path="/" + "/".join(parts))

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        self._iso.write_fp(out)
        self._iso.close()
        return out.getvalue()


def _yaml(data: Mapping) -> bytes:
    return yaml.safe_dump(dict(data), default_flow_style=False, sort_keys=True).encode()


def build_nocloud_iso(
    meta_data: Mapping[str, object],
    user_data: str | None = None,
    network_config: Mapping[str, object] | None = None,
) -> bytes:
    iso = _IsoBuilder("cidata")
    iso.add_file("meta-data", _yaml(meta_data))
    # cloud-init treats a missing user-data as an error on some versions: always write one.
    iso.add_file("user-data", (user_data or "").encode())
    if network_config is not None:
        iso.add_file("network-config", _yaml(network_config))
    return iso.to_bytes()


def build_configdrive_iso(
    meta_data: Mapping[str, object],
    user_data: str | None = None,
    network_data: Mapping[str, object] | None = None,
) -> bytes:
    iso = _IsoBuilder("config-2")
    iso.add_file("openstack/latest/meta_data.json", json.dumps(dict(meta_data), sort_keys=True).encode())
    if user_data:
        iso.add_file("openstack/latest/user_data", user_data.encode())
    if network_data is not None:
        iso.add_file("openstack/latest/network_data.json", json.dumps(dict(network_data), sort_keys=True).encode())
    return iso.to_bytes()


def build_iso(
    image_type: ImageType,
    instance_id: str,
    hostname: str,
    user_data: str | None = None,
    network_config: Mapping[str, object] | None = None,
) -> bytes:
    """The cloud-init disk for one VM, in the format `image_type` names."""
    if image_type == "nocloud":
        return build_nocloud_iso({"instance-id": instance_id, "local-hostname": hostname}, user_data, network_config)
    if image_type == "configdrive":
        return build_configdrive_iso({"uuid": instance_id, "hostname": hostname, "name": hostname}, user_data, network_config)
    raise ValueError(f"unknown cloud-init image type {image_type!r} (want nocloud or configdrive)")
