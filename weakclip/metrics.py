"""Segmentation metrics: confusion matrix, IoU / precision / recall, mIoU, reports and plots.

Conventions (those of mmseg and the released ``make_crf.py``): rows are ground truth, columns are
prediction; pixels whose ground truth is ``ignore_index`` (255) are left out; mIoU is the NaN-mean of the
per-class IoU, so a class absent from both the ground truth and the prediction does not count.

Unlike those tools, a prediction outside ``0..K-1`` (255 in a pseudo mask whose label filter dropped a
class, or any stray value) is never silently dropped: it is counted in a per-class "unassigned" vector,
so it lowers the recall and IoU of the true class, and its share of the valid pixels is reported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import VOC_CLASSES
from .data.masks import read_mask
from .errors import WeakclipError
from .fileio import atomic_path, visible_files

# The paper's column names for the VOC classes (Tables 6 and 7).
VOC_SHORT_NAMES = (
    "bkg", "plane", "bike", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "mbk", "person", "plant", "sheep", "sofa", "train", "tv",
)


def _counts(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Pixel counts (K, K+1) int64: [t, p] for p < K, and [t, K] = pixels of true class t predicted outside 0..K-1.

    pred, gt: same-shape integer arrays. Raises ValueError on a shape mismatch or a gt value outside
    0..K-1 that is not ``ignore_index``.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    k = num_classes
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    valid = gt != ignore_index
    gt, pred = gt[valid], pred[valid]
    bad = (gt < 0) | (gt >= k)
    if bad.any():
        values = np.unique(gt[bad])[:5].tolist()
        raise ValueError(f"ground-truth values {values} lie outside 0..{k - 1} and are not {ignore_index}")
    pred = np.where((pred < 0) | (pred >= k), k, pred)  # every out-of-range prediction -> the extra column
    return np.bincount(gt * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix (K, K) int64 of one prediction against its ground truth.

    pred, gt: (H, W) (or any equal shapes) integer class maps. Entry [t, p] counts the pixels of true class
    t predicted as p, over pixels with gt != ``ignore_index``. A prediction outside 0..K-1 (e.g. 255) is in
    no column, so row t sums to fewer pixels than class t has: use :class:`ConfusionMeter` to keep those
    misses and report them.
    """
    return _counts(pred, gt, num_classes, ignore_index)[:, :num_classes]


@dataclass
class EvalResult:
    """Scores of a set of predictions; percentages in 0..100, NaN where undefined (a 0/0 ratio).

    confusion: (K, K) int64, rows = ground truth, columns = prediction.
    unassigned: (K,) int64, pixels of each true class predicted outside 0..K-1 (255).
    """

    miou: float
    per_class: dict[str, dict[str, float]]  # class name -> {"iou", "precision", "recall"}
    pixel_accuracy: float
    ignored_prediction_share: float  # share of valid ground-truth pixels predicted 255 (or out of range)
    num_images: int
    confusion: np.ndarray
    unassigned: np.ndarray

    def to_json_dict(self, protocol: dict | None = None) -> dict:
        """A JSON-ready dict (NaN written as None, i.e. null); the matrix is left out. ``protocol``: the
        protocol card (:func:`weakclip.report.protocol_card`), recorded under ``"protocol"`` when given."""
        out = {
            "miou": _json_float(self.miou),
            "per_class": {
                name: {key: _json_float(value) for key, value in scores.items()}
                for name, scores in self.per_class.items()
            },
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "predicted_255_share": _json_float(self.ignored_prediction_share),
            "num_images": self.num_images,
        }
        if protocol is not None:
            out["protocol"] = protocol
        return out

    def markdown(self) -> str:
        """Two Markdown tables: per-class IoU in one row as in the paper's Table 6, then IoU/precision/recall."""
        names = list(self.per_class)
        short = list(VOC_SHORT_NAMES) if tuple(names) == VOC_CLASSES else names
        ious = [self.per_class[n]["iou"] for n in names]
        lines = [
            "| " + " | ".join([*short, "mIoU"]) + " |",
            "|" + "---:|" * (len(names) + 1),
            "| " + " | ".join(_fmt(v) for v in [*ious, self.miou]) + " |",
            "",
            "| class | IoU | precision | recall |",
            "|---|---:|---:|---:|",
        ]
        for name in names:
            s = self.per_class[name]
            lines.append(f"| {name} | {_fmt(s['iou'])} | {_fmt(s['precision'])} | {_fmt(s['recall'])} |")
        lines += [
            f"| **mIoU** | **{_fmt(self.miou)}** | | |",
            "",
            (f"{self.num_images} images; pixel accuracy {_fmt(self.pixel_accuracy)}%; "
             f"valid pixels predicted 255: {_fmt(self.ignored_prediction_share, 2)}%."),
        ]
        return "\n".join(lines) + "\n"


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 * num / den elementwise, NaN where den == 0 (without a divide warning)."""
    out = np.full(num.shape, np.nan)
    np.divide(100.0 * num, den, out=out, where=den > 0)
    return out


class ConfusionMeter:
    """Accumulates pixel counts over many images; merge meters of several workers with :meth:`add`.

    ``counts`` is (K, K+1) int64: the confusion matrix plus an extra last column of predictions outside
    0..K-1. For distributed validation, all-reduce ``counts`` (and sum ``num_images``) or ``add`` the
    other workers' meters.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.num_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: pred, gt (H, W) integer class maps (see :func:`confusion_matrix`)."""
        self.counts += _counts(pred, gt, self.num_classes, self.ignore_index)
        self.num_images += 1

    def add(self, other: ConfusionMeter | np.ndarray, num_images: int = 0) -> None:
        """Merge another meter, or raw counts: (K, K+1) like ``counts``, or a plain (K, K) confusion matrix.

        ``num_images`` is only used with raw counts (a meter brings its own).
        """
        if isinstance(other, ConfusionMeter):
            counts, num_images = other.counts, other.num_images
        else:
            counts = np.asarray(other)
            k = self.num_classes
            if counts.shape == (k, k):
                counts = np.concatenate([counts, np.zeros((k, 1), dtype=counts.dtype)], axis=1)
            if counts.shape != (k, k + 1):
                raise ValueError(f"expected counts of shape ({k}, {k}) or ({k}, {k + 1}), got {counts.shape}")
        if counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge a meter of shape {counts.shape} into one of shape {self.counts.shape}")
        self.counts += counts.astype(np.int64)
        self.num_images += num_images

    def result(self, class_names: Sequence[str]) -> EvalResult:
        """Scores so far; ``class_names`` gives the K names, in class-index order."""
        k = self.num_classes
        if len(class_names) != k:
            raise ValueError(f"{len(class_names)} class names given for {k} classes")
        confusion = self.counts[:, :k].copy()
        unassigned = self.counts[:, k].copy()
        tp = np.diag(confusion).astype(np.float64)
        gt_total = self.counts.sum(axis=1)  # includes the unassigned pixels: they are misses
        pred_total = confusion.sum(axis=0)
        iou = _ratio(tp, gt_total + pred_total - tp)
        precision = _ratio(tp, pred_total)
        recall = _ratio(tp, gt_total)
        total = np.array(gt_total.sum())
        per_class = {
            name: {"iou": float(iou[i]), "precision": float(precision[i]), "recall": float(recall[i])}
            for i, name in enumerate(class_names)
        }
        # nanmean over the classes present in gt or prediction; NaN (not a warning) when there are none
        miou = float(np.nanmean(iou)) if not np.isnan(iou).all() else math.nan
        return EvalResult(
            miou=miou,
            per_class=per_class,
            pixel_accuracy=float(_ratio(tp.sum(), total)),
            ignored_prediction_share=float(_ratio(np.array(unassigned.sum()), total)),
            num_images=self.num_images,
            confusion=confusion,
            unassigned=unassigned,
        )


def evaluate_dirs(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    class_names: Sequence[str],
    ids: Sequence[str] | None = None,
    ignore_index: int = 255,
    progress: bool = True,
) -> EvalResult:
    """Score the label PNGs ``pred_dir/<id>.png`` against ``gt_dir/<id>.png``.

    Which images: the listed ``ids`` (a split list; duplicates are counted once), else every PNG in
    ``pred_dir``. Each one must have both files: a missing prediction or ground truth is an error naming
    the file, never a silent skip (a skipped image would change the score). Also errors: a prediction whose
    size differs from its ground truth, a ground-truth value outside 0..K-1 that is not ``ignore_index``.
    Predictions may hold 255 (counted as misses, see :class:`ConfusionMeter`).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise WeakclipError(f"{folder}: {what} folder not found")
    if ids is None:
        ids = [p.stem for p in visible_files(pred_dir, "*.png")]  # temporary files are hidden
        if not ids:
            raise WeakclipError(f"{pred_dir}: no prediction PNGs found")
    else:
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise WeakclipError("evaluate: the list of image ids is empty")
    from tqdm import tqdm

    meter = ConfusionMeter(len(class_names), ignore_index)
    for image_id in tqdm(ids, desc="evaluate", unit="img", disable=not progress):
        pred_path, gt_path = pred_dir / f"{image_id}.png", gt_dir / f"{image_id}.png"
        if not pred_path.is_file():
            raise WeakclipError(f"{pred_path}: prediction missing for image {image_id}")
        if not gt_path.is_file():
            raise WeakclipError(f"{gt_path}: ground truth missing for image {image_id}")
        pred, gt = read_mask(pred_path), read_mask(gt_path)
        if pred.shape != gt.shape:
            raise WeakclipError(
                f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but its ground truth "
                f"{gt_path} is {gt.shape[1]}x{gt.shape[0]}"
            )
        try:
            meter.update(pred, gt)
        except ValueError as exc:  # the only remaining cause: bad ground-truth values
            raise WeakclipError(f"{gt_path}: {exc}") from None
    return meter.result(class_names)


def save_plots(result: EvalResult, class_names: Sequence[str], out_dir: str | os.PathLike,
               log_color: bool = False) -> list[Path]:
    """Write ``confusion_matrix.png`` (row-normalised, with a "255" column for unassigned pixels) and
    ``per_class_iou.png`` (bar chart with the mIoU line) into ``out_dir``, atomically; return their paths.

    ``log_color`` draws the matrix on a logarithmic colour scale (shows small confusions).
    """
    try:
        from matplotlib.colors import LogNorm, Normalize
        from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on savefig
    except ImportError:
        raise WeakclipError("plots need matplotlib: pip install 'weakclip[plot]'") from None
    k = len(class_names)
    if result.confusion.shape != (k, k):
        raise ValueError(f"{k} class names given for a {result.confusion.shape} confusion matrix")
    out_dir = Path(out_dir)
    counts = np.concatenate([result.confusion, result.unassigned[:, None]], axis=1).astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    norm_counts = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)

    side = max(5.0, 0.32 * k + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    norm = LogNorm(vmin=1e-4, vmax=1.0, clip=True) if log_color else Normalize(vmin=0.0, vmax=1.0)
    shown = np.ma.masked_equal(norm_counts, 0.0) if log_color else norm_counts  # log(0) is undefined
    im = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    ax.set_xticks(range(k + 1), [*class_names, "255"], rotation=90, fontsize=7)
    ax.set_yticks(range(k), list(class_names), fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"confusion (row-normalised), mIoU {_fmt(result.miou)}")
    if k <= 30:  # cell labels stay legible up to about VOC's size
        for t, p in zip(*np.nonzero(norm_counts >= 0.01)):
            value = norm_counts[t, p]
            ax.text(p, t, f"{100 * value:.0f}", ha="center", va="center", fontsize=5,
                    color="black" if value > 0.6 else "white")
    fig.tight_layout()
    matrix_path = out_dir / "confusion_matrix.png"
    with atomic_path(matrix_path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)

    ious = np.array([result.per_class[name]["iou"] for name in class_names])
    fig = Figure(figsize=(max(6.0, 0.3 * k + 2.0), 4.0))
    ax = fig.add_subplot()
    ax.bar(range(k), np.nan_to_num(ious), color="tab:blue")
    for i in np.flatnonzero(np.isnan(ious)):  # say "absent" rather than draw a misleading zero
        ax.text(i, 1.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    if not math.isnan(result.miou):
        ax.axhline(result.miou, color="tab:red", linestyle="--", label=f"mIoU {result.miou:.1f}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside the bars
    ax.set_xticks(range(k), list(class_names), rotation=90, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.set_title(f"per-class IoU ({result.num_images} images)")
    fig.tight_layout()
    bars_path = out_dir / "per_class_iou.png"
    with atomic_path(bars_path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    return [matrix_path, bars_path]
