"""GPU figures for the README, in under 5 minutes on one GPU; prints JSON with the GPU's name.

    python benchmarks/gpu.py [--repeat 10] [--images 8]
    python benchmarks/gpu.py --smoke      # the same code at toy sizes on any device (CI runs it on CPU)

- training: ViT-B/16 (random weights: timing does not depend on them), 512 x 512, batch 8, bf16 (frozen towers
  cast once, the trainable modules under autocast),
  one full step (forward, seeding + boundary (torch CRF on the GPU, the ``auto`` choice) + auxiliary
  losses, backward, AdamW) against the frozen image tower's own forward on the same batch; images/s and
  peak GPU memory;
- pseudo-mask inference: the VOC settings (6 scales x flip, 512 sliding windows, stride 341) on 500 x 375
  images, for window batch sizes 1, 8 and 16 (``infer.batch_size``): the network alone, and the whole
  stage (``write_label_maps``: network, Eq. 14 filter, dense CRF in the worker pool at its default size,
  PNGs), images/s, with the CRF worker count it used,
  in fp32 (the default); and the share of pixels whose argmax agrees between fp32 and bf16
  (``infer.precision: bf16``: the model cast once), with the bf16 images/s (random weights: a pretrained model's margins differ).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from train_step import measure_step, print_result, sync_device

from weakclip.config import VOC_CLASSES, ClipConfig, InferConfig, ModelConfig
from weakclip.data.datasets import Sample, load_image
from weakclip.distributed import DistInfo
from weakclip.infer import multiscale_probs, refiner_predictor
from weakclip.jobs import crf_worker_count, write_label_maps
from weakclip.model import build_model

BATCH_SIZES = (1, 8, 16)


def random_samples(folder: Path, n: int, hw: tuple[int, int]) -> list[Sample]:
    """``n`` random-noise JPEGs of size ``hw`` with two image-level labels each (the CRF's usual work)."""
    folder.mkdir(parents=True)
    samples = []
    for i in range(n):
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(id=path.stem, image=path, seed=None, gt=None, labels=(1 + i % 20, 15)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--images", type=int, default=8, help="images per pseudo-mask measurement")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on whatever device is there: checks the script runs, measures nothing")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (--smoke runs it at toy sizes anywhere)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, size, repeat, n_images = (2, 64, 1, 1) if args.smoke else (8, 512, args.repeat, args.images)
    icfg = (InferConfig(short_side=64, scales=[1.0], crop_size=64, stride=43, crf_workers=0) if args.smoke
            else InferConfig())
    image_hw = (48, 64) if args.smoke else (375, 500)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"gpu": name, "torch": torch.__version__, "smoke": args.smoke}
    train = measure_step(batch, size, device, repeat)
    result.update({f"train_{k}": v for k, v in train.items() if k not in ("device", "threads", "peak_rss_mb")})
    result["train_images_per_s"] = round(batch / train["step_s"], 2)

    torch.manual_seed(0)
    model = build_model(ModelConfig(clip=ClipConfig(model="ViT-B-16", pretrained=None)), list(VOC_CLASSES))
    predict = refiner_predictor(model, device)
    with tempfile.TemporaryDirectory() as tmp:
        samples = random_samples(Path(tmp) / "images", n_images, image_hw)
        images = [load_image(s.image) for s in samples]
        info = DistInfo(0, 1, 0, device)
        result["crf_workers"] = crf_worker_count(icfg)
        for batch_size in BATCH_SIZES:
            icfg.batch_size = batch_size
            multiscale_probs(predict, images[0], icfg, device)  # warm-up at this batch size
            sync_device(device)
            t = time.perf_counter()
            for image in images:
                multiscale_probs(predict, image, icfg, device)
            sync_device(device)
            result[f"pseudo_mask_model_images_per_s_batch{batch_size}"] = round(n_images / (time.perf_counter() - t), 3)
            # The whole stage, the CRF pool's start-up included.
            t = time.perf_counter()
            write_label_maps(predict, samples, Path(tmp) / f"masks{batch_size}", icfg, info, {"benchmark": True},
                             use_labels=True, crf_params=icfg.crf_params, progress=False)
            result[f"pseudo_mask_images_per_s_batch{batch_size}"] = round(n_images / (time.perf_counter() - t), 3)
        labels = {}
        icfg.batch_size = InferConfig().batch_size
        for precision in ("fp32", "bf16"):  # fp32 is the default; bf16 is the opt-in
            predict = refiner_predictor(model, device, precision)
            t = time.perf_counter()
            labels[precision] = [multiscale_probs(predict, image, icfg, device).argmax(0) for image in images]
            sync_device(device)
            result[f"pseudo_mask_model_{precision}_images_per_s"] = round(n_images / (time.perf_counter() - t), 3)
        agree = [float((a == b).float().mean()) for a, b in zip(labels["fp32"], labels["bf16"])]
        result["fp32_vs_bf16_pixel_agreement"] = round(sum(agree) / len(agree), 5)
    print_result(result, as_json=True)


if __name__ == "__main__":
    main()
