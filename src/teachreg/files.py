"""File helpers shared by the data cache, the training runs and the saved models (no TensorFlow)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

__all__ = ["sha256", "write_atomic"]


def sha256(path) -> str:
    """The SHA-256 hex digest (64 characters) of the file at `path`, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, newlines unchanged) to `path` so that `path` is never half written.

    The data go to a temporary file `.NAME.<16 hex digits>.tmp` in the same folder, created with
    the permissions the umask allows, which then replaces `path` by `os.replace`. The temporary
    file is removed whatever happens (an error, Ctrl-C).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temporary, "xb") as f:
            f.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
