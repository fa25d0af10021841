"""The CRI list filters: ID (exact or unique prefix, as containerd), state, label selector.

One matcher per record kind serves every filter message of that kind
(ContainerFilter and ContainerStatsFilter; PodSandboxFilter and
PodSandboxStatsFilter): fields a filter message lacks simply do not filter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .runtime import Runtime
    from .state import ContainerRecord, SandboxRecord


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def id_matches(object_id: str, wanted: str) -> bool:
    """containerd resolves a filter ID like a CLI ID: exact or prefix."""
    return not wanted or object_id.startswith(wanted)


def _state_matches(flt, state: int) -> bool:
    return not ("state" in flt.DESCRIPTOR.fields_by_name and flt.HasField("state")) or flt.state.state == state


def container_matches(rt: "Runtime", c: "ContainerRecord", flt) -> bool:
    if flt is None:
        return True
    return (id_matches(c.id, flt.id) and id_matches(c.sandbox_id, flt.pod_sandbox_id)
            and _state_matches(flt, c.state)
            and (not flt.label_selector or labels_match(rt.container_config(c).labels, flt.label_selector)))


def sandbox_matches(rt: "Runtime", sb: "SandboxRecord", flt) -> bool:
    if flt is None:
        return True
    return (id_matches(sb.id, flt.id) and _state_matches(flt, sb.state)
            and (not flt.label_selector or labels_match(rt.sandbox_config(sb).labels, flt.label_selector)))
