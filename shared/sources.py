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
