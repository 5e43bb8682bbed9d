"""Numerical parity with the released WeakCLIP code, on the fixtures recorded from it (../shared/reference/parity).

Every fixture folder of the WeakCLIP kind is checked by the same code as ``benchmarks/parity.py``, so a
fixture recorded later from another configuration needs no new test. The other tests show that the
comparisons can fail: switching off one released behaviour breaks the odd-grid test-time numbers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import _shared
from safetensors.torch import load_file

from weakclip.coattention import CoAttention
from weakclip.config import Config
from weakclip.errors import WeakclipError
from weakclip.parity import check_fixture, fixture_kind
from weakclip.parity.weakclip import build_released_model
from weakclip.released import DEAD_LAYER_REASON, convert_state_dict, released_config

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
PARITY = REFERENCE / "parity"


def _reference(path: Path) -> Path:
    return _shared(path, "the parity reference")


def _fixtures() -> list[str]:
    if not PARITY.is_dir():
        return ["weakclip-tiny", "weakclip-tiny-odd", "clip-es-tiny", "weakclip-rn-tiny"]  # reported missing
    return sorted(p.name for p in PARITY.iterdir() if (p / "config.json").is_file())


@pytest.mark.slow
@pytest.mark.parametrize("name", _fixtures())
def test_fixture_passes_every_comparison(name):
    """Every fixture folder, whatever its kind, passes with every recorded tensor compared."""
    fixture = _reference(PARITY / name)
    report = check_fixture(fixture)
    assert not report.failed, report.failed
    recorded = set(load_file(str(fixture / "outputs.safetensors")))
    assert set(report.recorded) == recorded and recorded <= set(report.worst)
    out = report.to_json()
    assert out["pass"] and out["recorded"] == out["compared"] == len(recorded)
    if fixture_kind(json.loads((fixture / "config.json").read_text())) == "weakclip":
        # The uint8 image through our own view resizing (OpenCV bilinear in released mode) is checked too.
        assert "own_views.cv2.aug_probs" in report.worst and "own_views.cv2.aug_pred" in report.worst


def test_fixture_kind_is_read_before_the_repository():
    assert fixture_kind({"kind": "resnet-backbone", "source": {"repo": "hustvl/WeakCLIP"}}) == "resnet-backbone"
    assert fixture_kind({"source": {"repo": "hustvl/WeakCLIP", "kind": "resnet-backbone"}}) == "resnet-backbone"
    assert fixture_kind({"official": {"repo": "hustvl/WeakCLIP"}}) == "weakclip"
    assert fixture_kind({"source": {"repo": "linyq2117/CLIP-ES"}}) == "clip-es"
    with pytest.raises(WeakclipError, match="unknown parity fixture"):
        fixture_kind({"source": {"repo": "someone/else"}})


def test_an_uncompared_recorded_tensor_fails(monkeypatch, tmp_path):
    from weakclip import parity

    fixture = _reference(PARITY / "weakclip-tiny")
    monkeypatch.setitem(parity._CHECKERS, "weakclip", lambda f, c, report: report.close("score_map", 1.0, 1.0))
    report = check_fixture(fixture)
    assert report.failed and report.failed[-1].startswith("recorded but not compared: ")
    assert not report.to_json()["pass"] and report.to_json()["compared"] == 1


def test_bounds_are_the_documented_formula():
    # ref max 2: the scale term at ref 1 is 1e-5 * (1 + 2) = 3e-5; fp32 - fp64 = 1e-5 adds 4e-5.
    from weakclip.parity import ParityReport, fp16_ulp

    ref = torch.tensor([1.0, 2.0])
    for diff, fp64, ok in [(2.9e-5, None, True), (3.1e-5, None, False), (6.9e-5, 1e-5, True), (7.1e-5, 1e-5, False)]:
        report = ParityReport()
        ours = ref + torch.tensor([diff, 0.0], dtype=torch.float64)
        got = report.close("x", ours, ref, fp64=None if fp64 is None else ours - fp64)
        assert got is ok, (diff, fp64)
    assert fp16_ulp(torch.tensor([1.0, 0.75, 0.0])).tolist() == [2.0**-10, 2.0**-11, 2.0**-24]
    report = ParityReport()  # labels: a differing pixel passes only where its margin is within the bound
    assert report.labels("a", torch.tensor([1, 2]), torch.tensor([1, 3]), torch.tensor([9.0, 0.1]), 0.2)
    assert report.allowed == {"a": 1}
    assert not report.labels("b", torch.tensor([1, 2]), torch.tensor([1, 3]), torch.tensor([9.0, 0.3]), 0.2)


@pytest.fixture(scope="module")
def odd():
    fixture = _reference(PARITY / "weakclip-tiny-odd")
    config = json.loads((fixture / "config.json").read_text())
    inputs = load_file(str(fixture / "inputs.safetensors"))
    ref = load_file(str(fixture / "outputs.safetensors"))
    model, _ = build_released_model(fixture, config)
    return fixture, config, inputs, ref, _view_probs(model, config, inputs)


def _view_probs(model, config, inputs, which=None):
    """Per-view probabilities at the image size (view index -> (K, H, W)), as the released aug_test."""
    from weakclip.infer import view_probs

    size = tuple(inputs["infer_image_uint8"].shape[:2])
    crop = config["inference"]["test_cfg"]["crop_size"][0]
    stride = config["inference"]["test_cfg"]["stride"][0]
    flips = [v["flip"] for v in config["inference"]["views"]]
    which = range(len(flips)) if which is None else which

    def predict(x):
        return model.forward_normalized(x)["logits"]

    with torch.no_grad():
        return {i: view_probs(predict, inputs[f"aug_view.{i}"], [flips[i]], size, crop, stride)[0] for i in which}


def _ceil_pool(model):
    model.adapter.level4[1].ceil_mode = True


def _pad_not_truncate(model):
    model.visual.truncate = False


@pytest.mark.parametrize("break_it", [_ceil_pool, _pad_not_truncate])
def test_each_released_behaviour_matters_on_odd_grids(odd, break_it):
    # The 0.5 views (64 x 91: width not a multiple of 16, 4 x 5 token grid) are recomputed with one released
    # behaviour switched off; the average over all twelve views then no longer matches.
    fixture, config, inputs, ref, good = odd
    torch.testing.assert_close(sum(good.values()) / len(good), ref["infer.aug_probs"], rtol=1e-5, atol=1e-6)
    model, _ = build_released_model(fixture, config)
    break_it(model)
    probs = {**good, **_view_probs(model, config, inputs, which=[0, 1])}
    assert (sum(probs.values()) / len(probs) - ref["infer.aug_probs"]).abs().max() > 1e-3


def test_class_token_counted_twice_is_what_the_released_numbers_need(odd):
    fixture, config, inputs, ref, _ = odd
    model, _ = build_released_model(fixture, config)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_normalized(inputs["img"])["score_map"], ref["score_map"],
                                   rtol=1e-5, atol=1e-6)
        model.visual.class_token_twice = False
        score = model.forward_normalized(inputs["img"])["score_map"]
    assert (score - ref["score_map"]).abs().max() > 1e-3


def test_unchained_co_attention_is_what_the_released_numbers_need(odd):
    # The released form (one layer per direction acts) matches; chaining layers (the bidirectional form) does not.
    fixture, config, inputs, ref, _ = odd
    state = load_file(str(fixture / "state_dict.safetensors"))
    conv = convert_state_dict(state, "fixture", 2, 2, 2)
    assert set(conv.ignored) == {k for k in state if re.match(r"context_decoder\.(anti_)?decoder\.[01]\.", k)}
    assert set(conv.ignored.values()) == {DEAD_LAYER_REASON}
    model, cfg = build_released_model(fixture, config)
    assert cfg.model.co_attention.type == "released"
    chained = CoAttention(dataclasses.replace(cfg.model.co_attention, type="bidirectional", layers=2),
                          model.visual.embed_dim)
    released = model.co_attention.state_dict()
    chained.load_state_dict({**released, **{k.replace("layers.0.", "layers.1."): v for k, v in released.items()
                                            if "layers.0." in k}})
    with torch.no_grad():
        feats = model.visual(inputs["img"])
        tokens = torch.cat([feats.global_embedding[:, None], feats.dense.flatten(2).transpose(1, 2)], 1)
        text = model.text()[None].expand(2, -1, -1)
        d_text, _ = model.co_attention.deltas(text, tokens)
        torch.testing.assert_close(d_text, ref["coattn.text_diff"], rtol=1e-4, atol=1e-6)
        d_chained, _ = chained.eval().deltas(text, tokens)
    assert (d_chained - ref["coattn.text_diff"]).abs().max() > 1e-3


def _official_keys() -> dict[str, tuple[tuple[int, ...], str]]:
    path = _reference(REFERENCE / "official-state-dict-keys.txt")
    out = {}
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(s) for s in re.findall(r"\d+", shape)), dtype)
    return out


def test_full_size_released_key_list_converts_into_the_vit_b16_voc_model():
    """All 521 keys of the released VOC checkpoint: mapped into the ViT-B/16 model or ignored with a reason."""
    keys = _official_keys()
    assert len(keys) == 521
    with torch.device("meta"):
        state = {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in keys.items()}
        conversion = convert_state_dict(state, "official-state-dict-keys.txt")
        cfg = released_config(Config(), conversion, list(Config().data.class_names))
        from weakclip.clip import load_clip
        from weakclip.model import build_model

        model = build_model(cfg.model, cfg.data.class_names, load_clip(cfg.model.clip, from_checkpoint=True))
    assert len(conversion.mapping) + len(conversion.ignored) == 521
    assert len(conversion.ignored) == 2 * 2 * 20  # layers 0 and 1 of both co-attention stacks, 20 tensors each
    own = model.weakclip_state_dict()
    assert set(conversion.state) == set(own), (sorted(set(own) - set(conversion.state))[:5],
                                               sorted(set(conversion.state) - set(own))[:5])
    for key, tensor in conversion.state.items():
        assert tuple(tensor.shape) == tuple(own[key].shape), key
    model.load_weakclip_state_dict(conversion.state, "official keys")  # the loader's own checks agree
    vis = cfg.model.clip.arch["vision_cfg"]
    assert (vis["width"], vis["layers"], vis["image_size"], vis["width"] // vis["head_width"]) == (768, 12, 512, 12)
    assert cfg.model.clip.arch["text_cfg"]["heads"] == 8 and cfg.model.co_attention.heads == 4
    assert (cfg.model.released, cfg.model.n_ctx, cfg.model.name_length, cfg.model.decoder_channels) == (True, 8, 5, 256)
