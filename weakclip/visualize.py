"""Side-by-side grids of an image and its label maps (ground truth, seeds, pseudo masks, ...)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.datasets import folder_image
from .data.masks import colorize, read_mask
from .errors import WeakclipError
from .fileio import atomic_path, visible_files

MAX_PANEL_HEIGHT = 320  # panels taller than this are scaled down
TITLE_HEIGHT = 16  # white strip above each panel
PANEL_GAP = 4  # white space between panels
_MISSING_GREY = (128, 128, 128)


def _fit_title(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Shorten ``text`` (with "..") until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width - 4:
        return text
    while text and draw.textlength(text + "..", font=font) > width - 4:
        text = text[:-1]
    return text + ".."


def make_grid(image: np.ndarray, masks: Sequence[np.ndarray | None], titles: Sequence[str]) -> Image.Image:
    """One RGB picture: the image, then each mask in the VOC palette, left to right, a title over each.

    image: (H, W, 3) uint8. masks: (H, W) uint8 class maps; None draws a grey panel (e.g. no ground
    truth). 255 is drawn in the VOC palette's ignore colour (cream), as in VOC's own PNGs. titles: one per
    panel, the image's first (len(masks) + 1). Panels are scaled to at most ``MAX_PANEL_HEIGHT`` pixels
    tall (image bilinear, masks nearest); the result is (n * w + (n - 1) * PANEL_GAP) x (TITLE_HEIGHT + h).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if len(titles) != len(masks) + 1:
        raise ValueError(f"{len(titles)} titles given for {len(masks) + 1} panels (the image and each mask)")
    h, w = image.shape[:2]
    for mask in masks:
        if mask is not None and mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} differs from image size {(h, w)}")
    scale = min(1.0, MAX_PANEL_HEIGHT / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL order: (width, height)

    panels = [Image.fromarray(image.astype(np.uint8), "RGB").resize(size, Image.Resampling.BILINEAR)]
    for mask in masks:
        if mask is None:
            panels.append(Image.new("RGB", size, _MISSING_GREY))
        else:
            panels.append(Image.fromarray(colorize(mask), "RGB").resize(size, Image.Resampling.NEAREST))

    n = len(panels)
    grid = Image.new("RGB", (n * size[0] + (n - 1) * PANEL_GAP, TITLE_HEIGHT + size[1]), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (size[0] + PANEL_GAP)
        grid.paste(panel, (x, TITLE_HEIGHT))
        draw.text((x + 2, 2), _fit_title(draw, str(title), font, size[0]), fill=(0, 0, 0), font=font)
    return grid


def _image_path(images_dir: Path, image_id: str) -> Path:
    path = folder_image(images_dir, image_id)
    if not path.is_file():
        raise WeakclipError(f"{path}: image not found (nor as .jpeg or .png)")
    return path


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # what PIL raises for bad files
        raise WeakclipError(f"{path}: cannot read image ({exc})") from None


def visualize_dirs(
    images_dir: str | os.PathLike,
    mask_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    ids: Sequence[str] | None = None,
    num: int = 16,
    seed: int = 0,
    titles: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``output_dir/<id>.png`` grids (see :func:`make_grid`) and return their paths, sorted by id.

    Images are ``images_dir/<id>.jpg`` (or ``.png``), masks ``<mask dir>/<id>.png``. ``ids`` picks the
    images; otherwise ``num`` ids are drawn at random (reproducibly, from ``seed``) among those with a PNG
    in every mask folder. ``titles`` names the mask panels (default: the folders' names); the image panel
    is titled with the id. A missing or unreadable file, or a mask whose size differs from its image, is a
    WeakclipError naming the file.
    """
    images_dir, output_dir = Path(images_dir), Path(output_dir)
    mask_dirs = [Path(d) for d in mask_dirs]
    if not mask_dirs:
        raise ValueError("visualize_dirs needs at least one mask folder")
    for folder in (images_dir, *mask_dirs):
        if not folder.is_dir():
            raise WeakclipError(f"{folder}: folder not found")
    if titles is None:
        titles = [d.name for d in mask_dirs]
    elif len(titles) != len(mask_dirs):
        raise WeakclipError(f"{len(titles)} titles given for {len(mask_dirs)} mask folders")

    if ids is None:
        common = set.intersection(*({p.stem for p in visible_files(d, "*.png")} for d in mask_dirs))
        if not common:
            raise WeakclipError(f"no image id has a PNG in every mask folder ({', '.join(map(str, mask_dirs))})")
        ids = random.Random(seed).sample(sorted(common), min(num, len(common)))  # sorted: independent of fs order
    ids = sorted(set(ids))

    written = []
    for image_id in ids:
        image_path = _image_path(images_dir, image_id)
        image = _read_image(image_path)
        masks = []
        for d in mask_dirs:
            mask_path = d / f"{image_id}.png"
            mask = read_mask(mask_path)  # names the file if it is missing or unreadable
            if mask.shape != image.shape[:2]:
                raise WeakclipError(
                    f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {image_path} is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
            masks.append(mask)
        out = output_dir / f"{image_id}.png"
        with atomic_path(out) as tmp:
            make_grid(image, masks, [image_id, *titles]).save(tmp, format="PNG")
        written.append(out)
    return written
