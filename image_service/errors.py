"""Errors of the image service, each carrying the gRPC status code it maps to.

The mapping, in one place (the servicer only translates `ImageError.code`):

- INVALID_ARGUMENT   the request itself is wrong: a bad or missing image name, an ambiguous id prefix.
- NOT_FOUND          the image's URL answered 404/410.
- FAILED_PRECONDITION the request is well-formed but refused, and retrying will not help: the image content
                     fails validation (format, backing file, data file, encryption, virtual size, not a disk
                     image), a pinned digest does not match, the URL is refused by policy (scheme, userinfo,
                     plain http, denied address, too many redirects, size cap) or the server answered another 4xx.
- UNAVAILABLE        the download failed in a way a retry may fix: connection refused/reset, timeouts, 5xx,
                     truncated body, a Content-Length that does not match the body.
- RESOURCE_EXHAUSTED the store's filesystem is full.
- INTERNAL           anything else (a bug): never a crash of the server.
"""

from __future__ import annotations

import grpc


class ImageError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidName(ImageError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ImageRejected(ImageError):
    """The downloaded content is not an image vmlet accepts."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class DigestMismatch(ImageError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PolicyError(ImageError):
    """A URL or address the download policy refuses."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class RemoteNotFound(ImageError):
    code = grpc.StatusCode.NOT_FOUND


class RemoteRefused(ImageError):
    """A 4xx other than 404/410: retrying the same request will not help."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class DownloadError(ImageError):
    """Network trouble, 5xx, truncation: a retry may succeed."""
    code = grpc.StatusCode.UNAVAILABLE


class StoreFull(ImageError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ImageNotFound(ImageError):
    """A holder asked for an image the store does not have (in-process API for the shim)."""
    code = grpc.StatusCode.NOT_FOUND


# --- echoing request values in status messages ------------------------------------------------------------------
# A status message travels as the grpc-message header: clients refuse headers past a few KiB (Python's grpc: an
# 8 KiB soft and 16 KiB hard limit, after percent-encoding, which can triple non-ASCII text). So a value from a
# request is echoed shortened, and every message is capped where it leaves the server.

SHOW_CHARS = 64
MAX_STATUS_MESSAGE_BYTES = 2048


def shorten(value: object, limit: int = SHOW_CHARS) -> str:
    """repr() of a request value, cut to `limit` characters with the full length said: 'abc…'…(65536 chars)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}…({len(value)} chars)"
    if isinstance(value, bytes) and len(value) > limit:
        return f"{value[:limit]!r}…({len(value)} bytes)"
    text = repr(value)
    return text if len(text) <= 4 * limit else f"{text[:4 * limit]}…({len(text)} chars)"


def status_message(message: str, max_bytes: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message` made safe for the grpc-message header: valid UTF-8, at most `max_bytes` bytes."""
    # Lone surrogates cannot be encoded: grpc would fail to send the status at all.
    data = str(message).encode("utf-8", "backslashreplace")
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    suffix = f"…(message truncated, {len(data)} bytes)"
    head = data[:max_bytes - len(suffix.encode())].decode("utf-8", "ignore")  # never half a character
    return head + suffix
