"""`weakclip seeds`: CLIP-ES seeds from image-level labels, written as the seeds `weakclip train` reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_data_root, sample_ids, write_tiny_config
from PIL import Image

from weakclip.cli import main
from weakclip.config import load_config
from weakclip.data.datasets import list_samples, preflight


@pytest.fixture
def seeds_setup(tmp_path, voc_sample):
    ids = sample_ids(voc_sample, 3)
    root = make_data_root(tmp_path / "data", voc_sample, ids)
    config = write_tiny_config(tmp_path / "tiny.yaml", root, seeds={"crf_workers": 1})
    return ids, root, config


def _seeds(config, out, *extra):
    return main(["seeds", "--config", str(config), "--output", str(out), *extra])


def test_seeds_are_trainable_and_follow_the_labels(seeds_setup, tmp_path, capsys):
    ids, root, config = seeds_setup
    out = tmp_path / "seeds"
    assert _seeds(config, out, "--save-cams") == 0
    labels = json.loads((root / "cls_labels.json").read_text())
    for i in ids:
        seed = np.array(Image.open(out / f"{i}.png"))
        image = Image.open(root / "JPEGImages" / f"{i}.jpg")
        assert seed.shape == (image.height, image.width)
        assert set(np.unique(seed)) <= {0, 255, *labels[i]}
        saved = np.load(out / "cams" / f"{i}.npz")
        assert saved["cams"].dtype == np.float16 and saved["cams"].shape == (len(labels[i]), *seed.shape)
        assert saved["classes"].tolist() == labels[i]
        assert 0.9 < saved["cams"].max() <= 1 and saved["cams"].min() >= 0  # min-max normalised, then resized
    # What `weakclip train` checks before training accepts the folder as data.seeds_dir.
    cfg = load_config(str(config), [f"data.seeds_dir={out}"])
    samples = list_samples(cfg.data, need_seeds=True)
    preflight(samples, cfg.num_classes, progress=False)
    assert [s.seed for s in samples] == [out / f"{i}.png" for i in ids]

    # A rerun does nothing; a changed setting is refused naming it, and with --reset redoes every image.
    assert _seeds(config, out, "--save-cams") == 0
    assert "0 written, 3 already done" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert _seeds(config, out, "--save-cams", "--set", "seeds.confidence=0.5") == 2
    err = capsys.readouterr().err
    assert "seeds.confidence: 0.95 -> 0.5" in err and "--reset" in err and "save_cams" not in err
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    assert _seeds(config, out, "--set", "seeds.confidence=0.5", "--reset") == 0
    assert "3 written, 0 already done" in capsys.readouterr().out
    assert not (out / "cams").exists()  # outputs of other settings never stay beside new ones


def test_seeds_without_crf_are_the_argmax_of_background_and_cams(seeds_setup, tmp_path):
    ids, _, config = seeds_setup
    out = tmp_path / "seeds"
    assert _seeds(config, out, "--save-cams", "--set", "seeds.crf=false", "--set", "seeds.bg_power=2") == 0
    for i in ids:
        saved = np.load(out / "cams" / f"{i}.npz")
        cams = saved["cams"].astype(np.float32)
        bg = (1 - cams.max(0)) ** 2
        expected = np.where(cams.max(0) > bg, saved["classes"][cams.argmax(0)], 0)
        seed = np.array(Image.open(out / f"{i}.png"))
        # float16 rounding of the background score may flip exact near-ties only
        assert (seed == expected).mean() > 0.999


def test_bad_labels_are_one_line(seeds_setup, tmp_path, capsys):
    ids, root, config = seeds_setup
    labels = json.loads((root / "cls_labels.json").read_text())
    labels[ids[1]] = []
    (root / "cls_labels.json").write_text(json.dumps(labels))
    assert _seeds(config, tmp_path / "s") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{ids[1]}: no image-level label" in err[0] and "cls_labels.json" in err[0]

    labels[ids[1]] = [21]
    (root / "cls_labels.json").write_text(json.dumps(labels))
    assert _seeds(config, tmp_path / "s") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class 21 outside 1..20" in err[0]

    labels[ids[1]] = [1]
    (root / "cls_labels.json").write_text(json.dumps(labels))
    long_name = " ".join(["unpronounceable"] * 60)
    assert _seeds(config, tmp_path / "s", "--set", f"seeds.prompt_names={{aeroplane: {long_name}}}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class 'aeroplane'" in err[0] and "context holds 77" in err[0]
    assert not list((tmp_path / "s").glob("*.png"))


def test_train_makes_clip_es_seeds_first_when_asked(seeds_setup, tmp_path, capsys):
    ids, _, config = seeds_setup
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--output", str(run), "--set", "data.seeds_from=clip-es",
            "--set", "data.seeds_dir=absent", "--set", "train.iters=1"]
    assert main(argv) == 0
    assert sorted(p.stem for p in (run / "seeds").glob("*.png")) == sorted(ids)
    saved = load_config(str(run / "config.yaml"))
    assert saved.data.seeds_dir == str((run / "seeds").resolve())
    assert (run / "model.safetensors").is_file()
    # Other seed settings: refused with the flag this command has, which then redoes the seeds.
    capsys.readouterr()
    assert main([*argv, "--set", "seeds.crf=false"]) == 2
    err = capsys.readouterr().err
    assert "seeds.crf: true -> false" in err and "rerun with --reset" in err
    assert main([*argv, "--set", "seeds.crf=false", "--reset", "--resume"]) == 0
    assert json.loads((run / "seeds" / "manifest.json").read_text())["settings"]["seeds"]["crf"] is False


def test_unknown_seed_source_is_one_line(seeds_setup, tmp_path, capsys):
    _, _, config = seeds_setup
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "r"), "--set", "data.seeds_from=mct"]
    assert main(argv) == 2
    assert "data.seeds_from: expected one of files, clip-es, got 'mct'" in capsys.readouterr().err


def test_shards_fill_one_folder(seeds_setup, tmp_path, capsys):
    ids, _, config = seeds_setup
    out = tmp_path / "seeds"
    fast = ["--set", "seeds.crf=false"]
    assert _seeds(config, out, "--shard", "1/2", *fast) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == [ids[1]]  # share 1 of 2: every second image
    assert "(1 written, 0 already done); 2 images of the list are left to the other shards" in capsys.readouterr().out
    assert _seeds(config, out, "--shard", "0/2", *fast) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    assert _seeds(config, out, *fast) == 0
    assert "0 written, 3 already done" in capsys.readouterr().out.splitlines()[-1]


def test_seeds_manifest_names_the_clip_weights_by_their_content(tmp_path):
    from weakclip.seeds import seeds_manifest

    first, second = tmp_path / "a" / "clip.pt", tmp_path / "b" / "clip.pt"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"the same weights")

    def manifest(path):
        cfg = load_config("voc-sample-cpu", [f"model.clip.pretrained={path}"])
        return seeds_manifest(cfg, "train", [], save_cams=False)

    assert manifest(first) == manifest(second)  # moved weights: seeds stay valid
    second.write_bytes(b"other weights")
    assert manifest(first) != manifest(second)
    assert manifest(first) != seeds_manifest(load_config("voc-sample-cpu"), "train", [], save_cams=False)
