"""Writing files so that a crash never leaves half of one: write a temporary sibling, then rename it into place."""

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the content to a temporary sibling of `path`, which then replaces `path` at once."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))



def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in chunks (`hashlib.file_digest`), never whole into memory."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
