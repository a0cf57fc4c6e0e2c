"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

Why the protocol rather than ``--print-to-pdf``: ``Page.printToPDF`` takes the paper size
and margins for *any* page (a URL too, where no CSS can be injected), reports the main
document's HTTP status, lets us dismiss ``alert()`` dialogs that would block the page, and
streams the PDF in bounded chunks. The pipe needs no port and no WebSocket library:
Chromium reads JSON messages (NUL-terminated) on fd 3 and writes on fd 4.

API::

    nav = print_to_pdf(exe, page_url=..., dest_path=..., paper_in=(8.27, 11.69), margin_in=0.39,
                       landscape=False, proxy_url=proxy.url, timeout_s=60, js_delay_ms=500,
                       max_bytes=..., should_cancel=..., on_progress=...)
    nav.status      # HTTP status of the main document (after redirects), or None
    nav.error       # Chromium's navigation error (e.g. "net::ERR_TUNNEL_CONNECTION_FAILED"), or None
    nav.printed     # whether dest_path was written (only when the page loaded with a status < 400)

Chromium runs with its own sandbox (never ``--no-sandbox`` unless configured off): as
the unprivileged ``chromium_user`` when the worker is root (:func:`launch`).

Raises ``EngineTimeout`` (permanent: an endless script or a page that never finishes
loading) when ``timeout_s`` passes, ``Cancelled``, ``PdfTooLarge``, and ``RetryableError``
when Chromium is missing or dies. On every exit the whole process group is killed and the
temporary profile removed.
"""
from __future__ import annotations

import base64
import json
import os
import pwd
import selectors
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from shared.errors import Cancelled, PermanentError, RetryableError
from shared.media import CancelFn, ProgressFn, child_env, never_cancel, no_progress

REPORT_EVERY_S = 0.5
READ_CHUNK = 1024 * 1024  # bytes of PDF per IO.read
STDERR_TAIL = 1000


class EngineTimeout(PermanentError):
    code = "timeout"


class PdfTooLarge(PermanentError):
    code = "too_large"


@dataclass(frozen=True)
class Navigation:
    status: int | None
    error: str | None
    printed: bool
    chain: tuple[str, ...] = ()  # the main document's URLs, the requested one first, then each redirect


# Everything Chromium would otherwise do on its own (updates, metrics, sign-in, time
# sync, safe browsing) is switched off: a render must make no request the page did not.
_QUIET = (
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--no-default-browser-check", "--disable-default-apps", "--disable-extensions",
    "--disable-component-extensions-with-background-pages", "--disable-client-side-phishing-detection",
    "--disable-domain-reliability", "--disable-breakpad", "--disable-crash-reporter", "--metrics-recording-only",
    "--no-pings", "--disable-field-trial-config", "--password-store=basic", "--use-mock-keychain",
    "--disable-features=Translate,MediaRouter,DialMediaRouteProvider,OptimizationHints,"
    "CertificateTransparencyComponentUpdater,NetworkTimeServiceQuerying,AutofillServerCommunication,"
    "InterestFeedContentSuggestions,SafeBrowsing,HttpsUpgrades,LensOverlay",
    "--disable-search-engine-choice-screen", "--safebrowsing-disable-auto-update",
)


def chromium_args(exe: str, proxy_url: str, profile_dir: str, sandbox: bool = True) -> list[str]:
    """The command line: headless, every request through ``proxy_url``, nothing else on the network. Pure.

    ``proxy_url`` is the *browser-wide* proxy: :func:`print_to_pdf` points it at a dead
    loopback port so Chromium's own background traffic (updates, sign-in; Debian's wrapper
    even adds remote extensions) goes nowhere, and gives the page's browser context the
    guarded proxy. ``sandbox=False`` adds ``--no-sandbox`` (see :func:`launch`).
    """
    return [
        exe, "--headless", *(() if sandbox else ("--no-sandbox",)), "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--mute-audio", "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
        f"--proxy-server={proxy_url}", "--proxy-bypass-list=<-loopback>",  # loopback too: no exceptions
        # Chromium itself resolves nothing: proxied names are resolved by the proxy, and a
        # request that somehow skipped it finds no address.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
        "--block-new-web-contents", "--disable-popup-blocking", *_QUIET, "about:blank",
    ]


def launch(args: list[str], *, sandbox: bool, euid: int, user: str,
           setpriv: str | None) -> tuple[list[str], tuple[int, int] | None]:
    """How to start Chromium: ``(argv, (uid, gid) to own the profile or None)``. Pure but
    for the user lookup.

    Chromium renders untrusted HTML, so it runs inside its own sandbox (namespaces and
    seccomp-bpf per renderer). That sandbox refuses to run as root: a root worker
    (a local stack, CI) starts Chromium as the unprivileged ``user`` through ``setpriv``;
    the container image already runs as non-root and starts it directly. Raises
    ``RetryableError`` when root must drop privileges but cannot (no such user, no
    ``setpriv``): never silently unsandboxed.
    """
    if not sandbox or euid != 0:
        return args, None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise RetryableError(f"no user {user!r} to run the chromium sandbox as") from None
    if not setpriv:
        raise RetryableError("setpriv is needed to start chromium unprivileged") from None
    return ([setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--", *args],
            (pw.pw_uid, pw.pw_gid))


class _Browser:
    """One Chromium process and its protocol pipe; ``call`` is synchronous with a global deadline."""

    def __init__(self, exe: str, proxy_url: str, deadline: float, timeout_s: float,
                 should_cancel: CancelFn, sandbox: bool = True, user: str = "nobody") -> None:
        self.deadline, self.timeout_s, self.should_cancel = deadline, timeout_s, should_cancel
        self.profile = tempfile.mkdtemp(prefix="tf-chromium-")
        argv, owner = launch(chromium_args(exe, proxy_url, self.profile, sandbox), sandbox=sandbox,
                             euid=os.geteuid(), user=user, setpriv=shutil.which("setpriv"))
        if owner is not None:
            os.chown(self.profile, *owner)
        self.stderr = tempfile.TemporaryFile()
        self.events: list[dict[str, Any]] = []
        self._next_id, self._buf, self._last_poll = 0, b"", 0.0
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR)
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                   (os.POSIX_SPAWN_DUP2, self.stderr.fileno(), 2),
                   (os.POSIX_SPAWN_DUP2, cmd_r, 3), (os.POSIX_SPAWN_DUP2, out_w, 4)]
        try:
            # posix_spawn, not Popen: the protocol wants exactly fds 3 and 4, and setsid
            # makes Chromium lead a process group we can kill whole.
            self.pid = os.posix_spawn(argv[0], argv, child_env(self.profile), file_actions=actions, setsid=True)
        except FileNotFoundError:
            self._cleanup_fds(cmd_r, out_w, devnull)
            self.close()
            raise RetryableError(f"chromium is not installed at {exe}") from None
        self._cleanup_fds(cmd_r, out_w, devnull)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._out_r, selectors.EVENT_READ)

    @staticmethod
    def _cleanup_fds(*fds: int) -> None:
        for fd in fds:
            os.close(fd)

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode("utf-8", "replace").strip()
        return text[-STDERR_TAIL:]

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise RetryableError("chromium exited: " + self.stderr_tail()) from None
        return self._next_id

    def _tick(self) -> float:
        """Enforce the deadline and poll for cancel; return the seconds left."""
        now = time.monotonic()
        if now >= self.deadline:
            raise EngineTimeout(f"the page did not render within {self.timeout_s:g} s")
        if now - self._last_poll >= REPORT_EVERY_S:
            self._last_poll = now
            if self.should_cancel():
                raise Cancelled("cancelled while rendering")
        return self.deadline - now

    def _read_message(self, until: float | None = None) -> dict[str, Any] | None:
        """The next message; None if ``until`` (monotonic) passes first."""
        while b"\0" not in self._buf:
            left = self._tick()
            if until is not None:
                left = min(left, until - time.monotonic())
                if left <= 0:
                    return None
            if self._sel.select(timeout=min(0.25, left)):
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RetryableError("chromium exited: " + self.stderr_tail())
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        msg = json.loads(raw)
        if msg.get("method") == "Page.javascriptDialogOpening":
            # alert()/confirm() would block the page until the deadline: dismiss them at once
            self.send("Page.handleJavaScriptDialog", {"accept": False}, msg.get("sessionId"))
        return msg

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and wait for its answer, keeping the events that arrive meanwhile."""
        want = self.send(method, params, session)
        while True:
            msg = self._read_message()
            assert msg is not None
            if msg.get("id") == want:
                if "error" in msg:
                    raise RetryableError(f"chromium refused {method}: {msg['error'].get('message')}")
                return dict(msg.get("result", {}))
            if "method" in msg:
                self.events.append(msg)

    def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        while True:
            msg = self._read_message()
            if msg is not None and "method" in msg:
                return msg

    def pump(self, seconds: float) -> None:
        """Keep reading (dialogs dismissed, events kept) for ``seconds``, within the deadline."""
        until = min(time.monotonic() + seconds, self.deadline)
        while (msg := self._read_message(until)) is not None:
            if "method" in msg:
                self.events.append(msg)

    def close(self) -> None:
        pid = getattr(self, "pid", None)
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill_strays(self.profile)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            # SIGKILL is delivered at once but the leader's children (renderer, zygote,
            # GPU helpers) finish dying asynchronously: wait so that a render never returns
            # while parts of its browser still run.
            _wait_group_gone(pid, GROUP_EXIT_WAIT_S)
        for fd in (getattr(self, "_cmd_w", None), getattr(self, "_out_r", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if hasattr(self, "_sel"):
            self._sel.close()
        self.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


GROUP_EXIT_WAIT_S = 5.0


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _kill_strays(profile: str) -> None:
    """Kill any process still naming our profile directory (a helper that left the group)."""
    marker = f"--user-data-dir={profile}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker in fh.read():
                    os.kill(int(entry), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def print_to_pdf(exe: str, *, page_url: str, dest_path: str | os.PathLike[str], paper_in: tuple[float, float],
                 margin_in: float, landscape: bool, proxy_url: str, timeout_s: float, js_delay_ms: int,
                 max_bytes: int, should_cancel: CancelFn = never_cancel,
                 on_progress: ProgressFn = no_progress, sandbox: bool = True,
                 user: str = "nobody") -> Navigation:
    """Load ``page_url`` and print it to ``dest_path``; see the module docstring.
    ``sandbox``/``user``: Chromium's own sandbox, and who runs it when we are root (:func:`launch`)."""
    deadline = time.monotonic() + timeout_s
    # A bound, never-listening socket: connections to it are refused, and no one else can
    # take the port while we hold it.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    browser: _Browser | None = None
    try:
        browser = _Browser(exe, f"http://127.0.0.1:{hole.getsockname()[1]}", deadline, timeout_s, should_cancel,
                           sandbox, user)
        context = browser.call("Target.createBrowserContext", {
            "proxyServer": proxy_url, "proxyBypassList": "<-loopback>", "disposeOnDetach": True})["browserContextId"]
        target = browser.call("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Browser.setDownloadBehavior", {"behavior": "deny"})
        for domain in ("Page.enable", "Network.enable"):
            browser.call(domain, session=session)
        on_progress(20)
        nav = browser.call("Page.navigate", {"url": page_url}, session=session)
        chain: list[str] = [page_url]
        if nav.get("errorText"):
            _document_urls(browser.events, nav.get("frameId"), chain)
            return Navigation(status=None, error=nav["errorText"], printed=False, chain=tuple(chain))
        status = _wait_for_load(browser, session, nav.get("frameId"), chain)
        if status is not None and status >= 400:
            return Navigation(status=status, error=None, printed=False, chain=tuple(chain))
        on_progress(60)
        browser.pump(js_delay_ms / 1000)  # let late scripts settle, inside the same deadline
        width, height = paper_in
        stream = browser.call("Page.printToPDF", {
            "paperWidth": width, "paperHeight": height, "landscape": landscape, "printBackground": True,
            "marginTop": margin_in, "marginBottom": margin_in, "marginLeft": margin_in, "marginRight": margin_in,
            "preferCSSPageSize": False, "displayHeaderFooter": False, "transferMode": "ReturnAsStream",
        }, session=session)["stream"]
        on_progress(80)
        _save_stream(browser, session, stream, dest_path, max_bytes)
        return Navigation(status=status, error=None, printed=True, chain=tuple(chain))
    finally:
        if browser is not None:
            browser.close()
        hole.close()


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


def _wait_for_load(browser: _Browser, session: str, frame_id: str | None, chain: list[str]) -> int | None:
    """Wait for the load event; return the main document's final HTTP status (None if unknown)."""
    status: int | None = None
    while True:
        event = browser.next_event()
        method, params = event.get("method"), event.get("params", {})
        if event.get("sessionId") not in (None, session):
            continue
        _note_request(event, frame_id, chain)
        if method == "Network.responseReceived" and params.get("type") == "Document" and (
                frame_id is None or params.get("frameId") == frame_id):
            status = int(params.get("response", {}).get("status") or 0) or None
        elif method == "Page.loadEventFired":
            return status


def _save_stream(browser: _Browser, session: str, stream: str, dest_path: str | os.PathLike[str],
                 max_bytes: int) -> None:
    written = 0
    with open(dest_path, "wb") as out:
        while True:
            chunk = browser.call("IO.read", {"handle": stream, "size": READ_CHUNK}, session=session)
            data = chunk.get("data", "")
            raw = base64.b64decode(data) if chunk.get("base64Encoded") else data.encode("latin-1")
            written += len(raw)
            if written > max_bytes:
                raise PdfTooLarge(f"the PDF is larger than the limit of {max_bytes} bytes")
            out.write(raw)
            if chunk.get("eof"):
                break
    browser.call("IO.close", {"handle": stream}, session=session)
