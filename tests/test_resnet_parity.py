"""The released CLIP ResNet backbone (fixture ``weakclip-rn-tiny``): the package reproduces every recorded tensor,
each slip from the released computation makes the check fail on the tensors it touches, and a full-size
released RN50 checkpoint converts with every key accounted for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, _shared
from safetensors.torch import load_file
from torch import nn

import weakclip.backbones.resnet
from weakclip.clip import load_clip
from weakclip.config import BackboneConfig, Config
from weakclip.model import build_model
from weakclip.parity import check_fixture
from weakclip.parity import resnet as parity_resnet
from weakclip.released import convert_state_dict, released_adapter_state, released_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fixture() -> Path:
    return _shared(SHARED / "reference" / "parity" / "weakclip-rn-tiny", "the ResNet parity fixture")


def _failed_tensors(fixture: Path) -> set[str]:
    report = check_fixture(fixture)
    assert len(report.worst) == len(report.recorded) == 42  # still every tensor compared
    return {line.split(":")[0] for line in report.failed}


def test_benchmark_passes_with_every_recorded_tensor_compared(fixture):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parity.py"), "--fixture", str(fixture), "--json"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["pass"] and report["recorded"] == report["compared"] == 42 and not report["failed"]


def test_every_released_adapter_key_lands_in_the_adapter(fixture):
    state = load_file(str(fixture / "adapter_state_dict.safetensors"))
    mapped = released_adapter_state(state)
    assert len(mapped) == len(state) == 21
    assert {"level1.4.weight", "level3.weight", "level4.1.weight", "level4.1.bias"} <= set(mapped)
    _, adapter = parity_resnet.build_released_backbone(fixture, json.loads((fixture / "config.json").read_text()))
    assert set(mapped) == set(adapter.state_dict())


def test_tanh_gelu_in_the_adapter_fails(fixture, monkeypatch):
    monkeypatch.setattr(nn.GELU, "forward", lambda self, x: F.gelu(x, approximate="tanh"))
    failed = _failed_tensors(fixture)
    assert {"img0.adapter1", "img1.adapter1", "pair.adapter1"} <= failed
    assert not any(".tap" in name or ".global" in name for name in failed)  # only the level with the GELU


def _corner_aligned(table: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The slip: the pool's position grid resized with align_corners=True."""
    body = table[1:].reshape(1, *grid, -1).permute(0, 3, 1, 2)
    body = F.interpolate(body, size=tuple(size), mode="bilinear", align_corners=True)
    return torch.cat([table[:1], body.flatten(2)[0].transpose(0, 1)])


def test_align_corners_position_resize_fails(fixture, monkeypatch):
    monkeypatch.setattr(weakclip.backbones.resnet, "resize_positions", _corner_aligned)
    failed = _failed_tensors(fixture)
    for case in ("img0", "img1", "pair"):
        assert {f"{case}.pos_embed", f"{case}.global", f"{case}.dense"} <= failed


def test_per_position_projection_in_place_of_the_attention_pool_fails(fixture, monkeypatch):
    monkeypatch.setattr(parity_resnet, "RELEASED_DENSE", "maskclip")
    failed = _failed_tensors(fixture)
    assert failed == {f"{case}.dense" for case in ("img0", "img1", "pair")}  # the global embedding is the same


def _released_rn50_keys() -> dict[str, tuple[int, ...]]:
    """The key list of a released VOC checkpoint with a CLIP RN50 backbone (``CLIPResNetWithAttention``,
    ``if_fpn=True``): the recorded full-size ViT-B/16 list with its ``backbone.*`` keys replaced by OpenAI's
    RN50 image-tower names (which the released class keeps 1:1) and the released ResNet adapter, and the
    widths that follow the backbone changed: D = 1024 for the joint space, C_i + 21 for the laterals."""
    path = _shared(SHARED / "reference", "the reference notes") / "official-state-dict-keys.txt"
    keys = {}
    for line in path.read_text().splitlines():
        key, shape, _ = line.split("\t")
        keys[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    keys = {k: v for k, v in keys.items() if not k.startswith("backbone.")}
    with torch.device("meta"):
        rn50 = open_clip.create_model("RN50", pretrained=None, device="meta").visual
    keys.update({f"backbone.{k}": tuple(v.shape) for k, v in rn50.state_dict().items()})
    for i, c in enumerate((256, 512, 1024, 2048), start=1):  # reference notes, section 3
        layers = {1: ("0", "1", "2", "4"), 2: ("0", "1"), 3: ("",), 4: ("0", "1")}[i]
        for layer in layers:
            prefix = f"backbone.fpn{i}.{layer}." if layer else f"backbone.fpn{i}."
            conv = layer in ("1", "4")
            keys[prefix + "weight"] = (c, c, 3, 3) if conv else (c,)
            keys[prefix + "bias"] = (c,)
            if i == 1 and layer == "2":
                keys.update({prefix + "running_mean": (c,), prefix + "running_var": (c,),
                             prefix + "num_batches_tracked": ()})
        keys[f"neck.lateral_convs.{i - 1}.conv.weight"] = (256, c + 21, 1, 1)
    joint = re.compile(r"(gamma|beta|context_decoder\.(memory_proj|text_proj|out_proj|anti_out_proj)\.\d\.)")
    for key, shape in keys.items():
        if joint.match(key):
            keys[key] = tuple(1024 if s == 512 else s for s in shape)
    keys["text_encoder.text_projection"] = (512, 1024)
    return keys


def test_full_size_released_rn50_checkpoint_converts_with_every_key_accounted_for():
    keys = _released_rn50_keys()
    assert sum(k.startswith("backbone.fpn") for k in keys) == 21
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape in keys.items()}
        conversion = convert_state_dict(state, "rn50 keys")
        cfg = released_config(Config(), conversion, list(Config().data.class_names))
        model = build_model(cfg.model, cfg.data.class_names, load_clip(cfg.model.clip, from_checkpoint=True))
    assert len(conversion.mapping) + len(conversion.ignored) == len(keys)
    assert all(conversion.mapping[k].startswith("adapter.level") for k in keys if k.startswith("backbone.fpn"))
    own = model.weakclip_state_dict()
    assert set(conversion.state) == set(own), (sorted(set(own) - set(conversion.state))[:5],
                                               sorted(set(conversion.state) - set(own))[:5])
    for key, tensor in conversion.state.items():
        assert tuple(tensor.shape) == tuple(own[key].shape), key
    model.load_weakclip_state_dict(conversion.state, "rn50 keys")
    vision = cfg.model.clip.arch["vision_cfg"]
    assert vision == {"layers": [3, 4, 6, 3], "width": 64, "head_width": 64, "image_size": 224}  # 32 pool heads
    assert cfg.model.backbone == BackboneConfig(type="clip-resnet") and cfg.model.released
    assert isinstance(model.visual, weakclip.backbones.resnet.ClipResNet) and model.visual.floor
