"""`criproxy`: one CRI socket for the kubelet, routing VM pods to vmlet and the rest to containerd.

    criproxy [serve] --listen /run/criproxy/criproxy.sock \\
        --backend containerd=/run/containerd/containerd.sock --backend virtlet.cloud=/run/vmlet/vmlet.sock \\
        [--default containerd] [--config /etc/criproxy/criproxy.yaml] [--log-level info]
    criproxy install [--root /] [--kubelet-flags F] [--kubelet-config F] [--backend virtlet.cloud=/run/vmlet/vmlet.sock]
    criproxy uninstall [--root /]

Config file keys (flags override): listen, default, backends: [{name, socket}], log_level.
The first backend is the default unless --default names another.
"""

from __future__ import annotations

import os
import sys

# gRPC's EventEngine does every socket read and write on its own threads and hands the results over;
# with its older I/O layer the threads waiting for a call poll the sockets themselves, which costs
# ~0.1 ms less per proxied call on 2 cores (bench/criproxy_latency.py, docs/criproxy.md). gRPC reads
# this when it is first imported, so it is set here, before anything imports grpc; an operator's own
# GRPC_EXPERIMENTS wins. A rollout flag: once gRPC drops the old layer it does nothing.
if "grpc" not in sys.modules:
    os.environ.setdefault("GRPC_EXPERIMENTS",
                          "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from cri_shim.main import package_version  # noqa: E402
from criproxy import install as installer  # noqa: E402
from criproxy.routing import parse_backends  # noqa: E402

DEFAULT_LISTEN = installer.PROXY_SOCKET
CONFIG_KEYS = {"listen", "default", "backends", "log_level"}


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--listen", help=f"unix socket to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--backend", action="append", default=[], metavar="NAME=SOCKET",
                   help="a runtime (repeatable); NAME is what pods' kubernetes.io/target-runtime names")
    p.add_argument("--default", help="the default backend's name (default: the first)")
    p.add_argument("--log-level", help="debug|info|warning|error (default info)")


def load_config(args) -> dict:
    cfg: dict = {}
    if args.config:
        cfg = yaml.safe_load(args.config.read_text()) or {}
        unknown = set(cfg) - CONFIG_KEYS
        if unknown:
            raise SystemExit(f"criproxy: unknown config keys in {args.config}: {sorted(unknown)}")
    backends = [(b["name"], str(b["socket"])) for b in cfg.get("backends", [])]
    if args.backend:
        backends = parse_backends(args.backend)
    if not backends:
        raise SystemExit("criproxy: no backends (use --backend NAME=SOCKET or a config file)")
    return {
        "listen": args.listen or cfg.get("listen") or DEFAULT_LISTEN,
        "backends": backends,
        "default": args.default or cfg.get("default") or backends[0][0],
        "log_level": (args.log_level or cfg.get("log_level") or "info").upper(),
    }


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
GRACE = 5  # seconds the calls in progress get to finish on SIGTERM/SIGINT


def _serve(cfg: dict) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully (calls in progress get GRACE seconds);
    a second signal meanwhile exits at once.

    The signals are blocked in every thread and taken with sigwait() by this one: no Python signal
    handler runs (one that sets a threading.Event can deadlock on the Event's lock), and gRPC's
    threads, made by serve(), inherit the mask, so the kernel never hands them a signal either."""
    from criproxy.server import serve
    log = logging.getLogger("criproxy")
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    server, proxy = serve(cfg["listen"], cfg["backends"], cfg["default"])
    sig = signal.sigwait(STOP_SIGNALS)
    log.info("%s: stopping (calls in progress get %d s; a second signal stops at once)",
             signal.Signals(sig).name, GRACE)
    stopped = server.stop(grace=GRACE)
    while not stopped.is_set():
        info = signal.sigtimedwait(STOP_SIGNALS, 0.1)
        if info is not None:
            log.warning("%s again: exiting now", signal.Signals(info.si_signo).name)
            logging.shutdown()
            os._exit(128 + info.si_signo)
    proxy.close()  # closing the channels also ends handlers still waiting on a backend
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="criproxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"criproxy {package_version()}")
    sub = parser.add_subparsers(dest="cmd")
    _serve_args(sub.add_parser("serve", help="serve the proxy (the default command)"))
    ins = sub.add_parser("install", help="point an existing node's kubelet at the proxy")
    ins.add_argument("--root", type=Path, default=Path("/"))
    ins.add_argument("--kubelet-flags", default="/var/lib/kubelet/kubeadm-flags.env")
    ins.add_argument("--kubelet-config", default="/var/lib/kubelet/config.yaml")
    ins.add_argument("--backend", action="append", default=None, metavar="NAME=SOCKET",
                     help="non-default backends (default virtlet.cloud=/run/vmlet/vmlet.sock)")
    ins.add_argument("--default-name", default="containerd", help="name of the node's current runtime")
    ins.add_argument("--listen", default=DEFAULT_LISTEN)
    ins.add_argument("--criproxy-bin", default=None, help="path of criproxy in the unit (default: this one)")
    un = sub.add_parser("uninstall", help="undo `criproxy install`")
    un.add_argument("--root", type=Path, default=Path("/"))
    if not argv or argv[0] not in ("serve", "install", "uninstall", "-h", "--help", "--version"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)

    if args.cmd == "install":
        backends = parse_backends(args.backend or ["virtlet.cloud=/run/vmlet/vmlet.sock"])
        exe = args.criproxy_bin or str(Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "criproxy"
                                       else "/usr/local/bin/criproxy")
        try:
            state = installer.install(args.root, args.kubelet_flags, args.kubelet_config, backends,
                                      default_name=args.default_name, listen=args.listen, criproxy_bin=exe)
        except installer.InstallError as e:
            print(f"criproxy install: {e}", file=sys.stderr)
            return 1
        print(json.dumps(state, indent=2))
        print(f"next: {installer.NEXT_STEPS}", file=sys.stderr)
        return 0
    if args.cmd == "uninstall":
        state = installer.uninstall(args.root)
        print("criproxy uninstall: " + ("not installed" if state is None else "done"), file=sys.stderr)
        if state is not None:
            print("next: systemctl daemon-reload && systemctl disable --now criproxy && systemctl restart kubelet",
                  file=sys.stderr)
        return 0

    cfg = load_config(args)
    logging.basicConfig(level=cfg["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _serve(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
