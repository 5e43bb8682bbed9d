"""CLIP-ES seeds against one frozen image-tower forward at the same size, in the same run.

    python benchmarks/seeds.py [--json] [--repeat 3] [--threads 1] [--device cpu|cuda] [--model ViT-B-16]

ViT-B/16 with random weights (timing does not depend on them), VOC classes and background words, images
of 500 x 375 and 375 x 500 (as most VOC images) with two labels. Per size, interleaved medians of N runs
after one warm-up: the seeds' CLIP work per image (``ClipES.cams``: preprocessing, 11 blocks, the last
block with the batched Grad-CAM backward, CAA, resize to the image), the same in ``released`` mode (one
backward per label, explicit attention in every block, as the released code), and the bare frozen
forward of the image tower (``ClipViT``) on the same preprocessed input. ``ratio`` = seeds / forward.
The dense CRF of a seed runs in worker processes beside CLIP; its time per image is reported apart.
Text features are computed once per run (``text_features_s``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
from train_step import _median_times

from weakclip.backbones import ClipViT
from weakclip.clip import load_clip
from weakclip.clip_es import ClipES, crf_seed, preprocess
from weakclip.config import VOC_CLASSES, ClipConfig, SeedsConfig

SIZES = ((375, 500), (500, 375))  # (H, W)
LABELS = [1, 15]  # aeroplane, person


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the released figure: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip ViT (random weights)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_clip(ClipConfig(model=args.model, pretrained=None))
    start = time.perf_counter()
    fast = ClipES(model, VOC_CLASSES, SeedsConfig(precision=args.precision), device)
    text_s = time.perf_counter() - start
    released = ClipES(model, VOC_CLASSES, SeedsConfig(released=True), device)
    tower = ClipViT(model.visual).to(device)
    rng = np.random.default_rng(0)
    result = {"model": args.model, "device": str(device), "threads": args.threads, "precision": args.precision,
              "repeat": args.repeat, "text_features_s": round(text_s, 3), "labels": len(LABELS),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "sizes": {}}
    for h, w in SIZES:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels = preprocess(image, fast.patch).to(device)
        with torch.no_grad():
            seeds_s, released_s, forward_s = _median_times(
                [lambda im=image: fast.cams(im, LABELS), lambda im=image: released.cams(im, LABELS),
                 lambda px=pixels: tower(px)],
                args.repeat, device)
        cams = fast.cams(image, LABELS)
        crf_s = statistics.median(
            [_timed(lambda c=cams, im=image: crf_seed(c, im, LABELS, fast.cfg)) for _ in range(args.repeat)])
        result["sizes"][f"{w}x{h}"] = {
            "input": list(pixels.shape[2:]), "seeds_s": round(seeds_s, 3), "released_mode_s": round(released_s, 3),
            "forward_s": round(forward_s, 3), "ratio": round(seeds_s / forward_s, 3),
            "released_mode_ratio": round(released_s / forward_s, 3), "crf_s": round(crf_s, 3)}
    sizes = result["sizes"].values()
    result["seeds_s_per_image"] = round(statistics.mean(s["seeds_s"] for s in sizes), 3)
    result["ratio"] = round(statistics.mean(s["ratio"] for s in sizes), 3)
    if args.json:
        print(json.dumps(result))
    else:
        for name, s in result["sizes"].items():
            print(f"{name}: seeds {s['seeds_s']:.2f} s, released mode {s['released_mode_s']:.2f} s, frozen "
                  f"forward {s['forward_s']:.2f} s, ratio {s['ratio']:.2f}; CRF {s['crf_s']:.2f} s")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
