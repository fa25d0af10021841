"""CRI errors: one exception type carrying the gRPC status code, and the mapping at the RPC boundary.

RPC modules raise `CRIError` (or its helpers); `grpc_errors` turns it into
the gRPC status the client sees. Anything else is a bug: it is logged with its
traceback and answered as INTERNAL, never crashing the server.
"""

from __future__ import annotations

import functools
import logging

import grpc

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
            log.info("%s: %s: %s", method.__name__, e.code.name, e.message)
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - the boundary: never let a bug kill the server
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error: {e}")

    return wrapper
