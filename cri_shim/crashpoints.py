"""Named points where tests can make the daemon die as if by kill -9.

Set VMLET_CRASHPOINT=<name> in the daemon's environment and it SIGKILLs
itself when it reaches that point, so crash-consistency tests hit exact
steps (after the overlay exists, after the domain is defined, ...) instead
of racing a timer. Unset, a crashpoint costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("VMLET_CRASHPOINT", "")


def crashpoint(name: str) -> None:
    if _TARGET and name == _TARGET:
        os.kill(os.getpid(), signal.SIGKILL)
