"""The SPDY/3.1 test client (tests/support/spdyclient/main.go), compiled on demand.

It is Kubernetes' client side of exec/attach/port-forward over moby/spdystream,
built with Debian's Go in GOPATH mode against Debian's spdystream package: an
implementation of the protocol nobody here wrote. The binary is cached under
/var/cache/vmlet/spdyclient/ by the hash of its source and the Go version, and
the build is safe when several pytest processes ask at once (a lock file, an
atomic rename). Everything Go writes (build cache, temp files) stays in that
directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

from tests.support import prereq

SOURCE = pathlib.Path(__file__).with_name("spdyclient") / "main.go"
CACHE = pathlib.Path(os.environ.get("VMLET_SPDYCLIENT_CACHE", "/var/cache/vmlet/spdyclient"))
GOPATH = pathlib.Path("/usr/share/gocode")
SPDYSTREAM = GOPATH / "src/github.com/moby/spdystream"
PACKAGES = "golang-go golang-github-docker-spdystream-dev"


class Unavailable(RuntimeError):
    """Go or spdystream is missing: the message names the Debian package."""


def missing() -> str | None:
    """Why the client cannot be built here, or None."""
    if shutil.which("go") is None:
        return f"no Go toolchain (`go`): install the Debian package golang-go (deploy/setup-host.sh installs {PACKAGES})"
    if not (SPDYSTREAM / "connection.go").is_file():
        return (f"no spdystream source under {SPDYSTREAM}: install the Debian package "
                f"golang-github-docker-spdystream-dev (deploy/setup-host.sh installs {PACKAGES})")
    return None


def _env(work: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(GO111MODULE="off", GOPATH=str(GOPATH), GOCACHE=str(work / "go-build"), GOTMPDIR=str(work / "tmp"),
               GOENV="off", GOFLAGS="-trimpath", CGO_ENABLED="0", HOME=str(work))
    return env


def build() -> pathlib.Path:
    """The client's binary, compiled if its cached copy is missing. Raises Unavailable without Go/spdystream."""
    why = missing()
    if why:
        raise Unavailable(why)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "tmp").mkdir(exist_ok=True)
    env = _env(CACHE)
    version = subprocess.run(["go", "version"], env=env, capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    target = CACHE / f"spdyclient-{digest}"
    if target.exists():
        return target
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same binary
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=".spdyclient-", dir=CACHE)
        os.close(fd)
        try:
            proc = subprocess.run(["go", "build", "-o", tmp, str(SOURCE)], env=env, cwd=CACHE,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr}")
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def require() -> pathlib.Path:
    """build() for a test: skips (fails under CI=true) with the missing package named."""
    why = missing()
    prereq.require(why is None, why or "")
    return build()
