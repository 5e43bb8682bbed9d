"""``weakclip prepare-voc``: PASCAL VOC 2012 image-level labels from the ground-truth masks.

Weak supervision knows each image's classes. For VOC they are, as in the usual WSSS code bases, the classes
present in the segmentation ground truth: ``SegmentationClassAug`` (SBD-augmented, covers train_aug and
val) or, without it, ``SegmentationClass``. Written as ``<root>/cls_labels.json`` (id -> sorted foreground
class indices), the file the ``voc`` config reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import VOC_CLASSES
from ..errors import WeakclipError
from ..fileio import visible_files, write_text_atomic
from .datasets import mask_values, read_list

GT_DIRS = ("SegmentationClassAug", "SegmentationClass")
LABELS_FILE = "cls_labels.json"


def prepare_voc(root: str | os.PathLike, gt_dir: str | None = None, output: str | os.PathLike | None = None,
                ignore_index: int = 255, progress: bool = True) -> dict:
    """Write image-level labels for every mask in the ground-truth folder; returns a summary dict.

    ``gt_dir`` (relative to ``root``) defaults to the first of ``GT_DIRS`` that exists; ``output`` to
    ``<root>/cls_labels.json``. A mask value outside 0..20 and ``ignore_index`` is one error line naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise WeakclipError(f"{root}: VOC root not found (expected .../VOCdevkit/VOC2012)")
    if gt_dir is None:
        found = [root / d for d in GT_DIRS if (root / d).is_dir()]
        if not found:
            raise WeakclipError(f"{root}: no ground-truth folder ({' or '.join(GT_DIRS)}) to read labels from")
        masks_dir = found[0]
    else:
        masks_dir = root / gt_dir
        if not masks_dir.is_dir():
            raise WeakclipError(f"{masks_dir}: ground-truth folder not found")
    paths = visible_files(masks_dir, "*.png")
    if not paths:
        raise WeakclipError(f"{masks_dir}: no .png masks found")
    values = mask_values(paths, desc=f"labels from {masks_dir.name}" if progress else None)
    k = len(VOC_CLASSES)
    labels: dict[str, list[int]] = {}
    counts = np.zeros(k, dtype=np.int64)
    for path, vals in zip(paths, values, strict=True):
        bad = sorted(v for v in vals if v >= k and v != ignore_index)
        if bad:
            raise WeakclipError(f"{path}: value {bad[0]} is neither a VOC class (0..{k - 1}) nor {ignore_index}")
        labels[path.stem] = sorted(v for v in vals if 0 < v < k)
        counts[labels[path.stem]] += 1
    target = Path(output) if output is not None else root / LABELS_FILE
    write_text_atomic(target, json.dumps(labels, indent=0, sort_keys=True) + "\n")
    lists = {}  # how much of each split the labels cover (test ids have no ground truth)
    for list_file in sorted((root / "ImageSets" / "Segmentation").glob("*.txt")):
        ids = set(read_list(list_file))
        lists[list_file.stem] = {"ids": len(ids), "without_labels": len(ids - labels.keys())}
    return {
        "labels_file": str(target),
        "ground_truth": str(masks_dir),
        "images": len(labels),
        "without_objects": sum(not v for v in labels.values()),
        "images_per_class": {VOC_CLASSES[c]: int(counts[c]) for c in range(1, k)},
        "lists": lists,
    }
