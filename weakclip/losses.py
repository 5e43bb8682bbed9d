"""WeakCLIP training losses: balanced seeding loss, dense-CRF boundary loss (KL) and the auxiliary CE.

Follows the released code (``FPNHeadDGCN.forward_train``, ``dgcnutils``): seeding and boundary losses on the
decoder output resized to ``cfg.size`` (64) squared, the auxiliary cross-entropy on score map / tau at the seed
resolution. One released bug is fixed: the auxiliary CE averages over the non-ignored pixels only. With
``released`` the released details are kept: the CE divides by all pixels, and the boundary CRF sees colours
made as the released numpy code made them (corner-aligned linear zoom of the normalised image, then
de-normalised and truncated to uint8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .clip import input_stats
from .config import LossConfig
from .crf import crf_refine
from .errors import WeakclipError

# Floors from the released code: the softmax gets +1e-7 before renormalising; the CRF input and output are
# clipped to 1e-4; seed counts to 1e-4 (so an image without seeds of a kind contributes 0).
PROB_EPS = 1e-7
CRF_CLIP = 1e-4
COUNT_FLOOR = 1e-4
RATIO_MIN, RATIO_MAX = 0.05, 20.0


def seed_cues(seeds: torch.Tensor, k: int, ignore_index: int = 255) -> torch.Tensor:
    """(B, h, w) seed labels -> (B, K, h, w) bool cues: one-hot, none where the seed is ``ignore_index`` or
    outside 0..K-1."""
    has_cue = (seeds != ignore_index) & (seeds >= 0) & (seeds < k)
    return F.one_hot(torch.where(has_cue, seeds, k), k + 1)[..., :k].permute(0, 3, 1, 2).bool()


def seeding_loss(probs: torch.Tensor, seeds: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Balanced seeding loss: background and pooled foreground cross-entropies, each averaged per image.

    Args:
        probs: (B, K, h, w) probabilities (softmax + 1e-7, renormalised).
        seeds: (B, h, w) long class indices; ``ignore_index`` (and any value outside 0..K-1) gives no cue.

    Returns:
        Scalar ``mean_b(bg_b) + mean_b(fg_b)`` with ``bg_b = -sum(log P_0 over background seeds) /
        max(#background seeds, 1e-4)`` and ``fg_b`` the same over all foreground seeds, pooled.
    """
    cues = seed_cues(seeds, probs.shape[1], ignore_index)
    has_cue = cues.any(dim=1)
    index = torch.where(has_cue, seeds, 0)[:, None]
    # log of the seed's probability; pixels without a cue read log(1) = 0 (no 0 * log 0 on padding).
    log_p = torch.where(has_cue, probs.gather(1, index)[:, 0], 1.0).log()
    bg = cues[:, 0]
    fg = cues[:, 1:].any(dim=1)

    def term(mask: torch.Tensor) -> torch.Tensor:
        total = -(log_p * mask).sum(dim=(1, 2))
        return (total / mask.sum(dim=(1, 2)).to(log_p.dtype).clamp_min(COUNT_FLOOR)).mean()

    return term(bg) + term(fg)


def boundary_loss(probs: torch.Tensor, crf_probs: torch.Tensor) -> torch.Tensor:
    """Constrain-to-boundary loss: KL(Q || P) with a clipped ratio, Q the dense-CRF target.

    Args:
        probs: (B, K, h, w) probabilities P (gradient flows into them).
        crf_probs: (B, K, h, w) CRF marginals Q; detached, clipped to >= 1e-4 and renormalised.

    Returns:
        Scalar mean over (b, h, w) of ``sum_c Q_c log(clamp(Q_c / P_c, 0.05, 20))``; the clamp passes zero
        gradient outside [0.05, 20], as the released hand-written clip did.
    """
    q = crf_probs.detach().to(probs.dtype).clamp_min(CRF_CLIP)
    q = q / q.sum(dim=1, keepdim=True)
    return (q * (q / probs).clamp(RATIO_MIN, RATIO_MAX).log()).sum(dim=1).mean()


def aux_logits(score_map: torch.Tensor, size: tuple[int, ...], tau: float) -> torch.Tensor:
    """score_map (B, K, h, w) -> logits (B, K, *size): score_map / tau, bilinear (align_corners false)."""
    return F.interpolate(score_map / tau, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def aux_accuracy(score_map: torch.Tensor, seeds: torch.Tensor, tau: float) -> torch.Tensor:
    """Percent of all seed pixels (ignored ones count as misses, as the released log) where the score
    map's argmax equals the seed: the released ``acc_seg`` of the identity head."""
    return (aux_logits(score_map.float(), seeds.shape[-2:], tau).argmax(1) == seeds).float().mean() * 100


def aux_ce_loss(
    score_map: torch.Tensor, seeds: torch.Tensor, tau: float = 0.07, ignore_index: int = 255,
    over_all_pixels: bool = False,
) -> torch.Tensor:
    """Cross-entropy of the text-pixel score map (DenseCLIP's identity head) against the seeds.

    Args:
        score_map: (B, K, h, w) cosine scores; logits are score_map / tau, bilinearly upsampled
            (align_corners=False) to the seeds' size.
        seeds: (B, H, W) long class indices, ``ignore_index`` for no label.

    Returns:
        Scalar mean over the non-ignored pixels (``over_all_pixels``: over all pixels, as released); 0, with
        the graph intact, when every pixel is ignored.
    """
    logits = aux_logits(score_map, seeds.shape[-2:], tau)
    total = F.cross_entropy(logits, seeds, ignore_index=ignore_index, reduction="sum")
    if over_all_pixels:
        return total / seeds.numel()
    return total / (seeds != ignore_index).sum().clamp_min(1)


def resize_seeds(seeds: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) long -> (B, size, size) long by nearest neighbour (PyTorch "nearest": index floor(i * H / size))."""
    small = F.interpolate(seeds[:, None].float(), size=(size, size), mode="nearest")
    return small[:, 0].long()


def downsample_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) uint8 (or float 0..255) -> (B, 3, size, size) uint8, the colours for the boundary CRF.

    Bilinear with align_corners=False, so each output pixel sits where the loss resizes the logits to, and no
    antialiasing, like the released ``scipy.ndimage.zoom(order=1)`` (which is corner-aligned instead).
    """
    small = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=False)
    return small.round_().clamp_(0, 255).to(torch.uint8)


def released_crf_colours(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) uint8, the boundary-CRF colours as the released code made them.

    The ImageNet-normalised float32 image is resized corner-aligned (``scipy.ndimage.zoom(order=1)``: computed
    in float64, stored as float32), de-normalised as x * std + mean in float32 and truncated, not rounded.
    """
    mean, std = (torch.tensor([v * 255 for v in s], device=images.device).view(1, 3, 1, 1)
                 for s in input_stats("imagenet"))
    norm = (images.float() - mean) / std
    small = F.interpolate(norm.double(), size=(size, size), mode="bilinear", align_corners=True).float()
    return (small * std + mean).clamp_(0, 255).trunc_().to(torch.uint8)


def weakclip_losses(
    logits: torch.Tensor,
    score_map: torch.Tensor,
    seeds: torch.Tensor,
    images: torch.Tensor,
    cfg: LossConfig,
    image_labels: torch.Tensor | None = None,
    released: bool = False,
    trace: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """All WeakCLIP training losses for one batch, in float32 whatever the input dtype.

    Args:
        logits: (B, K, H/4, W/4) decoder output.
        score_map: (B, K, h, w) text-pixel cosine scores at the backbone's dense stride (H/16 for ViT-B/16).
        seeds: (B, H, W) long seed labels, 255 for ignore and padding.
        images: (B, 3, H, W) uint8 RGB crops, un-normalised (padding 0).
        cfg: loss weights, tau, loss resolution and boundary-CRF settings.
        image_labels: optional (B, K) bool image-level labels; needed when ``cfg.crf_image_classes_only``,
            which restricts the boundary CRF to background (always kept) + these classes.
        released: the released code's auxiliary-CE denominator and CRF colours (``model.released``).
        trace: if given, receives the intermediates ``logits_small``, ``seeds_small``, ``probs``,
            ``crf_image``, ``crf_q`` (the CRF marginals before flooring) and ``cues`` (:func:`seed_cues`).

    Returns:
        ``{"seed", "boundary", "aux", "total", "aux_accuracy"}`` scalars: ``total`` = weighted sum of the
        first three; ``aux_accuracy`` (no gradient) is the score map's seed accuracy in percent.
    """
    b, k = logits.shape[:2]
    if seeds.shape != (b, *images.shape[-2:]) or images.shape[:2] != (b, 3):
        raise WeakclipError(f"losses: seeds {tuple(seeds.shape)} and images {tuple(images.shape)} do not "
                            f"match logits {tuple(logits.shape)} as (B, H, W) and (B, 3, H, W)")
    size = cfg.size
    logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    probs = logits.softmax(dim=1) + PROB_EPS
    probs = probs / probs.sum(dim=1, keepdim=True)
    small_seeds = resize_seeds(seeds, size)

    label_mask = None
    if cfg.crf_image_classes_only:
        if image_labels is None:
            raise WeakclipError("loss.crf_image_classes_only is true but no image-level labels were given")
        if tuple(image_labels.shape) != (b, k):
            raise WeakclipError(f"losses: image_labels must be {(b, k)}, got {tuple(image_labels.shape)}")
        label_mask = image_labels.to(device=probs.device, dtype=torch.bool).clone()
        label_mask[:, 0] = True
    with torch.no_grad():
        colours = released_crf_colours(images, size) if released else downsample_images(images, size)
        target = crf_refine(probs.detach().clamp_min(CRF_CLIP), colours, cfg.crf, cfg.crf_backend, label_mask)
    if trace is not None:
        trace.update(logits_small=logits, seeds_small=small_seeds, probs=probs, crf_image=colours, crf_q=target,
                     cues=seed_cues(small_seeds, k))

    losses = {
        "seed": seeding_loss(probs, small_seeds),
        "boundary": boundary_loss(probs, target),
        "aux": aux_ce_loss(score_map.float(), seeds, cfg.tau, over_all_pixels=released),
    }
    accuracy = aux_accuracy(score_map, seeds, cfg.tau)
    losses["total"] = (cfg.seed_weight * losses["seed"] + cfg.boundary_weight * losses["boundary"]
                       + cfg.aux_weight * losses["aux"])
    losses["aux_accuracy"] = accuracy  # logged, not optimised
    return losses
