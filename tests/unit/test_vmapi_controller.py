"""The controller's kopf handlers: NoDiffBase is only sound while no handler needs a diff; retry delays."""

import math

import kopf
import pytest
from kubernetes.client.rest import ApiException

import vmapi.controller as controller
from vmapi import reconcile


def test_only_a_deletion_handler_among_the_changing_handlers():
    """NoDiffBase stores no last-handled state, so kopf sees every event as a creation: an
    on.create/on.update/on.resume/on.field handler would then run on every event."""
    registry = kopf.get_default_registry()
    changing = [(h.id, getattr(h.reason, "value", h.reason)) for h in registry._changing.get_all_handlers()]
    assert changing == [("vm_deleted", "delete")]
    assert isinstance(controller.NoDiffBase(), kopf.DiffBaseStorage)
    assert controller.NoDiffBase().fetch(body=kopf.Body({})) is None


def _api_error(retry_after: str | None) -> ApiException:
    e = ApiException(status=429, reason="TooManyRequests")
    e.headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return e


@pytest.mark.parametrize("header, seconds", [
    ("3", 3.0), ("0", 0.0), ("0.5", 0.5), ("59.5", 59.5), ("60", 60.0),
    ("61", 60.0), ("1e9", 60.0), ("1e400", None), ("inf", None), ("-inf", None), ("nan", None), ("-5", None),
    ("Wed, 21 Oct 2026 07:28:00 GMT", None), ("", None), (None, None),
])
def test_a_servers_retry_after_is_bounded_by_the_longest_back_off(header, seconds):
    """A Retry-After of "1e9" or "inf" must not park the VM's worker (or kopf's finalizer retry) for good."""
    assert reconcile.retry_after(_api_error(header)) == seconds
    assert max(controller.ERROR_BACKOFF) == reconcile.MAX_RETRY_AFTER
    for failures in (1, 3, 100):
        assert controller.backoff(failures) <= controller.retry_delay(failures, seconds) <= reconcile.MAX_RETRY_AFTER


@pytest.mark.parametrize("value", [1e9, math.inf, math.nan, -1.0, None])
def test_every_delay_the_worker_sleeps_is_finite_and_bounded(value):
    for failures in (0, 1, 7, 10**6):
        d = controller.retry_delay(failures, value)
        assert math.isfinite(d) and 0 < d <= reconcile.MAX_RETRY_AFTER
