"""Run the VM controller: `python -m vmapi.operator` (what `kopf run` would do, with our options).

    python -m vmapi.operator [--kubeconfig PATH] [--peering NAME | --standalone] [-n NS ...]

Credentials: --kubeconfig, else the in-cluster service account, else
~/.kube/config. kopf and the kubernetes client use the same ones.

Running two controllers: kopf peering (the default, `--peering vmlet`) makes
the one with the lower priority pause while another is alive, so a rolling
update or an accidental second copy do not act twice. Even without it the
controller is safe to run twice — every write is idempotent or guarded (see
reconcile.py) — it only does double work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import kopf

from vmapi import controller, reconcile  # noqa: F401  (importing controller registers the handlers)
from vmapi.client import Kube, load_api_client

USER_AGENT = "vmlet-controller"


def make_memo(kubeconfig: str | None = None, opts: reconcile.Options | None = None,
              context: str | None = None) -> kopf.Memo:
    api = load_api_client(kubeconfig, context=context, user_agent=USER_AGENT)
    opts = opts or reconcile.Options()
    return kopf.Memo(vmlet=controller.Context(kube=Kube(api, timeout=opts.request_timeout), opts=opts))


async def run(*, kubeconfig: str | None = None, opts: reconcile.Options | None = None,
              standalone: bool = False, peering: str = "vmlet", priority: int = 0,
              namespaces: list[str] | None = None, liveness: str | None = None,
              stop_flag: Any = None, ready_flag: Any = None, memo: kopf.Memo | None = None) -> None:
    memo = memo or make_memo(kubeconfig, opts)
    ctx: controller.Context = memo["vmlet"]
    ctx.open_executor()
    try:
        await kopf.operator(
            standalone=standalone, peering_name=None if standalone else peering, priority=priority,
            clusterwide=not namespaces, namespaces=namespaces or (), liveness_endpoint=liveness,
            stop_flag=stop_flag, ready_flag=ready_flag, memo=memo,
        )
    finally:
        ctx.close_executor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmapi.operator", description="vmlet VirtualMachine controller")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    p.add_argument("--peering", default="vmlet", help="kopf peering name (default: vmlet)")
    p.add_argument("--priority", type=int, default=0, help="kopf peering priority")
    p.add_argument("--standalone", action="store_true", help="no peering: assume no other controller runs")
    p.add_argument("-n", "--namespace", action="append", dest="namespaces",
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--resync", type=float, default=60.0, help="seconds between periodic reconciles of a VM")
    p.add_argument("--crashloop-base", type=float, default=reconcile.Options.backoff_base,
                   help="crash-loop back-off base in seconds")
    p.add_argument("--request-timeout", type=float, default=reconcile.Options.request_timeout,
                   help="seconds an API request may take to connect, and again to answer")
    p.add_argument("--workers", type=int, default=reconcile.Options.workers,
                   help="threads reconciling VMs at once (a pass blocked on the API server holds one)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers: {args.workers}: at least 1")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = reconcile.Options(resync_seconds=args.resync, backoff_base=args.crashloop_base,
                             request_timeout=args.request_timeout, workers=args.workers)
    asyncio.run(run(kubeconfig=args.kubeconfig, opts=opts, standalone=args.standalone, peering=args.peering,
                    priority=args.priority, namespaces=args.namespaces, liveness=args.liveness))
    return 0


if __name__ == "__main__":
    sys.exit(main())
