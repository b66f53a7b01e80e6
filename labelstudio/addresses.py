"""Which addresses an image fetch may reach (the SSRF rules), and connections that check the
peer address of every socket right after connecting, before a byte is sent (DNS rebinding).
Used by :mod:`labelstudio.fetch`."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from sam2unet.transforms import MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from contracts.settings import Settings

logger = logging.getLogger(__name__)

# Address kinds that ``allow_private`` admits; link-local (169.254.0.0/16 with the cloud metadata
# service, fe80::/10) needs an explicit allow-list entry; multicast, reserved and unspecified
# are never admitted by a flag.
PRIVATE_KINDS = ("private", "loopback", "non-public")
# Address kinds that ``allow_private_storage`` admits for a presigned storage URL.
STORAGE_KINDS = ("private", "loopback")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for fetching task images.

    Attributes:
        max_bytes: largest body accepted, in bytes.
        timeout: seconds for a whole fetch (connect, redirects and body).
        max_pixels: largest decoded image, in pixels (decompression bombs).
        allow_private: admit private, loopback and other non-public unicast addresses
            (``SAM2UNET_ALLOW_PRIVATE_URLS``); never link-local ones (169.254.0.0/16, where
            cloud metadata services answer, and fe80::/10).
        allow_hosts: hosts admitted even when their addresses are not public: host names,
            ``host:port``, IP addresses or CIDR networks (``SAM2UNET_ALLOW_HOSTS``). The only
            way to admit a link-local address. The Label Studio origin is always admitted.
        allow_private_storage: admit a private or loopback address, never a link-local one,
            for a presigned URL that Label Studio's storage endpoint redirected to (never for
            a URL found in a task; ``SAM2UNET_ALLOW_PRIVATE_STORAGE``).
        local_roots: Label Studio local-files document roots readable from disk here: a
            ``/data/local-files/?d=<path>`` URL is read from ``<root>/<path>`` when that file
            exists under a root, else fetched from Label Studio.
    """

    max_bytes: int = 50 * 1024 * 1024
    timeout: float = 15.0
    max_pixels: int = MAX_IMAGE_PIXELS
    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()
    allow_private_storage: bool = False
    local_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout <= 0 or self.max_pixels <= 0:
            raise ValueError("max_bytes, timeout and max_pixels must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls(
            max_bytes=settings.max_image_bytes,
            timeout=settings.fetch_timeout,
            max_pixels=settings.max_image_pixels,
            allow_private=settings.allow_private_urls,
            allow_hosts=tuple(settings.allow_hosts),
            allow_private_storage=settings.allow_private_storage,
            local_roots=tuple(settings.local_files_roots),
        )


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
