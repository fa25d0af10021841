"""A real OCI registry on loopback: Debian's `docker-registry` (distribution v2), run with a config of our own.

    reg = Registry().start()                 # 127.0.0.1:<free port>, storage in a fresh temp dir
    img = reg.push_busybox(containerd_socket, "vmlet/busybox", "e2e-1234", token="1234")
    ...
    reg.stop()                               # kills it and removes its storage

The package's own service and /etc/docker/registry are never used. Pushing uses real tools only:
deploy/containerd/build-oci-image.py writes a busybox image with a second layer holding a token file
(so that layer, the config and the manifest are new blobs; the Cmd prints the token, so a container's
log proves its root filesystem came from that image), `ctr images import` loads it into a containerd
namespace of its own (not k8s.io: the CRI plugin never sees it) and `ctr images push --plain-http`
sends it to the registry; then the namespace's images are removed with `--sync` (containerd's GC drops
the blobs nothing else references) and the namespace is removed, so a CRI pull afterwards has to fetch
the manifest, the config and the token layer from the registry. The busybox layer is shared with
localhost/vmlet/busybox:1 and stays in containerd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_OCI_IMAGE = REPO / "deploy/containerd/build-oci-image.py"
BINARY = "docker-registry"
START_TIMEOUT = 30.0
TOKEN_FILE = "/etc/vmlet-registry-token"
DIR_PREFIX = "vmlet-test-registry-"          # + <pid of the test run>-<random>, under the temp dir
NAMESPACE_PREFIX = "vmlet-test-push-"        # + <pid>-<token>: containerd namespaces used for pushing
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an http_proxy

CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Vmlet-Registry: [{run}]
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """`docker-registry serve` on 127.0.0.1 with a free port and temporary storage."""

    def __init__(self, binary: str = BINARY):
        self.binary = binary
        self.dir: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        assert self.dir is not None
        return self.dir / "registry.log"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except (AssertionError, FileNotFoundError):
            return ""

    def start(self) -> "Registry":
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        (self.dir / "storage").mkdir()
        for _ in range(3):  # the free port can be taken between the probe and the bind
            self.port = _free_port()
            config = self.dir / "config.yml"
            # A header only this registry sends: the readiness probe must not take another run's
            # registry that still holds the port for ours.
            self.run_id = uuid.uuid4().hex
            config.write_text(CONFIG.format(storage=self.dir / "storage", port=self.port, run=self.run_id))
            with open(self.log_file, "ab") as log:
                # It dies with the test process even when that is SIGKILLed (setpriv sets the parent-death signal).
                self.proc = subprocess.Popen([*_DIE_WITH_PARENT, self.binary, "serve", str(config)],
                                             stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log, start_new_session=True)
            if self._wait_ready():
                return self
            self._kill()
        log = self.log()[-3000:]
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on /v2/; log:\n{log}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with _HTTP.open(f"http://{self.host}/v2/", timeout=2) as r:
                    if r.status == 200 and r.headers.get("X-Vmlet-Registry") == self.run_id:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tags(self, repository: str) -> list[str]:
        try:
            with _HTTP.open(f"http://{self.host}/v2/{repository}/tags/list", timeout=10) as r:
                return json.load(r).get("tags") or []
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise

    def served(self, method: str, path: str) -> bool:
        """True if the registry logged `method path` answered 200 (its info-level 'response completed' lines;
        logfmt: a value with a ':' in it, like a digest, is quoted)."""
        return any('msg="response completed"' in line and f"http.request.method={method} " in line
                   and (f"http.request.uri={path} " in line or f'http.request.uri="{path}" ' in line)
                   and "http.response.status=200 " in line
                   for line in self.log().splitlines())

    # ------------------------------------------------------------ pushing

    def push_busybox(self, containerd_socket: Path, repository: str, tag: str, token: str) -> PushedImage:
        """Push a busybox image whose Cmd prints `registry-image <token>` (read from its second layer), then idles.

        The image goes through a containerd namespace of its own, emptied and removed before returning.
        """
        assert self.dir is not None
        ref = f"{self.host}/{repository}:{tag}"
        cmd = ["/bin/sh", "-c", f'echo "registry-image $(cat {TOKEN_FILE})"; trap "exit 0" TERM; '
                                'while :; do sleep 1; done']
        namespace = f"{NAMESPACE_PREFIX}{os.getpid()}-{token}"
        archive = self.dir / f"{tag}.tar"
        manifest = _run(["python3", str(BUILD_OCI_IMAGE), "--name", ref, "--out", str(archive),
                         "--file", f"{TOKEN_FILE}={token}", "--", *cmd]).strip()
        try:
            config, layers = _digests(archive, manifest)
            ctr = ["ctr", "--address", str(containerd_socket), "--namespace", namespace]
            _run([*ctr, "images", "import", "--no-unpack", str(archive)])
            _run([*ctr, "images", "push", "--plain-http", ref, ref])
        finally:
            remove_namespace(containerd_socket, namespace)
            archive.unlink(missing_ok=True)
        return PushedImage(ref=ref, repository=repository, tag=tag, manifest_digest=manifest, config_digest=config,
                           layer_digests=layers, cmd=cmd)


@dataclass(frozen=True)
class PushedImage:
    ref: str              # <host>/<repository>:<tag>
    repository: str
    tag: str
    manifest_digest: str  # sha256:...
    config_digest: str    # sha256:... (the image ID containerd's CRI reports)
    layer_digests: list[str]  # the shared busybox layer, then the token layer
    cmd: list[str]


def _digests(archive: Path, manifest_digest: str) -> tuple[str, list[str]]:
    """(config digest, layer digests) of the archive's manifest."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile(f"blobs/sha256/{manifest_digest.removeprefix('sha256:')}")
        assert member is not None
        manifest = json.load(member)
    return manifest["config"]["digest"], [layer["digest"] for layer in manifest["layers"]]


def _run(args: list[str]) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def remove_namespace(containerd_socket: Path, namespace: str) -> None:
    """Remove every image of a containerd namespace (synchronously, so GC drops their blobs), then the namespace."""
    ctr = ["ctr", "--address", str(containerd_socket), "--namespace", namespace]
    listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, timeout=60)
    names = [n for n in listed.stdout.split() if n]
    if names:
        _run([*ctr, "images", "rm", "--sync", *names])
    existing = subprocess.run(["ctr", "--address", str(containerd_socket), "namespaces", "ls", "-q"],
                              capture_output=True, text=True, timeout=60).stdout.split()
    if namespace in existing:
        _run(["ctr", "--address", str(containerd_socket), "namespaces", "rm", namespace])


def _dead(pid: str) -> bool:
    return pid.isdigit() and not Path(f"/proc/{pid}").exists()


def sweep_stale(containerd_socket: Path) -> None:
    """Remove what crashed test runs left: storage dirs and push namespaces whose run (pid) is gone."""
    for d in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        if _dead(d.name.removeprefix(DIR_PREFIX).split("-", 1)[0]):
            shutil.rmtree(d, ignore_errors=True)
    listed = subprocess.run(["ctr", "--address", str(containerd_socket), "namespaces", "ls", "-q"],
                            capture_output=True, text=True, timeout=60).stdout.split()
    for ns in listed:
        if ns.startswith(NAMESPACE_PREFIX) and _dead(ns.removeprefix(NAMESPACE_PREFIX).split("-", 1)[0]):
            remove_namespace(containerd_socket, ns)
