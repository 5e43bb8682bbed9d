"""Every shipped config runs: on a tiny tree in its data layout (VOC, made ready by prepare-voc; COCO, made by
prepare-coco; the demo's synthetic set), train (2 iterations, periodic validation on, a tiny random CLIP via
--set), pseudo masks and evaluate, all through the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, TINY_RESNET_ARCH
from PIL import Image

from weakclip.cli import main
from weakclip.config import list_configs, load_config
from weakclip.data.masks import read_mask, write_mask
from weakclip.data.synthetic import make_synthetic_dataset

# pycocotools' own numpy-2 deprecation notice, not ours.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# Sizes only: every data and label setting stays the shipped config's own.
TINY = {
    "model.clip.arch": json.dumps(TINY_ARCH), "model.clip.pretrained": "null", "model.decoder_channels": "32",
    "train.iters": "2", "train.batch_size": "2", "train.crop_size": "64", "train.base_size": "[256, 64]",
    "train.workers": "0", "train.checkpoint_every": "2", "train.log_every": "1", "train.warmup_iters": "1",
    "train.val_every": "1", "infer.short_side": "64", "infer.scales": "[1.0]", "infer.crop_size": "64",
    "infer.stride": "43", "infer.crf_workers": "0",
}


def _voc_tree(root: Path) -> Path:
    """A VOCdevkit/VOC2012 layout holding both the voc and the voc-sample-cpu names, labels by prepare-voc."""
    make_synthetic_dataset(root, num_images=4, size=(48, 64), seed=3)
    (root / "cls_labels.json").unlink()  # made from the ground truth below, as a user would
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("\n".join(ids[:2]) + "\n")
    (lists / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[2:]) + "\n")
    (root / "SegmentationClassAug").symlink_to("SegmentationClass")
    mct = root / "SegmentationClassAugPseudoMaskMCT"  # seeds for the training list only, as released
    mct.mkdir()
    for i in ids[:2]:
        (mct / f"{i}.png").symlink_to(root / "Seeds" / f"{i}.png")
    assert main(["prepare-voc", "--root", str(root)]) == 0
    return root


def _coco_tree(tmp_path: Path) -> Path:
    """COCO 2014 instances for 4 images (boxes of people, dogs and toothbrushes) through prepare-coco."""
    rng = np.random.default_rng(0)
    out = tmp_path / "COCO14"
    for split, first in (("train", 0), ("val_5000", 2)):
        images_dir = tmp_path / f"{split}2014"
        images_dir.mkdir()
        images, annotations = [], []
        for n in range(first, first + 2):
            name = f"COCO_{split}_{n:012d}.jpg"
            pixels = rng.integers(0, 80, (48, 64, 3), dtype=np.uint8)
            for k, (cat, (x, y)) in enumerate(zip((1, 18, 90), ((4, 4), (30, 10), (12, 28)))):
                pixels[y : y + 14, x : x + 20] = (200 - 60 * k, 60 * k, 120)
                annotations.append({"id": len(annotations) + 100 * n, "image_id": n, "category_id": cat,
                                    "iscrowd": 0, "area": 280.0, "bbox": [x, y, 20, 14],
                                    "segmentation": [[x, y, x + 20, y, x + 20, y + 14, x, y + 14]]})
            Image.fromarray(pixels).save(images_dir / name)
            images.append({"id": n, "file_name": name, "height": 48, "width": 64})
        instances = tmp_path / f"instances_{split}.json"
        instances.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
            {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]}))
        assert main(["prepare-coco", "--instances", str(instances), "--images", str(images_dir),
                     "--output", str(out), "--split", split]) == 0
    seeds = out / "cocoPGTMCT"  # CAM-like seeds of the training list: its masks, lower third lost
    seeds.mkdir()
    for stem in (out / "train.txt").read_text().split():
        mask = out / "class_labels" / f"{stem}.png"
        seed = read_mask(mask)
        seed[32:] = 0
        write_mask(seeds / mask.name, seed)
    return out


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trees")
    voc = _voc_tree(base / "VOCdevkit" / "VOC2012")
    demo = base / "demo"
    make_synthetic_dataset(demo, num_images=3, size=(48, 64), seed=4)
    return {"voc": voc, "voc-sample-cpu": voc, "voc-rn50": voc, "voc-rn101": voc, "coco": _coco_tree(base),
            "demo": demo}


def test_the_tests_cover_every_shipped_config(trees):
    assert sorted(trees) == list_configs()


@pytest.mark.parametrize("name", ["voc", "coco", "voc-sample-cpu", "demo", "voc-rn50", "voc-rn101"])
def test_shipped_config_trains_makes_pseudo_masks_and_evaluates(name, trees, tmp_path, capsys):
    root = trees[name]
    arch = TINY_RESNET_ARCH if load_config(name).model.clip.model.startswith("RN") else TINY_ARCH
    tiny = {**TINY, "model.clip.arch": json.dumps(arch), "data.root": str(root)}
    sets = [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")]
    cfg = load_config(name, [s for s in sets if s != "--set"])
    assert cfg.data.labels_file == "cls_labels.json" and not cfg.data.labels_from_seeds
    run, masks = tmp_path / "run", tmp_path / "masks"
    assert main(["train", "--config", name, "--output", str(run), *sets]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    scores = (run / "metrics.csv").read_text()
    if cfg.data.val_split:  # validation on the val split's ground truth at every iteration
        assert "val/miou" in scores.splitlines()[0] and "validation skipped" not in err
    else:
        assert "val/miou" not in scores
    assert main(["pseudo-masks", "--config", name, "--checkpoint", str(run / "model.safetensors"),
                 "--output", str(masks), *sets]) == 0, capsys.readouterr().err
    listed = root / ("ImageSets/Segmentation" if name != "coco" else "") / f"{cfg.data.split}.txt"
    ids = listed.read_text().split()
    assert sorted(p.stem for p in masks.glob("*.png")) == sorted(ids)
    assert main(["evaluate", "--pred", str(masks), "--gt", str(root / cfg.data.gt_dir), "--config", name,
                 "--list", str(listed), "--json", str(tmp_path / "scores.json"), *sets]) == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert result["num_images"] == len(ids) and 0 <= result["miou"] <= 100


def test_validation_without_ground_truth_is_skipped_with_a_note(trees, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    shutil.copytree(trees["voc"], root, symlinks=True)
    (root / "SegmentationClassAug").unlink()
    (root / "SegmentationClassAug").mkdir()
    sets = [arg for key, value in {**TINY, "data.root": str(root)}.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", "--config", "voc", "--output", str(tmp_path / "run"), *sets]) == 0
    assert (f"weakclip: warning: validation skipped: no ground truth for the val split in "
            f"{root / 'SegmentationClassAug'}") in capsys.readouterr().err
