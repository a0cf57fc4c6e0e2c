"""Task inputs: a ``source`` object (``{"upload_id"}`` or ``{"url"}``) fetched into a file.

- ``upload_id``: only the task owner's own uploads (``uploads.user_id`` must match); a
  missing or foreign upload is a permanent ``upload_not_found`` (the same answer for
  both, so ids of other users' uploads cannot be probed). The worker's claim reads the
  upload's row in the same statement, so no lookup is needed here; a local store's object
  is read in place, others are copied through the ``storage`` circuit breaker.
- ``url``: ``shared.fetch.fetch_to_file`` with the SSRF guard and caps from settings,
  through the per-host ``fetch`` breaker (only dependency failures count; refused or
  bad URLs are permanent and never trip it).

Failure modes: ``PermanentError`` subclasses for bad input, ``RetryableError`` subclasses
(``StorageError``, ``FetchFailed``, ``FetchTimeout``, ``CircuitOpen``) for dependencies,
``Cancelled`` when ``should_cancel()`` turned true during a download.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast
from urllib.parse import urlsplit

from shared import breakers, db, urlguard
from shared.errors import NotFound, PermanentError
from shared.settings import Settings
from shared.tasks.state import Upload

_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")


class UploadNotFound(PermanentError):
    code = "upload_not_found"


@dataclass(frozen=True)
class Input:
    """A fetched input file. ``content_type`` is what the uploader or server declared
    (cores must sniff the bytes, never trust it); ``name`` is a display name."""

    path: Path
    content_type: str
    size: int
    name: str


def _suffix(name: str) -> str:
    """A short lower-case extension of ``name`` (``.jpg``), or "" if it looks odd."""
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if _SUFFIX.match(suffix) else ""


def _lookup_upload(settings: Settings, user_id: str, upload_id: str) -> Upload | None:
    try:
        with db.connection(settings) as conn:
            row = cast(dict[str, Any] | None, conn.execute(
                "SELECT storage_key, content_type, size, filename FROM uploads WHERE id = %s AND user_id = %s",
                (upload_id, user_id),
            ).fetchone())
    except Exception as exc:  # psycopg's DataError for a malformed id: the input is bad, not the DB
        if exc.__class__.__name__ in {"InvalidTextRepresentation", "DataError"}:
            raise UploadNotFound("the upload does not exist") from exc
        raise
    if row is None:
        return None
    return Upload(upload_id, row["storage_key"], row["content_type"], int(row["size"]), row["filename"])


def fetch_upload(settings: Settings, storage: Any, user_id: str, upload_id: str, dest_dir: Path, *,
                 known: Upload | None = None) -> Input:
    """The user's upload ``upload_id`` as a local file. ``known`` is its row when the claim
    already read it (no lookup then). A store that keeps objects as local files
    (``local_path``) hands over the object itself, read-only and never copied: objects are
    replaced by rename, never rewritten in place. Otherwise it is copied into ``dest_dir``."""
    row = known if known is not None and known.id == upload_id else _lookup_upload(settings, user_id, upload_id)
    if row is None:
        raise UploadNotFound("the upload does not exist")
    name = row.filename or upload_id
    try:
        local = storage.local_path(row.storage_key) if hasattr(storage, "local_path") else None
        if local is not None:
            return Input(path=local, content_type=row.content_type, size=local.stat().st_size, name=name)
        path = dest_dir / ("input" + _suffix(name))
        storage.download_to(row.storage_key, path)
    except (NotFound, FileNotFoundError) as exc:
        raise UploadNotFound("the upload's content is gone") from exc
    return Input(path=path, content_type=row.content_type, size=path.stat().st_size, name=name)


def fetch_url(settings: Settings, url: str, dest_dir: Path, *,
              resolver: Callable[[str, int], Sequence[str]] | None = None,
              on_progress: Callable[[int], None] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> Input:
    """Download ``url`` into ``dest_dir`` behind the SSRF guard (``urlguard.BadUrl`` if unparsable)."""
    from shared import fetch  # urllib3: loaded by the first task that fetches, not at start

    _scheme, host, _port, _target = urlguard.split_url(url)
    path = dest_dir / ("input" + _suffix(urlsplit(url).path))
    kwargs: dict[str, Any] = {"policy": fetch.FetchPolicy.from_settings(settings),
                              "on_progress": on_progress, "should_cancel": should_cancel}
    if resolver is not None:
        kwargs["resolver"] = resolver
    result = breakers.call(breakers.fetch_breaker(host), fetch.fetch_to_file, url, path, **kwargs)
    name = PurePosixPath(urlsplit(result.final_url).path).name or result.host
    return Input(path=path, content_type=result.content_type, size=result.size, name=name)


def fetch_source(settings: Settings, storage: Any, user_id: str, source: Any, dest_dir: Path, *,
                 resolver: Callable[[str, int], Sequence[str]] | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 upload: Upload | None = None) -> Input:
    """Fetch a payload's ``source`` object. ``PermanentError`` if it is neither form.
    ``upload``: the row of the task's upload when the claim already read it."""
    if isinstance(source, dict) and isinstance(source.get("upload_id"), str) and len(source) == 1:
        return fetch_upload(settings, storage, user_id, source["upload_id"], dest_dir, known=upload)
    if isinstance(source, dict) and isinstance(source.get("url"), str) and len(source) == 1:
        return fetch_url(settings, source["url"], dest_dir, resolver=resolver,
                         on_progress=on_progress, should_cancel=should_cancel)
    raise PermanentError("source must be {\"upload_id\": ...} or {\"url\": ...}", code="bad_source")
