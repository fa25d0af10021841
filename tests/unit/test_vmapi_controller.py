"""The controller's kopf handlers: NoDiffBase is only sound while no handler needs a diff."""

import kopf

import vmapi.controller as controller


def test_only_a_deletion_handler_among_the_changing_handlers():
    """NoDiffBase stores no last-handled state, so kopf sees every event as a creation: an
    on.create/on.update/on.resume/on.field handler would then run on every event."""
    registry = kopf.get_default_registry()
    changing = [(h.id, getattr(h.reason, "value", h.reason)) for h in registry._changing.get_all_handlers()]
    assert changing == [("vm_deleted", "delete")]
    assert isinstance(controller.NoDiffBase(), kopf.DiffBaseStorage)
    assert controller.NoDiffBase().fetch(body=kopf.Body({})) is None
