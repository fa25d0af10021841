"""`vmlet`: the node daemon serving the CRI on a unix socket.

The CRI server itself lands with the CRI shim; until then the command only
answers --version, so packaging and deploy scripts can already refer to it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("vmlet")
    except PackageNotFoundError:
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmlet", description="vmlet node runtime: VM pods over the CRI")
    parser.add_argument("--version", action="version", version=f"vmlet {package_version()}")
    parser.parse_args(argv)
    print("vmlet: the CRI server is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
