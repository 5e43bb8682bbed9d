"""Inference shared by pseudo masks, validation during training and predictions of retrained segmenters:
multi-scale x flip views, sliding windows batched across views, probabilities averaged over views, the
Eq. 14 label filter, and the dense CRF in a pool of worker processes fed through a bounded queue while the
next images are inferred.

:func:`write_label_maps` runs at dataset scale: under ``torchrun`` every rank takes its share of the images
on the GPU of its ``LOCAL_RANK``, independent jobs take theirs with a :class:`~weakclip.distributed.Shard`,
and all of them fill one resumable, never-stale output folder whose manifest does not depend on who
wrote which image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .clip import RANDOM_CLIP_SEED, weights_file
from .config import ClipConfig, Config, CRFConfig, InferConfig, ModelConfig
from .crf import dense_crf_pydensecrf
from .data.datasets import Sample, labels_source, load_image
from .data.masks import write_mask
from .distributed import (
    DistInfo,
    Shard,
    all_reduce_sum,
    available_cores,
    init_distributed,
    launch_share,
    run_once,
)
from .errors import WeakclipError
from .fileio import atomic_path, reset_if_stale, write_text_atomic
from .precision import HALF, compute_dtype, warn_if_slow

# images (B, 3, h, w) uint8 RGB -> logits (B, K, h', w') at any resolution (resized to the window here).
Predictor = Callable[[Tensor], Tensor]

# Collectives of an inference launch wait for the slowest rank's last images: far longer than training's.
INFERENCE_TIMEOUT = timedelta(hours=12)
SUMMARY = "summary.json"
# A temporary file this old cannot belong to a live writer (one PNG or .npz takes well under a second).
_ORPHAN_TMP_S = 600


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


def crf_inputs(probs: Tensor, labels: Sequence[int] | None) -> tuple[Tensor, list[int], Tensor]:
    """probs (K, H, W) -> the CRF's input (len(keys), H, W): the kept classes of :func:`label_filter`,
    renormalised to sum to 1 per pixel; with the kept class indices and the (H, W) Eq. 14 marks."""
    keys, unknown = label_filter(probs, labels)
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


# -------------------------------------------------------------------------------------------- CRF pool


def _finish(job: tuple) -> str:
    """Worker: CRF over the kept classes, label map, Eq. 14 marks, atomic PNG. Returns the image id."""
    sample_id, probs, keys, image, unknown, out_path, crf_params, ignore_index = job
    write_mask(out_path, finish_label_map(probs, keys, image, unknown, crf_params, ignore_index))
    return sample_id


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def crf_worker_count(icfg: InferConfig) -> int:
    """``icfg.crf_workers``, or when null the cores available to this process but one (the one that feeds
    the network), at least 1."""
    if icfg.crf_workers is not None:
        if icfg.crf_workers < 0:
            raise WeakclipError(f"infer.crf_workers: expected 0 or more (or null: auto), got {icfg.crf_workers}")
        return icfg.crf_workers
    return max(1, available_cores() - 1)


class CRFPool:
    """Finishes images (CRF, label map, PNG) in ``workers`` processes through a bounded queue.

    :meth:`submit` returns at once while fewer than ``capacity`` jobs are in flight and otherwise waits
    for the oldest: back-pressure keeps at most ``capacity`` images' probabilities in memory, and the
    caller runs the network on the next image while the workers run CRFs. ``workers=0`` finishes each job
    in the calling process. ``finish`` (a module-level function, so workers can import it) does the work.
    """

    def __init__(self, workers: int, capacity: int | None = None, finish: Callable[[tuple], str] = _finish):
        self.finish = finish
        self.capacity = capacity or 2 * workers
        self.pending: deque = deque()
        self.pool = mp.get_context("spawn").Pool(workers, initializer=_ignore_sigint) if workers > 0 else None

    def submit(self, job: tuple) -> list[str]:
        """Queue one job; returns the ids of the images finished meanwhile (in submission order)."""
        if self.pool is None:
            return [self.finish(job)]
        self.pending.append(self.pool.apply_async(self.finish, (job,)))
        done = []
        while len(self.pending) > self.capacity or (self.pending and self.pending[0].ready()):
            done.append(self.pending.popleft().get())
        return done

    def drain(self) -> Iterator[str]:
        """Ids of the remaining images as they finish."""
        while self.pending:
            yield self.pending.popleft().get()

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the workers, first giving the jobs in flight up to ``wait_s`` seconds to finish."""
        deadline = time.monotonic() + wait_s
        for result in self.pending:
            result.wait(timeout=max(0.0, deadline - time.monotonic()))
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (Slurm's time limit, torchrun stopping a launch) stops like Ctrl-C: files in flight finish."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def finish_jobs(jobs: Iterable[tuple], total: int, workers: int, finish: Callable[[tuple], str], info: DistInfo,
                desc: str, progress: bool = True) -> None:
    """``finish`` every job of ``jobs`` in a :class:`CRFPool` of ``workers`` processes while the generator
    makes the next ones (the network's part), with a progress bar of ``total`` on the main process. Ctrl-C
    or SIGTERM (a scheduler's time limit) gives the jobs in flight up to 60 s before stopping: their CRF
    takes a moment, redoing their network part takes longer."""
    pool = CRFPool(workers if total else 0, finish=finish)
    bar = tqdm(total=total, desc=desc if info.world_size == 1 else f"{desc} (rank 0 of {info.world_size})",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    try:
        with _sigterm_as_interrupt():
            for job in jobs:
                bar.update(len(pool.submit(job)))
            for _ in pool.drain():
                bar.update(1)
    except KeyboardInterrupt:
        pool.close(wait_s=60)
        raise
    finally:
        bar.close()
        pool.close()


# ------------------------------------------------------------------------------------ output folder


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_orphans(out_dir: Path, older_than: float) -> None:
    """Temporary files (``.<name>.*.tmp.*``) left by killed writers, last written before ``older_than``."""
    for sub in (out_dir, out_dir / "probs"):
        for tmp in sub.glob(".*.tmp.*"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < older_than:
                    tmp.unlink()


def _is_done(out_dir: Path, sample_id: str, save_probs: bool) -> bool:
    return (out_dir / f"{sample_id}.png").is_file() and (
        not save_probs or (out_dir / "probs" / f"{sample_id}.npz").is_file())


def _prepare_folder(out_dir: Path, manifest: dict, samples: Sequence[Sample], probs_size: int | None
                    ) -> list[int]:
    """Reset the folder when its manifest differs (``probs/`` alone when only ``probs_size`` does), check
    that the images to do exist; returns their indices in ``samples``."""
    reset_if_stale(out_dir, manifest, ("*.png", "probs", SUMMARY))
    if probs_size is not None and reset_if_stale(out_dir / "probs", {"save_probs_size": probs_size}, ("*.npz",)):
        (out_dir / SUMMARY).unlink(missing_ok=True)
    _remove_orphans(out_dir, time.time() - _ORPHAN_TMP_S)
    save_probs = probs_size is not None
    with ThreadPoolExecutor(8) as pool:  # stat calls on a network file system wait on the server
        done = list(pool.map(lambda s: _is_done(out_dir, s.id, save_probs), samples))
        todo = [i for i, d in enumerate(done) if not d]
        exists = list(pool.map(lambda i: samples[i].image.is_file(), todo))
    missing = [samples[i].image for i, ok in zip(todo, exists) if not ok]
    if missing:
        raise WeakclipError(f"{missing[0]}: image not found ({len(missing)} of the listed images are missing)")
    return todo


def _prefetch(load: Callable[[Sample], np.ndarray], samples: Sequence[Sample], ahead: int = 2
              ) -> Iterator[tuple[Sample, np.ndarray]]:
    """(sample, load(sample)) in order, decoding the next images in a thread while the caller works."""
    with ThreadPoolExecutor(1) as pool:
        queue: deque = deque()
        for sample in samples:
            queue.append((sample, pool.submit(load, sample)))
            if len(queue) > ahead:
                first, future = queue.popleft()
                yield first, future.result()
        while queue:
            first, future = queue.popleft()
            yield first, future.result()


def write_label_maps(
    predict: Predictor,
    samples: Sequence[Sample],
    out_dir: str | Path,
    icfg: InferConfig,
    info: DistInfo,
    fingerprint: dict,
    use_labels: bool,
    crf_params: CRFConfig | None,
    save_probs: bool = False,
    ignore_index: int = 255,
    progress: bool = True,
    desc: str = "infer",
    shard: Shard | None = None,
) -> dict:
    """Write one palette PNG per sample into ``out_dir``: resumable, never stale, shardable.

    Every process of a launch (``info``) calls this with the same ``samples``; an independent job of a
    job array passes its ``shard``. The job's share (``shard.take(samples)``) minus the images already
    done is split between the ranks, so any mix of launches and shards fills the folder, and a rerun
    with another process count does only what is missing.

    ``fingerprint`` (checkpoint hash and every setting that changes the output, never the list or the
    share) is stored in ``manifest.json``: a folder with another manifest is cleared first. CRFs run in
    :func:`crf_worker_count` processes (:class:`CRFPool`) while the network infers the next images, so
    full-resolution probabilities never touch the disk; ``save_probs`` keeps, in ``probs/<id>.npz``, the
    CRF's input (background + the image's classes, or the classes present without a label filter) as
    float16 at ``icfg.save_probs_size`` short side, with their class indices and the Eq. 14 marks.

    When every sample is done, the main process writes ``summary.json``. Returns {"output", "written",
    "skipped" (this launch), "missing" (images of ``samples`` still to do, by other shards)}.
    """
    out_dir = Path(out_dir)
    shard = shard or Shard()
    started = time.time()
    manifest = {"format": 2, **fingerprint, "label_filter": use_labels, "crf": crf_params is not None}
    share = shard.take(samples)
    probs_size = icfg.save_probs_size if save_probs else None
    todo = run_once(lambda: _prepare_folder(out_dir, manifest, share, probs_size), info)
    mine = [share[i] for i in launch_share(info).take(todo)]
    workers = crf_worker_count(icfg) if crf_params is not None else 0

    def jobs() -> Iterator[tuple]:
        for sample, image in _prefetch(lambda s: load_image(s.image), mine):
            probs = multiscale_probs(predict, image, icfg, info.device)
            kept, keys, unknown = crf_inputs(probs, sample.labels if use_labels else None)
            if save_probs:
                _save_probs(out_dir / "probs" / f"{sample.id}.npz", kept, keys, unknown, icfg.save_probs_size)
            yield (sample.id, kept.cpu().numpy().astype(np.float32), keys, image, unknown.cpu().numpy(),
                   out_dir / f"{sample.id}.png", crf_params, ignore_index)

    finish_jobs(jobs(), len(mine), workers, _finish, info, desc, progress)
    counts = all_reduce_sum(torch.tensor([len(mine)], device=info.device), info)  # also waits for every rank
    result = {"output": str(out_dir), "written": int(counts[0]), "skipped": len(share) - len(todo)}
    if info.is_main:
        seconds = time.time() - started
        run = {"written": result["written"], "skipped": result["skipped"], "processes": info.world_size,
               "shard": str(shard), "crf_workers": workers, "seconds": round(seconds, 1),
               "images_per_s": round(result["written"] / seconds, 3)}
        result["missing"] = _summarize(out_dir, samples, save_probs, run, started)
    return result


def _summarize(out_dir: Path, samples: Sequence[Sample], save_probs: bool, run: dict, started: float) -> int:
    """Count the images of ``samples`` still missing; with none, write ``summary.json`` (the list's size
    and this ``run``'s figures) and remove what killed writers left."""
    with ThreadPoolExecutor(8) as pool:
        missing = sum(not d for d in pool.map(lambda s: _is_done(out_dir, s.id, save_probs), samples))
    if missing == 0:
        _remove_orphans(out_dir, started)
        write_text_atomic(out_dir / SUMMARY, json.dumps({"images": len(samples), "last_run": run}, indent=1) + "\n")
    return missing


def _save_probs(path: Path, kept: Tensor, keys: Sequence[int], unknown: Tensor, short: int) -> None:
    """kept (len(keys), H, W) -> ``path`` (.npz): probs float16 at ``short`` short side, classes, unknown."""
    h, w = kept.shape[1:]
    r = min(1.0, short / min(h, w))
    size = (max(1, round(h * r)), max(1, round(w * r)))
    small = F.interpolate(kept[None], size=size, mode="bilinear", align_corners=False)[0]
    marks = F.interpolate(unknown[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probs=small.cpu().numpy().astype(np.float16),
                            classes=np.asarray(keys, dtype=np.int16), unknown=marks.cpu().numpy())


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


# Model settings that shape the trained weights (with the CLIP architecture: model.clip.arch, else
# model.clip.model): a run config must agree with the checkpoint on these.
ARCHITECTURE_KEYS = (
    "learnable_prompts", "n_ctx", "name_length", "pyramid_adapter", "co_attention.type",
    "co_attention.width", "co_attention.heads", "co_attention.layers", "text_guided_decoder", "decoder_channels",
)


def _architecture(model: dict) -> dict:
    clip = model["clip"]
    flat = _flat(model)
    return {"clip.arch" if clip["arch"] else "clip.model": clip["arch"] or clip["model"],
            **{key: flat[key] for key in ARCHITECTURE_KEYS}}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and key != "arch" else
                   {f"{prefix}{key}": value})
    return out


def refiner_infer_config(icfg: InferConfig, model: torch.nn.Module) -> InferConfig:
    """``icfg`` with ``view_resize`` "auto" resolved for ``model``: cv2 for a released-mode refiner, else torch."""
    if icfg.view_resize != "auto":
        return icfg
    released = bool(getattr(getattr(model, "cfg", None), "released", False))
    return dataclasses.replace(icfg, view_resize="cv2" if released else "torch")


def load_refiner(cfg: Config, checkpoint: str | Path) -> torch.nn.Module:
    """The WeakCLIP model a ``weakclip train`` checkpoint was trained as, with its weights loaded.

    The model is built from the config stored in the checkpoint (its settings, classes and architecture);
    only the frozen CLIP's weights, which checkpoints do not hold, come from ``cfg.model.clip.pretrained``.
    A run config whose classes or architecture (``ARCHITECTURE_KEYS``) disagree is refused in one line;
    other model settings that differ (taps, normalisation, ...) are the checkpoint's, with a warning.

    Self-contained checkpoints run as they are, whatever the run config's model section, which is replaced
    in place by theirs: a released ``.pth`` (converted on the fly, in ``released`` mode) and a converted
    one (``weakclip convert-checkpoint``), which hold their CLIP weights.
    """
    import yaml

    from .config import config_from_dict
    from .engine import load_weights, read_header
    from .errors import warn
    from .model import build_model
    from .released import is_torch_archive, load_released

    if is_torch_archive(checkpoint):
        model, released_cfg, _ = load_released(checkpoint, cfg)
        cfg.model, cfg.data.class_names = released_cfg.model, released_cfg.data.class_names  # what runs
        return model
    header = read_header(checkpoint)
    if "config" not in header:
        raise WeakclipError(f"{checkpoint}: no config in its header (not a checkpoint written by weakclip train)")
    try:
        trained = config_from_dict(yaml.safe_load(header["config"]))
    except (WeakclipError, yaml.YAMLError) as exc:
        raise WeakclipError(f"{checkpoint}: the config stored in it does not load ({exc})") from None
    if trained.model.clip.in_checkpoint:
        cfg.model, cfg.data.class_names = trained.model, trained.data.class_names  # what runs
        model = build_model(trained.model, trained.data.class_names)
        load_weights(checkpoint, model)
        return model
    if trained.data.class_names != cfg.data.class_names:
        raise WeakclipError(
            f"{checkpoint}: trained on {trained.num_classes} classes ({', '.join(trained.data.class_names[:3])}, "
            f"...), the config has {cfg.num_classes} ({', '.join(cfg.data.class_names[:3])}, ...)")
    ours, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(trained.model)
    arch_ours, arch_theirs = _architecture(ours), _architecture(theirs)
    if arch_ours != arch_theirs:
        key = next(k for k in arch_theirs if arch_theirs[k] != arch_ours.get(k))
        where = key if key in arch_ours else "clip.arch" if key == "clip.model" else "clip.model"
        raise WeakclipError(f"{checkpoint}: trained with model.{key}={arch_theirs[key]!r}, the config has "
                            f"model.{where}={arch_ours[where]!r}")
    ours, theirs = _flat(ours), _flat(theirs)
    differ = [k for k in theirs if k not in ("clip.pretrained", "clip.model", "clip.arch") and theirs[k] != ours.get(k)]
    if differ:
        warn(f"{checkpoint} was trained with " + ", ".join(f"model.{k}={theirs[k]!r}" for k in differ)
             + " (the config differs): the checkpoint's settings are used")
    clip = dataclasses.replace(trained.model.clip, pretrained=cfg.model.clip.pretrained)
    model = build_model(dataclasses.replace(trained.model, clip=clip), trained.data.class_names)
    load_weights(checkpoint, model)
    return model


def refiner_from_checkpoint(cfg: Config, checkpoint: str | Path, device: torch.device
                            ) -> tuple[Predictor, torch.nn.Module]:
    """The refiner of ``checkpoint`` (see :func:`load_refiner`) as a Predictor at ``infer.precision``, and the
    model; ``cfg.infer.view_resize`` "auto" is resolved for it in place."""
    model = load_refiner(cfg, checkpoint)
    cfg.infer = refiner_infer_config(cfg.infer, model)
    return refiner_predictor(model, device, cfg.infer.precision), model


def clip_weights_identity(clip: ClipConfig) -> str:
    """Which CLIP weights a model runs with: a local file's sha256, an open_clip tag, the fixed random init, or
    the refiner checkpoint itself (released checkpoints carry their CLIP: the checkpoint's sha256 names it)."""
    if clip.in_checkpoint:
        return "stored in the checkpoint"
    if clip.pretrained is None:
        return f"random init (seed {RANDOM_CLIP_SEED})"
    path = weights_file(clip.pretrained)
    return f"sha256 {file_sha256(path)}" if path is not None else f"open_clip tag {clip.pretrained}"


def _labels_identity(cfg: Config, samples: Sequence[Sample]) -> dict:
    """Where the image-level labels come from and what they are: the labels file's sha256 (whatever the
    list), or, for labels taken from the seeds, a digest of the listed images' labels."""
    source = labels_source(cfg.data)
    if source.startswith("file ") and Path(source[5:]).is_file():
        return {"source": source, "sha256": file_sha256(source[5:])}
    text = json.dumps([[s.id, list(s.labels)] for s in samples])
    return {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def inference_fingerprint(cfg: Config, checkpoint: str | Path, model: torch.nn.Module, samples: Sequence[Sample],
                          use_labels: bool) -> dict:
    """Everything that changes a label map, for the manifest: the checkpoint's bytes; for a refiner its model
    settings (CLIP model, normalisation, class token, taps, ...) and the identity of its CLIP weights; the
    classes; the image-level labels and their source (when the filter uses them); the data root and the
    inference settings. Not the list or the share, nor the batch size or worker counts (speed only)."""
    speed_only = ("crf_workers", "save_probs_size", "batch_size")
    infer = {k: v for k, v in cfg.infer.__dict__.items() if k not in speed_only}
    settings = getattr(model, "cfg", None)
    refiner = None
    if isinstance(settings, ModelConfig):  # a retrained segmenter's settings are all in its checkpoint
        tree = dataclasses.asdict(settings)
        del tree["clip"]["pretrained"]  # stands for the weights' identity, not the path
        refiner = {"model": tree, "clip_weights": clip_weights_identity(settings.clip)}
    return {"checkpoint_sha256": file_sha256(checkpoint), "refiner": refiner, "classes": cfg.data.class_names,
            "labels": _labels_identity(cfg, samples) if use_labels else None,
            "data_root": str(Path(cfg.data.root).resolve()),
            "infer": json.loads(json.dumps(infer, default=lambda o: o.__dict__))}


def pseudo_masks(cfg: Config, checkpoint: str | Path, output: str | Path, split: str | None = None,
                 save_probs: bool = False, shard: Shard | None = None, info: DistInfo | None = None
                 ) -> dict | None:
    """``weakclip pseudo-masks``: the refiner's label maps of ``split`` (default ``cfg.data.split``) with the
    Eq. 14 filter (``infer.label_filter``) and the CRF (``infer.crf``), into ``output`` (see
    :func:`write_label_maps`). Under torchrun every rank calls it; listing, label reading and hashing run
    on rank 0 only. Returns the summary on the main process, None on the others."""
    from .data.datasets import list_samples

    info = info or init_distributed(INFERENCE_TIMEOUT)
    split = split or cfg.data.split
    use_labels = cfg.infer.label_filter
    samples = run_once(lambda: list_samples(cfg.data, split, need_seeds=False, need_labels=use_labels), info)
    # A released .pth replaces cfg's model section in place.
    predict, model = refiner_from_checkpoint(cfg, checkpoint, info.device)
    fingerprint = run_once(lambda: inference_fingerprint(cfg, checkpoint, model, samples, use_labels), info)
    summary = write_label_maps(
        predict, samples, output, cfg.infer, info, fingerprint, use_labels=use_labels,
        crf_params=cfg.infer.crf_params if cfg.infer.crf else None, save_probs=save_probs,
        ignore_index=cfg.data.ignore_index, desc="pseudo-masks", shard=shard)
    return summary if info.is_main else None


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
