"""Regenerate the Python modules for the CRI proto.

Run from the repository root:

    python -m proto.generate          # rewrite proto/runtime/v1/api_pb2{.py,.pyi,_grpc.py}
    python -m proto.generate --check  # exit 1 and list the files that are stale

protoc comes from grpcio-tools (``grpc_tools.protoc``), so the output depends
on its version; the pinned version is the one the checked-in files were made
with. The include root is the repository root, so the modules import each
other as ``proto.runtime.v1.api_pb2``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Each .proto, relative to REPO_ROOT (which is also protoc's include root).
PROTO_FILES = ("proto/runtime/v1/api.proto",)


def outputs_for(proto: str) -> list[str]:
    """Paths (relative to the output root) protoc writes for one .proto."""
    stem = proto[: -len(".proto")]
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def expected_outputs() -> list[str]:
    return [out for proto in PROTO_FILES for out in outputs_for(proto)]


def generate(out_dir: Path | str = REPO_ROOT) -> None:
    """Run protoc on PROTO_FILES, writing the modules under out_dir."""
    from grpc_tools import protoc  # imported late: only needed to generate

    out_dir = Path(out_dir)
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={REPO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(REPO_ROOT / proto),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {proto}")


def stale_files() -> list[str]:
    """Generate into a temp dir; return the checked-in outputs that differ or are missing."""
    stale = []
    with tempfile.TemporaryDirectory(prefix="vmlet-proto-") as tmp:
        generate(tmp)
        for rel in expected_outputs():
            fresh = Path(tmp, rel).read_bytes()
            current = REPO_ROOT / rel
            if not current.is_file() or current.read_bytes() != fresh:
                stale.append(rel)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proto.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale generated files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated files (run `python -m proto.generate`):", file=sys.stderr)
            for rel in stale:
                print(f"  {rel}", file=sys.stderr)
            return 1
        print("generated files are up to date")
        return 0
    generate()
    for rel in expected_outputs():
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
