"""Source addresses as limits count them: one IPv4 address, or one IPv6 /64.

An IPv6 host usually holds a whole /64 and can pick a fresh address per connection, so
keying a limit by the full address would give it 2**64 buckets; a /64 is what one site or
host gets. IPv4-mapped IPv6 addresses are their IPv4 address.
"""

from __future__ import annotations

import ipaddress


def source_group(host: str) -> str:
    """The unit a source-keyed limit counts: an IPv4 address, or an IPv6 /64."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host[:64]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """One CIDR (or a bare address, as its /32 or /128); host bits set are an error, not a guess."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(
            f"expected a CIDR such as 10.0.0.0/8 or an IP address, got {text!r}: {exc}"
        ) from None


class AllowList:
    """Which peer addresses may reach a tunnelled service.

    An IPv4-mapped IPv6 peer (a dual-stack listener) is matched as its IPv4 address, and a
    link-local scope (``fe80::1%eth0``) is ignored, so one rule covers both spellings. Anything
    that is not an IP address (a Unix socket peer, an empty string) is refused.
    """

    __slots__ = ("networks",)

    def __init__(self, networks: tuple[Network, ...] = ()) -> None:
        self.networks = networks

    @classmethod
    def parse(cls, items: tuple[str, ...] | list[str]) -> AllowList:
        return cls(tuple(parse_network(item) for item in items))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def admits(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def strings(self) -> list[str]:
        return [str(net) for net in self.networks]
