"""The CLIP wrappers against open_clip's own forward, and weight loading in the real file formats."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch

from weakclip.backbones import ClipViT, default_taps
from weakclip.clip import PromptTextEncoder, load_clip
from weakclip.errors import WeakclipError

NAMES = ["background", "aeroplane", "diningtable", "pottedplant", "tvmonitor", "person"]


@pytest.fixture
def clip_model(tiny_clip_cfg):
    torch.manual_seed(0)
    return load_clip(tiny_clip_cfg)


def test_global_embedding_equals_encode_image(clip_model):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    ours = ClipViT(clip_model.visual)(images).global_embedding
    ref = clip_model.encode_image(images)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_text_without_context_equals_encode_text(clip_model):
    enc = PromptTextEncoder(clip_model, NAMES, n_ctx=0, name_length=5)
    ref = clip_model.encode_text(open_clip.tokenize(NAMES))
    torch.testing.assert_close(enc(), ref, rtol=1e-5, atol=1e-5)


def test_fixed_template_equals_encode_text(clip_model):
    enc = PromptTextEncoder(clip_model, NAMES, learnable=False, template="a photo of a {}.")
    ref = clip_model.encode_text(open_clip.tokenize([f"a photo of a {n}." for n in NAMES]))
    torch.testing.assert_close(enc(), ref, rtol=1e-5, atol=1e-5)


def test_context_vectors_get_gradients_through_frozen_tower(clip_model):
    enc = PromptTextEncoder(clip_model, NAMES, n_ctx=8)
    assert enc.ctx.shape == (8, 128)
    enc().sum().backward()
    assert enc.ctx.grad is not None and enc.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in enc.named_parameters() if n != "ctx")
    assert not any(p.requires_grad for n, p in enc.named_parameters() if n != "ctx")


def test_prompted_text_equals_full_causal_pass(clip_model):
    # Reference: the whole [SOT, ctx, name, EOT] sequence through open_clip's own transformer and causal mask.
    torch.manual_seed(3)
    enc = PromptTextEncoder(clip_model, NAMES, n_ctx=4)
    assert enc.share_prefix  # the fast path is the one under test
    ids = open_clip.tokenize(NAMES)[:, :5]
    x = clip_model.token_embedding(ids)
    x = torch.cat([x[:, :1], enc.ctx.expand(len(NAMES), -1, -1), x[:, 1:]], dim=1)
    x = x + clip_model.positional_embedding[: x.shape[1]]
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[: x.shape[1], : x.shape[1]])
    x = clip_model.ln_final(x)
    eot = ids.argmax(dim=1) + 4  # the EOT token has the largest id
    ref = x[torch.arange(len(NAMES)), eot] @ clip_model.text_projection
    torch.testing.assert_close(enc(), ref, rtol=1e-5, atol=1e-5)


def test_taps_and_dense_shapes_at_320x480(clip_model):
    vis = ClipViT(clip_model.visual)
    assert vis.taps == [1, 2, 3, 4]  # depth 4: 4/3, 4/2, 8/3 rounded, 4
    feats = vis(torch.randn(2, 3, 320, 480))
    assert [tuple(t.shape) for t in feats.taps] == [(2, 128, 20, 30)] * 4
    assert feats.dense.shape == (2, 64, 20, 30)
    assert feats.global_embedding.shape == (2, 64)


def test_default_taps_per_depth():
    assert default_taps(12) == [4, 6, 8, 12]
    assert default_taps(24) == [8, 12, 16, 24]


def test_non_multiple_input_is_padded_inside(clip_model):
    vis = ClipViT(clip_model.visual)
    x = torch.randn(1, 3, 200, 250)
    feats = vis(x)
    assert feats.dense.shape[2:] == (13, 16)
    padded = torch.nn.functional.pad(x, (0, 6, 0, 8))
    torch.testing.assert_close(feats.dense, vis(padded).dense)


def test_image_tower_runs_without_autograd(clip_model):
    vis = ClipViT(clip_model.visual)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    assert not vis(x).dense.requires_grad
    vis.train()
    assert not vis.training


def _random_openai_archive(path, clip_model):
    torch.jit.script(clip_model).save(str(path))


@pytest.mark.parametrize("which", ["tiny_clip_cfg", "tiny_resnet_clip_cfg"])
def test_openai_archive_and_state_dicts_load_identically(tmp_path, request, which):
    # OpenAI releases ViTs and modified ResNets (RN50, RN101, ...) as TorchScript archives.
    tiny_clip_cfg = request.getfixturevalue(which)
    torch.manual_seed(0)
    clip_model = load_clip(tiny_clip_cfg)
    images = torch.randn(1, 3, 224, 224)
    tokens = open_clip.tokenize(NAMES)
    ref_img, ref_txt = clip_model.encode_image(images), clip_model.encode_text(tokens)

    archive = tmp_path / "ViT-tiny.pt"
    _random_openai_archive(archive, clip_model)
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in clip_model.state_dict().items()}
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))

    for name in ("ViT-tiny.pt", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        cfg = dataclasses.replace(tiny_clip_cfg, pretrained=str(tmp_path / name))
        loaded = load_clip(cfg)
        torch.testing.assert_close(loaded.encode_image(images), ref_img, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(loaded.encode_text(tokens), ref_txt, rtol=0, atol=0, msg=name)
        assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_weights_file_is_one_clear_error(tiny_clip_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_clip_cfg, pretrained=str(tmp_path / "nope" / "ViT-B-16.pt"))
    with pytest.raises(WeakclipError, match=r"ViT-B-16.pt: CLIP weights file not found"):
        load_clip(cfg)


def test_state_dict_with_wrong_shapes_names_key_and_shapes(tmp_path, clip_model, tiny_clip_cfg):
    sd = clip_model.state_dict()
    sd["visual.proj"] = torch.zeros(128, 32)
    torch.save(sd, tmp_path / "bad.bin")
    cfg = dataclasses.replace(tiny_clip_cfg, pretrained=str(tmp_path / "bad.bin"))
    with pytest.raises(WeakclipError, match=r"bad.bin: 'visual.proj' has shape \(128, 32\).*expects \(128, 64\)"):
        load_clip(cfg)


def test_unreachable_pretrained_tag_says_how_to_pass_a_file():
    from weakclip.config import ClipConfig

    with pytest.raises(WeakclipError, match=r"cannot fetch CLIP weights 'ViT-B-16/openai'.*model.clip.pretrained="):
        load_clip(ClipConfig(model="ViT-B-16", pretrained="openai"))


def test_unknown_tag_is_rejected():
    from weakclip.config import ClipConfig

    with pytest.raises(WeakclipError, match="neither a file nor a pretrained tag"):
        load_clip(ClipConfig(model="ViT-B-16", pretrained="not-a-tag"))


def test_class_name_too_long_for_text_context(clip_model):
    with pytest.raises(WeakclipError, match=r"class name 'a very long class name' is \d+ BPE tokens"):
        PromptTextEncoder(clip_model, ["background", "a very long class name"], n_ctx=8, name_length=5)


def test_random_clip_is_the_same_every_time(tiny_clip_cfg):
    """Checkpoints hold no CLIP weights, so a random CLIP must be rebuilt identically when one is loaded."""
    torch.manual_seed(1)
    a = load_clip(tiny_clip_cfg)
    torch.manual_seed(2)
    b = load_clip(tiny_clip_cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
