"""The Python API (weakclip.api): the same label maps and seeds as the commands, byte for byte, on real
sample images; checkpoints that travel (save_pretrained / from_pretrained, a folder or the hub's offline
cache); released .pth files; one clear error line for bad input; the README example, run as written."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _shared, make_data_root, sample_ids, write_tiny_config
from PIL import Image

import weakclip
from weakclip.api import ClipES, Refiner, evaluate, load_config, pseudo_masks, seeds, train
from weakclip.cli import main
from weakclip.config import VOC_CLASSES
from weakclip.engine import save_weights
from weakclip.errors import WeakclipError
from weakclip.model import build_model
from weakclip.train import checkpoint_metadata

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = VOC_CLASSES


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three real sample images, a tiny config (two scales, flip, CRF in-process) and a tiny refiner checkpoint
    whose trainable weights are moved away from their initial values (a trained model's label maps differ)."""
    from conftest import VOC_SAMPLE

    voc_sample = _shared(VOC_SAMPLE, "real data")
    tmp = tmp_path_factory.mktemp("api")
    ids = sample_ids(voc_sample, 3)
    root = make_data_root(tmp / "data", voc_sample, ids)
    # Image-level labels among the classes this random model predicts on each image (none is background), so
    # that the label filter keeps some pixels and marks others unknown.
    assert ids == ["2007_000032", "2007_000033", "2007_000039"]
    (root / "cls_labels.json").write_text(json.dumps(dict(zip(ids, ([6, 17], [6, 18], [4, 17])))))
    config = write_tiny_config(tmp / "tiny.yaml", root, infer={"crf_workers": 0, "scales": [0.75, 1.0]},
                               seeds={"crf_workers": 0})
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.class_names).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp / "refiner.safetensors"
    save_weights(ckpt, model, checkpoint_metadata(cfg))
    labels = json.loads((root / "cls_labels.json").read_text())
    return ids, root, config, ckpt, labels


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def test_importing_weakclip_stays_light_and_the_api_is_documented():
    code = "import sys, weakclip; print('torch' in sys.modules); help(weakclip.Refiner)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PAGER": "cat"}).stdout
    assert out.startswith("False\n")  # torch loads on first use of the API, not on import
    for documented in ("from_checkpoint(", "from_pretrained(", "refine(", "save_pretrained(", "(H, W) uint8"):
        assert documented in out
    assert set(weakclip.__all__) >= {"Refiner", "Refined", "ClipES", "Seed", "load_config"}
    assert weakclip.Refiner is Refiner and weakclip.ClipES is ClipES


def test_refine_gives_the_pseudo_masks_the_command_writes(setup, tmp_path):
    ids, root, config, ckpt, labels = setup
    out = tmp_path / "pm"
    assert main(["pseudo-masks", "--config", str(config), "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    refiner = Refiner.from_checkpoint(ckpt, config=config)  # the device the command picks
    for i in ids:
        path = root / "JPEGImages" / f"{i}.jpg"
        written = _png(out / f"{i}.png")
        by_index = refiner.refine(path, labels[i])
        assert by_index.mask.dtype == np.uint8 and by_index.mask.shape == written.shape
        assert np.array_equal(by_index.mask, written), i
        # The same image as a PIL image, an array, and its labels by name: the same bytes.
        names = [NAMES[c] for c in labels[i]]
        assert np.array_equal(refiner.refine(Image.open(path).convert("RGB"), names).mask, written)
        array = np.array(Image.open(path).convert("RGB"))
        untouched = array.copy()
        assert np.array_equal(refiner.refine(array, names).mask, written)
        assert np.array_equal(array, untouched)  # the caller's image is left alone
        assert by_index.classes == (0, *sorted(labels[i]))
        assert by_index.probs.shape == (len(by_index.classes), *written.shape)
        # Renormalised over the kept classes; where they all underflow (pixels marked unknown) less.
        np.testing.assert_allclose(by_index.probs.sum(0)[written != 255], 1, atol=1e-5)
        assert set(np.unique(written)) == {255, *labels[i]}  # every kept class, and unknown pixels
    # The batched form gives the same maps in order.
    many = list(refiner.refine_many([root / "JPEGImages" / f"{i}.jpg" for i in ids], [labels[i] for i in ids]))
    assert [np.array_equal(r.mask, _png(out / f"{i}.png")) for r, i in zip(many, ids)] == [True] * len(ids)


def test_refine_without_crf_and_filter_matches_the_command(setup, tmp_path):
    ids, root, config, ckpt, labels = setup
    sets = ["infer.crf=false", "infer.label_filter=false"]
    out = tmp_path / "pm"
    args = ["pseudo-masks", "--config", str(config), "--checkpoint", str(ckpt), "--output", str(out)]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    refiner = Refiner.from_checkpoint(ckpt, config=config, overrides=sets)
    for i in ids:
        refined = refiner.refine(root / "JPEGImages" / f"{i}.jpg")
        assert np.array_equal(refined.mask, _png(out / f"{i}.png")), i
        assert len(refined.classes) > 2 and 255 not in refined.mask
        # No CRF: the map is the argmax of the averaged probabilities over the classes present.
        assert np.array_equal(refined.mask, np.asarray(refined.classes, np.uint8)[refined.probs.argmax(0)])


def test_seed_gives_the_seeds_the_command_writes(setup, tmp_path):
    ids, root, config, _, labels = setup
    out = tmp_path / "seeds"
    assert main(["seeds", "--config", str(config), "--output", str(out), "--save-cams"]) == 0
    clip_es = ClipES.from_config(config)
    for i in ids:
        seed = clip_es.seed(root / "JPEGImages" / f"{i}.jpg", [NAMES[c] for c in labels[i]])
        assert seed.mask.dtype == np.uint8 and np.array_equal(seed.mask, _png(out / f"{i}.png")), i
        saved = np.load(out / "cams" / f"{i}.npz")
        assert seed.classes == tuple(saved["classes"].tolist()) == tuple(labels[i])
        assert seed.cams.dtype == np.float16 and np.array_equal(seed.cams, saved["cams"])


def test_stage_functions_return_summaries(setup, tmp_path):
    ids, root, config, ckpt, _ = setup
    cfg = load_config(config)
    before = dataclasses.asdict(cfg)
    summary = pseudo_masks(cfg, ckpt, tmp_path / "pm")
    assert summary == {"output": str(tmp_path / "pm"), "written": 3, "skipped": 0, "missing": 0,
                       "other_class_pixels": 0}
    assert seeds(cfg, tmp_path / "seeds")["written"] == 3
    scores = evaluate(cfg, tmp_path / "pm", root / "SegmentationClass", ids=ids)
    # Against themselves, the label maps score 100 % over the classes they contain (255: not scored).
    assert evaluate(cfg, tmp_path / "pm", tmp_path / "pm")["miou"] == 100.0
    assert 0 <= scores["miou"] < 100 and set(scores["per_class"]) == set(NAMES)
    assert dataclasses.asdict(cfg) == before  # the caller's config is left alone

    trained = load_config(config, ["train.iters=2", "train.checkpoint_every=2"])
    final = train(trained, tmp_path / "run")
    assert final == tmp_path / "run" / "model.safetensors" and final.is_file()
    refiner = Refiner.from_checkpoint(final)  # with the config the checkpoint stores
    assert refiner.config.train.iters == 2 and refiner.config.model == trained.model


def test_save_pretrained_then_from_pretrained_gives_identical_logits(setup, tmp_path, monkeypatch):
    ids, root, config, ckpt, labels = setup
    refiner = Refiner.from_checkpoint(ckpt, config=config, device="cpu")
    folder = refiner.save_pretrained(tmp_path / "saved", metrics={"pseudo-mask mIoU": 0.5})
    images = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = refiner.logits(images)
    path = root / "JPEGImages" / f"{ids[0]}.jpg"
    mask = refiner.refine(path, labels[ids[0]]).mask

    local = Refiner.from_pretrained(folder, device="cpu")
    assert torch.equal(local.logits(images), expected)
    assert np.array_equal(local.refine(path, labels[ids[0]]).mask, mask)
    assert local.config == refiner.config
    card = (folder / "README.md").read_text()
    for fact in ("library_name: weakclip", "aeroplane, bicycle", "random init (seed", "scales [0.75, 1.0]", "ClipViT",
                 "seeds: files", "| pseudo-mask mIoU | 0.5 |", "dense CRF: True"):
        assert fact in card, fact

    # A hub repository, read through huggingface_hub's cache in offline mode (conftest sets HF_HUB_OFFLINE=1),
    # laid out as huggingface_hub lays out a download: blobs named by content, snapshots of symlinks.
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--weakclip-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("model.safetensors", "config.yaml", "README.md"):
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes((folder / name).read_bytes())
        (repo / "snapshots" / commit / name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    hub = Refiner.from_pretrained("acme/weakclip-tiny", device="cpu", cache_dir=cache)
    assert torch.equal(hub.logits(images), expected)
    assert hub.checkpoint == repo / "snapshots" / commit / "model.safetensors"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # the default cache
    assert torch.equal(Refiner.from_pretrained("acme/weakclip-tiny", device="cpu").logits(images), expected)
    with pytest.raises(WeakclipError, match=r"^acme/absent: not a local path, and not found on the Hugging Face "
                                            r"Hub or in its cache \("):
        Refiner.from_pretrained("acme/absent", device="cpu", cache_dir=cache)


def test_a_released_pth_loads_through_from_checkpoint(setup, tmp_path, monkeypatch):
    from test_released import FIXTURE, HEADS

    from weakclip.checkpoints import load_released

    _shared(FIXTURE, "the weakclip-tiny parity fixture")
    from safetensors.torch import load_file

    pth = tmp_path / "train_iter_8000.pth"
    meta = {"mmcv_version": "1.3.17", "iter": 8000, "CLASSES": tuple(VOC_CLASSES)}
    torch.save({"meta": meta, "state_dict": load_file(str(FIXTURE / "state_dict.safetensors"))}, pth)
    # The tiny fixture's attention heads are 16 wide (the released ones 64, the default for a .pth).
    monkeypatch.setattr("weakclip.released.HEAD_WIDTH", 16)
    ids, root, config, _, labels = setup
    run_cfg = load_config(config)
    before = dataclasses.asdict(run_cfg)
    refiner = Refiner.from_checkpoint(pth, config=run_cfg)
    assert dataclasses.asdict(run_cfg) == before  # the released model section replaces a copy's only
    assert refiner.config.model.released and refiner.config.infer.view_resize == "cv2"
    direct, _, _ = load_released(pth, load_config("voc"), **HEADS)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # (the refiner reuses its class embeddings across windows: the same sums, other rounding)
        torch.testing.assert_close(refiner.logits(images), direct.eval()(images)["logits"], rtol=1e-5, atol=1e-6)
    out = tmp_path / "pm"
    assert main(["pseudo-masks", "--config", str(config), "--checkpoint", str(pth), "--output", str(out)]) == 0
    i = ids[0]
    assert np.array_equal(refiner.refine(root / "JPEGImages" / f"{i}.jpg", labels[i]).mask, _png(out / f"{i}.png"))
    # Saved, a released model keeps its CLIP weights and travels as it is.
    again = Refiner.from_pretrained(refiner.save_pretrained(tmp_path / "saved"))
    assert torch.equal(again.logits(images), refiner.logits(images))
    assert "CLIP weights: stored in the checkpoint" in (tmp_path / "saved" / "README.md").read_text()


def _one_line_error(call, *patterns: str) -> None:
    with pytest.raises(WeakclipError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), message


def test_bad_input_is_one_clear_error(setup, tmp_path):
    ids, root, config, ckpt, _ = setup
    refiner = Refiner.from_checkpoint(ckpt, config=config, device="cpu")
    path = root / "JPEGImages" / f"{ids[0]}.jpg"
    rgb = np.asarray(Image.open(path).convert("RGB"))
    _one_line_error(lambda: refiner.refine(path, ["aeroplane", "unicorn"]), "unknown class name 'unicorn'",
                    "aeroplane, bicycle")
    _one_line_error(lambda: refiner.refine(path, [21]), r"class index 21 is outside the foreground classes 1\.\.20")
    _one_line_error(lambda: refiner.refine(path, ["background"]), "unknown class name 'background'")
    _one_line_error(lambda: refiner.refine(rgb[..., 0]), r"shape \(\d+, \d+\) and dtype uint8, expected \(H, W, 3\)")
    _one_line_error(lambda: refiner.refine(np.dstack([rgb, rgb[..., :1]])), r"shape \(\d+, \d+, 4\)")
    _one_line_error(lambda: refiner.refine(rgb.astype(np.float32)), "dtype float32")
    _one_line_error(lambda: refiner.refine(Image.open(path).convert("L")), "mode L, expected RGB")
    _one_line_error(lambda: refiner.refine(Image.open(path).convert("RGBA")), "mode RGBA, expected RGB")
    _one_line_error(lambda: refiner.refine(tmp_path / "absent.jpg"), f"^{tmp_path / 'absent.jpg'}: image not found$")
    _one_line_error(lambda: Refiner.from_checkpoint(tmp_path / "absent.safetensors"),
                    f"^{tmp_path / 'absent.safetensors'}: checkpoint not found$")
    _one_line_error(lambda: Refiner.from_pretrained(tmp_path / "absent"), "not a folder written by save_pretrained")
    _one_line_error(lambda: ClipES.from_config(config, device="cpu").seed(path, []), "no image-level label")


def _readme_example() -> str:
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one python example"
    return blocks[0]


def test_the_readme_example_runs_as_written(setup, tmp_path, monkeypatch, capsys):
    ids, root, config, ckpt, _ = setup
    monkeypatch.setenv("WEAKCLIP_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("WEAKCLIP_CONFIG", str(config))
    monkeypatch.setenv("WEAKCLIP_IMAGE", str(root / "JPEGImages" / "2007_000032.jpg"))
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_example(), "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("(281, 500) uint8 (0, 1, 15)") and out[1] == "(281, 500) (2, 281, 500)"
    assert (tmp_path / "weakclip-voc" / "model.safetensors").is_file()
