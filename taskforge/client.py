"""A small Python client for TaskForge: accounts, uploads, tasks, live events, results.

Standard library only (``urllib``): the client ships in the same package as the
functions, whose images should not grow for it, and everything it needs — JSON calls,
raw-body uploads streamed from disk, streamed downloads, line-by-line SSE — is covered.

    from taskforge.client import Client
    c = Client("http://127.0.0.1:8080", stream_url="http://127.0.0.1:8081")
    c.login("me@example.com", "secret-password")
    up = c.upload("photo.jpg")
    task = c.submit("resize-image", {"source": {"upload_id": up["id"]}, "width": 640})
    done = c.wait(task["id"], on_update=lambda t: print(t["status"], t["progress"]))
    path = c.download(task["id"], ".")

Failures raise :class:`ApiError` (``status`` is the HTTP status, 0 for network errors).
An expired access token is refreshed once, transparently, when a refresh token is known.
"""
from __future__ import annotations

import json
import mimetypes
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from events.catalog import TERMINAL
from events.sse import Parser

if TYPE_CHECKING:
    from taskforge.batch_client import BatchClient

USER_AGENT = "taskforge-client/0.1"


class ApiError(Exception):
    """An error answer (``status`` >= 400) or a network failure (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.retry_after = retry_after


@dataclass(frozen=True)
class Event:
    """One SSE message: ``event`` is ``task`` (``data`` the public task JSON) or ``reset``."""

    event: str
    data: Any
    id: str | None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Redirects are followed by hand: a signed storage URL must not receive our token.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _error_from(status: int, body: bytes, headers: Any) -> ApiError:
    try:
        err = json.loads(body or b"{}").get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    retry = headers.get("Retry-After") if headers is not None else None
    return ApiError(status, str(err.get("code") or f"http_{status}"),
                    str(err.get("message") or body[:200].decode("utf-8", "replace") or "error"),
                    err.get("details"), float(retry) if retry and retry.isdigit() else None)


class Client:
    """One user's session with a TaskForge deployment.

    ``on_tokens`` is called with the new ``{access_token, refresh_token, ...}`` after a
    login or refresh (the CLI persists them there). ``timeout_s`` bounds each request;
    event streams use ``read_timeout_s`` (longer than the server's 15 s heartbeat).
    """

    def __init__(self, url: str, *, stream_url: str | None = None, access_token: str | None = None,
                 refresh_token: str | None = None, api_key: str | None = None, timeout_s: float = 60.0,
                 read_timeout_s: float = 45.0, on_tokens: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.stream_url = (stream_url or url).rstrip("/")
        self.access_token, self.refresh_token, self.api_key = access_token, refresh_token, api_key
        self.timeout_s, self.read_timeout_s = timeout_s, read_timeout_s
        self.on_tokens = on_tokens

    # --- plumbing -------------------------------------------------------------------------
    def _auth_headers(self) -> dict[str, str]:
        if self.access_token:
            return {"Authorization": f"Bearer {self.access_token}"}
        if self.api_key:
            return {"Authorization": f"ApiKey {self.api_key}"}
        return {}

    def _open(self, method: str, url: str, *, body: bytes | IO[bytes] | None = None,
              headers: dict[str, str] | None = None, auth: bool = True, timeout_s: float | None = None) -> Any:
        """Send one request; returns the open response (2xx/3xx) or raises ApiError."""
        hdrs = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        if auth:
            hdrs.update(self._auth_headers())
        req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
        try:
            return _opener.open(req, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                return exc  # the redirect itself (see _NoRedirect)
            with exc:
                raise _error_from(exc.code, exc.read(), exc.headers) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(0, "unreachable", f"cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}") from None

    def _call(self, method: str, path: str, *, json_body: Any = None, body: bytes | IO[bytes] | None = None,
              headers: dict[str, str] | None = None, query: dict[str, Any] | None = None,
              auth: bool = True) -> Any:
        """A JSON call against the gateway, refreshing an expired token once."""
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        hdrs = dict(headers or {})
        if json_body is not None:
            body, hdrs["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        for attempt in (1, 2):
            try:
                with self._open(method, url, body=body, headers=hdrs, auth=auth) as resp:
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except ApiError as exc:
                rewindable = body is None or isinstance(body, bytes)
                if exc.status == 401 and auth and attempt == 1 and rewindable and self._try_refresh():
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _try_refresh(self) -> bool:
        if not self.refresh_token:
            return False
        try:
            self.refresh()
        except ApiError:
            return False
        return True

    def _tokens(self, pair: dict[str, Any]) -> dict[str, Any]:
        self.access_token, self.refresh_token = pair["access_token"], pair.get("refresh_token")
        if self.on_tokens:
            self.on_tokens(pair)
        return pair

    # --- accounts -------------------------------------------------------------------------
    @property
    def batches(self) -> BatchClient:
        """The batch routes (``taskforge.batch_client.BatchClient``)."""
        from taskforge.batch_client import BatchClient

        return BatchClient(self)

    def signup(self, email: str, password: str) -> dict[str, Any]:
        return self._call("POST", "/auth/signup", json_body={"email": email, "password": password}, auth=False)

    def login(self, email: str, password: str) -> dict[str, Any]:
        return self._tokens(self._call("POST", "/auth/login", json_body={"email": email, "password": password},
                                       auth=False))

    def refresh(self) -> dict[str, Any]:
        if not self.refresh_token:
            raise ApiError(401, "not_logged_in", "no refresh token: log in again")
        return self._tokens(self._call("POST", "/auth/refresh", json_body={"refresh_token": self.refresh_token},
                                       auth=False))

    def logout(self) -> None:
        self._call("POST", "/auth/logout", json_body={"refresh_token": self.refresh_token}
                   if self.refresh_token else {})
        self.access_token = self.refresh_token = None

    def me(self) -> dict[str, Any]:
        return self._call("GET", "/me")

    # --- uploads and tasks ----------------------------------------------------------------
    def upload(self, source: str | os.PathLike[str] | bytes, content_type: str | None = None) -> dict[str, Any]:
        """Upload a file (streamed from disk) or bytes; returns ``{id, size, content_type}``."""
        if isinstance(source, bytes):
            return self._call("POST", "/uploads", body=source,
                              headers={"Content-Type": content_type or "application/octet-stream"})
        path = Path(source)
        ctype = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        size = path.stat().st_size
        for attempt in (1, 2):
            with path.open("rb") as fh:
                try:
                    with self._open("POST", self.url + "/uploads", body=fh, headers={
                            "Content-Type": ctype, "Content-Length": str(size)}) as resp:
                        return json.loads(resp.read())
                except ApiError as exc:
                    if exc.status == 401 and attempt == 1 and self._try_refresh():
                        continue
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(self, task_type: str, payload: dict[str, Any], *, idempotency_key: str | None = None,
               callback_url: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body: dict[str, Any] = {"type": task_type, "payload": payload}
        if callback_url:
            body["callback_url"] = callback_url
        return self._call("POST", "/tasks", json_body=body, headers=headers)

    # --- completion webhooks ----------------------------------------------------------------
    def add_webhook(self, url: str, events: list[str]) -> dict[str, Any]:
        """Register an endpoint; the answer's ``secret`` is shown only this once."""
        return self._call("POST", "/webhooks", json_body={"url": url, "events": events})

    def webhooks(self) -> dict[str, Any]:
        return self._call("GET", "/webhooks")

    def remove_webhook(self, endpoint_id: str) -> None:
        self._call("DELETE", f"/webhooks/{urllib.parse.quote(endpoint_id, safe='')}")

    def rotate_webhook(self, endpoint_id: str) -> dict[str, Any]:
        return self._call("POST", f"/webhooks/{urllib.parse.quote(endpoint_id, safe='')}/rotate")

    def callback_secret(self) -> dict[str, Any]:
        """Create or rotate the secret that signs one-off ``callback_url`` deliveries."""
        return self._call("POST", "/webhooks/callback-secret")

    def webhook_deliveries(self, endpoint_id: str, *, limit: int = 20, status: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"/webhooks/{urllib.parse.quote(endpoint_id, safe='')}/deliveries",
                          query={"limit": limit, "status": status})

    def redeliver_webhook(self, endpoint_id: str, delivery_id: str) -> dict[str, Any]:
        return self._call("POST", f"/webhooks/{urllib.parse.quote(endpoint_id, safe='')}/deliveries/"
                                  f"{urllib.parse.quote(delivery_id, safe='')}/redeliver")

    def get(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/tasks/{urllib.parse.quote(task_id, safe='')}")

    def list(self, *, status: str | None = None, task_type: str | None = None, limit: int = 20,
             cursor: str | None = None) -> dict[str, Any]:
        return self._call("GET", "/tasks", query={"status": status, "type": task_type, "limit": limit,
                                                  "cursor": cursor})

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", f"/tasks/{urllib.parse.quote(task_id, safe='')}/cancel")

    def dead_letters(self, *, limit: int = 20, cursor: str | None = None, task_id: str | None = None) -> dict[str, Any]:
        return self._call("GET", "/admin/dead-letters", query={"limit": limit, "cursor": cursor, "task_id": task_id})

    def replay_dead_letter(self, dead_letter_id: str) -> dict[str, Any]:
        return self._call("POST", f"/admin/dead-letters/{urllib.parse.quote(dead_letter_id, safe='')}/replay")

    def download(self, task_id: str, dest: str | os.PathLike[str] = ".") -> Path:
        """Save the task's result; ``dest`` is a directory (the result's own name is used)
        or a file path. Written to a temporary file first, so a failed download leaves no
        partial file behind. Returns the path written."""
        path = f"/tasks/{urllib.parse.quote(task_id, safe='')}/result"
        try:
            resp = self._open("GET", self.url + path, headers={"Accept": "*/*"})
        except ApiError as exc:
            if exc.status != 401 or not self._try_refresh():
                raise
            resp = self._open("GET", self.url + path, headers={"Accept": "*/*"})
        if resp.status in (301, 302, 303, 307, 308):  # a signed URL: fetched without our token
            location = urllib.parse.urljoin(self.url + path, resp.headers["Location"])
            resp.close()
            resp = self._open("GET", location, headers={"Accept": "*/*"}, auth=False)
        with resp:
            # Named by task, keeping the server's extension: two downloads never collide.
            served = _filename(resp.headers.get("Content-Disposition"))
            name = f"{task_id}{Path(served).suffix if served else '.out'}"
            target = Path(dest)
            if str(dest).endswith(("/", os.sep)):  # "out/" is a directory, made if missing
                target.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                target = target / name
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".taskforge-")
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := resp.read(1024 * 1024):
                        out.write(chunk)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return target

    # --- live events ----------------------------------------------------------------------
    def events(self, task_id: str | None = None, *, last_event_id: str | None = None,
               reconnect: bool = True, max_failures: int = 8, deadline: float | None = None) -> Iterator[Event]:
        """Follow the status stream: one task's (ends after its terminal state) or all of
        the user's (endless). Reconnects after drops with ``Last-Event-ID``, so no state
        change is missed; ``reset`` events say the position was too old and the current
        state follows. Raises ApiError after ``max_failures`` consecutive failed connects,
        ``TimeoutError`` once ``time.monotonic()`` passes ``deadline`` (checked at least at
        every heartbeat)."""
        path = f"/tasks/{urllib.parse.quote(task_id, safe='')}/events" if task_id else "/events"
        delay_s, failures, refreshed = 1.0, 0, False
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            read_timeout = self.read_timeout_s
            if deadline is not None:  # wake up for the deadline even on a quiet stream
                read_timeout = max(0.2, min(read_timeout, deadline - time.monotonic()))
            try:
                resp = self._open("GET", self.stream_url + path, headers=headers, timeout_s=read_timeout)
            except ApiError as exc:
                if exc.status == 401 and not refreshed and self._try_refresh():
                    refreshed = True
                    continue
                failures += 1
                if not reconnect or exc.status in (401, 403, 404) or failures >= max_failures:
                    raise
                time.sleep(exc.retry_after or delay_s)
                delay_s = min(delay_s * 2, 30.0)
                continue
            if resp.status == 204:
                resp.close()
                return  # the server says there is nothing more for this stream
            failures, refreshed = 0, False
            parser = Parser(last_id=last_event_id)
            finished = expired = False
            try:
                with resp:
                    while raw := resp.readline():
                        if deadline is not None and time.monotonic() > deadline:
                            expired = True
                            break
                        msg = parser.feed(raw.decode("utf-8", "replace").rstrip("\r\n"))
                        if msg is None:
                            continue
                        last_event_id = msg.id
                        try:
                            data = json.loads(msg.data)
                        except ValueError:
                            data = msg.data
                        yield Event(msg.event, data, msg.id)
                        if task_id and msg.event == "task" and isinstance(data, dict) \
                                and data.get("status") in TERMINAL:
                            finished = True
                            return
            except (OSError, ValueError):
                pass  # dropped or timed out mid-stream: resume below
            if expired or (deadline is not None and time.monotonic() > deadline):
                raise TimeoutError("no terminal state before the deadline")
            if finished or not reconnect:
                return
            delay_s = (parser.retry_ms or 1000) / 1000
            time.sleep(delay_s)

    def wait(self, task_id: str, *, timeout_s: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """Block until the task is terminal and return it. Follows the status stream and
        falls back to polling ``GET /tasks/{id}`` if the stream cannot be reached.
        Raises ``TimeoutError`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        task = self.get(task_id)
        if on_update:
            on_update(task)
        if task["status"] in TERMINAL:
            return task
        try:
            for ev in self.events(task_id, max_failures=3, deadline=deadline):
                if ev.event == "task" and isinstance(ev.data, dict):
                    # Stream messages are summaries (no payload): keep the rest of the task.
                    task = {**task, **ev.data}
                    if on_update:
                        on_update(task)
                    if task["status"] in TERMINAL:
                        return task
        except TimeoutError:
            raise TimeoutError(f"task {task_id} still {task['status']} after {timeout_s}s") from None
        except ApiError as exc:
            if exc.status in (401, 403, 404):
                raise
        while True:  # the stream is unavailable (or ended early): poll the gateway
            task = self.get(task_id)
            if on_update:
                on_update(task)
            if task["status"] in TERMINAL:
                return task
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {task['status']} after {timeout_s}s")
            time.sleep(poll_s)


def _filename(disposition: str | None) -> str | None:
    """A safe file name from Content-Disposition (no directories, no dot files)."""
    if not disposition:
        return None
    m = re.search(r"filename\*=UTF-8''([^;]+)", disposition, re.I) or re.search(
        r'filename="?([^";]+)"?', disposition, re.I)
    if not m:
        return None
    name = os.path.basename(urllib.parse.unquote(m.group(1)).replace("\\", "/")).strip()
    return name if name and not name.startswith(".") else None
