"""The contract every registered backbone and co-attention type keeps, in every pairing: quarter-resolution
logits and a dense-stride score map at odd input sizes, gradients only into the trainable parameters, a frozen
image tower that builds no autograd graph, a state-dict round trip and a checkpoint reload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH_BY_BACKBONE, TINY_RESNET_ARCH, make_data_root, sample_ids

from weakclip.backbones import list_backbones
from weakclip.checkpoints import load_refiner
from weakclip.cli import main
from weakclip.coattention import list_co_attention
from weakclip.config import BackboneConfig, ClipConfig, CoAttentionConfig, Config, ModelConfig
from weakclip.data.masks import read_mask
from weakclip.engine import save_weights
from weakclip.model import build_model
from weakclip.train import checkpoint_metadata

CLASSES = ["background", "cat", "dog", "person"]
SIZES = [(72, 100), (97, 65)]  # odd token grids for every backbone, and sides that are no multiple of 16 or 32


def _config(backbone: str, co_attention: str) -> Config:
    model = ModelConfig(clip=ClipConfig(model="tiny", pretrained=None, arch=dict(TINY_ARCH_BY_BACKBONE[backbone])),
                        backbone=BackboneConfig(type=backbone), co_attention=CoAttentionConfig(type=co_attention),
                        decoder_channels=32)
    cfg = Config(model=model)
    cfg.data.class_names = list(CLASSES)
    return cfg


def test_every_registered_backbone_has_a_tiny_test_clip():
    assert set(list_backbones()) == set(TINY_ARCH_BY_BACKBONE)
    assert set(list_co_attention()) >= {"bidirectional", "released", "none"}


PAIRS = [(b, c) for b in sorted(TINY_ARCH_BY_BACKBONE) for c in list_co_attention()]


@pytest.mark.parametrize(("backbone", "co_attention"), PAIRS)
def test_part_contract(tmp_path, backbone, co_attention):
    cfg = _config(backbone, co_attention)
    torch.manual_seed(0)
    model = build_model(cfg.model, CLASSES).train()
    stride = model.visual.dense_stride

    # Shapes at odd sizes: logits at ceil(H / 4), the score map at ceil(H / dense_stride).
    for h, w in SIZES:
        out = model(torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8))
        assert out["logits"].shape == (2, len(CLASSES), -(-h // 4), -(-w // 4))
        assert out["score_map"].shape == (2, len(CLASSES), -(-h // stride), -(-w // stride))

    # Gradients reach every trainable parameter and nothing else.
    model.zero_grad(set_to_none=True)
    (out["logits"].logsumexp(1).mean() + out["score_map"].square().mean()).backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable and id(model.text.ctx) in trainable
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and name.startswith(("visual.", "text.")), name

    # The frozen tower builds no autograd graph, even for an input that asks for one, and stays in eval.
    x = torch.randn(1, 3, *SIZES[0], requires_grad=True)
    feats = model.visual(x)
    for t in [*feats.taps, feats.dense, feats.global_embedding]:
        assert not t.requires_grad and t.grad_fn is None
    assert not model.visual.training and not any(m.training for m in model.visual.modules())

    # State-dict round trip into a model built with other random weights, then a checkpoint reload.
    model.eval()
    images = torch.randint(0, 256, (1, 3, *SIZES[1]), dtype=torch.uint8)
    with torch.no_grad():
        for p in model.trainable_parameters():  # away from the initial values
            p.add_(torch.randn_like(p) * 0.05)
        expected = model(images)["logits"]
        torch.manual_seed(1)
        other = build_model(cfg.model, CLASSES).eval()
        assert not torch.allclose(other(images)["logits"], expected)
        other.load_weakclip_state_dict(model.weakclip_state_dict(), "state")
        torch.testing.assert_close(other(images)["logits"], expected, rtol=0, atol=0)
        ckpt = tmp_path / "model.safetensors"
        save_weights(ckpt, model, checkpoint_metadata(cfg))
        loaded = load_refiner(ckpt, cfg)[0].eval()  # built from the config stored in the file
        assert loaded.cfg.backbone.type == backbone and loaded.cfg.co_attention.type == co_attention
        torch.testing.assert_close(loaded(images)["logits"], expected, rtol=0, atol=0)


def test_voc_rn50_trains_and_makes_pseudo_masks_on_the_real_sample(tmp_path, voc_sample, capsys):
    # The shipped ResNet-50 config, its CLIP swapped for a tiny random modified ResNet, on 4 real VOC images.
    ids = sample_ids(voc_sample, 4)
    root = make_data_root(tmp_path / "data", voc_sample, ids)
    settings = {
        "model.clip.arch": json.dumps(TINY_RESNET_ARCH), "model.clip.pretrained": "null",
        "model.decoder_channels": "32", "data.root": str(root), "data.split": "train", "data.seeds_dir": "Seeds",
        "data.gt_dir": "SegmentationClass", "data.val_split": "null", "train.iters": "3", "train.batch_size": "2",
        "train.crop_size": "96", "train.base_size": "[384, 96]", "train.workers": "0", "train.warmup_iters": "1",
        "train.checkpoint_every": "3", "train.log_every": "1", "infer.short_side": "96", "infer.scales": "[1.0]",
        "infer.crop_size": "96", "infer.stride": "64", "infer.crf_workers": "0",
    }
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    run, masks = tmp_path / "run", tmp_path / "masks"
    assert main(["train", "--config", "voc-rn50", "--output", str(run), *sets]) == 0, capsys.readouterr().err
    losses = [line for line in (run / "metrics.csv").read_text().splitlines()[1:] if line]
    assert len(losses) == 3
    # Without the CRF, with the probabilities kept at full size: each written label is decidable from them.
    assert main(["pseudo-masks", "--config", "voc-rn50", "--checkpoint", str(run / "model.safetensors"),
                 "--output", str(masks), "--save-probs", *sets, "--set", "infer.crf=false",
                 "--set", "infer.save_probs_size=1000"]) == 0, capsys.readouterr().err
    labels = json.loads((root / "cls_labels.json").read_text())
    for i in ids:
        mask = read_mask(masks / f"{i}.png")
        saved = np.load(masks / "probs" / f"{i}.npz")
        probs, classes, unknown = saved["probs"].astype(np.float32), saved["classes"], saved["unknown"]
        assert mask.shape == read_mask(root / "SegmentationClass" / f"{i}.png").shape == probs.shape[1:]
        assert classes.tolist() == [0, *sorted(labels[i])]  # the Eq. 14 filter keeps the image's classes
        # Its label: the best kept class, 255 where Eq. 14 marks the pixel; only pixels whose top-2 gap is
        # under the stored float16's resolution may differ.
        expected = np.where(unknown, 255, classes[probs.argmax(0)])
        top2 = np.sort(probs, axis=0)[-2:]
        close = (top2[1] - top2[0]) < 1e-3
        assert np.all((mask == expected) | close), i
        assert close.mean() < 0.01
