"""Files that must survive a crash whole: atomic replacement, durable renames, secrets
made once with mode 0600 whatever the umask, and compared in constant time."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Writer = Callable[[BinaryIO], None]


def fsync_dir(directory: Path) -> None:
    """Makes the renames in directory durable: after a crash a file is old or new."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, content: bytes | Writer, mode: int) -> None:
    """Replace target with content (bytes, or a function writing to the open file): a
    reader sees the old file or the new one, never half of one, also after a crash."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
            else:
                content(out)
            out.flush()
            os.fchmod(out.fileno(), mode)  # the final mode, regardless of the umask
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def ensure_secret(path: Path, make: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> str:
    """The secret in path, made once (mode 0600, never replaced) with make(). The new file
    is written whole beside path and then linked into place, which fails when another
    process made it first: a crash leaves no secret or a whole one, never an empty file.
    An empty file (left by an older version killed while making it) is made again."""
    if path.exists() and path.stat().st_size == 0:
        path.unlink()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(make() + "\n")
                out.flush()
                os.fchmod(out.fileno(), 0o600)
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            Path(temp).unlink(missing_ok=True)
        fsync_dir(path.parent)
    return path.read_text().strip()


def same_secret(given: str, secret: str) -> bool:
    """Whether given (say a bearer token from a request) is secret, in constant time, for
    any string a header can carry: hmac.compare_digest refuses non-ASCII str, and aiohttp
    decodes bytes that are not UTF-8 to lone surrogates, hence bytes and surrogatepass."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), secret.encode("utf-8", "surrogatepass")
    )
