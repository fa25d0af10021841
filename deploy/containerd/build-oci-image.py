#!/usr/bin/env python3
"""Write a tiny OCI image archive (oci-layout tar) from Debian's static busybox — no docker, no registry.

    build-oci-image.py --name localhost/vmlet/pause:1 --out pause.tar -- /bin/sh -c '...'

The first layer holds /bin/busybox and a symlink per applet (sh, sleep, cat, ...),
plus /etc/passwd, /etc/group, /tmp; `--file PATH=TEXT` (repeatable) adds a second layer with
those files (tests use it for images of their own whose every layer must come from a registry).
The archive is reproducible: the same busybox, name, command and files give the same bytes
(mtimes are 0), so the image digest is stable.
Import it with `ctr -n k8s.io images import <tar>`; the image is named by the
`io.containerd.image.name` annotation in index.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

APPLETS_FALLBACK = ["sh", "sleep", "cat", "echo", "ls", "true", "false", "id", "hostname", "env", "ps", "kill"]


def _tarinfo(name: str, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    tar.addfile(_tarinfo(name, size=len(data), mode=mode), io.BytesIO(data))


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
        names = sorted({a.strip() for a in out.split() if a.strip() and "/" not in a})
        return names or APPLETS_FALLBACK
    except (OSError, subprocess.CalledProcessError):
        return APPLETS_FALLBACK


def layer_tar(busybox: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            tar.addfile(_tarinfo(d, type=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755))
        _add_bytes(tar, "bin/busybox", busybox.read_bytes(), mode=0o755)
        for applet in _applets(busybox):
            if applet != "busybox":
                tar.addfile(_tarinfo(f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777))
        _add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        _add_bytes(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def files_layer_tar(files: dict[str, str]) -> bytes:
    """A layer with the given files (path in the image -> text), parent directories included."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    tar.addfile(_tarinfo(d, type=tarfile.DIRTYPE, mode=0o755))
            _add_bytes(tar, "/".join(parts), files[path].encode())
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    _add_bytes(tar, f"blobs/sha256/{digest}", data)
    return f"sha256:{digest}", len(data)


def build(name: str, cmd: list[str], out: Path, busybox: Path, files: dict[str, str] | None = None) -> str:
    """Write the archive; returns the manifest digest."""
    layers = [layer_tar(busybox)] + ([files_layer_tar(files)] if files else [])
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in layers]},
        "history": [{"created_by": f"vmlet build-oci-image.py (busybox) {' '.join(cmd)}"}]
                   + ([{"created_by": f"vmlet build-oci-image.py --file {' '.join(sorted(files))}"}] if files else []),
    }
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        layer_blobs = [_blob(tar, layer) for layer in layers]
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_digest, config_size = _blob(tar, config_bytes)
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size} for layer_digest, layer_size in layer_blobs],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        manifest_digest, manifest_size = _blob(tar, manifest_bytes)
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
        index = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }],
        }
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode())
    tmp.replace(out)
    return manifest_digest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="image name, e.g. localhost/vmlet/pause:1")
    p.add_argument("--out", required=True, type=Path, help="archive to write")
    p.add_argument("--busybox", type=Path, default=Path("/bin/busybox"), help="a statically linked busybox")
    p.add_argument("--file", action="append", default=[], metavar="PATH=TEXT",
                   help="add a file with this text in a second layer (repeatable)")
    p.add_argument("cmd", nargs="+", help="the image's Cmd")
    args = p.parse_args(argv)
    files = {}
    for spec in args.file:
        path, sep, text = spec.partition("=")
        if not sep or not path.strip("/"):
            p.error(f"--file wants PATH=TEXT, got {spec!r}")
        files[path] = text
    print(build(args.name, args.cmd, args.out, args.busybox, files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
