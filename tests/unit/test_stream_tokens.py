"""The streaming request cache: single use, one-minute TTL, bounded in-flight count."""

import threading

import grpc
import pytest

from cri_shim.errors import CRIError
from cri_shim.streaming.tokens import MAX_IN_FLIGHT, TTL, RequestCache


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_consume_once():
    cache = RequestCache()
    req = object()
    token = cache.insert(req)
    assert cache.consume(token) is req
    assert cache.consume(token) is None
    assert len(cache) == 0


def test_tokens_are_url_safe_random_and_distinct():
    cache = RequestCache(max_in_flight=5000)
    tokens = {cache.insert(i) for i in range(2000)}
    assert len(tokens) == 2000
    for t in tokens:
        assert len(t) >= 16 and t.replace("-", "").replace("_", "").isalnum()


def test_expiry_after_a_minute():
    clock = Clock()
    cache = RequestCache(clock=clock)
    assert TTL == 60.0
    early, late = cache.insert("a"), cache.insert("b")
    clock.now += 59.9
    assert cache.consume(early) == "a"
    clock.now += 0.1
    assert cache.consume(late) is None  # exactly at the TTL: gone


def test_in_flight_bound_and_expired_entries_free_room():
    clock = Clock()
    cache = RequestCache(clock=clock)
    assert MAX_IN_FLIGHT == 1000
    first = cache.insert(0)
    for i in range(1, MAX_IN_FLIGHT):
        cache.insert(i)
    with pytest.raises(CRIError) as e:
        cache.insert("one too many")
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in-flight" in e.value.message
    assert cache.consume(first) == 0  # a consumed one frees a place
    cache.insert("fits")
    clock.now += TTL
    assert len(cache) == 0  # all expired
    cache.insert("fits again")


@pytest.mark.parametrize("token", ["", "x" * 65, "../etc", "a b", "ab%2F", None, 5, "é" * 10])
def test_hostile_tokens_are_unknown(token):
    cache = RequestCache()
    cache.insert("r")
    assert cache.consume(token) is None
    assert len(cache) == 1


def test_concurrent_consume_hands_a_request_out_once():
    cache = RequestCache()
    token = cache.insert("once")
    got = []
    barrier = threading.Barrier(8)

    def take():
        barrier.wait()
        got.append(cache.consume(token))
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got.count("once") == 1 and got.count(None) == 7
