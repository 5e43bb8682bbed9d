"""Checkpoints that run no code and never pick the wrong classes (weakclip.checkpoints).

The released COCO checkpoint has 91 output slots indexed by COCO category id, 10 of them dead. Here a
synthetic one is built from the parity fixture's official state dict with its class-dependent tensors
widened to K = 91 (the full-size key list converts too), and its forward in slot order (the parity-checked
released path, no class mapping) is the reference for probabilities, the label filter, the CRF's inputs and
the written label maps. Crafted pickles that would create a marker file check that no data file runs code.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, TINY_ARCH, _shared, make_data_root, sample_ids, write_tiny_config
from PIL import Image
from safetensors.torch import load_file

from weakclip.checkpoints import checkpoint_metadata, convert_checkpoint, load_refiner
from weakclip.cli import main
from weakclip.clip import load_clip
from weakclip.config import ClipConfig, Config, load_config
from weakclip.data.datasets import COCO_CATEGORY_IDS, read_labels_file
from weakclip.data.masks import read_mask, write_mask
from weakclip.engine import LoopSpec, read_header, save_weights, train_loop
from weakclip.errors import WeakclipError
from weakclip.infer import crf_inputs, label_filter, multiscale_probs, refiner_predictor
from weakclip.jobs import pseudo_masks
from weakclip.model import build_model
from weakclip.released import convert_state_dict, released_config
from weakclip.safepickle import torchscript_tensors

FIXTURE = SHARED / "reference" / "parity" / "weakclip-tiny"
KEYS = SHARED / "reference" / "official-state-dict-keys.txt"
HEADS = {"vision_heads": 2, "text_heads": 2, "coattn_heads": 2}
# The dead COCO category ids and their names in the released 91-slot list (official-code-notes, COCO).
DEAD = {12: "street sign", 26: "hat", 29: "shoe", 30: "eye glasses", 45: "plate", 66: "mirror", 68: "window",
        69: "desk", 71: "door", 83: "blender"}
LIVE_SLOTS = [0, *COCO_CATEGORY_IDS]  # config class i runs in released slot LIVE_SLOTS[i]


def coco_slot_names() -> list[str]:
    """The released COCO class list: slot = category id, the coco config's names at their ids."""
    names = load_config("coco").data.class_names
    slots = [""] * 91
    slots[0] = names[0]
    for contiguous, category in enumerate(COCO_CATEGORY_IDS, start=1):
        slots[category] = names[contiguous]
    for category, name in DEAD.items():
        slots[category] = name
    assert all(slots)
    return slots


def widen_to_91(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A released state dict with 21 classes -> 91: new classifier rows and score-map columns of the laterals.
    Slots person (1), street sign (12, dead), stop sign (13) and toothbrush (90) get a bias so they win pixels."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    w = state["decode_head.conv_seg.weight"]
    out["decode_head.conv_seg.weight"] = torch.randn((91, *w.shape[1:]), generator=g) * w.std()
    bias = torch.randn(91, generator=g) * 0.1
    bias[[1, 12, 13, 90]] += 2.0
    out["decode_head.conv_seg.bias"] = bias
    for i in range(4):
        key = f"neck.lateral_convs.{i}.conv.weight"
        lat = state[key]
        width = lat.shape[1] - 21
        score = torch.randn((lat.shape[0], 91, *lat.shape[2:]), generator=g) * lat[:, width:].std()
        out[key] = torch.cat([lat[:, :width], score], 1)
    return out


@pytest.fixture(scope="module")
def coco_state() -> dict[str, torch.Tensor]:
    return widen_to_91(load_file(str(_shared(FIXTURE, "the weakclip-tiny parity fixture") / "state_dict.safetensors")))


@pytest.fixture(scope="module")
def released_coco(coco_state, tmp_path_factory) -> tuple[Path, Path]:
    """(released .pth with meta CLASSES, its conversion under --config coco)."""
    tmp = tmp_path_factory.mktemp("coco")
    pth = tmp / "46p07_iter_29000.pth"
    torch.save({"meta": {"CLASSES": tuple(coco_slot_names()), "iter": 29000}, "state_dict": coco_state}, pth)
    converted = tmp / "coco.safetensors"
    convert_checkpoint(pth, converted, load_config("coco"), **HEADS)
    return pth, converted


@pytest.fixture(scope="module")
def reference(coco_state):
    """The released forward in slot order: converted and built as the parity checker does, no class mapping."""
    conversion = convert_state_dict(coco_state, "reference", **HEADS)
    cfg = released_config(Config(), conversion, coco_slot_names())
    model = build_model(cfg.model, cfg.data.class_names, load_clip(cfg.model.clip, from_checkpoint=True))
    model.load_weakclip_state_dict(conversion.state, "reference")
    return model.eval()


def test_full_size_key_list_with_91_slots_converts_into_the_coco_model():
    keys = {}
    for line in _shared(KEYS, "the released state-dict key list").read_text().splitlines():
        key, shape, _ = line.split("\t")
        dims = [int(s) for s in re.findall(r"\d+", shape)]
        if key.startswith("decode_head.conv_seg."):
            dims[0] = 91
        if key.startswith("neck.lateral_convs.") and key.endswith(".weight"):
            dims[1] = 768 + 91
        keys[key] = dims
    with torch.device("meta"):
        state = {k: torch.empty(d) for k, d in keys.items()}
        conversion = convert_state_dict(state, "keys")
        cfg = released_config(Config(), conversion, coco_slot_names())
        model = build_model(cfg.model, cfg.data.class_names, load_clip(cfg.model.clip, from_checkpoint=True))
    own = model.weakclip_state_dict()
    assert conversion.model["num_classes"] == 91 and set(conversion.state) == set(own)
    assert all(tuple(t.shape) == tuple(own[k].shape) for k, t in conversion.state.items())


def test_converted_checkpoint_keeps_the_91_slots_as_released(released_coco):
    _, converted = released_coco
    header = read_header(converted)
    assert json.loads(header["class_names"]) == coco_slot_names()


def test_live_slot_probabilities_equal_the_released_forward(released_coco, reference):
    _, converted = released_coco
    cfg = load_config("coco")
    before = copy.deepcopy(cfg)
    model, used = load_refiner(converted, cfg)
    assert cfg == before  # the caller's config is not changed
    names = cfg.data.class_names
    assert used.data.class_names == names + [DEAD[c] for c in sorted(DEAD)]
    assert used.model.released and used.model.clip.in_checkpoint
    images = torch.randint(0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        ours = model.eval()(images)["logits"].softmax(1)
        ref = reference(images)["logits"].softmax(1)
    torch.testing.assert_close(ours[:, :81], ref[:, LIVE_SLOTS], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[:, 81:], ref[:, sorted(DEAD)], rtol=1e-5, atol=1e-6)
    # Training from it starts from the same model: the seeds' contiguous ids are its first outputs.
    from weakclip.train import initial_model

    start, start_cfg = initial_model(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, init_from=str(converted))))
    assert start_cfg.data.class_names == used.data.class_names
    with torch.no_grad():
        torch.testing.assert_close(start.eval()(images)["logits"].softmax(1), ours, rtol=0, atol=0)
    # Without the mapping, contiguous class 12 (stop sign) would read released slot 12 (street sign, dead).
    assert names[12] == "stop sign" and not torch.allclose(ref[:, 12], ref[:, 13])

    # Label filter and CRF inputs for image-level labels stop sign (12) and toothbrush (80): slots 13 and 90.
    kept, keys, unknown = crf_inputs(ours[0], [12, 80], live=81)
    assert keys == [0, 12, 80]
    slots = ref[0, [0, 13, 90]]
    torch.testing.assert_close(kept, slots / slots.sum(0, keepdim=True), rtol=1e-5, atol=1e-6)
    best = ref[0].argmax(0)
    expected_unknown = ~((best == 0) | (best == 13) | (best == 90))
    assert torch.equal(unknown, expected_unknown) and expected_unknown.any() and not expected_unknown.all()


def test_label_filter_never_keeps_a_class_outside_the_config():
    # 4 classes, the last two outside the config (live=2); pixel j's best class is j.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    probs = probs.T.reshape(4, 1, 4)
    keys, unknown = label_filter(probs, None, live=2)
    assert keys == [0, 1] and unknown.tolist() == [[False, False, True, True]]
    keys, unknown = label_filter(probs, [1], live=2)
    assert keys == [0, 1] and unknown.tolist() == [[False, False, True, True]]
    keys, unknown = label_filter(probs[:, :, 2:], None, live=2)  # only outside classes win: nothing kept
    assert keys == [0] and unknown.all()
    keys, unknown = label_filter(probs, None)  # every class is the config's
    assert keys == [0, 1, 2, 3] and not unknown.any()


def _tiny_coco_tree(root: Path) -> dict[str, list[int]]:
    rng = np.random.default_rng(0)
    labels = {"000000000001": [12, 80], "000000000002": [1], "000000000003": [1, 12]}
    (root / "images").mkdir(parents=True)
    for i, image_id in enumerate(labels):
        h, w = (48, 72) if i != 1 else (64, 50)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.jpg")
    (root / "train.txt").write_text("\n".join(labels) + "\n")
    (root / "cls_labels.json").write_text(json.dumps(labels))
    return labels


def _tiny_coco_settings(root: Path) -> list[str]:
    return [f"data.root={root}", "data.split=train", "infer.crf=false", "infer.view_resize=torch",
            "infer.short_side=48", "infer.scales=[1.0, 0.75]", "infer.flip=true", "infer.crop_size=48",
            "infer.stride=32", "infer.crf_workers=0"]


def test_released_coco_pseudo_masks_then_evaluate_with_the_coco_config(released_coco, reference, tmp_path, capsys):
    _, converted = released_coco
    root = tmp_path / "COCO14"
    labels = _tiny_coco_tree(root)
    sets = _tiny_coco_settings(root)
    lut = np.full(256, 255, np.uint8)  # released slot -> contiguous class (dead slots -> 255): built here
    lut[LIVE_SLOTS] = np.arange(81)
    for use_filter in (True, False):
        cfg = load_config("coco", [*sets, f"infer.label_filter={str(use_filter).lower()}"])
        out = tmp_path / f"pseudo-{use_filter}"
        summary = pseudo_masks(cfg, converted, out)
        assert summary["written"] == 3
        predict = refiner_predictor(reference, torch.device("cpu"))
        dead_pixels = 0
        for image_id, image_labels in labels.items():
            image = np.asarray(Image.open(root / "images" / f"{image_id}.jpg").convert("RGB"))
            best = multiscale_probs(predict, image, cfg.infer, torch.device("cpu")).argmax(0).numpy()
            expected = lut[best]
            if use_filter:
                allowed = np.isin(best, [0, *(LIVE_SLOTS[c] for c in image_labels)])
                expected = np.where(allowed, expected, 255)
            dead_pixels += int(np.isin(best, list(DEAD)).sum())
            written = read_mask(out / f"{image_id}.png")
            assert np.array_equal(written, expected), (image_id, use_filter, np.mean(written != expected))
            if not use_filter:
                write_mask(root / "class_labels" / f"{image_id}.png", expected)  # ground truth in contiguous ids
        assert dead_pixels > 0 and summary["other_class_pixels"] == dead_pixels
        if use_filter:  # stop sign (12) and toothbrush (80) written where their slots 13 and 90 win
            values = np.unique(read_mask(out / "000000000001.png"))
            assert set(values.tolist()) <= {0, 12, 80, 255} and {12, 80} & set(values.tolist())
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pseudo-False"), "--gt", str(root / "class_labels"),
                 "--config", "coco", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["pixel_accuracy"] == pytest.approx(100.0) and result["miou"] == pytest.approx(100.0)
    scored = {name for name, s in result["per_class"].items() if s.get("iou") is not None}
    assert {"person", "stop sign", "toothbrush"} <= scored


def test_the_api_refines_and_saves_a_released_coco_model_in_the_config_classes(released_coco, tmp_path):
    from weakclip import Refiner

    _, converted = released_coco
    root = tmp_path / "COCO14"
    labels = _tiny_coco_tree(root)
    cfg = load_config("coco", _tiny_coco_settings(root))
    pseudo_masks(cfg, converted, tmp_path / "pm")
    refiner = Refiner.from_checkpoint(converted, config=cfg, device="cpu")
    assert refiner.class_names == cfg.data.class_names and refiner.model.head.classifier.out_channels == 91
    again = Refiner.from_pretrained(refiner.save_pretrained(tmp_path / "saved"), device="cpu")
    assert again.class_names == cfg.data.class_names
    for image_id, image_labels in labels.items():
        written = read_mask(tmp_path / "pm" / f"{image_id}.png")
        image = root / "images" / f"{image_id}.jpg"
        assert np.array_equal(refiner.refine(image, image_labels).mask, written), image_id
        assert np.array_equal(again.refine(image, image_labels).mask, written), image_id


def test_a_91_slot_checkpoint_without_meta_is_the_released_coco_label_space(coco_state, tmp_path):
    pth = tmp_path / "bare.pth"
    torch.save({"state_dict": coco_state}, pth)
    summary = convert_checkpoint(pth, tmp_path / "bare.safetensors", load_config("coco"), **HEADS)
    assert summary["classes"] == 91
    assert json.loads(read_header(tmp_path / "bare.safetensors")["class_names"]) == coco_slot_names()
    with pytest.raises(WeakclipError, match="91 classes and no class names .* the config lists 21"):
        convert_checkpoint(pth, tmp_path / "voc.safetensors", load_config("voc"), **HEADS)
    assert not (tmp_path / "voc.safetensors").exists()


# --------------------------------------------------------------------------------- no code from data


class _Touch:
    """Unpickling this runs ``touch <marker>`` (what a crafted data file can do to an unchecked loader)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _assert_effective(load_code: str, marker: Path) -> None:
    """The crafted file does run code under an unchecked loader (in a subprocess): the test can fail."""
    subprocess.run([sys.executable, "-c", load_code], check=False, capture_output=True, timeout=120)
    assert marker.exists()
    marker.unlink()


def test_a_crafted_labels_npy_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "cls_labels.npy"
    np.save(path, np.array({"2007_000032": [1], "x": _Touch(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(WeakclipError, match=r"cls_labels\.npy: refused: its pickle names posix\.system"):
        read_labels_file(path, load_config("voc").data.class_names)
    assert not marker.exists()
    _assert_effective(f"import numpy; numpy.load({str(path)!r}, allow_pickle=True)", marker)
    # A plain one still reads: dicts of lists, arrays and strings.
    good = tmp_path / "good.npy"
    np.save(good, np.array({"a": [1, 15], "b": np.array([0, 1, 0] + [0] * 17), "c": ["dog"]}, dtype=object))
    assert read_labels_file(good, load_config("voc").data.class_names) == {"a": [1, 15], "b": [2], "c": [12]}


class _Data(torch.utils.data.Dataset):
    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((2,), float(index))}


def test_a_crafted_resume_state_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "marker"
    model = torch.nn.Linear(2, 1)

    def run(resume: bool) -> Path:
        return train_loop(model, _Data(), lambda m, b: {"total": m(b["image"]).square().mean()},
                          torch.optim.SGD(model.parameters(), lr=0.1), lambda it: 0.1,
                          LoopSpec(iters=2, batch_size=2, workers=0, checkpoint_every=1),
                          tmp_path / "run", _info(), resume=resume)

    run(False)
    state = tmp_path / "run" / "checkpoints" / "iter_0000002.state.pt"
    saved = torch.load(state, weights_only=True)  # what the engine writes loads as weights
    assert {"optimizer", "rng", "iteration"} <= set(saved)
    torch.save({**saved, "rng": [_Touch(marker)]}, state)
    with pytest.raises(WeakclipError, match=r"iter_0000002\.state\.pt: refused or unreadable resume state"):
        run(True)
    assert not marker.exists()
    _assert_effective(f"import torch; torch.load({str(state)!r}, weights_only=False)", marker)


def _info():
    from weakclip.distributed import DistInfo

    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_a_crafted_torchscript_archive_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "ViT-B-16.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ViT-B-16/data.pkl", pickle.dumps(_Touch(marker), protocol=2))
        zf.writestr("ViT-B-16/constants.pkl", pickle.dumps((), protocol=2))
    cfg = ClipConfig(arch=copy.deepcopy(TINY_ARCH), pretrained=str(path))
    with pytest.raises(WeakclipError, match=r"ViT-B-16\.pt: refused: its pickle names posix\.system"):
        load_clip(cfg)
    assert not marker.exists()
    # A real archive reads into the same tensors TorchScript itself loads.
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4).half())).save(str(scripted))
    ours, theirs = torchscript_tensors(scripted), torch.jit.load(str(scripted)).state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype
                                            for k in theirs)


# ------------------------------------------------------------------------------------ no silent weights


def test_clip_in_checkpoint_outside_a_checkpoint_is_refused(tmp_path, voc_sample, capsys):
    cfg = ClipConfig(arch=copy.deepcopy(TINY_ARCH), in_checkpoint=True)
    with pytest.raises(WeakclipError, match="model.clip.in_checkpoint: true, but no checkpoint is loaded"):
        load_clip(cfg)
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 1))
    config = write_tiny_config(tmp_path / "run.yaml", root, model={"clip": {"in_checkpoint": True}})
    assert main(["seeds", "--config", str(config), "--output", str(tmp_path / "seeds")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.clip.in_checkpoint: true" in err[0]
    assert not (tmp_path / "seeds").exists()  # refused before anything is written


@pytest.fixture
def clip_files(tmp_path) -> tuple[Path, Path]:
    """Two CLIP weights files of the tiny architecture with different weights."""
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = load_clip(ClipConfig(arch=copy.deepcopy(TINY_ARCH), pretrained=None))
        with torch.no_grad():
            model.visual.conv1.weight.add_(torch.randn_like(model.visual.conv1.weight) * 0.01 * seed)
        files.append(tmp_path / f"clip{seed}.pt")
        torch.save(model.state_dict(), files[-1])
    return files[0], files[1]


def test_predictions_with_other_clip_weights_are_refused(tmp_path, voc_sample, clip_files, capsys):
    a, b = clip_files
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 1))
    run = write_tiny_config(tmp_path / "run.yaml", root, infer={"crf_workers": 0, "crf": False})
    cfg = load_config(str(run), [f"model.clip.pretrained={a}"])
    model = build_model(cfg.model, cfg.data.class_names)
    ckpt = tmp_path / "model.safetensors"
    meta = checkpoint_metadata(cfg)
    save_weights(ckpt, model, meta)
    assert meta["clip_weights"] == "sha256 " + hashlib.sha256(a.read_bytes()).hexdigest()
    loaded, used = load_refiner(ckpt, cfg)  # the same CLIP weights: accepted
    assert used.model.clip.pretrained == str(a)
    for other, shown in ((b, "sha256 "), ("null", "random init (seed 0)")):
        for command in (["pseudo-masks", "--output", str(tmp_path / "pm")],
                        ["predict", "--split", "train", "--output", str(tmp_path / "pred")]):
            code = main([*command, "--config", str(run), "--checkpoint", str(ckpt),
                         "--set", f"model.clip.pretrained={other}"])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1, err
            assert f"trained with CLIP weights {meta['clip_weights']}, the config's model.clip.pretrained gives " \
                   f"{shown}" in err[0]
    assert not (tmp_path / "pm").exists() and not (tmp_path / "pred").exists()
    from weakclip.train import initial_model

    start = load_config(str(run), [f"model.clip.pretrained={b}", f"train.init_from={ckpt}"])
    with pytest.raises(WeakclipError, match="trained with CLIP weights sha256"):
        initial_model(start)


def test_init_from_adopts_the_checkpoints_model_before_the_data(tmp_path, voc_sample, monkeypatch):
    import weakclip.train as train_module

    pth = tmp_path / "voc.pth"
    torch.save({"meta": {"CLASSES": tuple(load_config("voc").data.class_names)},
                "state_dict": load_file(str(_shared(FIXTURE, "the weakclip-tiny parity fixture") / "state_dict.safetensors"))}, pth)
    converted = tmp_path / "voc.safetensors"
    convert_checkpoint(pth, converted, load_config("voc"), **HEADS)
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 2))
    run = write_tiny_config(tmp_path / "run.yaml", root, train={"init_from": str(converted)})
    cfg = load_config(str(run))
    seen = {}
    real = train_module.train_dataset

    def spy(data_cfg, progress=True, model_cfg=None):
        seen["model_cfg"] = model_cfg
        seen["dataset"] = real(data_cfg, progress=False, model_cfg=model_cfg)
        raise KeyboardInterrupt  # stop here: only the order and the data's settings are under test

    monkeypatch.setattr(train_module, "train_dataset", spy)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, tmp_path / "out")
    assert seen["model_cfg"].model.released and seen["model_cfg"].model.clip.in_checkpoint
    # Crops are padded with the released (ImageNet) mean, not CLIP's: 0 after the model's normalisation.
    pad = seen["dataset"].transform.pad_value
    assert [float(v) for v in pad] == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert dataclasses.asdict(cfg.model) == dataclasses.asdict(load_config(str(run)).model)  # cfg unchanged
