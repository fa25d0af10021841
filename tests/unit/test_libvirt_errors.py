"""libvirt errors outside the RPCs that pass settings to libvirt: never INTERNAL, UNAVAILABLE when libvirtd is gone."""

from __future__ import annotations

import grpc
import libvirt
import pytest

from cri_shim import errors


class FakeLibvirtError(libvirt.libvirtError):
    def __init__(self, code: int, message: str) -> None:
        Exception.__init__(self, message)
        self._code, self._message = code, message

    def get_error_code(self):
        return self._code

    def get_error_message(self):
        return self._message


class Aborted(Exception):
    pass


class Context:
    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted


def answer(exc: Exception) -> Context:
    class Servicer:
        @errors.grpc_errors
        def ContainerStatus(self, request, context):
            raise exc

    ctx = Context()
    with pytest.raises(Aborted):
        Servicer().ContainerStatus(None, ctx)
    return ctx


@pytest.mark.parametrize("code,message", [
    (libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: client socket is closed"),
    (libvirt.VIR_ERR_SYSTEM_ERROR, "Cannot write data: Broken pipe"),
    (libvirt.VIR_ERR_NO_CONNECT, "no connection driver available"),
])
def test_libvirtd_out_of_reach_is_unavailable(code, message):
    ctx = answer(FakeLibvirtError(code, message))
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and "libvirtd is not reachable" in ctx.details


def test_other_libvirt_errors_are_failed_precondition_not_internal():
    ctx = answer(FakeLibvirtError(libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: domain is busy"))
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "domain is busy" in ctx.details


def test_a_bug_is_still_internal():
    assert answer(KeyError("x")).code == grpc.StatusCode.INTERNAL
