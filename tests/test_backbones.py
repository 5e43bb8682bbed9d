"""The visual backbones against open_clip's own forward: ViT and modified-ResNet taps (padded or floored),
global embeddings, the ResNet's dense embeddings (attention pool and MaskCLIP) against torch's attention,
and picking a backbone from the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakclip.backbones import BACKBONES, ClipResNet, ClipViT, build_backbone, list_backbones
from weakclip.clip import load_clip, resize_positions
from weakclip.config import BackboneConfig
from weakclip.errors import WeakclipError
from weakclip.registry import Registry


@pytest.fixture
def resnet_clip(tiny_resnet_clip_cfg):
    return load_clip(tiny_resnet_clip_cfg)


@pytest.fixture
def vit_clip(tiny_clip_cfg):
    return load_clip(tiny_clip_cfg)


def _outputs_during_encode_image(clip_model, modules, images):
    """What ``modules`` return while open_clip's own ``encode_image`` runs, and its embedding."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in modules]
    try:
        embedding = clip_model.encode_image(images)
    finally:
        for h in hooks:
            h.remove()
    return seen, embedding


def test_resnet_taps_and_global_embedding_equal_open_clips_forward(resnet_clip):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)  # the tower's native size: the pool's own positions
    v = resnet_clip.visual
    stages, embedding = _outputs_during_encode_image(resnet_clip, [v.layer1, v.layer2, v.layer3, v.layer4], images)
    feats = ClipResNet(v)(images)
    assert [tuple(t.shape) for t in feats.taps] == [(2, 32, 56, 56), (2, 64, 28, 28), (2, 128, 14, 14),
                                                   (2, 256, 7, 7)]
    for ours, ref in zip(feats.taps, stages):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(feats.global_embedding, embedding, rtol=1e-5, atol=1e-5)


def _pool_tokens(pool, x):
    """[mean, positions] + the pool's own table (no resize: the tower's native grid), (1 + hw, B, C)."""
    x = x.flatten(2).permute(2, 0, 1)
    return torch.cat([x.mean(0, keepdim=True), x]) + pool.positional_embedding[:, None]


def test_resnet_dense_embeddings_are_every_positions_output_of_the_attention_pool(resnet_clip):
    # Reference: torch's nn.MultiheadAttention module holding the pool's weights, every token attending to
    # every token (the released AttentionPool2d): output 0 is the global embedding, outputs 1.. the dense map.
    torch.manual_seed(2)
    backbone = ClipResNet(resnet_clip.visual)
    feats = backbone(torch.randn(2, 3, 224, 224))
    pool = resnet_clip.visual.attnpool
    x = _pool_tokens(pool, feats.taps[3])
    mha = torch.nn.MultiheadAttention(x.shape[-1], pool.num_heads, kdim=x.shape[-1], vdim=x.shape[-1])
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]))
        mha.out_proj = pool.c_proj
        out, _ = mha.eval()(x, x, x, need_weights=False)
    torch.testing.assert_close(feats.dense, out[1:].permute(1, 2, 0).reshape(2, -1, 7, 7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.global_embedding, out[0], rtol=1e-5, atol=1e-5)


def test_resnet_maskclip_dense_embeddings_are_each_position_attending_to_itself(resnet_clip):
    # Reference: torch's multi-head attention with the pool's weights over all positions, each query masked to
    # see only its own key, so its output is the output projection of its own value.
    torch.manual_seed(2)
    backbone = ClipResNet(resnet_clip.visual, dense="maskclip")
    images = torch.randn(1, 3, 224, 224)
    feats = backbone(images)
    pool = resnet_clip.visual.attnpool
    x = _pool_tokens(pool, feats.taps[3])
    n = x.shape[0]
    self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        out, _ = F.multi_head_attention_forward(
            x, x, x, x.shape[-1], pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
            pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False, attn_mask=self_only,
            use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight)
    ref = out[1:].permute(1, 2, 0).reshape(1, -1, 7, 7)
    torch.testing.assert_close(feats.dense, ref, rtol=1e-5, atol=1e-5)
    released = ClipResNet(resnet_clip.visual)(images)
    torch.testing.assert_close(feats.global_embedding, released.global_embedding, rtol=1e-5, atol=1e-6)
    assert (feats.dense - released.dense).abs().max() > 1e-2  # two different dense maps


def _stages(visual, images):
    """open_clip's own stage outputs during the tower's forward, its attention pool (which needs the native
    grid) swapped for an identity."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for m in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)]
    pool, visual.attnpool = visual.attnpool, torch.nn.Identity()
    try:
        visual(images)
    finally:
        visual.attnpool = pool
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize(("floor", "sizes"), [
    # Zero-padded to 224 x 256: 1/4 .. 1/32 of it.
    (False, [(56, 64), (28, 32), (14, 16), (7, 8)]),
    # Released: the stride-2 conv gives 100 x 125, the stem pool 50 x 62, each stage pool halves, flooring.
    (True, [(50, 62), (25, 31), (12, 15), (6, 7)]),
])
def test_resnet_pads_or_floors_other_sizes(resnet_clip, floor, sizes):
    torch.manual_seed(3)
    x = torch.randn(1, 3, 200, 250)
    feats = ClipResNet(resnet_clip.visual, floor=floor)(x)
    assert [tuple(t.shape[2:]) for t in feats.taps] == sizes and tuple(feats.dense.shape[2:]) == sizes[3]
    # The taps are open_clip's own stages on the zero-padded (default) or the unchanged (released) input.
    ref = _stages(resnet_clip.visual, F.pad(x, (0, 6, 0, 24)) if not floor else x)
    for ours, theirs in zip(feats.taps, ref):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_position_tables_are_resized_for_other_grids():
    # The ViT, the ResNet pool and CLIP-ES all resize their position tables with resize_positions: bilinear,
    # half-pixel centres (align_corners false). A 2 x 2 grid [[0, 1], [2, 3]] (one channel) to 4 x 4, by hand:
    # target pixel j samples source (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1], so each
    # row reads 0, 0.25, 0.75, 1 of the way along and each column likewise.
    table = torch.tensor([[9.0], [0.0], [1.0], [2.0], [3.0]])  # first row: the class / mean token's own
    assert torch.equal(resize_positions(table, (2, 2), (2, 2)), table)
    expected = torch.tensor([[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5],
                             [2.0, 2.25, 2.75, 3.0]])
    resized = resize_positions(table, (2, 2), (4, 4))
    assert resized[0].item() == 9.0
    torch.testing.assert_close(resized[1:, 0].reshape(4, 4), expected, rtol=0, atol=1e-7)


def test_vit_taps_equal_open_clips_blocks(vit_clip):
    torch.manual_seed(4)
    images = torch.randn(2, 3, 224, 224)
    blocks = list(vit_clip.visual.transformer.resblocks)
    outputs, embedding = _outputs_during_encode_image(vit_clip, blocks, images)
    feats = ClipViT(vit_clip.visual, taps=[1, 2, 3, 4])(images)
    for ours, ref in zip(feats.taps, outputs):
        torch.testing.assert_close(ours, ref[:, 1:].transpose(1, 2).reshape(2, 128, 14, 14), rtol=0, atol=0)
    torch.testing.assert_close(feats.global_embedding, embedding, rtol=1e-5, atol=1e-5)


def test_backbone_interface_declares_what_it_returns(vit_clip, resnet_clip):
    for backbone, strides in ((ClipViT(vit_clip.visual), [16] * 4), (ClipResNet(resnet_clip.visual), [4, 8, 16, 32])):
        feats = backbone(torch.randn(1, 3, 128, 192))
        assert backbone.tap_strides == strides
        assert [t.shape[1] for t in feats.taps] == backbone.tap_channels
        assert [t.shape[2:] for t in feats.taps] == [(128 // s, 192 // s) for s in strides]
        assert feats.dense.shape[1:] == (backbone.embed_dim, 128 // backbone.dense_stride, 192 // backbone.dense_stride)
        assert feats.global_embedding.shape == (1, backbone.embed_dim)


def test_auto_picks_the_backbone_for_the_tower(vit_clip, resnet_clip):
    assert list_backbones() == ["clip-resnet", "clip-vit"]
    assert isinstance(build_backbone(vit_clip.visual, BackboneConfig()), ClipViT)
    assert isinstance(build_backbone(resnet_clip.visual, BackboneConfig()), ClipResNet)
    assert isinstance(build_backbone(resnet_clip.visual, BackboneConfig(type="clip-resnet")), ClipResNet)


@pytest.mark.parametrize(("tower", "cfg", "message"), [
    ("resnet", BackboneConfig(type="clip-vit"), "model.backbone: clip-vit needs a CLIP ViT image tower; got Modif"),
    ("vit", BackboneConfig(type="clip-resnet"), "clip-resnet needs a CLIP ModifiedResNet image tower"),
    ("resnet", BackboneConfig(taps=[1, 2, 3, 4]), "model.backbone.taps: clip-resnet taps its four stages"),
    ("resnet", BackboneConfig(class_token_twice=True), "a ResNet has no class token"),
    ("resnet", BackboneConfig(dense="pixels"), "model.backbone.dense: expected one of attention-pool, maskclip; got"),
    ("vit", BackboneConfig(dense="maskclip"), "model.backbone.dense: clip-vit projects every token"),
    ("vit", BackboneConfig(taps=[1, 2, 3, 9]), r"model.backbone.taps: need 4 increasing block indices in 1..4"),
    ("vit", BackboneConfig(type="swin"), r"model.backbone.type: unknown 'swin' \(registered: clip-resnet, clip-vit\)"),
])
def test_backbone_config_errors_are_one_line(vit_clip, resnet_clip, tower, cfg, message):
    visual = (vit_clip if tower == "vit" else resnet_clip).visual
    with pytest.raises(WeakclipError, match=message) as err:
        build_backbone(visual, cfg)
    assert "\n" not in str(err.value)


def test_registry_lists_describes_and_refuses_twins():
    registry = Registry("model.part.type")

    @registry.register("plain")
    def plain():
        """A plain part.

        More words."""

    assert registry.names() == ["plain"] and "plain" in registry and registry.describe("plain") == "A plain part."
    with pytest.raises(ValueError, match="'plain' is registered twice"):
        registry.register("plain")(plain)
    with pytest.raises(WeakclipError, match=r"model.part.type: unknown 'other' \(registered: plain\)"):
        registry.get("other")
    assert set(BACKBONES.names()) == {"clip-vit", "clip-resnet"}
