"""fp32 against bf16 on this machine: the frozen image tower and the whole pseudo-mask image, in one run.

    python benchmarks/precision.py --json [--repeat 3]
    python benchmarks/precision.py --smoke     # a tiny CLIP and a toy image: the code path, no figures

The ``voc`` config's model (ViT-B/16, random weights: the time does not depend on them) and one real 500 x 375
VOC image (``IMAGE_ID``, labels 9 and 12) at scales 0.5, 1.0, 1.5 x flip, the ``voc`` window settings:
- ``tower_fp32_s`` / ``tower_bf16_s``: the frozen image tower's forward on one window batch (the default
  windows per call, ``crop_size`` square), fp32 against bf16 weights (cast once, no autocast);
  ``tower_autocast_s``: the same fp32 tower under bf16 autocast (its frozen weights cast at every call);
- ``image_fp32_s`` / ``image_bf16_s``: the whole pseudo-mask image (multi-scale probabilities, Eq. 14 filter,
  dense CRF) at ``infer.precision`` fp32 and bf16; ``image_fp32_batch8_s``: fp32 at 8 windows per call (the
  former default);
- ``tower_ratio``, ``image_ratio``: bf16 / fp32; ``label_agreement``: the share of pixels whose label is the
  same in both;
- ``peak_rss_mb`` (``peak_rss_mb_batch8``): the high-water mark (Linux VmHWM) of a fresh process that
  builds the model and makes the fp32 image once at the default window batch (at 8), so that nothing this
  process allocated counts.
Medians of ``--repeat`` runs after one warm-up each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from train_step import print_result

from weakclip.config import Config, InferConfig, load_config
from weakclip.data.datasets import load_image
from weakclip.infer import (
    crf_inputs,
    finish_label_map,
    multiscale_probs,
    refiner_infer_config,
    refiner_predictor,
    window_batch_size,
)
from weakclip.model import WeakCLIP, build_model
from weakclip.precision import native

REPO = Path(__file__).resolve().parents[1]
IMAGE_ID = "2007_000063"
IMAGE = REPO.parent / "shared" / "data" / "voc-sample" / "JPEGImages" / f"{IMAGE_ID}.jpg"
LABELS = (9, 12)  # the image's classes (chair, dog) in cls_labels.json
SCALES = [0.5, 1.0, 1.5]
FORMER_BATCH = 8
# A ViT-B/16-shaped CLIP small enough for the smoke run (patch 16, 2 blocks).
SMOKE_ARCH = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 128, "layers": 2, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def setup(smoke: bool) -> tuple[Config, WeakCLIP, np.ndarray]:
    """The config (voc, or a tiny one for the smoke run), its model with random weights, and the image."""
    overrides = ["model.clip.pretrained=null", f"infer.scales={SCALES}", "infer.flip=true"]
    if smoke:
        overrides += ["infer.short_side=64", "infer.crop_size=64", "infer.stride=43",
                      "model.decoder_channels=32"]
    cfg = load_config("voc", overrides)
    if smoke:
        cfg.model.clip = dataclasses.replace(cfg.model.clip, arch=SMOKE_ARCH)
        image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    elif not IMAGE.is_file():
        raise SystemExit(f"{IMAGE}: not found (place ../shared beside the repo)")
    else:
        image = load_image(IMAGE)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.class_names)
    cfg.infer = refiner_infer_config(cfg.infer, model)
    return cfg, model, image


def pseudo_mask(model: WeakCLIP, image: np.ndarray, icfg: InferConfig, batch_size: int | None = None
                ) -> np.ndarray:
    """The image's pseudo mask (H, W) uint8 as ``weakclip pseudo-masks`` makes it, at the model's precision."""
    device = torch.device("cpu")
    probs = multiscale_probs(refiner_predictor(model, device), image, icfg, device, batch_size=batch_size)
    kept, keys, unknown = crf_inputs(probs, LABELS)
    return finish_label_map(kept.numpy(), keys, image, unknown.numpy(), icfg.crf_params)


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM, which starts afresh at exec (ru_maxrss keeps
    the parent's high-water mark across fork and exec); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return round(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_run(smoke: bool, batch_size: int | None) -> None:
    """In a fresh process: build the model, make the fp32 image once, print the peak RSS in MB."""
    cfg, model, image = setup(smoke)
    pseudo_mask(model, image, cfg.infer, batch_size)
    print(peak_rss_mb())


def fresh_peak(smoke: bool, batch_size: int | None) -> float:
    args = [sys.executable, __file__, "--peak-run", str(batch_size or 0)] + (["--smoke"] if smoke else [])
    done = subprocess.run(args, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    return float(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny CLIP and a toy image: the code path only")
    parser.add_argument("--peak-run", type=int, default=None, help=argparse.SUPPRESS)  # the fresh process
    args = parser.parse_args()
    if args.peak_run is not None:
        peak_run(args.smoke, args.peak_run or None)
        return
    repeat = 1 if args.smoke else args.repeat
    device = torch.device("cpu")
    cfg, model, image = setup(args.smoke)
    icfg = cfg.infer
    windows = window_batch_size(icfg, device)
    x = torch.randn(windows, 3, icfg.crop_size, icfg.crop_size)
    result: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "native_bf16": native(torch.bfloat16, device),
                    "load_average": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
                    "smoke": args.smoke, "image": "random 48 x 64" if args.smoke else f"{IMAGE_ID} 500 x 375",
                    "scales": SCALES, "flip": True, "windows_per_call": windows}

    with torch.no_grad():
        result["tower_fp32_s"] = median_seconds(lambda: model.visual(x), repeat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result["tower_autocast_s"] = median_seconds(lambda: model.visual(x), repeat)
        result["image_fp32_s"] = median_seconds(lambda: pseudo_mask(model, image, icfg), repeat)
        result["image_fp32_batch8_s"] = median_seconds(lambda: pseudo_mask(model, image, icfg, FORMER_BATCH),
                                                       repeat)
        fp32 = pseudo_mask(model, image, icfg)
        model.set_compute_dtype(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        result["tower_bf16_s"] = median_seconds(lambda: model.visual(xb), repeat)
        result["image_bf16_s"] = median_seconds(lambda: pseudo_mask(model, image, icfg), repeat)
        bf16 = pseudo_mask(model, image, icfg)
    result["tower_ratio"] = round(result["tower_bf16_s"] / result["tower_fp32_s"], 3)
    result["image_ratio"] = round(result["image_bf16_s"] / result["image_fp32_s"], 3)
    result["label_agreement"] = round(float((fp32 == bf16).mean()), 5)
    result["peak_rss_mb"] = fresh_peak(args.smoke, None)
    result["peak_rss_mb_batch8"] = fresh_peak(args.smoke, FORMER_BATCH)
    print_result(result, args.json)


if __name__ == "__main__":
    main()
