"""Dense CRF: the torch backend against a brute-force double loop and against pydensecrf on real images."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from weakclip import crf
from weakclip.config import CRFConfig
from weakclip.crf import crf_refine, dense_crf_pydensecrf, dense_crf_torch, resolve_crf_backend
from weakclip.errors import WeakclipError

BOUNDARY_PARAMS = CRFConfig(gauss_sxy=3, gauss_compat=3, bilateral_sxy=80, bilateral_srgb=13,
                            bilateral_compat=10, iters=10)
# Narrow kernels so that a tiny image still has pixels near and far in space and colour.
TINY_PARAMS = CRFConfig(gauss_sxy=1.5, gauss_compat=3, bilateral_sxy=4, bilateral_srgb=30,
                        bilateral_compat=5, iters=5)


def brute_force_crf(probs: np.ndarray, image: np.ndarray, p: CRFConfig, keep=None) -> np.ndarray:
    """Mean field written out pixel pair by pixel pair. probs (K, H, W), image (H, W, 3) -> Q (K, H, W)."""
    k_all, h, w = probs.shape
    keep = list(range(k_all)) if keep is None else list(keep)
    pixels = [(y, x) for y in range(h) for x in range(w)]
    n = len(pixels)
    img = image.astype(np.float64)
    gauss = np.zeros((n, n))
    bilat = np.zeros((n, n))
    for i, (yi, xi) in enumerate(pixels):
        for j, (yj, xj) in enumerate(pixels):
            d_pos = (yi - yj) ** 2 + (xi - xj) ** 2
            d_col = sum((img[yi, xi, c] - img[yj, xj, c]) ** 2 for c in range(3))
            gauss[i, j] = math.exp(-d_pos / (2 * p.gauss_sxy ** 2))
            bilat[i, j] = math.exp(-d_pos / (2 * p.bilateral_sxy ** 2) - d_col / (2 * p.bilateral_srgb ** 2))
    gauss_norm = [1 / math.sqrt(sum(gauss[i])) for i in range(n)]
    bilat_norm = [1 / math.sqrt(sum(bilat[i])) for i in range(n)]
    unary = {c: [-math.log(max(float(probs[c, y, x]), 1e-5)) for (y, x) in pixels] for c in keep}

    def normalise(logits):
        q = {c: [0.0] * n for c in keep}
        for i in range(n):
            top = max(logits[c][i] for c in keep)
            z = sum(math.exp(logits[c][i] - top) for c in keep)
            for c in keep:
                q[c][i] = math.exp(logits[c][i] - top) / z
        return q

    q = normalise({c: [-u for u in unary[c]] for c in keep})
    for _ in range(p.iters):
        logits = {}
        for c in keep:
            logits[c] = []
            for i in range(n):
                msg_g = sum(gauss_norm[i] * gauss[i, j] * gauss_norm[j] * q[c][j] for j in range(n))
                msg_b = sum(bilat_norm[i] * bilat[i, j] * bilat_norm[j] * q[c][j] for j in range(n))
                logits[c].append(-unary[c][i] + p.gauss_compat * msg_g + p.bilateral_compat * msg_b)
        q = normalise(logits)
    out = np.zeros((k_all, h, w))
    for c in keep:
        out[c] = np.array(q[c]).reshape(h, w)
    return out


def _tiny_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3) * 0.7, size=(5, 6)).transpose(2, 0, 1)  # (3, 5, 6)
    probs[0, 0, 0], probs[1, 0, 0], probs[2, 0, 0] = 1.0, 0.0, 0.0  # exercises the 1e-5 unary clip
    image = rng.integers(60, 140, size=(5, 6, 3)).astype(np.uint8)
    return probs, image


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_crf_equals_brute_force(dtype):
    probs, image = _tiny_inputs()
    expected = brute_force_crf(probs, image, TINY_PARAMS)
    got = dense_crf_torch(torch.tensor(probs, dtype=dtype)[None], torch.from_numpy(image).permute(2, 0, 1)[None],
                          TINY_PARAMS)
    assert got.dtype == dtype and got.shape == (1, 3, 5, 6)
    np.testing.assert_allclose(got[0].double().numpy(), expected, atol=1e-5, rtol=0)
    # The pairwise terms matter here: the result is far from the unary-only softmax.
    assert np.abs(expected - brute_force_crf(probs, image, CRFConfig(iters=0))).max() > 0.05


def test_torch_crf_label_mask_equals_brute_force_on_kept_classes():
    probs, image = _tiny_inputs(1)
    expected = brute_force_crf(probs, image, TINY_PARAMS, keep=[0, 2])
    mask = torch.tensor([[True, False, True]])
    got = dense_crf_torch(torch.from_numpy(probs)[None], torch.from_numpy(image).permute(2, 0, 1)[None],
                          TINY_PARAMS, label_mask=mask)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-5, rtol=0)
    assert (got[0, 1] == 0).all()


def _voc_inputs(root: Path, count: int = 6, size: int = 64):
    """Real images at size x size with a plausible probability map: a blurred, noisy one-hot of the GT."""
    rng = np.random.default_rng(0)
    probs, images, gts = [], [], []
    for path in sorted((root / "JPEGImages").glob("*.jpg"))[:count]:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        gt = np.array(Image.open(root / "SegmentationClass" / f"{path.stem}.png").resize((size, size),
                                                                                        Image.NEAREST))
        gt = np.where(gt == 255, 0, gt).astype(np.int64)
        logits = np.eye(21)[gt].transpose(2, 0, 1) * 4 + rng.normal(0, 1, (21, size, size))
        logits = gaussian_filter(logits, sigma=(0, 1.5, 1.5))
        p = np.exp(logits - logits.max(0))
        probs.append((p / p.sum(0)).astype(np.float32))
        images.append(np.asarray(image, dtype=np.uint8))
        gts.append(gt)
    return np.stack(probs), np.stack(images), gts


@pytest.mark.parametrize("restrict", [False, True], ids=["all-classes", "image-classes"])
def test_torch_crf_agrees_with_pydensecrf_on_real_images(voc_sample, restrict):
    probs, images, gts = _voc_inputs(voc_sample)
    mask = None
    if restrict:  # background + the image's classes + one absent class (14 = motorbike if absent, else 19)
        mask = torch.zeros(len(gts), 21, dtype=torch.bool)
        for i, gt in enumerate(gts):
            mask[i, np.unique(gt)] = True
            mask[i, 0] = True
            mask[i, 19 if mask[i, 14] else 14] = True
    probs_t = torch.from_numpy(probs)
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2)
    q_torch = crf_refine(probs_t, images_t, BOUNDARY_PARAMS, backend="torch", label_mask=mask).numpy()
    q_lattice = crf_refine(probs_t, images_t, BOUNDARY_PARAMS, backend="pydensecrf", label_mask=mask).numpy()

    agree = (q_torch.argmax(1) == q_lattice.argmax(1)).mean(axis=(1, 2))
    mean_abs = np.abs(q_torch - q_lattice).mean()
    # Measured (6 images, 64 x 64): per-image agreement 0.965-1.0, overall 0.987, mean |dQ| 1.1e-3.
    assert agree.min() >= 0.95, agree
    assert agree.mean() >= 0.975, agree
    assert mean_abs < 2.5e-3, mean_abs
    # Not a trivial agreement: both CRFs move a fair share of labels away from the unary's argmax.
    for q in (q_torch, q_lattice):
        assert (q.argmax(1) != probs.argmax(1)).mean() > 0.05
    if mask is not None:
        for q in (q_torch, q_lattice):
            assert (q[~mask.numpy()] == 0).all()
            np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)


def _random_batch(b: int = 3, k: int = 4, h: int = 12, w: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(b, k, h, w, generator=gen).pow(3)
    probs = probs / probs.sum(1, keepdim=True)
    images = torch.randint(0, 256, (b, 3, h, w), generator=gen, dtype=torch.uint8)
    return probs, images


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_batch_equals_single_calls(backend):
    probs, images = _random_batch()
    mask = torch.tensor([[True, True, False, True], [True, False, False, False], [True] * 4])
    for label_mask in (None, mask):
        batched = crf_refine(probs, images, BOUNDARY_PARAMS, backend=backend, label_mask=label_mask)
        for i in range(3):
            single = crf_refine(probs[i:i + 1], images[i:i + 1], BOUNDARY_PARAMS, backend=backend,
                                label_mask=None if label_mask is None else label_mask[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-6, rtol=0)


def test_torch_crf_groups_under_memory_budget_give_same_result(monkeypatch):
    probs, images = _random_batch(b=5)
    whole = dense_crf_torch(probs, images, BOUNDARY_PARAMS)
    n = 12 * 10
    monkeypatch.setitem(crf._KERNEL_BYTES, "cpu", 2 * n * n * 4)  # groups of 2 images: 2 + 2 + 1
    torch.testing.assert_close(dense_crf_torch(probs, images, BOUNDARY_PARAMS), whole, atol=1e-6, rtol=0)


def test_float_images_match_uint8_images():
    probs, images = _random_batch()
    torch.testing.assert_close(dense_crf_torch(probs, images.float(), BOUNDARY_PARAMS),
                               dense_crf_torch(probs, images, BOUNDARY_PARAMS))


def test_pydensecrf_backend_keeps_dtype_and_matches_direct_call():
    probs, images = _random_batch()
    out = crf_refine(probs.double(), images, BOUNDARY_PARAMS, backend="pydensecrf")
    assert out.dtype == torch.float64 and out.device == probs.device
    direct = dense_crf_pydensecrf(probs[1].numpy(), np.ascontiguousarray(images[1].permute(1, 2, 0).numpy()),
                                  BOUNDARY_PARAMS)
    np.testing.assert_allclose(out[1].numpy(), direct, atol=1e-7)


def test_zero_iterations_give_the_clipped_unary_softmax():
    probs, images = _random_batch()
    expected = probs.clamp_min(1e-5) / probs.clamp_min(1e-5).sum(1, keepdim=True)
    params = CRFConfig(iters=0)
    for backend in ("torch", "pydensecrf"):
        torch.testing.assert_close(crf_refine(probs, images, params, backend=backend), expected)


def test_auto_backend_resolution(monkeypatch):
    assert resolve_crf_backend("auto", "cpu") == "pydensecrf"
    assert resolve_crf_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_crf_backend("torch", "cpu") == "torch"
    assert resolve_crf_backend("pydensecrf", "cpu") == "pydensecrf"
    with pytest.raises(WeakclipError, match="unknown"):
        resolve_crf_backend("lattice", "cpu")
    with pytest.raises(WeakclipError, match="unknown"):
        crf_refine(*_random_batch(), BOUNDARY_PARAMS, backend="densecrf")


def test_missing_pydensecrf(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    assert resolve_crf_backend("auto", "cpu") == "torch"
    with pytest.raises(WeakclipError, match=r'pip install "weakclip\[crf\]"'):
        resolve_crf_backend("pydensecrf", "cpu")
    probs, images = _random_batch()
    with pytest.raises(WeakclipError, match="pydensecrf2"):
        dense_crf_pydensecrf(probs[0].numpy(), images[0].permute(1, 2, 0).numpy(), BOUNDARY_PARAMS)


def test_bad_inputs_raise_one_line_errors():
    probs, images = _random_batch()
    with pytest.raises(WeakclipError, match="images must be"):
        crf_refine(probs, images[:, :, :-1], BOUNDARY_PARAMS, backend="torch")
    with pytest.raises(WeakclipError, match="no class"):
        crf_refine(probs, images, BOUNDARY_PARAMS, backend="torch",
                   label_mask=torch.tensor([[True] * 4, [False] * 4, [True] * 4]))
    with pytest.raises(WeakclipError, match="uint8"):
        dense_crf_pydensecrf(probs[0].numpy(), images[0].permute(1, 2, 0).float().numpy(), BOUNDARY_PARAMS)


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_identity_kernel_keeps_self_term(backend):
    """Near-zero kernel widths make K~ = I: Q <- softmax(-U + (w_g + w_b) Q), the self term included."""
    probs, images = _random_batch(b=1, h=6, w=5)
    params = CRFConfig(gauss_sxy=0.01, gauss_compat=3, bilateral_sxy=0.01, bilateral_srgb=0.01,
                       bilateral_compat=2, iters=4)
    neg_unary = probs.double().clamp_min(1e-5).log()
    q = neg_unary.softmax(1)
    for _ in range(4):
        q = (neg_unary + 5 * q).softmax(1)
    got = crf_refine(probs, images, params, backend=backend)
    torch.testing.assert_close(got.double(), q, atol=2e-6, rtol=0)
