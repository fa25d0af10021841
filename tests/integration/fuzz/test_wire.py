"""Requests no well-behaved client library would build: invalid UTF-8 in string fields, truncated messages.

A lone surrogate (issue #12 lists them with the XML-invalid characters) cannot be
encoded by protobuf's Python or Go runtimes, but a hostile client can put any bytes
on the wire. The request is built by hand (protobuf's wire format: tag, length,
bytes) for every RPC whose request has a top-level string field, and sent through a
raw channel method. The runtime must refuse it as the client's mistake
(INVALID_ARGUMENT), not answer INTERNAL, and keep serving.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import given, settings
from hypothesis import strategies as st

from . import calls
from .conftest import RPCS, examples

pytestmark = pytest.mark.libvirt

# Invalid UTF-8: an encoded lone surrogate (U+D800), a bare continuation byte, a truncated sequence, 0xff.
BAD_UTF8 = [b"\xed\xa0\x80", b"a\x80b", b"\xe2\x82", b"\xff", b"ok\xed\xbf\xbf"]


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def string_field(number: int, raw: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


TARGETS = sorted((r.name, f.name, f.number) for r in RPCS.values() for f in r.request.fields
                 if f.type == FD.TYPE_STRING and not f.is_repeated and not r.streaming)


@settings(max_examples=examples(15))
@given(target=st.sampled_from(TARGETS), raw=st.sampled_from(BAD_UTF8))
def test_invalid_utf8_in_a_string_field(fuzzer, target, raw):
    rpc_name, field_name, number = target
    rpc = RPCS[rpc_name]
    path = f"/runtime.v1.{rpc.service}/{rpc.name}"
    method = fuzzer.client.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        method(string_field(number, raw), timeout=calls.deadline_of(rpc))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    assert fuzzer.alive(), f"the daemon died after {rpc_name} with invalid UTF-8 in {field_name}"
    assert code == grpc.StatusCode.INVALID_ARGUMENT, \
        f"{rpc_name} with invalid UTF-8 {raw!r} in {field_name}: {code.name}: {details[:300]!r}"
