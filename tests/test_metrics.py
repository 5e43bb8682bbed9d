"""Metrics: hand-computed confusion/IoU values, the real sample's seed mIoU, input errors, reports, plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from weakclip.config import VOC_CLASSES
from weakclip.data.masks import read_mask, write_mask
from weakclip.errors import WeakclipError
from weakclip.metrics import ConfusionMeter, confusion_matrix, evaluate_dirs, save_plots

# 3 classes; gt has one ignored pixel (255), the prediction has two unassigned pixels (255).
GT = np.array([[0, 0, 0, 1],
               [1, 1, 2, 2],
               [2, 2, 255, 0]], dtype=np.uint8)
PRED = np.array([[0, 0, 1, 1],
                 [1, 255, 2, 0],
                 [2, 2, 2, 255]], dtype=np.uint8)
# By hand, pixel pairs (gt, pred): (0,0) x2, (0,1), (0,255), (1,1) x2, (1,255), (2,2) x3, (2,0); (255,2) ignored.
EXPECTED_MATRIX = np.array([[2, 1, 0],
                            [0, 2, 0],
                            [1, 0, 3]])
# class totals: gt 4/3/4 (unassigned pixels included), predicted 3/3/3, true positives 2/2/3
EXPECTED_IOU = [100 * 2 / 5, 100 * 2 / 4, 100 * 3 / 4]  # TP / (gt + pred - TP)
EXPECTED_PRECISION = [100 * 2 / 3, 100 * 2 / 3, 100.0]
EXPECTED_RECALL = [100 * 2 / 4, 100 * 2 / 3, 100 * 3 / 4]
NAMES3 = ["a", "b", "c"]


def test_confusion_matrix_by_hand():
    m = confusion_matrix(PRED, GT, 3)
    assert m.dtype == np.int64
    np.testing.assert_array_equal(m, EXPECTED_MATRIX)


def test_scores_by_hand():
    meter = ConfusionMeter(3)
    meter.update(PRED, GT)
    r = meter.result(NAMES3)
    for i, name in enumerate(NAMES3):
        assert r.per_class[name]["iou"] == pytest.approx(EXPECTED_IOU[i])
        assert r.per_class[name]["precision"] == pytest.approx(EXPECTED_PRECISION[i])
        assert r.per_class[name]["recall"] == pytest.approx(EXPECTED_RECALL[i])
    assert r.miou == pytest.approx(55.0)  # (40 + 50 + 75) / 3
    assert r.pixel_accuracy == pytest.approx(100 * 7 / 11)
    assert r.ignored_prediction_share == pytest.approx(100 * 2 / 11)
    np.testing.assert_array_equal(r.unassigned, [1, 1, 0])
    assert r.num_images == 1


def test_any_out_of_range_prediction_is_a_miss():
    gt = np.array([[1, 1]], dtype=np.uint8)
    pred = np.array([[1, 7]], dtype=np.uint8)  # 7 >= K
    meter = ConfusionMeter(3)
    meter.update(pred, gt)
    r = meter.result(NAMES3)
    assert r.per_class["b"]["recall"] == pytest.approx(50.0)
    assert r.per_class["b"]["iou"] == pytest.approx(50.0)
    assert r.ignored_prediction_share == pytest.approx(50.0)


def test_absent_class_is_nan_and_left_out_of_miou_but_false_positive_class_counts():
    gt = np.zeros((2, 2), dtype=np.uint8)
    pred = np.array([[0, 0], [0, 1]], dtype=np.uint8)
    meter = ConfusionMeter(3)
    meter.update(pred, gt)
    r = meter.result(NAMES3)
    assert r.per_class["a"]["iou"] == pytest.approx(75.0)
    assert r.per_class["b"]["iou"] == 0.0  # predicted, never true: counts as 0
    assert math.isnan(r.per_class["b"]["recall"])
    assert all(math.isnan(v) for v in r.per_class["c"].values())  # in neither gt nor prediction
    assert r.miou == pytest.approx(37.5)  # mean of 75 and 0, c left out


def test_meter_merges_images_meters_and_raw_counts():
    top, bottom = ConfusionMeter(3), ConfusionMeter(3)
    top.update(PRED[:1], GT[:1])
    bottom.update(PRED[1:], GT[1:])
    top.add(bottom)
    assert top.num_images == 2
    np.testing.assert_array_equal(top.result(NAMES3).confusion, EXPECTED_MATRIX)
    raw = ConfusionMeter(3)
    raw.add(EXPECTED_MATRIX, num_images=5)  # a plain (K, K) matrix, e.g. from another tool
    r = raw.result(NAMES3)
    assert r.num_images == 5
    assert r.per_class["a"]["iou"] == pytest.approx(100 * 2 / 4)  # no unassigned column: gt total 3
    with pytest.raises(ValueError):
        raw.add(np.zeros((4, 4)))


def test_bad_gt_value_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((1, 2), np.uint8), np.array([[0, 9]], np.uint8), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((1, 2), np.uint8), np.zeros((2, 1), np.uint8), 3)


@pytest.fixture(scope="module")
def seed_result(voc_sample):
    ids = (voc_sample / "ImageSets/Segmentation/train.txt").read_text().split()
    return evaluate_dirs(voc_sample / "Seeds", voc_sample / "SegmentationClass", VOC_CLASSES,
                         ids=ids, progress=False)


def test_seed_miou_on_real_sample(seed_result):
    assert round(seed_result.miou, 1) == 69.5  # the figure in voc-sample/README.md
    assert seed_result.num_images == 200
    assert seed_result.ignored_prediction_share == 0.0  # seeds are dense
    assert list(seed_result.per_class) == list(VOC_CLASSES)
    for name, scores in seed_result.per_class.items():
        for value in scores.values():  # every class occurs in the sample (README): all defined
            assert 0.0 < value <= 100.0, name
    assert seed_result.per_class["background"]["iou"] > 80.0
    assert 85.0 < seed_result.pixel_accuracy < 99.0


def test_default_ids_are_the_predictions(voc_sample, tmp_path):
    for image_id in ("2007_000032", "2007_000033"):
        write_mask(tmp_path / f"{image_id}.png", read_mask(voc_sample / "SegmentationClass" / f"{image_id}.png"))
    r = evaluate_dirs(tmp_path, voc_sample / "SegmentationClass", VOC_CLASSES, progress=False)
    assert r.num_images == 2
    assert r.miou == pytest.approx(100.0)  # gt scored against itself


def test_size_mismatch_names_the_file(voc_sample, tmp_path):
    write_mask(tmp_path / "2007_000032.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(WeakclipError, match=r"2007_000032\.png.*12x10") as info:
        evaluate_dirs(tmp_path, voc_sample / "SegmentationClass", VOC_CLASSES, ids=["2007_000032"],
                      progress=False)
    assert "SegmentationClass" in str(info.value)  # both files named
    assert "\n" not in str(info.value)


def test_listed_id_without_prediction_names_the_file(voc_sample, tmp_path):
    write_mask(tmp_path / "2007_000032.png", read_mask(voc_sample / "SegmentationClass/2007_000032.png"))
    with pytest.raises(WeakclipError, match=r"2007_000033\.png"):
        evaluate_dirs(tmp_path, voc_sample / "SegmentationClass", VOC_CLASSES,
                      ids=["2007_000032", "2007_000033"], progress=False)


def test_bad_gt_value_names_the_gt_file(tmp_path):
    (tmp_path / "pred").mkdir()
    write_mask(tmp_path / "pred/x.png", np.zeros((4, 4), np.uint8))
    write_mask(tmp_path / "gt/x.png", np.full((4, 4), 30, np.uint8))
    with pytest.raises(WeakclipError, match=r"gt/x\.png.*30"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt", VOC_CLASSES, progress=False)


def test_json_dict_has_the_keys_and_null_for_nan():
    meter = ConfusionMeter(4)
    meter.update(PRED, GT)  # class 3 is absent: NaN everywhere
    d = meter.result([*NAMES3, "d"]).to_json_dict()
    assert set(d) == {"miou", "per_class", "pixel_accuracy", "predicted_255_share", "num_images"}
    assert d["per_class"]["d"] == {"iou": None, "precision": None, "recall": None}
    assert d["miou"] == pytest.approx(55.0)
    assert d["predicted_255_share"] == pytest.approx(100 * 2 / 11)
    assert json.loads(json.dumps(d, allow_nan=False)) == d  # strict JSON


def test_markdown_has_the_paper_layout_for_voc(seed_result):
    lines = seed_result.markdown().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert len(header) == 22  # 21 classes + mIoU
    assert header[:3] == ["bkg", "plane", "bike"] and header[-2:] == ["tv", "mIoU"]
    values = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(values) == 22 and values[-1] == "69.5"
    assert "| background |" in seed_result.markdown()  # the long table uses the full names


def test_markdown_keeps_other_names_and_dashes_nan():
    meter = ConfusionMeter(4)
    meter.update(PRED, GT)
    text = meter.result([*NAMES3, "d"]).markdown()
    assert text.splitlines()[0] == "| a | b | c | d | mIoU |"
    assert text.splitlines()[2] == "| 40.0 | 50.0 | 75.0 | - | 55.0 |"


@pytest.mark.parametrize("log_color", [False, True])
def test_save_plots_writes_two_pngs(tmp_path, log_color):
    pytest.importorskip("matplotlib")
    meter = ConfusionMeter(3)
    meter.update(PRED, GT)
    paths = save_plots(meter.result(NAMES3), NAMES3, tmp_path / "plots", log_color=log_color)
    assert len(paths) == 2
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["confusion_matrix.png", "per_class_iou.png"]
