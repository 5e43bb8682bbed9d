"""Durable atomic file writes and the file-name rules every reader follows.

A file is written under a temporary name (``.weakclip-tmp.<name>.<random>``) in the target's folder,
flushed to disk (``fsync``), renamed onto the target and the folder entry flushed too: after a crash or a
power loss the target is complete or absent, never empty or half written. Files follow the user's umask
(0644 under umask 022). Readers skip every name starting with a dot, so a temporary file left by a killed
process is never read as a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_PREFIX = ".weakclip-tmp."
# WEAKCLIP_FSYNC=0 skips the fsync calls (faster on slow network file systems, but a power loss may then
# leave an empty file under a final name); benchmarks/pseudo_masks.py measures the cost per image.
FSYNC_ENV = "WEAKCLIP_FSYNC"


def fsync_enabled() -> bool:
    return os.environ.get(FSYNC_ENV, "1") != "0"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush ``folder``'s entries (a rename or unlink in it) to disk; a no-op where folders cannot be opened."""
    if not fsync_enabled():
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def is_hidden(path: str | os.PathLike) -> bool:
    """Names starting with a dot (temporary files, locks): never results, skipped by every reader."""
    return Path(path).name.startswith(".")


def visible_files(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """``folder.glob(pattern)`` without hidden names (pathlib's glob matches dotfiles), sorted."""
    return sorted(p for p in Path(folder).glob(pattern) if not is_hidden(p))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; if the block succeeds, flush it to disk and rename it
    onto ``path`` (then flush the folder). ``before_rename`` runs just before the rename and may raise to
    keep the file out (an output folder whose settings changed under a writer).

    Readers never see a half-written file, an interrupted write leaves the old file (if any) intact, and the
    temporary file is removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, as open() would
    try:
        yield tmp
        if fsync_enabled():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
