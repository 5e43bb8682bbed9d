"""Inference shared by pseudo masks, validation during training and predictions of retrained segmenters:
multi-scale x flip views, sliding windows, probabilities averaged over views, the Eq. 14 label filter, and
the dense CRF in a pool of worker processes that runs while the next images are inferred.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .config import Config, CRFConfig, InferConfig
from .crf import dense_crf_pydensecrf
from .data.datasets import Sample, load_image
from .data.masks import write_mask
from .errors import WeakclipError
from .fileio import atomic_path, write_text_atomic

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
def slide_logits(predict: Predictor, images: Tensor, crop: int, stride: int) -> Tensor:
    """images (B, 3, H, W) uint8 -> logits (B, K, H, W) averaged over crop x crop windows with ``stride``.

    An image smaller than the crop along a side is processed at its own size there (no padding).
    """
    _, _, h, w = images.shape
    total = count = None
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            win = images[:, :, y : y + crop, x : x + crop]
            logits = predict(win).float()
            logits = F.interpolate(logits, size=win.shape[2:], mode="bilinear", align_corners=False)
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], h, w)
                count = logits.new_zeros(1, 1, h, w)
            total[:, :, y : y + crop, x : x + crop] += logits
            count[:, :, y : y + crop, x : x + crop] += 1
    return total / count


@torch.no_grad()
def multiscale_probs(predict: Predictor, image: np.ndarray, icfg: InferConfig, device: torch.device,
                     scales: Sequence[float] | None = None, flip: bool | None = None) -> Tensor:
    """image (H, W, 3) uint8 -> class probabilities (K, H, W) float32 on ``device``.

    Per view (scale x flip): sliding-window logits, resized to (H, W), softmax, un-flipped; the views'
    probabilities are averaged.
    """
    scales = icfg.scales if scales is None else scales
    flip = icfg.flip if flip is None else flip
    h, w = image.shape[:2]
    src = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].to(device).float()
    total, views = None, 0
    for s in scales:
        vh, vw = view_size(h, w, icfg.short_side, s)
        x = F.interpolate(src, size=(vh, vw), mode="bilinear", align_corners=False, antialias=vh < h)
        x = x.round().clamp(0, 255).to(torch.uint8)
        batch = torch.cat([x, x.flip(-1)]) if flip else x  # both flips in one batch
        logits = slide_logits(predict, batch, icfg.crop_size, icfg.stride)
        probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
        if flip:
            probs = torch.cat([probs[:1], probs[1:].flip(-1)])
        total = probs.sum(0) if total is None else total + probs.sum(0)
        views += probs.shape[0]
    return total / views


def label_filter(probs: Tensor, labels: Sequence[int] | None, ignore_index: int = 255
                 ) -> tuple[list[int], Tensor]:
    """Classes the CRF keeps and the pixels Eq. 14 marks unknown, for probs (K, H, W).

    With image-level ``labels`` (foreground indices): keys = background + labels, and pixels whose best
    class over all K is outside them are marked (they become ``ignore_index``). Without labels (test time,
    or the filter switched off): keys = the classes present in the argmax, nothing marked (released code).
    """
    best = probs.argmax(0)
    if labels is None:
        return sorted(int(c) for c in best.unique()), torch.zeros_like(best, dtype=torch.bool)
    keys = sorted({0, *(int(c) for c in labels)})
    allowed = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    allowed[keys] = True
    return keys, ~allowed[best]


def _finish(job: tuple) -> str:
    """Worker: CRF over the kept classes, label map, Eq. 14 marks, atomic PNG. Returns the image id."""
    sample_id, probs, keys, image, unknown, out_path, crf_params, ignore_index = job
    if crf_params is not None and len(keys) > 1:
        probs = dense_crf_pydensecrf(probs, image, crf_params)
    label = np.asarray(keys, dtype=np.uint8)[probs.argmax(0)]
    label[unknown] = ignore_index
    write_mask(out_path, label)
    return sample_id


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_matches(out_dir: Path, manifest: dict) -> bool:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == manifest
    except json.JSONDecodeError:
        return False


def write_label_maps(
    predict: Predictor,
    samples: Sequence[Sample],
    out_dir: str | Path,
    icfg: InferConfig,
    device: torch.device,
    fingerprint: dict,
    use_labels: bool,
    crf_params: CRFConfig | None,
    save_probs: bool = False,
    ignore_index: int = 255,
    progress: bool = True,
    desc: str = "infer",
) -> dict:
    """Write one palette PNG per sample into ``out_dir``; resumable and never stale.

    ``fingerprint`` (checkpoint hash and every setting that changes the output) is stored in
    ``manifest.json``: a rerun with the same fingerprint skips finished images; any difference clears the
    folder's old outputs first. CRFs run in ``icfg.crf_workers`` processes while the model infers the
    next images, so full-resolution probabilities never touch the disk (``save_probs`` keeps float16
    copies at ``icfg.save_probs_size`` short side in ``probs/``).
    """
    out_dir = Path(out_dir)
    manifest = {"format": 1, **fingerprint, "label_filter": use_labels, "crf": crf_params is not None}
    if not _manifest_matches(out_dir, manifest):
        for stale in (*out_dir.glob("*.png"), out_dir / "probs"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    todo = [s for s in samples if not (out_dir / f"{s.id}.png").is_file()]
    skipped = len(samples) - len(todo)
    pool = None
    if crf_params is not None and icfg.crf_workers > 0 and todo:
        pool = mp.get_context("spawn").Pool(icfg.crf_workers, initializer=_ignore_sigint)
    pending: list = []
    bar = tqdm(total=len(samples), initial=skipped, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for sample in todo:
            image = load_image(sample.image)
            probs = multiscale_probs(predict, image, icfg, device)
            keys, unknown = label_filter(probs, sample.labels if use_labels else None)
            kept = probs[keys]
            kept = (kept / kept.sum(0, keepdim=True).clamp_min(1e-12)).cpu().numpy().astype(np.float32)
            if save_probs:
                _save_probs(out_dir / "probs" / f"{sample.id}.npz", probs, icfg.save_probs_size)
            job = (sample.id, kept, keys, image, unknown.cpu().numpy(), out_dir / f"{sample.id}.png",
                   crf_params, ignore_index)
            if pool is None:
                _finish(job)
                bar.update(1)
                continue
            pending.append(pool.apply_async(_finish, (job,)))
            while len(pending) > 2 * icfg.crf_workers or (pending and pending[0].ready()):
                pending.pop(0).get()
                bar.update(1)
        for result in pending:
            result.get()
            bar.update(1)
    except KeyboardInterrupt:
        for result in pending:  # keep what was inferred: its CRF takes a moment, redoing it takes longer
            result.wait(timeout=60)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return {"written": len(todo), "skipped": skipped, "output": str(out_dir)}


def _save_probs(path: Path, probs: Tensor, short: int) -> None:
    h, w = probs.shape[1:]
    r = min(1.0, short / min(h, w))
    small = F.interpolate(probs[None], size=(max(1, round(h * r)), max(1, round(w * r))), mode="bilinear",
                          align_corners=False)[0]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probs=small.cpu().numpy().astype(np.float16))


def inference_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def refiner_predictor(model: torch.nn.Module, device: torch.device) -> Predictor:
    """A WeakCLIP model as a Predictor (bf16 autocast on GPUs)."""
    model.to(device).eval()

    def predict(images: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(images)["logits"]

    return predict


def load_refiner(cfg: Config, checkpoint: str | Path) -> torch.nn.Module:
    """Build the WeakCLIP model of ``cfg`` and load a weights file written by ``weakclip train``."""
    from .engine import load_weights
    from .model import build_model

    if not Path(checkpoint).is_file():
        raise WeakclipError(f"{checkpoint}: checkpoint not found")
    model = build_model(cfg.model, cfg.data.class_names)
    load_weights(checkpoint, model)
    return model


def inference_fingerprint(cfg: Config, checkpoint: str | Path, split: str) -> dict:
    """Everything that changes a label map: the checkpoint's bytes, the classes and the inference settings."""
    infer = {k: v for k, v in cfg.infer.__dict__.items() if k not in ("crf_workers", "save_probs_size")}
    return {"checkpoint_sha256": file_sha256(checkpoint), "split": split, "classes": cfg.data.class_names,
            "data_root": str(Path(cfg.data.root).resolve()),
            "infer": json.loads(json.dumps(infer, default=lambda o: o.__dict__))}


def validator(cfg: Config, info) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Single-scale, no-flip, no-CRF mIoU on ``cfg.data.val_split`` (each rank scores its share)."""
    from .data.datasets import list_samples
    from .distributed import all_reduce_sum
    from .metrics import ConfusionMeter

    samples = list_samples(cfg.data, cfg.data.val_split, need_seeds=False, need_gt=True)
    mine = samples[info.rank :: info.world_size]

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
