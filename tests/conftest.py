"""Shared fixtures: the real VOC sample (from ../shared) and tiny random CLIP configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never fetch weights: the hub fails at once instead of retrying for most of a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOC_SAMPLE = SHARED / "data" / "voc-sample"
CLIP_ES_FIXTURE = SHARED / "reference" / "parity" / "clip-es-tiny"


def _shared(path: Path, what: str) -> Path:
    """``path`` (a file or folder) under ../shared; skipped with a clear reason when absent, except under CI=true
    where it must exist."""
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the clone")
        pytest.skip(f"{what} not found at {path} (place ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    """Path to ../shared/data/voc-sample (the real VOC sample)."""
    return _shared(VOC_SAMPLE, "real data")


@pytest.fixture(scope="session")
def clip_es_fixture() -> Path:
    """Path to ../shared/reference/parity/clip-es-tiny (tensors recorded from the released CLIP-ES code)."""
    return _shared(CLIP_ES_FIXTURE, "the CLIP-ES parity fixture")


# A ViT-B/16-shaped CLIP small enough for CPU tests: patch 16, head width 64 (as OpenAI's), 4 blocks.
TINY_ARCH = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 128, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    "quick_gelu": True,
}


# An RN50-shaped CLIP (modified ResNet: 3-conv stem, anti-aliased strides, attention pool; head width 64 as
# OpenAI's) with one bottleneck per stage and 8 base channels: stages of 32, 64, 128, 256 channels.
TINY_RESNET_ARCH = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
    "text_cfg": dict(TINY_ARCH["text_cfg"]),
    "quick_gelu": True,  # as OpenAI's text towers
}

# The tiny CLIP for every registered backbone: a backbone registered without one fails the contract test.
TINY_ARCH_BY_BACKBONE = {"clip-vit": TINY_ARCH, "clip-resnet": TINY_RESNET_ARCH}


@pytest.fixture
def tiny_clip_cfg():
    """A ClipConfig for the tiny random CLIP (no weights)."""
    from weakclip.config import ClipConfig

    return ClipConfig(model="tiny", pretrained=None, arch=dict(TINY_ARCH))


@pytest.fixture
def tiny_resnet_clip_cfg():
    """A ClipConfig for the tiny random ResNet CLIP (no weights)."""
    from weakclip.config import ClipConfig

    return ClipConfig(model="tiny-rn", pretrained=None, arch=dict(TINY_RESNET_ARCH))


def write_tiny_config(path: Path, root: Path, **sections) -> Path:
    """A config for CPU tests: the tiny CLIP, 64-pixel crops, few iterations, data at ``root``."""
    import yaml

    tree = {
        "base": "voc-sample-cpu",
        "model": {"clip": {"arch": TINY_ARCH}, "decoder_channels": 32},
        "data": {"root": str(root)},
        "train": {"iters": 4, "batch_size": 2, "crop_size": 64, "base_size": [256, 64], "workers": 0,
                  "checkpoint_every": 2, "log_every": 1, "warmup_iters": 2},
        "infer": {"short_side": 64, "scales": [1.0], "flip": True, "crop_size": 64, "stride": 43,
                  "crf_workers": 1},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path


def make_data_root(dst: Path, src: Path, ids: list[str], split: str = "train") -> Path:
    """A VOC-layout root holding links to ``ids`` of the real sample (the sample itself is never written)."""
    import json

    for sub, ext in (("JPEGImages", ".jpg"), ("Seeds", ".png"), ("SegmentationClass", ".png")):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            (dst / sub / f"{i}{ext}").symlink_to(src / sub / f"{i}{ext}")
    (dst / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (dst / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    labels = json.loads((src / "cls_labels.json").read_text())
    (dst / "cls_labels.json").write_text(json.dumps({i: labels[i] for i in ids}))
    return dst


def sample_ids(root: Path, n: int) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:n]
