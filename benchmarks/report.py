"""The HTML report's build time on the real sample, against the CRF step of the pseudo masks it shows.

    python benchmarks/report.py [--json] [--crf-images 5] [--repeat 2]

Measured in one run, on the 200 images of ../shared/data/voc-sample:
- ``report_s_per_image``: ``build_report`` (image copies, thumbnails, full-size overlays, per-image scores,
  per-class table, page) over images, seeds, a pseudo-mask folder and ground truth, divided by the image
  count; the best of ``--repeat`` builds. The pseudo-mask folder is the ground truth shifted by a few
  pixels, written beforehand (untimed): the build's cost does not depend on the masks' content.
- ``crf_s_per_image``: the pseudo-mask stage's CRF alone (``weakclip.infer.finish_label_map`` with the
  ``voc-sample-cpu`` config's CRF parameters, full resolution, background + the image's classes, unaries
  from the seeds) on the first ``--crf-images`` images. It is a lower bound of a pseudo mask's cost: the
  multi-scale network inference comes on top.
- ``report_vs_crf``: the ratio of the two (the report costs this fraction of the CRF step alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from pseudo_masks import VOC_SAMPLE, seed_probs
from train_step import print_result

from weakclip.config import VOC_CLASSES, load_config
from weakclip.data.datasets import load_image
from weakclip.data.masks import read_mask, write_mask
from weakclip.infer import finish_label_map
from weakclip.report import build_report


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--crf-images", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not VOC_SAMPLE.is_dir():
        raise SystemExit(f"{VOC_SAMPLE}: the real sample is missing")
    ids = (VOC_SAMPLE / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    cfg = load_config("voc-sample-cpu")

    with tempfile.TemporaryDirectory(prefix="weakclip-report-bench.") as tmp:
        pred = Path(tmp) / "pred"
        for i in ids:
            write_mask(pred / f"{i}.png", np.roll(read_mask(VOC_SAMPLE / "SegmentationClass" / f"{i}.png"), 8, 1))
        builds = []
        for r in range(args.repeat):
            start = time.perf_counter()
            build_report(VOC_SAMPLE / "JPEGImages", pred, Path(tmp) / f"report{r}", VOC_CLASSES,
                         seeds_dir=VOC_SAMPLE / "Seeds", gt_dir=VOC_SAMPLE / "SegmentationClass", ids=ids,
                         progress=False)
            builds.append(time.perf_counter() - start)
        files = list((Path(tmp) / "report0").rglob("*"))
        report_mb = sum(f.stat().st_size for f in files if f.is_file()) / 2**20

    crf_times = []
    for i in ids[: args.crf_images]:
        seed = read_mask(VOC_SAMPLE / "Seeds" / f"{i}.png")
        image = load_image(VOC_SAMPLE / "JPEGImages" / f"{i}.jpg")
        keys = sorted({0, *(int(c) for c in np.unique(seed) if 0 < c < len(VOC_CLASSES))})
        probs = seed_probs(seed, keys)
        start = time.perf_counter()
        finish_label_map(probs, keys, image, np.zeros(seed.shape, bool), cfg.infer.crf_params)
        crf_times.append(time.perf_counter() - start)

    per_image = min(builds) / len(ids)
    crf = float(np.mean(crf_times))
    print_result({
        "images": len(ids),
        "report_s_per_image": round(per_image, 4),
        "report_build_s": [round(b, 2) for b in builds],
        "report_mb": round(report_mb, 1),
        "crf_images": len(crf_times),
        "crf_s_per_image": round(crf, 3),
        "report_vs_crf": round(per_image / crf, 4),
        "cpu": cpu_name(),
        "cores_available": len(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }, args.json)


if __name__ == "__main__":
    main()
