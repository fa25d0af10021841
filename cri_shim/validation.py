"""Checks on what the kubelet (or any CRI client) sends, with messages naming the field.

Everything here is treated as hostile input and refused up front with
InvalidArgument, so a request is never accepted first and broken later:

* Text (names, paths, DNS entries): names end up in the libvirt domain's
  metadata, paths in its devices, cloud-init data and log paths. So they are
  bounded, free of control characters (C0, DEL, C1) and of what XML 1.0
  cannot carry (U+FFFE, U+FFFF, lone surrogates), and log paths cannot climb
  out of their directory. Labels and annotations that vmlet does not read are
  opaque: they never reach the XML and are echoed back as given (as
  containerd does); the annotations vmlet reads are checked by annotations.py.
* Resources: one rule for CreateContainer and UpdateContainerResources.
  Memory is 0 (the node's default) or from MIN_MEMORY to the host's RAM; the
  CPU limit is a CFS quota/period within libvirt's ranges (checked on libvirt
  9.0: period [1000, 1000000] µs, quota [1000, 2^44 - 1] µs); a quota <= 0 is
  no limit, a period of 0 is the kernel's default of 100 ms.
"""

from __future__ import annotations

import os
import re

from . import errors
from .errors import show
from .network.model import MAX_RESOLVER_OPTIONS, resolver_option_problem

MAX_NAME = 253
MAX_PATH = 4096
MAX_DNS_ENTRY = 1024
# Control characters (C0, DEL, C1) and what XML 1.0 cannot carry (lone surrogates, U+FFFE, U+FFFF).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")

MIB = 1024 * 1024
MIN_MEMORY = 64 * MIB
CPU_PERIOD_MIN, CPU_PERIOD_MAX = 1000, 1_000_000
CPU_QUOTA_MIN, CPU_QUOTA_MAX = 1000, 2**44 - 1  # libvirt's VIR_CGROUP_CPU_QUOTA_MAX
DEFAULT_CPU_PERIOD = 100_000


def _describe(ch: str) -> str:
    if "\ud800" <= ch <= "\udfff":
        return "an unpaired surrogate (not valid UTF-8)"
    if ch in "\ufffe\uffff":
        return f"U+{ord(ch):04X}, which XML 1.0 cannot carry"
    return f"control character U+{ord(ch):04X}"


def text(value: str, field: str, max_chars: int) -> str:
    """A single-line string: bounded, no control characters, nothing XML 1.0 cannot carry."""
    if len(value) > max_chars:
        raise errors.invalid_argument(f"{field} is {len(value)} characters long; at most {max_chars} are allowed")
    bad = _UNSAFE.search(value)
    if bad:
        raise errors.invalid_argument(f"{field} has {_describe(bad.group())} at position {bad.start()}; it must be "
                                      "free of control characters and of what XML 1.0 cannot carry")
    return value


def name(value: str, field: str, required: bool = True) -> str:
    if not value:
        if required:
            raise errors.invalid_argument(f"{field} must not be empty")
        return value
    return text(value, field, MAX_NAME)


def path(value: str, field: str) -> str:
    return text(value, field, MAX_PATH)


def dns_config(servers, searches, options, field: str = "config.dns_config") -> None:
    for kind, values in (("servers", servers), ("searches", searches), ("options", options)):
        for i, value in enumerate(values):
            text(value, f"{field}.{kind}[{i}]", MAX_DNS_ENTRY)
    # Options reach the guest's resolv.conf verbatim (cloud-init vendor-data): only resolv.conf's syntax.
    if len(options) > MAX_RESOLVER_OPTIONS:
        raise errors.invalid_argument(f"{field}.options has {len(options)} entries; at most "
                                      f"{MAX_RESOLVER_OPTIONS} are allowed")
    for i, value in enumerate(options):
        problem = resolver_option_problem(value)
        if problem:
            raise errors.invalid_argument(f"{field}.options[{i}] {show(value)} {problem}")


def memory_limit(value: int, field: str, max_bytes: int) -> int:
    """The memory limit in bytes, 0 when none is set; InvalidArgument with the allowed range otherwise."""
    if value == 0:
        return 0
    if not MIN_MEMORY <= value <= max_bytes:
        raise errors.invalid_argument(
            f"{field} is {value}; a VM's memory must be 0 (the node's default) or from {MIN_MEMORY} "
            f"({MIN_MEMORY // MIB} MiB) to {max_bytes} ({max_bytes // MIB} MiB, this host's memory)")
    return value


def cpu_limit(period: int, quota: int, field: str) -> tuple[int, int]:
    """(period, quota) in µs of a CPU limit, (0, 0) for none; InvalidArgument with libvirt's ranges otherwise."""
    if period != 0 and not CPU_PERIOD_MIN <= period <= CPU_PERIOD_MAX:
        raise errors.invalid_argument(f"{field}.cpu_period is {period}; it must be 0 (the default, "
                                      f"{DEFAULT_CPU_PERIOD}) or from {CPU_PERIOD_MIN} to {CPU_PERIOD_MAX} µs")
    if quota <= 0:
        return 0, 0
    if not CPU_QUOTA_MIN <= quota <= CPU_QUOTA_MAX:
        raise errors.invalid_argument(f"{field}.cpu_quota is {quota}; it must be 0 or less (no limit) or from "
                                      f"{CPU_QUOTA_MIN} to {CPU_QUOTA_MAX} µs")
    return period or DEFAULT_CPU_PERIOD, quota


def hostname(pod_name: str) -> str:
    """A valid host name (RFC 1123 label) from the pod's name."""
    label = re.sub(r"[^a-z0-9-]+", "-", pod_name.lower()).strip("-")[:63].strip("-")
    return label or "vm"


def log_directory(value: str, field: str = "config.log_directory") -> str:
    path(value, field)
    if value and not os.path.isabs(value):
        raise errors.invalid_argument(f"{field} must be an absolute path, got {show(value)}")
    return value


def log_path(directory: str, relative: str, field: str = "config.log_path") -> str:
    """The container's absolute log path, or "" when the kubelet asked for no log."""
    if not relative:
        return ""
    if not directory:
        raise errors.invalid_argument(f"{field} is set but the sandbox has no log_directory")
    path(relative, field)
    if os.path.isabs(relative) or ".." in relative.split("/"):
        raise errors.invalid_argument(f"{field} must be a relative path inside the sandbox's log directory, "
                                      f"got {show(relative)}")
    return os.path.join(directory, relative)
