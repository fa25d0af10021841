"""Cloud-init data disks, built in Python (pycdlib): data in, ISO bytes out.

Two formats, as virtlet's `VirtletCloudInitImageType` offers:
- NoCloud: volume label `cidata`, files `meta-data`, `user-data`, `network-config`, `vendor-data`.
- ConfigDrive (OpenStack): volume label `config-2`, files under `openstack/latest/` (vendor-data as
  `vendor_data.json` = `{"cloud-init": "<#cloud-config text>"}`, the form cloud-init's reader takes).

Pure: no file system access; the caller writes the bytes where libvirt can
read them. The ISO (cri_shim/storage/iso9660.py) carries Rock Ridge and Joliet
names so guests see the lower-case, hyphenated file names cloud-init expects,
and fixed timestamps: the same data gives the same bytes.

`compose` builds the data for one VM pod from its validated annotations
(`cri_shim.annotations.VMAnnotations`) and the pod's facts; `build_iso_for`
turns that into the disk. What `compose` produces, following virtlet's
cloud-init generator where it is well defined:

meta-data
    `instance-id` = pod UID (virtlet used name.namespace), `local-hostname` =
    the hostname, `public-keys` = the SSH keys (virtlet's place for them;
    NoCloud and CirrOS read it). Then `VirtletCloudInitMetaData` is applied
    key by key on top: the annotation wins (as in virtlet). ConfigDrive also
    gets OpenStack's names, derived after that merge unless the annotation set
    them itself: `uuid` (= instance-id), `hostname` (= local-hostname), `name`
    (= pod name) and `public_keys` (cloud-init's ConfigDrive reader looks only
    at `public_keys`, so virtlet's `public-keys` alone was ignored there).
user-data
    * `VirtletCloudInitUserDataScript` set (or a script the caller resolved
      from `VirtletCloudInitUserDataSourceKey`, which takes precedence like in
      virtlet): the user-data is that script verbatim, with every
      `@virtlet-mount-script@` replaced by the mount script (`#!/bin/sh` and
      one line per mount; empty when there are no mounts). No cloud-config is
      generated and `VirtletCloudInitUserData` is not used.
    * Otherwise `#cloud-config` YAML (sorted keys) from three layers:
      1. generated: `ssh_authorized_keys` (the same keys as meta-data; extra
         to virtlet, so keys also reach images whose datasource ignores
         meta-data keys; cloud-init de-duplicates), `mounts` and the mount
         script `/etc/cloud/mount-volumes.sh` for virtio-fs shares, and
         `/etc/cloud/environment` with the container's env (`write_files`);
      2. user data the caller resolved from `VirtletCloudInitUserDataSource`;
      3. `VirtletCloudInitUserData`.
      Layers are merged the way virtlet's `utils.Merge` does: mappings merge
      recursively, lists concatenate (earlier layer first, so user
      `write_files` for the same path and user `runcmd` come after vmlet's),
      anything else (scalars, type mismatches) is replaced by the later
      layer, and a null value in a later layer deletes the key.
      With `VirtletCloudInitUserDataOverwrite: "true"` merging is off: the
      annotation replaces the source data wholesale (virtlet), and each
      top-level key of the user data replaces the generated key of the same
      name whole ("simple key replacement", virtlet's documented behaviour);
      generated keys the user data does not name stay. SSH keys: the
      annotation's keys come after keys from `VirtletSSHKeySource`, or replace
      them when overwrite is on (virtlet).
environment file
    One `KEY=value` line per variable, sorted by name. Values made only of
    `[A-Za-z0-9_@%+=:,./-]` are written bare (exactly virtlet's format);
    anything else (spaces, quotes, `$`, newlines, non-ASCII, ...) is
    single-quoted shell style (`'` written as `'\\''`), so the file can always
    be sourced by `sh`. Names must be shell identifiers and values must not
    contain NUL: otherwise `CloudInitError`.
mounts
    `Mount` is a host directory shared into the VM over virtio-fs (virtlet's
    "fs-based" volumes, which virtlet shared over virtio-9p; see
    cri_shim/storage/pod_volumes.py): `mounts:` gets `[tag, path, virtiofs,
    defaults|ro,nofail, 0, 0]` and the mount script a line `if ! grep -qs
    '^TAG ' /proc/mounts; then mkdir -p PATH && mount -t virtiofs -o OPTS TAG
    PATH; fi` (OPTS without `nofail`, which only fstab knows; no `mountpoint`,
    which many guests lack, e.g. Debian's busybox). The tag is `Mount.tag`,
    which the domain's `<filesystem>` must use. Not done: file mounts,
    `VirtletChown9pfsMounts` (9p only: virtio-fs passes the host's
    ownership through).
device links
    `DeviceLink` is a disk from a block volume (cri_shim/storage/disks.py):
    the mount script links its CRI container path to the guest's device,
    found by serial through sysfs (virtio-blk `serial`, SCSI VPD page 0x80),
    so it needs no udev; cloud-config user data also runs it as `bootcmd`
    (devtmpfs forgets the links at every boot).
network-config
    passed through as given (NoCloud: network-config v1/v2; ConfigDrive:
    network_data.json), None: no file.
vendor-data
    The pod's resolver options (`DNSConfig.options`: ndots, timeout, ...),
    which neither DHCP nor network-config can carry, as cloud-init's
    `resolv_conf` module takes them: `manage_resolv_conf: true` and
    `resolv_conf: {nameservers, searchdomains, options}` (options as its
    mapping: `name: true` for a flag, `name: N` for `name:N`), the servers
    and searches repeated so the file the module writes is whole. Vendor-data
    rather than user-data: cloud-init applies it whatever the user data is (a
    script included), user cloud-config still overrides it, and users can
    turn it off (`vendor_data: {enabled: false}`). Only written when there
    are options (DHCP carries the rest). virtlet never carried options (its
    network-config had nameservers and searches only). cloud-init runs the
    module only on distributions that let it manage resolv.conf (RHEL,
    Fedora, SUSE, Alpine, ...; not Debian or Ubuntu, whose resolvconf or
    systemd-resolved own the file); the test image applies it itself
    (deploy/images/testvm/rootfs/etc/vmlet/resolv_conf.awk).
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import yaml

from cri_shim.annotations import MOUNT_SCRIPT_PLACEHOLDER, VMAnnotations, check_json_like, parse_ssh_keys
from cri_shim.network.model import MAX_RESOLVER_OPTIONS, DNSSettings, resolver_option_problem
from cri_shim.storage.iso9660 import IsoBuilder

ImageType = Literal["nocloud", "configdrive"]


class _Dumper(yaml.SafeDumper):
    """Sorted keys, no anchors/aliases, multi-line strings as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # PyYAML falls back to a quoted style by itself where a block can't hold the text.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump(data: Mapping) -> str:
    return yaml.dump(dict(data), Dumper=_Dumper, default_flow_style=False, sort_keys=True,
                     allow_unicode=True, width=4096)


def _yaml(data: Mapping) -> bytes:
    return _dump(data).encode()


def build_nocloud_iso(
    meta_data: Mapping[str, object],
    user_data: str | None = None,
    network_config: Mapping[str, object] | None = None,
    vendor_data: str | None = None,
) -> bytes:
    iso = IsoBuilder("cidata")
    iso.add_file("meta-data", _yaml(meta_data))
    # cloud-init treats a missing user-data as an error on some versions: always write one.
    iso.add_file("user-data", (user_data or "").encode())
    if network_config is not None:
        iso.add_file("network-config", _yaml(network_config))
    if vendor_data is not None:
        iso.add_file("vendor-data", vendor_data.encode())
    return iso.to_bytes()


def build_configdrive_iso(
    meta_data: Mapping[str, object],
    user_data: str | None = None,
    network_data: Mapping[str, object] | None = None,
    vendor_data: str | None = None,
) -> bytes:
    iso = IsoBuilder("config-2")
    iso.add_file("openstack/latest/meta_data.json", json.dumps(dict(meta_data), sort_keys=True).encode())
    if user_data:
        iso.add_file("openstack/latest/user_data", user_data.encode())
    if network_data is not None:
        iso.add_file("openstack/latest/network_data.json", json.dumps(dict(network_data), sort_keys=True).encode())
    if vendor_data is not None:
        iso.add_file("openstack/latest/vendor_data.json",
                     json.dumps({"cloud-init": vendor_data}, sort_keys=True).encode())
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


# --- composition for one VM pod ------------------------------------------------

ENV_FILE = "/etc/cloud/environment"
MOUNT_SCRIPT_FILE = "/etc/cloud/mount-volumes.sh"

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_ENV_BARE_VALUE_RE = re.compile(r"[A-Za-z0-9_@%+=:,./-]*", re.ASCII)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", re.ASCII)


class CloudInitError(ValueError):
    """The pod's data can't be turned into cloud-init data (bad env name, bad mount path, ...)."""


@dataclass(frozen=True)
class Mount:
    """A host directory shared into the VM over virtio-fs, mounted at `container_path`."""

    host_path: str
    container_path: str
    read_only: bool = False

    def __post_init__(self) -> None:
        for what, path in (("host path", self.host_path), ("container path", self.container_path)):
            if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096:
                raise CloudInitError(f"mount {what} {path!r} must be an absolute path")
            if _CONTROL_RE.search(path):
                raise CloudInitError(f"mount {what} {path!r} contains control characters")
        cpath = self.container_path
        # fstab (cloud-init `mounts`) can't hold whitespace; `..` or `//` would
        # make the tag differ for the same directory.
        if cpath == "/" or posixpath.normpath(cpath) != cpath or any(c.isspace() for c in cpath):
            raise CloudInitError(f"mount container path {cpath!r} must be a normalised absolute path "
                                 "other than / without whitespace")

    @property
    def tag(self) -> str:
        """The virtio-fs mount tag (the domain's <filesystem><target dir=...>): unique per
        container path, at most 36 bytes. virtlet used the path's base name, which
        collides for /a/data and /b/data."""
        return "vmlet" + hashlib.sha256(self.container_path.encode()).hexdigest()[:16]

    @property
    def options(self) -> str:
        """Mount options (the `mounts:` entry adds `nofail` for fstab)."""
        return "ro" if self.read_only else "defaults"


@dataclass(frozen=True)
class DeviceLink:
    """A block-volume disk the guest gets a link to at `container_path` (virtlet's behaviour)."""

    container_path: str
    serial: str

    def __post_init__(self) -> None:
        cpath = self.container_path
        if (not isinstance(cpath, str) or not cpath.startswith("/") or cpath == "/" or len(cpath) > 4096
                or posixpath.normpath(cpath) != cpath or _CONTROL_RE.search(cpath) or any(c.isspace() for c in cpath)):
            raise CloudInitError(f"device container path {cpath!r} must be a normalised absolute path other than / "
                                 "without whitespace or control characters")
        if not isinstance(self.serial, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,20}", self.serial):
            raise CloudInitError(f"disk serial {self.serial!r} must be 1 to 20 of A-Za-z0-9_.+-")


# The guest's device with serial $1: virtio-blk has it in sysfs, SCSI disks in VPD page 0x80 (after 4 header bytes).
_FIND_BY_SERIAL = (
    'vmlet_disk() { for d in /sys/block/*; do s=$(cat "$d/serial" 2>/dev/null) || '
    's=$(tail -c +5 "$d/device/vpd_pg80" 2>/dev/null | tr -d "\\000 "); '
    '[ "$s" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }; done; return 1; }')


def device_link_script(links: Sequence[DeviceLink]) -> str:
    """Shell lines linking each device disk at its container path; empty without links."""
    if not links:
        return ""
    lines = [_FIND_BY_SERIAL]
    for link in links:
        path = shlex.quote(link.container_path)
        lines.append(f"if dev=$(vmlet_disk {shlex.quote(link.serial)}); then mkdir -p "
                     f"{shlex.quote(posixpath.dirname(link.container_path))} && ln -sfn \"$dev\" {path}; fi")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CloudInitData:
    """What goes on the cloud-init disk; `build_iso_for` writes it."""

    image_type: ImageType
    meta_data: dict[str, Any]
    user_data: str
    network_config: dict[str, Any] | None = None
    vendor_data: str | None = None


def merge_user_data(base: Any, override: Any) -> Any:
    """virtlet's merge: mappings recursively, lists concatenated (base first), otherwise
    `override`; a None in an override mapping deletes the key from the result."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if key not in base:
                out[key] = value
            elif value is None:
                del out[key]
            else:
                out[key] = merge_user_data(base[key], value)
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


def env_file_content(env: Mapping[str, str]) -> str:
    """`KEY=value` lines (sorted) that `sh` can source; see the module doc for quoting."""
    lines = []
    for name in sorted(env):
        value = env[name]
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise CloudInitError(f"environment variable name {name!r} can't be written to {ENV_FILE} "
                                 "(must be letters, digits and _, not starting with a digit)")
        if not isinstance(value, str) or "\x00" in value or not _encodable(value):
            raise CloudInitError(f"environment variable {name} has a value that is not UTF-8 text without NUL")
        if not _ENV_BARE_VALUE_RE.fullmatch(value):
            value = "'" + value.replace("'", "'\\''") + "'"
        lines.append(f"{name}={value}\n")
    return "".join(lines)


def mount_script(mounts: Sequence[Mount], device_links: Sequence[DeviceLink] = ()) -> str:
    """A /bin/sh script mounting the virtio-fs shares and linking the device disks (idempotent);
    empty without either."""
    if not mounts and not device_links:
        return ""
    lines = ["#!/bin/sh"]
    if device_links:
        lines.append(device_link_script(device_links).rstrip("\n"))
    for m in mounts:
        path = shlex.quote(m.container_path)
        # "Already mounted?" is asked of /proc/mounts (grep is in every guest, `mountpoint` is not)
        # by the share's tag, the source field of a virtio-fs mount: unlike the mount point it needs
        # no octal escaping and stays right when the path runs through a symlink (/var/run -> /run).
        lines.append(f"if ! grep -qs {shlex.quote('^' + m.tag + ' ')} /proc/mounts; then mkdir -p {path} && "
                     f"mount -t virtiofs -o {shlex.quote(m.options)} {shlex.quote(m.tag)} {path}; fi")
    return "\n".join(lines) + "\n"


def resolv_conf_options(options: Sequence[str]) -> dict[str, Any]:
    """cloud-init's `resolv_conf.options` mapping for resolv.conf options: `rotate` -> {"rotate": True},
    `ndots:5` -> {"ndots": 5}; a later one of the same name wins, as in the resolver.
    CloudInitError for an option resolv.conf cannot hold."""
    if isinstance(options, str) or len(options) > MAX_RESOLVER_OPTIONS:
        raise CloudInitError(f"resolver options must be a list of at most {MAX_RESOLVER_OPTIONS}")
    out: dict[str, Any] = {}
    for i, option in enumerate(options):
        problem = resolver_option_problem(option)
        if problem:
            raise CloudInitError(f"resolver option [{i}] {option!r} {problem}")
        name, _, value = option.partition(":")
        out[name] = int(value) if value else True
    return out


def resolver_vendor_data(dns: DNSSettings | None) -> str | None:
    """`#cloud-config` vendor-data for cloud-init's resolv_conf module; None without options."""
    if dns is None or not dns.options:
        return None
    options = resolv_conf_options(dns.options)
    checked = dns.validated()
    resolv: dict[str, Any] = {"options": options}
    if checked.servers:
        resolv["nameservers"] = list(checked.servers)
    if checked.searches:
        # `searchdomains`, not `domain`: resolv.conf's `domain` and `search` override each other.
        resolv["searchdomains"] = list(checked.searches)
    return "#cloud-config\n" + _dump({"manage_resolv_conf": True, "resolv_conf": resolv})


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # unpaired surrogates
        return False
    return True


def _check_fact(what: str, value: str, pattern: re.Pattern | None = None) -> None:
    if not isinstance(value, str) or not value or len(value) > 253 or _CONTROL_RE.search(value):
        raise CloudInitError(f"{what} {value!r} must be 1 to 253 characters without control characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise CloudInitError(f"{what} {value!r} is not a valid host name")


def _json_like(what: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of caller-resolved data, checked like annotation YAML."""
    if not isinstance(data, Mapping):
        raise CloudInitError(f"{what} must be a mapping")
    data = dict(data)
    try:
        check_json_like(data)
    except ValueError as e:
        raise CloudInitError(f"{what}: {e}") from None
    return copy.deepcopy(data)


def compose(
    vm: VMAnnotations,
    *,
    pod_uid: str,
    pod_name: str,
    hostname: str,
    env: Mapping[str, str] | None = None,
    mounts: Sequence[Mount] = (),
    device_links: Sequence[DeviceLink] = (),
    network_config: Mapping[str, Any] | None = None,
    dns: DNSSettings | None = None,
    image_type: ImageType | None = None,
    source_ssh_keys: Sequence[str] = (),
    source_user_data: Mapping[str, Any] | None = None,
    source_user_data_script: str | None = None,
) -> CloudInitData:
    """The cloud-init data for one VM pod (see the module doc for every rule).

    `image_type` None: the pod's `VirtletCloudInitImageType`. The `source_*`
    arguments are what the caller resolved from `VirtletSSHKeySource`
    (the lines of the key's value; checked like `VirtletSSHKeys`),
    `VirtletCloudInitUserDataSource` (a JSON-like mapping; checked) and
    `VirtletCloudInitUserDataSourceKey` (the decoded script). `dns`: the
    pod's resolver settings (PodNetwork.dns); only its options are written
    (vendor-data), as DHCP carries the rest. Raises CloudInitError for data
    that can't be written (bad env name, bad resolver option, ...).
    """
    _check_fact("pod UID", pod_uid)
    _check_fact("pod name", pod_name)
    _check_fact("hostname", hostname, _HOSTNAME_RE)
    image_type = image_type or vm.cloud_init_image_type
    if image_type not in ("nocloud", "configdrive"):
        raise CloudInitError(f"unknown cloud-init image type {image_type!r} (want nocloud or configdrive)")
    mount_paths = [m.container_path for m in mounts]
    if len(set(mount_paths)) != len(mount_paths):
        raise CloudInitError("two mounts share a container path")

    if isinstance(source_ssh_keys, str) or not all(isinstance(k, str) for k in source_ssh_keys):
        raise CloudInitError("keys from the SSH key source must be a list of strings")
    try:
        checked_source_keys = parse_ssh_keys("\n".join(source_ssh_keys))
    except ValueError as e:
        raise CloudInitError(f"SSH key source: {e}") from None
    if source_user_data_script is not None and (
            not isinstance(source_user_data_script, str) or "\x00" in source_user_data_script
            or not _encodable(source_user_data_script)):
        raise CloudInitError("the user-data script from the data source must be UTF-8 text without NUL")

    keys: list[str] = []
    source_keys = [] if (vm.cloud_init_user_data_overwrite and vm.ssh_keys) else list(checked_source_keys)
    for key in [*source_keys, *vm.ssh_keys]:
        if key not in keys:
            keys.append(key)

    # meta-data
    meta: dict[str, Any] = {"instance-id": pod_uid, "local-hostname": hostname}
    if keys:
        meta["public-keys"] = list(keys)
    meta.update(copy.deepcopy(vm.cloud_init_meta_data or {}))
    if image_type == "configdrive":
        meta.setdefault("uuid", meta.get("instance-id", pod_uid))
        meta.setdefault("hostname", meta.get("local-hostname", hostname))
        meta.setdefault("name", pod_name)
        if "public_keys" not in meta and isinstance(meta.get("public-keys"), list):
            meta["public_keys"] = list(meta["public-keys"])

    net = copy.deepcopy(dict(network_config)) if network_config is not None else None
    if dns is not None and not isinstance(dns, DNSSettings):
        raise CloudInitError("resolver settings must be DNSSettings")
    vendor = resolver_vendor_data(dns)
    script = mount_script(mounts, device_links)

    # user-data: a script replaces everything
    user_script = source_user_data_script if source_user_data_script is not None else vm.cloud_init_user_data_script
    if user_script is not None:
        return CloudInitData(image_type, meta, user_script.replace(MOUNT_SCRIPT_PLACEHOLDER, script), net, vendor)

    generated: dict[str, Any] = {}
    if keys:
        generated["ssh_authorized_keys"] = list(keys)
    write_files: list[dict[str, Any]] = []
    if device_links:
        generated["bootcmd"] = [["sh", "-c", device_link_script(device_links)]]
    if mounts:
        generated["mounts"] = [[m.tag, m.container_path, "virtiofs", m.options + ",nofail", "0", "0"]
                               for m in mounts]
    if script:
        write_files.append({"path": MOUNT_SCRIPT_FILE, "content": script, "permissions": "0755"})
    if env:
        write_files.append({"path": ENV_FILE, "content": env_file_content(env), "permissions": "0644"})
    if write_files:
        generated["write_files"] = write_files

    user: dict[str, Any] | None = _json_like("user data from the data source", source_user_data) \
        if source_user_data is not None else None
    if vm.cloud_init_user_data is not None:
        annotation = copy.deepcopy(vm.cloud_init_user_data)
        user = annotation if (user is None or vm.cloud_init_user_data_overwrite) \
            else merge_user_data(user, annotation)
    if user is None:
        final = generated
    elif vm.cloud_init_user_data_overwrite:
        final = {**generated, **user}
    else:
        final = merge_user_data(generated, user)

    user_data = "#cloud-config\n" + (_dump(final) if final else "")
    return CloudInitData(image_type, meta, user_data, net, vendor)


def build_iso_for(data: CloudInitData) -> bytes:
    """The cloud-init disk for `data`, in its image type's format."""
    if data.image_type == "nocloud":
        return build_nocloud_iso(data.meta_data, data.user_data, data.network_config, data.vendor_data)
    if data.image_type == "configdrive":
        return build_configdrive_iso(data.meta_data, data.user_data, data.network_config, data.vendor_data)
    raise ValueError(f"unknown cloud-init image type {data.image_type!r} (want nocloud or configdrive)")
