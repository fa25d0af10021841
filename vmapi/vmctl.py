"""`vmctl`: a kubectl-like CLI for VirtualMachine objects (start, stop, restart, list, status).

Not implemented yet: only --version answers.
"""

from __future__ import annotations

import argparse
import sys

from cri_shim.main import package_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmctl", description="Manage vmlet VirtualMachines")
    parser.add_argument("--version", action="version", version=f"vmctl {package_version()}")
    parser.parse_args(argv)
    print("vmctl: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
