"""One full WeakCLIP training step against a bare frozen forward of the image tower, in the same run.

    python benchmarks/train_step.py [--json] [--repeat N] [--batch 2] [--size 320] [--device cpu|cuda]
                                    [--clip-model ViT-B-16|RN50|RN101|...]

ViT-B/16 (or ``--clip-model``) with random weights (timing does not depend on them), 21 classes. The step is what
``weakclip train`` runs per iteration: forward, seeding + boundary (CRF, ``auto`` backend) + auxiliary
losses, backward, AdamW step over the trainable parameters. The reference is ``visual(images)`` under
no_grad on the same batch. Medians of N interleaved runs after one warm-up each; ``ratio`` = step / forward. Peak RSS is the
process's high-water mark (Linux ru_maxrss), which includes building the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from weakclip.config import ClipConfig, Config, ModelConfig
from weakclip.losses import weakclip_losses
from weakclip.model import build_model
from weakclip.precision import DTYPES
from weakclip.train import build_optimizer, training_precision


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device: torch.device) -> float:
    sync_device(device)
    t = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - t


def _median_times(fns: list, repeat: int, device: torch.device) -> list[float]:
    """Median seconds of each function; runs are interleaved, so a slow spell of a shared machine hits both."""
    for fn in fns:
        fn()
    times = [[_seconds(fn, device) for fn in fns] for _ in range(repeat)]
    return [statistics.median(col) for col in zip(*times)]


def measure_step(batch: int, size: int, device: torch.device, repeat: int, clip_model: str = "ViT-B-16") -> dict:
    """Median seconds of a full training step and of the bare frozen image-tower forward, same batch."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(clip=ClipConfig(model=clip_model, pretrained=None)))
    model = build_model(cfg.model, cfg.data.class_names)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)  # what ``weakclip train`` uses
    loss_cfg = cfg.loss
    # As ``weakclip train`` runs: train.amp "auto" resolved for the device, frozen towers cast once.
    precision = training_precision(cfg, device)
    model.set_compute_dtype(DTYPES[precision])
    amp = precision != "fp32"
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    seeds = torch.randint(0, 21, (batch, size, size), device=device)
    seeds[:, : size // 8] = 255  # some ignored pixels, as padding gives
    normalised = (images.float() - model.mean) / model.std

    def step() -> None:
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=amp):
            out = model(images)
            losses = weakclip_losses(out["logits"], out["score_map"], seeds, images, loss_cfg)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():  # the frozen tower as the model runs it: its own dtype, no autocast
            model.visual(normalised.to(DTYPES[precision]))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forward_s, step_s = _median_times([forward, step], repeat, device)
    result = {
        "step_s": round(step_s, 4),
        "visual_forward_s": round(forward_s, 4),
        "ratio": round(step_s / forward_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "clip_model": clip_model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "size": size,
        "crf_backend": loss_cfg.crf_backend,
        "precision": precision,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip model: ViT-B-16, RN50, RN101, ...")
    args = parser.parse_args()
    print_result(measure_step(args.batch, args.size, torch.device(args.device), args.repeat, args.clip_model),
                 args.json)


if __name__ == "__main__":
    main()
