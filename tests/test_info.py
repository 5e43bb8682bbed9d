"""`weakclip info` counts parameters from the architecture alone: no CLIP weights are read or fetched."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

import weakclip.clip
from weakclip.cli import main
from weakclip.config import ClipConfig, ModelConfig
from weakclip.model import build_architecture, build_model


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load or fetch CLIP weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("info must not load CLIP weights")

    monkeypatch.setattr(weakclip.clip, "load_clip", refuse)
    real = open_clip.create_model

    def create(name, pretrained=None, **kwargs):
        if pretrained is not None:
            refuse()
        return real(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create)


def test_info_voc_counts_the_released_architecture_without_weights(no_weights, capsys):
    assert main(["info", "--config", "voc"]) == 0  # model.clip.pretrained: openai, never fetched
    counts = json.loads(capsys.readouterr().out)["parameters"]
    # Analytic counts from the released code's module definitions (reference notes, section 1.9).
    assert counts["adapter"] == 7_087_872 and counts["co_attention"] == 2_633_216
    assert counts["neck"] == 3_169_280 and counts["head"] == 4_137_749
    assert counts["prompts"] + counts["alpha_beta"] == 5_120
    assert counts["clip_visual"] == 86_192_640
    assert counts["trainable"] == 7_087_872 + 2_633_216 + 3_169_280 + 4_137_749 + 5_120


def test_architecture_counts_equal_those_of_the_built_model(tiny_clip_cfg):
    cfg = ModelConfig(clip=tiny_clip_cfg, decoder_channels=32, coattn_layers=2)
    names = ["background", "cat", "dog"]
    meta = build_architecture(cfg, names)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta.param_counts() == build_model(cfg, names).param_counts()
    named = ModelConfig(clip=ClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    reference = open_clip.create_model("ViT-B-32", pretrained=None)  # the same open_clip model, random
    assert build_architecture(named, names).param_counts()["clip_visual"] == sum(
        p.numel() for p in reference.visual.parameters())
    assert torch.get_default_device().type == "cpu"  # the meta device does not leak out
