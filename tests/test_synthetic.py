"""Synthetic demo data: layout, ground truth vs seeds, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakclip.config import DataConfig
from weakclip.data.datasets import list_samples, preflight
from weakclip.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, make_synthetic_dataset(root, num_images=24, seed=0)


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _seed_miou(root: Path, ids: list[str], k: int) -> float:
    """mIoU of the seeds against the ground truth (255 ignored), from a plain confusion matrix."""
    conf = np.zeros((k, k), dtype=np.int64)
    for i in ids:
        gt = _png(root / "SegmentationClass" / f"{i}.png").ravel()
        seed = _png(root / "Seeds" / f"{i}.png").ravel()
        valid = gt != 255
        np.add.at(conf, (gt[valid], seed[valid]), 1)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]) * 100)


def test_layout(synthetic: tuple[Path, list[str]]) -> None:
    root, names = synthetic
    assert names[0] == "background" and len(names) >= 4
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == 24 == len(set(ids))
    labels = json.loads((root / "cls_labels.json").read_text())
    assert sorted(labels) == sorted(ids)
    for i in ids:
        image = Image.open(root / "JPEGImages" / f"{i}.jpg")
        assert image.mode == "RGB" and image.size == (160, 160)
        gt, seed = _png(root / "SegmentationClass" / f"{i}.png"), _png(root / "Seeds" / f"{i}.png")
        assert gt.shape == seed.shape == (160, 160)
        assert set(np.unique(gt).tolist()) <= set(range(len(names))) | {255}
        assert set(np.unique(seed).tolist()) <= set(range(len(names)))
        assert (gt == 255).any()  # the boundary band
        assert 1 <= len(labels[i]) <= 3
        assert labels[i] == sorted(set(np.unique(gt).tolist()) - {0, 255})
    cfg = DataConfig(kind="voc", root=str(root), split="train", class_names=names)
    preflight(list_samples(cfg, need_gt=True), num_classes=len(names), progress=False)


def test_seeds_are_coarse_but_informative(synthetic: tuple[Path, list[str]]) -> None:
    root, names = synthetic
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    miou = _seed_miou(root, ids, len(names))
    assert 55 < miou < 78, miou
    # Boundary band: thin (a few percent of pixels), not a blanket.
    band = np.mean([(_png(root / "SegmentationClass" / f"{i}.png") == 255).mean() for i in ids])
    assert 0.005 < band < 0.08


def test_deterministic(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    make_synthetic_dataset(tmp_path / "a", num_images=4, seed=3)
    make_synthetic_dataset(tmp_path / "b", num_images=4, seed=3)
    make_synthetic_dataset(tmp_path / "c", num_images=4, seed=4)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a["Seeds/syn_0000.png"] != c["Seeds/syn_0000.png"]


def test_rejects_unknown_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hexagon"):
        make_synthetic_dataset(tmp_path, num_images=1, classes=("background", "hexagon"))
