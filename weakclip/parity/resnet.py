"""Checker for fixtures recorded from the released CLIP ResNet backbone (``weakclip-rn-tiny``, kind
``resnet-backbone``).

The fixture's OpenAI-format CLIP file is loaded by :func:`weakclip.clip.load_clip`, wrapped by the
``clip-resnet`` backbone as ``model.released`` builds it (sizes floored, attention-pool dense embeddings),
and its released adapter weights (``backbone.fpn*``) are mapped by :mod:`weakclip.released` into the
package's :class:`~weakclip.model.PyramidAdapter`. For every case (single images whose sides are not
multiples of 32, a batch of two at a multiple of 32) every recorded tensor is recomputed by those modules:

* ``tap1..4``: the four stages (``VisualFeatures.taps``); ``adapter1..4``: the adapter's levels on them;
* ``global``, ``dense``: the attention pool's outputs (the forward the model runs); ``pool_tokens``,
  ``pos_embed``, ``attn``: its inputs and head-averaged weights (``ClipResNet.attention_pool``'s ``trace``);
* ``dense_vc``: the same backbone with ``dense: maskclip`` (each position's value and output projection).

Each runs in float32 and float64 and is judged by the derived bound of :mod:`weakclip.parity`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..backbones import ClipResNet, build_backbone
from ..clip import load_clip
from ..config import BackboneConfig, ClipConfig
from ..model import PyramidAdapter
from ..released import released_adapter_state
from . import ParityReport, register_checker

# The released dense embeddings: every position's output of the pool's self-attention.
RELEASED_DENSE = "attention-pool"


def build_released_backbone(fixture: Path, config: dict, dense: str = RELEASED_DENSE) -> tuple[ClipResNet,
                                                                                               PyramidAdapter]:
    """The fixture's CLIP tower as the released-mode ``clip-resnet`` backbone, and its adapter (eval, float32)."""
    clip_cfg = ClipConfig(model="released-resnet", pretrained=str(fixture / "clip_state_dict.safetensors"),
                          arch=copy.deepcopy(config["open_clip_arch"]))
    visual = load_clip(clip_cfg).visual
    backbone = build_backbone(visual, BackboneConfig(type="clip-resnet", dense=dense), released=True)
    adapter = PyramidAdapter(backbone.tap_channels, backbone.tap_strides)
    adapter.load_state_dict(released_adapter_state(load_file(str(fixture / "adapter_state_dict.safetensors"))))
    return backbone.eval(), adapter.eval()


def fixture_outputs(fixture: Path, config: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """Our value of every recorded tensor, by name (``<case>.<tensor>``), with the modules in ``dtype``."""
    inputs = load_file(str(fixture / "inputs.safetensors"))
    backbone, adapter = build_released_backbone(fixture, config, RELEASED_DENSE)
    backbone, adapter = backbone.to(dtype), adapter.to(dtype)
    maskclip = ClipResNet(backbone.visual, "maskclip", floor=backbone.floor)  # the same tower and weights
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for case in config["cases"]:
            x = inputs[f"{case}.input"].to(dtype)
            feats = backbone(x)  # the production forward, no weights asked for
            trace: dict[str, Tensor] = {}
            backbone.attention_pool(feats.taps[3], trace)  # the pool's inputs and weights, for the diagnostics
            for i, (tap, level) in enumerate(zip(feats.taps, adapter(feats.taps)), start=1):
                out[f"{case}.tap{i}"], out[f"{case}.adapter{i}"] = tap, level
            out[f"{case}.global"], out[f"{case}.dense"] = feats.global_embedding, feats.dense
            out.update({f"{case}.{k}": v for k, v in trace.items()})
            out[f"{case}.dense_vc"] = maskclip(x).dense
    return out


@register_checker("resnet-backbone")
def check_resnet_backbone(fixture: Path, config: dict, report: ParityReport) -> None:
    """Every recorded tensor against our float32 value, with the bound taken from the float64 run."""
    ref = load_file(str(fixture / "outputs.safetensors"))
    ours, ours64 = fixture_outputs(fixture, config, torch.float32), fixture_outputs(fixture, config, torch.float64)
    for name, value in ours.items():
        report.close(name, value, ref[name], fp64=ours64[name])
