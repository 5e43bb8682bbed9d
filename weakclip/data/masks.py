"""Label-map PNG I/O with the VOC palette. Label maps are uint8 class indices; 255 means ignore."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import WeakclipError
from ..fileio import atomic_path


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, class i's colour from the bits of i."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


_PALETTE = voc_palette().reshape(-1).tolist()


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 class indices (palette indices kept, never converted to RGB)."""
    path = Path(path)
    if not path.is_file():
        raise WeakclipError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise WeakclipError(f"{path}: a label map must be a palette or grayscale PNG, got mode {im.mode}")
            arr = np.array(im)
    except WeakclipError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise WeakclipError(f"{path}: cannot read label map ({exc})") from None
    if arr.ndim != 2:
        raise WeakclipError(f"{path}: a label map must have one channel, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
            raise WeakclipError(f"{path}: label values must lie in 0..255")
        arr = arr.astype(np.uint8)
    return arr


def write_mask(path: str | os.PathLike, mask: np.ndarray, before_rename: Callable[[], None] | None = None) -> None:
    """Write (H, W) class indices as a VOC-palette PNG, atomically and durably (``before_rename``: see
    :func:`~weakclip.fileio.atomic_path`)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(_PALETTE)
    with atomic_path(path, before_rename) as tmp:
        im.save(tmp, format="PNG")


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB with the VOC palette (255 is drawn in its palette colour)."""
    return voc_palette()[mask]
