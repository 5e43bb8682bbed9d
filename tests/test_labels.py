"""Image-level labels are the known labels: prepare-voc derives them from the ground truth, the label filter
and the CRF's class set use them even where the CAM seed missed a class, seeds only by opt-in, and bad label
files stop in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import make_data_root, write_tiny_config
from PIL import Image

from weakclip.cli import main
from weakclip.config import load_config
from weakclip.data.datasets import list_samples
from weakclip.data.masks import read_mask, write_mask
from weakclip.data.voc import prepare_voc
from weakclip.distributed import DistInfo
from weakclip.errors import WeakclipError
from weakclip.infer import label_filter
from weakclip.jobs import write_label_maps

MISSED_CAR = "2007_001857"  # labels [7 car, 15 person]; its simulated seed holds only the person
EMPTY_SEED = "2007_000713"  # labels [4 boat]; its seed is all background

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


# ------------------------------------------------------------------------------------------- prepare-voc


def test_prepare_voc_reproduces_the_samples_labels_from_its_ground_truth(voc_sample, tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "SegmentationClass").symlink_to(voc_sample / "SegmentationClass")
    ids = (voc_sample / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids + ["2099_000001"]) + "\n")
    assert main(["prepare-voc", "--root", str(root)]) == 0
    written = json.loads((root / "cls_labels.json").read_text())
    # The sample's own labels file was made independently from the same ground truth.
    assert written == json.loads((voc_sample / "cls_labels.json").read_text())
    result = prepare_voc(root, progress=False)
    assert result["lists"] == {"train": {"ids": 201, "without_labels": 1}}
    assert result["images"] == 200 and result["ground_truth"] == str(root / "SegmentationClass")


def test_prepare_voc_prefers_the_augmented_ground_truth_and_rejects_bad_values(tmp_path):
    root = tmp_path / "VOC2012"
    write_mask(root / "SegmentationClass" / "a.png", np.array([[0, 3]], np.uint8))
    write_mask(root / "SegmentationClassAug" / "a.png", np.array([[0, 255], [20, 5]], np.uint8))
    write_mask(root / "SegmentationClassAug" / "b.png", np.zeros((2, 2), np.uint8))
    prepare_voc(root, progress=False)
    assert json.loads((root / "cls_labels.json").read_text()) == {"a": [5, 20], "b": []}
    prepare_voc(root, gt_dir="SegmentationClass", output=tmp_path / "x.json", progress=False)
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [3]}
    write_mask(root / "SegmentationClassAug" / "c.png", np.array([[0, 21]], np.uint8))
    with pytest.raises(WeakclipError, match=r"SegmentationClassAug/c\.png: value 21 is neither a VOC class"):
        prepare_voc(root, progress=False)
    with pytest.raises(WeakclipError, match="no ground-truth folder"):
        prepare_voc(tmp_path / "VOC2012" / "SegmentationClass", progress=False)


# ---------------------------------------------------------------------------- labels reach filter and CRF


class _Everywhere:
    """Logits for one class on every pixel (the refiner found it), background a little lower."""

    def __init__(self, k: int, cls: int):
        self.k, self.cls = k, cls

    def __call__(self, x):
        logits = torch.zeros(x.shape[0], self.k, *x.shape[2:])
        logits[:, self.cls] = 4.0
        logits[:, 0] = 2.0
        return logits


@pytest.mark.parametrize(("image_id", "cls"), [(MISSED_CAR, 7), (EMPTY_SEED, 4)])
def test_a_labelled_class_the_seed_misses_is_kept_by_the_filter_and_the_crf(voc_sample, tmp_path, image_id, cls):
    root = make_data_root(tmp_path / "data", voc_sample, [image_id])
    assert cls not in np.unique(read_mask(root / "Seeds" / f"{image_id}.png"))
    cfg = load_config(str(write_tiny_config(tmp_path / "c.yaml", root)))
    (sample,) = list_samples(cfg.data, need_seeds=False)
    assert cls in sample.labels
    image = np.asarray(Image.open(sample.image).convert("RGB"))
    probs = torch.zeros(21, *image.shape[:2])
    probs[cls] = 1.0
    keys, unknown = label_filter(probs, sample.labels)
    assert cls in keys and not unknown.any()

    out = tmp_path / "masks"
    write_label_maps(_Everywhere(21, cls), [sample], out, cfg.infer, CPU, {"run": 1},
                     use_labels=True, crf_params=cfg.infer.crf_params, progress=False)
    mask = read_mask(out / f"{image_id}.png")
    assert (mask == cls).mean() > 0.9  # through the CRF over background + the image's labels

    # The same run with labels taken from the seed loses the class: every pixel becomes unknown (255).
    seeded = load_config(str(write_tiny_config(tmp_path / "s.yaml", root, data={"labels_from_seeds": True})))
    (from_seed,) = list_samples(seeded.data, need_seeds=False)
    write_label_maps(_Everywhere(21, cls), [from_seed], out, cfg.infer, CPU, {"run": 2},
                     use_labels=True, crf_params=cfg.infer.crf_params, progress=False, reset=True)
    assert (read_mask(out / f"{image_id}.png") == 255).all()


# --------------------------------------------------------------------------------------- one-line errors


@pytest.fixture
def labelled_root(voc_sample, tmp_path):
    root = make_data_root(tmp_path / "data", voc_sample, [MISSED_CAR, EMPTY_SEED])
    return root, write_tiny_config(tmp_path / "c.yaml", root)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("weakclip: error: ")
    return err[0]


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", r"cls_labels\.json: cannot read labels \("),
    (json.dumps({MISSED_CAR: [7, 21], EMPTY_SEED: [4]}), rf"cls_labels\.json: {MISSED_CAR}: class 21 outside 1\.\.20"),
    (json.dumps({MISSED_CAR: [7, 15]}), rf"cls_labels\.json: no labels for id {EMPTY_SEED} \(listed in .*train\.txt\)"),
])
def test_bad_labels_file_is_one_line(labelled_root, tmp_path, capsys, content, problem):
    root, config = labelled_root
    (root / "cls_labels.json").unlink()
    (root / "cls_labels.json").write_text(content)
    line = _one_line_error(capsys, ["train", "--config", str(config), "--output", str(tmp_path / "run")])
    assert f"{root}/cls_labels.json" in line
    assert re.search(problem, line)


def test_missing_labels_file_says_how_to_make_it(labelled_root, tmp_path, capsys):
    root, config = labelled_root
    (root / "cls_labels.json").unlink()
    line = _one_line_error(capsys, ["train", "--config", str(config), "--output", str(tmp_path / "run")])
    assert line == (f"weakclip: error: {root}/cls_labels.json: image-level labels not found; make it with "
                    f"`weakclip prepare-voc --root {root}`, or set data.labels_from_seeds: true to take them "
                    "from the seeds (a class the seed misses is then lost)")
    line = _one_line_error(capsys, ["pseudo-masks", "--config", str(config), "--set", "data.labels_file=null",
                                    "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "m")])
    assert line.startswith("weakclip: error: data.labels_file is null; make it with `weakclip prepare-voc")


def test_shipped_configs_read_the_labels_files_by_default():
    for name in ("voc", "coco"):
        data = load_config(name).data
        assert data.labels_file == "cls_labels.json" and not data.labels_from_seeds
