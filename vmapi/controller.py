"""kopf handlers: thin. The work is in reconcile.py (and the pure modules below it).

Shape — a controller-runtime style work queue made of kopf parts:

* one `@kopf.daemon` per VM is that VM's worker: it runs `reconcile_once` in a
  thread, then sleeps until woken, until a requested delay (crash-loop
  back-off) or until the periodic resync. Passes for one VM never overlap; a
  burst of events collapses into one pass; a failing pass is retried with
  exponential back-off (API errors never crash-loop the controller).
* `@kopf.on.event` for VMs and for VM pods (label `vmlet.dev/vm`) only wake the
  worker of the VM concerned; so do events of claims (all of them: a claim the
  user makes later carries no label of ours), routed by the claim names each
  VM's last pass read. That is how a VM waiting for a missing claim proceeds
  the moment it appears, without polling (the 60 s resync is the backstop).
* `@kopf.on.delete` deletes the pod and holds kopf's finalizer until it is gone
  (printableStatus Terminating meanwhile).

Nothing is kept between passes but the wake-up flags: after a restart of the
controller every VM gets a fresh worker whose first pass reads the cluster.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, TypeVar

import kopf
import urllib3.exceptions
from kubernetes.client.rest import ApiException

from vmapi import podspec, reconcile, types
from vmapi.client import Conflict, Kube, connection_info

T = TypeVar("T")
FINALIZER = "vmlet.dev/vm-controller"
LOCK_POLL = 0.05  # seconds between looks at a busy VM lock
log = logging.getLogger("vmlet.vmapi")
ERROR_BACKOFF = reconcile.Options.error_backoff


@dataclasses.dataclass
class Context:
    """Shared by all handlers of one operator (kopf's memo holds it)."""

    kube: Kube
    opts: reconcile.Options = dataclasses.field(default_factory=reconcile.Options)
    wakeups: dict[tuple[str, str], asyncio.Event] = dataclasses.field(default_factory=dict)
    # One VM's passes and its finalization never overlap, even when kopf has cancelled the worker
    # whose pass still runs in its thread: a pass that read the VM before its deletion and creates
    # the pod afterwards would leave a pod behind for a deleted VM.
    locks: dict[tuple[str, str], threading.Lock] = dataclasses.field(default_factory=dict)
    passes: int = 0  # reconcile passes done (the benchmark reads it)
    # (namespace, claim) -> names of the VMs whose volumes name it, from each VM's last pass: wake-up
    # routing only, rebuilt by the passes after a restart (every VM's worker makes one at once).
    claim_users: dict[tuple[str, str], set[str]] = dataclasses.field(default_factory=dict)
    vm_claims: dict[tuple[str, str], tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def note_claims(self, namespace: str, name: str, claims: tuple[str, ...]) -> None:
        """Route the events of these claims (and no others) to the VM's worker."""
        old = self.vm_claims.pop((namespace, name), ())
        for c in old:
            users = self.claim_users.get((namespace, c))
            if users is not None:
                users.discard(name)
                if not users:
                    del self.claim_users[(namespace, c)]
        if claims:
            self.vm_claims[(namespace, name)] = claims
            for c in claims:
                self.claim_users.setdefault((namespace, c), set()).add(name)
    # The threads passes and finalizations run in: our own pool, not asyncio's default one (6 threads
    # on 2 cores, shared with kopf), so a few passes hung on the API server cannot stall every VM.
    # operator.run() makes it and shuts it down.
    executor: concurrent.futures.ThreadPoolExecutor | None = None

    def open_executor(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.opts.workers,
                                                              thread_name_prefix="vmlet-reconcile")

    def close_executor(self) -> None:
        # Do not wait: a pass blocked on the API server ends at its request deadline anyway.
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    async def locked(self, key: tuple[str, str], fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a pool thread, holding the VM's lock. Waiting for the lock holds no thread:
        the thread only tries it, and the wait between tries is on the event loop."""
        lock = self.locks.setdefault(key, threading.Lock())
        if self.executor is None:
            raise RuntimeError("the controller's executor is not open (run the handlers through operator.run)")
        loop = asyncio.get_running_loop()

        def attempt() -> tuple[T] | None:
            if not lock.acquire(blocking=False):
                return None
            try:
                return (fn(*args),)
            finally:
                lock.release()

        while True:
            while lock.locked():
                await asyncio.sleep(LOCK_POLL)
            done = await loop.run_in_executor(self.executor, attempt)
            if done is not None:
                return done[0]


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: there are no on.create/on.update handlers (the worker reads the whole VM on
    every pass), so kopf's last-handled-configuration annotation would only cost one more write
    per VM (a 200-VM create burst: 200 of ~1,700 requests, bench/vmapi_reconcile.py)."""

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        pass


def _ctx(memo: Any) -> Context:
    return memo["vmlet"]


# What an API server or the network can do to a request; anything else raised by a pass is a bug.
API_ERRORS = (ApiException, Conflict, urllib3.exceptions.HTTPError, OSError)


def backoff(failures: int, schedule: tuple[float, ...] = ERROR_BACKOFF) -> float:
    return schedule[min(max(failures, 1), len(schedule)) - 1]


def retry_delay(failures: int, retry_after: float | None, schedule: tuple[float, ...] = ERROR_BACKOFF) -> float:
    """Our back-off, or the server's Retry-After when longer — which never exceeds our longest."""
    return max(backoff(failures, schedule), reconcile.clamp_retry_after(retry_after) or 0)


@kopf.on.login()
def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    return connection_info(_ctx(memo).kube.api)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # kopf's own requests get the same deadline as ours (its default is 5 minutes per request).
    settings.networking.request_timeout = settings.networking.connect_timeout = _ctx(memo).opts.request_timeout
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="vmlet.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.loggers = False  # only our explicit transition events become Kubernetes events
    # Watch only VM pods, not every pod of the cluster (a real API server filters; kmock ignores it).
    settings.watching.label_selectors["pods"] = podspec.LABEL_VM
    settings.networking.error_backoffs = (1, 1, 2, 3, 5, 8, 13, 21)


def _wake(memo: Any, namespace: str | None, name: str | None) -> None:
    ev = _ctx(memo).wakeups.get((namespace or "", name or ""))
    if ev is not None:
        ev.set()


@kopf.on.event(types.GROUP, types.VERSION, types.PLURAL)
async def vm_event(namespace: str, name: str, memo: Any, **_: Any) -> None:
    _wake(memo, namespace, name)


@kopf.on.event("v1", "pods", labels={podspec.LABEL_VM: kopf.PRESENT})
async def pod_event(namespace: str, labels: dict[str, str], memo: Any, type: str | None = None,
                    **_: Any) -> None:
    ctx, vm_name = _ctx(memo), labels.get(podspec.LABEL_VM)
    if (namespace or "", vm_name or "") in ctx.wakeups:
        _wake(memo, namespace, vm_name)
    elif vm_name and type != "DELETED":
        # No worker: the VM may be gone (deleted before its finalizer was added). Its pod goes too.
        try:
            if await ctx.locked((namespace, vm_name), reconcile.delete_orphan_pod, ctx.kube, namespace, vm_name):
                log.info("deleted the pod of VM %s/%s, which no longer exists", namespace, vm_name)
        except API_ERRORS as e:  # the next event of the pod tries again
            log.warning("cannot check the pod of VM %s/%s for its owner: %s", namespace, vm_name, reconcile.short(e))


@kopf.on.event("v1", "persistentvolumeclaims")
async def claim_event(namespace: str, name: str, labels: dict[str, str], memo: Any, **_: Any) -> None:
    ctx = _ctx(memo)
    for vm_name in list(ctx.claim_users.get((namespace or "", name or ""), ())):
        _wake(memo, namespace, vm_name)
    if labels.get(podspec.LABEL_VM):  # made from a template: its VM, whatever it read last
        _wake(memo, namespace, labels[podspec.LABEL_VM])


@kopf.daemon(types.GROUP, types.VERSION, types.PLURAL, cancellation_timeout=2.0)
async def vm_worker(namespace: str, name: str, memo: Any, logger: logging.Logger, **_: Any) -> None:
    ctx = _ctx(memo)
    key = (namespace, name)
    wake = ctx.wakeups[key] = asyncio.Event()
    failures = 0
    try:
        while True:  # ends by cancellation: kopf stops the daemon on deletion and on exit
            wake.clear()
            delay = ctx.opts.resync_seconds
            try:
                res = await ctx.locked(key, reconcile.reconcile_once, ctx.kube, namespace, name, ctx.opts,
                                       time.time())
                ctx.passes += 1
                ctx.note_claims(namespace, name, res.claims)
                if res.vm is not None:
                    for type_, reason, message in res.events:
                        kopf.event(res.vm, type=type_, reason=reason, message=message)
                failures = failures + 1 if res.error else 0
                if res.error:
                    delay = retry_delay(failures, res.retry_after, ctx.opts.error_backoff)
                    logger.warning("reconcile: %s (retry in %ss)", res.error, delay)
                elif res.requeue_after is not None:
                    delay = min(delay, res.requeue_after)
            except API_ERRORS as e:  # API unreachable, 5xx, 429, a timeout: retry later, never die
                failures += 1
                delay = retry_delay(failures, reconcile.retry_after(e), ctx.opts.error_backoff)
                logger.warning("reconcile failed (retry in %ss): %s", delay, e)
            except Exception:  # a bug: say so loudly, keep serving the other VMs, retry slowly
                failures += 1
                delay = backoff(len(ctx.opts.error_backoff), ctx.opts.error_backoff)
                logger.error("reconcile crashed (retry in %ss)", delay, exc_info=True)
            try:
                await asyncio.wait_for(wake.wait(), timeout=delay)
            except TimeoutError:
                pass
    finally:
        if ctx.wakeups.get(key) is wake:
            del ctx.wakeups[key]
            ctx.note_claims(namespace, name, ())


@kopf.on.delete(types.GROUP, types.VERSION, types.PLURAL)
async def vm_deleted(body: kopf.Body, memo: Any, retry: int, namespace: str, name: str, **_: Any) -> None:
    ctx = _ctx(memo)
    try:
        done = await ctx.locked((namespace, name), reconcile.finalize, ctx.kube, dict(body))
    except API_ERRORS as e:
        # Not kopf's default for an exception (retry in 60 s): the API's own back-off, or ours.
        delay = retry_delay(retry + 1, reconcile.retry_after(e), ctx.opts.error_backoff)
        raise kopf.TemporaryError(f"deleting the VM pod: {reconcile.short(e)}", delay=delay) from None
    if not done:
        raise kopf.TemporaryError("waiting for the VM pod to terminate", delay=2)
    ctx.locks.pop((namespace, name), None)
    kopf.event(dict(body), type="Normal", reason="Deleted", message="VM pod is gone")
