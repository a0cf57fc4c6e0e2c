"""generate-pdf core: an ``url`` or ``html`` rendered by wkhtmltopdf (pdfkit) or headless Chromium.

API::

    info = render_pdf(dest_path, **payload, **options_from_settings(settings), on_progress=..., should_cancel=...)
    # or spelled out:
    info = render_pdf(dest_path, url=None, html="<h1>hi</h1>", engine="wkhtmltopdf",
                      page_size="A4", orientation="portrait", margin_mm=10,
                      allow=policy.allow, resolver=urlguard.system_resolver,
                      timeout_s=settings.pdf_timeout_s, js_delay_ms=500, max_bytes=settings.fetch_max_bytes,
                      wkhtmltopdf_path=settings.wkhtmltopdf_path, chromium_path=settings.chromium_path,
                      on_progress=..., should_cancel=...)
    info == {"engine", "content_type": "application/pdf", "ext": "pdf", "size", "pages",
             "blocked": [{"target", "reason"}, ...], "blocked_count"}

Safety, the same for both engines:
- The engine reaches the network only through a per-render :class:`EgressProxy` that
  applies the SSRF guard to every request (main page, redirects, sub-resources, XHR) and
  pins the address it checked; ``allow`` is the allow-list (``settings.fetch_allow_cidrs``).
  Refused sub-resources are left out of the PDF and listed in ``info["blocked"]``; a
  refused main page (or redirect) fails the task with ``UrlRefused``.
- User HTML is served from a virtual ``http`` origin, never from a file, and wkhtmltopdf
  runs with ``--disable-local-file-access``: a page cannot read local files. An ``html``
  that references ``file:`` URLs is refused up front (``LocalFileRefused``) so the user
  learns why, instead of getting a PDF with holes.
- The whole render (JavaScript included) is bounded by ``timeout_s``; past it the engine's
  process group is killed and the task fails with ``EngineTimeout`` (permanent: a page
  that loops forever would loop again). ``js_delay_ms`` is the settle time after load.
- Engines run with a minimal environment (no secrets) and a throw-away home directory.

Failures: ``BadPdfOptions``, ``LocalFileRefused``, ``urlguard.BadUrl``/``urlguard.UrlRefused``,
``PageLoadFailed`` (the main page answered 4xx), ``EngineTimeout``, ``PdfTooLarge``,
``RenderFailed`` (engine error; stderr tail in the message) — permanent; ``PageUnavailable``
(the page answered 5xx/408/429 or its server was unreachable) and ``RetryableError``
(engine missing or crashed) — retryable; ``Cancelled``.
"""
from __future__ import annotations

import html as html_lib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import pdfkit

from shared import urlguard
from shared.errors import Cancelled, PermanentError, RetryableError
from shared.media import CancelFn, ProgressFn, child_env, never_cancel, no_progress, wait_exit
from shared.media.browser import MAX_RENDERS
from shared.media.chromium import EngineTimeout, Navigation, PdfTooLarge, print_to_pdf
from shared.media.egress_proxy import EgressProxy, Entry

__all__ = ["render_pdf", "options_from_settings", "EngineTimeout", "PdfTooLarge", "BadPdfOptions", "LocalFileRefused", "PageLoadFailed",
           "PageUnavailable", "RenderFailed", "PAGE_SIZES_MM"]


class BadPdfOptions(PermanentError):
    code = "bad_options"


class LocalFileRefused(PermanentError):
    code = "local_file_refused"


class PageLoadFailed(PermanentError):
    code = "page_load_failed"


class PageUnavailable(RetryableError):
    code = "page_unavailable"


class RenderFailed(PermanentError):
    code = "render_failed"


PAGE_SIZES_MM = {"A3": (297.0, 420.0), "A4": (210.0, 297.0), "A5": (148.0, 210.0), "Letter": (215.9, 279.4),
                 "Legal": (215.9, 355.6), "Tabloid": (279.4, 431.8)}
ENGINES = ("wkhtmltopdf", "chromium")
MAX_HTML_BYTES = 5 * 1024 * 1024
REPORT_EVERY_S = 0.5
STDERR_TAIL = 1000
_FILE_REF = re.compile(r"(?i)(?<![a-z0-9+.-])file:[^\s\"'<>]+")
_RETRY_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True)
class PdfJob:
    url: str | None
    html: str | None
    engine: str
    page_size: str
    landscape: bool
    margin_mm: float


def options_from_settings(settings: Any) -> dict[str, Any]:
    """The limits and engine paths ``render_pdf`` takes, from ``Settings``: ``render_pdf(dest, **payload,
    **options_from_settings(s), on_progress=..., should_cancel=...)``."""
    return {"allow": urlguard.parse_allow(settings.fetch_allow_cidrs), "timeout_s": settings.pdf_timeout_s,
            "max_bytes": settings.fetch_max_bytes, "wkhtmltopdf_path": settings.wkhtmltopdf_path,
            "chromium_path": settings.chromium_path, "chromium_sandbox": settings.chromium_sandbox,
            "chromium_user": settings.chromium_user, "chromium_max_renders": settings.chromium_max_renders}


def make_job(url: str | None = None, html: str | None = None, engine: str = "wkhtmltopdf", page_size: str = "A4",
             orientation: str = "portrait", margin_mm: float = 10) -> PdfJob:
    """Validate the payload's options. Raises ``BadPdfOptions`` or ``LocalFileRefused``."""
    if (url is None) == (html is None):
        raise BadPdfOptions("give exactly one of url or html")
    if html is not None:
        if not isinstance(html, str) or not html.strip():
            raise BadPdfOptions("html must be a non-empty string")
        if len(html.encode("utf-8", "replace")) > MAX_HTML_BYTES:
            raise BadPdfOptions(f"html is larger than {MAX_HTML_BYTES} bytes")
        ref = find_local_file_reference(html)
        if ref:
            raise LocalFileRefused(f"the html refers to a local file ({ref}); local file access is disabled")
    if engine not in ENGINES:
        raise BadPdfOptions(f"engine must be one of {', '.join(ENGINES)}")
    if page_size not in PAGE_SIZES_MM:
        raise BadPdfOptions(f"page_size must be one of {', '.join(PAGE_SIZES_MM)}")
    if orientation not in ("portrait", "landscape"):
        raise BadPdfOptions("orientation must be portrait or landscape")
    if isinstance(margin_mm, bool) or not isinstance(margin_mm, int | float) or not 0 <= margin_mm <= 50:
        raise BadPdfOptions("margin_mm must be a number from 0 to 50")
    return PdfJob(url, html, engine, page_size, orientation == "landscape", float(margin_mm))


def find_local_file_reference(html: str) -> str | None:
    """The first ``file:`` URL an HTML document mentions (after entity decoding), or None. Pure."""
    for text in (html, html_lib.unescape(html)):
        m = _FILE_REF.search(text)
        if m:
            return m.group(0)[:200]
    return None


def wkhtmltopdf_command(exe: str, page_url: str, dest: str | os.PathLike[str], job: PdfJob, proxy_url: str,
                        js_delay_ms: int) -> list[str]:
    """The wkhtmltopdf command line, built by pdfkit. Pure.

    The source is always a URL (our proxy's page for ``html``): pdfkit reads
    ``<meta name="pdfkit-...">`` options out of *string* sources, which would let user HTML
    switch options such as local file access back on.
    """
    margin = f"{job.margin_mm:g}mm"
    options: dict[str, Any] = {
        "page-size": job.page_size, "orientation": "Landscape" if job.landscape else "Portrait",
        "margin-top": margin, "margin-right": margin, "margin-bottom": margin, "margin-left": margin,
        "encoding": "UTF-8", "disable-local-file-access": None, "disable-plugins": None,
        "proxy": proxy_url, "proxy-hostname-lookup": None,  # names resolved by the proxy only
        "javascript-delay": str(js_delay_ms), "stop-slow-scripts": None,
        "load-error-handling": "abort", "load-media-error-handling": "ignore", "log-level": "warn",
    }
    config = pdfkit.configuration(wkhtmltopdf=exe)
    kit = pdfkit.PDFKit(page_url, "url", options=options, configuration=config, verbose=True)
    return [str(part) for part in kit.command(os.fspath(dest))]


def render_pdf(dest_path: str | os.PathLike[str], *, url: str | None = None, html: str | None = None,
               engine: str = "wkhtmltopdf", page_size: str = "A4", orientation: str = "portrait",
               margin_mm: float = 10, allow: Sequence[urlguard.Network] = (),
               resolver: urlguard.Resolver = urlguard.system_resolver, timeout_s: float = 60.0, js_delay_ms: int = 500,
               max_bytes: int = 100 * 1024 * 1024, wkhtmltopdf_path: str = "/usr/bin/wkhtmltopdf",
               chromium_path: str = "/usr/bin/chromium", on_progress: ProgressFn = no_progress,
               should_cancel: CancelFn = never_cancel, chromium_sandbox: bool = True,
               chromium_user: str = "nobody", chromium_max_renders: int = MAX_RENDERS,
               **_ignored: Any) -> dict[str, Any]:
    """Render the page to ``dest_path``; see the module docstring. ``**_ignored`` takes extra payload keys."""
    job = make_job(url, html, engine, page_size, orientation, margin_mm)
    if job.url is not None:
        urlguard.check_url(job.url, allow=allow, resolver=resolver)  # a clear refusal before any engine starts
    js_delay_ms = max(0, min(int(js_delay_ms), int(timeout_s * 1000) // 2))
    if should_cancel():
        raise Cancelled("cancelled before rendering")
    pages = {"/": (job.html.encode("utf-8"), "text/html; charset=utf-8")} if job.html is not None else {}
    on_progress(5)
    try:
        with EgressProxy(allow=allow, resolver=resolver, max_bytes=max_bytes, pages=pages) as proxy:
            page_url = proxy.page_url() if job.html is not None else str(job.url)
            if job.engine == "chromium":
                _run_chromium(chromium_path, page_url, dest_path, job, proxy, timeout_s, js_delay_ms, max_bytes,
                              should_cancel, on_progress, chromium_sandbox, chromium_user, chromium_max_renders)
            else:
                _run_wkhtmltopdf(wkhtmltopdf_path, page_url, dest_path, job, proxy, timeout_s, js_delay_ms,
                                 should_cancel, on_progress)
        if proxy.over_budget:
            raise PdfTooLarge(f"the page downloaded more than the limit of {max_bytes} bytes")
        size = _check_output(dest_path, max_bytes)
    except BaseException:
        _remove(dest_path)
        raise
    blocked = [e for e in proxy.refused if e.reason != "no such page"]
    return {"engine": job.engine, "content_type": "application/pdf", "ext": "pdf", "size": size,
            "pages": count_pages(dest_path), "blocked_count": len(blocked),
            "blocked": [{"target": e.target, "reason": e.reason} for e in blocked[:20]]}


def _check_output(dest_path: str | os.PathLike[str], max_bytes: int) -> int:
    try:
        size = os.path.getsize(dest_path)
        with open(dest_path, "rb") as fh:
            head = fh.read(5)
    except OSError:
        raise RenderFailed("the engine wrote no PDF") from None
    if head != b"%PDF-":
        raise RenderFailed("the engine wrote something that is not a PDF")
    if size > max_bytes:
        raise PdfTooLarge(f"the PDF is {size} bytes; the limit is {max_bytes}")
    return size


def count_pages(path: str | os.PathLike[str]) -> int | None:
    """Pages of a PDF written by either engine (uncompressed page objects), or None if unsure."""
    with open(path, "rb") as fh:
        data = fh.read()
    n = len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))
    return n or None


def _entry_for(proxy: EgressProxy, url: str) -> Entry | None:
    """The proxy's first log entry for ``url``: the request itself (http) or its tunnel (https)."""
    try:
        scheme, host, port, _ = urlguard.split_url(url)
    except urlguard.BadUrl:
        return None
    tunnel = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for entry in list(proxy.log):
        if entry.target == url or (scheme == "https" and entry.method == "CONNECT" and entry.target == tunnel):
            return entry
    return None


def proxy_chain(proxy: EgressProxy, url: str) -> list[str]:
    """The main document's URLs as the proxy saw them: ``url``, then each http redirect it answered."""
    chain = [url]
    for _ in range(20):
        entry = _entry_for(proxy, chain[-1])
        if entry is None or entry.method == "CONNECT" or not (300 <= entry.status < 400 and entry.location):
            break
        nxt = urljoin(chain[-1], entry.location)
        if nxt in chain:
            break
        chain.append(nxt)
    return chain


def _chain_failure(proxy: EgressProxy, chain: Sequence[str]) -> Exception | None:
    """Why the main document failed, judged from the proxy's side of ``chain`` (None if it did not)."""
    for url in chain:
        entry = _entry_for(proxy, url)
        if entry is None:
            continue
        if not entry.allowed:
            if entry.status == 403:
                return urlguard.UrlRefused(f"the page was refused: {entry.reason}", details={"target": entry.target})
            if entry.status in (502, 504):
                return PageUnavailable(f"the page could not be loaded: {entry.reason}")
            return PageLoadFailed(f"the page could not be loaded: {entry.reason}")
    last = _entry_for(proxy, chain[-1]) if chain else None
    if last is not None and last.method != "CONNECT" and last.status >= 400:
        return _status_failure(last.status)
    return None


def _status_failure(status: int) -> Exception:
    if status >= 500 or status in _RETRY_STATUS:
        return PageUnavailable(f"the page answered HTTP {status}", details={"status": status})
    return PageLoadFailed(f"the page answered HTTP {status}", details={"status": status})


# --- wkhtmltopdf ---------------------------------------------------------------------
def _run_wkhtmltopdf(exe: str, page_url: str, dest: str | os.PathLike[str], job: PdfJob, proxy: EgressProxy,
                     timeout_s: float, js_delay_ms: int, should_cancel: CancelFn, on_progress: ProgressFn) -> None:
    try:
        cmd = wkhtmltopdf_command(exe, page_url, dest, job, proxy.url, js_delay_ms)
    except OSError:  # pdfkit checks that the binary exists
        raise RetryableError(f"wkhtmltopdf is not installed at {exe}") from None
    with tempfile.TemporaryDirectory(prefix="tf-wkhtml-") as home, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    env=child_env(home), start_new_session=True)
        except FileNotFoundError:
            raise RetryableError(f"wkhtmltopdf is not installed at {exe}") from None
        on_progress(20)
        try:
            _wait(proc, timeout_s, should_cancel)
        except BaseException:
            _kill_group(proc)
            raise
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    _classify_wkhtmltopdf(proc.returncode, stderr, proxy, page_url, _is_pdf(dest))
    on_progress(90)


def _wait(proc: subprocess.Popen[bytes], timeout_s: float, should_cancel: CancelFn) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if wait_exit(proc, min(REPORT_EVERY_S, deadline - time.monotonic())):
            return
        if time.monotonic() >= deadline:
            raise EngineTimeout(f"the page did not render within {timeout_s:g} s (endless script or slow page?)")
        if should_cancel():
            raise Cancelled("cancelled while rendering")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _is_pdf(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(5) == b"%PDF-"
    except OSError:
        return False


_FAILED_LOAD = re.compile(r"Error: Failed to load (\S+?), with network status code \d+ and http status code (\d+)")


def _classify_wkhtmltopdf(rc: int, stderr: str, proxy: EgressProxy, page_url: str, wrote_pdf: bool) -> None:
    """Map wkhtmltopdf's exit to success or an error.

    wkhtmltopdf exits 1 both when the main page failed and when only an iframe did, and
    writes a PDF in both cases; so the main page's fate is read from the proxy (its
    request, each redirect) and from the error line naming one of those URLs.
    """
    tail = stderr.strip()[-STDERR_TAIL:]
    if rc < 0:
        raise RetryableError(f"wkhtmltopdf was killed by signal {-rc}")
    if "Blocked access to file" in stderr:
        raise LocalFileRefused("the page refers to a local file; local file access is disabled")
    chain = proxy_chain(proxy, page_url)
    failure = _chain_failure(proxy, chain)
    if failure is not None:
        raise failure
    for url, http_status in _FAILED_LOAD.findall(stderr):
        if url in chain:
            raise _status_failure(int(http_status)) if int(http_status) >= 400 else PageUnavailable(
                f"the page could not be loaded: {tail}")
    if rc == 0 or (rc == 1 and wrote_pdf):
        return
    raise RenderFailed(f"wkhtmltopdf failed (exit {rc}): {tail}")


# --- chromium ------------------------------------------------------------------------
def _run_chromium(exe: str, page_url: str, dest: str | os.PathLike[str], job: PdfJob, proxy: EgressProxy,
                  timeout_s: float, js_delay_ms: int, max_bytes: int, should_cancel: CancelFn,
                  on_progress: ProgressFn, sandbox: bool = True, user: str = "nobody",
                  max_renders: int = MAX_RENDERS) -> None:
    w_mm, h_mm = PAGE_SIZES_MM[job.page_size]
    nav: Navigation = print_to_pdf(
        exe, page_url=page_url, dest_path=dest, paper_in=(w_mm / 25.4, h_mm / 25.4), margin_in=job.margin_mm / 25.4,
        landscape=job.landscape, proxy_url=proxy.url, timeout_s=timeout_s, js_delay_ms=js_delay_ms,
        max_bytes=max_bytes, should_cancel=should_cancel, on_progress=on_progress, sandbox=sandbox, user=user,
        max_renders=max_renders)
    failure = _chain_failure(proxy, nav.chain or (page_url,))
    if failure is not None:
        raise failure
    if nav.error:
        raise PageUnavailable(f"the page could not be loaded: {nav.error}")
    if nav.status is not None and nav.status >= 400:
        raise _status_failure(nav.status)
    on_progress(90)


def _remove(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
