"""A shortened `weakclip demo`: every file it promises, and figures that match an independent count."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import torch
from conftest import make_data_root, sample_ids
from PIL import Image
from safetensors.torch import save_file

from weakclip.checkpoints import load_refiner
from weakclip.cli import main
from weakclip.config import load_config


def _miou(pred_dir, gt_dir, ids, k):
    """Plain per-class IoU over pixels whose ground truth is not 255 (a predicted 255 is a miss)."""
    inter, union = np.zeros(k), np.zeros(k)
    for i in ids:
        p = np.array(Image.open(pred_dir / f"{i}.png"))
        g = np.array(Image.open(gt_dir / f"{i}.png"))
        valid = g != 255
        for c in range(k):
            pc, gc = (p == c) & valid, (g == c) & valid
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
    present = union > 0
    return 100 * (inter[present] / union[present]).mean()


def test_shortened_demo_writes_report_masks_and_grids(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--iters", "3", "--num-images", "6"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"seeds_miou", "pseudo_mask_miou", "seconds"}
    ids = (out / "data" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == 6
    gt = out / "data" / "SegmentationClass"
    assert abs(report["seeds_miou"] - _miou(out / "data" / "Seeds", gt, ids, 5)) < 1e-6
    assert abs(report["pseudo_mask_miou"] - _miou(out / "pseudo_masks", gt, ids, 5)) < 1e-6
    assert len(list((out / "grids").glob("*.png"))) == 6
    page = (out / "report" / "index.html").read_text()
    assert report["html_report"] == str(out / "report" / "index.html") and all(i in page for i in ids)
    assert (out / "train" / "model.safetensors").is_file() and (out / "train" / "metrics.csv").is_file()
    assert 0 < report["seconds"] < 600

    # Rerunning reuses the finished training and pseudo masks.
    assert main(["demo", "--output", str(out), "--iters", "3", "--num-images", "6"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["pseudo_mask_miou"] == report["pseudo_mask_miou"]


def test_demo_on_real_sample_folder(tmp_path, voc_sample, capsys):
    # --data runs the same commands with the voc-sample-cpu settings on any voc-sample-like folder.
    ids = sample_ids(voc_sample, 3)
    root = make_data_root(tmp_path / "data", voc_sample, ids)
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--data", str(root), "--iters", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    gt = root / "SegmentationClass"
    assert abs(report["seeds_miou"] - _miou(root / "Seeds", gt, ids, 21)) < 1e-6
    assert abs(report["pseudo_mask_miou"] - _miou(out / "pseudo_masks", gt, ids, 21)) < 1e-6
    assert "voc-sample-cpu" in (out / "config.yaml").read_text()
    assert "randomly initialised CLIP" in capsys.readouterr().out  # random weights are said, not hidden


def test_demo_with_clip_weights_file_uses_that_model(tmp_path):
    # --clip swaps the configs' small random CLIP for the named open_clip model loaded from the file.
    torch.manual_seed(5)
    ref = open_clip.create_model("ViT-S-16", pretrained=None)
    weights = tmp_path / "vit-s-16.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--iters", "1", "--num-images", "4", "--clip", str(weights),
            "--clip-model", "ViT-S-16"]
    assert main(argv) == 0
    cfg = load_config(str(out / "train" / "config.yaml"))
    assert (cfg.model.clip.model, cfg.model.clip.arch, cfg.model.clip.pretrained) == ("ViT-S-16", None, str(weights))
    model, _ = load_refiner(out / "train" / "model.safetensors", cfg)
    torch.testing.assert_close(model.visual.visual.conv1.weight, ref.visual.conv1.weight, rtol=0, atol=0)


def test_demo_from_labels_alone_scores_seeds_and_pseudo_masks(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--iters", "1", "--num-images", "4", "--seeds", "clip-es"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == "clip-es" and report["seeds_dir"] == str(out / "seeds")
    ids = (out / "data" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(p.stem for p in (out / "seeds").glob("*.png")) == sorted(ids)
    cfg = load_config(str(out / "train" / "config.yaml"))
    assert cfg.data.seeds_dir == str((out / "seeds").resolve())  # the refiner trained on the CLIP-ES seeds
    gt = out / "data" / "SegmentationClass"
    assert abs(report["seeds_miou"] - _miou(out / "seeds", gt, ids, 5)) < 1e-6
    assert abs(report["pseudo_mask_miou"] - _miou(out / "pseudo_masks", gt, ids, 5)) < 1e-6
