"""Requests that are not valid protobuf (a string field that is not UTF-8, truncated bytes): INVALID_ARGUMENT.

grpc calls a method's request deserializer before any servicer code runs; if it
raises, grpc answers INTERNAL "Exception deserializing request!" itself. The
`DecodeErrors` interceptor gives every unary-request handler a deserializer that
never fails and hands the servicer a marker instead, which the wrapped handler
refuses with INVALID_ARGUMENT naming the field. Used by the shim's server (both
services on one socket) and by the image service's own.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import DecodeError

from image_service.errors import status_message

log = logging.getLogger("vmlet.grpc")


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
