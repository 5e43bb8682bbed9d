"""`weakclip info` counts parameters from the architecture alone: no CLIP weights are read or fetched."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

import weakclip.clip
from weakclip.cli import main
from weakclip.config import ClipConfig, CoAttentionConfig, ModelConfig
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
    cfg = ModelConfig(clip=tiny_clip_cfg, decoder_channels=32, co_attention=CoAttentionConfig(layers=2))
    names = ["background", "cat", "dog"]
    meta = build_architecture(cfg, names)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta.param_counts() == build_model(cfg, names).param_counts()
    named = ModelConfig(clip=ClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    reference = open_clip.create_model("ViT-B-32", pretrained=None)  # the same open_clip model, random
    assert build_architecture(named, names).param_counts()["clip_visual"] == sum(
        p.numel() for p in reference.visual.parameters())
    assert torch.get_default_device().type == "cpu"  # the meta device does not leak out


def _co_attention_params(d: int, width: int = 256) -> int:
    """One decoder layer per direction at ``width`` over D = ``d`` embeddings (reference notes, section 1.5)."""
    layer = 3 * 2 * width + 2 * (4 * width * width + width) + (width * 4 * width + 4 * width) + (4 * width * width + width)
    projections = (2 * d + d * width + width + 2 * width) + (2 * d + d * width + width)
    outputs = 2 * (2 * width + width * d + d)
    return projections + 2 * layer + outputs


@pytest.mark.parametrize(("config", "clip_model"), [("voc-rn50", "RN50"), ("voc-rn101", "RN101")])
def test_info_resnet_configs_count_the_paper_backbones_without_weights(no_weights, capsys, config, clip_model):
    assert main(["info", "--config", config]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["clip"], out["backbone"]) == (clip_model, "ClipResNet")
    counts = out["parameters"]
    reference = open_clip.create_model(clip_model, pretrained=None)  # random: the architecture only
    stages = [256, 512, 1024, 2048]  # bottleneck stage widths of RN50 and RN101
    assert counts["clip_visual"] == sum(p.numel() for p in reference.visual.parameters())
    # The text tower less its position table (a buffer of the prompt encoder) and CLIP's logit scale.
    assert counts["clip_text"] == sum(p.numel() for n, p in reference.named_parameters()
                                      if not n.startswith("visual.") and n not in ("positional_embedding", "logit_scale"))
    # The released CLIPResNetWithAttention adapter (reference notes, section 3): fpn1 GroupNorm, 3x3 conv,
    # BatchNorm, GELU, 3x3 conv; fpn2 and fpn4 GroupNorm, 3x3 conv; fpn3 GroupNorm. Norms hold 2 C, a conv 9 C^2 + C.
    c1, c2, c3, c4 = stages
    conv = [9 * c * c + c for c in stages]
    assert counts["adapter"] == (4 * c1 + 2 * conv[0]) + (2 * c2 + conv[1]) + 2 * c3 + (2 * c4 + conv[3])
    assert conv[3] == 37_750_784  # the fpn4 convolution alone: 37.7M
    assert counts["neck"] == sum((c + 21) * 256 + 256 for c in stages) + 4 * (256 * 256 * 9 + 256)
    assert counts["head"] == 4_137_749  # as with ViT-B/16: 256 channels, 21 classes
    assert counts["co_attention"] == _co_attention_params(reference.visual.output_dim)
    assert counts["alpha_beta"] == 2 * reference.visual.output_dim
    assert counts["frozen"] == counts["clip_visual"] + counts["clip_text"]
    assert counts["trainable"] + counts["frozen"] == counts["total"]


def test_co_attention_count_formula_gives_the_released_number():
    assert _co_attention_params(512) == 2_633_216  # the released ViT-B/16 count (reference notes, section 1.9)
