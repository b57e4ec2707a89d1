"""Secrets for the embedded default, generated once and kept out of the repository.

Production reads every secret from the environment. A laptop running ``make run`` has none, so the
hub makes what it needs, stores it in ``var/dev-secrets.json`` (git-ignored) and says so once on
stderr. The same file keeps encrypted columns readable across restarts of the development hub.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

_announced: set[str] = set()


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _token() -> str:
    return secrets.token_urlsafe(50)


GENERATORS: dict[str, Callable[[], str]] = {
    "DJANGO_SECRET_KEY": _token,
    "HUB_ENCRYPTION_KEYS": _fernet_key,
    "HUB_SUBJECT_KEY": _token,
}


def dev_secret(name: str, folder: Path) -> str:
    """Return the development value of secret ``name``, creating and persisting it on first use."""
    path = folder / "dev-secrets.json"
    folder.mkdir(parents=True, exist_ok=True)
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    if name not in stored:
        stored[name] = GENERATORS[name]()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=2))
        tmp.chmod(0o600)
        tmp.replace(path)
    _announced.add(name)
    return stored[name]


def announce_dev_secrets() -> None:
    """Say once, on stderr, which secrets the embedded default generated instead of reading."""
    if _announced:
        print(
            f"clearinghouse: using generated development values for {', '.join(sorted(_announced))} "
            "(var/dev-secrets.json); set them in the environment for production.",
            file=sys.stderr,
        )
        _announced.clear()
