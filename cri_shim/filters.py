"""The CRI list filters: ID (exact or unique prefix, as containerd), state, label selector."""

from __future__ import annotations

from typing import Iterable, Mapping


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def id_matches(object_id: str, wanted: str) -> bool:
    """containerd resolves a filter ID like a CLI ID: exact or prefix."""
    return not wanted or object_id.startswith(wanted)


def narrow_by_id(ids: Iterable[str], wanted: str) -> set[str]:
    return {i for i in ids if id_matches(i, wanted)}
