"""shared/media/pdf.py: real renders with wkhtmltopdf and headless Chromium, checked with poppler.

Pages are served from 127.0.0.1 only; names resolve through a stub; every engine request
goes through the egress proxy, whose log shows what was asked for and what was refused.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from shared import urlguard
from shared.errors import Cancelled, RetryableError, is_retryable
from shared.media import chromium, pdf
from tests.fetch.helpers import NetGuard, send, serve, stub_resolver

ENGINES = ["wkhtmltopdf", "chromium"]
LOOPBACK = urlguard.parse_allow(["127.0.0.0/8"])
RESOLVER = stub_resolver({"assets.example": ["127.0.0.1"], "intranet.example": ["192.168.1.10"]})
for tool in ("pdftotext", "pdfinfo", "wkhtmltopdf", "chromium"):
    assert shutil.which(tool), f"{tool} is required by these tests (make deps installs it)"


def text_of(path: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


def page_size_pts(path: Path) -> tuple[float, float]:
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Page size:\s+([\d.]+) x ([\d.]+) pts", info)
    assert m, info
    return float(m.group(1)), float(m.group(2))


def first_word_x(path: Path) -> float:
    bbox = subprocess.run(["pdftotext", "-bbox", str(path), "-"], capture_output=True, text=True, check=True).stdout
    m = re.search(r'<word xMin="([\d.]+)"', bbox)
    assert m, bbox[:500]
    return float(m.group(1))


def render(tmp_path: Path, engine: str, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("js_delay_ms", 50)
    kw.setdefault("timeout_s", 30)
    kw.setdefault("resolver", RESOLVER)
    out = tmp_path / f"out-{uuid.uuid4().hex[:6]}.pdf"
    return out, pdf.render_pdf(out, engine=engine, **kw)


# --- options and pure helpers ----------------------------------------------------------
@pytest.mark.parametrize(("html", "found"), [
    ("<iframe src='file:///etc/passwd'>", "file:///etc/passwd"), ("<img src=FILE:/etc/hosts>", "FILE:/etc/hosts"),
    ("<a href='&#102;ile:///etc/shadow'>x</a>", "file:///etc/shadow"), ("<p>Profile: admin</p>", None),
    ("<p>my file: notes.txt</p>", None), ("<p>myfile:x</p>", None),
])
def test_local_file_references(html: str, found: str | None) -> None:
    assert pdf.find_local_file_reference(html) == found


@pytest.mark.parametrize("opts", [dict(), dict(url="http://a.example/", html="<p>x</p>"), dict(html="   "),
                                  dict(html="<p>x</p>", engine="prince"), dict(html="<p>x</p>", page_size="B5"),
                                  dict(html="<p>x</p>", orientation="diagonal"), dict(html="<p>x</p>", margin_mm=51),
                                  dict(html="<p>x</p>", margin_mm=True)])
def test_bad_options(opts: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(pdf.BadPdfOptions):
        pdf.make_job(**opts)


def test_wkhtmltopdf_command_keeps_local_files_off_and_everything_proxied() -> None:
    job = pdf.make_job(html="<meta name='pdfkit-enable-local-file-access' content=''><p>x</p>")
    cmd = pdf.wkhtmltopdf_command("/usr/bin/wkhtmltopdf", "http://192.0.2.1/", "/tmp/o.pdf", job, "http://127.0.0.1:9", 100)
    assert "--disable-local-file-access" in cmd and "--enable-local-file-access" not in cmd
    assert cmd[cmd.index("--proxy") + 1] == "http://127.0.0.1:9" and "--proxy-hostname-lookup" in cmd
    assert cmd[-2:] == ["http://192.0.2.1/", "/tmp/o.pdf"] and "--quiet" not in cmd


def test_chromium_args_route_everything_through_the_given_proxy() -> None:
    args = chromium.chromium_args("/usr/bin/chromium", "http://127.0.0.1:9", "/tmp/p")
    assert "--proxy-server=http://127.0.0.1:9" in args and "--proxy-bypass-list=<-loopback>" in args
    assert any(a.startswith("--host-resolver-rules=MAP * ~NOTFOUND") for a in args)


def test_chromium_runs_sandboxed_unless_configured_off() -> None:
    assert "--no-sandbox" not in chromium.chromium_args("/usr/bin/chromium", "http://127.0.0.1:9", "/tmp/p")
    assert "--no-sandbox" in chromium.chromium_args("/usr/bin/chromium", "http://127.0.0.1:9", "/tmp/p", False)
    args = ["/usr/bin/chromium", "--headless"]
    assert chromium.launch(args, sandbox=True, euid=1000, user="nobody", setpriv="/usr/bin/setpriv") == (args, None)
    argv, owner = chromium.launch(args, sandbox=True, euid=0, user="nobody", setpriv="/usr/bin/setpriv")
    assert argv[0] == "/usr/bin/setpriv" and argv[-2:] == args and owner is not None and owner[0] != 0
    with pytest.raises(RetryableError):  # never silently unsandboxed as root
        chromium.launch(args, sandbox=True, euid=0, user="nobody", setpriv=None)


def _chromium_processes(marker: str) -> list[tuple[int, list[str]]]:
    """(uid, argv) of every live process whose command line mentions ``marker``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            uid = int(next(line for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                           if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if any(marker in a for a in argv) and "chromium" in argv[0]:
            out.append((uid, argv))
    return out


def test_chromium_renders_inside_its_sandbox(tmp_path: Path) -> None:
    """While it renders, no Chromium process runs with ``--no-sandbox``, and none runs as
    root (a root worker hands Chromium to an unprivileged user, as the sandbox requires)."""
    import threading

    seen: list[tuple[int, list[str]]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(_chromium_processes("tf-chromium-"))
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, info = render(tmp_path, "chromium", html="<h1>sandboxed</h1>", js_delay_ms=1500)
    finally:
        done.set()
        watcher.join(5)
    assert "sandboxed" in text_of(out) and info["pages"] >= 1
    assert seen, "no chromium process observed during the render"
    assert not [argv for _, argv in seen if "--no-sandbox" in argv]
    assert all(uid != 0 for uid, _ in seen)


# --- html sources ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_html_renders_with_page_size_orientation_and_margin(tmp_path: Path, engine: str) -> None:
    marker = f"TASKFORGE-{uuid.uuid4().hex[:12].upper()}"
    html = f"<html><body><p>{marker}</p></body></html>"
    out, info = render(tmp_path, engine, html=html, page_size="A4", margin_mm=0)
    assert marker in text_of(out)
    assert (info["engine"], info["content_type"], info["ext"], info["pages"]) == (engine, "application/pdf", "pdf", 1)
    assert info["size"] == out.stat().st_size and info["blocked_count"] == 0
    w, h = page_size_pts(out)
    assert abs(w - 595.3) < 2 and abs(h - 841.9) < 2
    out2, _ = render(tmp_path, engine, html=html, page_size="Letter", orientation="landscape", margin_mm=40)
    w, h = page_size_pts(out2)
    assert abs(w - 792) < 2 and abs(h - 612) < 2
    assert first_word_x(out2) >= 40 / 25.4 * 72 - 1 > first_word_x(out) + 50  # 40 mm is about 113 pt


@pytest.mark.parametrize("engine", ENGINES)
def test_file_reference_in_html_is_a_permanent_bad_input(tmp_path: Path, engine: str) -> None:
    with pytest.raises(pdf.LocalFileRefused) as err:
        render(tmp_path, engine, html="<h1>x</h1><iframe src='file:///etc/passwd'></iframe>")
    assert not is_retryable(err.value) and err.value.code == "local_file_refused"


@pytest.mark.parametrize("engine", ENGINES)
def test_script_built_file_urls_still_cannot_read_local_files(tmp_path: Path, engine: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-" + uuid.uuid4().hex)
    # the scheme is assembled at run time, so the up-front check cannot see it: the engine must block it
    html = (f"<meta name='pdfkit-enable-local-file-access' content=''><h1>VISIBLE</h1>"
            f"<script>var f=document.createElement('iframe');f.src='fi'+'le://{secret}';"
            f"document.body.appendChild(f);var i=document.createElement('img');i.src='fi'+'le://{secret}';"
            f"document.body.appendChild(i);</script>")
    try:
        out, _ = render(tmp_path, engine, html=html, js_delay_ms=300)
    except pdf.LocalFileRefused:
        return  # refusing is as good as blocking
    text = text_of(out)
    assert "VISIBLE" in text and "SECRET-" not in text


# --- url sources, sub-resources and the SSRF guard ----------------------------------------------
@pytest.fixture()
def site():  # type: ignore[no-untyped-def]
    pixel = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                          "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")

    def page(h: BaseHTTPRequestHandler) -> None:
        port = h.server.server_address[1]
        body = (f"<html><body><h1>REMOTE-PAGE-OK</h1>"
                f"<img src='http://assets.example:{port}/pixel.png'>"
                "<img src='http://10.1.2.3/private.png'>"
                "<iframe src='http://169.254.169.254/latest/meta-data/'></iframe>"
                "<img src='http://intranet.example/logo.png'>"
                "<img src='https://[fd00:ec2::254]/x.png'>"
                "<script>fetch('http://192.168.0.1/api').catch(function(){})</script>"
                "</body></html>").encode()
        send(h, 200, body, {"Content-Type": "text/html; charset=utf-8"})

    routes = {
        "/page": page,
        "/pixel.png": lambda h: send(h, 200, pixel, {"Content-Type": "image/png"}),
        "/to-private": lambda h: send(h, 302, b"", {"Location": "http://10.0.0.7/secret"}),
        "/to-metadata": lambda h: send(h, 301, b"", {"Location": "http://169.254.169.254/latest/"}),
        "/missing": lambda h: send(h, 404, b"<h1>not here</h1>", {"Content-Type": "text/html"}),
        "/busy": lambda h: send(h, 503, b"<h1>later</h1>", {"Content-Type": "text/html"}),
    }
    with serve(routes) as srv:
        yield srv


@pytest.mark.parametrize("engine", ENGINES)
def test_url_renders_and_private_subresources_are_blocked(tmp_path: Path, site, engine: str,  # type: ignore[no-untyped-def]
                                                          netguard: NetGuard) -> None:
    out, info = render(tmp_path, engine, url=f"{site.base}/page", allow=LOOPBACK, js_delay_ms=300)
    assert "REMOTE-PAGE-OK" in text_of(out)
    paths = [r["path"] for r in site.requests]
    assert paths[0] == "/page" and "/pixel.png" in paths  # the allowed image came through the proxy
    blocked = " ".join(b["target"] for b in info["blocked"])
    expected = ["10.1.2.3", "169.254.169.254", "intranet.example"]
    if engine == "chromium":  # QtWebKit never even asks for an https IPv6 literal
        expected.append("fd00:ec2::254")
    for target in expected:
        assert target in blocked, (target, info["blocked"])
    assert {a[0] for a in netguard.attempts} == {"127.0.0.1"}  # the proxy never dialled out


@pytest.mark.parametrize("engine", ENGINES)
def test_loopback_url_refused_unless_allowed(tmp_path: Path, site, engine: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(urlguard.UrlRefused):
        render(tmp_path, engine, url=f"{site.base}/page")
    assert site.requests == []  # refused before any engine started


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", ["/to-private", "/to-metadata"])
def test_redirect_of_the_page_to_a_private_address_fails_the_task(tmp_path: Path, site, engine: str,  # type: ignore[no-untyped-def]
                                                                  path: str) -> None:
    with pytest.raises(urlguard.UrlRefused) as err:
        render(tmp_path, engine, url=f"{site.base}{path}", allow=LOOPBACK)
    assert not is_retryable(err.value)
    assert not list(tmp_path.glob("out-*.pdf"))


def test_hostname_resolving_to_a_private_address_is_refused(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(urlguard.UrlRefused):
        pdf.render_pdf(tmp_path / "o.pdf", url="http://intranet.example/", resolver=stub_resolver(
            {"intranet.example": ["192.168.1.10"]}, calls))
    assert calls == ["intranet.example"]


@pytest.mark.parametrize("engine", ENGINES)
def test_page_status_maps_to_permanent_or_retryable(tmp_path: Path, site, engine: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pdf.PageLoadFailed):
        render(tmp_path, engine, url=f"{site.base}/missing", allow=LOOPBACK)
    with pytest.raises(pdf.PageUnavailable) as err:
        render(tmp_path, engine, url=f"{site.base}/busy", allow=LOOPBACK)
    assert is_retryable(err.value)


# --- bounded time, cancel, broken engines --------------------------------------------------
@pytest.fixture()
def engine_groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Process group ids of the wkhtmltopdf processes started during the test (each leads its own group)."""
    groups: list[int] = []
    real_popen = subprocess.Popen

    class Recording(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, **kw)
            groups.append(self.pid)

    monkeypatch.setattr(pdf.subprocess, "Popen", Recording)
    return groups


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


# Chromium stays warm across renders: its timeout and cancel are in test_warm_chromium.py.
@pytest.mark.parametrize("engine", ["wkhtmltopdf"])
def test_endless_javascript_times_out_permanently_and_the_engine_dies(tmp_path: Path, engine: str,
                                                                      engine_groups: list[int]) -> None:
    with pytest.raises(pdf.EngineTimeout) as err:
        render(tmp_path, engine, html="<h1>loop</h1><script>while(true){}</script>", timeout_s=3)
    assert not is_retryable(err.value) and err.value.code == "timeout"
    assert len(engine_groups) == 1 and not group_alive(engine_groups[0])


@pytest.mark.parametrize("engine", ["wkhtmltopdf"])
def test_cancel_stops_the_render(tmp_path: Path, engine: str, engine_groups: list[int]) -> None:
    polls = {"n": 0}

    def cancel_on_second_poll() -> bool:
        polls["n"] += 1
        return polls["n"] >= 2

    with pytest.raises(Cancelled):
        render(tmp_path, engine, html="<script>while(true){}</script>", timeout_s=30, should_cancel=cancel_on_second_poll)
    assert len(engine_groups) == 1 and not group_alive(engine_groups[0])


def test_alert_dialogs_do_not_block_chromium(tmp_path: Path) -> None:
    out, _ = render(tmp_path, "chromium", html="<h1>AFTER-ALERT</h1><script>alert('hi');confirm('sure?')</script>")
    assert "AFTER-ALERT" in text_of(out)


@pytest.mark.parametrize(("engine", "key"), [("wkhtmltopdf", "wkhtmltopdf_path"), ("chromium", "chromium_path")])
def test_missing_engine_is_retryable(tmp_path: Path, engine: str, key: str) -> None:
    with pytest.raises(RetryableError):
        render(tmp_path, engine, html="<p>x</p>", **{key: str(tmp_path / "no-such-engine")})


def test_options_from_settings(tmp_path: Path) -> None:
    from shared.settings import load_settings
    s = load_settings({}, fetch_allow_cidrs=("127.0.0.0/8",), pdf_timeout_s=7.0, fetch_max_bytes=123_456,
                      chromium_sandbox=False, chromium_user="daemon")
    opts = pdf.options_from_settings(s)
    assert opts == {"allow": LOOPBACK, "timeout_s": 7.0, "max_bytes": 123_456, "wkhtmltopdf_path": s.wkhtmltopdf_path,
                    "chromium_path": s.chromium_path, "chromium_sandbox": False, "chromium_user": "daemon",
                    "chromium_max_renders": s.chromium_max_renders}
    payload = {"html": "<p>FROM-SETTINGS</p>", "page_size": "A5", "engine": "wkhtmltopdf"}
    info = pdf.render_pdf(tmp_path / "o.pdf", **payload, **opts)
    assert info["pages"] == 1 and "FROM-SETTINGS" in text_of(tmp_path / "o.pdf")
