"""Serve the ImageService on a unix socket, standalone (`python -m image_service`) or for tests.

The shim will add the servicer to its own server (same socket as the RuntimeService); `serve()` is for
running and testing the image service on its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from image_service import translation
from image_service.decode import DecodeErrors
from image_service.service import ImageService
from image_service.urlpolicy import DEFAULT_DENY, AddressPolicy
from image_service.validate import Validator
from proto.runtime.v1 import api_pb2_grpc

log = logging.getLogger("vmlet.image")


def serve(socket_path: str | Path, service: ImageService, max_workers: int = 16) -> grpc.Server:
    """Start a gRPC server for `service` on unix://socket_path (mode 0660); stop it with server.stop()."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="image-rpc"),
                         interceptors=[DecodeErrors()])  # undecodable requests: INVALID_ARGUMENT, not INTERNAL
    api_pb2_grpc.add_ImageServiceServicer_to_server(service, server)
    start_on_unix_socket(server, socket_path)
    return server


def start_on_unix_socket(server: grpc.Server, socket_path: str | Path) -> None:
    """Bind `server` to a unix socket created 0660 (root and the runtime's group only) and start it."""
    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)  # a stale socket of a previous run
    old = os.umask(0o117)  # no window in which the socket is more open than 0660
    try:
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o660)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m image_service", description="vmlet CRI ImageService")
    p.add_argument("--socket", required=True, help="unix socket path to serve on")
    p.add_argument("--state-dir", required=True, help="the store lives in STATE_DIR/images")
    p.add_argument("--translations", help="image name translation YAML file or directory")
    p.add_argument("--deny-network", action="append", metavar="CIDR",
                   help=f"refuse downloads from these addresses (repeatable; default {' '.join(DEFAULT_DENY)})")
    p.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                   help="allow these addresses even if denied (repeatable; e.g. 127.0.0.1/32 for a local mirror)")
    p.add_argument("--max-virtual-size", type=_size, default=Validator.max_virtual_size, help="e.g. 512G")
    p.add_argument("--max-download-size", type=_size, default=64 << 30, help="e.g. 64G")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress log lines")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        translator = translation.load(args.translations)
        policy = AddressPolicy.from_strings(args.deny_network, args.allow_network)
    except ValueError as e:  # ConfigError included: a clear message, not a traceback
        print(f"image_service: {e}", file=sys.stderr)
        return 2
    try:
        service = ImageService(args.state_dir, translator, policy, Validator(max_virtual_size=args.max_virtual_size),
                               args.max_download_size, args.progress_interval)
    except (OSError, RuntimeError) as e:  # e.g. the store is in use by another process
        print(f"image_service: {e}", file=sys.stderr)
        return 1
    server = serve(args.socket, service)
    log.info("image service serving on unix://%s, store %s", args.socket, service.store.root)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("image service stopping")
    service.fetcher.close()  # downloads in progress end (and clean up) instead of holding up the exit
    server.stop(grace=5).wait()
    service.close()
    return 0
