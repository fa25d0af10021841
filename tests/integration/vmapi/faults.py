"""API faults for the controller's requests, injected by `harness.ApiServer` (deterministic or seeded-random).

A request is identified by its *kind*: `<resource>[/<subresource>]:<verb>`, e.g.
`pods:create`, `virtualmachines/status:patch`, `events:create`, `pods:watch`.
Only the controller's requests are faulted (kopf's and the vmlet-controller
client's user agents); the test's own client (the users and the kubelet) always
gets straight answers, so a test can set the scene and read the truth.

Fault kinds:

* `status` — an error answer (409, 500, 503, 429 with Retry-After), nothing stored;
* `status_after` — the write is applied, then the client gets a 500 (a commit
  whose answer was lost: the controller must not assume it failed);
* `slow` — the answer comes after `delay` seconds;
* `hang` — no answer at all until the client gives up (closes the connection);
* `reset` — the connection is closed without an answer;
* `watch_close` / `watch_cut` — a watch stream ends cleanly / in the middle of an
  event line after `events` events (or `delay` seconds, whichever is first);
* `watch_gone` — a watch answers with a `410 Gone` ERROR event ("too old resource
  version"), as kube-apiserver does after compaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from typing import Any, Callable, Iterable, Mapping, Sequence

import aiohttp.web
import kmock

CONTROLLER_AGENTS = ("kopf/", "vmlet-controller")
WATCH_KINDS = ("watch_close", "watch_cut", "watch_gone")
VERBS = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
         kmock.action.CREATE: "create", kmock.action.UPDATE: "patch", kmock.action.DELETE: "delete"}
# Every call the controller makes (client.controller_permissions, kopf's included) that a fault can hit.
CONTROLLER_KINDS = ("pods:create", "pods:delete", "pods:get", "pods:list", "pods:watch",
                    "virtualmachines:get", "virtualmachines:list", "virtualmachines:watch",
                    "virtualmachines:patch", "virtualmachines/status:patch", "events:create",
                    "persistentvolumeclaims:get", "persistentvolumeclaims:create", "persistentvolumeclaims:patch",
                    "persistentvolumeclaims:list", "persistentvolumeclaims:watch")
MAX_HANG = 120.0  # a hang ends at the latest here (or when the test ends), so nothing outlives the test


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 500
    retry_after: int | None = None
    delay: float = 0.0
    events: int = 0

    def __str__(self) -> str:
        extra = {"status": f" {self.status}" + (f" Retry-After {self.retry_after}" if self.retry_after else ""),
                 "status_after": " 500 after the write", "slow": f" {self.delay}s", "watch_close": f" after {self.events}",
                 "watch_cut": f" after {self.events}"}.get(self.kind, "")
        return self.kind + extra


def request_kind(request: Any) -> str | None:
    if request.resource is None or not request.resource.plural or request.action not in VERBS:
        return None
    sub = f"/{request.subresource}" if request.subresource else ""
    return f"{request.resource.plural}{sub}:{VERBS[request.action]}"


def from_controller(request: Any) -> bool:
    return request.headers.get("User-Agent", "").startswith(CONTROLLER_AGENTS)


# Kinds only kopf sends (it posts every event): never a 409, which needs a precondition kopf never sends.
KOPF_ONLY_KINDS = ("events:create",)


def menu(kind: str) -> list[Fault]:
    """The faults that make sense for a request kind."""
    if kind.endswith(":watch"):
        return [Fault("status", 500), Fault("status", 429, retry_after=1), Fault("slow", delay=0.5),
                Fault("watch_close", events=0), Fault("watch_close", events=1, delay=0.3),
                Fault("watch_cut", events=0), Fault("watch_cut", events=2, delay=0.3), Fault("watch_gone")]
    faults = [Fault("status", 500), Fault("status", 503), Fault("status", 429, retry_after=1),
              Fault("slow", delay=0.4), Fault("hang"), Fault("reset")]
    if not kind.endswith((":get", ":list")):
        faults += ([] if kind in KOPF_ONLY_KINDS else [Fault("status", 409)]) + [Fault("status_after")]
    return faults


class Schedule:
    """Which fault the n-th controller request of each kind gets; `active` turns it all off."""

    def __init__(self, per_kind: Mapping[str, Sequence[Fault | None]] | None = None,
                 mix: Callable[[str], Fault | None] | None = None):
        self.per_kind = {k: list(v) for k, v in (per_kind or {}).items()}
        self.mix = mix
        self.active = True
        self.seen: dict[str, int] = {}
        self.pos: dict[str, int] = {}  # per kind: the planned entries used so far
        self.injected: list[tuple[str, Fault]] = []

    def used_up(self, kinds: Iterable[str]) -> bool:
        """Every planned entry of these kinds has been served."""
        return all(self.pos.get(k, 0) >= len(self.per_kind.get(k, ())) for k in kinds)

    def left(self, kinds: Iterable[str]) -> dict[str, list[str]]:
        return {k: [str(f) for f in self.per_kind.get(k, ())[self.pos.get(k, 0):] if f is not None]
                for k in kinds if not self.used_up([k])}

    def __call__(self, request: Any) -> Fault | None:
        kind = request_kind(request)
        if kind is None or not from_controller(request):
            return None
        self.seen[kind] = self.seen.get(kind, 0) + 1
        if not self.active:
            return None
        # kube-apiserver answers 409 only to writes with a precondition; kopf's merge patches carry none
        # (and kopf, given one, drops the patch and waits for the next watch event: up to its 70 s
        # inactivity timeout).
        from_kopf = request.headers.get("User-Agent", "").startswith("kopf/")
        planned = self.per_kind.get(kind)
        if planned is not None:
            n = self.pos.get(kind, 0)
            fault = planned[n] if n < len(planned) else None
            if fault is not None and fault.status == 409 and from_kopf:
                return None  # the 409 waits for the controller's own next request of this kind
            self.pos[kind] = n + 1
        else:
            fault = self.mix(kind) if self.mix else None
            if fault is not None and fault.status == 409 and from_kopf:
                fault = Fault("status", 500)  # what kopf's patches do meet
        if fault is not None:
            self.injected.append((kind, fault))
        return fault


def seeded_schedule(seed: int, kinds: Iterable[str] = CONTROLLER_KINDS, length: int = 4) -> Schedule:
    """Per kind: the first `length` requests get a fault drawn from that kind's menu (some pass)."""
    rng = random.Random(seed)
    return Schedule({k: [rng.choice(menu(k)) if rng.random() < 0.8 else None for _ in range(length)]
                     for k in kinds})


def random_mix(seed: int, rate: float = 0.3) -> Schedule:
    rng = random.Random(seed)
    return Schedule(mix=lambda kind: rng.choice(menu(kind)) if rng.random() < rate else None)


def _status_body(code: int, message: str) -> dict[str, Any]:
    reasons = {409: "Conflict", 410: "Expired", 429: "TooManyRequests", 500: "InternalError",
               503: "ServiceUnavailable"}
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": code,
            "reason": reasons.get(code, "InternalError"), "message": message}


def error_response(code: int, retry_after: int | None = None) -> aiohttp.web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return aiohttp.web.json_response(_status_body(code, f"injected fault {code}"), status=code, headers=headers)


async def hang(request: Any, released: asyncio.Event) -> aiohttp.web.Response:
    """Answer nothing until the client closes the connection (its timeout), the test ends, or MAX_HANG."""
    transport = request._raw_request.transport
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_HANG
    while transport is not None and not transport.is_closing() and not released.is_set() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if transport is not None:
        transport.close()
    return aiohttp.web.Response(status=504)


def reset(request: Any) -> aiohttp.web.Response:
    transport = request._raw_request.transport
    if transport is not None:
        transport.abort()
    return aiohttp.web.Response(status=502)


async def faulty_watch(server: Any, request: Any, fault: Fault) -> aiohttp.web.StreamResponse:
    """A watch stream like kmock's (existing objects as ADDED, then live events) that fails as told."""
    raw = request._raw_request
    resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(raw)
    if fault.kind == "watch_gone":
        gone = {"type": "ERROR", "object": _status_body(410, "too old resource version: 1 (2)")}
        await resp.write(json.dumps(gone).encode() + b"\n")
        await resp.write_eof()
        return resp
    queue: asyncio.Queue = asyncio.Queue()

    async def feed() -> None:
        async with server._lock:
            objs = [o for o in server._KubernetesEmulator__get_objs(request, strict=False) if not o.deleted]
            initial = [{"type": "ADDED", "object": o.raw} for o in objs]
        for ev in initial:
            queue.put_nowait(ev)
        async for ev in server._buses[request.resource]:
            ns = (ev.get("object") or {}).get("metadata", {}).get("namespace")
            if request.namespace is None or ns == request.namespace:
                queue.put_nowait(ev)

    feeder = asyncio.create_task(feed())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (fault.delay or 0.2)
    sent, pending = 0, None
    try:
        while sent < fault.events:
            try:
                ev = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
            await resp.write(json.dumps(ev).encode() + b"\n")
            sent += 1
        if fault.kind == "watch_cut":
            try:  # the next event if one is ready, else a made-up one: cut in the middle of its line
                pending = queue.get_nowait()
            except asyncio.QueueEmpty:
                pending = {"type": "MODIFIED", "object": {"metadata": {"name": "x" * 64}}}
    finally:
        feeder.cancel()
    if pending is not None:
        line = json.dumps(pending).encode()
        await resp.write(line[: max(1, len(line) // 2)])
        if raw.transport is not None:
            raw.transport.abort()
        return resp
    await resp.write_eof()
    return resp
