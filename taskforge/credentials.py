"""The CLI's credential cache: tokens per server, in the user's config directory.

``<config dir>/taskforge/credentials.json`` (``$XDG_CONFIG_HOME`` or ``~/.config``), a
JSON object ``{"servers": {"<gateway url>": {"access_token", "refresh_token", "email"}}}``.
The directory is created 0700 and the file written 0600, atomically (temporary file in
the same directory, then rename), so a crash never leaves half a file and other users
on the machine cannot read the tokens.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

KEEP = ("access_token", "refresh_token", "email", "api_key")


class CredentialStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_config_dir(cls, config_dir: str | None = None) -> CredentialStore:
        """The store under ``config_dir`` (default ``~/.config``)."""
        base = Path(config_dir) if config_dir else Path.home() / ".config"
        return cls(base / "taskforge" / "credentials.json")

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"servers": {}}
        if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
            return {"servers": {}}
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".credentials-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, url: str) -> dict[str, Any]:
        """What is cached for ``url`` (empty when nothing is)."""
        entry = self._load()["servers"].get(url.rstrip("/"))
        return dict(entry) if isinstance(entry, dict) else {}

    def update(self, url: str, values: dict[str, Any]) -> None:
        """Merge ``values`` (only the known keys) into the entry of ``url``."""
        data = self._load()
        entry = data["servers"].setdefault(url.rstrip("/"), {})
        entry.update({k: v for k, v in values.items() if k in KEEP})
        self._save(data)

    def forget(self, url: str) -> None:
        data = self._load()
        if data["servers"].pop(url.rstrip("/"), None) is not None:
            self._save(data)
