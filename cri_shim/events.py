"""Container events for the kubelet's evented PLEG (GetContainerEvents).

Every subscriber (a GetContainerEvents stream) gets its own bounded queue; a
subscriber that does not keep up loses its oldest events rather than slowing
the runtime down (the kubelet falls back to relisting).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Iterator

from proto.runtime.v1 import api_pb2

if TYPE_CHECKING:
    from .runtime import Runtime

QUEUE_SIZE = 1024


class EventHub:
    def __init__(self) -> None:
        self._subscribers: list[queue.Queue] = []
        self._lock = threading.Lock()

    def publish(self, event: api_pb2.ContainerEventResponse) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            while True:
                try:
                    q.put_nowait(event)
                    break
                except queue.Full:
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(QUEUE_SIZE)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def stream(self, is_active, poll: float = 0.5) -> Iterator[api_pb2.ContainerEventResponse]:
        """Yield events until `is_active()` turns false (the client went away)."""
        q = self.subscribe()
        try:
            while is_active():
                try:
                    yield q.get(timeout=poll)
                except queue.Empty:
                    continue
        finally:
            self.unsubscribe(q)

    def container_event(self, rt: "Runtime", object_id: str, event_type: int, sandbox_id: str | None = None) -> None:
        """Publish an event for a container, or for a sandbox (the kubelet gets both), with current statuses.

        `sandbox_id` is needed when the container is already gone from the store (DELETED).
        """
        from . import container_status, sandbox_status  # status builders live with their RPCs

        event = api_pb2.ContainerEventResponse(container_id=object_id, container_event_type=event_type,
                                               created_at=time.time_ns())
        c = rt.store.containers.get(object_id)
        sb = rt.store.sandboxes.get(sandbox_id or (c.sandbox_id if c else object_id))
        if sb is not None:
            event.pod_sandbox_status.CopyFrom(sandbox_status.to_status(rt, sb))
            for other in rt.store.containers_of(sb.id):
                event.containers_statuses.append(container_status.to_status(rt, other))
        self.publish(event)
