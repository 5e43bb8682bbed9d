"""A refiner checkpoint carries its architecture: load_refiner builds the model from the config stored in it
and refuses, in one line, a run config whose classes or architecture disagree."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_data_root, sample_ids, write_tiny_config

from weakclip.checkpoints import load_refiner
from weakclip.cli import main
from weakclip.config import load_config
from weakclip.engine import save_weights
from weakclip.errors import WeakclipError
from weakclip.model import build_model
from weakclip.train import checkpoint_metadata


@pytest.fixture
def trained(tmp_path, voc_sample):
    """A checkpoint trained with non-default settings (released normalisation and class token, other taps)."""
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 2))
    run_config = write_tiny_config(tmp_path / "run.yaml", root, infer={"crf_workers": 0})
    cfg = load_config(str(run_config))
    clip = dataclasses.replace(cfg.model.clip, normalize="imagenet")
    backbone = dataclasses.replace(cfg.model.backbone, class_token_twice=True, taps=[1, 2, 3, 4])
    train_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, clip=clip, backbone=backbone))
    torch.manual_seed(0)
    model = build_model(train_cfg.model, train_cfg.data.class_names).eval()
    with torch.no_grad():  # trained weights: away from their initial values
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "model.safetensors"
    save_weights(ckpt, model, checkpoint_metadata(train_cfg))
    return cfg, run_config, model, ckpt


def test_the_model_is_built_from_the_checkpoints_config(trained, capsys):
    cfg, _, model, ckpt = trained
    assert cfg.model.clip.normalize == "clip"  # the run config says otherwise
    loaded = load_refiner(ckpt, cfg)[0].eval()
    assert loaded.cfg.clip.normalize == "imagenet" and loaded.cfg.backbone.class_token_twice
    assert loaded.visual.taps == [1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "model.clip.normalize='imagenet'" in err and "the checkpoint's settings are used" in err
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(loaded(images)["logits"], model(images)["logits"], atol=1e-5)
        rebuilt = build_model(cfg.model, cfg.data.class_names).eval()  # the run config's own model
        rebuilt.load_weakclip_state_dict(model.weakclip_state_dict(), "state")
        assert not torch.allclose(rebuilt(images)["logits"], model(images)["logits"], atol=1e-3)


@pytest.mark.parametrize(("change", "message"), [
    (["model.decoder_channels=16"], "trained with model.decoder_channels=32, the config has model.decoder_channels=16"),
    (["model.n_ctx=4"], "trained with model.n_ctx=8, the config has model.n_ctx=4"),
    (["model.clip.arch.vision_cfg.layers=2"], "trained with model.clip.arch={"),
    (["model.clip.arch=null", "model.clip.model=ViT-B-16"], "trained with model.clip.arch={"),
    (["data.class_names=[background,cat,kitten]", "infer.label_filter=false"],
     "trained on 21 classes (background, aeroplane, bicycle, ...), the config has 3 (background, cat, kitten, ...); "
     "not in the checkpoint: kitten"),
])
def test_a_disagreeing_run_config_is_refused_in_one_line(trained, tmp_path, capsys, change, message):
    _, run_config, _, ckpt = trained
    sets = [arg for item in change for arg in ("--set", item)]
    for command in (["pseudo-masks", "--output", str(tmp_path / "pm")],
                    ["predict", "--split", "train", "--output", str(tmp_path / "pred")]):
        code = main([*command, "--config", str(run_config), "--checkpoint", str(ckpt), *sets])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"weakclip: error: {ckpt}: ") and message in err[0]
    assert not (tmp_path / "pm").exists()


def test_a_checkpoint_without_a_config_is_refused(trained, tmp_path):
    cfg, _, model, _ = trained
    bare = tmp_path / "bare.safetensors"
    save_weights(bare, model, {"format": "weakclip"})
    with pytest.raises(WeakclipError, match="no config in its header"):
        load_refiner(bare, cfg)
