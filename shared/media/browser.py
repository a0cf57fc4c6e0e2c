"""A warm headless Chromium per worker process, driven over the DevTools protocol on a pipe.

Starting Chromium costs more than most renders, so a worker keeps one browser running
and gives every render its own *browser context* (Chromium's incognito profile: no
cookies, storage, cache or service workers shared with any other render), with that
render's SSRF-guarded egress proxy as the context's proxy. The browser-wide proxy is a
bound, never-listening loopback port held for the browser's life, so Chromium's own
background traffic goes nowhere.

The pipe (``--remote-debugging-pipe``: JSON messages, NUL-terminated, commands on fd 3 and
replies on fd 4) needs no port and no WebSocket library. One reader thread per browser
hands replies to their callers by id and events to their render by session, so the
renders of a worker's threads share the browser. ``alert()``/``confirm()`` dialogs are
dismissed as they open (they would block the page until the deadline).

Lifecycle (:class:`Keeper`, one per process, :data:`KEEPER`):

- a browser starts on the first render and serves ``max_renders`` renders, then a fresh
  one takes over (the old one exits when its last render ends);
- a browser that died (crash, OOM kill) is replaced by the next render; the renders it
  was serving fail with ``RetryableError``;
- a render that ended in error (timeout, cancel, a crash) disposes of its context, which
  kills its renderer processes; if the browser does not confirm that within
  ``DISPOSE_WAIT_S`` the whole browser is killed;
- ``shutdown()`` (at exit, and on a SIGTERM that would end the process at once: see
  :func:`install_sigterm`) kills every browser; Chromium also exits by itself when its pipe closes, so a worker that dies
  without cleaning up takes its browser along.

Chromium runs with its own sandbox (never ``--no-sandbox`` unless configured off): as the
unprivileged ``user`` when the worker is root (:func:`launch`).
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from shared.errors import Cancelled, PermanentError, RetryableError
from shared.media import CancelFn, child_env

REPORT_EVERY_S = 0.5  # cancel polling while waiting on the browser
STDERR_TAIL = 1000
DISPOSE_WAIT_S = 5.0  # how long a context's disposal may take before the browser is killed instead
GROUP_EXIT_WAIT_S = 5.0
MAX_RENDERS = 100  # renders per browser before a fresh one takes over (``chromium_renders_per_browser``)


class EngineTimeout(PermanentError):
    code = "timeout"


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

    ``proxy_url`` is the *browser-wide* proxy: :class:`Browser` points it at a dead
    loopback port so Chromium's own background traffic (updates, sign-in; Debian's wrapper
    even adds remote extensions) goes nowhere; each render's browser context gets the
    guarded proxy (:meth:`Page.open`). ``sandbox=False`` adds ``--no-sandbox`` (see :func:`launch`).
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


class _Reply:
    __slots__ = ("done", "msg")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.msg: dict[str, Any] | None = None


_DEAD: dict[str, Any] = {"method": "<browser exited>"}


class Browser:
    """One Chromium process and its protocol pipe, shared by concurrent renders. Thread-safe."""

    def __init__(self, exe: str, *, sandbox: bool = True, user: str = "nobody") -> None:
        self.renders = 0  # renders started on this browser (the Keeper's count)
        self.active = 0  # renders in progress
        self.retired = False
        self.exit_reason: str | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Reply] = {}
        self._sessions: dict[str, queue.SimpleQueue[dict[str, Any]]] = {}
        self._closed = False
        # Bound, never listening: connections to it are refused, and no one else can take
        # the port while we hold it. The browser-wide proxy; contexts get the real one.
        self._hole = socket.socket()
        self._hole.bind(("127.0.0.1", 0))
        self.profile = tempfile.mkdtemp(prefix="tf-chromium-")
        self.stderr = tempfile.TemporaryFile()
        self.pid = 0
        try:
            argv, owner = launch(chromium_args(exe, f"http://127.0.0.1:{self._hole.getsockname()[1]}", self.profile,
                                               sandbox), sandbox=sandbox, euid=os.geteuid(), user=user,
                                 setpriv=shutil.which("setpriv"))
            if owner is not None:
                os.chown(self.profile, *owner)
            self._spawn(exe, argv)
        except BaseException:
            self.close()
            raise
        self._reader = threading.Thread(target=self._read_loop, name=f"chromium-pipe-{self.pid}", daemon=True)
        self._reader.start()

    def _spawn(self, exe: str, argv: list[str]) -> None:
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
            raise RetryableError(f"chromium is not installed at {exe}") from None
        finally:
            for fd in (cmd_r, out_w, devnull):
                os.close(fd)
        for fd in (self._cmd_w, self._out_r):
            os.set_inheritable(fd, False)

    @property
    def alive(self) -> bool:
        return self.exit_reason is None and not self._closed

    def stderr_tail(self) -> str:
        try:
            data = os.pread(self.stderr.fileno(), 1 << 16, max(0, os.fstat(self.stderr.fileno()).st_size - (1 << 16)))
        except (OSError, ValueError):
            return ""
        return data.decode("utf-8", "replace").strip()[-STDERR_TAIL:]

    # --- the pipe ---------------------------------------------------------------------
    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    self._dispatch(json.loads(raw))
        except (OSError, ValueError):
            pass
        finally:
            self._fail("chromium exited: " + self.stderr_tail())
            os.close(self._out_r)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            with self._lock:
                reply = self._pending.pop(msg["id"], None)
            if reply is not None:
                reply.msg = msg
                reply.done.set()
            return
        session = msg.get("sessionId")
        if msg.get("method") == "Page.javascriptDialogOpening" and session:
            try:
                self.send("Page.handleJavaScriptDialog", {"accept": False}, session, reply=None)
            except RetryableError:
                pass  # the browser is going away; its renders learn that from the pipe
        with self._lock:
            events = self._sessions.get(session) if session else None
        if events is not None:
            events.put(msg)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.exit_reason is None:
                self.exit_reason = reason
            pending, self._pending = self._pending, {}
            sessions = list(self._sessions.values())
        for reply in pending.values():
            reply.done.set()  # msg stays None: the caller reads exit_reason
        for events in sessions:
            events.put(_DEAD)

    def send(self, method: str, params: dict[str, Any] | None, session: str | None, reply: _Reply | None) -> int:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        with self._lock:
            if self.exit_reason is not None:
                raise RetryableError(self.exit_reason)
            if reply is not None:
                self._pending[msg_id] = reply
        try:
            with self._write_lock:
                os.write(self._cmd_w, data)  # messages are small: one write each
        except OSError:
            with self._lock:
                self._pending.pop(msg_id, None)
            raise RetryableError("chromium exited: " + self.stderr_tail()) from None
        return msg_id

    def request(self, method: str, params: dict[str, Any] | None, session: str | None,
                wait: Callable[[threading.Event], None]) -> dict[str, Any]:
        """Send a command and wait for its answer with ``wait`` (which enforces deadline and cancel)."""
        reply = _Reply()
        msg_id = self.send(method, params, session, reply)
        try:
            wait(reply.done)
        finally:
            with self._lock:
                self._pending.pop(msg_id, None)
        if reply.msg is None:
            raise RetryableError(self.exit_reason or "chromium exited")
        if "error" in reply.msg:
            raise RetryableError(f"chromium refused {method}: {reply.msg['error'].get('message')}")
        return dict(reply.msg.get("result", {}))

    def subscribe(self, session: str) -> queue.SimpleQueue[dict[str, Any]]:
        events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        with self._lock:
            self._sessions[session] = events
            if self.exit_reason is not None:
                events.put(_DEAD)
        return events

    def unsubscribe(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    # --- the end ----------------------------------------------------------------------
    def close(self) -> None:
        """Kill the browser's whole process group and remove its profile. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.pid:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill_strays(self.profile)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            # SIGKILL is delivered at once but the leader's children (renderers, zygote,
            # GPU helpers) finish dying asynchronously: wait, so nothing of it outlives close().
            _wait_group_gone(self.pid, GROUP_EXIT_WAIT_S)
            try:
                os.close(self._cmd_w)
            except OSError:
                pass
            reader = getattr(self, "_reader", None)
            if reader is not None and reader is not threading.current_thread():
                reader.join(GROUP_EXIT_WAIT_S)
        self._fail("chromium was stopped")
        self.stderr.close()
        self._hole.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One render's view of a browser: its context and session, its deadline and cancel check."""

    def __init__(self, browser: Browser, deadline: float, timeout_s: float, should_cancel: CancelFn) -> None:
        self.browser, self.deadline, self.timeout_s, self.should_cancel = browser, deadline, timeout_s, should_cancel
        self.context: str | None = None
        self.session: str | None = None
        self._events: queue.SimpleQueue[dict[str, Any]] | None = None
        self._last_poll = 0.0
        self.pending: list[dict[str, Any]] = []  # events read while waiting for something else

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

    def _wait(self, done: threading.Event) -> None:
        while not done.is_set():
            done.wait(min(0.25, self._tick()))

    def open(self, proxy_url: str) -> None:
        """A fresh context browsing through ``proxy_url``, one blank tab in it, and a session on that tab."""
        self.context = self.call_browser("Target.createBrowserContext", {
            "proxyServer": proxy_url, "proxyBypassList": "<-loopback>", "disposeOnDetach": True})["browserContextId"]
        self.call_browser("Browser.setDownloadBehavior", {"behavior": "deny", "browserContextId": self.context})
        target = self.call_browser("Target.createTarget", {"url": "about:blank",
                                                           "browserContextId": self.context})["targetId"]
        self.session = self.call_browser("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._events = self.browser.subscribe(self.session)

    def call_browser(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.request(method, params, None, self._wait)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A command to this render's tab."""
        return self.browser.request(method, params, self.session, self._wait)

    def next_event(self) -> dict[str, Any]:
        """The tab's next event (kept ones first), waiting within the deadline."""
        if self.pending:
            return self.pending.pop(0)
        msg = self._receive(None)
        assert msg is not None  # without ``until`` only the deadline ends the wait, by raising
        return msg

    def _receive(self, until: float | None) -> dict[str, Any] | None:
        """The next event off the pipe; None if ``until`` (monotonic) passes first."""
        assert self._events is not None
        while True:
            left = self._tick()
            if until is not None:
                left = min(left, until - time.monotonic())
                if left <= 0:
                    return None
            try:
                msg = self._events.get(timeout=min(0.25, left))
            except queue.Empty:
                continue
            if msg is _DEAD:
                self._events.put(_DEAD)
                raise RetryableError(self.browser.exit_reason or "chromium exited")
            return msg

    def pump(self, seconds: float) -> None:
        """Let the page run for ``seconds`` (within the deadline), keeping the events that arrive."""
        until = min(time.monotonic() + seconds, self.deadline)
        while (msg := self._receive(until)) is not None:
            self.pending.append(msg)

    def drain(self) -> None:
        """Keep the events that have arrived so far, without waiting."""
        assert self._events is not None
        while True:
            try:
                msg = self._events.get_nowait()
            except queue.Empty:
                return
            if msg is _DEAD:
                self._events.put(_DEAD)
                return
            self.pending.append(msg)

    def dispose(self) -> bool:
        """Close the context (and with it the tab and its renderers); False if the browser did not confirm."""
        if self.session:
            self.browser.unsubscribe(self.session)
        if self.context is None:
            return self.browser.alive
        end = time.monotonic() + DISPOSE_WAIT_S

        def wait(done: threading.Event) -> None:
            done.wait(max(0.0, end - time.monotonic()))
            if not done.is_set():
                raise EngineTimeout("chromium did not close the render's context")

        try:
            self.browser.request("Target.disposeBrowserContext", {"browserContextId": self.context}, None, wait)
        except (RetryableError, EngineTimeout):
            return False
        return True


class Keeper:
    """The warm browsers of this process, one per (executable, sandbox, user). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[tuple[str, bool, str], Browser] = {}
        self._all: set[Browser] = set()

    def acquire(self, exe: str, *, sandbox: bool, user: str, max_renders: int) -> Browser:
        """The running browser for these settings (started or replaced as needed), counted as in use."""
        key = (exe, sandbox, user)
        stale: Browser | None = None
        try:
            with self._lock:
                browser = self._current.get(key)
                if browser is None or not browser.alive or browser.renders >= max(1, max_renders):
                    if browser is not None:
                        browser.retired = True
                        del self._current[key]
                        if browser.active == 0 or not browser.alive:
                            stale = browser
                            self._all.discard(browser)
                    # Started under the lock: a concurrent render waits for this browser
                    # instead of starting a second one.
                    browser = Browser(exe, sandbox=sandbox, user=user)
                    self._current[key] = browser
                    self._all.add(browser)
                browser.renders += 1
                browser.active += 1
        finally:
            if stale is not None:
                stale.close()
        return browser

    def release(self, browser: Browser, *, healthy: bool) -> None:
        """A render is done with ``browser``; an unhealthy one is killed (its other renders fail retryably)."""
        with self._lock:
            browser.active -= 1
            done = not healthy or not browser.alive or (browser.retired and browser.active == 0)
            if done:
                browser.retired = True
                self._all.discard(browser)
                for key, current in list(self._current.items()):
                    if current is browser:
                        del self._current[key]
        if done:
            browser.close()

    def pids(self) -> list[int]:
        """Process ids of the browsers running now (for tests and diagnostics)."""
        with self._lock:
            return [b.pid for b in self._current.values() if b.alive]

    def shutdown(self) -> None:
        """Kill every browser of this process."""
        with self._lock:
            browsers = list(self._all)
            self._all.clear()
            self._current.clear()
        for browser in browsers:
            browser.close()


KEEPER = Keeper()
atexit.register(KEEPER.shutdown)


def install_sigterm() -> None:
    """Stop the warm browsers when SIGTERM ends this process.

    A server that handles SIGTERM itself (gunicorn finishes the requests in flight, then
    exits) keeps its handler: the browsers stop at exit (``atexit``), after the last render.
    Where SIGTERM would kill the process at once, they are stopped first. Call it from the
    main thread; elsewhere it does nothing (Chromium still exits when its pipe closes).
    """
    previous = signal.getsignal(signal.SIGTERM)
    if callable(previous) or previous == signal.SIG_IGN:
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        KEEPER.shutdown()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass


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
