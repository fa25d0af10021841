"""The shim's metadata store: persistence across reopen, name reservation, ID prefixes."""

from __future__ import annotations

import dataclasses

import pytest

from cri_shim.state import ContainerRecord, NameConflict, SandboxRecord, Store, resolve_id


def sandbox(i: str, name: str = "pod_ns_uid_0") -> SandboxRecord:
    return SandboxRecord(id=i, name_key=name, state=0, created_at=1, config=b"\x0a\x00")


def container(i: str, sb: str, name: str) -> ContainerRecord:
    return ContainerRecord(id=i, sandbox_id=sb, name_key=name, state=0, created_at=2, image="virtlet.cloud/x",
                           image_ref="sha256:aa", domain_name="vmlet-" + i, domain_uuid="u", config=b"\x01")


def test_records_survive_reopen_and_updates_are_durable(tmp_path):
    store = Store(tmp_path / "db")
    store.add_sandbox(sandbox("s1"))
    store.add_container(container("c1", "s1", "vm_pod_ns_uid_0"))
    store.update_container(dataclasses.replace(store.containers["c1"], state=1, started_at=5))
    store.close()
    store = Store(tmp_path / "db")
    assert store.sandboxes["s1"].config == b"\x0a\x00"
    assert (store.containers["c1"].state, store.containers["c1"].started_at) == (1, 5)
    store.delete_sandbox("s1")
    store.close()
    store = Store(tmp_path / "db")
    assert not store.sandboxes and not store.containers


def test_name_keys_are_reserved(tmp_path):
    store = Store(tmp_path / "db")
    store.add_sandbox(sandbox("s1"))
    with pytest.raises(NameConflict) as e:
        store.add_sandbox(sandbox("s2"))
    assert e.value.owner_id == "s1"
    assert "s2" not in store.sandboxes


def test_resolve_id_exact_prefix_ambiguous():
    ids = ["abc123", "abd456", "ff"]
    assert resolve_id(ids, "abc123") == "abc123"
    assert resolve_id(ids, "abd") == "abd456"
    assert resolve_id(ids, "ab") == ["abc123", "abd456"]
    assert resolve_id(ids, "zz") is None
    assert resolve_id(ids, "") is None
