"""Sample listing (VOC, COCO, plain folder), a pre-training preflight check and the training dataset.

Layouts read by :func:`list_samples` (``root``, ``*_dir`` and ``labels_file`` come from :class:`DataConfig`):

* ``voc``: ids in ``root/ImageSets/Segmentation/<split>.txt``; ``root/<images_dir>/<id>.jpg``,
  ``root/<seeds_dir>/<id>.png``, ``root/<gt_dir>/<id>.png``.
* ``coco``: as ``voc``, the list being ``root/<split>.txt``, ``root/ImageSets/<split>.txt`` or
  ``root/ImageSets/Segmentation/<split>.txt`` (first found). With 81 class names, masks may hold either
  contiguous indices 0..80 or COCO category ids (91-slot convention, values up to 90); the convention is
  detected per mask folder (see :func:`detect_coco_ids`) and category ids are mapped to 0..80 on load.
  With 91 class names nothing is mapped (the released "pixel value = category id" label space).
* ``folder``: ``root/images/<stem>.jpg|.jpeg|.png``, ``root/seeds/<stem>.png``, optional
  ``root/gt/<stem>.png``; ids from ``root/<split>.txt`` when present, else every image, sorted.
  ``images_dir``/``seeds_dir``/``gt_dir``/``labels_file`` are not used; labels come from
  ``root/labels.json`` or ``root/labels.csv`` (see :func:`read_labels_file`).

Image-level labels are the known labels of weak supervision (Eq. 14's filter and the CRF's class set use
them): ``labels_file`` (relative to ``root``; ``weakclip prepare-voc`` and ``prepare-coco`` write
``cls_labels.json``) may be JSON or ``.npy`` (a pickled dict): id -> list of foreground class indices, list
of class names, or a one-hot vector over the K-1 foreground classes (IRN's ``cls_labels.npy``) or over all K
classes. Only with ``labels_from_seeds: true`` (an explicit opt-in, warned about) are they the classes
present in each seed mask instead, so a class the CAM missed is lost.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..config import DataConfig
from ..errors import WeakclipError, warn
from ..fileio import visible_files
from ..safepickle import load_npy
from .masks import read_mask

# The 80 official COCO category ids, in order; contiguous class i (1..80) is COCO_CATEGORY_IDS[i - 1].
COCO_CATEGORY_IDS: tuple[int, ...] = (
    tuple(range(1, 12)) + tuple(range(13, 26)) + (27, 28) + tuple(range(31, 45)) + tuple(range(46, 66))
    + (67, 70) + tuple(range(72, 83)) + tuple(range(84, 91))
)

# 256-entry lookup: category id -> contiguous index; 0 -> 0, 255 -> 255, ids COCO never uses -> 255.
COCO_ID_TO_CONTIGUOUS: np.ndarray = np.full(256, 255, dtype=np.uint8)
COCO_ID_TO_CONTIGUOUS[0] = 0
COCO_ID_TO_CONTIGUOUS[list(COCO_CATEGORY_IDS)] = np.arange(1, 81, dtype=np.uint8)

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# How many masks of a COCO folder are read to detect its label convention when labels come from a file.
_DETECT_MASKS = 256

# (image, label, rng) -> (image, label); label is (H, W) or (H, W, C) stacked maps (seed, gt).
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def coco_id_to_contiguous(mask: np.ndarray) -> np.ndarray:
    """Map a mask in COCO category ids (0 background, 1..90, 255 ignore) to contiguous 0..80 (uint8).

    Values that are not official category ids (12, 26, ..., 83 and 91..254) become 255.
    """
    return COCO_ID_TO_CONTIGUOUS[mask]


def read_label(path: str | os.PathLike, coco_ids: bool = False) -> np.ndarray:
    """Read a label PNG as (H, W) uint8; ``coco_ids`` maps 91-slot category ids to contiguous 0..80."""
    mask = read_mask(path)
    return coco_id_to_contiguous(mask) if coco_ids else mask


@dataclass
class Sample:
    """One training or evaluation item. ``labels``: foreground class indices (background 0 excluded).

    ``seed_coco_ids`` / ``gt_coco_ids``: the file holds COCO category ids, mapped to 0..80 on load.
    """

    id: str
    image: Path
    seed: Path | None
    gt: Path | None
    labels: tuple[int, ...]
    seed_coco_ids: bool = False
    gt_coco_ids: bool = False

    def load_seed(self) -> np.ndarray:
        """(H, W) uint8 seed in contiguous class indices."""
        if self.seed is None:
            raise WeakclipError(f"{self.id}: this sample was listed without seeds")
        return read_label(self.seed, self.seed_coco_ids)

    def load_gt(self) -> np.ndarray:
        """(H, W) uint8 ground truth in contiguous class indices."""
        if self.gt is None:
            raise WeakclipError(f"{self.id}: this sample was listed without ground truth")
        return read_label(self.gt, self.gt_coco_ids)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image fully as (H, W, 3) uint8 RGB (pixels as stored: EXIF rotation is not applied,
    so masks drawn on the stored pixels line up). Truncated or corrupt files raise WeakclipError."""
    path = Path(path)
    if not path.is_file():
        raise WeakclipError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 (PIL raises many types for corrupt files)
        raise WeakclipError(f"{path}: cannot decode image ({exc})") from None


# ----------------------------------------------------------------------------------------------------------
# Listing


def read_list(path: Path) -> list[str]:
    """Ids of a list file, each once, in first-seen order. Lines may also be ``/JPEGImages/x.jpg ...``."""
    if not path.is_file():
        raise WeakclipError(f"{path}: list file not found")
    ids = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        token = tokens[0]
        if "/" in token or token.lower().endswith(IMAGE_EXTS):
            token = Path(token).stem
        ids.append(token)
    ids = list(dict.fromkeys(ids))  # released VOC lists hold the train ids twice
    if not ids:
        raise WeakclipError(f"{path}: the list is empty")
    return ids


def _parse_labels(value: object, class_names: Sequence[str], where: str) -> list[int]:
    """One labels entry (indices, names or a one-hot vector) -> foreground class indices (unchecked range)."""
    k = len(class_names)
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise WeakclipError(f"{where}: expected a list of class indices or names, got {value!r}")
    if arr.dtype.kind in "US":  # names, or indices written as text (CSV, mixed JSON lists)
        lookup = {name: i for i, name in enumerate(class_names)}
        out = []
        for token in (str(t).strip() for t in arr):
            if token.isdigit():
                out.append(int(token))
            elif token in lookup:
                out.append(lookup[token])
            else:
                raise WeakclipError(f"{where}: unknown class name {token!r}")
        return [i for i in out if i != 0]
    if arr.size and arr.dtype.kind not in "biuf":
        raise WeakclipError(f"{where}: expected a list of class indices or names, got {value!r}")
    # One-hot: bools, or a 0/1 vector of length K-1 (foreground only) or K; an index list of >= 3 distinct
    # classes can never consist of zeros and ones only, so the rule is unambiguous there.
    if arr.dtype == bool or (arr.size in (k - 1, k) and arr.size >= 3 and np.isin(arr, (0, 1)).all()):
        hot = np.flatnonzero(arr > 0.5)
        if arr.size == k - 1:
            hot = hot + 1
        return [int(i) for i in hot if i != 0]
    if arr.size and not np.all(arr == np.round(arr)):
        raise WeakclipError(f"{where}: class indices must be whole numbers, got {value!r}")
    return [int(i) for i in arr if int(i) != 0]


def read_labels_file(path: Path, class_names: Sequence[str]) -> dict[str, list[int]]:
    """Image-level labels: id -> foreground class indices (range not yet checked).

    ``.json``: an object id -> entry; ``.npy``: a pickled dict id -> entry (entry: indices, names, one-hot;
    read without running code: dicts, lists, strings, numbers and numpy arrays only);
    ``.csv``: rows ``id,labels`` with labels separated by ``;`` or spaces, each a class index or name; an
    optional header row whose first field is ``id`` or ``image``.
    """
    if not path.is_file():
        raise WeakclipError(f"{path}: labels file not found")
    try:
        if path.suffix == ".npy":
            raw = load_npy(path)  # pickled objects built from plain types only: no code from data
            raw = raw.item() if raw.shape == () else raw
        elif path.suffix == ".csv":
            raw = {}
            with path.open(newline="") as f:
                for row in csv.reader(f):
                    if not row or row[0].strip().lower() in ("id", "image", ""):
                        continue
                    raw[row[0].strip()] = " ".join(row[1:]).replace(";", " ").split()
        else:
            raw = json.loads(path.read_text())
    except (OSError, ValueError, csv.Error) as exc:
        raise WeakclipError(f"{path}: cannot read labels ({exc})") from None
    if not isinstance(raw, dict):
        raise WeakclipError(f"{path}: expected a mapping id -> labels")
    return {str(key): _parse_labels(value, class_names, f"{path}: {key}") for key, value in raw.items()}


def mask_values(paths: Sequence[Path], desc: str | None) -> list[set[int]]:
    """Distinct values of each mask (read in threads: PNG decoding releases the GIL)."""

    def values(p: Path) -> set[int]:
        return set(np.flatnonzero(np.bincount(read_mask(p).ravel(), minlength=256)).tolist())

    with ThreadPoolExecutor(_workers()) as pool:
        return list(tqdm(pool.map(values, paths), total=len(paths), desc=desc, disable=desc is None,
                         leave=False))


def detect_coco_ids(values: Iterable[set[int]]) -> bool:
    """True when masks are in the 91-slot COCO category-id convention rather than contiguous 0..80.

    Rule: some mask holds a value in 81..90 (impossible in contiguous indices). Ids 81..90 include
    sink, refrigerator, book, clock and vase, so a few hundred masks of a real COCO split always hold one.
    """
    return any(any(81 <= v <= 90 for v in vals) for vals in values)


def _spread(paths: list[Path], n: int) -> list[Path]:
    """Up to n paths evenly spaced over the list (a deterministic subsample)."""
    if len(paths) <= n:
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def folder_image(images: Path, stem: str) -> Path:
    """``images/<stem>`` with the first of :data:`IMAGE_EXTS` that exists, else ``images/<stem>.jpg``."""
    for ext in IMAGE_EXTS:
        if (images / f"{stem}{ext}").is_file():
            return images / f"{stem}{ext}"
    return images / f"{stem}.jpg"  # reported as missing by preflight


def labels_source(cfg: DataConfig) -> str:
    """Where a data config's image-level labels come from: ``file <path>`` or ``seeds <folder>``."""
    root = Path(cfg.root)
    if cfg.labels_from_seeds:
        return f"seeds {root / ('seeds' if cfg.kind == 'folder' else cfg.seeds_dir)}"
    if cfg.kind == "folder":
        found = [p for p in (root / "labels.json", root / "labels.csv") if p.is_file()]
        return f"file {found[0] if found else root / 'labels.json'}"
    return f"file {root / cfg.labels_file}" if cfg.labels_file else "none"


def _missing_labels(cfg: DataConfig, path: Path | None) -> WeakclipError:
    """The one line for absent image-level labels: which file, how to make it, and the opt-in."""
    make = {
        "voc": f"make it with `weakclip prepare-voc --root {cfg.root}`",
        "coco": f"`weakclip prepare-coco --instances ... --output {cfg.root} --split ...` writes it",
        "folder": "write it: image id -> class indices or names (or labels.csv)",
    }.get(cfg.kind, "")
    what = f"{path}: image-level labels not found" if path else "data.labels_file is null"
    return WeakclipError(f"{what}; {make}, or set data.labels_from_seeds: true to take them from the seeds "
                         "(a class the seed misses is then lost)")


def list_samples(
    cfg: DataConfig, split: str | None = None, need_seeds: bool = True, need_gt: bool = False,
    need_labels: bool = True,
) -> list[Sample]:
    """List a split's samples, each id once, in list order (layouts and label formats: module docstring).

    ``need_seeds``/``need_gt`` fill the seed/gt paths (None otherwise); files are not opened here except to
    read labels or detect the COCO convention. ``need_labels`` false leaves every sample's labels empty and
    reads no labels (test images, validation, retraining).
    """
    split = split or cfg.split
    root = Path(cfg.root)
    names = list(cfg.class_names)
    k = len(names)
    if cfg.kind in ("voc", "coco"):
        if cfg.kind == "voc":
            list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        else:
            candidates = [root / f"{split}.txt", root / "ImageSets" / f"{split}.txt",
                          root / "ImageSets" / "Segmentation" / f"{split}.txt"]
            list_file = next((c for c in candidates if c.is_file()), candidates[0])
        ids = read_list(list_file)
        images = [root / cfg.images_dir / f"{i}.jpg" for i in ids]
        seeds_dir, gt_dir = root / cfg.seeds_dir, root / cfg.gt_dir
        labels_path = root / cfg.labels_file if cfg.labels_file else None
    elif cfg.kind == "folder":
        list_file = root / f"{split}.txt"
        if list_file.is_file():
            ids = read_list(list_file)
        else:
            list_file = root / "images"
            stems = sorted({p.stem for p in visible_files(list_file, "*") if p.suffix.lower() in IMAGE_EXTS})
            if not stems:
                raise WeakclipError(f"{list_file}: no .jpg/.jpeg/.png images found")
            ids = stems
        images = [folder_image(root / "images", i) for i in ids]
        seeds_dir, gt_dir = root / "seeds", root / "gt"
        labels_path = next((p for p in (root / "labels.json", root / "labels.csv") if p.is_file()),
                           root / "labels.json")
    else:
        raise WeakclipError(f"data.kind: unknown dataset kind {cfg.kind!r} (voc, coco or folder)")

    seed_paths = [seeds_dir / f"{i}.png" for i in ids]
    gt_paths = [gt_dir / f"{i}.png" for i in ids]
    maps_coco = cfg.kind == "coco" and k == 81

    # Labels: from the labels file, or (opt-in) from the seeds, whose values then also tell the COCO convention.
    seed_values: list[set[int]] | None = None
    if not need_labels:
        label_lists = [[] for _ in ids]
    elif cfg.labels_from_seeds:
        warn(f"image-level labels taken from the seeds in {seeds_dir} (data.labels_from_seeds): a class "
             "the seed misses is filtered out of the pseudo masks and left out of the CRF")
        seed_values = mask_values(seed_paths, desc="reading labels from seeds")
        lut = COCO_ID_TO_CONTIGUOUS if maps_coco and detect_coco_ids(seed_values) else np.arange(256)
        drop = {0, 255, cfg.ignore_index}
        label_lists = [sorted({int(lut[v]) for v in vals} - drop) for vals in seed_values]
    else:
        if labels_path is None or not labels_path.is_file():
            raise _missing_labels(cfg, labels_path)
        table = read_labels_file(labels_path, names)
        missing = [i for i in ids if i not in table]
        if missing:
            raise WeakclipError(f"{labels_path}: no labels for id {missing[0]} (listed in {list_file})")
        label_lists = [table[i] for i in ids]
        if maps_coco and any(v > 80 for labels in table.values() for v in labels):
            label_lists = [[int(COCO_ID_TO_CONTIGUOUS[v]) if v < 256 else v for v in labels]
                           for labels in label_lists]

    for i, labels in zip(ids, label_lists, strict=True):
        bad = [v for v in labels if not 1 <= v < k]
        if bad:
            where = seeds_dir if cfg.labels_from_seeds else labels_path
            raise WeakclipError(f"{where}: {i}: class {bad[0]} outside 1..{k - 1}")

    seed_coco = gt_coco = False
    if maps_coco and need_seeds:
        values = seed_values if seed_values is not None else mask_values(
            [p for p in _spread(seed_paths, _DETECT_MASKS) if p.is_file()], desc=None)
        seed_coco = detect_coco_ids(values)
    if maps_coco and need_gt:
        gt_coco = detect_coco_ids(mask_values(
            [p for p in _spread(gt_paths, _DETECT_MASKS) if p.is_file()], desc=None))

    return [
        Sample(id=i, image=img, seed=s if need_seeds else None, gt=g if need_gt else None,
               labels=tuple(labels), seed_coco_ids=seed_coco, gt_coco_ids=gt_coco)
        for i, img, s, g, labels in zip(ids, images, seed_paths, gt_paths, label_lists, strict=True)
    ]


# ----------------------------------------------------------------------------------------------------------
# Preflight


def _allowed_values(num_classes: int, ignore_index: int, coco_ids: bool) -> np.ndarray:
    allowed = np.zeros(256, dtype=bool)
    if coco_ids:
        allowed[[0, *COCO_CATEGORY_IDS]] = True
    else:
        allowed[:num_classes] = True
    allowed[ignore_index] = True
    return allowed


def _check_mask(path: Path, coco_ids: bool, size: tuple[int, int], image: Path, what: str,
                num_classes: int, ignore_index: int) -> None:
    mask = read_mask(path)
    h, w = mask.shape
    if (w, h) != size:
        raise WeakclipError(f"{path}: {what} is {w}x{h} but its image {image} is {size[0]}x{size[1]}")
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = present[~_allowed_values(num_classes, ignore_index, coco_ids)[present]]
    if bad.size:
        if coco_ids:
            raise WeakclipError(f"{path}: label {bad[0]} is not a COCO category id (0, the 80 official ids, "
                                f"and {ignore_index})")
        raise WeakclipError(f"{path}: label {bad[0]} outside 0..{num_classes - 1} (and {ignore_index})")


def _check_sample(sample: Sample, num_classes: int, ignore_index: int) -> None:
    if not sample.image.is_file():
        raise WeakclipError(f"{sample.image}: image not found")
    try:
        with Image.open(sample.image) as im:
            im.load()  # full decode: a truncated JPEG only fails here
            size = im.size
    except Exception as exc:  # noqa: BLE001 (PIL raises many types for corrupt files)
        raise WeakclipError(f"{sample.image}: cannot decode image ({exc})") from None
    if sample.seed is not None:
        _check_mask(sample.seed, sample.seed_coco_ids, size, sample.image, "seed", num_classes, ignore_index)
    if sample.gt is not None:
        _check_mask(sample.gt, sample.gt_coco_ids, size, sample.image, "ground truth", num_classes,
                    ignore_index)


def preflight(samples: Sequence[Sample], num_classes: int, ignore_index: int = 255, progress: bool = True,
              list_file: str | os.PathLike | None = None) -> None:
    """Check every image decodes fully, seeds (and gt, when listed) exist, match the image size and hold
    only 0..K-1 and ``ignore_index``. Raises WeakclipError at the first problem in list order, naming the
    file; ``list_file`` names the source in the message for an empty list."""
    if not samples:
        raise WeakclipError(f"{list_file or 'data list'}: no samples to train on (the list is empty)")
    pool = ThreadPoolExecutor(_workers())
    try:
        results = pool.map(lambda s: _check_sample(s, num_classes, ignore_index), samples)
        for _ in tqdm(results, total=len(samples), desc="preflight", disable=not progress, leave=False):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # stop at the first error, not after all checks


# ----------------------------------------------------------------------------------------------------------
# Dataset


class SegDataset(torch.utils.data.Dataset):
    """Images with their seeds (and gt) as tensors; augmentation is a pure function of (seed, epoch, index).

    Each item: "image" (3, H, W) uint8 RGB, un-normalised; "seed" (H, W) int64 (all ``ignore_index`` when
    the sample has no seed); "labels" (K,) bool multi-hot with background True; "id"; "index"; and
    "gt" (H, W) int64 when ``with_gt``. ``transform(image, label, rng)`` gets the seed, or the seed and gt
    stacked as (H, W, 2) so both get the same geometry.

    ``seed`` is the base seed of the augmentation (the training seed). Call :meth:`set_epoch` before
    creating each epoch's DataLoader iterator (workers receive a copy of the dataset when the iterator
    starts, so do not use ``persistent_workers`` with it).
    """

    def __init__(self, samples: Sequence[Sample], transform: Transform | None, num_classes: int,
                 with_gt: bool = False, seed: int = 0, ignore_index: int = 255) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.num_classes = num_classes
        self.with_gt = with_gt
        self.seed = seed
        self.ignore_index = ignore_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, index: int) -> np.random.Generator:
        """The generator for one item: the same (seed, epoch, index) always gives the same augmentation."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = load_image(sample.image)
        if sample.seed is not None:
            seed = sample.load_seed()
        else:
            seed = np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)
        label = np.stack([seed, sample.load_gt()], axis=-1) if self.with_gt else seed
        if self.transform is not None:
            image, label = self.transform(image, label, self.rng(index))
        labels = torch.zeros(self.num_classes, dtype=torch.bool)
        labels[0] = True
        labels[list(sample.labels)] = True
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "seed": torch.from_numpy((label[..., 0] if self.with_gt else label).astype(np.int64)),
            "labels": labels,
            "id": sample.id,
            "index": index,
        }
        if self.with_gt:
            item["gt"] = torch.from_numpy(label[..., 1].astype(np.int64))
        return item
