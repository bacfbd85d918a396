"""Which addresses are this machine and which allowlist entries open the relay to the Internet."""

from __future__ import annotations

import ipaddress

#: relay. Anything else counts as public.
_NON_PUBLIC_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",
        "::1/128", "fc00::/7", "fe80::/10",
    )
)
#: Widest allowlist entries that may contain public addresses (a large company's public range).
OPEN_RELAY_MIN_PREFIX = {4: 16, 6: 48}


def is_loopback_host(host: str) -> bool:
    """Is ``host`` this machine: a listen address that only accepts local connections, or a client's
    address (IPv4 127/8, ::1, and IPv4-mapped IPv6 of those)? The listener asks the same question."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a DNS name other than localhost: assume it resolves beyond loopback
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def too_wide(network: str) -> bool:
    """An allowlist entry that opens the relay to (a large part of) the Internet.

    True when the entry contains public addresses and is wider than /16 (IPv4) or /48 (IPv6):
    ``0.0.0.0/0``, ``::/0``, ``0.0.0.0/1``, ``2000::/3``. Private blocks of any size (``10.0.0.0/8``,
    ``172.16.0.0/12``, ``fc00::/7``) and a public /24 are fine.
    """
    net = ipaddress.ip_network(network, strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        mapped = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
        return too_wide(str(mapped))
    if any(net.version == block.version and net.subnet_of(block)  # type: ignore[arg-type]
           for block in _NON_PUBLIC_NETWORKS):
        return False
    return net.prefixlen < OPEN_RELAY_MIN_PREFIX[net.version]
