"""The pseudo-mask stage on the real sample: throughput, the CRF label-restriction speedup, and baselines.

    python benchmarks/pseudo_masks.py [--json] [--config voc-sample-cpu] [--checkpoint W] [--limit N]

Measured in one run:
- ``images_per_s``: ``write_label_maps`` (multi-scale + flip inference, label filter, CRF in
  ``--workers`` processes, PNG writing) over the sample, end to end. Without ``--checkpoint`` the model has
  random weights (the time does not depend on them).
- ``launch``: the ``weakclip pseudo-masks`` command on the first ``--launch-images`` images as one process
  and as two ``torchrun`` processes (gloo, CPU), each with its default CRF pool: images/s over the whole
  command (start-up included) and over the stage (``summary.json``), and whether both wrote byte-identical
  PNGs.
- ``crf_speedup``: pydensecrf post-processing at full resolution over background + the image's classes
  against all 21 classes, on the same unaries (from the seeds), seconds per image on ``--crf-images`` images
  (default all), overall and by the number of classes kept.
- baselines against ``SegmentationClass``: the seeds themselves, and the same dense CRF run on the seeds
  alone (one-hot unary with confidence 0.6 over background + the image's classes).
- ``pseudo_mask_miou`` when ``--checkpoint`` is given.
- ``durable_writes``: writing a label map (the sample's seeds, full size) as the runner does, with the file
  and folder ``fsync`` before and after the rename and without it (``WEAKCLIP_FSYNC=0``), interleaved, in
  ms per image, on the file system of the temporary folder; and the difference as a share of the stage's
  time per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from train_step import print_result

from weakclip.config import load_config
from weakclip.crf import dense_crf_pydensecrf
from weakclip.data.datasets import Sample, list_samples, load_image
from weakclip.data.masks import write_mask
from weakclip.distributed import init_distributed
from weakclip.engine import save_weights
from weakclip.fileio import FSYNC_ENV
from weakclip.infer import refiner_predictor
from weakclip.jobs import write_label_maps
from weakclip.metrics import ConfusionMeter, evaluate_dirs
from weakclip.model import build_model
from weakclip.train import checkpoint_metadata

REPO = Path(__file__).resolve().parents[1]
VOC_SAMPLE = REPO.parent / "shared" / "data" / "voc-sample"
SEED_CONFIDENCE = 0.6


def seed_probs(seed: np.ndarray, keys: list[int]) -> np.ndarray:
    """(len(keys), H, W) probabilities: SEED_CONFIDENCE on the seed's class, the rest shared evenly."""
    probs = np.full((len(keys), *seed.shape), (1 - SEED_CONFIDENCE) / max(len(keys) - 1, 1), np.float32)
    for j, c in enumerate(keys):
        probs[j][seed == c] = SEED_CONFIDENCE
    return probs


def crf_on_seeds(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    sample, params = job
    keys = sorted({0, *sample.labels})
    q = dense_crf_pydensecrf(seed_probs(sample.load_seed(), keys), load_image(sample.image), params)
    return np.asarray(keys, np.uint8)[q.argmax(0)], sample.load_gt()


def launch_figures(config: str, samples: list[Sample], checkpoint: Path, tmp: Path) -> dict:
    """``weakclip pseudo-masks`` on ``samples`` as 1 process and as 2 torchrun processes: images/s and
    whether the PNGs are byte-identical."""
    root = tmp / "launch-data"  # links to the sample: the command lists a split of a data root
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for s in samples:
        (root / "JPEGImages" / s.image.name).symlink_to(s.image)
    (root / "cls_labels.json").symlink_to(VOC_SAMPLE / "cls_labels.json")
    (root / "ImageSets" / "Segmentation" / "launch.txt").write_text("".join(f"{s.id}\n" for s in samples))
    args = ["-m", "weakclip", "pseudo-masks", "--config", config, "--checkpoint", str(checkpoint),
            "--split", "launch", "--set", f"data.root={root}", "--set", "infer.crf_workers=null"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    figures: dict = {"images": len(samples)}
    pngs = []
    for procs, launcher in ((1, []), (2, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        out = tmp / f"launch-{procs}"
        t = time.perf_counter()
        subprocess.run([sys.executable, *launcher, *args, "--output", str(out)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
        stage = json.loads((out / "summary.json").read_text())["last_run"]
        figures[f"processes_{procs}"] = {"command_s": round(seconds, 1),
                                         "images_per_s": round(len(samples) / seconds, 3),
                                         "stage_images_per_s": stage["images_per_s"],
                                         "crf_workers_per_process": stage["crf_workers"]}
        pngs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.png"))})
    figures["identical_pngs"] = len(pngs[0]) == len(samples) and pngs[0] == pngs[1]
    return figures


def file_system(path: str) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts; "unknown" elsewhere)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else "unknown"


def durable_write_cost(samples: list[Sample], rounds: int = 3) -> dict:
    """ms per label map written with and without fsync (alternating per round, same maps, same folder)."""
    seeds = [s.load_seed() for s in samples]
    before = os.environ.get(FSYNC_ENV)
    times: dict[str, list[float]] = {"1": [], "0": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                for flag in ("1", "0"):
                    os.environ[FSYNC_ENV] = flag
                    for i, seed in enumerate(seeds):
                        t = time.perf_counter()
                        write_mask(Path(tmp) / flag / f"{i}.png", seed)
                        times[flag].append(time.perf_counter() - t)
            fs = file_system(tmp)
    finally:
        if before is None:
            os.environ.pop(FSYNC_ENV, None)
        else:
            os.environ[FSYNC_ENV] = before
    ms = {flag: 1000 * sum(ts) / len(ts) for flag, ts in times.items()}
    return {"images": len(seeds), "rounds": rounds, "file_system": fs, "fsync_ms_per_image": round(ms["1"], 3),
            "no_fsync_ms_per_image": round(ms["0"], 3), "fsync_cost_ms_per_image": round(ms["1"] - ms["0"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--config", default="voc-sample-cpu")
    parser.add_argument("--checkpoint")
    parser.add_argument("--limit", type=int, default=0, help="images for the stage timing (0: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crf-images", type=int, default=0, help="images for the CRF timing (0: all)")
    parser.add_argument("--launch-images", type=int, default=16,
                        help="images for the 1-process / 2-process command timing (0: skip it)")
    parser.add_argument("--durable-images", type=int, default=50,
                        help="label maps for the fsync on/off write timing (0: skip it)")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.root={VOC_SAMPLE}", f"infer.crf_workers={args.workers}"])
    samples = list_samples(cfg.data, need_seeds=True, need_gt=True)
    params = cfg.infer.crf_params
    result: dict = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "config": args.config}

    # 1. The whole stage.
    info = init_distributed()
    device = info.device
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.class_names)
    if args.checkpoint:
        from weakclip.engine import load_weights

        load_weights(args.checkpoint, model)
    stage = samples[: args.limit] if args.limit else samples
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_label_maps(refiner_predictor(model, device), stage, tmp, cfg.infer, info, {"benchmark": True},
                         use_labels=cfg.infer.label_filter, crf_params=params, progress=not args.json)
        seconds = time.perf_counter() - t
        if args.checkpoint and len(stage) == len(samples):
            scores = evaluate_dirs(tmp, Path(cfg.data.root) / cfg.data.gt_dir, cfg.data.class_names,
                                   ids=[s.id for s in samples], progress=False)
            result["pseudo_mask_miou"] = round(scores.miou, 2)
    result.update(images=len(stage), stage_s=round(seconds, 1), images_per_s=round(len(stage) / seconds, 3),
                  crf_workers=args.workers, device=str(device))

    # 1a. What durable writes cost per image, fsync on and off, in this run.
    if args.durable_images:
        durable = durable_write_cost(samples[: args.durable_images])
        durable["share_of_stage_time"] = round(durable["fsync_cost_ms_per_image"] / 1000 / (seconds / len(stage)), 5)
        result["durable_writes"] = durable

    # 1b. The command, 1 process against 2 torchrun processes.
    if args.launch_images:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "random.safetensors"
            if not args.checkpoint:
                save_weights(checkpoint, model, checkpoint_metadata(cfg))
            result["launch"] = launch_figures(args.config, samples[: args.launch_images], checkpoint, Path(tmp))

    # 2. CRF over the image's classes against all classes, same unaries.
    crf_samples = samples[: args.crf_images] if args.crf_images else samples
    timed: dict[int, list[tuple[float, float]]] = {}  # kept classes -> (restricted s, all-classes s) per image
    for sample in crf_samples:
        seed, image = sample.load_seed(), load_image(sample.image)
        keys = sorted({0, *sample.labels})
        seconds = []
        for ks in (keys, list(range(cfg.num_classes))):
            probs = seed_probs(seed, ks)
            t = time.perf_counter()
            dense_crf_pydensecrf(probs, image, params)
            seconds.append(time.perf_counter() - t)
        timed.setdefault(len(keys), []).append((seconds[0], seconds[1]))
    speedup = lambda rows: round(sum(f for _, f in rows) / sum(r for r, _ in rows), 2)
    every = [row for rows in timed.values() for row in rows]
    result.update(crf_images=len(every),
                  crf_restricted_s_per_image=round(sum(r for r, _ in every) / len(every), 4),
                  crf_all_classes_s_per_image=round(sum(f for _, f in every) / len(every), 4),
                  crf_speedup=speedup(every),
                  crf_speedup_by_kept_classes={str(k): {"images": len(rows), "speedup": speedup(rows)}
                                               for k, rows in sorted(timed.items())})

    # 3. Baselines: the seeds, and the dense CRF on the seeds alone.
    seeds = ConfusionMeter(cfg.num_classes)
    crf = ConfusionMeter(cfg.num_classes)
    for s in samples:
        seeds.update(s.load_seed(), s.load_gt())
    with get_context("spawn").Pool(args.workers) as pool:
        for pred, gt in pool.imap(crf_on_seeds, [(s, params) for s in samples], chunksize=4):
            crf.update(pred, gt)
    result.update(seeds_miou=round(seeds.result(cfg.data.class_names).miou, 2),
                  crf_on_seeds_miou=round(crf.result(cfg.data.class_names).miou, 2))

    print_result(result, args.json)


if __name__ == "__main__":
    main()
