"""The released CLIP ResNet backbone (fixture ``weakclip-rn-tiny``): the package reproduces every recorded tensor,
and each slip from the released computation makes the check fail on the tensors it touches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, _shared
from safetensors.torch import load_file
from torch import nn

import weakclip.backbones.resnet
from weakclip.parity import check_fixture
from weakclip.parity import resnet as parity_resnet
from weakclip.released import released_adapter_state

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
    # The production forward reproduces the released taps, adapter levels and embeddings to the bit here.
    assert all(w["max_abs"] == 0 for name, w in report["worst"].items() if name.split(".")[1].startswith(("tap", "adapter")))


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
