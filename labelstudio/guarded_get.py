"""The guarded GET of an image URL (see :mod:`labelstudio.fetch` for the rules): every hop's
address checked before connecting (names resolved within the fetch's time limit) and again
right after (:mod:`labelstudio.addresses`), redirects followed by hand, the API key attached
only to a prepared request on Label Studio's origin, the body read within the size and time
limits."""

from __future__ import annotations

import concurrent.futures
import http.cookiejar
import ipaddress
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from contracts.errors import ImageFetchError, LabelStudioError
from labelstudio import storage
from labelstudio.addresses import (
    PRIVATE_KINDS,
    STORAGE_KINDS,
    AddressRefused,
    address_kind,
    guarded_adapter,
    parse_allow,
)
from labelstudio.urls import UnsafeURL, origin, redact_url, url_scheme

if TYPE_CHECKING:
    from labelstudio.client import LabelStudioClient
    from labelstudio.fetch import FetchPolicy

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
USER_AGENT = "sam2unet-assist"
_CHUNK = 64 * 1024
# name lookups run here so that a slow resolver cannot hold a fetch past its time limit
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses ``host`` resolves to, within ``timeout`` seconds; ImageFetchError naming
    the host when it cannot be resolved in time or at all."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(timeout, 0.001))
    except concurrent.futures.TimeoutError as e:
        future.cancel()
        raise ImageFetchError(
            f"cannot resolve host {host!r} within {timeout:.1f} s (DNS too slow)"
        ) from e
    except (OSError, UnicodeError) as e:
        raise ImageFetchError(f"cannot resolve host {host!r}") from e
    return [str(info[4][0]) for info in infos]


def read_limited(response: requests.Response, max_bytes: int, deadline: float, what: str) -> bytes:
    """Read a streamed response body, at most ``max_bytes``, before ``deadline``
    (``time.monotonic()``); ``what`` names the URL in errors.

    Each socket read is given only the time left, so a server that trickles bytes cannot hold
    the caller past the deadline. Raises ImageFetchError when the body is larger than
    ``max_bytes``, too slow, or cut short.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageFetchError(f"{what}: body of {int(declared)} bytes exceeds {max_bytes} bytes")
    raw = response.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ImageFetchError(f"{what}: download timed out")
            if sock is not None:
                sock.settimeout(left)
            chunk = raw.read1(_CHUNK) if hasattr(raw, "read1") else raw.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ImageFetchError(f"{what}: body exceeds {max_bytes} bytes")
            chunks.append(chunk)
    except ImageFetchError:
        response.close()
        raise
    except (ReadTimeoutError, TimeoutError) as e:
        response.close()
        raise ImageFetchError(f"{what}: download timed out") from e
    except (Urllib3Error, OSError) as e:
        # urllib3 reports a body shorter than its Content-Length as a ProtocolError
        response.close()
        raise ImageFetchError(f"{what}: download failed or cut short ({type(e).__name__})") from e
    return b"".join(chunks)


class GuardedGet:
    """GETs http(s) URLs under a FetchPolicy's address, size and time limits.

    Args:
        ls_client: the Label Studio client, whose origin is always admitted and whose key goes
            with requests to that origin (None: no key is ever sent).
        policy: size, time and address limits.
    """

    def __init__(self, ls_client: LabelStudioClient | None, policy: FetchPolicy) -> None:
        self.client = ls_client
        self.policy = policy
        self._names, self._origins, self._nets = parse_allow(policy.allow_hosts)
        if ls_client is not None:
            _, host, port = origin(ls_client.url)
            self._origins.add((host, port))
        # per thread: the (host, port) of a presigned URL Label Studio just redirected to
        self._issued = threading.local()
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy would hide the peer address being checked
        # no cookies kept: Label Studio's session cookie would go to any host of its name
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = guarded_adapter(self.refusal)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    # --- address policy --------------------------------------------------------------------
    def refusal(self, host: str, port: int | None, ip_text: str) -> str | None:
        """Why connecting to ``ip_text`` for ``host:port`` is refused, or None if allowed."""
        host = host.lower().strip("[]").rstrip(".")
        issued = getattr(self._issued, "target", None) == (host, port)
        if host in self._names or (host, port) in self._origins:
            return None
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self._nets):
            return None
        kind = address_kind(ip)
        if kind is None:
            return None
        if self.policy.allow_private and kind in PRIVATE_KINDS:
            return None
        if issued and self.policy.allow_private_storage and kind in STORAGE_KINDS:
            return None
        return kind

    def _target(self, url: str) -> tuple[str, str, int]:
        """``(scheme, host, port)`` that ``url`` will be fetched from (ImageFetchError for a URL
        that is not http(s) or whose destination is ambiguous)."""
        scheme = url_scheme(url)
        if scheme not in ("http", "https"):
            raise ImageFetchError(f"{redact_url(url)}: redirect to a {scheme!r} URL refused")
        try:
            return origin(url)
        except UnsafeURL as e:
            raise ImageFetchError(f"{redact_url(url)}: {e}; refused") from e

    def _check_target(self, url: str, target: tuple[str, str, int], deadline: float) -> None:
        """Refuse ``url`` (ImageFetchError) unless its host is admitted; names are resolved
        here, before ``deadline``, and every address they resolve to must be admitted."""
        _, host, port = target
        host = host.rstrip(".")
        if host in self._names or (host, port) in self._origins:
            return
        try:
            addrs = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                found = resolve(host, port, deadline - time.monotonic())
            except ImageFetchError as e:
                raise ImageFetchError(f"{redact_url(url)}: {e.message}") from e
            addrs = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
        for ip in addrs:
            reason = self.refusal(host, port, str(ip))
            if reason:
                if reason == "link-local":
                    how = f"allow it with SAM2UNET_ALLOW_HOSTS={host}:{port} if it is meant"
                elif getattr(self._issued, "target", None) is not None:
                    how = (
                        "Label Studio's storage endpoint redirected here; allow it with "
                        f"SAM2UNET_ALLOW_HOSTS={host}:{port} or SAM2UNET_ALLOW_PRIVATE_STORAGE=true"
                    )
                else:
                    how = "allow it with SAM2UNET_ALLOW_HOSTS or SAM2UNET_ALLOW_PRIVATE_URLS"
                raise ImageFetchError(
                    f"{redact_url(url)}: host {host} is a {reason} address ({ip}); refused ({how})"
                )

    # --- fetching --------------------------------------------------------------------------
    def get(self, url: str, name: str) -> bytes:
        """The body at ``url``, redirects followed by hand and every hop checked; ``name``
        names the image in errors."""
        deadline = time.monotonic() + self.policy.timeout
        current, hops, retried = url, 0, False
        issued = None  # (host, port) of a target Label Studio's storage endpoint redirected to
        try:
            while True:
                self._issued.target = issued
                target = self._target(current)
                self._check_target(current, target, deadline)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageFetchError(f"{name}: timed out after {self.policy.timeout} s")
                r, is_ls = self._get(current, target, left, retried)
                if r is None:  # a 401 with a refreshable token: once more
                    retried = True
                    continue
                from_endpoint = is_ls and storage.is_endpoint(current, self.client.base_path)
                if r.is_redirect:
                    location = r.headers.get("Location", "")
                    r.close()
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise ImageFetchError(f"{name}: more than {MAX_REDIRECTS} redirects")
                    try:
                        current = urljoin(current, location)
                    except ValueError as e:
                        raise ImageFetchError(f"{name}: redirect to a malformed URL") from e
                    issued = None
                    if from_endpoint and not self.client.is_label_studio_url(current):
                        try:
                            _, host, port = origin(current)
                            issued = (host.rstrip("."), port)
                        except UnsafeURL:
                            pass  # refused at the top of the loop
                    logger.debug("redirect %d to %s", hops, redact_url(current))
                    continue
                if r.status_code != 200:
                    try:
                        if from_endpoint and r.status_code != 401:
                            raise storage.endpoint_error(name, current, r)
                        if issued is not None:
                            raise storage.storage_error(name, current, r)
                        if is_ls and r.status_code in (401, 403):
                            raise self.client.api_error("GET", redact_url(current), r)
                        raise ImageFetchError(
                            f"{redact_url(current)} answered HTTP {r.status_code}"
                        )
                    finally:
                        r.close()
                return read_limited(r, self.policy.max_bytes, deadline, redact_url(current))
        finally:
            self._issued.target = None

    def _get(
        self, current: str, target: tuple[str, str, int], left: float, retried: bool
    ) -> tuple[requests.Response | None, bool]:
        """One GET of ``current`` (which :meth:`_target` read as ``target``) without following
        redirects, with the API key only when the prepared request that is sent has Label
        Studio's origin: (response, whether it is Label Studio), or (None, True) after a 401
        that a refreshed token may cure."""
        try:
            prepared = self.session.prepare_request(
                requests.Request("GET", current, headers={"Accept-Encoding": "identity"})
            )
            sent_to = origin(prepared.url or "")
        except (requests.RequestException, UnsafeURL, ValueError) as e:
            raise ImageFetchError(f"{redact_url(current)}: cannot be prepared; refused") from e
        if sent_to != target:  # what was checked is what is sent, or nothing is
            raise ImageFetchError(f"{redact_url(current)}: its host changes when sent; refused")
        prepared.headers.pop("Authorization", None)
        is_ls = self.client is not None and self.client.authorize(prepared)
        try:
            # the adapter itself: no redirect handling at all (Session.send would parse the
            # Location of a redirect it does not follow, and fail on a malformed one)
            adapter = self.session.get_adapter(prepared.url)
            r = adapter.send(prepared, stream=True, timeout=(left, left))
        except AddressRefused as e:
            raise ImageFetchError(f"{redact_url(current)}: {e}; refused") from e
        except requests.Timeout as e:
            raise ImageFetchError(
                f"{redact_url(current)}: timed out after {self.policy.timeout} s"
            ) from e
        except requests.RequestException as e:
            if is_ls:
                raise LabelStudioError(f"Label Studio unreachable at {self.client.url}") from e
            raise ImageFetchError(
                f"{redact_url(current)}: cannot connect ({type(e).__name__})"
            ) from e
        if (
            r.status_code == 401
            and is_ls
            and not retried
            and self.client.handle_unauthorized(dict(prepared.headers))
        ):
            r.close()
            return None, True
        return r, is_ls
