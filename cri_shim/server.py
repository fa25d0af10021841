"""Wiring: config → libvirt, image store, runtime, recovery → one gRPC server on a unix socket.

The RuntimeService and the ImageService share the socket, as the kubelet
expects of one runtime endpoint. The streaming server (the URLs of Exec,
Attach and PortForward) starts before the CRI is served and stops after it.
Shutdown stops serving and leaves VMs running: they are the pods'
workloads, not the daemon's.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc

from image_service import translation
from image_service.server import start_on_unix_socket
from image_service.service import ImageService
from image_service.urlpolicy import AddressPolicy
from proto.runtime.v1 import api_pb2_grpc

from . import accel, recovery, stream_requests
from .config import Config
from .errors import DecodeErrors
from .libvirt_host import LibvirtHost
from .runtime import Runtime
from .service import RuntimeService
from .storage.vm_files import ensure_traversable
from .streaming.server import ServerConfig, StreamingServer

log = logging.getLogger("vmlet")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        ensure_traversable(config.state_dir, config.vms_dir, config.pods_dir)
        self.host = LibvirtHost(config.libvirt_uri)
        domain_type, why = accel.resolve(config.accelerator, config.accelerator_probe_image, config.state_dir)
        log.info("accelerator %s -> domain type %s (%s)", config.accelerator, domain_type, why)
        translator = translation.load(config.image_translations) if config.image_translations else None
        policy = AddressPolicy.from_strings(config.image_deny_networks, config.image_allow_networks)
        self.images = ImageService(config.state_dir, translator=translator, policy=policy)
        ensure_traversable(config.state_dir / "images")
        self.runtime = Runtime(config, self.host, self.images.store, domain_type)
        report = recovery.recover(self.runtime)
        log.info("recovered: %s", {k: len(v) for k, v in report.items()})
        self.server: grpc.Server | None = None
        self.streaming: StreamingServer | None = None
        self.stopped = threading.Event()

    def streaming_config(self) -> ServerConfig:
        c = self.config
        return ServerConfig(address=c.streaming_address, port=c.streaming_port, tls_cert=c.streaming_tls_cert,
                            tls_key=c.streaming_tls_key, advertise_address=c.streaming_advertise_address,
                            stream_idle_timeout=c.streaming_idle_timeout,
                            max_connections=c.streaming_max_connections)

    def serve(self) -> None:
        self.streaming = stream_requests.start_server(self.runtime, self.streaming_config())
        # DecodeErrors: a request that is not valid protobuf is the client's mistake (INVALID_ARGUMENT), not INTERNAL.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="cri"),
                             interceptors=[DecodeErrors()])
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(self.runtime), server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(self.images, server)
        start_on_unix_socket(server, self.config.socket)
        self.server = server
        log.info("serving the CRI on unix://%s", self.config.socket)

    def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None
        if self.streaming is not None:
            self.streaming.stop()
            self.streaming = None
            self.runtime.streaming = None
        self.runtime.close()
        self.images.close()
        self.host.close()
        self.config.socket.unlink(missing_ok=True)
        self.stopped.set()
