"""Object storage for inputs (uploads) and outputs (results).

Two implementations behind one small interface: a local directory (the default, for
``make dev``) and S3 through boto3 (any S3-compatible service; tests use moto). Keys are
plain ``/``-separated strings such as ``uploads/<user>/<id>`` or ``results/<user>/<task>/out.jpg``;
writes are atomic (a reader never sees half an object) so a retried worker that writes the
same deterministic key again simply replaces it.
"""
from __future__ import annotations

import errno
import hmac
import itertools
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote

from shared.errors import NotFound, RetryableError, ValidationError
from shared.settings import Settings


class StorageError(RetryableError):
    code = "storage_unavailable"


class Storage(Protocol):
    def put_file(self, key: str, fileobj: BinaryIO, content_type: str) -> int:
        """Store the whole stream under ``key``; returns the byte count."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int: ...

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object; ``NotFound`` if absent."""

    def download_to(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str | None:
        """A short-lived URL to GET the object, or None when the gateway must stream it."""


def check_key(key: str) -> str:
    """Refuse keys that could escape their prefix (``..``, absolute, empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValidationError(f"invalid storage key {key!r}")
    return key


_temporaries = itertools.count()


def _create_temporary(directory: Path) -> tuple[int, str]:
    """A new ``.tmp-*`` file in ``directory``, open for writing, and its path. Its name is
    unique in this process by construction (pid and a counter), so the usual case needs no
    random name; one that exists already (left by a dead process of the same pid) falls
    back to ``tempfile.mkstemp``."""
    name = os.path.join(directory, f".tmp-{os.getpid()}-{next(_temporaries)}")
    try:
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), name
    except FileExistsError:
        return tempfile.mkstemp(dir=directory, prefix=".tmp-")


class LocalStorage:
    """Objects as files under ``root``.

    The content type is not stored beside the object: every reader already has it from
    PostgreSQL (an upload's row, a task's ``result``). Objects written before this kept it
    in a ``<object>.ct`` sidecar, which ``content_type`` still reads and ``delete`` removes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str) -> int:
        """Write to a ``.tmp-*`` file beside the target, then rename. On any failure — the
        stream raising (too large, truncated, client gone), a full disk — the temporary
        file is removed before the error propagates (``OSError`` as ``StorageError``).
        ``content_type`` is not kept (see the class)."""
        path = self._path(key)
        tmp = ""
        try:
            try:
                fd, tmp = _create_temporary(path.parent)
            except FileNotFoundError:  # the first object under this prefix
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = _create_temporary(path.parent)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(fileobj, out, 1024 * 1024)
                size = out.tell()
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"local storage write failed: {exc.strerror}") from exc
            raise
        return size

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        import io

        return self.put_file(key, io.BytesIO(data), content_type)

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} not found") from exc

    def content_type(self, key: str) -> str:
        """The type an older write kept in a sidecar, else ``application/octet-stream``
        (callers take the type from PostgreSQL first)."""
        try:
            return (self._path(key).parent / (self._path(key).name + ".ct")).read_text()
        except FileNotFoundError:
            return "application/octet-stream"

    def local_path(self, key: str) -> Path:
        """The object's own file, to be read in place (never written: a new write of the
        key replaces the file by rename, so an open reader keeps the old content).
        ``NotFound`` if absent; ``IsADirectoryError`` if something else sits there."""
        path = self._path(key)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} not found") from exc
        if not stat.S_ISREG(mode):
            raise IsADirectoryError(errno.EISDIR, "the object is not a regular file", key)
        return path

    def download_to(self, key: str, path: Path) -> None:
        with self.open(key) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        for p in (self._path(key), Path(str(self._path(key)) + ".ct")):
            p.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.endswith(".ct") and not p.name.startswith(".tmp-"):
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str | None:
        return None  # the gateway streams local objects itself


class _CountingReader:
    """A read-only, non-seekable view of a stream that counts the bytes read through it."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.source.read(n)
        self.count += len(chunk)
        return chunk

    def readable(self) -> bool:
        return True

    def close(self) -> None:  # the caller owns the underlying stream
        pass


class S3Storage:
    """Objects in an S3 bucket (boto3). Network errors become ``StorageError`` (retryable)."""

    def __init__(self, bucket: str, *, endpoint_url: str = "", region: str = "us-east-1",
                 client: Any = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise NotFound("object not found") from exc
            raise StorageError(f"s3 error {code}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"s3 unavailable: {exc.__class__.__name__}") from exc

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str) -> int:
        check_key(key)
        # boto3 closes the stream it is given and may not read a non-seekable one to the
        # end in order; a counting wrapper keeps the caller's stream open and gives the size.
        counter = _CountingReader(fileobj)
        self._call(self.client.upload_fileobj, counter, self.bucket, key, ExtraArgs={"ContentType": content_type})
        return counter.count

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        check_key(key)
        self._call(self.client.put_object, Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        return len(data)

    def size(self, key: str) -> int:
        return int(self._call(self.client.head_object, Bucket=self.bucket, Key=check_key(key))["ContentLength"])

    def open(self, key: str) -> BinaryIO:
        return self._call(self.client.get_object, Bucket=self.bucket, Key=check_key(key))["Body"]

    def content_type(self, key: str) -> str:
        return str(self._call(self.client.head_object, Bucket=self.bucket, Key=check_key(key)).get("ContentType"))

    def download_to(self, key: str, path: Path) -> None:
        self._call(self.client.download_file, self.bucket, check_key(key), str(path))

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=check_key(key))
            return True
        except NotFound:
            return False

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=check_key(key))

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": check_key(key)}
        if filename:
            params["ResponseContentDisposition"] = f"attachment; filename*=UTF-8''{quote(filename)}"
        return str(self._call(self.client.generate_presigned_url, "get_object", Params=params, ExpiresIn=ttl_s))


_instances: dict[tuple, Storage] = {}


def get_storage(settings: Settings) -> Storage:
    """The process's storage for these settings (one client per configuration)."""
    ident = (settings.storage_backend, settings.storage_dir, settings.s3_bucket, settings.s3_endpoint_url)
    store = _instances.get(ident)
    if store is None:
        if settings.storage_backend == "s3":
            store = S3Storage(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        else:
            store = LocalStorage(settings.storage_dir)
        _instances[ident] = store
    return store


def sign_local(secret: str, key: str, expires: int) -> str:
    """HMAC for a gateway-served download link of a local object (``/files/<key>?exp=&sig=``)."""
    return hmac.new(secret.encode(), f"{key}\n{expires}".encode(), sha256).hexdigest()


def verify_local(secret: str, key: str, expires: int, sig: str, now: float | None = None) -> bool:
    if (now or time.time()) > expires:
        return False
    return hmac.compare_digest(sign_local(secret, key, expires), sig)
