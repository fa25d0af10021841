"""`criproxy`: one CRI socket for the kubelet, routing VM pods to vmlet and the rest to containerd.

Not implemented yet: only --version answers.
"""

from __future__ import annotations

import argparse
import sys

from cri_shim.main import package_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="criproxy", description="CRI proxy: VM pods to vmlet, others to containerd")
    parser.add_argument("--version", action="version", version=f"criproxy {package_version()}")
    parser.parse_args(argv)
    print("criproxy: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
