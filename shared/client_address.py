"""The client's address behind trusted proxies (pure).

Behind Knative's or OpenFaaS's proxies every request arrives from a proxy, so the peer
address says nothing about the client. Each proxy appends the address it received the
request from to a header (``X-Forwarded-For`` by default). Two ways to say which
entries to believe:

* ``trusted_cidrs`` (preferred where the chain's length varies — Knative puts its
  activator in the path only at times): the peer must be one of these networks; the
  entries are then read from the right, skipping those inside the networks, and the
  first one outside is the client.
* ``trusted`` (a count): exactly that many proxies append; the client is the
  ``trusted``-th entry from the right.

Entries further left were written by the client itself and are never believed. With
neither setting (the default) the header is ignored and the peer is the client.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


def client_address(peer: str | None, forwarded: str | None, trusted: int,
                   trusted_cidrs: Sequence[Network] = ()) -> str:
    """The client address (see the module docstring). Never raises; ``"-"`` when nothing
    is known; the peer whenever the header cannot be believed."""
    fallback = peer or "-"
    hops = [h for h in (forwarded or "").split(",") if h.strip()]
    if trusted_cidrs:
        peer_ip = _ip(peer or "")
        if peer_ip is None or not _inside(peer_ip, trusted_cidrs):
            return fallback  # not from one of our proxies: its header is the client's own
        for hop in reversed(hops):
            ip = _ip(hop)
            if ip is None:
                return fallback
            if not _inside(ip, trusted_cidrs):
                return str(ip)
        return fallback  # nothing but proxies: keep the peer
    if trusted <= 0 or len(hops) < trusted:
        return fallback
    ip = _ip(hops[-trusted])
    return str(ip) if ip is not None else fallback
