"""Every RuntimeService and ImageService RPC, with requests generated from its message descriptor.

One test per RPC (found in api.proto's service descriptors: a new RPC is fuzzed without
editing this file). Each example sends one random request — hostile strings, boundary
integers, random maps and lists, unknown/empty/prefix/ambiguous/real IDs — to the real
daemon and checks the answer's code, the deadline, the daemon's health and the host
(conftest.Fuzzer.check). Streaming RPCs read their first message and are cancelled.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from . import calls
from .conftest import RPCS, Shown, examples
from .protofuzz import messages

pytestmark = pytest.mark.libvirt

# StartContainer with the live container's ID would boot a VM in every example that draws it (slow under
# TCG, and a running VM changes what later examples see); test_mutations.py starts VMs, a few times.
NO_REAL_CONTAINER = {"StartContainer"}


def allowed_for(rpc, request):
    if rpc.name == "ImageStatus" and request.image.image:
        # CRI: an image the runtime does not have (whatever its name) is an empty answer (issue #12 defect 6).
        return {calls.OK}
    return None


@pytest.mark.parametrize("rpc_name", sorted(RPCS))
@settings(max_examples=examples(8))
@given(data=st.data())
def test_random_request(fuzzer, rpc_name, data):
    rpc = RPCS[rpc_name]
    fuzzer.live.ensure()
    pools = fuzzer.live.pools()
    if rpc_name in NO_REAL_CONTAINER:
        pools = dataclasses.replace(pools, containers=[])
    request = data.draw(messages(rpc.request, pools).map(Shown), label="request").msg
    assume(request.ByteSize() < 1 << 20)  # the gRPC limit is 4 MiB: stay well within it
    fuzzer.check([(rpc, request)], allowed=allowed_for)
