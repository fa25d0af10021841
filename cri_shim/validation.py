"""Checks on what the kubelet (or any CRI client) sends, with messages naming the field.

Everything here is treated as hostile input: names end up in libvirt
metadata, cloud-init data and log paths, so they are bounded and free of
control characters, and log paths cannot climb out of their directory.
"""

from __future__ import annotations

import os
import re

from . import errors

MAX_NAME = 253
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name(value: str, field: str, required: bool = True) -> str:
    if not value:
        if required:
            raise errors.invalid_argument(f"{field} must not be empty")
        return value
    if len(value) > MAX_NAME:
        raise errors.invalid_argument(f"{field} is {len(value)} characters long; at most {MAX_NAME} are allowed")
    if _CONTROL.search(value):
        raise errors.invalid_argument(f"{field} must not contain control characters")
    return value


def hostname(pod_name: str) -> str:
    """A valid host name (RFC 1123 label) from the pod's name."""
    label = re.sub(r"[^a-z0-9-]+", "-", pod_name.lower()).strip("-")[:63].strip("-")
    return label or "vm"


def log_directory(value: str, field: str = "config.log_directory") -> str:
    if value and not os.path.isabs(value):
        raise errors.invalid_argument(f"{field} must be an absolute path, got {value!r}")
    if _CONTROL.search(value):
        raise errors.invalid_argument(f"{field} must not contain control characters")
    return value


def log_path(directory: str, relative: str, field: str = "config.log_path") -> str:
    """The container's absolute log path, or "" when the kubelet asked for no log."""
    if not relative:
        return ""
    if not directory:
        raise errors.invalid_argument(f"{field} is set but the sandbox has no log_directory")
    if os.path.isabs(relative) or ".." in relative.split("/") or _CONTROL.search(relative):
        raise errors.invalid_argument(f"{field} must be a relative path inside the sandbox's log directory, "
                                      f"got {relative!r}")
    return os.path.join(directory, relative)
