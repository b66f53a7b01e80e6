"""Which addresses an image fetch may reach (the SSRF rules), and connections that check the
peer address of every socket right after connecting, before a byte is sent (DNS rebinding).
Used by :mod:`labelstudio.fetch`."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

logger = logging.getLogger(__name__)

# Address kinds that ``allow_private`` admits; link-local (169.254.0.0/16 with the cloud metadata
# service, fe80::/10) needs an explicit allow-list entry; multicast, reserved and unspecified
# are never admitted by a flag.
PRIVATE_KINDS = ("private", "loopback", "non-public")
# Address kinds that ``allow_private_storage`` admits for a presigned storage URL.
STORAGE_KINDS = ("private", "loopback")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_kind(ip: IPAddress) -> str | None:
    """Why an address is not a public unicast one (``"loopback"``, ``"private"``, ...), or None
    for a public address. IPv4-mapped IPv6 addresses are judged as their IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-public"
    return None


class AddressRefused(Exception):
    """Raised inside a connection whose peer address is refused (before anything is sent)."""


class PeerCheck:
    """Mixin for urllib3 connections: check the connected socket's peer address."""

    check: Callable[[str, int | None, str], str | None]

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        peer = sock.getpeername()[0]
        reason = type(self).check(self.host, self.port, peer)
        if reason:
            sock.close()
            raise AddressRefused(f"connected to {peer}, a {reason} address")
        return sock


def guarded_adapter(check: Callable[[str, int | None, str], str | None]) -> HTTPAdapter:
    """A requests adapter whose new connections refuse peers for which ``check(host, port,
    peer_ip)`` gives a reason."""
    conn = type(
        "GuardedHTTPConnection", (PeerCheck, HTTPConnection), {"check": staticmethod(check)}
    )
    sconn = type(
        "GuardedHTTPSConnection", (PeerCheck, HTTPSConnection), {"check": staticmethod(check)}
    )
    pool = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": conn})
    spool = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": sconn})

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": pool, "https": spool}

    return GuardedAdapter()


def parse_allow(
    entries: tuple[str, ...],
) -> tuple[set[str], set[tuple[str, int]], list[IPNetwork]]:
    names: set[str] = set()
    origins: set[tuple[str, int]] = set()
    nets: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        host, sep, port = entry.rpartition(":")
        if sep and port.isdigit() and (host.startswith("[") or ":" not in host):
            origins.add((host.strip("[]"), int(port)))
        else:
            names.add(entry.strip("[]"))
    return names, origins, nets
