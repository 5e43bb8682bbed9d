"""Losses: hand-computed values for the seeding and boundary losses, the aux CE's ignore handling, the wrapper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weakclip.config import CRFConfig, LossConfig
from weakclip.errors import WeakclipError
from weakclip.losses import (
    aux_accuracy,
    aux_ce_loss,
    boundary_loss,
    downsample_images,
    resize_seeds,
    seed_cues,
    seeding_loss,
    weakclip_losses,
)


def _probs(pixels: list[list[list[float]]]) -> torch.Tensor:
    """[image][pixel (row-major, 2 x 2)][class] -> (B, K, 2, 2)."""
    return torch.tensor(pixels, dtype=torch.float64).reshape(len(pixels), 2, 2, -1).permute(0, 3, 1, 2)


def test_seeding_loss_hand_computed():
    probs = _probs([
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.3, 0.3, 0.4]],
        [[0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]],
    ])
    seeds = torch.tensor([[[0, 1], [2, 255]],
                          [[1, 1], [255, 2]]])  # image 1 has no background seed
    bg0 = -math.log(0.7) / 1
    fg0 = -(math.log(0.6) + math.log(0.5)) / 2
    bg1 = 0.0  # no background seeds: 0 / max(0, 1e-4), still counted in the batch mean
    fg1 = -(math.log(0.4) + math.log(0.7) + math.log(0.8)) / 3  # classes 1 and 2 pooled in one mean
    expected = (bg0 + bg1) / 2 + (fg0 + fg1) / 2
    assert seeding_loss(probs, seeds).item() == pytest.approx(expected, abs=1e-12)


def test_seeding_loss_ignores_255_even_where_probability_is_zero():
    probs = _probs([[[0.5, 0.5], [0.0, 1.0], [0.2, 0.8], [0.6, 0.4]]]).requires_grad_()
    seeds = torch.tensor([[[0, 255], [1, 255]]])
    loss = seeding_loss(probs, seeds)
    assert loss.item() == pytest.approx(-math.log(0.5) - math.log(0.8), abs=1e-12)
    loss.backward()
    assert torch.isfinite(probs.grad).all()
    assert probs.grad[0, :, 0, 1].abs().sum() == 0 and probs.grad[0, :, 1, 1].abs().sum() == 0
    all_ignored = torch.full((1, 2, 2), 255)
    assert seeding_loss(probs.detach(), all_ignored).item() == 0


def _pair(p0: list[float], q0: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes over a 1 x len row of pixels: class 0 given, class 1 = 1 - class 0. -> (1, 2, 1, n)."""
    p = torch.tensor([p0, [1 - v for v in p0]], dtype=torch.float64)[None, :, None]
    q = torch.tensor([q0, [1 - v for v in q0]], dtype=torch.float64)[None, :, None]
    return p, q


def test_boundary_loss_zero_when_target_equals_prediction():
    probs = torch.rand(2, 5, 3, 4, dtype=torch.float64) + 0.01
    probs = probs / probs.sum(1, keepdim=True)
    assert boundary_loss(probs, probs.clone()).abs().item() < 1e-12


def test_boundary_loss_hand_computed_with_gradients():
    p, q = _pair([0.5, 0.9], [0.8, 0.002])
    p.requires_grad_()
    q.requires_grad_()  # must not receive a gradient: the CRF target is a constant
    loss = boundary_loss(p, q)
    pixel0 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    pixel1 = 0.002 * math.log(0.05) + 0.998 * math.log(0.998 / 0.1)  # 0.002 / 0.9 < 0.05: clamped
    assert loss.item() == pytest.approx((pixel0 + pixel1) / 2, abs=1e-12)
    loss.backward()
    assert q.grad is None
    # d/dP [Q log(Q/P)] = -Q/P inside the clamp range, 0 outside; the mean over 2 pixels halves it.
    expected = torch.tensor([[-0.8 / 0.5, 0.0], [-0.2 / 0.5, -0.998 / 0.1]], dtype=torch.float64) / 2
    torch.testing.assert_close(p.grad[0, :, 0], expected, atol=1e-12, rtol=0)


def test_boundary_loss_clamps_high_ratio_and_clips_target():
    p, q = _pair([0.01, 0.5], [0.5, 0.0])
    p.requires_grad_()
    loss = boundary_loss(p, q)
    # Pixel 0: 0.5 / 0.01 = 50 is clamped to 20. Pixel 1: Q = (0, 1) becomes (1e-4, 1) / 1.0001.
    q_lo, q_hi = 1e-4 / 1.0001, 1 / 1.0001
    pixel0 = 0.5 * math.log(20) + 0.5 * math.log(0.5 / 0.99)
    pixel1 = q_lo * math.log(0.05) + q_hi * math.log(q_hi / 0.5)
    assert loss.item() == pytest.approx((pixel0 + pixel1) / 2, abs=1e-12)
    loss.backward()
    assert p.grad[0, 0, 0, 0] == 0  # above the clamp range
    assert p.grad[0, 1, 0, 0].item() == pytest.approx(-0.5 / 0.99 / 2, abs=1e-12)
    assert p.grad[0, 0, 0, 1] == 0  # below the clamp range


def test_aux_ce_averages_over_valid_pixels_only():
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64).mul(0.1).requires_grad_()
    seeds = torch.randint(0, 3, (2, 8, 8), generator=gen)
    seeds[0, :3] = 255
    seeds[1, :, 5:] = 255
    loss = aux_ce_loss(score, seeds, tau=0.07)

    up = F.interpolate(score.detach() / 0.07, size=(8, 8), mode="bilinear", align_corners=False)
    valid = seeds != 255
    logits_valid = up.permute(0, 2, 3, 1)[valid]  # (n_valid, K)
    expected = F.cross_entropy(logits_valid, seeds[valid])  # plain mean over the valid pixels
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    released = F.cross_entropy(logits_valid, seeds[valid], reduction="sum") / seeds.numel()
    assert abs(loss.item() - released.item()) > 0.1  # the released denominator would differ
    loss.backward()
    assert torch.isfinite(score.grad).all() and score.grad.abs().sum() > 0


def test_aux_ce_all_ignored_is_zero_with_graph():
    score = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = aux_ce_loss(score, torch.full((1, 8, 8), 255))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert (score.grad == 0).all()


def test_resize_seeds_takes_top_left_of_each_block():
    seeds = torch.arange(64).reshape(1, 8, 8)
    seeds[0, 4, 4] = 255
    assert resize_seeds(seeds, 2).tolist() == [[[0, 4], [32, 255]]]
    assert resize_seeds(seeds, 2).dtype == torch.long


def test_downsample_images_halves_by_block_means():
    block = torch.tensor([[10, 20, 0, 1],
                          [30, 40, 0, 0],
                          [255, 255, 7, 7],
                          [255, 254, 7, 7]], dtype=torch.uint8)
    images = torch.stack([block, block.flip(0), block.flip(1)])[None]  # (1, 3, 4, 4)
    out = downsample_images(images, 2)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    # 2x bilinear without antialias samples between pixel pairs: the mean of each 2x2 block, rounded.
    assert out[0, 0].tolist() == [[25, 0], [255, 7]]  # 0.25 -> 0, 254.75 -> 255


def _random_batch(b: int = 2, k: int = 4, h: int = 64, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h // 4, h // 4, generator=gen).to(dtype).requires_grad_()
    score = (torch.rand(b, k, h // 16, h // 16, generator=gen) * 0.4 - 0.2).requires_grad_()
    seeds = torch.randint(0, k, (b, h, h), generator=gen)
    seeds[:, :, -10:] = 255  # right padding
    images = torch.randint(0, 256, (b, 3, h, h), generator=gen, dtype=torch.uint8)
    images[:, :, :, -10:] = 0
    return logits, score, seeds, images


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weakclip_losses_finite_with_gradients(backend, dtype):
    logits, score, seeds, images = _random_batch(dtype=dtype)
    cfg = LossConfig(size=16, crf_backend=backend, seed_weight=0.5, boundary_weight=2.0, aux_weight=0.4)
    out = weakclip_losses(logits, score, seeds, images, cfg)
    assert set(out) == {"seed", "boundary", "aux", "total", "aux_accuracy"}
    for value in out.values():
        assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)
    expected_total = 0.5 * out["seed"] + 2.0 * out["boundary"] + 0.4 * out["aux"]
    torch.testing.assert_close(out["total"], expected_total)
    assert out["seed"] > 0 and out["aux"] > 0
    out["total"].backward()
    for t in (logits, score):
        assert t.grad is not None and torch.isfinite(t.grad.float()).all() and t.grad.abs().sum() > 0


def test_weakclip_losses_image_classes_only():
    logits, score, seeds, images = _random_batch()
    labels = torch.tensor([[False, True, False, False], [False, False, True, True]])
    cfg = LossConfig(size=16, crf_backend="torch", crf=CRFConfig(iters=3), crf_image_classes_only=True)
    out = weakclip_losses(logits, score, seeds, images, cfg, image_labels=labels)
    assert torch.isfinite(out["total"])
    unrestricted = weakclip_losses(logits, score, seeds, images, LossConfig(size=16, crf_backend="torch",
                                                                           crf=CRFConfig(iters=3)))
    assert out["boundary"] != unrestricted["boundary"]
    torch.testing.assert_close(out["seed"], unrestricted["seed"])
    with pytest.raises(WeakclipError, match="image-level labels"):
        weakclip_losses(logits, score, seeds, images, cfg)


def test_weakclip_losses_rejects_mismatched_shapes():
    logits, score, seeds, images = _random_batch()
    with pytest.raises(WeakclipError, match="do not match"):
        weakclip_losses(logits, score, seeds[:, :-1], images, LossConfig(size=16))


def test_weakclip_losses_default_config():
    logits, score, seeds, images = _random_batch(h=128)
    out = weakclip_losses(logits, score, seeds, images, LossConfig())  # 64 x 64, auto backend, 10 iterations
    assert all(torch.isfinite(v) for v in out.values())
    out["total"].backward()
    assert torch.isfinite(logits.grad).all()


def test_aux_accuracy_counts_ignored_pixels_as_misses_as_released():
    # Class 2 scores highest everywhere: the accuracy is the share of all seed pixels that are 2, in percent.
    score = torch.tensor([0.1, 0.0, 0.3])[None, :, None, None].expand(1, 3, 2, 2)
    seeds = torch.tensor([[[2, 2, 0, 255], [1, 2, 255, 255]]])  # (1, 2, 4): 3 of 8 pixels are 2
    assert aux_accuracy(score, seeds, tau=0.07).item() == pytest.approx(37.5)
    assert not aux_accuracy(score.requires_grad_(), seeds, 0.07).requires_grad


def test_seed_cues_one_hot_without_ignored_or_out_of_range_seeds():
    seeds = torch.tensor([[[0, 2, 255, 7]]])
    cues = seed_cues(seeds, 3)
    assert cues.shape == (1, 3, 1, 4) and cues.dtype == torch.bool
    assert cues[0, :, 0].int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
