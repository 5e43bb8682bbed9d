"""Convert official COCO instance annotations into the class-index PNG layout :func:`list_samples` reads.

Output under ``output_dir`` (names match ``configs/coco.yaml``): ``class_labels/<id>.png`` masks in
contiguous classes 0..80, ``cls_labels.json`` (id -> contiguous foreground classes, merged with an
existing file so several splits can share one folder), ``<split_name>.txt`` and, when ``images_dir`` is
given, ``images/<id>.jpg`` symbolic links to the original files. ``<id>`` is the stem of ``file_name``.

Mask rules: crowd regions are 255 (ignore); non-crowd instances are painted over them from the largest
area to the smallest, so where instances overlap the smaller one (usually the one in front) wins.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import WeakclipError
from ..fileio import write_text_atomic
from .datasets import COCO_CATEGORY_IDS
from .masks import write_mask

MASKS_DIR = "class_labels"
IMAGES_DIR = "images"


def _load_instances(path: Path) -> dict:
    if not path.is_file():
        raise WeakclipError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeakclipError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WeakclipError(f"{path}: not a COCO instances file (expected a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise WeakclipError(f"{path}: not a COCO instances file (no '{key}' list)")
    return data


def category_mapping(categories: list[dict]) -> tuple[dict[int, int], list[str]]:
    """Category id -> contiguous index (1..N) and the class names (background first).

    The 80 official ids map through ``COCO_CATEGORY_IDS`` (so indices match ``configs/coco.yaml`` even for a
    file listing only some categories); any other id set maps in sorted id order.
    """
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    ids = sorted(names)
    if set(ids) <= set(COCO_CATEGORY_IDS):
        order = list(COCO_CATEGORY_IDS)
        index = {cid: order.index(cid) + 1 for cid in ids}
        class_names = ["background"] + [names.get(cid, f"category {cid}") for cid in order]
    else:
        index = {cid: i + 1 for i, cid in enumerate(ids)}
        class_names = ["background"] + [names[cid] for cid in ids]
    return index, class_names


def prepare_coco(instances_json: str | os.PathLike, images_dir: str | os.PathLike | None,
                 output_dir: str | os.PathLike, split_name: str, keep_unlabelled: bool = False,
                 progress: bool = True) -> dict:
    """Write masks, image-level labels and the id list for one COCO split (layout: module docstring).

    Resumable: masks already on disk are kept. Images without any annotation are left out of the list
    unless ``keep_unlabelled`` (the usual WSSS COCO lists leave them out). Returns a summary dict.
    """
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise WeakclipError("pycocotools is not installed: pip install 'weakclip[coco]'") from None
    path = Path(instances_json)
    data = _load_instances(path)
    index, class_names = category_mapping(data["categories"])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    for ann in data["annotations"]:
        if ann.get("category_id") not in index:
            raise WeakclipError(f"{path}: annotation {ann.get('id')} has unknown category_id "
                                f"{ann.get('category_id')}")

    out = Path(output_dir)
    masks_dir = out / MASKS_DIR
    masks_dir.mkdir(parents=True, exist_ok=True)
    images = sorted(data["images"], key=lambda im: im["file_name"])
    labels: dict[str, list[int]] = {}
    todo = []
    for im in images:
        anns = coco.imgToAnns.get(im["id"], [])
        if not anns and not keep_unlabelled:
            continue
        stem = Path(im["file_name"]).stem
        labels[stem] = sorted({index[a["category_id"]] for a in anns})
        todo.append((stem, im, anns))

    def write_one(job: tuple[str, dict, list[dict]]) -> bool:
        stem, im, anns = job
        target = masks_dir / f"{stem}.png"
        if target.is_file():
            return False
        mask = np.zeros((im["height"], im["width"]), dtype=np.uint8)
        try:
            for ann in (a for a in anns if a.get("iscrowd")):
                mask[coco.annToMask(ann) > 0] = 255
            for ann in sorted((a for a in anns if not a.get("iscrowd")), key=lambda a: -float(a["area"])):
                mask[coco.annToMask(ann) > 0] = index[ann["category_id"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise WeakclipError(
                f"{path}: cannot rasterise the annotations of {im['file_name']} ({exc})") from None
        write_mask(target, mask)
        return True

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PNG encoding releases the GIL
        written = sum(tqdm(pool.map(write_one, todo), total=len(todo), desc=f"COCO {split_name} masks",
                           disable=not progress))

    missing = 0
    if images_dir is not None:
        src_dir = Path(images_dir).resolve()
        link_dir = out / IMAGES_DIR
        link_dir.mkdir(exist_ok=True)
        for stem, im, _ in todo:
            src, link = src_dir / im["file_name"], link_dir / f"{stem}.jpg"
            if not src.is_file():
                missing += 1
            elif not link.exists() and src != link.resolve():
                link.unlink(missing_ok=True)  # a dangling link from an earlier run
                link.symlink_to(src)

    labels_file = out / "cls_labels.json"
    merged = {}
    if labels_file.is_file():
        try:
            merged = json.loads(labels_file.read_text())
        except ValueError as exc:
            raise WeakclipError(f"{labels_file}: existing labels file is not valid JSON ({exc})") from None
    merged.update(labels)
    write_text_atomic(labels_file, json.dumps(merged, indent=0, sort_keys=True))
    list_file = out / f"{split_name}.txt"
    write_text_atomic(list_file, "".join(f"{stem}\n" for stem, _, _ in todo))
    return {
        "split": split_name,
        "images": len(todo),
        "unlabelled_left_out": len(images) - len(todo),
        "masks_written": written,
        "masks_kept": len(todo) - written,
        "images_missing": missing,
        "num_classes": len(class_names),
        "class_names": class_names,
        "list_file": str(list_file),
        "labels_file": str(labels_file),
        "masks_dir": str(masks_dir),
    }
