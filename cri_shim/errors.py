"""CRI errors: one exception type carrying the gRPC status code, and the mapping at the RPC boundary.

RPC modules raise `CRIError` (or its helpers); `grpc_errors` turns it into
the gRPC status the client sees. Anything else is a bug: it is logged with its
traceback and answered as INTERNAL, never crashing the server.

Messages echo request values through `show` (shortened), and every message is
capped where it leaves the server (`status_message`), so a 64 KiB ID never
comes back as a 64 KiB grpc-message that the client refuses to read.
`from_libvirt` is the one mapping of libvirt's refusals to CRI codes.
`DecodeErrors` answers a request that is not valid protobuf (e.g. a string
field that is not UTF-8) with INVALID_ARGUMENT naming the field, where grpc
itself would answer INTERNAL "Exception deserializing request!".
"""

from __future__ import annotations

import functools
import logging

import grpc
import libvirt
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import DecodeError

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


# --- requests that are not valid protobuf ------------------------------------------------------------------------
# grpc calls the request deserializer before any servicer code runs; if it raises, grpc answers INTERNAL itself.
# So the deserializer hands the servicer a marker instead, and the wrapped handler refuses it.


class _Undecodable:
    def __init__(self, message: str) -> None:
        self.message = message


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]  # IndexError on truncated input: the caller gives up on naming the field
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def undecodable_field(data: bytes, desc: pb_descriptor.Descriptor, prefix: str = "") -> str | None:
    """The path of the first string field in `data` (a `desc` message) that is not valid UTF-8, e.g. `cmd[1]`.

    Walks the wire format by the descriptor; None when no such field is found (or `data` is malformed otherwise).
    """
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:  # groups: not in the CRI
                return None
            size, pos = _varint(data, pos)
            chunk, pos = data[pos:pos + size], pos + size
            field = desc.fields_by_number.get(number)
            if field is None:
                continue  # an unknown field: protobuf keeps its bytes as they are
            name = prefix + field.name
            if field.is_repeated and not _is_map(field):
                index = seen.get(number, 0)
                seen[number] = index + 1
                name = f"{name}[{index}]"
            if field.type == field.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == field.TYPE_MESSAGE and _is_map(field):
                inner = undecodable_field(chunk, field.message_type)
                if inner is not None:
                    return f"{name} (a key)" if inner == "key" else f"{name} (a value)"
            elif field.type == field.TYPE_MESSAGE:
                inner = undecodable_field(chunk, field.message_type, name + ".")
                if inner is not None:
                    return inner
    except (IndexError, ValueError):
        return None
    return None


def _is_map(field: pb_descriptor.FieldDescriptor) -> bool:
    return field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _deserializer(original):
    message_class = getattr(original, "__self__", None)  # generated stubs pass `<Message>.FromString`
    desc = getattr(message_class, "DESCRIPTOR", None)

    def deserialize(data: bytes):
        try:
            return original(data)
        except DecodeError as e:
            field = undecodable_field(data, desc) if isinstance(desc, pb_descriptor.Descriptor) else None
            if field is not None:
                return _Undecodable(f"request is not valid protobuf: field {field} is not valid UTF-8")
            return _Undecodable(f"request is not valid protobuf: {e}")

    return deserialize


class DecodeErrors(grpc.ServerInterceptor):
    """Every unary-request handler of the server gets a deserializer that never fails and a refusal of what
    it could not decode: INVALID_ARGUMENT, for the RuntimeService and the ImageService alike."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = continuation(handler_call_details)
        wrapped = _wrap(handler, method)
        if wrapped is not handler:
            self._handlers[method] = wrapped  # one handler per method name: the generated ones are fixed
        return wrapped


def _wrap(handler, method: str):
    if handler is None or handler.request_streaming or handler.request_deserializer is None:
        return handler

    def refuse(request, context):
        message = status_message(f"{method.rsplit('/', 1)[-1]}: {request.message}")
        log.info("%s: INVALID_ARGUMENT: %s", method, message)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    deserialize = _deserializer(handler.request_deserializer)
    if handler.response_streaming:
        behavior = handler.unary_stream

        def unary_stream(request, context):
            if isinstance(request, _Undecodable):
                refuse(request, context)
            yield from behavior(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, handler.response_serializer)
    behavior = handler.unary_unary

    def unary_unary(request, context):
        if isinstance(request, _Undecodable):
            refuse(request, context)
        return behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)
