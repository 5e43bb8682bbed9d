"""Atomic file writes (write to a temporary file beside the target, then rename), output folders that are
never stale (a manifest of what made them, checked under a folder lock), and file digests."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and an interrupted write leaves the old file (if any) intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on ``folder`` (its ``.lock`` file), so that jobs starting together (the shards of a
    job array) check and reset it one after the other."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reset_if_stale(out_dir: str | os.PathLike, manifest: dict, outputs: tuple[str, ...]) -> bool:
    """Keep ``out_dir``'s outputs only if its ``manifest.json`` equals ``manifest``; returns whether it reset.

    Otherwise delete the entries matching the glob patterns ``outputs`` (files or folders) and write the
    new manifest, so a folder never mixes outputs of different inputs or settings. Runs under
    :func:`folder_lock`.
    """
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    with folder_lock(out_dir):
        try:
            if json.loads(path.read_text()) == json.loads(json.dumps(manifest)):
                return False
        except (OSError, json.JSONDecodeError):
            pass
        for pattern in outputs:
            for stale in out_dir.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        write_text_atomic(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return True
