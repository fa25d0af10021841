"""Fixtures: the image service on a real unix socket (in-process or as a subprocess), its gRPC client,
the loopback HTTP server (tests/conftest.py) behind translation rules, and helpers to look at the store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import yaml

from image_service.server import serve
from image_service.service import ImageService
from image_service.translation import Translator, parse_documents
from image_service.urlpolicy import AddressPolicy
from proto.runtime.v1 import api_pb2, api_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
LOOPBACK = ("127.0.0.1/32",)


def rules(server, **transport) -> list[dict]:
    """`virtlet.cloud/srv/<path>` → the test server's `/<path>`, plain http allowed, short timeouts."""
    local = {"allowHTTP": True, "readTimeout": 2000, **transport}
    return [{
        "translations": [
            {"regexp": "srv/(.+)", "url": server.url("/$1"), "transport": "local"},
            {"name": "alias", "url": server.url("/small.qcow2"), "transport": "local"},
            {"name": "alias-slow", "url": server.url("/slow.qcow2"), "transport": "local"},
            {"regexp": "one-redirect/(.+)", "url": server.url("/$1"), "transport": "one-redirect"},
        ],
        "transports": {"local": local, "one-redirect": {**local, "maxRedirects": 1}},
    }]


class Client:
    """The CRI ImageService over gRPC, plus the in-process service object (acquire/release) when there is one."""

    def __init__(self, socket: Path, state_dir: Path, service: ImageService | None = None):
        self.socket, self.state_dir, self.service = socket, state_dir, service
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = api_pb2_grpc.ImageServiceStub(self.channel)

    def pull(self, image: str) -> str:
        return self.stub.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=60).image_ref

    def status(self, image: str, verbose: bool = False) -> api_pb2.ImageStatusResponse:
        return self.stub.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image), verbose=verbose))

    def list(self, image: str = "") -> list[api_pb2.Image]:
        flt = api_pb2.ImageFilter(image=api_pb2.ImageSpec(image=image)) if image else None
        return list(self.stub.ListImages(api_pb2.ListImagesRequest(filter=flt)).images)

    def remove(self, image: str) -> None:
        self.stub.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image)))

    def fsinfo(self) -> api_pb2.FilesystemUsage:
        (usage,) = self.stub.ImageFsInfo(api_pb2.ImageFsInfoRequest()).image_filesystems
        return usage

    @property
    def store(self) -> Path:
        return self.state_dir / "images"

    def leftovers(self) -> list[str]:
        """Files in the store's tmp/ and sha256/ directories."""
        return sorted(str(p.relative_to(self.store)) for d in ("tmp", "sha256") for p in (self.store / d).iterdir())

    def close(self) -> None:
        self.channel.close()


@contextlib.contextmanager
def rpc_error(code: grpc.StatusCode, *fragments: str):
    """Expect a gRPC error with `code` whose message contains every fragment."""
    with pytest.raises(grpc.RpcError) as e:
        yield e
    assert e.value.code() == code, f"{e.value.code()}: {e.value.details()}"
    for f in fragments:
        assert f in e.value.details(), f"{f!r} not in {e.value.details()!r}"


@pytest.fixture
def short_dir():
    """unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="vmlet-img-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_service(tmp_path, short_dir, image_server):
    """Start an in-process ImageService served on a unix socket; every one started is stopped at teardown."""
    started = []

    def _make(translations: list[dict] | None = None, state_dir: Path | None = None, allow=LOOPBACK, deny=None,
              **kwargs) -> Client:
        state = state_dir or tmp_path / "state"
        docs = rules(image_server) if translations is None else translations
        service = ImageService(state, Translator(parse_documents(docs, "test-rules")),
                               AddressPolicy.from_strings(deny, allow), **kwargs)
        sock = short_dir / f"image-{len(started)}.sock"
        server = serve(sock, service)
        client = Client(sock, state, service)
        started.append((server, service, client))
        return client

    yield _make
    for server, service, client in started:
        client.close()
        server.stop(0)
        service.close()


@pytest.fixture
def client(make_service) -> Client:
    return make_service()


@pytest.fixture
def small(image_server, hostile_images) -> Path:
    """The valid 16M qcow2, served at /small.qcow2."""
    image_server.serve_file("/small.qcow2", hostile_images["small-qcow2"])
    return hostile_images["small-qcow2"]


@pytest.fixture
def raw_disk(tmp_path) -> Path:
    """A raw disk image: 1 MiB of random bytes behind an MBR boot signature."""
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x55\xaa"
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(data))
    return path


class ServiceProcess:
    """`python -m image_service` as a subprocess (for restarts, crashes and the command line)."""

    def __init__(self, socket: Path, state_dir: Path, translations: Path, extra: list[str] = ()):
        self.socket, self.state_dir, self.translations, self.extra = socket, state_dir, translations, list(extra)
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "image_service", "--socket", str(self.socket), "--state-dir",
                str(self.state_dir), "--translations", str(self.translations), "--allow-network", "127.0.0.1/32",
                "--log-level", "WARNING", *self.extra]

    def start(self) -> Client:
        self.proc = subprocess.Popen(self.command(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        client = Client(self.socket, self.state_dir)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.list()
                return client
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    client.close()
                    out, err = self.proc.communicate(timeout=5) if self.proc.poll() is not None else (b"", b"")
                    raise AssertionError(
                        f"image service did not start ({self.proc.returncode}): {err.decode()}") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=20)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


@pytest.fixture
def service_process(tmp_path, short_dir, image_server):
    procs = []

    def _make(translations: list[dict] | None = None, extra: list[str] = ()) -> ServiceProcess:
        cfg = tmp_path / "translations.yaml"
        cfg.write_text(yaml.safe_dump_all(rules(image_server) if translations is None else translations))
        p = ServiceProcess(short_dir / "image.sock", tmp_path / "state", cfg, extra)
        procs.append(p)
        return p

    yield _make
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.stop(signal.SIGKILL)
