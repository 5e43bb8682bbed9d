"""COCO: converting instance annotations, and reading 91-slot category-id masks as contiguous classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakclip.config import DataConfig
from weakclip.data.coco import prepare_coco
from weakclip.data.datasets import (
    COCO_CATEGORY_IDS,
    SegDataset,
    coco_id_to_contiguous,
    list_samples,
    preflight,
)
from weakclip.data.masks import read_mask, write_mask
from weakclip.errors import WeakclipError

pytest.importorskip("pycocotools")
# pycocotools' own numpy-2 deprecation notice, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Image 1 (20 x 30): a person box, a smaller toothbrush box overlapping it, and a crowd of cars given as
# an uncompressed (column-major) RLE covering columns 20..24. Image 2 (10 x 10): one dog. Image 3: nothing.
INSTANCES = {
    "images": [
        {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 20, "width": 30},
        {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": 10, "width": 10},
        {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "height": 8, "width": 8},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 80.0,
         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], "bbox": [2, 2, 10, 8]},
        {"id": 11, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 64.0,
         "segmentation": [[8, 6, 16, 6, 16, 14, 8, 14]], "bbox": [8, 6, 8, 8]},
        {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": 100.0,
         "segmentation": {"counts": [400, 100, 100], "size": [20, 30]}, "bbox": [20, 0, 5, 20]},
        {"id": 13, "image_id": 2, "category_id": 18, "iscrowd": 0, "area": 36.0,
         "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]], "bbox": [2, 2, 6, 6]},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"},
                   {"id": 90, "name": "toothbrush"}],
}
STEM1, STEM2 = "COCO_val2014_000000000001", "COCO_val2014_000000000002"


def _write_instances(tmp_path: Path) -> Path:
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(INSTANCES))
    images = tmp_path / "val2014"
    images.mkdir()
    for im in INSTANCES["images"]:
        Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(images / im["file_name"])
    return path


def test_prepare_coco_masks_labels_list(tmp_path: Path) -> None:
    path = _write_instances(tmp_path)
    out = tmp_path / "out"
    summary = prepare_coco(path, tmp_path / "val2014", out, "val", progress=False)
    assert summary["images"] == 2 and summary["masks_written"] == 2 and summary["unlabelled_left_out"] == 1
    assert summary["num_classes"] == 81 and summary["class_names"][80] == "toothbrush"
    assert (out / "val.txt").read_text() == f"{STEM1}\n{STEM2}\n"
    # Contiguous: person 1 -> 1, car 3 -> 3, dog 18 -> 17 (ids 12 is unused), toothbrush 90 -> 80.
    labels = json.loads((out / "cls_labels.json").read_text())
    assert labels == {STEM1: [1, 3, 80], STEM2: [17]}

    mask = read_mask(out / "class_labels" / f"{STEM1}.png")
    assert mask.shape == (20, 30)
    assert mask[4, 4] == 1  # person only
    assert mask[12, 14] == 80  # toothbrush only
    assert mask[8, 10] == 80  # overlap: the smaller instance wins
    assert (mask[:, 20:25] == 255).all()  # crowd -> ignore
    assert (mask[:, 25:] == 0).all() and mask[0, 0] == 0 and mask[18, 4] == 0
    assert set(np.unique(mask).tolist()) == {0, 1, 80, 255}
    mask2 = read_mask(out / "class_labels" / f"{STEM2}.png")
    assert mask2[5, 5] == 17 and mask2[0, 0] == 0
    assert (out / "images" / f"{STEM1}.jpg").resolve() == (tmp_path / "val2014" / f"{STEM1}.jpg").resolve()

    # The output is a data set list_samples and preflight accept.
    cfg = DataConfig(kind="coco", root=str(out), split="val", images_dir="images", seeds_dir="class_labels",
                     gt_dir="class_labels", labels_file="cls_labels.json",
                     class_names=summary["class_names"])
    samples = list_samples(cfg, need_gt=True)
    assert [s.labels for s in samples] == [(1, 3, 80), (17,)]
    preflight(samples, num_classes=81, progress=False)


def test_prepare_coco_resumes(tmp_path: Path) -> None:
    path = _write_instances(tmp_path)
    out = tmp_path / "out"
    prepare_coco(path, None, out, "val", progress=False)
    marker = np.full((20, 30), 7, np.uint8)
    write_mask(out / "class_labels" / f"{STEM1}.png", marker)
    (out / "class_labels" / f"{STEM2}.png").unlink()
    summary = prepare_coco(path, None, out, "val", keep_unlabelled=True, progress=False)
    assert summary["masks_written"] == 2 and summary["masks_kept"] == 1  # image 2 and the empty image 3
    assert np.array_equal(read_mask(out / "class_labels" / f"{STEM1}.png"), marker)
    assert json.loads((out / "cls_labels.json").read_text())["COCO_val2014_000000000003"] == []


def test_prepare_coco_bad_json(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(WeakclipError, match=f"{missing}: COCO annotation file not found"):
        prepare_coco(missing, None, tmp_path / "out", "val", progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WeakclipError, match=f"{bad}: not valid JSON"):
        prepare_coco(bad, None, tmp_path / "out", "val", progress=False)
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(WeakclipError, match=f"{bad}: not a COCO instances file .*annotations"):
        prepare_coco(bad, None, tmp_path / "out", "val", progress=False)


def test_category_ids_to_contiguous() -> None:
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[11] == 13 and COCO_CATEGORY_IDS[-1] == 90
    mask = np.array([[0, 1, 11, 13, 90], [12, 83, 255, 82, 84]], dtype=np.uint8)
    # By hand (configs/coco.yaml order): 11 -> 11, 13 (stop sign) -> 12, 82 (refrigerator) -> 73,
    # 84 (book) -> 74, 90 (toothbrush) -> 80; the unused ids 12 and 83 become ignore.
    expected = np.array([[0, 1, 11, 12, 80], [255, 255, 255, 73, 74]], dtype=np.uint8)
    assert np.array_equal(coco_id_to_contiguous(mask), expected)


def _coco_root(tmp_path: Path, seeds: dict[str, np.ndarray]) -> DataConfig:
    for sub in ("images", "seeds"):
        (tmp_path / sub).mkdir()
    for stem, seed in seeds.items():
        Image.fromarray(np.zeros((*seed.shape, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.jpg")
        write_mask(tmp_path / "seeds" / f"{stem}.png", seed)
    (tmp_path / "train.txt").write_text("\n".join(seeds) + "\n")
    return DataConfig(kind="coco", root=str(tmp_path), split="train", images_dir="images", seeds_dir="seeds",
                      labels_from_seeds=True, class_names=["background"] + [f"c{i}" for i in range(1, 81)])


def test_coco_seeds_in_category_ids_are_mapped(tmp_path: Path) -> None:
    a = np.zeros((6, 8), np.uint8)
    a[:3] = 90  # toothbrush, only possible as a category id
    b = np.zeros((6, 8), np.uint8)
    b[2:4, 2:4] = 13  # stop sign -> 12
    cfg = _coco_root(tmp_path, {"a": a, "b": b})
    samples = list_samples(cfg)
    assert all(s.seed_coco_ids for s in samples)
    assert [s.labels for s in samples] == [(80,), (12,)]
    item = SegDataset(samples, None, num_classes=81)[1]
    assert item["seed"][2, 2] == 12 and item["seed"][0, 0] == 0
    preflight(samples, num_classes=81, progress=False)
    b[0, 0] = 12  # not an official category id
    write_mask(tmp_path / "seeds" / "b.png", b)
    with pytest.raises(WeakclipError, match=r"b\.png: label 12 is not a COCO category id"):
        preflight(samples, num_classes=81, progress=False)


def test_coco_contiguous_seeds_are_kept(tmp_path: Path) -> None:
    a = np.zeros((6, 8), np.uint8)
    a[:3] = 13
    cfg = _coco_root(tmp_path, {"a": a})
    (sample,) = list_samples(cfg)
    assert not sample.seed_coco_ids and sample.labels == (13,)
    assert sample.load_seed()[0, 0] == 13
