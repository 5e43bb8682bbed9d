"""The GPU benchmark is run by sessions that hold a GPU for a few minutes: its code path must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_smoke_run_prints_its_figures():
    # --smoke runs the very code of the GPU figures (training step, pseudo-mask inference) at toy sizes.
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--smoke"], capture_output=True, check=False,
                          text=True, timeout=600, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["smoke"] is True
    assert result["train_trainable_params"] == 17_033_237  # ViT-B/16 on VOC, the notes' analytic count
    assert result["train_step_s"] > 0 and result["train_images_per_s"] > 0
    for batch_size in (1, 8, 16):
        assert result[f"pseudo_mask_model_images_per_s_batch{batch_size}"] > 0
        assert result[f"pseudo_mask_images_per_s_batch{batch_size}"] > 0
    assert result["crf_workers"] == 0  # --smoke runs the CRF in the process: no pool to start
    assert result["pseudo_mask_model_fp32_images_per_s"] > 0 and result["pseudo_mask_model_bf16_images_per_s"] > 0
    # bf16 moves few labels of the same model (at most the pixels near a tie): not a coin toss.
    assert 0.5 < result["fp32_vs_bf16_pixel_agreement"] <= 1.0


def test_precision_benchmark_smoke_run_prints_its_figures():
    # --smoke: a tiny CLIP and a toy image through the very code of the README's fp32/bf16 figures.
    done = subprocess.run([sys.executable, str(BENCHMARKS / "precision.py"), "--smoke", "--json"],
                          capture_output=True, check=False, text=True, timeout=600, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["smoke"] is True and result["windows_per_call"] == 2
    for key in ("tower_fp32_s", "tower_autocast_s", "tower_bf16_s", "image_fp32_s", "image_bf16_s",
                "image_fp32_batch8_s"):
        assert result[key] > 0
    assert 0.5 < result["label_agreement"] <= 1.0
    # A fresh process with torch loaded.
    assert result["peak_rss_mb"] > 100 and result["peak_rss_mb_batch8"] > 100
