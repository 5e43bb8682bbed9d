"""Training augmentation as released (mmseg 0.19 pipeline, minus normalisation) and inference resizing.

Everything is numpy/PIL and draws only from the ``np.random.Generator`` passed in, so one generator state
gives one result. Images are (H, W, 3) uint8 RGB; label maps are (H, W) uint8 or (H, W, C) uint8 stacks
(e.g. seed and ground truth) that get the same geometry, channel 0 being the one ``cat_max_ratio`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear; ``size`` is (h, w)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (h, w[, C]), nearest neighbour (class indices are never blended)."""
    if label.shape[:2] == tuple(size):
        return label
    if label.ndim == 3:
        return np.stack([resize_label(label[..., c], size) for c in range(label.shape[2])], axis=-1)
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


def resize_short_side(image: np.ndarray, short: int) -> np.ndarray:
    """(H, W, 3) uint8 -> bilinear resize so that min(H, W) == ``short``, aspect kept."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    return resize_image(image, (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))))


def rescale_size(h: int, w: int, base_size: Sequence[int], ratio: float) -> tuple[int, int]:
    """mmseg ``Resize(keep_ratio=True)``: the largest (h, w) fitting (max(base)*r, min(base)*r)."""
    long_max, short_max = max(base_size) * ratio, min(base_size) * ratio
    scale = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB in [0, 255] -> HSV with h in [0, 1), s in [0, 1], v in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.maximum(v, 1e-6), 0.0)
    d = np.maximum(delta, 1e-6)
    h = np.where(r == v, (g - b) / d, np.where(g == v, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.astype(np.int64) % 6
    # Channel values per hue sector (0..5), the standard HSV -> RGB table.
    r = np.choose(sector, [v, q, p, p, t, v])
    g = np.choose(sector, [t, v, v, q, p, p])
    b = np.choose(sector, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness: float = 32,
                           contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: each step with p = 0.5, contrast before or after the HSV steps.

    ``hue`` is in OpenCV's 0..180 hue units (18 = 36 degrees). (H, W, 3) uint8 -> (H, W, 3) uint8.
    """
    img = image.astype(np.float32)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness, brightness), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast), 0, 255)
    sat = rng.uniform(*saturation) if rng.integers(2) else None
    shift = int(rng.integers(-hue, hue + 1)) if rng.integers(2) else 0
    if sat is not None or shift:
        hsv = _rgb_to_hsv(img)
        if sat is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
        hsv[..., 0] = (hsv[..., 0] + shift / 180.0) % 1.0
        img = _hsv_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast), 0, 255)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


class TrainTransform:
    """Random rescale, cat_max_ratio crop, horizontal flip, photometric distortion, pad to the crop size.

    ``__call__(image (H, W, 3) uint8, label (H, W) or (H, W, C) uint8, rng)`` returns
    (crop, crop, 3) uint8 and (crop, crop[, C]) uint8; padding is 0 in the image and ``ignore_index`` in
    the labels. Normalisation is left to the model. With ``pad_value`` (the model's mean colour, 0..255) the
    image is float32 and padded with that colour exactly, so it is 0 after normalisation, as released.
    """

    def __init__(self, crop_size: int, base_size: Sequence[int] = (2048, 512),
                 scale_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 ignore_index: int = 255, photometric: bool = True,
                 pad_value: Sequence[float] | None = None) -> None:
        self.pad_value = None if pad_value is None else np.asarray(pad_value, dtype=np.float32)
        self.crop_size = crop_size
        self.base_size = tuple(base_size)
        self.scale_range = tuple(scale_range)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.photometric = photometric

    def _crop_origin(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        return (int(rng.integers(0, max(h - self.crop_size, 0) + 1)),
                int(rng.integers(0, max(w - self.crop_size, 0) + 1)))

    def _balanced(self, label: np.ndarray) -> bool:
        """At least 2 classes and the largest below cat_max_ratio of the labelled pixels (255 excluded)."""
        counts = np.bincount(label.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
        """Random crop; up to 10 redraws while the crop is unbalanced, then the last draw is kept."""
        c = self.crop_size
        y, x = self._crop_origin(*label.shape[:2], rng)
        if self.cat_max_ratio < 1.0:
            key = label[..., 0] if label.ndim == 3 else label
            for _ in range(10):
                if self._balanced(key[y:y + c, x:x + c]):
                    break
                y, x = self._crop_origin(*label.shape[:2], rng)
        return image[y:y + c, x:x + c], label[y:y + c, x:x + c]

    def pad(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pad bottom and right up to crop_size (image: 0, or ``pad_value`` in float32; labels: ignore)."""
        h, w = image.shape[:2]
        ph, pw = max(self.crop_size - h, 0), max(self.crop_size - w, 0)
        if self.pad_value is not None:
            out = np.empty((h + ph, w + pw, 3), dtype=np.float32)
            out[...] = self.pad_value
            out[:h, :w] = image
            image = out
        if ph == 0 and pw == 0:
            return image, label
        if self.pad_value is None:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        widths = ((0, ph), (0, pw)) + ((0, 0),) * (label.ndim - 2)
        label = np.pad(label, widths, constant_values=self.ignore_index)
        return image, label

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} sizes differ")
        size = rescale_size(*image.shape[:2], self.base_size, rng.uniform(*self.scale_range))
        image, label = resize_image(image, size), resize_label(label, size)
        image, label = self.crop(image, label, rng)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        image, label = self.pad(image, label)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)
