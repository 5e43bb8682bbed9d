"""A label-map job as a separate process, for tests that start, race and kill jobs:

    python tests/label_map_writer.py CONFIG OUT TAG RESET DELAY_S

writes the images of CONFIG's list into OUT with :func:`weakclip.jobs.write_label_maps` and the settings
{"tag": TAG} (the predictor's weights depend on TAG too, so maps of different settings differ). Exit 0 with
the summary as JSON, or 3 with the refusal.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from weakclip.config import load_config
from weakclip.data.datasets import list_samples
from weakclip.distributed import DistInfo
from weakclip.errors import WeakclipError
from weakclip.jobs import write_label_maps


class Tagged:
    """A pointwise colour predictor whose weights are drawn from seed ``tag``, ``delay`` s per call."""

    def __init__(self, tag: int, delay: float = 0.0):
        torch.manual_seed(tag)
        self.conv, self.delay = torch.nn.Conv2d(3, 21, 1), delay

    def __call__(self, x):
        time.sleep(self.delay)
        with torch.no_grad():
            return self.conv(x.float() / 64)


def write(config: str, out: str, tag: int, reset: bool = False, delay: float = 0.0) -> dict:
    cfg = load_config(config)
    samples = list_samples(cfg.data, need_seeds=False)
    return write_label_maps(Tagged(tag, delay), samples, out, cfg.infer, DistInfo(0, 1, 0, torch.device("cpu")),
                            {"tag": tag}, use_labels=True, crf_params=None, progress=False, reset=reset)


if __name__ == "__main__":
    config, out, tag, reset, delay = sys.argv[1:6]
    try:
        summary = write(config, out, int(tag), reset == "1", float(delay))
    except WeakclipError as exc:
        print(f"refused: {exc}", flush=True)
        sys.exit(3)
    print(json.dumps(summary), flush=True)
