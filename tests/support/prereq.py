"""Prerequisites: under CI=true a missing one fails the test, elsewhere it skips with the reason."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, reason: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)
