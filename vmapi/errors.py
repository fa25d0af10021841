"""Errors of the pure rendering modules (podspec, storage)."""

from __future__ import annotations


class SpecError(ValueError):
    """The spec passed the schema but cannot become a valid VM pod; the message names the field."""


class ClaimsUnavailable(Exception):
    """Claims the pod needs do not exist (yet): not the spec's fault, the pod waits for them."""

    def __init__(self, claims: tuple[str, ...]) -> None:
        self.claims = claims
        super().__init__("persistentvolumeclaims not available: " + ", ".join(claims))
