"""``weakclip demo``: the whole pipeline (train, pseudo masks, evaluation, grids) through the same commands
a user runs, on generated synthetic data or on any folder laid out like voc-sample.

Rerunning the same command continues where it stopped: finished training and pseudo masks are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from .errors import WeakclipError
from .fileio import write_text_atomic


def _run(argv: list[str]) -> None:
    from .cli import main

    print("$ weakclip " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise WeakclipError(f"demo step `weakclip {argv[0]}` failed (see the message above)")


def run_demo(output: str | Path = "weakclip-demo", data: str | Path | None = None, clip: str | None = None,
             iters: int | None = None, num_images: int = 48, clip_model: str = "ViT-B-16",
             seeds: str = "files") -> dict:
    """Run the pipeline into ``output``; returns (and writes to ``report.json``) the measured figures.

    ``clip`` (an open_clip tag or a local weights file for the open_clip model ``clip_model``) replaces the
    configs' small random CLIP. ``seeds``: ``files`` trains on the data's ``Seeds``; ``clip-es`` makes
    seeds from the image-level labels first (``weakclip seeds``), so only images and labels are needed.
    Ground truth, when present, scores both the seeds and the pseudo masks.
    """
    if seeds not in ("files", "clip-es"):
        raise WeakclipError(f"--seeds {seeds}: expected files or clip-es")
    start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    overrides: dict = {}
    if data is None:
        from .data.synthetic import make_synthetic_dataset

        root = out / "data"
        if not (root / "ImageSets" / "Segmentation" / "train.txt").is_file():
            print(f"generating {num_images} synthetic images in {root}", flush=True)
            make_synthetic_dataset(root, num_images=num_images, seed=0)
        base = "demo"
    else:
        root = Path(data)
        needs = ["JPEGImages", "cls_labels.json", "ImageSets/Segmentation/train.txt"]
        for need in needs + (["Seeds"] if seeds == "files" else []):
            if not (root / need).exists():
                raise WeakclipError(f"{root / need}: missing (--data needs the voc-sample layout)")
        base = "voc-sample-cpu"
    overrides["data"] = {"root": str(root.resolve())}
    if clip is not None:
        overrides["model"] = {"clip": {"model": clip_model, "arch": None, "pretrained": clip}}
    if iters is not None:
        overrides["train"] = {"iters": iters}
    seeds_dir = root / "Seeds"
    if seeds == "clip-es":
        seeds_dir = out / "seeds"
        overrides["data"]["seeds_dir"] = str(seeds_dir.resolve())
    config = out / "config.yaml"
    write_text_atomic(config, yaml.safe_dump({"base": base, **overrides}, sort_keys=False))

    # The demo's folders are its own: a rerun with other options replaces their outputs (--reset).
    if seeds == "clip-es":
        _run(["seeds", "--config", str(config), "--output", str(seeds_dir), "--reset"])
    run, masks = out / "train", out / "pseudo_masks"
    if not (run / "model.safetensors").is_file():
        resume = ["--resume"] if list((run / "checkpoints").glob("*.safetensors")) else []
        _run(["train", "--config", str(config), "--output", str(run), *resume])
    _run(["pseudo-masks", "--config", str(config), "--checkpoint", str(run / "model.safetensors"),
          "--output", str(masks), "--reset"])
    gt, listing = root / "SegmentationClass", root / "ImageSets" / "Segmentation" / "train.txt"
    scores = {"seeds": None, "pseudo_masks": None}
    if gt.is_dir():
        for name, pred in (("seeds", seeds_dir), ("pseudo_masks", masks)):
            _run(["evaluate", "--pred", str(pred), "--gt", str(gt), "--config", str(config), "--list",
                  str(listing), "--json", str(out / f"eval_{name}.json")])
            scores[name] = json.loads((out / f"eval_{name}.json").read_text())["miou"]
    _run(["report", "--images", str(root / "JPEGImages"), "--pred", str(masks), "--seeds", str(seeds_dir),
          *(["--gt", str(gt)] if gt.is_dir() else []), "--list", str(listing), "--config", str(config),
          "--output", str(out / "report")])
    shown = [(seeds_dir, "seeds"), (masks, "pseudo mask")] + ([(gt, "ground truth")] if gt.is_dir() else [])
    _run(["visualize", "--images", str(root / "JPEGImages"), "--masks", *(str(d) for d, _ in shown),
          "--titles", *(t for _, t in shown), "--output", str(out / "grids"), "--num", "8"])
    report = {
        "seeds": "clip-es" if seeds == "clip-es" else "data",
        "seeds_dir": str(seeds_dir),
        "seeds_miou": scores["seeds"],
        "pseudo_mask_miou": scores["pseudo_masks"],
        "seconds": round(time.perf_counter() - start, 1),
        "data": str(root),
        "weights": str(run / "model.safetensors"),
        "pseudo_masks": str(masks),
        "grids": str(out / "grids"),
        "html_report": str(out / "report" / "index.html"),
        "training_log": str(run / "metrics.csv"),
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    if gt.is_dir():
        print(f"\nseeds mIoU {report['seeds_miou']:.1f} -> pseudo masks mIoU {report['pseudo_mask_miou']:.1f} "
              f"({report['seconds']:.0f} s)")
    else:
        print(f"\nno ground truth in {gt}: nothing scored ({report['seconds']:.0f} s)")
    print(f"report: {out / 'report.json'}\ngrids: {out / 'grids'}")
    if data is not None and clip is None:
        # voc-sample-cpu runs a random CLIP: its features carry no object signal on real photographs
        # (benchmarks/feature_probe.py), so these pseudo masks test the plumbing, not the method.
        print("note: this run used a randomly initialised CLIP; for meaningful pseudo masks on real images pass "
              "--clip with pretrained weights (an open_clip tag such as openai, or a local checkpoint file of "
              "--clip-model, ViT-B-16 by default)")
    return report
