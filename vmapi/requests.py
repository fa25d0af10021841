"""State-change requests: the queue behind vmctl start/stop/restart for Manual and RerunOnFailure.

KubeVirt keeps them in `status.stateChangeRequests`, written by its aggregated
API server (virt-api) through the status subresource. vmlet has no API server
of its own, and letting users write a VM's status would let them overwrite the
controller's, so the queue lives in an annotation on the VM:

    vmlet.dev/state-change-requests: '[{"action":"Stop","uid":"<pod uid>"},{"action":"Start"}]'

Writing it needs only `patch` on virtualmachines (what `kubectl edit` needs),
does not bump metadata.generation, and both writers (vmctl and the controller)
send the VM's resourceVersion with the patch, so on a real API server a lost
update becomes a 409 and a retry. A malformed value is reported as a Failure
condition and dropped by the controller; it never stops reconciling.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Literal, Mapping

ANNOTATION = "vmlet.dev/state-change-requests"
MAX_REQUESTS = 8


@dataclasses.dataclass(frozen=True)
class Request:
    action: Literal["Start", "Stop"]
    uid: str | None = None  # Stop: the pod to stop; None stops whatever pod exists

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, **({"uid": self.uid} if self.uid else {})}


def parse(annotations: Mapping[str, str] | None) -> tuple[tuple[Request, ...], str | None]:
    """(requests, error); a bad annotation yields () and a message, never an exception."""
    raw = annotations.get(ANNOTATION) if isinstance(annotations, Mapping) else None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return (), None
    try:
        if not isinstance(raw, str):
            raise ValueError(f"must be a string, not {type(raw).__name__}")
        items = json.loads(raw)
        if not isinstance(items, list) or len(items) > MAX_REQUESTS:
            raise ValueError(f"must be a JSON list of at most {MAX_REQUESTS} requests")
        out = []
        for item in items:
            if not isinstance(item, dict) or item.get("action") not in ("Start", "Stop"):
                raise ValueError(f"{item!r} is not {{\"action\": \"Start\"|\"Stop\", \"uid\": ...}}")
            uid = item.get("uid")
            if uid is not None and not isinstance(uid, str):
                raise ValueError(f"uid {uid!r} is not a string")
            out.append(Request(item["action"], uid if item["action"] == "Stop" else None))
        return tuple(out), None
    except ValueError as e:
        return (), f"annotation {ANNOTATION}: {e}"


def dump(requests: Iterable[Request]) -> str | None:
    """The annotation value; None (remove the annotation) for an empty queue."""
    items = [r.to_json() for r in requests]
    return json.dumps(items, separators=(",", ":")) if items else None
