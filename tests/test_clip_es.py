"""CLIP-ES core against the released code's recorded tensors (clip-es-tiny) and against open_clip's own forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLIP_ES_FIXTURE
from safetensors.torch import load_file

from weakclip.clip import load_clip
from weakclip.clip_es import (
    ClipES,
    cam_boxes,
    crf_image,
    encode_until_last,
    last_block_gradcam,
    preprocess,
    text_features,
)
from weakclip.config import SeedsConfig
from weakclip.errors import WeakclipError
from weakclip.parity import check_fixture, fixture_kind


@pytest.fixture(scope="module")
def fixture(clip_es_fixture) -> Path:
    return clip_es_fixture


@pytest.fixture(scope="module")
def fixture_run(fixture):
    from weakclip.parity.clip_es import run_fixture

    config = json.loads((fixture / "config.json").read_text())
    return config, run_fixture(fixture, config, released=False)


def test_released_mode_reproduces_every_recorded_tensor(fixture):
    assert fixture_kind(json.loads((fixture / "config.json").read_text())) == "clip-es"
    report = check_fixture(fixture)
    assert report.to_json()["pass"], report.failed
    recorded = load_file(str(fixture / "outputs.safetensors"))
    assert set(report.worst) == set(recorded) == set(report.recorded)  # every recorded tensor is compared
    out = report.to_json()
    assert out["recorded"] == out["compared"] == len(recorded)
    # Boxes and token ids are exact; the float16 CAMs within one float16 unit plus the float32 rounding
    # that the float64 run measures: a few units at 1.0 at most, far below what a wrong step moves.
    for name in ("img0.boxes", "img1.box_counts", "text.fg_tokens", "img1.keys"):
        assert report.worst[name]["max_abs"] == 0
    assert report.worst["img0.attn_highres"]["bound"] < 4 * 2.0**-10


def _flip_far_from_a_tie(seed_without_crf):
    """A slip: seed_without_crf with the one pixel whose decision margin is largest given another class."""
    from weakclip.clip_es import background_scores
    from weakclip.parity import top2_margin

    def slipped(cams, labels, power):
        seed = seed_without_crf(cams, labels, power).copy()
        margin = top2_margin(background_scores(cams.astype(np.float32), power)).numpy()
        y, x = np.unravel_index(np.argmax(margin), margin.shape)
        seed[y, x] = labels[0] if seed[y, x] == 0 else 0
        return seed
    return slipped


def test_a_flipped_seed_pixel_with_a_large_margin_fails(fixture, monkeypatch):
    import weakclip.parity.clip_es as checker

    monkeypatch.setattr(checker, "seed_without_crf", _flip_far_from_a_tie(checker.seed_without_crf))
    report = check_fixture(fixture)
    failed = [f for f in report.failed if "seed_nocrf" in f]
    assert len(failed) == 4 and all("1 of" in f and "margin exceeds" in f for f in failed), report.failed


def test_a_real_bug_fails_although_the_float64_run_widens_the_bound(fixture, monkeypatch):
    # An align-corners position resize is in the float64 run as well, so |fp32 - fp64| stays small.
    import torch.nn.functional as F

    import weakclip.clip as clip

    interpolate = F.interpolate

    def corners(x, size=None, mode="nearest", align_corners=None, **kw):
        return interpolate(x, size=size, mode=mode, align_corners=True if mode == "bilinear" else align_corners,
                           **kw)

    monkeypatch.setattr(clip.F, "interpolate", corners)
    report = check_fixture(fixture)
    assert any(f.startswith("img0.pos_embed") for f in report.failed), report.failed
    assert any(f.startswith("img1.cam_raw:") for f in report.failed), report.failed


def test_default_mode_fixes_the_box_clamp(fixture_run):
    config, (_, traces) = fixture_run
    ref = load_file(str(CLIP_ES_FIXTURE / "outputs.safetensors"))
    # The released clamp turns img0's contour (0, 0, 10, 4) on the 10-wide grid into [0, 0, 9, 4] and
    # img1's one-cell contours on the bottom row (6, 8), (3, 8) into empty boxes; the default keeps them.
    assert [0, 0, 9, 4] in ref["img0.boxes"].reshape(-1, 4).tolist()
    assert (0, 0, 10, 4) in [b for boxes in traces["img0"]["boxes"] for b in boxes]
    img1 = [b for boxes in traces["img1"]["boxes"] for b in boxes]
    assert (6, 8, 7, 9) in img1 and (3, 8, 4, 9) in img1
    gh, gw = config["images"][1]["token_grid_hw"]
    masks = traces["img1"]["aff_mask"].reshape(-1, gh, gw)
    ref_masks = ref["img1.aff_mask"].reshape(-1, gh, gw)
    assert ref_masks[:, -1].sum() == 0 and masks[:, -1].sum() > 0  # the last row now takes part
    # Before the boxes it is the released computation but for the positional embedding, not rounded to
    # float16 here: the Grad-CAM moves by well under 1% of its range.
    np.testing.assert_allclose(traces["img0"]["cam_raw"], ref["img0.cam_raw"].numpy(), atol=1e-2)


def test_default_crf_sees_the_image_released_sees_wrapped_bgr(fixture):
    inputs = load_file(str(fixture / "inputs.safetensors"))
    ref = load_file(str(fixture / "outputs.safetensors"))
    image = inputs["img1.image"].numpy()
    np.testing.assert_array_equal(crf_image(image, released=True), ref["img1.crf_image"].numpy())
    np.testing.assert_array_equal(crf_image(image, released=False), image)
    # The wrap, counted by hand: RGB (0, 0, 103) is BGR (103, 0, 0); minus (104.008, 116.669, 122.675) gives
    # (-1.008, -116.669, -122.675), truncated (-1, -116, -122), modulo 256 (255, 140, 134).
    np.testing.assert_array_equal(crf_image(np.array([[[0, 0, 103]]], np.uint8), True)[0, 0], [255, 140, 134])
    np.testing.assert_array_equal(crf_image(np.array([[[0, 0, 104]]], np.uint8), True)[0, 0], [0, 140, 134])


def test_batched_backward_equals_one_backward_per_label(tiny_clip_cfg):
    model = load_clip(tiny_clip_cfg)
    torch.manual_seed(0)
    tokens = torch.randn(1, 1 + 6 * 5, model.visual.conv1.out_channels)
    text = torch.randn(7, model.text_projection.shape[1])
    one = last_block_gradcam(model, tokens, text, 3, batched=True)
    loop = last_block_gradcam(model, tokens, text, 3, batched=False)
    assert one.grads.abs().max() > 0
    torch.testing.assert_close(one.grads, loop.grads, atol=1e-5 * float(loop.grads.abs().max()), rtol=0)
    torch.testing.assert_close(one.probs, loop.probs, atol=0, rtol=0)


def test_vision_forward_matches_open_clip_own_forward(tiny_clip_cfg):
    model = load_clip(tiny_clip_cfg)
    visual = model.visual
    pixels = torch.randn(1, 3, 224, 224)
    seen = {}
    last = visual.transformer.resblocks[-1]
    hook = last.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    with torch.no_grad():
        reference = model.encode_image(pixels)
    hook.remove()
    for exact in (False, True):
        tokens, attns = encode_until_last(visual, pixels, attn_from=1, round_pos=False, exact=exact)
        torch.testing.assert_close(tokens, seen["inp"], atol=1e-5, rtol=1e-5)
        assert len(attns) == len(visual.transformer.resblocks) - 2
        torch.testing.assert_close(attns[0].sum(-1), torch.ones(attns[0].shape[0]), atol=1e-5, rtol=0)
    out = last_block_gradcam(model, tokens, torch.randn(3, reference.shape[1]), 1)
    mean_patch = visual.ln_post(seen["out"])[0, 1:].mean(0) @ visual.proj
    torch.testing.assert_close(out.image_embed, mean_patch, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.image_embed, reference[0], atol=1e-3)  # the class token is not used


def test_exact_text_features_match_open_clip(tiny_clip_cfg):

    from weakclip.clip_es import prompt_tokens

    model = load_clip(tiny_clip_cfg)
    tokens = prompt_tokens(["a clean origami cat.", "a clean origami person with clothes,people,human."], 77)
    ours = text_features(model, tokens, exact=True)
    ref = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_boxes_follow_contours_and_clamp_only_when_released():
    cam = np.zeros((4, 6), np.float32)
    cam[1:3, 1:3] = 1.0  # one blob inside
    cam[3, 5] = 0.9  # a one-cell blob in the bottom-right corner
    released = sorted(cam_boxes(cam, 0.4, released=True))
    fixed = sorted(cam_boxes(cam, 0.4, released=False))
    assert fixed == [(1, 1, 3, 3), (5, 3, 6, 4)]
    assert released == [(1, 1, 3, 3), (5, 3, 5, 3)]  # the corner box is empty
    assert cam_boxes(np.zeros((3, 3), np.float32), 0.4, released=False) == [(0, 0, 0, 0)]


def test_preprocess_rounds_sides_up_to_the_patch():
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    x = preprocess(image, 16)
    assert x.shape == (1, 3, 48, 64)
    assert abs(float(x.mean())) < 3  # normalised with CLIP's statistics


def test_bad_labels_and_unfit_class_names_are_one_line(tiny_clip_cfg):
    model = load_clip(tiny_clip_cfg)
    names = ["background", "cat", "dog"]
    method = ClipES(model, names, SeedsConfig(crf=False, background=["sky"]))
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(WeakclipError, match="no image-level label"):
        method.cams(image, [])
    with pytest.raises(WeakclipError, match="label 3 is outside the class list 1..2"):
        method.cams(image, [1, 3])
    long_name = " ".join(["supercalifragilistic"] * 40)
    with pytest.raises(WeakclipError, match=r"class '.*': its prompt .* tokens but CLIP's text context holds 77"):
        ClipES(model, ["background", long_name], SeedsConfig())
    with pytest.raises(WeakclipError, match="seeds.precision"):
        ClipES(model, names, SeedsConfig(precision="int8"))


def test_low_precision_is_opt_in_and_close_to_fp32(tiny_clip_cfg):


    model = load_clip(tiny_clip_cfg)
    names = ["background", "cat", "dog"]
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    fp32 = ClipES(model, names, SeedsConfig(crf=False)).cams(image, [1, 2]).astype(np.float32)
    bf16 = ClipES(model, names, SeedsConfig(crf=False, precision="bf16")).cams(image, [1, 2]).astype(np.float32)
    assert fp32.max() > 0.99 and not np.array_equal(fp32, bf16)
    assert np.abs(fp32 - bf16).mean() < 0.1


def test_a_resnet_clip_is_refused_in_one_line_with_the_way_out(tiny_resnet_clip_cfg):
    with pytest.raises(WeakclipError, match=r"CLIP-ES seeds need a CLIP ViT image tower; got ModifiedResNet \(make "
                                            r"the seeds with a ViT config") as err:
        ClipES(load_clip(tiny_resnet_clip_cfg), ["background", "cat"], SeedsConfig())
    assert "\n" not in str(err.value)
