"""Retraining on pseudo masks (DDP on CPU, pre-flight errors, augmentation, loss) and predictions
(VOC test-server layout, refiner checkpoints). Models are resnet18 DeepLabV3+ without pretrained weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from weakclip.config import load_config
from weakclip.data.masks import read_mask, write_mask
from weakclip.engine import load_weights, save_weights
from weakclip.errors import WeakclipError
from weakclip.retrain import (
    VOC_TEST_DIR,
    OwnScaleTransform,
    checkpoint_metadata,
    predict,
    retrain,
    segmentation_loss,
)
from weakclip.segmenters import build_segmenter

IDS = 3  # images in the tiny data roots


def tiny_root(voc_sample: Path, tmp_path: Path, split: str = "train") -> tuple[Path, list[str]]:
    """A VOC-layout root in tmp_path with the sample's first IDS images and a ``split`` list (no labels)."""
    ids = (voc_sample / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:IDS]
    root = tmp_path / "data"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i in ids:
        shutil.copy(voc_sample / "JPEGImages" / f"{i}.jpg", root / "JPEGImages")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root, ids


def small_cfg(root: Path, *extra: str):
    return load_config("voc-sample-cpu", [f"data.root={root}", "retrain.crop_size=64", "retrain.batch_size=2",
                                          "train.workers=0", "infer.scales=[1.0]", "infer.short_side=64",
                                          "infer.crop_size=64", "infer.stride=43", "infer.crf_workers=0",
                                          *extra])


def test_torchrun_two_processes_writes_a_loadable_checkpoint(voc_sample, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "weakclip", "retrain", "--config", "voc-sample-cpu", "--masks", str(voc_sample / "Seeds"),
           "--output", str(out), "--set", f"data.root={voc_sample}", "--set", "retrain.iters=2",
           "--set", "retrain.batch_size=4", "--set", "retrain.crop_size=64", "--set", "train.workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "train_done.json").read_text()) == {"iterations": 2}
    assert (out / "checkpoints" / "iter_0000002.safetensors").is_file()
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.retrain.encoder == "resnet18" and cfg.retrain.iters == 2
    model = build_segmenter(cfg.retrain, cfg.num_classes)
    meta = load_weights(out / "model.safetensors", model)
    assert meta["format"] == "segmenter" and meta["arch"] == "deeplabv3plus" and meta["iteration"] == "2"
    logits = model.eval()(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 21, 64, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("problem", ["size", "class"])
def test_bad_mask_stops_with_one_line_naming_the_file(voc_sample, tmp_path, problem):
    root, ids = tiny_root(voc_sample, tmp_path)
    masks = tmp_path / "masks"
    for i in ids:
        write_mask(masks / f"{i}.png", read_mask(voc_sample / "Seeds" / f"{i}.png"))
    bad = masks / f"{ids[1]}.png"
    mask = read_mask(bad)
    if problem == "size":
        write_mask(bad, mask[:-1])
        expected = "seed is"
    else:
        mask[5, 5] = 37
        write_mask(bad, mask)
        expected = "label 37 outside 0..20"
    with pytest.raises(WeakclipError) as exc:
        retrain(small_cfg(root), masks, tmp_path / "run")
    message = str(exc.value)
    assert message.startswith(f"{bad}: {expected}") and "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_own_scale_transform_scales_the_image_itself(voc_sample):
    """scale_range [0.5, 0.5] and a crop larger than the image: the unpadded part is the image at half size."""
    image = np.zeros((375, 500, 3), np.uint8)
    label = np.ones((375, 500), np.uint8)
    out_image, out_label = OwnScaleTransform(600, (0.5, 0.5))(image, label, np.random.default_rng(0))
    assert out_image.shape == (600, 600, 3) and out_label.shape == (600, 600)
    assert (out_label == 1).sum() == 188 * 250 and (out_label[:188, :250] == 1).all()
    assert (out_label[188:] == 255).all() and (out_image[188:] == 0).all()


def test_loss_is_the_mean_over_unignored_pixels():
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 0] = 2.0  # pixel 0: p(class 1) = e^2 / (1 + e^2)
    target = torch.tensor([[[1, 0, 255]]])
    loss = segmentation_loss()(lambda images: logits, {"image": torch.zeros(1, 3, 1, 3, dtype=torch.uint8),
                                                       "seed": target})["total"]
    expected = (np.log1p(np.exp(-2.0)) + np.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    empty = segmentation_loss()(lambda images: logits, {"image": torch.zeros(1, 3, 1, 3, dtype=torch.uint8),
                                                        "seed": torch.full_like(target, 255)})["total"]
    assert empty.item() == 0.0


def segmenter_checkpoint(cfg, tmp_path: Path) -> Path:
    """A randomly initialised segmenter saved as ``weakclip retrain`` saves it."""
    torch.manual_seed(0)
    ckpt = tmp_path / "segmenter.safetensors"
    save_weights(ckpt, build_segmenter(cfg.retrain, cfg.num_classes), checkpoint_metadata(cfg, tmp_path))
    return ckpt


def test_predict_voc_test_layout(voc_sample, tmp_path):
    root, ids = tiny_root(voc_sample, tmp_path, split="test")
    cfg = small_cfg(root)
    ckpt = segmenter_checkpoint(cfg, tmp_path)
    out = tmp_path / "pred"
    summary = predict(cfg, ckpt, "test", out, fmt="voc-test")
    results = out / VOC_TEST_DIR
    assert summary["output"] == str(results) and summary["written"] == IDS
    assert sorted(p.name for p in results.iterdir()) == sorted(f"{i}.png" for i in ids)
    for i in ids:
        with Image.open(results / f"{i}.png") as png, Image.open(root / "JPEGImages" / f"{i}.jpg") as jpg:
            assert png.mode == "P" and png.size == jpg.size
    again = predict(cfg, ckpt, "test", out, fmt="voc-test")  # resumed: nothing redone, nothing extra
    assert again["skipped"] == IDS and len(list(results.iterdir())) == IDS


def test_predict_shards_fill_one_folder_and_lay_out_the_test_server_files_once(voc_sample, tmp_path):
    from weakclip.distributed import Shard

    root, ids = tiny_root(voc_sample, tmp_path, split="test")
    cfg = small_cfg(root)
    ckpt = segmenter_checkpoint(cfg, tmp_path)
    predict(cfg, ckpt, "test", tmp_path / "one")
    out = tmp_path / "sharded"
    first = predict(cfg, ckpt, "test", out, fmt="voc-test", shard=Shard(0, 2))
    assert first["written"] == 2 and first["missing"] == 1 and not (out / VOC_TEST_DIR).exists()
    second = predict(cfg, ckpt, "test", out, fmt="voc-test", shard=Shard(1, 2))
    assert second["written"] == 1 and second["missing"] == 0 and second["output"] == str(out / VOC_TEST_DIR)
    for i in ids:
        assert (out / VOC_TEST_DIR / f"{i}.png").read_bytes() == (tmp_path / "one" / f"{i}.png").read_bytes()


def test_predict_accepts_a_refiner_checkpoint(voc_sample, tmp_path, tiny_clip_cfg):
    from weakclip.model import build_model
    from weakclip.train import checkpoint_metadata as refiner_metadata

    root, ids = tiny_root(voc_sample, tmp_path, split="test")
    cfg = small_cfg(root, "infer.flip=false", "infer.crf=false")
    cfg.model.clip = tiny_clip_cfg
    torch.manual_seed(0)
    ckpt = tmp_path / "refiner.safetensors"
    save_weights(ckpt, build_model(cfg.model, cfg.data.class_names), refiner_metadata(cfg))
    summary = predict(cfg, ckpt, "test", tmp_path / "pred")
    assert summary["written"] == IDS
    assert sorted(p.stem for p in (tmp_path / "pred").glob("*.png")) == sorted(ids)


def test_predict_rejects_an_unknown_checkpoint(voc_sample, tmp_path):
    root, _ = tiny_root(voc_sample, tmp_path, split="test")
    ckpt = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(ckpt))
    with pytest.raises(WeakclipError, match=r"other\.safetensors: not written by `weakclip retrain`"):
        predict(small_cfg(root), ckpt, "test", tmp_path / "pred")
