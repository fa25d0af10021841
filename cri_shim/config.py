"""vmlet's configuration: a YAML file, overridden by command-line flags.

Every setting has a default that works on a Debian node set up by
deploy/setup-host.sh; unknown keys are an error (a typo must not silently
fall back to a default).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    pass


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: Path = Path("/run/vmlet/vmlet.sock")
    libvirt_uri: str = "qemu:///system"
    state_dir: Path = Path("/var/lib/vmlet")
    # auto: KVM when a probe guest really boots under it, else TCG ("qemu").
    accelerator: Literal["auto", "kvm", "qemu"] = "auto"
    # The image the accelerator probe boots (any bootable image that prints to
    # the serial console); without one, `auto` decides from the host alone.
    accelerator_probe_image: Path | None = None
    image_translations: Path | None = None
    # libvirtd's QEMU driver logs every VM's console through virtlogd (qemu.conf stdio_handler "logd",
    # the default): while it is down no VM can start. Status reports it (condition VirtlogdReady);
    # null turns the check off (stdio_handler "file", or a libvirtd on another host).
    virtlogd_socket: Path | None = Path("/run/libvirt/virtlogd-sock")
    # Pod networking: the node's CNI configuration and plugins (Debian's
    # containernetworking-plugins live in /usr/lib/cni).
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_bin_dirs: list[str] = ["/opt/cni/bin", "/usr/lib/cni"]
    cni_plugin_timeout: float = Field(60.0, gt=0)
    # Address ranges image downloads may not reach (default: link-local and
    # cloud metadata) and exceptions to that (e.g. a mirror on loopback).
    image_deny_networks: list[str] | None = None
    image_allow_networks: list[str] = []
    # Without a memory limit in the pod spec a VM gets this much (virtlet: 1 GiB).
    default_memory_mib: int = Field(1024, ge=64)
    max_vcpus: int = Field(64, ge=1)
    # Cap on VirtletRootVolumeSize and image virtual size.
    max_root_volume_gib: int = Field(2048, ge=1)
    # Disks per VM, the root and cloud-init disks included (each virtio disk takes a PCI slot).
    max_disks: int = Field(24, ge=2, le=64)
    # Domain names are <prefix><container id[:32]>; tests use their own prefix.
    domain_prefix: str = Field("vmlet-", pattern=r"^[a-z][a-z0-9-]{0,20}$")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # The streaming server behind Exec/Attach/PortForward URLs (docs/streaming.md). Loopback on a free
    # port by default, as containerd: the kubelet on this node is its client.
    streaming_address: str = "127.0.0.1"
    streaming_port: int = Field(0, ge=0, le=65535)
    # Both or neither: with them the URLs are https://.
    streaming_tls_cert: Path | None = None
    streaming_tls_key: Path | None = None
    # The host the URLs name when clients reach the server by another address (a bind to 0.0.0.0).
    streaming_advertise_address: str | None = None
    # A session without a byte either way for this long is closed (the kubelet's default: 4 h).
    streaming_idle_timeout: float = Field(4 * 3600.0, gt=0)
    streaming_max_connections: int = Field(128, ge=1, le=4096)

    @field_validator("streaming_address", "streaming_advertise_address")
    @classmethod
    def _ip_address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None

    @model_validator(mode="after")
    def _tls_pair(self) -> "Config":
        if (self.streaming_tls_cert is None) != (self.streaming_tls_key is None):
            raise ValueError("streaming_tls_cert and streaming_tls_key: give both or neither")
        return self

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def pods_dir(self) -> Path:
        """Per pod sandbox: what lives as long as the sandbox (emptyDisks)."""
        return self.state_dir / "pods"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "vmlet.db"


def load(path: Path | None, **overrides) -> Config:
    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data.update(loaded or {})
    data.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    try:
        return Config(**data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
