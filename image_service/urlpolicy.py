"""Which URLs and addresses a download may use (pure; fetch.py applies it to every hop of a redirect chain).

- Only http and https; plain http only where the transport says `allowHTTP: true`.
- No userinfo (`user:pass@host`): credentials in image URLs end up in logs and error messages.
- No control characters, spaces or non-ASCII (they would be smuggled into the request line).
- The host's addresses must not fall in a denied network. Denied by default: link-local (169.254.0.0/16 with
  the cloud metadata address 169.254.169.254, fe80::/10, AWS's fd00:ec2::254), loopback and the unspecified
  addresses (both reach services on the node itself). `allow` networks override the deny list (tests serve on
  127.0.0.1). IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from image_service.errors import PolicyError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DENY = (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128",  # link-local, cloud metadata services
    "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128",      # the node itself
)


def check_url(url: str, allow_http: bool) -> SplitResult:
    """The URL split into parts, or PolicyError saying why it is refused."""
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in url):
        raise PolicyError(f"{url!r}: URLs must be ASCII without spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise PolicyError(f"{url}: scheme {scheme or '(none)'!r} is not allowed (only https, or http where allowed)")
    if scheme == "http" and not allow_http:
        raise PolicyError(f"{url}: plain http is not allowed for this image (its transport needs allowHTTP: true)")
    if "@" in parts.netloc:
        raise PolicyError(f"{scheme}://…@{parts.hostname}: credentials (userinfo) in image URLs are not allowed")
    if not parts.hostname:
        raise PolicyError(f"{url}: no host")
    try:
        _ = parts.port  # parsed lazily: raises for a port that is not a number in range
    except ValueError:
        raise PolicyError(f"{url}: invalid port") from None
    return parts


@dataclass(frozen=True)
class AddressPolicy:
    deny: tuple[IPNetwork, ...] = field(default_factory=lambda: _networks(DEFAULT_DENY))
    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_strings(cls, deny: list[str] | tuple[str, ...] | None = None,
                     allow: list[str] | tuple[str, ...] = ()) -> AddressPolicy:
        return cls(deny=_networks(DEFAULT_DENY if deny is None else deny), allow=_networks(allow))

    def denied_by(self, address: str) -> IPNetwork | None:
        """The deny-list network that refuses `address`, or None when it may be used."""
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow if net.version == ip.version):
            return None
        return next((net for net in self.deny if net.version == ip.version and ip in net), None)


def _networks(specs) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(s, strict=False) for s in specs)
    except ValueError as e:
        raise ValueError(f"invalid network in the address policy: {e}") from None
