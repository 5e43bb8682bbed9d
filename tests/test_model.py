"""The WeakCLIP network: shapes, what trains, ablation switches, co-attention chaining, checkpoint state."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from weakclip.config import VOC_CLASSES, ModelConfig
from weakclip.errors import WeakclipError
from weakclip.model import WeakCLIP, build_model, deconv2x2


@pytest.fixture
def model_cfg(tiny_clip_cfg):
    return ModelConfig(clip=tiny_clip_cfg)


def _build(cfg, **changes):
    torch.manual_seed(0)
    return build_model(dataclasses.replace(cfg, **changes), list(VOC_CLASSES))


def test_shapes_at_320x480(model_cfg):
    model = _build(model_cfg)
    out = model(torch.randint(0, 256, (2, 3, 320, 480), dtype=torch.uint8))
    assert out["logits"].shape == (2, 21, 80, 120)
    assert out["score_map"].shape == (2, 21, 20, 30)
    assert out["score_map"].abs().max() <= 1.0 + 1e-5  # cosine


def test_odd_input_sizes_give_quarter_resolution_logits(model_cfg):
    model = _build(model_cfg).eval()
    out = model(torch.randint(0, 256, (1, 3, 200, 250), dtype=torch.uint8))
    assert out["logits"].shape == (1, 21, 50, 63)
    assert out["score_map"].shape == (1, 21, 13, 16)


def _textbook_decoder(model, pyramid, score):
    """The text-guided decoder as the paper and the released code write it: the score map concatenated onto
    each level, FPN laterals, top-down sums, output convs, every head branch upsampled on its own and
    bilinearly resized to the finest level when it does not land there, summed, classified."""
    neck, head = model.neck, model.head
    lat = [conv(torch.cat([f, F.interpolate(score, size=f.shape[2:], mode="bilinear", align_corners=True)], 1))
           for conv, f in zip(neck.lateral, pyramid)]
    for i in range(3, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    outs = [conv(x) for conv, x in zip(neck.output, lat)]
    summed = head.branches[0](outs[0])
    for branch, f in zip(head.branches[1:], outs[1:]):
        summed = summed + F.interpolate(branch(f), size=summed.shape[2:], mode="bilinear", align_corners=False)
    return head.classifier(summed)


@pytest.mark.parametrize("backbone", ["vit", "vit-released", "resnet"])
@pytest.mark.parametrize("size", [(128, 192), (80, 112), (64, 91), (200, 250)])
def test_decoder_fast_paths_equal_the_textbook_composition(model_cfg, tiny_resnet_clip_cfg, size, backbone):
    # The neck's split laterals (no concatenation built), the head's shared upsampling and the adapter's
    # channels-last deconvolutions against the textbook order. ViT token grids 8 x 12 and 5 x 7 (even, odd),
    # 4 x 6 released, 13 x 16 (odd, padded); 4 x 5 (truncated) floors the 1/32 level, whose head branch then
    # needs the resize. ResNet grids 4 x 6 .. 7 x 8 at 1/32, from inputs padded to multiples of 32.
    cfg = dataclasses.replace(model_cfg, clip=tiny_resnet_clip_cfg) if backbone == "resnet" else model_cfg
    model = _build(cfg, released=backbone == "vit-released").eval()
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        feats = model.visual(model.normalize(images))
        pyramid = model.adapter(feats.taps)
        assert [p.shape[2:] for p in pyramid[1:]] == [(pyramid[0].shape[2] >> i, pyramid[0].shape[3] >> i)
                                                      for i in (1, 2, 3)]  # halving, odd 1/16 grids floored
        ref = _textbook_decoder(model, pyramid, out["score_map"])
    h, w = (-(-size[0] // 4), -(-size[1] // 4)) if backbone != "vit-released" else (4 * (size[0] // 16),
                                                                                    4 * (size[1] // 16))
    assert out["logits"].shape[2:] == (h, w)
    torch.testing.assert_close(out["logits"], ref[:, :, :h, :w], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])
def test_deconv2x2_equals_conv_transpose(grid):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, *grid), torch.randn(6, 4, 2, 2), torch.randn(4)
    y = deconv2x2(x, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv_transpose2d(x, w, b, stride=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deconv2x2(x, w, None), F.conv_transpose2d(x, w, None, stride=2), rtol=1e-5, atol=1e-5)


def test_only_trainable_parameters_get_gradients(model_cfg):
    model = _build(model_cfg)
    out = model(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    (out["logits"].logsumexp(1).mean() + out["score_map"].square().mean()).backward()
    for name, p in model.named_parameters():
        if name.startswith(("visual.", "text.")) and name != "text.ctx":
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    trainable = {id(p) for p in model.trainable_parameters()}
    assert id(model.text.ctx) in trainable and id(model.co_attention.alpha) in trainable


def test_released_frozen_adapter_switch(model_cfg):
    model = _build(model_cfg, train_adapter=False)
    assert not any(p.requires_grad for p in model.adapter.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def _co(cfg, **changes):
    return dataclasses.replace(cfg, co_attention=dataclasses.replace(cfg.co_attention, **changes))


def test_alpha_beta_initial_value_and_shape(model_cfg):
    model = _build(_co(model_cfg, alpha_init=0.01, beta_init=0.001))
    assert torch.equal(model.co_attention.alpha, torch.full((64,), 0.01))
    assert torch.equal(model.co_attention.beta, torch.full((64,), 0.001))


def test_co_attention_layers_are_chained(model_cfg):
    model = _build(_co(model_cfg, layers=2)).eval()
    ca = model.co_attention
    text, pixels, glob = torch.randn(1, 21, 64), torch.randn(1, 64, 2, 5), torch.randn(1, 64)
    visual = torch.cat([glob[:, None], pixels.flatten(2).transpose(1, 2)], 1)  # global token, then pixels
    v, t = ca.visual_proj(visual), ca.text_proj(text)
    expected_text = text + ca.alpha * ca.text_out(ca.text_layers[1](ca.text_layers[0](t, v), v))
    expected_vis = visual + ca.beta * ca.visual_out(ca.visual_layers[1](ca.visual_layers[0](v, t), t))
    got_text, got_pixels = ca(text, pixels, glob)
    torch.testing.assert_close(got_text, expected_text)
    torch.testing.assert_close(got_pixels, expected_vis[:, 1:].transpose(1, 2).reshape(1, 64, 2, 5))


def test_released_co_attention_is_one_layer_per_direction(model_cfg):
    model = _build(_co(model_cfg, type="released"))
    assert len(model.co_attention.text_layers) == len(model.co_attention.visual_layers) == 1
    with pytest.raises(WeakclipError, match="model.co_attention.layers: the released form"):
        _build(_co(model_cfg, type="released", layers=3))


@pytest.mark.parametrize(
    "changes",
    [
        {"co_attention": "none"},
        {"learnable_prompts": False},
        {"pyramid_adapter": False},
        {"text_guided_decoder": False},
        {"n_ctx": 2},
        {"class_token_twice": None},
    ],
)
def test_ablation_switches_build_and_run(model_cfg, changes):
    if "class_token_twice" in changes:
        model_cfg = dataclasses.replace(model_cfg, clip=dataclasses.replace(model_cfg.clip, normalize="imagenet"),
                                        backbone=dataclasses.replace(model_cfg.backbone, class_token_twice=True))
        changes = {}
    if "co_attention" in changes:
        model_cfg = _co(model_cfg, type=changes.pop("co_attention"))
        assert not changes
    model = _build(model_cfg, **changes)
    out = model(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert out["logits"].shape == (1, 21, 16, 16)
    if model_cfg.co_attention.type == "none":
        assert not list(model.co_attention.parameters())
    if changes.get("learnable_prompts") is False:
        assert model.text.ctx is None
    if changes.get("text_guided_decoder") is False:
        assert [conv.in_channels for conv in model.neck.lateral] == [128, 128, 128 + 21, 128]
    if "n_ctx" in changes:
        assert model.text.ctx.shape == (2, 128)


def test_without_co_attention_score_map_is_plain_cosine(model_cfg):
    model = _build(_co(model_cfg, type="none")).eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    feats = model.visual((images.float() - model.mean) / model.std)
    text = model.text()
    expected = torch.nn.functional.cosine_similarity(
        text[None, :, :, None, None], feats.dense[:, None], dim=2
    )
    torch.testing.assert_close(model(images)["score_map"], expected, rtol=1e-5, atol=1e-5)


def test_weakclip_state_excludes_clip_and_round_trips(model_cfg):
    model = _build(model_cfg)
    state = model.weakclip_state_dict()
    assert not any(k.startswith(("visual.", "text.token_embedding", "text.transformer")) for k in state)
    assert "text.ctx" in state and "co_attention.alpha" in state and "adapter.level1.2.running_mean" in state
    other = _build(model_cfg)
    other.load_weakclip_state_dict({k: v.clone() for k, v in state.items()}, "ckpt.safetensors")
    for key, value in other.weakclip_state_dict().items():
        assert torch.equal(value, state[key]), key


def test_checkpoint_with_wrong_shape_names_key_and_both_shapes(model_cfg):
    model = _build(model_cfg)
    state = model.weakclip_state_dict()
    state["head.classifier.weight"] = torch.zeros(81, 256, 1, 1)
    with pytest.raises(WeakclipError, match=r"ckpt.safetensors: 'head.classifier.weight' has shape "
                                            r"\(81, 256, 1, 1\) in the file but .* expects \(21, 256, 1, 1\)"):
        model.load_weakclip_state_dict(state, "ckpt.safetensors")


def test_voc_vit_b16_parameter_counts_match_the_released_architecture():
    """Analytic counts from the released code's module definitions (reference notes, section 1.9)."""
    from weakclip.config import ClipConfig

    model = build_model(ModelConfig(clip=ClipConfig(pretrained=None)), list(VOC_CLASSES))
    counts = model.param_counts()
    assert counts["adapter"] == 7_087_872
    assert counts["co_attention"] == 2_633_216
    assert counts["neck"] == 3_169_280
    assert counts["head"] == 4_137_749
    assert counts["prompts"] + counts["alpha_beta"] == 5_120
    assert counts["clip_visual"] == 86_192_640
    assert counts["trainable"] == 7_087_872 + 2_633_216 + 3_169_280 + 4_137_749 + 5_120
    assert 0.09 < counts["trainable"] / counts["total"] < 0.11
    assert isinstance(model, WeakCLIP)


def test_released_mode_from_clip_weights_resizes_positions_as_released(tiny_clip_cfg):
    # Released: CLIP's 14 x 14 grid goes to 32 x 32 at load (the 512 input), and each forward resizes that
    # table again to the input's grid; the default resizes CLIP's own grid once.
    from weakclip.clip import load_clip, resize_positions
    from weakclip.config import ModelConfig

    table = load_clip(tiny_clip_cfg).visual.positional_embedding.detach().clone()  # 1 + 14 * 14 rows
    released = build_model(ModelConfig(clip=tiny_clip_cfg, released=True), ["background", "cat"])
    default = build_model(ModelConfig(clip=tiny_clip_cfg), ["background", "cat"])
    assert tuple(released.visual.visual.grid_size) == (32, 32) and released.visual.grid == (32, 32)
    torch.testing.assert_close(released.visual.visual.positional_embedding, resize_positions(table, (14, 14), (32, 32)),
                               rtol=0, atol=0)
    torch.testing.assert_close(default.visual.visual.positional_embedding, table, rtol=0, atol=0)
    # At a 20 x 20 grid (320 px) two resizes differ from one.
    twice = resize_positions(resize_positions(table, (14, 14), (32, 32)), (32, 32), (20, 20))
    assert (twice - resize_positions(table, (14, 14), (20, 20))).abs().max() > 1e-3


def test_released_mode_from_clip_weights_resizes_the_resnet_pool_table_as_released(tiny_resnet_clip_cfg):
    # Released ResNet: the pool's g x g table (g read from the file) goes to 512 / 32 = 16 x 16 at load.
    from weakclip.clip import load_clip, resize_positions
    from weakclip.config import BackboneConfig, ModelConfig

    table = load_clip(tiny_resnet_clip_cfg).visual.attnpool.positional_embedding.detach().clone()
    old = round((table.shape[0] - 1) ** 0.5)
    assert old != 16
    backbone = BackboneConfig(type="clip-resnet")
    released = build_model(ModelConfig(clip=tiny_resnet_clip_cfg, backbone=backbone, released=True),
                           ["background", "cat"])
    default = build_model(ModelConfig(clip=tiny_resnet_clip_cfg, backbone=backbone), ["background", "cat"])
    pool = released.visual.visual.attnpool.positional_embedding
    assert pool.shape[0] == 1 + 16 * 16 and released.visual.grid == 16
    torch.testing.assert_close(pool, resize_positions(table, (old, old), (16, 16)), rtol=0, atol=0)
    torch.testing.assert_close(default.visual.visual.attnpool.positional_embedding, table, rtol=0, atol=0)
