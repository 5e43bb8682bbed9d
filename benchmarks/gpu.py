"""GPU figures for the README, in under 5 minutes on one GPU; prints JSON with the GPU's name.

    python benchmarks/gpu.py [--repeat 10] [--images 8]

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
from train_step import measure_step, print_result

from weakclip.config import VOC_CLASSES, ClipConfig, InferConfig, ModelConfig
from weakclip.infer import multiscale_probs, refiner_predictor
from weakclip.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    device = torch.device("cuda")
    result = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    train = measure_step(8, 512, device, args.repeat)
    result.update({f"train_{k}": v for k, v in train.items() if k not in ("device", "threads", "peak_rss_mb")})
    result["train_images_per_s"] = round(8 / train["step_s"], 2)

    torch.manual_seed(0)
    model = build_model(ModelConfig(clip=ClipConfig(model="ViT-B-16", pretrained=None)), list(VOC_CLASSES))
    predict = refiner_predictor(model, device)
    icfg = InferConfig()
    images = [np.random.default_rng(i).integers(0, 256, (375, 500, 3), dtype=np.uint8) for i in range(args.images)]
    multiscale_probs(predict, images[0], icfg, device)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for image in images:
        multiscale_probs(predict, image, icfg, device)
    torch.cuda.synchronize()
    result["pseudo_mask_inference_images_per_s"] = round(args.images / (time.perf_counter() - t), 3)
    print_result(result, as_json=True)


if __name__ == "__main__":
    main()
