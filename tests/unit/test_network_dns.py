"""The pod's resolver options: resolv.conf's syntax, checked at RunPodSandbox (validation.dns_config) and
dropped by DNSSettings.validated() when they got past it (an older record)."""

import grpc
import pytest

from cri_shim import errors, validation
from cri_shim.network.model import MAX_RESOLVER_OPTIONS, DNSSettings, resolver_option_problem

GOOD = ["ndots:5", "timeout:2", "attempts:3", "rotate", "edns0", "single-request-reopen", "no-tld-query",
        "trust-ad", "use-vc", "inet6", "ndots:0", "x" * 64]
BAD = ["", " ", "ndots: 5", "ndots:5 rotate", "rotate\n", "rotate\nnameserver 6.6.6.6", "rotate#", "#rotate",
       "a;b", "NDOTS:5", "Rotate", "ndots:five", "ndots:", ":5", "ndots:5:6", "ndots:-1", "5ndots", "-rotate",
       "ndots:1234567890", "x" * 65, "rötate", "rotate\x00", "ndots=5", '"rotate"']


@pytest.mark.parametrize("option", GOOD)
def test_resolv_conf_options_pass(option):
    assert resolver_option_problem(option) is None
    validation.dns_config([], [], ["rotate", option])


@pytest.mark.parametrize("option", BAD)
def test_anything_else_is_refused_naming_the_entry(option):
    assert resolver_option_problem(option)
    with pytest.raises(errors.CRIError) as e:
        validation.dns_config(["10.96.0.10"], ["a.example"], ["rotate", option])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith("config.dns_config.options[1] "), e.value.message


def test_at_most_so_many_options():
    validation.dns_config([], [], ["rotate"] * MAX_RESOLVER_OPTIONS)
    with pytest.raises(errors.CRIError) as e:
        validation.dns_config([], [], ["rotate"] * (MAX_RESOLVER_OPTIONS + 1))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message == (f"config.dns_config.options has {MAX_RESOLVER_OPTIONS + 1} entries; at most "
                               f"{MAX_RESOLVER_OPTIONS} are allowed")


def test_validated_settings_keep_only_resolv_conf_options():
    dns = DNSSettings.of(["10.96.0.10"], ["a.example"], ["ndots:5", "bad option", "rotate", "x;y"])
    assert dns.validated() == DNSSettings.of(["10.96.0.10"], ["a.example"], ["ndots:5", "rotate"])
    many = DNSSettings.of(options=[f"o{i}" for i in range(MAX_RESOLVER_OPTIONS + 5)])
    assert many.validated().options == tuple(f"o{i}" for i in range(MAX_RESOLVER_OPTIONS))
