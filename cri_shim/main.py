"""`vmlet`: the node daemon serving the CRI (RuntimeService + ImageService) on a unix socket."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def package_version() -> str:
    try:
        return version("vmlet")
    except PackageNotFoundError:
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmlet", description="vmlet node runtime: VM pods over the CRI")
    parser.add_argument("--version", action="version", version=f"vmlet {package_version()}")
    parser.add_argument("--config", type=Path, help="YAML config file (flags override it)")
    parser.add_argument("--socket", type=Path, help="CRI socket path (default /run/vmlet/vmlet.sock)")
    parser.add_argument("--libvirt-uri", help="libvirt URI (default qemu:///system)")
    parser.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/vmlet)")
    parser.add_argument("--accelerator", choices=("auto", "kvm", "qemu"), help="VM accelerator (default auto)")
    parser.add_argument("--image-translations", type=Path, help="image name translation YAML")
    parser.add_argument("--image-allow-network", action="append", dest="image_allow_networks", metavar="CIDR",
                        help="let image downloads reach this range even if denied (repeatable)")
    parser.add_argument("--streaming-address", help="IP address of the streaming server (default 127.0.0.1)")
    parser.add_argument("--streaming-port", type=int, help="port of the streaming server (default 0: a free one)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("text", "json"), help="daemon log format (default text)")
    args = parser.parse_args(argv)

    from .config import ConfigError, load
    from .logs import configure as configure_logging
    try:
        config = load(args.config, socket=args.socket, libvirt_uri=args.libvirt_uri, state_dir=args.state_dir,
                      accelerator=args.accelerator, image_translations=args.image_translations,
                      image_allow_networks=args.image_allow_networks, log_level=args.log_level,
                      streaming_address=args.streaming_address, streaming_port=args.streaming_port,
                      log_format=args.log_format)
    except ConfigError as e:
        print(f"vmlet: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)

    from .server import Daemon
    try:
        daemon = Daemon(config)
    except Exception as e:  # noqa: BLE001 - start-up failure: one clear line, non-zero exit
        logging.getLogger("vmlet").exception("cannot start")
        print(f"vmlet: cannot start: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        daemon.serve()
    except OSError as e:  # the streaming port taken, its TLS files unreadable: one clear line
        logging.getLogger("vmlet").exception("cannot serve")
        print(f"vmlet: cannot serve: {e}", file=sys.stderr)
        daemon.stop()
        return 1
    stop.wait()
    logging.getLogger("vmlet").info("shutting down; VMs keep running")
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
