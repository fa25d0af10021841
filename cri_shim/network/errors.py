"""Errors of the pod network package. The shim maps them to gRPC status codes."""

from __future__ import annotations


class NetworkError(Exception):
    """Pod network setup, check or teardown failed; the message says what and why."""


class CNIConfigError(NetworkError):
    """No usable CNI configuration (missing dir, no valid conflist, unsupported version)."""


class CNIPluginError(NetworkError):
    """A CNI plugin failed: not found, timed out, crashed, or answered with an error result.

    `code`, `msg` and `details` come from the plugin's error JSON when it sent one
    (CNI spec "Error" result); `plugin` and `command` name what ran.
    """

    def __init__(self, message: str, *, plugin: str = "", command: str = "", code: int | None = None,
                 msg: str = "", details: str = "") -> None:
        super().__init__(message)
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details


class NetworkLost(NetworkError):
    """The pod's network namespace is gone (host reboot, removed by hand): it cannot be repaired."""
