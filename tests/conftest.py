"""Shared fixtures: the real VOC sample (from ../shared) and tiny random CLIP configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VOC_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc-sample"


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    """Path to ../shared/data/voc-sample; skipped when absent, except under CI=true where it must exist."""
    if not VOC_SAMPLE.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VOC_SAMPLE} is missing: CI must run with ../shared beside the clone")
        pytest.skip(f"real data not found at {VOC_SAMPLE} (place ../shared/data/voc-sample beside the repo)")
    return VOC_SAMPLE
