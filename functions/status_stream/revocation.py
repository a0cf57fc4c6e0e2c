"""Open streams end within seconds of their credentials being revoked.

A stream checks its credentials once, when it opens. Logout and refresh-token reuse
revoke a bearer token or its whole session (refresh family) later, and a stream may stay
open for the token's whole lifetime (15 minutes); an API-key stream has no end at all,
and its key may be revoked meanwhile. :class:`RevocationWatch` re-checks every open
stream of the process every ``interval_s`` seconds with ONE query (``Store.revoked``)
and asks the revoked ones to end: the client's reconnect then gets 401.

The database being down does not end streams: the check is skipped (logged) and
retried at the next interval.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from functions.status_stream.hub import Subscriber
from shared.errors import ServiceUnavailable

log = logging.getLogger(__name__)

# (jtis, families, api key ids) -> the revoked ones as (kind, id): kind "jti", "fam" or "key"
Check = Callable[[list[str], list[str], list[str]], Awaitable[set[tuple[str, str]]]]


@dataclass(frozen=True)
class Watched:
    jti: str | None
    family: str | None
    api_key: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in (("jti", self.jti), ("fam", self.family), ("key", self.api_key)) if v]


class RevocationWatch:
    """The open bearer streams of one process and their periodic revocation check."""

    def __init__(self, check: Check, interval_s: float = 5.0) -> None:
        self.check = check
        self.interval_s = interval_s
        self.streams: dict[Subscriber, Watched] = {}
        self.ended = 0  # streams ended because of a revocation (tests, metrics)

    def watch(self, sub: Subscriber, jti: str | None, family: str | None, api_key: str | None = None) -> None:
        watched = Watched(jti, family, api_key)
        if watched.pairs():
            self.streams[sub] = watched

    def forget(self, sub: Subscriber) -> None:
        self.streams.pop(sub, None)

    async def check_once(self) -> int:
        """Re-check every watched stream; end the revoked ones. Returns how many ended."""
        for sub in [s for s in self.streams if s.closed]:
            self.forget(sub)
        if not self.streams:
            return 0
        wanted = {p for w in self.streams.values() for p in w.pairs()}
        revoked = await self.check(*(sorted(i for k, i in wanted if k == kind) for kind in ("jti", "fam", "key")))
        ended = 0
        for sub, w in list(self.streams.items()):
            if any(p in revoked for p in w.pairs()):
                self.forget(sub)
                sub.ask_reconnect()  # the stream ends cleanly; the reconnect is refused (401)
                ended += 1
        self.ended += ended
        return ended

    async def run(self) -> None:
        """Check forever, every ``interval_s`` seconds (never raises but for cancellation)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                ended = await self.check_once()
                if ended:
                    log.info("ended %d stream(s) whose token or session was revoked", ended)
            except asyncio.CancelledError:
                raise
            except ServiceUnavailable as exc:
                log.warning("revocation check skipped: %s", exc.message)
            except Exception:  # never let a bug end the loop
                log.exception("revocation check failed")
