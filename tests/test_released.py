"""Released checkpoints (mmcv .pth): conversion, the convert-checkpoint command, and loading wherever a
checkpoint is accepted. The checkpoints here are the parity fixture's official state dict saved the way
mmcv saves one (``state_dict`` + ``meta``), so the converted model is checked against the recorded numbers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from weakclip.checkpoints import load_refiner, load_released
from weakclip.cli import main
from weakclip.config import VOC_CLASSES, config_from_dict, load_config
from weakclip.engine import read_header
from weakclip.errors import WeakclipError
from weakclip.released import read_released

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "parity" / "weakclip-tiny"
HEADS = {"vision_heads": 2, "text_heads": 2, "coattn_heads": 2}


@pytest.fixture(scope="module")
def released_pth(tmp_path_factory) -> Path:
    if not FIXTURE.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{FIXTURE} is missing: CI must run with ../shared beside the clone")
        pytest.skip(f"parity fixture not found at {FIXTURE}")
    path = tmp_path_factory.mktemp("released") / "train_iter_8000.pth"
    state = load_file(str(FIXTURE / "state_dict.safetensors"))
    meta = {"mmcv_version": "1.3.17", "iter": 8000, "CLASSES": tuple(VOC_CLASSES), "config": "model = dict(...)"}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def _score_map(model) -> torch.Tensor:
    img = load_file(str(FIXTURE / "inputs.safetensors"))["img"]
    with torch.no_grad():
        return model.eval().forward_normalized(img)["score_map"]


def test_convert_checkpoint_command_writes_a_released_mode_checkpoint(released_pth, tmp_path, capsys):
    out = tmp_path / "released.safetensors"
    assert main(["convert-checkpoint", str(released_pth), str(out), "--vision-heads", "2", "--text-heads", "2",
                 "--coattn-heads", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ignored"] == 80 and summary["mapped"] == 413 - 80
    header = read_header(out)
    assert header["source_sha256"] == hashlib.sha256(released_pth.read_bytes()).hexdigest()
    assert len(json.loads(header["ignored_keys"])) == 80
    cfg = config_from_dict(yaml.safe_load(header["config"]))
    assert cfg.model.released and cfg.model.clip.in_checkpoint and cfg.data.class_names == list(VOC_CLASSES)
    # The converted file holds CLIP's weights too, and rebuilds the fixture's network.
    model, _ = load_refiner(out, cfg)
    ref = load_file(str(FIXTURE / "outputs.safetensors"))["score_map"]
    torch.testing.assert_close(_score_map(model), ref, rtol=1e-5, atol=1e-6)
    # The .pth read directly gives the same model.
    direct, direct_cfg, _ = load_released(released_pth, load_config("voc"), **HEADS)
    assert direct_cfg.model == cfg.model
    torch.testing.assert_close(_score_map(direct), _score_map(model), rtol=0, atol=0)


def test_training_starts_from_a_converted_checkpoint(released_pth, tmp_path):
    from weakclip.train import initial_model

    out = tmp_path / "released.safetensors"
    assert main(["convert-checkpoint", str(released_pth), str(out), "--vision-heads", "2", "--text-heads", "2",
                 "--coattn-heads", "2"]) == 0
    base = load_config("voc")
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, init_from=str(out)))
    model, used = initial_model(cfg)
    assert used.model.released and used.model.clip.in_checkpoint
    ref = load_file(str(FIXTURE / "outputs.safetensors"))["score_map"]
    torch.testing.assert_close(_score_map(model), ref, rtol=1e-5, atol=1e-6)
    # What training saves keeps the CLIP weights it started from.
    state = model.weakclip_state_dict()
    assert "visual.visual.conv1.weight" in state and "text.positional_embedding" in state


def test_released_pth_without_head_counts_is_one_clear_error(released_pth):
    # The tiny fixture's widths (32, 16) cannot be split into the released 64-wide heads.
    with pytest.raises(WeakclipError, match="heads"):
        load_released(released_pth, load_config("voc"))


def test_not_a_released_checkpoint_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(WeakclipError, match="not a released WeakCLIP checkpoint"):
        read_released(path)
    assert main(["convert-checkpoint", str(path), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a released WeakCLIP checkpoint" in err[0] and str(path) in err[0]
