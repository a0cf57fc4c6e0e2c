"""Print a page to PDF with the worker's warm headless Chromium (:mod:`shared.media.browser`).

Why the DevTools protocol rather than ``--print-to-pdf``: ``Page.printToPDF`` takes the
paper size and margins for *any* page (a URL too, where no CSS can be injected), reports
the main document's HTTP status, lets us dismiss ``alert()`` dialogs that would block the
page, streams the PDF in bounded chunks, and lets one browser serve many renders, each in
its own fresh browser context.

API::

    nav = print_to_pdf(exe, page_url=..., dest_path=..., paper_in=(8.27, 11.69), margin_in=0.39,
                       landscape=False, proxy_url=proxy.url, timeout_s=60, js_delay_ms=500,
                       max_bytes=..., should_cancel=..., on_progress=..., max_renders=100)
    nav.status      # HTTP status of the main document (after redirects), or None
    nav.error       # Chromium's navigation error (e.g. "net::ERR_TUNNEL_CONNECTION_FAILED"), or None
    nav.printed     # whether dest_path was written (only when the page loaded with a status < 400)

Raises ``EngineTimeout`` (permanent: an endless script or a page that never finishes
loading) when ``timeout_s`` passes, ``Cancelled``, ``PdfTooLarge``, and ``RetryableError``
when Chromium is missing or dies. On every exit the render's context is disposed of (its
renderer processes die with it); when that fails, the whole browser is killed and the next
render starts a new one.
"""
from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from typing import Any

from shared.errors import PermanentError
from shared.media import CancelFn, ProgressFn, never_cancel, no_progress
from shared.media.browser import KEEPER, MAX_RENDERS, EngineTimeout, Page, chromium_args, launch

__all__ = ["EngineTimeout", "Navigation", "PdfTooLarge", "chromium_args", "launch", "print_to_pdf"]

READ_CHUNK = 1024 * 1024  # bytes of PDF per IO.read


class PdfTooLarge(PermanentError):
    code = "too_large"


@dataclass(frozen=True)
class Navigation:
    status: int | None
    error: str | None
    printed: bool
    chain: tuple[str, ...] = ()  # the main document's URLs, the requested one first, then each redirect


def print_to_pdf(exe: str, *, page_url: str, dest_path: str | os.PathLike[str], paper_in: tuple[float, float],
                 margin_in: float, landscape: bool, proxy_url: str, timeout_s: float, js_delay_ms: int,
                 max_bytes: int, should_cancel: CancelFn = never_cancel,
                 on_progress: ProgressFn = no_progress, sandbox: bool = True,
                 user: str = "nobody", max_renders: int = MAX_RENDERS) -> Navigation:
    """Load ``page_url`` in a fresh context browsing through ``proxy_url`` and print it to ``dest_path``.

    ``sandbox``/``user``: Chromium's own sandbox, and who runs it when we are root
    (:func:`shared.media.browser.launch`); ``max_renders``: renders per browser process.
    """
    deadline = time.monotonic() + timeout_s
    browser = KEEPER.acquire(exe, sandbox=sandbox, user=user, max_renders=max_renders)
    page = Page(browser, deadline, timeout_s, should_cancel)
    try:
        page.open(proxy_url)
        return _render(page, page_url, dest_path, paper_in, margin_in, landscape, js_delay_ms, max_bytes,
                       on_progress)
    finally:
        # A render that failed (a runaway script, a cancel) still leaves a reusable browser
        # when its context goes away cleanly; otherwise the browser is killed.
        KEEPER.release(browser, healthy=page.dispose())


def _render(page: Page, page_url: str, dest_path: str | os.PathLike[str], paper_in: tuple[float, float],
            margin_in: float, landscape: bool, js_delay_ms: int, max_bytes: int,
            on_progress: ProgressFn) -> Navigation:
    for domain in ("Page.enable", "Network.enable"):
        page.call(domain)
    on_progress(20)
    nav = page.call("Page.navigate", {"url": page_url})
    chain: list[str] = [page_url]
    if nav.get("errorText"):
        page.drain()  # the document request's events, for the chain
        _document_urls(page.pending, nav.get("frameId"), chain)
        return Navigation(status=None, error=nav["errorText"], printed=False, chain=tuple(chain))
    status = _wait_for_load(page, nav.get("frameId"), chain)
    if status is not None and status >= 400:
        return Navigation(status=status, error=None, printed=False, chain=tuple(chain))
    on_progress(60)
    page.pump(js_delay_ms / 1000)  # let late scripts settle, inside the same deadline
    width, height = paper_in
    stream = page.call("Page.printToPDF", {
        "paperWidth": width, "paperHeight": height, "landscape": landscape, "printBackground": True,
        "marginTop": margin_in, "marginBottom": margin_in, "marginLeft": margin_in, "marginRight": margin_in,
        "preferCSSPageSize": False, "displayHeaderFooter": False, "transferMode": "ReturnAsStream",
    })["stream"]
    on_progress(80)
    _save_stream(page, stream, dest_path, max_bytes)
    return Navigation(status=status, error=None, printed=True, chain=tuple(chain))


def _document_urls(events: list[dict[str, Any]], frame_id: str | None, chain: list[str]) -> None:
    """Add the main frame's document request URLs (redirects included) seen in ``events``."""
    for event in events:
        _note_request(event, frame_id, chain)


def _note_request(event: dict[str, Any], frame_id: str | None, chain: list[str]) -> None:
    params = event.get("params", {})
    if (event.get("method") == "Network.requestWillBeSent" and params.get("type") == "Document"
            and (frame_id is None or params.get("frameId") == frame_id)):
        url = params.get("request", {}).get("url")
        if url and url not in chain:
            chain.append(url)


def _wait_for_load(page: Page, frame_id: str | None, chain: list[str]) -> int | None:
    """Wait for the load event; return the main document's final HTTP status (None if unknown)."""
    status: int | None = None
    while True:
        event = page.next_event()
        method, params = event.get("method"), event.get("params", {})
        _note_request(event, frame_id, chain)
        if method == "Network.responseReceived" and params.get("type") == "Document" and (
                frame_id is None or params.get("frameId") == frame_id):
            status = int(params.get("response", {}).get("status") or 0) or None
        elif method == "Page.loadEventFired":
            return status


def _save_stream(page: Page, stream: str, dest_path: str | os.PathLike[str],
                 max_bytes: int) -> None:
    written = 0
    with open(dest_path, "wb") as out:
        while True:
            chunk = page.call("IO.read", {"handle": stream, "size": READ_CHUNK})
            data = chunk.get("data", "")
            raw = base64.b64decode(data) if chunk.get("base64Encoded") else data.encode("latin-1")
            written += len(raw)
            if written > max_bytes:
                raise PdfTooLarge(f"the PDF is larger than the limit of {max_bytes} bytes")
            out.write(raw)
            if chunk.get("eof"):
                break
    page.call("IO.close", {"handle": stream})
