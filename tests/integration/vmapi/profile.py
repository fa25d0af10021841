"""Fuzz/fault profile, shared with the CRI and proxy suites: VMLET_FUZZ=ci (default) or long; VMLET_FUZZ_SEED."""

from __future__ import annotations

import os

PROFILE = os.environ.get("VMLET_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise RuntimeError(f"VMLET_FUZZ={PROFILE!r}: expected ci or long")
LONG = PROFILE == "long"
SEED = int(os.environ.get("VMLET_FUZZ_SEED", "20261201"))
