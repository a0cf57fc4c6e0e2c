"""Uploads: inputs for tasks, streamed to object storage with a size cap and a sha256."""
from __future__ import annotations

import hashlib
import logging
import re
import uuid
from typing import IO, Any

from flask import Blueprint, Response, request

from functions.gateway.guards import require_auth
from functions.gateway.web import principal, settings
from shared import db, storage
from shared.envelope import json_response
from shared.errors import NotFound, TooLarge, UnsupportedMediaType, ValidationError
from shared.tasks.repository import iso, parse_uuid

bp = Blueprint("uploads", __name__)
log = logging.getLogger("taskforge.gateway")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][\w.+-]{0,126}/[A-Za-z0-9][\w.+-]{0,126}$")
_CHUNK = 1024 * 1024  # bytes read from the client per step


class MeteredReader:
    """A read-only stream that counts, hashes and caps what passes through it.

    Raises ``TooLarge`` as soon as more than ``limit`` bytes were read, so an oversize
    body without a Content-Length is cut off mid-stream instead of filling the disk.
    """

    def __init__(self, source: IO[bytes], limit: int) -> None:
        self.source, self.limit = source, limit
        self.size = 0
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self.source.read(n if n and n > 0 else _CHUNK)
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(f"the upload exceeds {self.limit} bytes")
        self.digest.update(chunk)
        return chunk

    def readable(self) -> bool:
        return True


def _media_type(value: str | None) -> str:
    media = (value or "application/octet-stream").split(";", 1)[0].strip().lower()
    if not _MEDIA_TYPE.match(media):
        raise UnsupportedMediaType("invalid Content-Type for the upload")
    return media


def public_upload(row: Any) -> dict[str, Any]:
    return {"id": str(row["id"]), "size": int(row["size"]), "content_type": row["content_type"],
            "sha256": row["sha256"], "filename": row.get("filename"), "created_at": iso(row.get("created_at"))}


@bp.post("/uploads")
@require_auth
def create() -> Response:
    s = settings()
    user_id = principal().user_id
    filename: str | None = None
    if (request.mimetype or "") == "multipart/form-data":
        part = request.files.get("file")  # werkzeug spools parts to temporary files, bounded by the body cap
        if part is None:
            raise ValidationError("no file", details=[{"field": "file", "message": "is required"}])
        source: IO[bytes] = part.stream
        content_type = _media_type(part.mimetype)
        filename = (part.filename or "")[:255] or None
    else:
        source = request.stream
        content_type = _media_type(request.content_type)
    upload_id = uuid.uuid4()
    key = f"uploads/{user_id}/{upload_id}"
    reader = MeteredReader(source, s.max_upload_bytes)
    store = storage.get_storage(s)
    store.put_file(key, reader, content_type)  # type: ignore[arg-type]
    if reader.size == 0:
        store.delete(key)
        raise ValidationError("empty upload", details=[{"field": "body", "message": "must not be empty"}])
    try:
        with db.connection(s) as conn:
            row = conn.execute(
                "INSERT INTO uploads (id, user_id, storage_key, size, content_type, sha256, filename)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING *",
                (upload_id, user_id, key, reader.size, content_type, reader.digest.hexdigest(), filename),
            ).fetchone()
    except Exception:
        try:  # no row points at the object: do not leave it behind
            store.delete(key)
        except Exception:
            log.warning("could not delete orphaned upload object %s", key)
        raise
    return json_response(public_upload(row), 201, {"Location": f"/uploads/{upload_id}"})


@bp.get("/uploads/<upload_id>")
@require_auth
def get(upload_id: str) -> Response:
    ident = parse_uuid(upload_id)
    with db.connection(settings()) as conn:
        row = None if ident is None else conn.execute(
            "SELECT * FROM uploads WHERE id = %s AND user_id = %s", (ident, principal().user_id)).fetchone()
    if row is None:
        raise NotFound("upload not found")
    return json_response(public_upload(row))
