"""GPU figures for the README, in under 5 minutes on one GPU; prints JSON with the GPU's name.

    python benchmarks/gpu.py [--repeat 10] [--images 8]
    python benchmarks/gpu.py --smoke      # the same code at toy sizes on any device (CI runs it on CPU)

- training: ViT-B/16 (random weights: timing does not depend on them), 512 x 512, batch 8, bf16 autocast,
  one full step (forward, seeding + boundary (torch CRF on the GPU, the ``auto`` choice) + auxiliary
  losses, backward, AdamW) against the frozen image tower's own forward on the same batch; images/s and
  peak GPU memory;
- pseudo-mask inference: the VOC settings (6 scales x flip, 512 sliding windows, stride 341) on 500 x 375
  images, model only (the CRF runs in CPU worker processes beside it), images/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from train_step import measure_step, print_result, sync_device

from weakclip.config import VOC_CLASSES, ClipConfig, InferConfig, ModelConfig
from weakclip.infer import multiscale_probs, refiner_predictor
from weakclip.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on whatever device is there: checks the script runs, measures nothing")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (--smoke runs it at toy sizes anywhere)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, size, repeat, n_images = (2, 64, 1, 1) if args.smoke else (8, 512, args.repeat, args.images)
    icfg = InferConfig(short_side=64, crop_size=64, stride=43) if args.smoke else InferConfig()
    image_hw = (48, 64) if args.smoke else (375, 500)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"gpu": name, "torch": torch.__version__, "smoke": args.smoke}
    train = measure_step(batch, size, device, repeat)
    result.update({f"train_{k}": v for k, v in train.items() if k not in ("device", "threads", "peak_rss_mb")})
    result["train_images_per_s"] = round(batch / train["step_s"], 2)

    torch.manual_seed(0)
    model = build_model(ModelConfig(clip=ClipConfig(model="ViT-B-16", pretrained=None)), list(VOC_CLASSES))
    predict = refiner_predictor(model, device)
    images = [np.random.default_rng(i).integers(0, 256, (*image_hw, 3), dtype=np.uint8) for i in range(n_images)]
    multiscale_probs(predict, images[0], icfg, device)  # warm-up
    sync_device(device)
    t = time.perf_counter()
    for image in images:
        multiscale_probs(predict, image, icfg, device)
    sync_device(device)
    result["pseudo_mask_inference_images_per_s"] = round(n_images / (time.perf_counter() - t), 3)
    print_result(result, as_json=True)


if __name__ == "__main__":
    main()
