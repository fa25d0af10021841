"""The real vmlet daemon in a subprocess, and a CRI client for it — what the kubelet or crictl would be.

Tests start `python -m cri_shim.main` with a state dir and socket of their
own, talk gRPC to it over the unix socket, and can kill -9 it (or make it
kill itself at a crashpoint) and start it again on the same state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from proto.runtime.v1 import api_pb2, api_pb2_grpc
from tests.support import libvirt_env

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60


@dataclass
class Client:
    channel: grpc.Channel
    runtime: api_pb2_grpc.RuntimeServiceStub
    images: api_pb2_grpc.ImageServiceStub

    def close(self) -> None:
        self.channel.close()


def connect(socket: Path) -> Client:
    channel = grpc.insecure_channel(f"unix://{socket}")
    return Client(channel, api_pb2_grpc.RuntimeServiceStub(channel), api_pb2_grpc.ImageServiceStub(channel))


@dataclass
class VmletProcess:
    state_dir: Path
    socket: Path
    config_file: Path
    log_file: Path
    proc: subprocess.Popen | None = None
    client: Client | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, crashpoint: str | None = None) -> Client:
        env = dict(os.environ, PYTHONPATH=str(REPO), **self.extra_env)
        env.pop("VMLET_CRASHPOINT", None)
        if crashpoint:
            env["VMLET_CRASHPOINT"] = crashpoint
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cri_shim.main", "--config", str(self.config_file)],
                                     cwd=REPO, env=env, stdout=log, stderr=log)
        log.close()
        self.client = connect(self.socket)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.client.runtime.Version(api_pb2.VersionRequest(), timeout=2)
                return self.client
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vmlet did not start (exit {self.proc.poll()}); log:\n{self.log()[-4000:]}")
                time.sleep(0.2)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_dead(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Graceful: SIGTERM, as a service manager would."""
        if self.client:
            self.client.close()
            self.client = None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.client:
            self.client.close()
            self.client = None
        if self.alive():
            self.proc.kill()
            self.proc.wait()


def write_config(path: Path, state_dir: Path, socket: Path, translations: Path | None, **extra) -> None:
    config = {
        "socket": str(socket),
        "state_dir": str(state_dir),
        "libvirt_uri": libvirt_env.LIBVIRT_URI,
        "accelerator": libvirt_env.DOMAIN_TYPE,
        "domain_prefix": libvirt_env.RUN_PREFIX,
        "image_allow_networks": ["127.0.0.0/8"],
        "default_memory_mib": 256,
        "log_level": "debug",
        **extra,
    }
    if translations is not None:
        config["image_translations"] = str(translations)
    path.write_text(yaml.safe_dump(config))


def translations_for(path: Path, images: dict[str, str]) -> Path:
    """A translation file mapping virtlet.cloud/<name> to loopback URLs (plain http allowed)."""
    path.write_text(yaml.safe_dump({
        "translations": [{"name": name, "url": url, "transport": "loopback"} for name, url in images.items()],
        "transports": {"loopback": {"allowHTTP": True, "readTimeout": 10000}},
    }))
    return path


# ---------------------------------------------------------------- request builders, kubelet-style

def pod_config(name: str | None = None, namespace: str = "default", uid: str | None = None, attempt: int = 0,
               annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
               log_directory: str = "") -> api_pb2.PodSandboxConfig:
    name = name or f"vm-{uuid.uuid4().hex[:6]}"
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace=namespace, uid=uid or str(uuid.uuid4()),
                                            attempt=attempt),
        hostname=name, log_directory=log_directory,
        labels={"app": "vmlet-test", **(labels or {})},
        annotations={"kubernetes.io/target-runtime": "virtlet.cloud", **(annotations or {})})


def container_config(image: str, name: str = "vm", memory_mib: int = 256, log_path: str = "vm/0.log",
                     envs: dict[str, str] | None = None, labels: dict[str, str] | None = None,
                     cpu_quota: int = 0) -> api_pb2.ContainerConfig:
    cfg = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name, attempt=0), image=api_pb2.ImageSpec(image=image),
        log_path=log_path, labels={"role": "vm", **(labels or {})},
        annotations={"test": "yes"},
        envs=[api_pb2.KeyValue(key=k, value=v) for k, v in (envs or {}).items()])
    cfg.linux.resources.memory_limit_in_bytes = memory_mib * 1024 * 1024
    if cpu_quota:
        cfg.linux.resources.cpu_period = 100000
        cfg.linux.resources.cpu_quota = cpu_quota
    return cfg
