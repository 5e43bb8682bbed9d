"""How much foreground/background signal the frozen CLIP features carry on the real sample: a linear probe.

    python benchmarks/feature_probe.py [--json] [--config voc-sample-cpu] [--clip TAG_OR_FILE] [--images 60]

For each tap and for the dense projected embeddings, a logistic-regression probe maps every dense-grid
token to foreground / background (from the ground truth, nearest-resized to the token grid). It is fitted on
the first two thirds of ``--images`` images and scored on the rest; ``majority`` is the accuracy of always
answering background on the held-out tokens, and ``rgb`` a probe on each token's mean colour, for
reference. A held-out accuracy at or below ``majority`` means the
features carry no foreground/background signal that transfers between images, so no decoder trained on
them can find objects in images it has not memorised. Diagnoses runs with random CLIP weights (the
build machines') against runs with pretrained weights (``--clip openai`` on a user's machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_step import print_result

from weakclip.backbones import build_backbone
from weakclip.clip import input_stats, load_clip
from weakclip.config import load_config
from weakclip.data.datasets import list_samples, load_image

VOC_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc-sample"


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   steps: int = 300) -> tuple[float, float]:
    """Logistic regression (Adam, standardised features): (train accuracy, held-out accuracy)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], 2)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(linear(train_x), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda x, y: (linear(x).argmax(1) == y).float().mean().item()
        return acc(train_x, train_y), acc(test_x, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--config", default="voc-sample-cpu")
    parser.add_argument("--clip", help="CLIP weights (open_clip tag or local file) instead of the config's")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=256, help="images are resized to size x size")
    args = parser.parse_args()
    data = load_config("voc-sample-cpu", [f"data.root={VOC_SAMPLE}"]).data  # the model comes from --config
    model_cfg = load_config(args.config, [f"model.clip.pretrained={args.clip}"] if args.clip else []).model
    clip_cfg = model_cfg.clip
    samples = list_samples(data, need_gt=True)[: args.images]
    torch.manual_seed(0)
    visual = build_backbone(load_clip(clip_cfg).visual, model_cfg.backbone).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in input_stats(clip_cfg.normalize))
    grid = args.size // visual.dense_stride  # every map is probed on the dense embeddings' grid
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    with torch.no_grad():
        for s in samples:
            img = torch.from_numpy(np.array(load_image(s.image))).permute(2, 0, 1)[None].float() / 255
            img = F.interpolate(img, size=(args.size, args.size), mode="bilinear", align_corners=False)
            out = visual((img - mean) / std)
            maps = {f"tap{i}": F.adaptive_avg_pool2d(t, grid) for i, t in enumerate(out.taps, 1)} | {"dense": out.dense}
            maps["rgb"] = F.adaptive_avg_pool2d(img, grid)  # reference: each token's mean colour
            for name, m in maps.items():
                feats.setdefault(name, []).append(m[0].flatten(1).T)
            gt = torch.from_numpy(s.load_gt().astype(np.int64))[None, None].float()
            labels.append(F.interpolate(gt, size=(grid, grid), mode="nearest").flatten().long())
    n_train = len(samples) * 2 // 3 * grid * grid
    y = torch.cat(labels)
    valid = y != data.ignore_index
    fg = (y > 0).long()
    is_train = torch.arange(len(y)) < n_train
    tr, te = is_train & valid, ~is_train & valid
    result: dict = {"config": args.config, "clip": clip_cfg.pretrained or "random", "images": len(samples),
                    "majority": round(1 - fg[te].float().mean().item(), 4)}
    for name, chunks in feats.items():
        x = torch.cat(chunks)
        train_acc, test_acc = probe_accuracy(x[tr], fg[tr], x[te], fg[te])
        result[name] = {"train": round(train_acc, 4), "heldout": round(test_acc, 4)}
    print_result(result, args.json)


if __name__ == "__main__":
    main()
