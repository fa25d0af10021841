"""One validated model of the pod annotations a VM pod may carry.

Pure: no Kubernetes API, no files. `VMAnnotations.from_pod_annotations` turns
the pod's annotation map into a frozen `VMAnnotations`, or raises
`AnnotationError(annotation, message)` for the first bad value (annotations
are checked in the fixed order of `ANNOTATIONS`, so the error is
deterministic). The CRI layer turns that into gRPC InvalidArgument.

Names and meanings follow virtlet's VM pod annotations; where vmlet differs,
it says so here:

* Every value is hostile input: each annotation has a length cap, NUL and
  other control characters (except tab/newline/CR in multi-line values) and
  unpaired surrogates are rejected, YAML is parsed with a safe loader that
  refuses aliases, deep nesting and large documents and yields only JSON-like
  data (str/int/float/bool/null, lists, mappings with string keys; YAML
  timestamps stay strings).
* Scalar values are stripped of surrounding whitespace; a value that is empty
  (or only whitespace) counts as absent, for every annotation.
* Booleans are "true" or "false", case-insensitive; anything else is an error
  (virtlet silently read anything but "true" as false).
* Enumerations (`VirtletDiskDriver`, `VirtletCloudInitImageType`, data source
  kinds, `vmlet.dev/network-binding`) are case-insensitive.
* `VirtletVCPUCount`: ASCII digits only, 1..255 ("2.0", "-1", "0" are errors;
  virtlet quietly turned 0 and negatives into 1). Absent: `vcpu_count` is
  None and the runtime decides (virtlet: always 1).
* `VirtletDiskDriver`: `virtio` (vmlet's default; virtlet defaulted to scsi)
  or `scsi`.
* `VirtletCPUModel`: `host-model` (virtlet's only value), `host-passthrough`
  (both are libvirt CPU *modes*), or a libvirt/QEMU CPU model name such as
  `Skylake-Client-IBRS` (mode custom), matching `CPU_MODEL_NAME_RE`. When
  `VirtletLibvirtCPUSetting` is present too, it takes precedence (as in
  virtlet).
* `VirtletLibvirtCPUSetting`: YAML for libvirt's `<cpu>`; keys as in virtlet
  (libvirt XML names, capitalised, e.g. `Mode`, `Match`, `Check`, `Model:
  {Value, Fallback}`, `Features: [{Name, Policy}]`), matched
  case-insensitively like virtlet's JSON decoding did. Unknown keys are errors
  (virtlet ignored them), so a typo does not silently do nothing. `Model` may
  also be a plain string. Parsed into `LibvirtCPUSetting` for domain_xml.
* `VirtletRootVolumeSize`: a Kubernetes quantity (`4Gi`, `1G`, `500Mi`,
  `1.5Gi`, `1e9`, plain bytes); must be a whole, positive number of bytes, at
  most `MAX_ROOT_VOLUME_SIZE`. Sub-unit suffixes (`m`, `u`, `n`) are refused.
  Whether the image's own size wins when it is bigger is the volumes work's
  business (virtlet: the larger of the two).
* `VirtletSSHKeys`: one public key per line; blank lines and `#` comment
  lines are dropped, duplicates are dropped (first wins). Each key is
  `<type> <base64> [comment]` with a type starting `ssh-`, `ecdsa-` or `sk-`
  (authorized_keys options before the type are not supported).
* `VirtletSSHKeySource` (`configmap/<name>[/<key>]`, key defaults to
  `authorized_keys`), `VirtletCloudInitUserDataSource` (`configmap/<name>` or
  `secret/<name>`), `VirtletCloudInitUserDataSourceKey`,
  `VirtletCloudInitUserDataSourceEncoding` (`plain`|`base64`) and
  `VirtletFilesFromDataSource` name Kubernetes objects: they are parsed and
  checked here but RESOLVED BY THE CALLER (it needs the Kubernetes API); see
  `cloudinit.compose` for how resolved data is layered.
* `VirtletCloudInitUserData` / `VirtletCloudInitMetaData`: a YAML (or JSON)
  mapping. Anything else (a list, a scalar, null) is an error.
* `VirtletCloudInitUserDataScript`: kept verbatim (not stripped); may
  contain `@virtlet-mount-script@`, which cloudinit.compose replaces.
* `VirtletSystemUUID`: a UUID, normalised to lower-case canonical form.
* `vmlet.dev/network-binding`: vmlet's own, `bridge` (default) or
  `masquerade`.
* `vmlet.dev/disks`: vmlet's own, a YAML list of the pod volumes the VM gets as
  disks (cri_shim/storage/disk_spec.py, docs/storage.md); `vmlet.dev/root-reimage`
  (true/false) allows rewriting a persistent root that holds another image.
* `kubernetes.io/target-runtime`: read as-is (the CRI proxy routes on it).
* `VirtletConfigMapAsFiles` (virtlet's older name for files injection) is not
  supported; unknown annotations are ignored.
"""

from __future__ import annotations

import math
import re
import uuid as uuidlib
from fractions import Fraction
from typing import Any, Callable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cri_shim.storage import disk_spec

# --- names -------------------------------------------------------------------

TARGET_RUNTIME = "kubernetes.io/target-runtime"
VCPU_COUNT = "VirtletVCPUCount"
DISK_DRIVER = "VirtletDiskDriver"
CPU_MODEL = "VirtletCPUModel"
LIBVIRT_CPU_SETTING = "VirtletLibvirtCPUSetting"
ROOT_VOLUME_SIZE = "VirtletRootVolumeSize"
SSH_KEYS = "VirtletSSHKeys"
SSH_KEY_SOURCE = "VirtletSSHKeySource"
CLOUD_INIT_USER_DATA = "VirtletCloudInitUserData"
CLOUD_INIT_META_DATA = "VirtletCloudInitMetaData"
CLOUD_INIT_USER_DATA_OVERWRITE = "VirtletCloudInitUserDataOverwrite"
CLOUD_INIT_USER_DATA_SCRIPT = "VirtletCloudInitUserDataScript"
CLOUD_INIT_USER_DATA_SOURCE = "VirtletCloudInitUserDataSource"
CLOUD_INIT_USER_DATA_SOURCE_KEY = "VirtletCloudInitUserDataSourceKey"
CLOUD_INIT_USER_DATA_SOURCE_ENCODING = "VirtletCloudInitUserDataSourceEncoding"
CLOUD_INIT_IMAGE_TYPE = "VirtletCloudInitImageType"
FILES_FROM_DATA_SOURCE = "VirtletFilesFromDataSource"
CHOWN_9PFS_MOUNTS = "VirtletChown9pfsMounts"
FORCE_DHCP_NETWORK_CONFIG = "VirtletForceDHCPNetworkConfig"
SYSTEM_UUID = "VirtletSystemUUID"
NETWORK_BINDING = "vmlet.dev/network-binding"
DISKS = disk_spec.DISKS
ROOT_REIMAGE = disk_spec.ROOT_REIMAGE

MOUNT_SCRIPT_PLACEHOLDER = "@virtlet-mount-script@"

# --- limits ------------------------------------------------------------------

MAX_VCPU_COUNT = 255
MAX_ROOT_VOLUME_SIZE = 16 * 1024**4  # 16 TiB
MAX_SCALAR_CHARS = 1024
MAX_SSH_KEYS_CHARS = 64 * 1024
MAX_SSH_KEY_CHARS = 16 * 1024
MAX_SSH_KEYS = 256
MAX_USER_DATA_CHARS = 128 * 1024
MAX_META_DATA_CHARS = 32 * 1024
MAX_SCRIPT_CHARS = 128 * 1024
MAX_CPU_SETTING_CHARS = 8 * 1024
MAX_CPU_FEATURES = 128
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 20_000

CPU_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", re.ASCII)
CPU_FEATURE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_DNS1123_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.ASCII)
_DATA_KEY_RE = re.compile(r"[-._a-zA-Z0-9]{1,253}", re.ASCII)
_SSH_KEY_TYPE_RE = re.compile(r"(?:ssh|ecdsa|sk)-[A-Za-z0-9@._+-]{1,64}", re.ASCII)
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}", re.ASCII)
_DIGITS_RE = re.compile(r"[0-9]{1,4}", re.ASCII)
_QUANTITY_RE = re.compile(
    r"(?P<sign>[+-]?)(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][+-]?[0-9]{1,2})?",
    re.ASCII,
)
_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_SINGLE_LINE_BAD = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_MULTI_LINE_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class AnnotationError(ValueError):
    """A pod annotation with a bad value; `str()` names the annotation."""

    def __init__(self, annotation: str, message: str) -> None:
        self.annotation = annotation
        self.message = message
        super().__init__(f"pod annotation {annotation}: {message}")


# --- result models -----------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSourceRef(_Frozen):
    """A ConfigMap or Secret in the pod's namespace; resolved by the caller."""

    kind: Literal["configmap", "secret"]
    name: str
    key: str | None = None


CPUMode = Literal["custom", "host-model", "host-passthrough", "maximum"]
CPUMatch = Literal["minimum", "exact", "strict"]
CPUCheck = Literal["none", "partial", "full"]
CPUFallback = Literal["allow", "forbid"]
CPUFeaturePolicy = Literal["force", "require", "optional", "disable", "forbid"]


class CPUModelSpec(_Frozen):
    """libvirt `<model fallback=...>value</model>`."""

    value: str
    fallback: CPUFallback | None = None


class CPUFeature(_Frozen):
    """libvirt `<feature policy=... name=.../>`; policy None: libvirt's default (require)."""

    name: str
    policy: CPUFeaturePolicy | None = None


class LibvirtCPUSetting(_Frozen):
    """libvirt `<cpu>`: None fields are left out of the XML."""

    mode: CPUMode | None = None
    match: CPUMatch | None = None
    check: CPUCheck | None = None
    model: CPUModelSpec | None = None
    features: tuple[CPUFeature, ...] = ()


class VMAnnotations(_Frozen):
    """Everything vmlet reads from a VM pod's annotations, validated.

    The dict fields hold freshly parsed data owned by this object; treat them
    as read-only (consumers copy before changing).
    """

    target_runtime: str | None = None
    vcpu_count: int | None = None  # None: not set, the runtime decides (virtlet used 1)
    disk_driver: Literal["virtio", "scsi"] = "virtio"
    # "host-model" / "host-passthrough" are libvirt modes; other values are a
    # CPU model name (mode custom). None: the runtime's default.
    cpu_model: str | None = None
    libvirt_cpu: LibvirtCPUSetting | None = None
    root_volume_size: int | None = None  # bytes; None: the image's size
    ssh_keys: tuple[str, ...] = ()
    ssh_key_source: DataSourceRef | None = None
    cloud_init_user_data: dict[str, Any] | None = None
    cloud_init_meta_data: dict[str, Any] | None = None
    cloud_init_user_data_overwrite: bool = False
    cloud_init_user_data_script: str | None = None
    cloud_init_user_data_source: DataSourceRef | None = None
    cloud_init_user_data_source_key: str | None = None
    cloud_init_user_data_source_encoding: Literal["plain", "base64"] = "plain"
    cloud_init_image_type: Literal["nocloud", "configdrive"] = "nocloud"
    files_from_data_source: DataSourceRef | None = None
    chown_9pfs_mounts: bool = False
    force_dhcp_network_config: bool = False
    system_uuid: str | None = None
    network_binding: Literal["bridge", "masquerade"] = "bridge"
    disks: tuple[disk_spec.DiskSpec, ...] = ()
    root_reimage: bool = False

    @property
    def root_disk(self) -> disk_spec.DiskSpec | None:
        """The persistent root (`vmlet.dev/disks` entry with root: true); None: the ephemeral overlay."""
        return next((d for d in self.disks if d.root), None)

    @property
    def cpu_mode(self) -> Literal["host-model", "host-passthrough", "custom"] | None:
        """The libvirt CPU mode `VirtletCPUModel` asks for; None when it is not set."""
        if self.cpu_model is None:
            return None
        return self.cpu_model if self.cpu_model in ("host-model", "host-passthrough") else "custom"  # type: ignore[return-value]

    @property
    def cpu_model_name(self) -> str | None:
        """The CPU model name for mode custom; None for the host-* modes or when not set."""
        return self.cpu_model if self.cpu_mode == "custom" else None

    @classmethod
    def from_pod_annotations(cls, annotations: Mapping[str, str] | None) -> "VMAnnotations":
        """Parse and validate; raises AnnotationError for the first bad value."""
        annotations = annotations or {}
        fields: dict[str, Any] = {}
        for name, (field, parse) in ANNOTATIONS.items():
            if name not in annotations:
                continue
            raw = annotations[name]
            if not isinstance(raw, str):
                raise AnnotationError(name, f"the value must be a string, not {type(raw).__name__}")
            value = parse(name, raw)
            if value is not None:
                fields[field] = value
        if fields.get("root_volume_size") and any(d.root for d in fields.get("disks", ())):
            raise AnnotationError(ROOT_VOLUME_SIZE, "sizes the ephemeral root overlay, but the pod's persistent root "
                                  f"({DISKS} entry with root: true) is sized by its volume: drop one of them")
        try:
            return cls(**fields)
        except ValidationError as e:  # a parser let something through: still answer humanly
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            name = next((n for n, (f, _) in ANNOTATIONS.items() if f == field), field)
            raise AnnotationError(name, err["msg"]) from None


# --- generic checks ----------------------------------------------------------


def _text(name: str, raw: str, max_chars: int, *, multiline: bool) -> str:
    if len(raw) > max_chars:
        raise AnnotationError(name, f"the value is too long ({len(raw)} characters, at most {max_chars})")
    bad = (_MULTI_LINE_BAD if multiline else _SINGLE_LINE_BAD).search(raw)
    if bad:
        ch = bad.group()
        what = "an unpaired surrogate (not valid UTF-8)" if "\ud800" <= ch <= "\udfff" else f"control character {ch!r}"
        raise AnnotationError(name, f"the value contains {what}")
    return raw


def _scalar(name: str, raw: str) -> str | None:
    """A single-line value, stripped of spaces, tabs and line breaks; None when empty."""
    if len(raw) > MAX_SCALAR_CHARS:  # before stripping: don't walk megabytes of blanks
        _text(name, raw, MAX_SCALAR_CHARS, multiline=False)
    value = _text(name, raw.strip(" \t\r\n"), MAX_SCALAR_CHARS, multiline=False)
    return value or None


def _enum(name: str, raw: str, allowed: tuple[str, ...]) -> str | None:
    value = _scalar(name, raw)
    if value is None:
        return None
    if value.lower() not in allowed:
        raise AnnotationError(name, f"{_show(value)} is not one of {', '.join(allowed)}")
    return value.lower()


def _show(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _parse_bool(name: str, raw: str) -> bool | None:
    value = _enum(name, raw, ("true", "false"))
    return None if value is None else value == "true"


# --- YAML --------------------------------------------------------------------


class _YAMLRejected(Exception):
    pass


# libyaml when present (a hostile 128 KiB document costs ~0.1 s instead of ~2 s).
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """The safe loader with YAML timestamps left as strings (they would not survive JSON)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _precheck_events(text: str) -> None:
    """Walk the event stream before building anything: no aliases, bounded depth and size."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        if isinstance(event, yaml.AliasEvent):
            raise _YAMLRejected("YAML aliases (*name) are not allowed")
        if isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise _YAMLRejected(f"the YAML document has too many nodes (at most {MAX_YAML_NODES})")
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _YAMLRejected(f"the YAML document is nested too deeply (at most {MAX_YAML_DEPTH} levels)")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _check_json_like(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _YAMLRejected(f"{where}: mapping keys must be strings, found {k!r}")
            _check_json_like(v, f"{where}.{k}" if where else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_like(v, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _YAMLRejected(f"{where or 'value'}: {value!r} is not a finite number")
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise _YAMLRejected(f"{where or 'value'}: YAML type {type(value).__name__} is not allowed here")


def check_json_like(value: Any) -> None:
    """ValueError unless `value` is JSON-like data (what load_yaml_mapping yields)."""
    try:
        _check_json_like(value, "")
    except _YAMLRejected as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def load_yaml(text: str) -> Any:
    """Parse untrusted YAML/JSON into JSON-like data (any shape); ValueError with a short reason."""
    loader = None
    try:
        _precheck_events(text)
        loader = _StrictLoader(text)
        data = loader.get_single_data()
    except _YAMLRejected as e:
        raise ValueError(str(e)) from None
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise ValueError(f"not valid YAML: {e.problem or e.context}{where}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ValueError(f"not valid YAML: {str(e)[:200]}") from None
    finally:
        if loader is not None:
            loader.dispose()
    try:
        _check_json_like(data, "")
    except _YAMLRejected as e:
        raise ValueError(str(e)) from None
    return data


def load_yaml_mapping(text: str) -> dict[str, Any]:
    """Parse untrusted YAML/JSON into a JSON-like mapping; ValueError with a short reason."""
    data = load_yaml(text)
    if not isinstance(data, dict):
        kind = {type(None): "empty", list: "a list", str: "a string", bool: "true/false", int: "a number",
                float: "a number"}.get(type(data), type(data).__name__)
        raise ValueError(f"must be a YAML mapping (key: value), not {kind}")
    return data


def _yaml_mapping(name: str, raw: str, max_chars: int) -> dict[str, Any] | None:
    text = _text(name, raw, max_chars, multiline=True)
    if not text.strip():
        return None
    try:
        return load_yaml_mapping(text)
    except ValueError as e:
        raise AnnotationError(name, str(e)) from None


# --- per-annotation parsers --------------------------------------------------


def _parse_vcpu_count(name: str, raw: str) -> int | None:
    value = _scalar(name, raw)
    if value is None:
        return None
    if not _DIGITS_RE.fullmatch(value):
        raise AnnotationError(name, f"{_show(value)} is not a whole number from 1 to {MAX_VCPU_COUNT}")
    count = int(value)
    if not 1 <= count <= MAX_VCPU_COUNT:
        raise AnnotationError(name, f"{count} is out of range (1 to {MAX_VCPU_COUNT})")
    return count


def _parse_cpu_model(name: str, raw: str) -> str | None:
    value = _scalar(name, raw)
    if value is None:
        return None
    if value.lower() in ("host-model", "host-passthrough"):
        return value.lower()
    if not CPU_MODEL_NAME_RE.fullmatch(value):
        raise AnnotationError(
            name, f"{_show(value)} is neither host-model, host-passthrough nor a CPU model name (letters, digits, _.+-)"
        )
    return value


def parse_quantity(text: str) -> int:
    """A Kubernetes quantity as a whole number of bytes; ValueError otherwise."""
    m = _QUANTITY_RE.fullmatch(text)
    if not m:
        raise ValueError(
            f"{_show(text)} is not a quantity (a number with an optional suffix Ki, Mi, Gi, Ti, Pi, Ei, "
            "k, M, G, T, P, E or an exponent like e9)"
        )
    number = Fraction(m["num"])
    suffix = m["suffix"] or ""
    if suffix in _BINARY_SUFFIXES:
        number *= _BINARY_SUFFIXES[suffix]
    elif suffix in _DECIMAL_SUFFIXES:
        number *= _DECIMAL_SUFFIXES[suffix]
    else:  # exponent, at most two digits
        number *= Fraction(10) ** int(suffix[1:])
    if m["sign"] == "-" and number != 0:
        raise ValueError(f"{_show(text)} is negative")
    if number.denominator != 1:
        raise ValueError(f"{_show(text)} is not a whole number of bytes")
    return int(number)


def _parse_root_volume_size(name: str, raw: str) -> int | None:
    value = _scalar(name, raw)
    if value is None:
        return None
    try:
        size = parse_quantity(value)
    except ValueError as e:
        raise AnnotationError(name, str(e)) from None
    if size <= 0:
        raise AnnotationError(name, f"{_show(value)} must be greater than zero")
    if size > MAX_ROOT_VOLUME_SIZE:
        raise AnnotationError(name, f"{_show(value)} is larger than the limit of {MAX_ROOT_VOLUME_SIZE // 1024**4}Ti")
    return size


def parse_ssh_keys(text: str) -> tuple[str, ...]:
    """Public keys, one a line (blank and # lines dropped, duplicates dropped); ValueError otherwise."""
    keys: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_SSH_KEY_CHARS:
            raise ValueError(f"line {number}: the key is too long (at most {MAX_SSH_KEY_CHARS} characters)")
        parts = line.split()
        if not _SSH_KEY_TYPE_RE.fullmatch(parts[0]):
            raise ValueError(f"line {number}: {_show(parts[0])} is not a public key type (ssh-..., ecdsa-..., sk-...)")
        if len(parts) < 2 or not _BASE64_RE.fullmatch(parts[1]):
            raise ValueError(f"line {number}: the key data after {parts[0]} is missing or not base64")
        key = " ".join(parts)
        if key not in keys:
            keys.append(key)
        if len(keys) > MAX_SSH_KEYS:
            raise ValueError(f"too many keys (at most {MAX_SSH_KEYS})")
    return tuple(keys)


def _parse_ssh_keys(name: str, raw: str) -> tuple[str, ...] | None:
    text = _text(name, raw, MAX_SSH_KEYS_CHARS, multiline=True)
    try:
        keys = parse_ssh_keys(text)
    except ValueError as e:
        raise AnnotationError(name, str(e)) from None
    return keys or None


def _data_source(name: str, raw: str, *, with_key: bool, default_key: str | None = None) -> DataSourceRef | None:
    value = _scalar(name, raw)
    if value is None:
        return None
    parts = value.split("/")
    form = "configmap/<name>[/<key>] or secret/<name>[/<key>]" if with_key else "configmap/<name> or secret/<name>"
    if len(parts) not in ((2, 3) if with_key else (2,)):
        raise AnnotationError(name, f"{_show(value)} is not of the form {form}")
    kind = parts[0].lower()
    if kind not in ("configmap", "secret"):
        raise AnnotationError(name, f"{_show(parts[0])} is not configmap or secret")
    if len(parts[1]) > 253 or not _DNS1123_SUBDOMAIN_RE.fullmatch(parts[1]):
        raise AnnotationError(name, f"{_show(parts[1])} is not a valid object name")
    key = parts[2] if len(parts) == 3 else default_key
    if key is not None and not _DATA_KEY_RE.fullmatch(key):
        raise AnnotationError(name, f"{_show(key)} is not a valid key (letters, digits, -._)")
    return DataSourceRef(kind=kind, name=parts[1], key=key)


def _parse_data_key(name: str, raw: str) -> str | None:
    value = _scalar(name, raw)
    if value is not None and not _DATA_KEY_RE.fullmatch(value):
        raise AnnotationError(name, f"{_show(value)} is not a valid key (letters, digits, -._)")
    return value


def _parse_script(name: str, raw: str) -> str | None:
    text = _text(name, raw, MAX_SCRIPT_CHARS, multiline=True)
    return text if text.strip() else None


def _parse_system_uuid(name: str, raw: str) -> str | None:
    value = _scalar(name, raw)
    if value is None:
        return None
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise AnnotationError(name, f"{_show(value)} is not a UUID") from None


# libvirt <cpu> -----------------------------------------------------------------


def _fold_keys(where: str, data: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """Keys matched case-insensitively against `allowed` (given lower-case)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        low = key.lower()
        if low not in allowed:
            raise ValueError(f"{where}unknown key {_show(key)} (known: {', '.join(k.capitalize() for k in allowed)})")
        if low in out:
            raise ValueError(f"{where}key {_show(key)} is given twice")
        out[low] = value
    return out


def _cpu_enum(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise ValueError(f"{where}{_show(str(value))} is not one of {', '.join(allowed)}")
    return value.strip().lower()


def _cpu_model_spec(value: Any) -> CPUModelSpec:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = {"value": value}
    if not isinstance(value, dict):
        raise ValueError("Model must be a model name or a mapping with Value and Fallback")
    fields = _fold_keys("Model: ", value, ("value", "fallback"))
    name = fields.get("value")
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)  # e.g. QEMU's "486"
    if not isinstance(name, str) or not CPU_MODEL_NAME_RE.fullmatch(name.strip()):
        raise ValueError(f"Model: Value {_show(str(name))} is not a CPU model name (letters, digits, _.+-)")
    fallback = fields.get("fallback")
    return CPUModelSpec(
        value=name.strip(),
        fallback=None if fallback is None else _cpu_enum("Model: Fallback ", fallback, ("allow", "forbid")),
    )


def _cpu_features(value: Any) -> tuple[CPUFeature, ...]:
    if not isinstance(value, list):
        raise ValueError("Features must be a list of mappings with Name and Policy")
    if len(value) > MAX_CPU_FEATURES:
        raise ValueError(f"too many Features (at most {MAX_CPU_FEATURES})")
    features: list[CPUFeature] = []
    for i, item in enumerate(value):
        where = f"Features[{i}]: "
        if not isinstance(item, dict):
            raise ValueError(f"{where}must be a mapping with Name and Policy")
        fields = _fold_keys(where, item, ("name", "policy"))
        fname = fields.get("name")
        if not isinstance(fname, str) or not CPU_FEATURE_NAME_RE.fullmatch(fname.strip()):
            raise ValueError(f"{where}Name {_show(str(fname))} is not a CPU feature name")
        if any(f.name == fname.strip() for f in features):
            raise ValueError(f"{where}feature {_show(fname)} is listed twice")
        policy = fields.get("policy")
        features.append(CPUFeature(
            name=fname.strip(),
            policy=None if policy is None else _cpu_enum(
                f"{where}Policy ", policy, ("force", "require", "optional", "disable", "forbid")),
        ))
    return tuple(features)


def parse_libvirt_cpu_setting(data: dict[str, Any]) -> LibvirtCPUSetting:
    fields = _fold_keys("", data, ("mode", "match", "check", "model", "features"))
    setting = LibvirtCPUSetting(
        mode=None if fields.get("mode") is None else _cpu_enum(
            "Mode ", fields["mode"], ("custom", "host-model", "host-passthrough", "maximum")),
        match=None if fields.get("match") is None else _cpu_enum(
            "Match ", fields["match"], ("minimum", "exact", "strict")),
        check=None if fields.get("check") is None else _cpu_enum(
            "Check ", fields["check"], ("none", "partial", "full")),
        model=None if fields.get("model") is None else _cpu_model_spec(fields["model"]),
        features=() if fields.get("features") is None else _cpu_features(fields["features"]),
    )
    if setting.features and setting.model is None and setting.mode in (None, "custom"):
        raise ValueError("Features need a Model in custom mode (libvirt refuses a feature list without a model)")
    return setting


def _parse_libvirt_cpu_setting(name: str, raw: str) -> LibvirtCPUSetting | None:
    data = _yaml_mapping(name, raw, MAX_CPU_SETTING_CHARS)
    if data is None:
        return None
    try:
        return parse_libvirt_cpu_setting(data)
    except ValueError as e:
        raise AnnotationError(name, str(e)) from None


def _parse_disks(name: str, raw: str) -> tuple[disk_spec.DiskSpec, ...] | None:
    text = _text(name, raw, disk_spec.MAX_DISKS_CHARS, multiline=True)
    if not text.strip():
        return None
    try:
        data = load_yaml(text)
    except ValueError as e:
        raise AnnotationError(name, str(e)) from None
    try:
        return disk_spec.parse_entries(data, parse_quantity, MAX_ROOT_VOLUME_SIZE) or None
    except disk_spec.DiskSpecError as e:
        where, _, message = str(e).partition(": ")
        raise AnnotationError(name + where, message) from None


# --- the table -----------------------------------------------------------------

_Parser = Callable[[str, str], Any]

# annotation -> (VMAnnotations field, parser); checked in this order.
ANNOTATIONS: dict[str, tuple[str, _Parser]] = {
    TARGET_RUNTIME: ("target_runtime", _scalar),
    VCPU_COUNT: ("vcpu_count", _parse_vcpu_count),
    DISK_DRIVER: ("disk_driver", lambda n, r: _enum(n, r, ("virtio", "scsi"))),
    CPU_MODEL: ("cpu_model", _parse_cpu_model),
    LIBVIRT_CPU_SETTING: ("libvirt_cpu", _parse_libvirt_cpu_setting),
    ROOT_VOLUME_SIZE: ("root_volume_size", _parse_root_volume_size),
    SSH_KEYS: ("ssh_keys", _parse_ssh_keys),
    SSH_KEY_SOURCE: ("ssh_key_source",
                     lambda n, r: _data_source(n, r, with_key=True, default_key="authorized_keys")),
    CLOUD_INIT_USER_DATA: ("cloud_init_user_data", lambda n, r: _yaml_mapping(n, r, MAX_USER_DATA_CHARS)),
    CLOUD_INIT_META_DATA: ("cloud_init_meta_data", lambda n, r: _yaml_mapping(n, r, MAX_META_DATA_CHARS)),
    CLOUD_INIT_USER_DATA_OVERWRITE: ("cloud_init_user_data_overwrite", _parse_bool),
    CLOUD_INIT_USER_DATA_SCRIPT: ("cloud_init_user_data_script", _parse_script),
    CLOUD_INIT_USER_DATA_SOURCE: ("cloud_init_user_data_source", lambda n, r: _data_source(n, r, with_key=False)),
    CLOUD_INIT_USER_DATA_SOURCE_KEY: ("cloud_init_user_data_source_key", _parse_data_key),
    CLOUD_INIT_USER_DATA_SOURCE_ENCODING: ("cloud_init_user_data_source_encoding",
                                           lambda n, r: _enum(n, r, ("plain", "base64"))),
    CLOUD_INIT_IMAGE_TYPE: ("cloud_init_image_type", lambda n, r: _enum(n, r, ("nocloud", "configdrive"))),
    FILES_FROM_DATA_SOURCE: ("files_from_data_source", lambda n, r: _data_source(n, r, with_key=False)),
    CHOWN_9PFS_MOUNTS: ("chown_9pfs_mounts", _parse_bool),
    FORCE_DHCP_NETWORK_CONFIG: ("force_dhcp_network_config", _parse_bool),
    SYSTEM_UUID: ("system_uuid", _parse_system_uuid),
    NETWORK_BINDING: ("network_binding", lambda n, r: _enum(n, r, ("bridge", "masquerade"))),
    DISKS: ("disks", _parse_disks),
    ROOT_REIMAGE: ("root_reimage", _parse_bool),
}
