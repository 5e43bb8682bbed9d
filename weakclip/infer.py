"""Inference shared by pseudo masks, validation during training and predictions of retrained segmenters:
multi-scale x flip views, sliding windows batched across views, probabilities averaged over views, the
Eq. 14 label filter, the CRF's input and the written label map; and loading a refiner checkpoint as a
predictor. The dataset-scale runner (output folders, worker pool, sharding) is :mod:`weakclip.jobs`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoints import load_refiner
from .config import Config, CRFConfig, InferConfig
from .crf import dense_crf_pydensecrf
from .data.datasets import load_image
from .distributed import DistInfo, all_reduce_sum, launch_share
from .errors import WeakclipError
from .precision import HALF, compute_dtype, warn_if_slow

# images (B, 3, h, w) uint8 RGB -> logits (B, K, h', w') at any resolution (resized to the window here).
Predictor = Callable[[Tensor], Tensor]



def view_size(h: int, w: int, short_side: int, scale: float) -> tuple[int, int]:
    """Keep-ratio resize that fits (4 * short, short) * scale, as the released test pipeline (2048, 512)."""
    ratio = min(short_side * scale / min(h, w), 4 * short_side * scale / max(h, w))
    return max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one side: ceil((L - crop) / stride) + 1 windows, the last one ending at L."""
    if length <= crop:
        return [0]
    n = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(n)]


@torch.no_grad()
def sliding_logits(predict: Predictor, views: Sequence[Tensor], crop: int, stride: int, batch_size: int
                   ) -> Iterator[tuple[int, Tensor]]:
    """Logits of each view averaged over its crop x crop windows with ``stride``, the windows of all views
    run through ``predict`` in batches of up to ``batch_size`` windows of the same size.

    views: (3, h_i, w_i) uint8 each. Yields (view index, logits (K, h_i, w_i) float32) as each view's last
    window is done, so only the views with windows in flight hold an accumulator. A view smaller than the
    crop along a side is processed at its own size there (no padding). Every window of a view has the same
    size, so a batch mixes views of equal window size (the flips of a scale, the scales above the crop).
    """
    if batch_size < 1:
        raise WeakclipError(f"infer.batch_size: expected a positive integer, got {batch_size}")
    pending: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # window size -> (view, y, x)
    left = [0] * len(views)
    sums: dict[int, tuple[Tensor, Tensor]] = {}  # view -> (logit sum, window count)

    def run(batch: list[tuple[int, int, int]]) -> Iterator[tuple[int, Tensor]]:
        wh, ww = views[batch[0][0]].shape[1:]
        wh, ww = min(wh, crop), min(ww, crop)
        wins = torch.stack([views[v][:, y : y + wh, x : x + ww] for v, y, x in batch])
        logits = F.interpolate(predict(wins).float(), size=(wh, ww), mode="bilinear", align_corners=False)
        for (v, y, x), win_logits in zip(batch, logits):
            if v not in sums:
                h, w = views[v].shape[1:]
                sums[v] = (win_logits.new_zeros(win_logits.shape[0], h, w), win_logits.new_zeros(1, h, w))
            total, count = sums[v]
            total[:, y : y + wh, x : x + ww] += win_logits
            count[:, y : y + wh, x : x + ww] += 1
            left[v] -= 1
            if left[v] == 0:
                total, count = sums.pop(v)
                yield v, total / count

    for v, view in enumerate(views):
        h, w = view.shape[1:]
        size = (min(h, crop), min(w, crop))
        windows = [(y, x) for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]
        left[v] = len(windows)  # before any of them runs: a view is done when this reaches 0
        for y, x in windows:
            pending.setdefault(size, []).append((v, y, x))
            if len(pending[size]) == batch_size:
                yield from run(pending.pop(size))
    for batch in pending.values():
        yield from run(batch)


def _view_probs(predict: Predictor, views: Sequence[Tensor], flipped: Sequence[bool], size: tuple[int, int],
                crop: int, stride: int, batch_size: int) -> Iterator[tuple[int, Tensor]]:
    """(view index, probabilities (K, H, W) at ``size``) as each view's windows finish: sliding-window
    logits, bilinearly resized to ``size``, softmax, flipped back where ``flipped``."""
    for v, logits in sliding_logits(predict, views, crop, stride, batch_size):
        probs = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].softmax(0)
        yield v, probs.flip(-1) if flipped[v] else probs


@torch.no_grad()
def view_probs(predict: Predictor, views: Sequence[Tensor], flipped: Sequence[bool], size: tuple[int, int],
               crop: int, stride: int, batch_size: int = 1) -> Tensor:
    """Views (3, h_i, w_i) of one image -> their probabilities (N, K, H, W) at the image's ``size``, kept per
    view (what :func:`multiscale_probs` averages)."""
    out = dict(_view_probs(predict, views, flipped, size, crop, stride, batch_size))
    return torch.stack([out[v] for v in range(len(views))])


def resize_view(image: np.ndarray, size: tuple[int, int], method: str, device: torch.device) -> Tensor:
    """image (H, W, 3) uint8 -> (1, 3, h, w) uint8 on ``device``, for ``method`` "torch" or "cv2".

    "torch": bilinear, antialiased when shrinking, rounded. "cv2": OpenCV's bilinear on uint8, as the released
    test pipeline (mmcv ``imrescale``) resizes, so its views are bit-identical to the released ones.
    """
    h, w = size
    if method == "cv2":
        try:
            import cv2
        except ImportError:
            raise WeakclipError('infer.view_resize cv2 needs OpenCV: pip install "weakclip[released]"') from None
        out = cv2.resize(np.ascontiguousarray(image, dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(out).permute(2, 0, 1)[None].to(device)
    if method not in ("torch", "auto"):
        raise WeakclipError(f"infer.view_resize: expected auto, torch or cv2, got '{method}'")
    src = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].to(device).float()
    x = F.interpolate(src, size=size, mode="bilinear", align_corners=False, antialias=h < image.shape[0])
    return x.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def multiscale_probs(predict: Predictor, image: np.ndarray, icfg: InferConfig, device: torch.device,
                     scales: Sequence[float] | None = None, flip: bool | None = None,
                     batch_size: int | None = None) -> Tensor:
    """image (H, W, 3) uint8 -> class probabilities (K, H, W) float32 on ``device``.

    Per view (scale x flip, resized by ``icfg.view_resize``): sliding-window logits, resized to (H, W),
    softmax, un-flipped; the views' probabilities are averaged. Windows go through the network
    ``batch_size`` at a time (default :func:`window_batch_size`), across views; the result equals the
    one-window-at-a-time result up to float rounding.
    """
    scales = icfg.scales if scales is None else scales
    flip = icfg.flip if flip is None else flip
    batch_size = batch_size or window_batch_size(icfg, device)
    h, w = image.shape[:2]
    views, flipped = [], []
    for s in scales:
        x = resize_view(image, view_size(h, w, icfg.short_side, s), icfg.view_resize, device)[0]
        views += [x, x.flip(-1)] if flip else [x]
        flipped += [False, True] if flip else [False]
    total = None
    for _, probs in _view_probs(predict, views, flipped, (h, w), icfg.crop_size, icfg.stride, batch_size):
        total = probs if total is None else total + probs
    return total / len(views)


# Windows per network call. On CPUs 8 were no faster than 2 (benchmarks/precision.py, ViT-B/16, 512 windows)
# while each window holds its activations: 2 keep the fp32 image near 2 GB instead of 3. On GPUs, as many as
# fit in half the free memory at WINDOW_GPU_BYTES per crop_size^2 window (a budget with margin), up to 16.
CPU_WINDOWS = 2
MAX_GPU_WINDOWS = 16
WINDOW_GPU_BYTES = 1 << 30


def window_batch_size(icfg: InferConfig, device: torch.device) -> int:
    """``icfg.batch_size`` when set, else the device's default: :data:`CPU_WINDOWS` on CPUs; on a CUDA GPU
    the windows that fit in half its free memory, 1 to :data:`MAX_GPU_WINDOWS`."""
    if icfg.batch_size is not None:
        return icfg.batch_size
    if device.type != "cuda":
        return CPU_WINDOWS
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    per_window = WINDOW_GPU_BYTES * (icfg.crop_size / 512) ** 2
    return max(1, min(MAX_GPU_WINDOWS, int(free / 2 // per_window)))


def label_filter(probs: Tensor, labels: Sequence[int] | None, ignore_index: int = 255, live: int | None = None
                 ) -> tuple[list[int], Tensor]:
    """Classes the CRF keeps and the pixels Eq. 14 marks unknown, for probs (K, H, W).

    With image-level ``labels`` (foreground indices): keys = background + labels, and pixels whose best
    class over all K is outside them are marked (they become ``ignore_index``). Without labels (test time,
    or the filter switched off): keys = the classes present in the argmax, nothing marked (released code).
    ``live``: only classes 0..live-1 are the config's; the others (a checkpoint's classes the config does
    not list, e.g. the 10 dead slots of a released COCO checkpoint) are never kept, and pixels they win are
    marked too.
    """
    best = probs.argmax(0)
    live = probs.shape[0] if live is None else live
    if labels is None:
        keys = sorted(int(c) for c in best.unique() if c < live) or [0]
        return keys, best >= live
    keys = sorted({0, *(int(c) for c in labels)})
    allowed = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    allowed[keys] = True
    return keys, ~allowed[best]


def crf_inputs(probs: Tensor, labels: Sequence[int] | None, live: int | None = None
               ) -> tuple[Tensor, list[int], Tensor]:
    """probs (K, H, W) -> the CRF's input (len(keys), H, W): the kept classes of :func:`label_filter`,
    renormalised to sum to 1 per pixel; with the kept class indices and the (H, W) Eq. 14 marks."""
    keys, unknown = label_filter(probs, labels, live=live)
    kept = probs[keys]
    return kept / kept.sum(0, keepdim=True).clamp_min(1e-12), keys, unknown


def finish_label_map(kept: np.ndarray, keys: Sequence[int], image: np.ndarray, unknown: np.ndarray,
                     crf_params: CRFConfig | None, ignore_index: int = 255, trace: dict | None = None
                     ) -> np.ndarray:
    """The written label map (H, W) uint8: dense CRF over the kept classes (when ``crf_params`` and more
    than one class), argmax mapped to class indices, ``ignore_index`` at the Eq. 14 marks.

    kept: (len(keys), H, W) float32 from :func:`crf_inputs`; image: (H, W, 3) uint8 RGB; ``trace`` receives
    the CRF marginals as ``crf_q``.
    """
    if crf_params is not None and len(keys) > 1:
        kept = dense_crf_pydensecrf(kept, image, crf_params)
    if trace is not None:
        trace["crf_q"] = kept
    label = np.asarray(keys, dtype=np.uint8)[kept.argmax(0)]
    label[unknown] = ignore_index
    return label


# ------------------------------------------------------------------------------------------- models


def refiner_predictor(model: torch.nn.Module, device: torch.device, precision: str | None = None) -> Predictor:
    """A WeakCLIP model as a Predictor at ``precision``: "fp32" (as released) or "bf16", which casts the frozen
    CLIP towers once (``model.set_compute_dtype``) and runs the trainable modules under bf16 autocast; None
    keeps the model's own ``compute_dtype``. bf16 where the device has no native bf16 runs, with a warning.
    The class embeddings, which do not depend on the image, are computed at the first call and reused for
    every later window."""
    if precision is not None:
        model.set_compute_dtype(compute_dtype(precision, "infer.precision", ("fp32", "bf16")))
    model.to(device).eval()
    dtype = model.compute_dtype
    half = dtype in HALF
    if half:
        warn_if_slow(dtype, device, "infer.precision")
    text: list[Tensor] = []

    def predict(images: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype if half else torch.bfloat16, enabled=half):
            if not text:
                text.append(model.class_embeddings())
            return model(images, text=text[0])["logits"]

    return predict


def refiner_infer_config(icfg: InferConfig, model: torch.nn.Module) -> InferConfig:
    """``icfg`` with ``view_resize`` "auto" resolved for ``model``: cv2 for a released-mode refiner, else torch."""
    if icfg.view_resize != "auto":
        return icfg
    released = bool(getattr(getattr(model, "cfg", None), "released", False))
    return dataclasses.replace(icfg, view_resize="cv2" if released else "torch")


def refiner_from_checkpoint(cfg: Config, checkpoint: str | Path, device: torch.device
                            ) -> tuple[Predictor, torch.nn.Module, Config]:
    """The refiner of ``checkpoint`` as a Predictor at ``infer.precision``, its model, and the config that
    describes it (:func:`weakclip.checkpoints.load_refiner`: the model's classes, the config's first, and
    ``infer.view_resize`` "auto" resolved for it). ``cfg`` is not changed."""
    model, used = load_refiner(checkpoint, cfg)
    used = dataclasses.replace(used, infer=refiner_infer_config(used.infer, model))
    return refiner_predictor(model, device, used.infer.precision), model, used


def validator(cfg: Config, info: DistInfo) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """Single-scale, no-flip, no-CRF mIoU against the ground truth of ``cfg.data.val_split`` (each rank
    scores its share), after a preflight of those files. None, with a note, when the split or its ground
    truth is absent; images without ground truth are left out, with a note."""
    from .data.datasets import list_samples, preflight
    from .errors import warn
    from .metrics import ConfusionMeter

    note = warn if info.is_main else (lambda message: None)
    try:
        samples = list_samples(cfg.data, cfg.data.val_split, need_seeds=False, need_gt=True, need_labels=False)
    except WeakclipError as exc:
        note(f"validation skipped: {exc}")
        return None
    with_gt = [s for s in samples if s.gt.is_file()]
    if not with_gt:
        note(f"validation skipped: no ground truth for the {cfg.data.val_split} split in {samples[0].gt.parent}")
        return None
    if len(with_gt) < len(samples):
        note(f"validation on {len(with_gt)} of {len(samples)} {cfg.data.val_split} images: the others have no "
             f"ground truth in {with_gt[0].gt.parent}")
    samples = with_gt
    preflight(samples, cfg.num_classes, cfg.data.ignore_index, progress=info.is_main)
    mine = launch_share(info).take(samples)

    def validate(model: torch.nn.Module) -> dict[str, float]:
        predict = refiner_predictor(model, info.device)
        meter = ConfusionMeter(cfg.num_classes, cfg.data.ignore_index)
        for sample in mine:
            probs = multiscale_probs(predict, load_image(sample.image), cfg.infer, info.device, [1.0], False)
            meter.update(probs.argmax(0).cpu().numpy().astype(np.uint8), sample.load_gt())
        counts = all_reduce_sum(torch.from_numpy(meter.counts).to(info.device), info).cpu().numpy()
        total = ConfusionMeter(cfg.num_classes, cfg.data.ignore_index)
        total.add(counts, num_images=len(samples))
        return {"miou": total.result(cfg.data.class_names).miou}

    return validate
