"""The robustness suites' profile, one for all of them (docs/robustness.md).

VMLET_FUZZ=ci (the default: a fixed seed, bounded examples and rounds, what CI runs) or long (more of
everything); VMLET_FUZZ_SEED seeds the random rounds (kill points, fault schedules).
"""

from __future__ import annotations

import os

PROFILES = ("ci", "long")
PROFILE = os.environ.get("VMLET_FUZZ", "ci")
if PROFILE not in PROFILES:
    raise RuntimeError(f"VMLET_FUZZ={PROFILE!r}: use one of {', '.join(PROFILES)}")
LONG = PROFILE == "long"
SEED = int(os.environ.get("VMLET_FUZZ_SEED", "20261201"))
