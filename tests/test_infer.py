"""Inference: windows, view averaging, the Eq. 14 filter, and resumable, never-stale pseudo masks."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import make_data_root, sample_ids, write_tiny_config

from weakclip.cli import main
from weakclip.config import CRFConfig, InferConfig, load_config
from weakclip.data.datasets import list_samples
from weakclip.data.masks import read_mask
from weakclip.distributed import DistInfo
from weakclip.infer import label_filter, multiscale_probs, sliding_logits, view_size, window_starts
from weakclip.jobs import write_label_maps

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def test_window_starts_match_the_released_grid():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]
    # ceil((1000 - 512) / 341) + 1 = 3 windows, the last one ending at the border
    assert window_starts(1000, 512, 341) == [0, 341, 488]


def test_view_size_fits_short_and_long_side():
    assert view_size(375, 500, 512, 1.0) == (512, 683)
    assert view_size(100, 1000, 100, 1.0) == (40, 400)  # long side bounded by 4 x short


def test_sliding_windows_equal_one_pass_for_a_pointwise_predictor():
    conv = torch.nn.Conv2d(3, 5, 1)
    predict = lambda x: conv(x.float() / 255)
    views = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((90, 130), (50, 130), (90, 130))]
    with torch.no_grad():
        for batch_size in (1, 3, 16):
            out = dict(sliding_logits(predict, views, 64, 43, batch_size))
            assert sorted(out) == [0, 1, 2]
            for v, view in enumerate(views):
                torch.testing.assert_close(out[v], predict(view[None])[0])


def test_flip_views_are_unflipped_before_averaging():
    # A predictor that scores class 1 on the left half of whatever it sees: unflipped, the flipped view votes
    # for the right half, so the average is 0.5 everywhere but at the exact centre line.
    def predict(x):
        w = x.shape[-1]
        logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
        logits[:, 1, :, : w // 2] = 30.0
        logits[:, 0, :, w // 2 :] = 30.0
        return logits

    image = np.zeros((8, 16, 3), dtype=np.uint8)
    icfg = InferConfig(short_side=8, scales=[1.0], flip=True, crop_size=64, stride=43)
    probs = multiscale_probs(predict, image, icfg, torch.device("cpu"))
    torch.testing.assert_close(probs[1], torch.full((8, 16), 0.5), atol=1e-6, rtol=0)
    no_flip = multiscale_probs(predict, image, icfg, torch.device("cpu"), flip=False)
    assert no_flip[1, :, :8].min() > 0.99 and no_flip[1, :, 8:].max() < 0.01


def test_label_filter_marks_pixels_whose_best_class_is_absent():
    probs = torch.zeros(4, 1, 3)
    probs[0, 0, 0], probs[2, 0, 1], probs[3, 0, 2] = 1, 1, 1  # best classes: 0, 2, 3
    keys, unknown = label_filter(probs, labels=[2])
    assert keys == [0, 2]
    assert unknown.tolist() == [[False, False, True]]
    keys, unknown = label_filter(probs, labels=None)  # released behaviour: classes in the argmax
    assert keys == [0, 2, 3] and not unknown.any()


@pytest.fixture
def tiny_masks_setup(tmp_path, voc_sample):
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 6))
    cfg = load_config(str(write_tiny_config(tmp_path / "tiny.yaml", root)))
    return cfg, list_samples(cfg.data, need_seeds=False)


class _Predictor:
    """Per-pixel logits from colour; raises KeyboardInterrupt on call ``stop_at`` (to simulate Ctrl-C)."""

    def __init__(self, k: int, stop_at: int | None = None):
        torch.manual_seed(0)
        self.conv, self.calls, self.stop_at = torch.nn.Conv2d(3, k, 1), 0, stop_at

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        with torch.no_grad():
            return self.conv(x.float() / 64)


def _write(cfg, samples, out, predictor, fingerprint, **kw):
    return write_label_maps(predictor, samples, out, cfg.infer, CPU, fingerprint,
                            use_labels=True, crf_params=cfg.infer.crf_params, progress=False, **kw)


def test_interrupted_run_resumes_and_new_checkpoint_redoes_all(tiny_masks_setup, tmp_path):
    cfg, samples = tiny_masks_setup
    out = tmp_path / "masks"
    fp = {"checkpoint_sha256": "aaa"}
    with pytest.raises(KeyboardInterrupt):
        _write(cfg, samples, out, _Predictor(21, stop_at=4), fp)  # one call per image: 3 images finished
    done = sorted(p.name for p in out.glob("*.png"))
    assert 1 <= len(done) <= 3
    stamps = {name: (out / name).stat().st_mtime_ns for name in done}

    summary = _write(cfg, samples, out, _Predictor(21), fp)
    assert summary["skipped"] == len(done) and summary["written"] == len(samples) - len(done)
    assert all((out / name).stat().st_mtime_ns == stamps[name] for name in done)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(s.id for s in samples)

    summary = _write(cfg, samples, out, _Predictor(21), {"checkpoint_sha256": "bbb"}, reset=True)
    assert summary == {"written": len(samples), "skipped": 0, "output": str(out), "missing": 0,
                       "other_class_pixels": 0}


def test_pseudo_masks_respect_image_labels_and_sizes(tiny_masks_setup, tmp_path):
    cfg, samples = tiny_masks_setup
    out = tmp_path / "masks"
    _write(cfg, samples, out, _Predictor(21), {"checkpoint_sha256": "x"})
    for s in samples:
        mask = read_mask(out / f"{s.id}.png")
        assert mask.shape == read_mask(s.image.parent.parent / "SegmentationClass" / f"{s.id}.png").shape
        assert set(np.unique(mask)) <= {0, 255, *s.labels}


def test_saved_probs_are_the_crf_input_of_the_image_classes_only(tiny_masks_setup, tmp_path):
    cfg, samples = tiny_masks_setup
    cfg.infer.save_probs_size = 10_000  # full resolution, to compare with the label maps
    cfg.infer.crf = False
    out = tmp_path / "masks"
    write_label_maps(_Predictor(21), samples, out, cfg.infer, CPU, {"checkpoint_sha256": "x"}, use_labels=True,
                     crf_params=None, save_probs=True, progress=False)
    for s in samples:
        path = out / "probs" / f"{s.id}.npz"
        with zipfile.ZipFile(path) as archive:
            assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
        saved = np.load(path)
        assert saved["classes"].tolist() == [0, *sorted(s.labels)]
        probs = saved["probs"]
        assert probs.dtype == np.float16 and probs.shape[0] == len(s.labels) + 1
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
        label = saved["classes"][probs.argmax(0)]
        label[saved["unknown"]] = 255
        mask = read_mask(out / f"{s.id}.png")
        assert probs.shape[1:] == mask.shape
        assert (label == mask).mean() > 0.999  # float16 may flip a near-tie


def test_pseudo_masks_command_end_to_end(tmp_path, voc_sample):
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 3))
    config = write_tiny_config(tmp_path / "tiny.yaml", root, train={"iters": 2})
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "model.safetensors")
    args = ["pseudo-masks", "--config", str(config), "--checkpoint", ckpt, "--output", str(tmp_path / "pm")]
    assert main([*args, "--save-probs"]) == 0
    assert len(list((tmp_path / "pm").glob("*.png"))) == 3
    assert len(list((tmp_path / "pm" / "probs").glob("*.npz"))) == 3
    assert json.loads((tmp_path / "pm" / "summary.json").read_text())["images"] == 3
    assert main(["evaluate", "--pred", str(tmp_path / "pm"), "--gt", str(root / "SegmentationClass"),
                 "--config", str(config), "--json", str(tmp_path / "scores.json")]) == 0
    assert (tmp_path / "scores.json").is_file()


def test_pseudo_masks_and_predict_run_the_refiner_at_infer_precision(tmp_path, voc_sample, monkeypatch):
    import weakclip.infer

    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 1))
    config = write_tiny_config(tmp_path / "tiny.yaml", root, train={"iters": 1}, infer={"crf": False})
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    asked = []
    real = weakclip.infer.refiner_predictor

    def recording(model, device, precision="fp32"):
        asked.append(precision)
        return real(model, device, precision)

    monkeypatch.setattr(weakclip.infer, "refiner_predictor", recording)
    common = ["--config", str(config), "--checkpoint", str(tmp_path / "run" / "model.safetensors"),
              "--set", "infer.precision=bf16"]
    assert main(["pseudo-masks", *common, "--output", str(tmp_path / "pm")]) == 0
    assert main(["predict", *common, "--split", "train", "--output", str(tmp_path / "pred")]) == 0
    assert asked == ["bf16", "bf16"]


def test_missing_checkpoint_is_one_line(tmp_path, voc_sample, capsys):
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 2))
    config = write_tiny_config(tmp_path / "tiny.yaml", root)
    code = main(["pseudo-masks", "--config", str(config), "--checkpoint", str(tmp_path / "none.safetensors"),
                 "--output", str(tmp_path / "pm")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"weakclip: error: {tmp_path / 'none.safetensors'}: checkpoint not found"


def test_crf_changes_labels_along_edges():
    """The post-processing CRF really runs in the worker path (a blocky input gets image-aligned)."""
    from weakclip.jobs import _finish

    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, 13:] = 255
    probs = np.zeros((2, 32, 32), dtype=np.float32)
    probs[0, :, :16], probs[1, :, 16:] = 0.6, 0.6
    probs[1, :, :16], probs[0, :, 16:] = 0.4, 0.4
    job = ("x", probs, [0, 7], image, np.zeros((32, 32), bool), None, CRFConfig(3, 3, 83, 5, 3, 10), 255, None)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        job = (*job[:5], Path(d) / "x.png", *job[6:])
        _finish(job)
        label = read_mask(Path(d) / "x.png")
    assert (label[:, 13:16] == 7).all() and (label[:, :12] == 0).all()
