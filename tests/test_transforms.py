"""Training augmentation: shapes, padding, flip consistency, determinism, cat_max_ratio."""

from __future__ import annotations

import numpy as np
import pytest

from weakclip.data.transforms import TrainTransform, photometric_distortion, resize_short_side


def _asymmetric(h: int = 120, w: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 on the left quarter, drawn bright; class 0 elsewhere, dark."""
    seed = np.zeros((h, w), dtype=np.uint8)
    seed[:, : w // 4] = 1
    image = np.full((h, w, 3), 20, dtype=np.uint8)
    image[seed == 1] = 230
    return image, seed


def test_output_shapes_are_crop_size() -> None:
    image, seed = _asymmetric(300, 450)
    t = TrainTransform(crop_size=128, base_size=(1024, 256), scale_range=(0.5, 2.0))
    for i in range(5):
        out_image, out_seed = t(image, seed, np.random.default_rng(i))
        assert out_image.shape == (128, 128, 3) and out_image.dtype == np.uint8
        assert out_seed.shape == (128, 128) and out_seed.dtype == np.uint8


def test_padding_is_ignore_in_seed_and_zero_in_image() -> None:
    image, seed = _asymmetric(100, 150)
    # Ratio fixed at 1 with base (2048, 32): the short side becomes 32, so the image is 32 x 48 < 64.
    t = TrainTransform(crop_size=64, base_size=(2048, 32), scale_range=(1.0, 1.0), photometric=False)
    out_image, out_seed = t(image, seed, np.random.default_rng(0))
    assert out_seed.shape == (64, 64)
    assert (out_seed[32:] == 255).all() and (out_seed[:, 48:] == 255).all()
    assert (out_image[32:] == 0).all() and (out_image[:, 48:] == 0).all()
    assert (out_seed[:32, :48] != 255).all()  # the input had no ignore pixels


def test_padding_with_the_mean_colour_is_zero_after_normalisation(tiny_clip_cfg) -> None:
    import torch

    from weakclip.clip import input_stats
    from weakclip.config import VOC_CLASSES, ModelConfig
    from weakclip.model import build_model

    image, seed = _asymmetric(100, 150)
    model = build_model(ModelConfig(clip=tiny_clip_cfg, released=True), list(VOC_CLASSES))
    mean = [m * 255 for m in input_stats("imagenet")[0]]
    t = TrainTransform(crop_size=64, base_size=(2048, 32), scale_range=(1.0, 1.0), photometric=False,
                       pad_value=mean)
    out_image, out_seed = t(image, seed, np.random.default_rng(0))
    assert out_image.dtype == np.float32 and (out_seed[32:] == 255).all()
    x = model.normalize(torch.from_numpy(out_image).permute(2, 0, 1)[None])[0]
    assert (x[:, 32:] == 0).all() and (x[:, :, 48:] == 0).all()
    assert (x[:, :32, :48] != 0).any()  # the image itself is untouched
    assert (out_image[:32, :48] == out_image[:32, :48].round()).all()  # still whole grey levels inside


def test_flip_keeps_image_and_seed_aligned() -> None:
    image, seed = _asymmetric()
    # No rescale (fits exactly), crop = whole image, no photometric: only the flip changes anything.
    t = TrainTransform(crop_size=160, base_size=(160, 120), scale_range=(1.0, 1.0), photometric=False)
    flipped = 0
    for i in range(20):
        out_image, out_seed = t(image, seed, np.random.default_rng(i))
        valid = out_seed != 255
        assert ((out_image[..., 0] == 230) == (out_seed == 1))[valid].all()
        flipped += int(out_seed[0, -1] == 1)
    assert 0 < flipped < 20  # both outcomes happen


def test_deterministic_given_generator() -> None:
    image = np.random.default_rng(0).integers(0, 256, (200, 260, 3), dtype=np.uint8)
    seed = np.random.default_rng(1).integers(0, 5, (200, 260), dtype=np.uint8)
    t = TrainTransform(crop_size=96, base_size=(512, 128))
    a = t(image, seed, np.random.default_rng(7))
    b = t(image, seed, np.random.default_rng(7))
    c = t(image, seed, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def _balanced(crop: np.ndarray) -> bool:
    values, counts = np.unique(crop[crop != 255], return_counts=True)
    return len(values) >= 2 and counts.max() / counts.sum() < 0.75


@pytest.mark.parametrize("ratio, expect_all_balanced", [(0.75, True), (1.0, False)])
def test_cat_max_ratio(ratio: float, expect_all_balanced: bool) -> None:
    seed = np.zeros((200, 200), dtype=np.uint8)
    seed[60:140, 60:140] = 1
    image = np.zeros((200, 200, 3), dtype=np.uint8)
    t = TrainTransform(crop_size=100, base_size=(200, 200), scale_range=(1.0, 1.0), cat_max_ratio=ratio,
                       photometric=False)
    balanced = [_balanced(t(image, seed, np.random.default_rng(i))[1]) for i in range(40)]
    assert all(balanced) == expect_all_balanced


def test_stacked_labels_share_geometry() -> None:
    image, seed = _asymmetric()
    label = np.stack([seed, seed * 2], axis=-1)
    t = TrainTransform(crop_size=96, base_size=(320, 240))
    _, out = t(image, label, np.random.default_rng(3))
    assert out.shape == (96, 96, 2)
    valid = out[..., 0] != 255
    assert np.array_equal(out[..., 1][valid], out[..., 0][valid] * 2)


def test_photometric_keeps_gray_gray() -> None:
    gray = np.repeat(np.arange(0, 250, 2, dtype=np.uint8).reshape(5, 25, 1), 3, axis=2)
    for i in range(10):
        out = photometric_distortion(gray, np.random.default_rng(i))
        assert out.shape == gray.shape and out.dtype == np.uint8
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_photometric_shifts_hue_of_colours() -> None:
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 200
    outs = [photometric_distortion(red, np.random.default_rng(i)) for i in range(30)]
    assert any(o[..., 1].max() > 0 or o[..., 2].max() > 0 for o in outs)  # hue moved off pure red


def test_resize_short_side() -> None:
    image = np.zeros((281, 500, 3), dtype=np.uint8)
    assert resize_short_side(image, 512).shape == (512, 911, 3)
    assert resize_short_side(image.transpose(1, 0, 2), 256).shape == (456, 256, 3)
