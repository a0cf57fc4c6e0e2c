"""The client's address behind trusted proxies (pure).

Behind Knative's or OpenFaaS's proxies every request arrives from the proxy, so the peer
address says nothing about the client. Each proxy appends the address it received the
request from to a header (``X-Forwarded-For`` by default); with ``trusted`` proxies in
front of the gateway, the client is the ``trusted``-th entry from the right. Entries
further left were written by the client itself and are never believed. With
``trusted=0`` (the default) the header is ignored and the peer address is the client.
"""
from __future__ import annotations

import ipaddress


def client_address(peer: str | None, forwarded: str | None, trusted: int) -> str:
    """The client address: ``peer`` unless ``trusted`` > 0 and ``forwarded`` (the proxy
    header's value) holds at least ``trusted`` entries, the ``trusted``-th from the right
    being a valid IP address. Never raises; ``"-"`` when nothing is known."""
    fallback = peer or "-"
    if trusted <= 0 or not forwarded:
        return fallback
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    if len(hops) < trusted:
        return fallback
    candidate = hops[-trusted]
    if candidate.startswith("[") and "]" in candidate:  # [v6]:port
        candidate = candidate[1:candidate.index("]")]
    elif candidate.count(":") == 1:  # v4:port
        candidate = candidate.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return fallback
