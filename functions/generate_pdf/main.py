"""generate-pdf: the worker function for ``com.taskforge.generate-pdf.requested``.

A thin adapter binding the PDF core (``shared.media.pdf.render_pdf``: wkhtmltopdf through
pdfkit by default, headless Chromium with ``engine: "chromium"``) to the shared worker.
The payload carries the page itself (``url`` or ``html``), so there is no ``source`` to
fetch: the engine loads the page through the core's SSRF-filtering egress proxy. A page
``url`` goes through that host's ``fetch`` circuit breaker, so an unreachable site fails
fast for a while instead of tying up renderers. Entry points: ``application`` (WSGI, what the
server runs) and functions-framework's target ``handle``.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from shared import breakers, envelope, urlguard
from shared.media.browser import install_sigterm
from shared.media.pdf import options_from_settings, render_pdf
from shared.worker import Job, Output, Worker

MAX_BLOCKED_LISTED = 20  # refused sub-resources named in the result (the count is always exact)


def run(job: Job) -> Output:
    """Render the payload's ``url`` or ``html`` into ``output.pdf``."""
    s = job.settings
    dest = job.workdir / "output.pdf"
    kwargs: dict[str, Any] = dict(options_from_settings(s), resolver=job.resolver or urlguard.system_resolver,
                                  on_progress=job.progress, should_cancel=job.should_cancel)
    url = job.payload.get("url")
    if isinstance(url, str):
        host = (urlsplit(url).hostname or "").lower()
        info = breakers.call(breakers.fetch_breaker(host), render_pdf, dest, **job.payload, **kwargs)
    else:
        info = render_pdf(dest, **job.payload, **kwargs)
    meta = {"engine": info.get("engine"), "pages": info.get("pages"), "blocked_count": info.get("blocked_count", 0),
            "blocked": list(info.get("blocked") or [])[:MAX_BLOCKED_LISTED]}
    return Output(dest, "application/pdf", "output.pdf", meta)


worker = Worker("generate-pdf", run)
application = envelope.wsgi_app(worker.handle, name="generate-pdf", batch=worker.handle_batch)  # served by gunicorn (docs/architecture.md §6)
install_sigterm()  # the warm Chromium stops with the process (shared.media.browser)


def handle(request: Any) -> Any:
    """functions-framework's HTTP target (``--target handle``): the same envelope."""
    return worker.http(request)
