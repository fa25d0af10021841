"""criproxy.messages.cap_message: every status message the proxy sends fits a client's metadata budget."""

from __future__ import annotations

import re
import string
from urllib.parse import quote

import pytest

from criproxy import routing
from criproxy.messages import MAX_DETAILS, cap_message
from criproxy.routing import Routes

# grpc-message's percent-encoding, written independently: printable ASCII but '%' as it is, the rest %XX per byte
SAFE = "".join(c for c in string.printable if " " <= c <= "~" and c != "%")


def encoded(text: str) -> int:
    return len(quote(text.encode("utf-8", "surrogatepass"), safe=SAFE))


@pytest.mark.parametrize("text", ["", "no such container", "\x00\ufffe\uffff\U0010ffff tab\t", "é" * 50])
def test_short_messages_are_kept_whole(text):
    assert cap_message(text) == text


@pytest.mark.parametrize("text", ["a" * 65536, "\uffff" * 21845, "%" * 4096, "\x00" * 5000, "ok " + "€" * 3000])
def test_long_messages_fit_the_budget_keep_their_start_and_say_their_length(text):
    out = cap_message(text)
    assert encoded(out) <= MAX_DETAILS
    head, _, tail = out.rpartition("… ")
    assert tail == f"({len(text)} characters)"
    assert text.startswith(head) and len(head) >= 100  # the start of the message is still there to read


def test_a_smaller_budget_is_kept_too():
    out = cap_message("\uffff" * 1000, 300)
    assert encoded(out) <= 300 and out.startswith("\uffff" * 20)


def test_an_unknown_runtime_of_64_kib_is_echoed_capped_and_the_message_stays_readable():
    r = Routes("containerd", ("virtlet.cloud",))
    for target in ("x" * 65536, "\uffff" * 65536):
        with pytest.raises(routing.UnknownRuntime) as e:
            r.sandbox_backend({routing.TARGET_RUNTIME_ANNOTATION: target})
        msg = str(e.value)
        assert encoded(msg) < 600, encoded(msg)
        assert msg.startswith(f"pod annotation {routing.TARGET_RUNTIME_ANNOTATION}=")
        assert msg.endswith("names no configured runtime (configured: containerd, virtlet.cloud)")
        assert re.search(r"… \(\d+ characters\) names", msg), msg[:400]
