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


def test_a_full_database_is_resource_exhausted_naming_the_file_system_and_memory_stays_consistent(tmp_path):
    import grpc

    from cri_shim.errors import CRIError
    from image_service.store import mount_point

    store = Store(tmp_path / "vmlet.db")
    store.add_sandbox(sandbox("s1"))
    store.add_container(container("c1", "s1", "vm_pod_ns_uid_0"))
    # sqlite's own SQLITE_FULL ("database or disk is full"), as from a full file system: no page may be added.
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    big = b"x" * 65536  # needs new pages
    writes = [
        lambda: store.add_sandbox(dataclasses.replace(sandbox("s2", "other_ns_uid_0"), config=big)),
        lambda: store.add_container(dataclasses.replace(container("c2", "s1", "vm2_pod_ns_uid_0"), config=big)),
        lambda: store.update_container(dataclasses.replace(store.containers["c1"], config=big)),
        lambda: store.update_sandbox(dataclasses.replace(store.sandboxes["s1"], config=big)),
    ]
    for write in writes:
        with pytest.raises(CRIError) as e:
            write()
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the file system on {mount_point(tmp_path)} is full" in e.value.message
        assert str(tmp_path / "vmlet.db") in e.value.message and "database or disk is full" in e.value.message
    assert set(store.sandboxes) == {"s1"} and set(store.containers) == {"c1"}
    assert store.containers["c1"].config == b"\x01" and store.sandboxes["s1"].config == b"\x0a\x00"

    store._db.execute("PRAGMA max_page_count = 1073741823")  # room again: the same connection works
    store.add_sandbox(dataclasses.replace(sandbox("s2", "other_ns_uid_0"), config=big))
    store.delete_sandbox("s1")
    store.close()
    store = Store(tmp_path / "vmlet.db")
    assert set(store.sandboxes) == {"s2"} and not store.containers and store.sandboxes["s2"].config == big
