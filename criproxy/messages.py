"""Status messages the proxy sends: cut to what a gRPC client accepts as its grpc-message header.

A backend's error may echo a whole request value (a 64 KiB ID), and so may the proxy's own refusals.
grpc-message is percent-encoded UTF-8 (a non-ASCII character costs up to 12 bytes) and gRPC clients
refuse metadata past 8 KiB (soft) / 16 KiB (hard), so every message the proxy sends, and every value it
echoes, goes through cap_message. Pure: no I/O, no grpc.

(Not to be confused with image_service.errors.shorten, the shim's repr() of an echoed value in 64
characters: this one keeps a message's text as it is and budgets its encoded bytes.)
"""

from __future__ import annotations

MAX_DETAILS = 2048  # bytes of encoded grpc-message the proxy sends at most


def _encoded_len(ch: str) -> int:
    """Bytes of one character in a percent-encoded grpc-message."""
    return 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "surrogatepass"))


def cap_message(text: str, limit: int = MAX_DETAILS) -> str:
    """`text` cut so that its encoded grpc-message stays within `limit` bytes: `<start>… (<N> characters)`."""
    if len(text) * 12 <= limit:
        return text
    total = 0
    for i, ch in enumerate(text):
        total += _encoded_len(ch)
        if total > limit - 40:  # room for the marker
            return f"{text[:i]}… ({len(text)} characters)"
    return text
