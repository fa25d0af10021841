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
