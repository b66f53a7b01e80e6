"""How a URL is read before anything is sent: its scheme, the origin (scheme, host, port) the
HTTP library will connect to, and a redacted form for messages and logs.

One URL parser decides where a request goes: :func:`origin` reads a URL the way the HTTP
library will connect (urllib3's parser, on the URL as ``requests`` prepares it) and refuses
every URL that Python's ``urllib.parse`` would read differently, or that holds a backslash,
whitespace, control characters, user info (``user@``), percent-encoding or non-IDNA characters
in its host. The API client and the image fetcher both decide by it.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit, urlunsplit

import idna
import requests
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url


class UnsafeURL(ValueError):
    """A URL refused because its destination is not certain: it is not http(s), or parsers
    could read its host differently."""


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# an authority of host names, IPv4 and bracketed IPv6 literals and a port; nothing else
_AUTHORITY = re.compile(r"[A-Za-z0-9._\-]+(?::[0-9]*)?|\[[0-9A-Fa-f:.]+\](?::[0-9]*)?")
# control, format (zero-width, bidi), surrogate and separator characters (spaces, line breaks)
_BAD_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")
DEFAULT_PORTS = {"http": 80, "https": 443}
# scheme, // and the authority up to the first character that ends it for every parser
_HEAD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\\\s]*")


def url_scheme(url: str) -> str:
    """The lowercased scheme of ``url`` (``""`` if it has none), read without parsing the rest."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _parsed(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` as urllib3 reads ``url``, after checking that
    ``urllib.parse`` reads the same; raises UnsafeURL."""
    try:
        split = urlsplit(url)
        split_port = split.port
    except ValueError as e:
        raise UnsafeURL(f"malformed URL ({e})") from e
    try:
        parsed = parse_url(url)
    except LocationParseError as e:
        raise UnsafeURL("malformed URL (the host cannot be parsed)") from e
    scheme = (parsed.scheme or "").lower()
    host = (parsed.host or "").strip("[]").lower()
    if not host:
        raise UnsafeURL("URL without a host")
    if parsed.auth is not None or split.username is not None:
        raise UnsafeURL("user info (user@) in a URL is not allowed")
    split_host = split.hostname or ""
    if not split_host.isascii():
        try:
            split_host = idna.encode(split_host, strict=True, std3_rules=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise UnsafeURL("the host is not a valid internationalized domain name") from e
    if (split.scheme.lower(), split_host, split_port) != (scheme, host, parsed.port):
        raise UnsafeURL("its host is read differently by different URL parsers")
    port = parsed.port if parsed.port is not None else DEFAULT_PORTS.get(scheme)
    if port is None or not 0 < port < 65536:
        raise UnsafeURL("invalid port")
    return scheme, host, port


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an http(s) URL as the HTTP library will connect to it: scheme
    and host lowercased, IPv6 without brackets, internationalized names IDNA-encoded, the default
    port made explicit.

    Raises UnsafeURL (a ValueError) for anything else and for a URL whose destination is
    ambiguous: a backslash, whitespace or control character anywhere; user info, percent-encoding
    or characters other than letters, digits, ``.-_:[]`` and IDNA in the authority; a host or
    port that ``urllib.parse`` and urllib3 read differently, before or after ``requests``
    prepares the URL.
    """
    if not isinstance(url, str):
        raise UnsafeURL("not a URL")
    # a plain space may stand in the path, query or fragment (requests sends it as %20; with
    # backslashes refused it cannot move the authority's end): file names hold spaces
    head = _HEAD.match(url)
    path_start = head.end() if head else len(url)
    for i, ch in enumerate(url):
        if ch == "\\":
            raise UnsafeURL("backslash in URL")
        if ch == " " and i >= path_start and url[-1] != " ":
            continue
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            raise UnsafeURL(f"whitespace or control character {ch!r} in URL")
    scheme = url_scheme(url)
    if scheme not in DEFAULT_PORTS:
        raise UnsafeURL(f"a {scheme!r} URL is not http(s)" if scheme else "not an absolute URL")
    rest = url[len(scheme) + 1 :]
    if not rest.startswith("//"):
        raise UnsafeURL("an http(s) URL needs // and a host")
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if "@" in authority:
        raise UnsafeURL("user info (user@) in a URL is not allowed")
    if not authority.isascii():
        labels = re.split(r"(:[0-9]*)$", authority, maxsplit=1)[0]
        try:
            ascii_host = idna.encode(labels, strict=True, std3_rules=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise UnsafeURL("the host is not a valid internationalized domain name") from e
        authority = ascii_host + authority[len(labels) :]
    if not _AUTHORITY.fullmatch(authority):
        raise UnsafeURL("the host holds characters a host name cannot have")
    decided = _parsed(url)
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
    except (requests.RequestException, ValueError) as e:
        raise UnsafeURL("the URL cannot be prepared for sending") from e
    if _parsed(prepared.url) != decided:
        raise UnsafeURL("its host changes when the URL is prepared for sending")
    return decided


def redact_url(url: str, keep_params: tuple[str, ...] = ("d",)) -> str:
    """A URL safe for messages and logs: no user info, query values other than ``keep_params``
    replaced by ``...``, data URIs shortened, at most 200 characters."""
    if url[:5].lower() == "data:":
        head = url.split(",", 1)[0]
        return f"{head[:60]},<{len(url)} chars>"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(
        p if p.split("=", 1)[0] in keep_params else p.split("=", 1)[0] + "=..."
        for p in parts.query.split("&")
        if p
    )
    text = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return text if len(text) <= 200 else text[:197] + "..."
