"""Sample listing on the real VOC sample, label formats, preflight failures, the dataset's determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip.config import DataConfig
from weakclip.data.datasets import SegDataset, list_samples, load_image, preflight
from weakclip.data.masks import read_mask, write_mask
from weakclip.data.transforms import TrainTransform
from weakclip.errors import WeakclipError

IDS = ["2007_000032", "2007_000063", "2007_001678"]


def _voc_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(kind="voc", root=str(root), split="train", **kw)


def _mini_voc(src: Path, dst: Path, ids: list[str] = IDS) -> Path:
    """Copy a handful of the sample's files into a VOC layout under dst."""
    for sub, ext in (("JPEGImages", "jpg"), ("Seeds", "png"), ("SegmentationClass", "png")):
        (dst / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(src / sub / f"{i}.{ext}", dst / sub / f"{i}.{ext}")
    (dst / "ImageSets" / "Segmentation").mkdir(parents=True)
    (dst / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    labels = json.loads((src / "cls_labels.json").read_text())
    (dst / "cls_labels.json").write_text(json.dumps({i: labels[i] for i in ids}))
    return dst


# ---------------------------------------------------------------------------------------------- listing


def test_voc_listing_real_sample(voc_sample: Path) -> None:
    samples = list_samples(_voc_cfg(voc_sample), need_gt=True)
    assert len(samples) == 200
    assert len({s.id for s in samples}) == 200
    by_id = {s.id: s for s in samples}
    # Checked by hand against the unique values of SegmentationClass/<id>.png (0 and 255 dropped).
    assert by_id["2007_000032"].labels == (1, 15)
    assert by_id["2007_000063"].labels == (9, 12)
    assert by_id["2007_001678"].labels == (9, 15, 20)
    s = by_id["2007_000032"]
    assert s.image == voc_sample / "JPEGImages" / "2007_000032.jpg"
    assert s.seed == voc_sample / "Seeds" / "2007_000032.png"
    assert s.gt == voc_sample / "SegmentationClass" / "2007_000032.png"
    assert list_samples(_voc_cfg(voc_sample), need_seeds=False)[0].seed is None


def test_labels_from_seeds_only_by_opt_in_with_a_warning(voc_sample: Path, capsys) -> None:
    samples = {s.id: s for s in list_samples(_voc_cfg(voc_sample, labels_from_seeds=True))}
    assert "weakclip: warning: image-level labels taken from the seeds" in capsys.readouterr().err
    assert samples["2007_000032"].labels == (1, 15)
    # The simulated seed of this image lost the car (7): labels follow the seed, not the ground truth.
    assert samples["2007_001857"].labels == (15,)
    assert samples["2007_000713"].labels == ()  # its seed is all background


def test_duplicate_ids_listed_once(tmp_path: Path) -> None:
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("b\na\nb\n\na\nc\n")
    (tmp_path / "cls_labels.json").write_text(json.dumps({"a": [1], "b": [2, 3], "c": [20]}))
    samples = list_samples(_voc_cfg(tmp_path))
    assert [s.id for s in samples] == ["b", "a", "c"]
    assert [s.labels for s in samples] == [(2, 3), (1,), (20,)]


def test_label_formats_one_hot_names_npy(tmp_path: Path) -> None:
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nc\n")
    one_hot = [0.0] * 20
    one_hot[14] = 1.0  # foreground-only vector: slot 14 is class 15 (person)
    table = {"a": one_hot, "b": ["cat", "dog"], "c": [0, 5]}
    (tmp_path / "cls_labels.json").write_text(json.dumps(table))
    assert [s.labels for s in list_samples(_voc_cfg(tmp_path))] == [(15,), (8, 12), (5,)]
    np.save(tmp_path / "cls_labels.npy", {k: np.asarray(v) for k, v in table.items() if k != "b"}
            | {"b": np.eye(20)[[7, 11]].sum(0)})
    got = [s.labels for s in list_samples(_voc_cfg(tmp_path, labels_file="cls_labels.npy"))]
    assert got == [(15,), (8, 12), (5,)]


def test_bad_labels_are_reported(tmp_path: Path) -> None:
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    labels = tmp_path / "cls_labels.json"
    labels.write_text(json.dumps({"a": [1]}))
    with pytest.raises(WeakclipError, match=r"cls_labels\.json: no labels for id b"):
        list_samples(_voc_cfg(tmp_path))
    labels.write_text(json.dumps({"a": [1], "b": [21]}))
    with pytest.raises(WeakclipError, match=r"cls_labels\.json: b: class 21 outside 1\.\.20"):
        list_samples(_voc_cfg(tmp_path))
    labels.write_text(json.dumps({"a": [1], "b": ["unicorn"]}))
    with pytest.raises(WeakclipError, match="unknown class name 'unicorn'"):
        list_samples(_voc_cfg(tmp_path))


def test_missing_or_empty_list(tmp_path: Path) -> None:
    list_file = tmp_path / "ImageSets" / "Segmentation" / "train.txt"
    with pytest.raises(WeakclipError, match=f"{list_file}: list file not found"):
        list_samples(_voc_cfg(tmp_path))
    list_file.parent.mkdir(parents=True)
    list_file.write_text("\n\n")
    with pytest.raises(WeakclipError, match=f"{list_file}: the list is empty"):
        list_samples(_voc_cfg(tmp_path))


def test_folder_layout_with_csv_labels(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "seeds").mkdir()
    for stem, value in (("y", 2), ("x", 1)):
        Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        write_mask(tmp_path / "seeds" / f"{stem}.png", np.full((8, 10), value, np.uint8))
    (tmp_path / "labels.csv").write_text("id,labels\nx,cat\ny,1;dog\n")
    cfg = DataConfig(kind="folder", root=str(tmp_path), split="train",
                     class_names=["background", "cat", "dog"])
    samples = list_samples(cfg)
    assert [(s.id, s.labels) for s in samples] == [("x", (1,)), ("y", (1, 2))]
    assert samples[0].image == tmp_path / "images" / "x.png"
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(WeakclipError, match=r"labels\.json: image-level labels not found; write it"):
        list_samples(cfg)
    cfg.labels_from_seeds = True
    assert [s.labels for s in list_samples(cfg)] == [(1,), (2,)]
    preflight(samples, num_classes=3, progress=False)


# --------------------------------------------------------------------------------------------- preflight


def test_preflight_passes_on_good_data(voc_sample: Path, tmp_path: Path) -> None:
    root = _mini_voc(voc_sample, tmp_path / "voc")
    preflight(list_samples(_voc_cfg(root), need_gt=True), num_classes=21, progress=False)


def test_preflight_missing_image(voc_sample: Path, tmp_path: Path) -> None:
    root = _mini_voc(voc_sample, tmp_path / "voc")
    missing = root / "JPEGImages" / f"{IDS[1]}.jpg"
    missing.unlink()
    with pytest.raises(WeakclipError, match=f"{missing}: image not found"):
        preflight(list_samples(_voc_cfg(root)), num_classes=21, progress=False)


def test_preflight_truncated_jpeg(voc_sample: Path, tmp_path: Path) -> None:
    root = _mini_voc(voc_sample, tmp_path / "voc")
    broken = root / "JPEGImages" / f"{IDS[2]}.jpg"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeakclipError, match=f"{broken}: cannot decode image"):
        preflight(list_samples(_voc_cfg(root)), num_classes=21, progress=False)
    with pytest.raises(WeakclipError, match=f"{broken}: cannot decode image"):
        load_image(broken)


def test_preflight_seed_wrong_size(voc_sample: Path, tmp_path: Path) -> None:
    root = _mini_voc(voc_sample, tmp_path / "voc")
    seed = root / "Seeds" / f"{IDS[0]}.png"
    write_mask(seed, np.zeros((10, 12), np.uint8))
    with pytest.raises(WeakclipError, match=f"{seed}: seed is 12x10 but its image .* is 500x281"):
        preflight(list_samples(_voc_cfg(root)), num_classes=21, progress=False)


def test_preflight_label_out_of_range(voc_sample: Path, tmp_path: Path) -> None:
    root = _mini_voc(voc_sample, tmp_path / "voc")
    seed = root / "Seeds" / f"{IDS[1]}.png"
    mask = read_mask(seed)
    mask[5, 5] = 37
    write_mask(seed, mask)
    with pytest.raises(WeakclipError, match=rf"{seed}: label 37 outside 0\.\.20 \(and 255\)"):
        preflight(list_samples(_voc_cfg(root)), num_classes=21, progress=False)


def test_preflight_empty_list(tmp_path: Path) -> None:
    with pytest.raises(WeakclipError, match="my_list.txt"):
        preflight([], num_classes=21, progress=False, list_file=tmp_path / "my_list.txt")


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_item(voc_sample: Path) -> None:
    samples = list_samples(_voc_cfg(voc_sample), need_gt=True)[:2]
    item = SegDataset(samples, None, num_classes=21, with_gt=True)[0]
    assert item["image"].shape == (3, 281, 500) and item["image"].dtype == torch.uint8
    assert item["seed"].shape == (281, 500) and item["seed"].dtype == torch.int64
    assert item["gt"].shape == (281, 500)
    assert torch.equal(torch.nonzero(item["labels"]).flatten(), torch.tensor([0, 1, 15]))
    assert item["id"] == "2007_000032" and item["index"] == 0
    # Pixels are the decoded JPEG in RGB order, untouched.
    rgb = np.asarray(Image.open(voc_sample / "JPEGImages" / "2007_000032.jpg").convert("RGB"))
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), rgb)


def test_dataset_deterministic_per_seed_epoch_index(voc_sample: Path) -> None:
    samples = list_samples(_voc_cfg(voc_sample), need_gt=True)[:3]
    transform = TrainTransform(crop_size=96, base_size=(512, 128))
    ds = SegDataset(samples, transform, num_classes=21, with_gt=True, seed=5)
    first = ds[1]
    assert first["image"].shape == (3, 96, 96) and first["gt"].shape == (96, 96)
    again = SegDataset(samples, transform, num_classes=21, with_gt=True, seed=5)[1]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["seed"], again["seed"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], first["image"])
    # A worker process sees the same augmentation as the main process.
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][1], ds[1]["image"]) and torch.equal(batch["seed"][1], ds[1]["seed"])
