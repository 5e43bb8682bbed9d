"""Never stale: the pseudo-mask / predict manifest covers every input that changes a label map; a change to one
of them is refused, and with reset redoes every image."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_data_root, sample_ids, write_tiny_config
from safetensors.torch import save_file

from weakclip.cli import main
from weakclip.clip import load_clip
from weakclip.config import load_config
from weakclip.data.datasets import list_samples
from weakclip.distributed import DistInfo
from weakclip.engine import save_weights
from weakclip.jobs import inference_fingerprint, write_label_maps
from weakclip.model import build_model
from weakclip.train import checkpoint_metadata

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture
def setup(tmp_path, voc_sample):
    """Two real images, a tiny config without CRF workers, a checkpoint and two CLIP weights files."""
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 2))
    config = write_tiny_config(tmp_path / "tiny.yaml", root, infer={"crf_workers": 0, "flip": False})
    cfg = load_config(str(config))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.class_names)
    ckpt = tmp_path / "model.safetensors"
    save_weights(ckpt, model, checkpoint_metadata(cfg))
    clip_files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = load_clip(dataclasses.replace(cfg.model.clip, pretrained=None)).state_dict()
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)
        clip_files.append(tmp_path / f"clip{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(clip_files[-1]))
    return SimpleNamespace(root=root, config=config, cfg=cfg, model=model, ckpt=ckpt, clip=clip_files)


class _Colour:
    """A cheap predictor: per-pixel logits from colour."""

    def __init__(self, k: int):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, k, 1)

    def __call__(self, x):
        with torch.no_grad():
            return self.conv(x.float() / 64)


def _changes(s) -> dict:
    """Each input that changes a label map -> (config, model settings, checkpoint) with only it changed."""
    cfg, mcfg = s.cfg, s.model.cfg
    other_ckpt = s.ckpt.with_name("other.safetensors")
    with torch.no_grad():
        s.model.head.classifier.bias.add_(1.0)
    save_weights(other_ckpt, s.model, checkpoint_metadata(cfg))
    clip, backbone = mcfg.clip, mcfg.backbone
    relabelled = s.root / "relabelled.json"
    table = json.loads((s.root / "cls_labels.json").read_text())
    first = next(iter(table))
    relabelled.write_text(json.dumps({**table, first: [*table[first], 20]}))
    names = [*cfg.data.class_names[:-1], "monitor"]
    return {
        "checkpoint": (cfg, mcfg, other_ckpt),
        "clip weights": (cfg, dataclasses.replace(mcfg, clip=dataclasses.replace(clip, pretrained=str(s.clip[0]))),
                         s.ckpt),
        "normalisation": (cfg, dataclasses.replace(mcfg, clip=dataclasses.replace(clip, normalize="imagenet")),
                          s.ckpt),
        "class token": (cfg, dataclasses.replace(mcfg, backbone=dataclasses.replace(backbone, class_token_twice=True)),
                        s.ckpt),
        "taps": (cfg, dataclasses.replace(mcfg, backbone=dataclasses.replace(backbone, taps=[1, 2, 3, 4])), s.ckpt),
        "clip model": (cfg, dataclasses.replace(mcfg, clip=dataclasses.replace(clip, model="ViT-S-16")), s.ckpt),
        "class names": (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_names=names)), mcfg,
                        s.ckpt),
        "labels": (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels_file=relabelled.name)),
                   mcfg, s.ckpt),
        "label source": (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels_from_seeds=True)),
                         mcfg, s.ckpt),
        "inference settings": (dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, scales=[1.0, 0.5])),
                               mcfg, s.ckpt),
    }


def _run(cfg, model_cfg, ckpt, out):
    samples = list_samples(cfg.data, need_seeds=False)
    fingerprint = inference_fingerprint(cfg, ckpt, SimpleNamespace(cfg=model_cfg), samples, True)
    return write_label_maps(_Colour(cfg.num_classes), samples, out, cfg.infer, CPU, fingerprint,
                            use_labels=True, crf_params=None, progress=False, reset=True)


def _counts(summary: dict) -> tuple[int, int]:
    return summary["written"], summary["skipped"]


def test_each_input_of_a_label_map_is_in_the_manifest_and_redoes_every_image(setup, tmp_path):
    out = tmp_path / "masks"
    base = (setup.cfg, setup.model.cfg, setup.ckpt)
    assert _run(*base, out)["written"] == 2
    assert _counts(_run(*base, out)) == (0, 2)  # unchanged: nothing redone
    for what, changed in _changes(setup).items():
        assert _counts(_run(*changed, out)) == (2, 0), what
        assert _run(*base, out)["written"] == 2, what
    # The CLIP weights' identity is their content: the same file elsewhere is the same weights.
    here = dataclasses.replace(setup.model.cfg.clip, pretrained=str(setup.clip[1]))
    assert _run(setup.cfg, dataclasses.replace(setup.model.cfg, clip=here), setup.ckpt, out)["written"] == 2
    moved = setup.clip[1].rename(tmp_path / "moved.safetensors")
    there = dataclasses.replace(setup.model.cfg.clip, pretrained=str(moved))
    assert _run(setup.cfg, dataclasses.replace(setup.model.cfg, clip=there), setup.ckpt, out)["skipped"] == 2


def test_pseudo_masks_rerun_after_swapping_the_clip_weights(setup, tmp_path, capsys):
    # A checkpoint records its CLIP weights (here the random init): others are refused, nothing is written.
    refused = ["pseudo-masks", "--config", str(setup.config), "--checkpoint", str(setup.ckpt),
               "--output", str(tmp_path / "refused"), "--set", f"model.clip.pretrained={setup.clip[0]}"]
    assert main(refused) == 2 and "trained with CLIP weights random init" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    # One written before checkpoints recorded them runs with any: the manifest tells the outputs apart.
    legacy = tmp_path / "legacy.safetensors"
    meta = {k: v for k, v in checkpoint_metadata(setup.cfg).items() if k != "clip_weights"}
    save_weights(legacy, setup.model, meta)
    args = ["pseudo-masks", "--config", str(setup.config), "--checkpoint", str(legacy),
            "--output", str(tmp_path / "pm")]
    for clip, expected in ((setup.clip[0], "2 written, 0 already done"), (setup.clip[0], "0 written, 2 already done"),
                           (setup.clip[1], "refused"), (setup.clip[1], "2 written, 0 already done")):
        reset = ["--reset"] if expected.startswith("2") and clip == setup.clip[1] else []
        code = main([*args, "--set", f"model.clip.pretrained={clip}", *reset])
        out, err = capsys.readouterr()
        if expected == "refused":  # other CLIP weights: refused, naming them, nothing deleted
            assert code == 2 and "refiner.clip_weights: \"sha256 " in err and "--reset" in err
            assert len(list((tmp_path / "pm").glob("*.png"))) == 2
        else:
            assert code == 0 and expected in out
    manifest = json.loads((tmp_path / "pm" / "manifest.json").read_text())["settings"]
    assert manifest["refiner"]["clip_weights"].startswith("sha256 ")
    assert manifest["refiner"]["model"]["clip"]["normalize"] == "clip"
    assert manifest["labels"]["source"] == f"file {setup.root / 'cls_labels.json'}"
