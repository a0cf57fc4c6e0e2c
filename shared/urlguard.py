"""The SSRF guard: which addresses a URL may reach, checked before any connection.

API::

    target = check_url(url, allow=parse_allow(settings.fetch_allow_cidrs), resolver=resolver)
    target.address                        # the pinned IP every connection must use
    refusal_reason(ip, allow) -> str | None                          # one address, pure

Rules: http/https only, no credentials in the URL; the host is resolved once through
``resolver`` (injectable: ``(host, port) -> [ip, ...]``) and every address it returns must
be public (or inside ``allow``), else the URL is refused; the caller connects to the
pinned address while the Host header, SNI and certificate check keep the real name.
IPv6 must be global unicast outside its special-purpose blocks; forms that embed IPv4
are judged by the IPv4 inside. A refusal never names the resolved address.

``BadUrl`` (unparsable, wrong scheme, credentials) and ``UrlRefused`` (a forbidden
address) are permanent errors: the input can never succeed; ``FetchFailed`` (DNS
trouble) is retryable. Used by ``shared.fetch``
(sources, page sub-resources) and by webhook delivery.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from shared.errors import PermanentError, RetryableError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]


# --- errors --------------------------------------------------------------------------
class BadUrl(PermanentError):
    code = "bad_url"


class UrlRefused(PermanentError):
    """The URL (or a redirect) points at an address the SSRF guard refuses."""

    code = "url_refused"


class FetchFailed(RetryableError):
    code = "fetch_failed"


# --- the address policy (pure) -------------------------------------------------------
# Named ranges first so a refusal says why; anything else not globally routable is refused
# by the ``is_global`` test below.
_NAMED_RANGES: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("fc00::/7", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("192.0.0.0/24", "reserved"),
    ("198.18.0.0/15", "reserved"),
)
_NAMED = tuple((ipaddress.ip_network(cidr), why) for cidr, why in _NAMED_RANGES)

# IPv6: only global unicast (2000::/3) may be reached, minus its special-purpose blocks.
_V6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_V6_SPECIAL = tuple((ipaddress.ip_network(cidr), why) for cidr, why in (
    ("2001:db8::/32", "documentation"),
    ("2001::/23", "special-purpose"),  # IETF protocol assignments: Teredo, benchmarking, ORCHID...
    ("2002::/16", "6to4"),  # tunnels to the IPv4 address it embeds
    ("3fff::/20", "documentation"),
))
# Forms that embed an IPv4 address in their last 32 bits (outside 2000::/3, so refused
# anyway; the embedded address only makes the refusal say why).
_V4_TAIL = tuple(ipaddress.ip_network(c) for c in (
    "::ffff:0:0/96",  # IPv4-mapped
    "::/96",  # IPv4-compatible (deprecated)
    "::ffff:0:0:0/96",  # SIIT (IPv4-translated)
    "64:ff9b::/96",  # NAT64, well-known prefix
    "64:ff9b:1::/48",  # NAT64, local-use prefix (some translators put the address last)
))
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def parse_allow(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parse an allow-list (``settings.fetch_allow_cidrs``). Raises ``ValueError`` on a bad entry."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def _embedded_v4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address may tunnel or translate to (mapped, compatible,
    SIIT, NAT64, 6to4); empty for an IPv4 address or a plain IPv6 one."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if any(ip in net for net in _V4_TAIL) and int(ip) > 1:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _NAT64_LOCAL:  # RFC 6052 layout for a /48 prefix: bits 48-63 and 72-87
        b = ip.packed
        out.append(ipaddress.IPv4Address(b[6:8] + b[9:11]))
    return [v4 for v4 in out if int(v4)]  # an all-zero part embeds nothing


def _v4_reason(addr: ipaddress.IPv4Address) -> str | None:
    for net, why in _NAMED:
        if net.version == 4 and addr in net:
            return why
    if not addr.is_global or addr.is_multicast:
        return "not globally routable"
    return None


def _v6_reason(addr: ipaddress.IPv6Address) -> str | None:
    for net, why in _NAMED:
        if net.version == 6 and addr in net:
            return why
    if addr not in _V6_GLOBAL_UNICAST:
        return "not global unicast"
    for net, why in _V6_SPECIAL:
        if addr in net:
            return why
    return None


def refusal_reason(ip: IPAddress | str, allow: Sequence[Network] = ()) -> str | None:
    """Why the guard refuses ``ip`` (e.g. ``"loopback"``), or ``None`` when it may be reached.

    An address inside ``allow`` (or whose embedded IPv4 address is) is permitted.
    Otherwise IPv4 must be globally routable, and IPv6 must be global unicast (2000::/3)
    outside the special-purpose blocks; IPv6 forms that embed an IPv4 address (mapped,
    compatible, SIIT, NAT64, 6to4) are refused, named after that address when it is
    itself private (``::ffff:127.0.0.1`` is "loopback").
    """
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    inner = _embedded_v4(addr)
    candidates: list[IPAddress] = [*inner, addr]
    if any(c in net for c in candidates for net in allow if c.version == net.version):
        return None
    for v4 in inner:
        why = _v4_reason(v4)
        if why:
            return why
    return _v4_reason(addr) if isinstance(addr, ipaddress.IPv4Address) else _v6_reason(addr)


# --- URL checking --------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to ask for."""

    url: str
    scheme: str
    host: str  # IDNA-encoded, lower case, no brackets
    port: int
    address: str  # the pinned IP
    request_target: str  # path + query, percent-encoded

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver: every TCP address, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_NUMERIC_V4 = re.compile(r"^[0-9a-fA-FxX.]+$")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def _literal_ip(host: str) -> IPAddress | None:
    """``host`` as an IP literal, including the odd IPv4 spellings (``127.1``, ``0x7f.1``, ``2130706433``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_V4.match(host) and not host.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def split_url(url: str) -> tuple[str, str, int, str]:
    """Validate ``url`` and return ``(scheme, host, port, request_target)``. Raises ``BadUrl``."""
    if not isinstance(url, str) or not url or len(url) > 8192:
        raise BadUrl("the URL must be a non-empty string of at most 8192 characters")
    if any(ch in url for ch in "\r\n\t\x00"):
        raise BadUrl("the URL contains control characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise BadUrl(f"cannot parse the URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadUrl(f"only http and https URLs can be fetched, not {scheme or 'a relative URL'!r}")
    if parts.username is not None or parts.password is not None:
        raise BadUrl("credentials in the URL are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise BadUrl("the URL has no host")
    try:
        host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        raise BadUrl("the host name is not a valid international domain name") from None
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    target = path + ("?" + quote(parts.query, safe=_PATH_SAFE + "?") if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), target


def check_url(url: str, *, allow: Sequence[Network] = (), resolver: Resolver = system_resolver) -> Target:
    """Check one URL against the guard and pin its address (one DNS resolution).

    Raises ``BadUrl`` (scheme, syntax, unknown host), ``UrlRefused`` (any resolved address
    refused: a name that resolves to one public and one private address is refused, so
    the pin can never be steered), ``FetchFailed`` (temporary DNS failure).
    """
    scheme, host, port, request_target = split_url(url)
    literal = _literal_ip(host)
    if literal is not None:
        addresses = [str(literal)]
        host = str(literal) if literal.version == 4 else host
    else:
        try:
            addresses = list(resolver(host, port))
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                raise BadUrl(f"the host {host!r} does not resolve") from None
            raise FetchFailed(f"cannot resolve {host!r}: {exc}", details={"host": host}) from None
        except OSError as exc:
            raise FetchFailed(f"cannot resolve {host!r}: {exc}", details={"host": host}) from None
        if not addresses:
            raise BadUrl(f"the host {host!r} does not resolve")
    for address in addresses:
        try:
            why = refusal_reason(address, allow)
        except ValueError:
            raise FetchFailed(f"the resolver returned a bad address for {host!r}", details={"host": host}) from None
        if why:
            # Never name the resolved address: that would map internal DNS for the caller.
            raise UrlRefused(f"refused to fetch {host}: it points at a {why} address", details={"reason": why})
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0],
                  request_target=request_target)


