"""Peer addresses as the acceptance and routing decisions compare them."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_ip(address: str) -> IPAddress | None:
    """The peer's IP address, an IPv4-mapped IPv6 address as the IPv4 address it maps
    (a dual-stack listener reports ``::ffff:10.1.2.3``); None when it is not an address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    """True when *address* lies in one of *networks*."""
    ip = peer_ip(address)
    return ip is not None and any(ip in network for network in networks)


def is_loopback(address: str) -> bool:
    """True when *address* is this host's own (127.0.0.0/8, ::1, or mapped)."""
    ip = peer_ip(address)
    return ip is not None and ip.is_loopback
