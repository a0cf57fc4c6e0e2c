"""The warm Chromium (shared/media/browser.py): one browser per process, a fresh context per render.

Real renders with Debian's Chromium: pages come from 127.0.0.1 or from the egress proxy's
virtual origin, names resolve through a stub, and the autouse ``netguard`` fails a test on
any attempt to connect beyond loopback.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from shared import urlguard
from shared.errors import Cancelled, RetryableError, is_retryable
from shared.media import browser, pdf
from tests.fetch.helpers import NetGuard, ScriptedServer, send, serve, stub_resolver

LOOPBACK = urlguard.parse_allow(["127.0.0.0/8"])
RESOLVER = stub_resolver({"intranet.example": ["192.168.1.10"]})
SPIN = "<h1>spin</h1><script>while(true){}</script>"
PIXEL = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                      "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def render(tmp_path: Path, **kw: Any) -> tuple[Path, dict[str, Any]]:
    kw.setdefault("js_delay_ms", 100)
    kw.setdefault("timeout_s", 30)
    kw.setdefault("resolver", RESOLVER)
    out = tmp_path / f"out-{uuid.uuid4().hex[:6]}.pdf"
    return out, pdf.render_pdf(out, engine="chromium", **kw)


def text_of(path: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


def warm_pid() -> int:
    pids = browser.KEEPER.pids()
    assert len(pids) == 1, pids
    return pids[0]


def group_members(pgid: int, kind: str = "") -> set[int]:
    """Live processes of group ``pgid`` (whose command line has ``kind``, when given)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z" and kind.encode() in cmdline:
            found.add(int(entry))
    return found


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture()
def fresh_browser(tmp_path: Path) -> Iterator[int]:
    """A warm browser started for this test (by one render); the pid of its process group."""
    browser.KEEPER.shutdown()
    render(tmp_path, html="<p>warm-up</p>", js_delay_ms=0)
    yield warm_pid()


@pytest.fixture()
def stateful_site() -> Iterator[ScriptedServer]:
    """``/set`` leaves a cookie (header and script), localStorage and a cacheable image;
    ``/get`` shows what a page of the same origin can see."""
    show = ("<script>document.body.appendChild(document.createTextNode("
            "'COOKIE=[' + document.cookie + '] LS=[' + localStorage.getItem('tf') + ']'))</script>")

    def set_state(h: BaseHTTPRequestHandler) -> None:
        body = ("<html><body><img src='/pixel.png'><script>localStorage.setItem('tf', 'LS-SECRET');"
                "document.cookie = 'js=JS-SECRET; path=/';</script>" + show + "</body></html>")
        send(h, 200, body.encode(), {"Content-Type": "text/html", "Set-Cookie": "tf=HDR-SECRET; Path=/"})

    def get_state(h: BaseHTTPRequestHandler) -> None:
        body = "<html><body><img src='/pixel.png'>" + show + "</body></html>"
        send(h, 200, body.encode(), {"Content-Type": "text/html"})

    routes = {"/set": set_state, "/get": get_state,
              "/pixel.png": lambda h: send(h, 200, PIXEL, {"Content-Type": "image/png",
                                                           "Cache-Control": "public, max-age=86400"})}
    with serve(routes) as srv:
        yield srv


def test_renders_share_the_browser_but_no_cookies_storage_or_cache(tmp_path: Path, fresh_browser: int,
                                                                   stateful_site: ScriptedServer) -> None:
    site = stateful_site
    first, _ = render(tmp_path, url=f"{site.base}/set", allow=LOOPBACK)
    # the page itself sees the state it made, so its absence later means isolation
    seen = " ".join(text_of(first).split())
    assert "LS=[LS-SECRET]" in seen and "tf=HDR-SECRET" in seen and "js=JS-SECRET" in seen
    second, _ = render(tmp_path, url=f"{site.base}/get", allow=LOOPBACK)
    assert warm_pid() == fresh_browser  # the same browser served both
    assert "COOKIE=[] LS=[null]" in " ".join(text_of(second).split())
    get = next(r for r in site.requests if r["path"] == "/get")
    assert not any(k.lower() == "cookie" for k in get["headers"]), get["headers"]
    # the cacheable image was fetched again: the first render's HTTP cache is gone too
    assert [r["path"] for r in site.requests].count("/pixel.png") == 2


def test_each_render_gets_its_own_guard_in_the_warm_browser(tmp_path: Path, fresh_browser: int,
                                                            stateful_site: ScriptedServer, netguard: NetGuard) -> None:
    site = stateful_site
    render(tmp_path, url=f"{site.base}/get", allow=LOOPBACK)  # loopback allowed for this render only
    before = len(site.requests)
    html = (f"<h1>GUARDED</h1><img src='{site.base}/pixel.png?again'>"
            "<img src='http://intranet.example/logo.png'><img src='http://10.9.8.7/x.png'>")
    out, info = render(tmp_path, html=html)
    assert warm_pid() == fresh_browser and "GUARDED" in text_of(out)
    blocked = " ".join(b["target"] for b in info["blocked"])
    for target in ("127.0.0.1", "intranet.example", "10.9.8.7"):
        assert target in blocked, info["blocked"]
    assert len(site.requests) == before  # the earlier render's allow-list did not carry over
    with pytest.raises(urlguard.UrlRefused):
        render(tmp_path, url=f"{site.base}/get")
    assert {a[0] for a in netguard.attempts} <= {"127.0.0.1"}


def test_a_browser_crash_mid_render_is_retryable_and_the_next_render_recovers(tmp_path: Path,
                                                                              fresh_browser: int) -> None:
    polls = {"n": 0}

    def crash_on_second_poll() -> bool:
        polls["n"] += 1
        if polls["n"] == 2:
            os.killpg(fresh_browser, signal.SIGKILL)
        return False

    with pytest.raises(RetryableError) as err:
        render(tmp_path, html=SPIN, should_cancel=crash_on_second_poll)
    assert is_retryable(err.value) and polls["n"] >= 2
    assert eventually(lambda: not group_members(fresh_browser))
    out, _ = render(tmp_path, html="<h1>RECOVERED</h1>")
    assert "RECOVERED" in text_of(out) and warm_pid() != fresh_browser


def _spin_renderers(pgid: int, before: set[int], seen: set[int]) -> Callable[[], bool]:
    """A cancel check that notes the renderers started since ``before`` (the spinning page's)."""
    def check() -> bool:
        seen.update(group_members(pgid, "--type=renderer") - before)
        return False
    return check


def test_timeout_fires_and_kills_only_that_renders_renderers(tmp_path: Path, fresh_browser: int) -> None:
    before = group_members(fresh_browser, "--type=renderer")
    mine: set[int] = set()
    started = time.monotonic()
    with pytest.raises(pdf.EngineTimeout) as err:
        render(tmp_path, html=SPIN, timeout_s=3, should_cancel=_spin_renderers(fresh_browser, before, mine))
    assert not is_retryable(err.value) and 3 <= time.monotonic() - started < 3 + browser.DISPOSE_WAIT_S + 2
    assert mine, "the spinning page's renderer was never seen"
    assert eventually(lambda: not (mine & group_members(fresh_browser))), "the runaway renderer survived"
    out, _ = render(tmp_path, html="<h1>STILL-WARM</h1>")
    assert "STILL-WARM" in text_of(out) and warm_pid() == fresh_browser


def test_cancel_ends_the_render_and_its_renderers(tmp_path: Path, fresh_browser: int) -> None:
    before = group_members(fresh_browser, "--type=renderer")
    mine: set[int] = set()
    note = _spin_renderers(fresh_browser, before, mine)
    polls = {"n": 0}

    def cancel_after_a_while() -> bool:
        note()
        polls["n"] += 1
        return polls["n"] >= 4

    with pytest.raises(Cancelled):
        render(tmp_path, html=SPIN, should_cancel=cancel_after_a_while)
    assert mine and eventually(lambda: not (mine & group_members(fresh_browser)))
    assert warm_pid() == fresh_browser


def test_concurrent_renders_share_one_browser(tmp_path: Path, fresh_browser: int) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            out, _ = render(tmp_path, html=f"<h1>PAGE-{i}</h1>", js_delay_ms=300)
            results[i] = text_of(out)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(f"PAGE-{i}" in results[i] for i in range(3))
    assert warm_pid() == fresh_browser


def test_the_browser_is_replaced_after_max_renders(tmp_path: Path, fresh_browser: int) -> None:
    render(tmp_path, html="<p>two</p>", chromium_max_renders=2)
    assert warm_pid() == fresh_browser
    out, _ = render(tmp_path, html="<h1>THIRD</h1>", chromium_max_renders=2)
    assert "THIRD" in text_of(out) and warm_pid() != fresh_browser
    assert eventually(lambda: not group_members(fresh_browser))


_CHILD = textwrap.dedent("""
    import sys, time
    from shared.media import browser, pdf
    if sys.argv[1] == "sigterm":
        browser.install_sigterm()
    def no_dns(host, port):
        raise OSError("no names here")
    pdf.render_pdf(sys.argv[2], html="<p>child</p>", engine="chromium", js_delay_ms=0, resolver=no_dns)
    print(browser.KEEPER.pids()[0], flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize(("how", "sig"), [("sigterm", signal.SIGTERM), ("sigkill", signal.SIGKILL)])
def test_the_browser_ends_with_its_worker_process(tmp_path: Path, how: str, sig: int) -> None:
    """SIGTERM stops the browser on the way out; even SIGKILL does, as the pipe closes."""
    profile = ""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, how, str(tmp_path / "c.pdf")], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert group_members(pid)
        profile = _profile_of(pid)
        child.send_signal(sig)
        assert child.wait(30) == -sig
        assert eventually(lambda: not group_members(pid), 15), "the browser outlived its worker"
        if sig == signal.SIGTERM:
            assert not Path(profile).exists()  # stopped cleanly: its profile is gone too
    finally:
        child.kill()
        child.wait()
        shutil.rmtree(profile, ignore_errors=True)  # what a killed worker leaves behind


def _profile_of(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return next(a.split("=", 1)[1] for a in args if a.startswith("--user-data-dir="))
