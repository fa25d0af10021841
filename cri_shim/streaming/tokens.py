"""The streaming request cache: single-use tokens for the URLs that Exec, Attach and PortForward answer.

The kubelet's `cri/streaming` request cache semantics: a token is random and
URL-safe, lives one minute, is good for one connection (consume = lookup +
delete), and at most 1000 requests wait for their client at a time (beyond:
RESOURCE_EXHAUSTED, so a caller that never connects cannot grow the cache).
Expired entries are dropped on every insert and consume.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import Callable

import grpc

from ..errors import CRIError

TTL = 60.0
MAX_IN_FLIGHT = 1000
# 16 random bytes (the kubelet uses 8): base64url without padding, 22 characters.
TOKEN_BYTES = 16
_TOKEN_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
MAX_TOKEN_LEN = 64


class RequestCache:
    def __init__(self, ttl: float = TTL, max_in_flight: int = MAX_IN_FLIGHT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._lock = threading.Lock()
        # token -> (expires at, request); insertion order is expiry order (one TTL for all).
        self._entries: OrderedDict[str, tuple[float, object]] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._gc(self._clock())
            return len(self._entries)

    def insert(self, request: object) -> str:
        """Cache `request`, answer its new token; RESOURCE_EXHAUSTED when too many are waiting."""
        with self._lock:
            now = self._clock()
            self._gc(now)
            if len(self._entries) >= self.max_in_flight:
                raise CRIError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"maximum number of in-flight streaming requests ({self.max_in_flight}) exceeded; "
                               "each URL is good for one minute")
            while True:
                token = secrets.token_urlsafe(TOKEN_BYTES)
                if token not in self._entries:
                    break
            self._entries[token] = (now + self.ttl, request)
            return token

    def consume(self, token: str) -> object | None:
        """The request of `token` and forget it; None when unknown, expired or already used (not told apart)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN \
                or not set(token) <= _TOKEN_ALPHABET:
            return None
        with self._lock:
            now = self._clock()
            self._gc(now)
            entry = self._entries.pop(token, None)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def _gc(self, now: float) -> None:
        while self._entries:
            token, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[token]
