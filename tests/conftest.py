"""Shared fixtures: the real VOC sample (from ../shared) and tiny random CLIP configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never fetch weights: the hub fails at once instead of retrying for most of a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

VOC_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc-sample"


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    """Path to ../shared/data/voc-sample; skipped when absent, except under CI=true where it must exist."""
    if not VOC_SAMPLE.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VOC_SAMPLE} is missing: CI must run with ../shared beside the clone")
        pytest.skip(f"real data not found at {VOC_SAMPLE} (place ../shared/data/voc-sample beside the repo)")
    return VOC_SAMPLE


# A ViT-B/16-shaped CLIP small enough for CPU tests: patch 16, head width 64 (as OpenAI's), 4 blocks.
TINY_ARCH = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 128, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    "quick_gelu": True,
}


@pytest.fixture
def tiny_clip_cfg():
    """A ClipConfig for the tiny random CLIP (no weights)."""
    from weakclip.config import ClipConfig

    return ClipConfig(model="tiny", pretrained=None, arch=dict(TINY_ARCH))
