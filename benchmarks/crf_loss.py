"""Time the boundary-loss dense CRF: batched exact torch kernels vs a per-image pydensecrf loop vs ``auto``.

    python benchmarks/crf_loss.py [--json] [--device cpu|cuda] [--repeat N]

A batch of 8 images at 64 x 64, 21 classes, the released parameters (Gaussian 3/3, bilateral 80/13/10,
10 iterations). Images and a plausible probability map (a blurred noisy one-hot of the ground truth) come
from ../shared/data/voc-sample beside the repository when it is there, else random images and
probabilities are used; the output says which. Each backend runs once to warm up, then the median of N
timed runs is reported, in seconds per batch. The pydensecrf time includes the copies to and from the
device, as ``crf_refine`` does them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.config import CRFConfig
from weakclip.crf import crf_refine, pydensecrf_available, resolve_crf_backend

BATCH, CLASSES, SIZE = 8, 21, 64
PARAMS = CRFConfig(gauss_sxy=3, gauss_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10,
                   iters=10)
VOC_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc-sample"


def load_inputs(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(B, K, S, S) float32 probabilities, (B, 3, S, S) uint8 images, and where they came from."""
    paths = sorted((VOC_SAMPLE / "JPEGImages").glob("*.jpg"))[:BATCH]
    if len(paths) == BATCH:
        from PIL import Image

        images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
                           for p in paths])
        gts = np.stack([np.asarray(Image.open(VOC_SAMPLE / "SegmentationClass" / f"{p.stem}.png")
                                   .resize((SIZE, SIZE), Image.NEAREST)) for p in paths])
        labels = torch.from_numpy(np.where(gts == 255, 0, gts).astype(np.int64))
        source = f"voc-sample ({VOC_SAMPLE})"
        images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    else:
        labels = torch.randint(0, CLASSES, (BATCH, SIZE // 8, SIZE // 8), generator=gen)
        labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
        source = "random (voc-sample not found)"
        images_t = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    logits = F.one_hot(labels, CLASSES).permute(0, 3, 1, 2).float() * 4
    logits = logits + torch.randn(logits.shape, generator=gen)
    logits = F.avg_pool2d(logits, 5, stride=1, padding=2, count_include_pad=False)  # blur: a soft map
    return logits.softmax(1), images_t, source


def time_backend(probs: torch.Tensor, images: torch.Tensor, backend: str, repeat: int) -> float:
    def run() -> None:
        crf_refine(probs, images, PARAMS, backend=backend)
        if probs.device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per backend (median reported)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("crf_loss: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("crf_loss: --repeat must be at least 1", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    probs, images, source = load_inputs(torch.Generator().manual_seed(0))
    probs, images = probs.to(device), images.to(device)
    has_lattice = pydensecrf_available()
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "images": source,
        "batch": BATCH, "classes": CLASSES, "size": SIZE, "iters": PARAMS.iters, "repeat": args.repeat,
        "torch_s": time_backend(probs, images, "torch", args.repeat),
        "pydensecrf_s": time_backend(probs, images, "pydensecrf", args.repeat) if has_lattice else None,
        "auto_backend": resolve_crf_backend("auto", device),
        "auto_s": time_backend(probs, images, "auto", args.repeat),
    }
    if has_lattice:
        q_torch = crf_refine(probs, images, PARAMS, backend="torch")
        q_lattice = crf_refine(probs, images, PARAMS, backend="pydensecrf")
        result["argmax_agreement"] = (q_torch.argmax(1) == q_lattice.argmax(1)).float().mean().item()
        result["mean_abs_dq"] = (q_torch - q_lattice).abs().mean().item()

    if args.json:
        print(json.dumps(result))
        return 0
    print(f"boundary-loss CRF: {BATCH} images x {CLASSES} classes at {SIZE}x{SIZE}, {PARAMS.iters} iterations")
    print(f"device {result['device']} ({result['device_name']}), {result['cpu_threads']} CPU threads, "
          f"images: {source}, median of {args.repeat}")
    rows = [("torch (batched, exact)", result["torch_s"]),
            ("pydensecrf (per-image loop)", result["pydensecrf_s"]),
            (f"auto -> {result['auto_backend']}", result["auto_s"])]
    for name, seconds in rows:
        shown = "not installed" if seconds is None else f"{seconds * 1000:9.1f} ms"
        print(f"  {name:<30} {shown}")
    if has_lattice:
        print(f"  torch vs pydensecrf: argmax agreement {result['argmax_agreement']:.4f}, "
              f"mean |dQ| {result['mean_abs_dq']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
