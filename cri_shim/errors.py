"""CRI errors: one exception type carrying the gRPC status code, and the mapping at the RPC boundary.

RPC modules raise `CRIError` (or its helpers); `grpc_errors` turns it into
the gRPC status the client sees. Anything else is a bug: it is logged with its
traceback and answered as INTERNAL, never crashing the server.

Messages echo request values through `show` (shortened), and every message is
capped where it leaves the server (`status_message`), so a 64 KiB ID never
comes back as a 64 KiB grpc-message that the client refuses to read.
`from_libvirt` is the one mapping of libvirt's refusals to CRI codes.
`DecodeErrors` (image_service/decode.py, shared by both services) answers a
request that is not valid protobuf with INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import functools
import logging

import grpc
import libvirt

from image_service.decode import DecodeErrors
from image_service.errors import shorten as show, status_message

__all__ = ["CRIError", "show", "status_message", "from_libvirt", "grpc_errors", "DecodeErrors"]

log = logging.getLogger("vmlet.cri")


class CRIError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(message: str) -> CRIError:
    return CRIError(grpc.StatusCode.NOT_FOUND, message)


def invalid_argument(message: str) -> CRIError:
    return CRIError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> CRIError:
    return CRIError(grpc.StatusCode.FAILED_PRECONDITION, message)


def already_exists(message: str) -> CRIError:
    return CRIError(grpc.StatusCode.ALREADY_EXISTS, message)


def unavailable(message: str) -> CRIError:
    return CRIError(grpc.StatusCode.UNAVAILABLE, message)


def unimplemented(message: str) -> CRIError:
    return CRIError(grpc.StatusCode.UNIMPLEMENTED, message)


# libvirt refusing what the request asked for (a value, a combination, an unknown name): the client's to fix.
_LIBVIRT_REQUEST_ERRORS = frozenset(getattr(libvirt, name) for name in (
    "VIR_ERR_XML_ERROR", "VIR_ERR_XML_DETAIL", "VIR_ERR_CONFIG_UNSUPPORTED", "VIR_ERR_INVALID_ARG",
    "VIR_ERR_OVERFLOW", "VIR_ERR_XML_INVALID_SCHEMA") if hasattr(libvirt, name))
# libvirtd out of reach: a retry may work.
_LIBVIRT_UNAVAILABLE = frozenset(getattr(libvirt, name) for name in (
    "VIR_ERR_NO_CONNECT", "VIR_ERR_RPC", "VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_UNAVAILABLE") if hasattr(libvirt, name))


# How a lost connection to libvirtd shows up on a call already under way (libvirtd restarted, killed).
_CONNECTION_LOST = ("client socket is closed", "Broken pipe", "End of file while reading data",
                    "Cannot recv data", "Cannot write data")


def libvirt_unreachable(e: libvirt.libvirtError) -> bool:
    """libvirtd was out of reach: a retry once it is back may work."""
    message = e.get_error_message() or str(e)
    return e.get_error_code() in _LIBVIRT_UNAVAILABLE or any(m in message for m in _CONNECTION_LOST)


def from_libvirt(e: libvirt.libvirtError, action: str) -> CRIError:
    """The CRI error for libvirt refusing `action` (e.g. "cannot define the VM"); one mapping for every RPC.

    A refused value or setting is InvalidArgument, libvirtd out of reach is
    Unavailable, anything else (the host cannot do it now) FailedPrecondition.
    """
    code = e.get_error_code()
    detail = e.get_error_message() or str(e)
    if libvirt_unreachable(e):
        return unavailable(f"{action}: libvirtd is not reachable: {detail}")
    if code in _LIBVIRT_REQUEST_ERRORS:
        return invalid_argument(f"{action}: libvirt refused the requested settings: {detail}")
    return failed_precondition(f"{action}: {detail}")


def grpc_errors(method):
    """Wrap a unary servicer method: CRIError -> its status; anything else -> INTERNAL (logged).

    Wrapped methods raise CRIError and never call context.abort() themselves
    (abort raises a bare Exception that would be mistaken for a bug).
    """

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except CRIError as e:
            message = status_message(e.message)
            log.info("%s: %s: %s", method.__name__, e.code.name, message)
            context.abort(e.code, message)
        except libvirt.libvirtError as e:
            # Not the request's fault (RPCs that pass settings to libvirt map its refusals themselves): libvirtd
            # out of reach (UNAVAILABLE, the client retries) or the host unable to do it now.
            log.warning("%s: libvirt: %s", method.__name__, e)
            err = unavailable(f"{method.__name__}: libvirtd is not reachable: {e}") if libvirt_unreachable(e) \
                else failed_precondition(f"{method.__name__}: libvirt: {e}")
            context.abort(err.code, status_message(err.message))
        except Exception as e:  # noqa: BLE001 - the boundary: never let a bug kill the server
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, status_message(f"{method.__name__}: internal error: {e}"))

    return wrapper
