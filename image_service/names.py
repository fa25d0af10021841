"""Image names: `virtlet.cloud/<path>[:tag][@sha256:<hex>]`, parsed strictly.

The grammar is the container image reference grammar (lowercase path components joined by `.`, `_`, `__`
or dashes; tags `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; at most 255 characters before the tag), with the
domain fixed to `virtlet.cloud`. That grammar is what the kubelet and every CRI client already enforce, and it
keeps hostile names harmless: no `..`, no empty component, no scheme, port, query or userinfo can be spelled.
Names never become filesystem paths anyway (the store names files by digest only).

The kubelet adds `:latest` to a name with neither tag nor digest before it pulls; we do the same, so
`virtlet.cloud/x` and `virtlet.cloud/x:latest` are one repo tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from image_service.errors import InvalidName, shorten

DOMAIN = "virtlet.cloud"
DEFAULT_TAG = "latest"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_NAME_RE = re.compile(
    rf"(?P<repo>{re.escape(DOMAIN)}/(?P<path>{_PATH}))"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@sha256:(?P<digest>[0-9a-f]{64}))?",
    re.ASCII,
)
_MAX_REPO = 255
HEX64_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)


@dataclass(frozen=True)
class ImageName:
    repo: str  # virtlet.cloud/<path>
    path: str  # <path>: what translation rules see
    tag: str | None
    digest: str | None  # pinned sha256 hex

    @property
    def tagged(self) -> str | None:
        """The repo tag this name records (None for a digest-only name)."""
        return f"{self.repo}:{self.tag}" if self.tag else None

    def with_digest(self, hexdigest: str) -> str:
        return f"{self.repo}@sha256:{hexdigest}"

    def __str__(self) -> str:
        s = self.repo + (f":{self.tag}" if self.tag else "")
        return s + (f"@sha256:{self.digest}" if self.digest else "")


def parse(image: str) -> ImageName:
    """Parse a CRI `image` field; anything else is InvalidName naming the field and the reason."""
    if not image:
        raise InvalidName("image: the image name is empty")
    if not image.startswith(DOMAIN + "/"):
        raise InvalidName(f"image: {shorten(image)} is not a vmlet image name (expected {DOMAIN}/<name>[:tag][@sha256:<hex>])")
    m = _NAME_RE.fullmatch(image)
    if m is None:
        raise InvalidName(
            f"image: {shorten(image)} is not a valid image name: after {DOMAIN}/ it must be lowercase path components "
            "([a-z0-9] joined by '.', '_', '__' or '-'), separated by '/', then an optional :tag and "
            "@sha256:<64 hex digits>")
    if len(m["repo"]) > _MAX_REPO:
        raise InvalidName(f"image: name is longer than {_MAX_REPO} characters")
    tag = m["tag"] or (None if m["digest"] else DEFAULT_TAG)
    return ImageName(repo=m["repo"], path=m["path"], tag=tag, digest=m["digest"])


def is_name(image: str) -> bool:
    return image.startswith(DOMAIN + "/")
