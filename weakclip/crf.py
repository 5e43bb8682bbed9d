"""Dense CRF (Krähenbühl & Koltun, NIPS 2011) mean-field inference, two backends behind one interface.

* ``torch``: exact O(N^2) dense kernels, batched, on the input's device. On a GPU a 4096 x 4096 kernel per
  64 x 64 image is cheap, so the boundary-loss CRF runs where the model runs, with no host round trip.
* ``pydensecrf``: Krähenbühl's C++ code (permutohedral-lattice approximation of the same kernels), one image
  at a time on the CPU. Faster than the exact kernels on CPUs, and what the released code and the
  post-processing CRF use.

Both follow the reference ``DenseCRF::inference``: unary U = -log(max(P, 1e-5)) (``unary_from_softmax``),
Q0 = softmax(-U), then per iteration ``logits = -U + sum_m w_m * K~_m Q`` and ``Q = softmax(logits)``
(Potts compatibility: the library applies ``-w * K~Q`` and subtracts it). Kernels, in pixel and 0..255 RGB
units: Gaussian ``exp(-|p_i-p_j|^2 / 2 sxy^2)``, bilateral ``exp(-|p_i-p_j|^2 / 2 sxy^2 - |I_i-I_j|^2 /
2 srgb^2)``. Each kernel is normalised as the library's default NORMALIZE_SYMMETRIC:
``K~ = diag(n) K diag(n)`` with ``n_i = 1 / sqrt(sum_j k(i, j))``, the self term j = i included.
(Checked against the library: with a near-zero kernel width, where K~ = I, its result is softmax(-U + w Q).)
In the torch backend the Gaussian kernel is applied exactly but separably (K = K_y (x) K_x on the pixel
grid); the bilateral kernel is an explicit N x N matrix per image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import CRFConfig
from .errors import WeakclipError

BACKENDS = ("auto", "torch", "pydensecrf")

# Probabilities are clipped here before the log, as pydensecrf.utils.unary_from_softmax does.
UNARY_CLIP = 1e-5

# Kernel entries below this are set to exactly 0. Their total weight in a row is < N * 1e-15, far below
# float32 precision next to the self term 1, while keeping them would leave denormal floats, which make CPU
# matrix products ~10x slower.
KERNEL_FLOOR = 1e-15
_FLOOR_EXPONENT = -math.log(KERNEL_FLOOR)

# Bound on the bilateral-kernel memory of one group of images: a 64 x 64 image needs a 64 MiB N x N kernel,
# so a batch of 8 is one group on a GPU and groups of 4 on a (shared) CPU.
_KERNEL_BYTES = {"cpu": 256 * 2**20}
_KERNEL_BYTES_DEFAULT = 2 * 2**30


def _pydensecrf():
    """The compiled ``pydensecrf.densecrf`` module, or a one-line install hint."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise WeakclipError(
            'the pydensecrf CRF backend needs pydensecrf2: pip install "weakclip[crf]"'
        ) from None
    return dcrf


def pydensecrf_available() -> bool:
    try:
        _pydensecrf()
    except WeakclipError:
        return False
    return True


def resolve_crf_backend(name: str, device: torch.device | str) -> str:
    """The backend ``crf_refine`` uses for ``name`` on ``device``: ``"torch"`` or ``"pydensecrf"``.

    ``auto`` picks pydensecrf on CPUs (the lattice beats exact O(N^2) kernels there) when it is installed,
    and torch elsewhere (exact kernels are cheap on an accelerator and avoid a host round trip).
    """
    if name not in BACKENDS:
        raise WeakclipError(f"crf backend {name!r}: unknown (choose from {', '.join(BACKENDS)})")
    if name == "pydensecrf":
        _pydensecrf()  # fail now, with the install hint, rather than mid-training
        return name
    if name == "torch":
        return name
    return "pydensecrf" if torch.device(device).type == "cpu" and pydensecrf_available() else "torch"


def _check_inputs(probs: torch.Tensor, images: torch.Tensor, label_mask: torch.Tensor | None) -> None:
    if probs.dim() != 4:
        raise WeakclipError(f"crf: probabilities must be (B, K, H, W), got shape {tuple(probs.shape)}")
    b, k, h, w = probs.shape
    if tuple(images.shape) != (b, 3, h, w):
        raise WeakclipError(f"crf: images must be {(b, 3, h, w)} to match the probabilities, got "
                            f"{tuple(images.shape)}")
    if label_mask is not None:
        if tuple(label_mask.shape) != (b, k):
            raise WeakclipError(f"crf: label_mask must be {(b, k)}, got {tuple(label_mask.shape)}")
        if not bool(label_mask.any(dim=1).all()):
            raise WeakclipError("crf: label_mask leaves an image with no class to label")


def _gaussian_(sq_dist: torch.Tensor) -> torch.Tensor:
    """exp(-d^2 / 2) in place on squared distances, with values below ``KERNEL_FLOOR`` set to exactly 0."""
    sq_dist.clamp_max_(2 * _FLOOR_EXPONENT + 1).mul_(-0.5).exp_()
    return torch.nn.functional.threshold_(sq_dist, KERNEL_FLOOR, 0.0)


def _gaussian_1d(length: int, sxy: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(L, L) exp(-(a - b)^2 / 2 sxy^2) over pixel indices a, b along one axis."""
    idx = torch.arange(length, dtype=dtype, device=device)
    return _gaussian_(((idx[:, None] - idx[None, :]) / sxy) ** 2)


class _GaussianMessage:
    """w * K~ Q for the Gaussian kernel, which is separable on the pixel grid: K = K_y (x) K_x.

    Two small (H x H, W x W) products replace an N x N matrix; the row sums (the normalisers) factor too.
    """

    def __init__(self, h: int, w: int, params: CRFConfig, dtype: torch.dtype, device: torch.device):
        self.ky = _gaussian_1d(h, params.gauss_sxy, dtype, device)
        self.kx = _gaussian_1d(w, params.gauss_sxy, dtype, device)
        self.norm = torch.outer(self.ky.sum(1), self.kx.sum(1)).rsqrt()[:, :, None]  # (H, W, 1)
        self.weight = params.gauss_compat

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """(G, H, W, K) -> (G, H, W, K)."""
        t = q * self.norm
        t = torch.einsum("yv,gvwk->gywk", self.ky, t)
        t = torch.einsum("xw,gywk->gyxk", self.kx, t)
        return t * (self.norm * self.weight)


class _BilateralMessage:
    """w * K~ Q for the bilateral kernel of a group of images, from an exact (G, N, N) kernel matrix."""

    def __init__(self, images: torch.Tensor, params: CRFConfig, dtype: torch.dtype):
        g, _, h, w = images.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=images.device),
                                torch.arange(w, dtype=dtype, device=images.device), indexing="ij")
        pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1) / params.bilateral_sxy  # (N, 2)
        rgb = images.to(dtype).reshape(g, 3, h * w).transpose(1, 2) / params.bilateral_srgb  # (G, N, 3)
        feats = torch.cat([pos.expand(g, -1, -1), rgb], dim=2)
        # Direct differences rather than the |a|^2 + |b|^2 - 2ab expansion: colour features reach ~20
        # (255 / 13) and the expansion would lose ~1e-4 of the exponent to cancellation.
        kernel = torch.cdist(feats, feats, compute_mode="donot_use_mm_for_euclid_dist")
        self.kernel = _gaussian_(kernel.square_())  # (G, N, N), symmetric
        self.norm = self.kernel.sum(dim=2, keepdim=True).rsqrt()  # (G, N, 1); the sum includes k(i, i) = 1
        self.weight = params.bilateral_compat

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """(G, N, K) -> (G, N, K)."""
        return torch.bmm(self.kernel, q * self.norm) * (self.norm * self.weight)


def dense_crf_torch(
    probs: torch.Tensor,
    images: torch.Tensor,
    params: CRFConfig,
    label_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact dense-CRF mean field in PyTorch, batched, on ``probs.device``.

    Args:
        probs: (B, K, H, W) class probabilities (the unary is -log(max(P, 1e-5))).
        images: (B, 3, H, W) RGB, uint8 or float in 0..255.
        params: kernel widths, Potts weights and the number of mean-field iterations.
        label_mask: optional (B, K) bool; classes outside it get Q = 0 and send no messages.

    Returns:
        (B, K, H, W) marginals Q in ``probs.dtype``; computed in float64 for float64 input, else float32.
    """
    _check_inputs(probs, images, label_mask)
    b, k, h, w = probs.shape
    n = h * w
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    # Pixels-major layout (B, N, K): the bilateral message is then a plain (N x N) @ (N x K) product.
    neg_unary = probs.to(dtype).clamp_min(UNARY_CLIP).log().permute(0, 2, 3, 1).reshape(b, n, k)
    if label_mask is not None:
        # -inf logits give exactly zero probability, so excluded classes never enter K~Q either.
        excluded = ~label_mask.to(device=probs.device, dtype=torch.bool)
        neg_unary = neg_unary.masked_fill(excluded[:, None, :], float("-inf"))

    gaussian = None
    if params.iters > 0 and params.gauss_compat != 0:
        gaussian = _GaussianMessage(h, w, params, dtype, probs.device)
    use_bilateral = params.iters > 0 and params.bilateral_compat != 0
    # Images are processed in groups so that the (G, N, N) bilateral kernels stay within a memory budget.
    budget = _KERNEL_BYTES.get(probs.device.type, _KERNEL_BYTES_DEFAULT)
    group = max(1, budget // (n * n * torch.finfo(dtype).bits // 8))
    out = []
    for start in range(0, b, group):
        u = neg_unary[start:start + group]
        g = u.shape[0]
        bilateral = _BilateralMessage(images[start:start + group], params, dtype) if use_bilateral else None
        q = u.softmax(dim=2)
        for _ in range(params.iters if gaussian is not None or bilateral is not None else 0):
            logits = u
            if gaussian is not None:
                logits = logits + gaussian(q.reshape(g, h, w, k)).reshape(g, n, k)
            if bilateral is not None:
                logits = logits + bilateral(q)
            q = logits.softmax(dim=2)
        out.append(q)
        del bilateral
    return torch.cat(out).reshape(b, h, w, k).permute(0, 3, 1, 2).to(probs.dtype)


def dense_crf_pydensecrf(probs: np.ndarray, image: np.ndarray, params: CRFConfig) -> np.ndarray:
    """pydensecrf's DenseCRF2D on one image.

    Args:
        probs: (K, H, W) float class probabilities.
        image: (H, W, 3) uint8 RGB.
        params: kernel widths, Potts weights and the number of mean-field iterations.

    Returns:
        (K, H, W) float32 marginals Q.
    """
    dcrf = _pydensecrf()
    if probs.ndim != 3:
        raise WeakclipError(f"crf: probabilities must be (K, H, W), got shape {probs.shape}")
    k, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise WeakclipError(f"crf: image must be uint8 {(h, w, 3)}, got {image.dtype} {image.shape}")
    unary = -np.log(np.clip(probs.reshape(k, h * w), UNARY_CLIP, 1.0))
    crf = dcrf.DenseCRF2D(w, h, k)  # the library takes width first
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.require(image, np.uint8, ["C", "W"]), compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iters), dtype=np.float32).reshape(k, h, w)


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 or float 0..255 tensor -> (H, W, 3) uint8 C-contiguous array."""
    if image.dtype != torch.uint8:
        image = image.round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())


def crf_refine(
    probs: torch.Tensor,
    images: torch.Tensor,
    params: CRFConfig,
    backend: str = "auto",
    label_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense-CRF marginals for a batch, with the backend chosen by :func:`resolve_crf_backend`.

    Args:
        probs: (B, K, H, W) class probabilities.
        images: (B, 3, H, W) RGB, uint8 or float in 0..255 (the pydensecrf backend rounds floats to uint8).
        params: kernel widths, Potts weights and the number of mean-field iterations.
        backend: ``"auto"``, ``"torch"`` or ``"pydensecrf"``.
        label_mask: optional (B, K) bool; classes outside it get Q = 0 and take no part.

    Returns:
        (B, K, H, W) marginals Q on ``probs.device`` in ``probs.dtype``.
    """
    name = resolve_crf_backend(backend, probs.device)
    if name == "torch":
        return dense_crf_torch(probs, images, params, label_mask)
    _check_inputs(probs, images, label_mask)
    probs_np = probs.detach().to(device="cpu", dtype=torch.float32).numpy()
    mask_np = None if label_mask is None else label_mask.detach().to(device="cpu", dtype=torch.bool).numpy()
    out = np.zeros_like(probs_np)
    for i in range(probs_np.shape[0]):
        image = _to_uint8_hwc(images[i])
        if mask_np is None:
            out[i] = dense_crf_pydensecrf(probs_np[i], image, params)
        else:
            # Potts messages never mix classes, so a CRF over the kept classes alone is the same model.
            keep = np.flatnonzero(mask_np[i])
            out[i, keep] = dense_crf_pydensecrf(np.ascontiguousarray(probs_np[i, keep]), image, params)
    return torch.from_numpy(out).to(device=probs.device, dtype=probs.dtype)
