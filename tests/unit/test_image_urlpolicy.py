"""URL and address checks applied to every hop of a download."""

import pytest

from image_service.errors import PolicyError
from image_service.urlpolicy import AddressPolicy, check_url


@pytest.mark.parametrize("url", ["https://example.com/x.qcow2", "https://example.com:8443/a?b=c",
                                 "HTTPS://Example.com/x", "https://[2001:db8::1]/x"])
def test_allowed_urls(url):
    assert check_url(url, allow_http=False).hostname


@pytest.mark.parametrize("url, allow_http, reason", [
    ("file:///etc/passwd", True, "scheme 'file'"),
    ("ftp://example.com/x", True, "scheme 'ftp'"),
    ("gopher://example.com/x", True, "scheme 'gopher'"),
    ("/relative/path", True, "scheme '(none)'"),
    ("http://example.com/x", False, "plain http"),
    ("https://user:pw@example.com/x", False, "credentials"),
    ("https://user@example.com/x", False, "credentials"),
    ("https://example.com/a b", False, "control characters"),
    ("https://example.com/a\r\nX-Injected: 1", False, "control characters"),
    ("https://exämple.com/x", False, "ASCII"),
    ("https:///x", False, "no host"),
    ("https://example.com:99999/x", False, "invalid port"),
])
def test_refused_urls_name_the_reason(url, allow_http, reason):
    with pytest.raises(PolicyError) as e:
        check_url(url, allow_http)
    assert reason in str(e.value)


def test_userinfo_never_appears_in_the_message():
    with pytest.raises(PolicyError) as e:
        check_url("https://user:secret@example.com/x", False)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("address, denied", [
    ("169.254.169.254", "169.254.0.0/16"), ("169.254.0.1", "169.254.0.0/16"), ("fe80::1", "fe80::/10"),
    ("fe80::1%eth0", "fe80::/10"), ("::ffff:169.254.169.254", "169.254.0.0/16"), ("fd00:ec2::254", "fd00:ec2::254/128"),
    ("127.0.0.1", "127.0.0.0/8"), ("::1", "::1/128"), ("0.0.0.0", "0.0.0.0/8"), ("::ffff:127.0.0.1", "127.0.0.0/8"),
    ("93.184.216.34", None), ("10.1.2.3", None), ("2001:db8::1", None),
])
def test_default_deny_list(address, denied):
    net = AddressPolicy().denied_by(address)
    assert (str(net) if net else None) == denied


def test_allow_overrides_deny_and_deny_is_configurable():
    policy = AddressPolicy.from_strings(allow=["127.0.0.1/32"])
    assert policy.denied_by("127.0.0.1") is None
    assert policy.denied_by("127.0.0.2") is not None
    assert policy.denied_by("169.254.169.254") is not None
    custom = AddressPolicy.from_strings(deny=["10.0.0.0/8"])
    assert custom.denied_by("10.9.9.9") is not None and custom.denied_by("127.0.0.1") is None


def test_invalid_network_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid network"):
        AddressPolicy.from_strings(deny=["not-a-cidr"])
