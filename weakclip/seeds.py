"""``weakclip seeds``: CLIP-ES seeds for every listed image from its image-level labels alone.

Writes ``<output>/<id>.png`` class-index PNGs (255 where the CRF is not confident), the format ``weakclip
train`` reads as ``data.seeds_dir``, and with ``save_cams`` the float16 CAMs of the image's classes in
``<output>/cams/<id>.npz``. The folder is a :class:`~weakclip.jobs.OutputFolder` filled by
:func:`~weakclip.jobs.run_jobs`: resumable, shardable, and ``manifest.json`` records the CLIP weights, the
labels and every setting that changes a seed (a folder written with others is refused unless ``reset``).
Dense CRFs run in worker processes while CLIP works on the next images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .checkpoints import clip_weights_identity
from .clip import load_clip, refuse_in_checkpoint
from .clip_es import ClipES, seed_from_cams
from .config import Config
from .data.datasets import Sample, labels_source, list_samples, load_image
from .data.masks import write_mask
from .distributed import DistInfo, Shard, init_distributed, run_once
from .errors import WeakclipError
from .fileio import atomic_path
from .jobs import INFERENCE_TIMEOUT, OutputFolder, RenameGuard, run_jobs

SOURCES = ("files", "clip-es")  # data.seeds_from


def _labels_where(cfg: Config) -> str:
    """The labels file (or seed folder) the image-level labels come from, for error lines."""
    return labels_source(cfg.data).partition(" ")[2] or "data.labels_file"


def seed_samples(cfg: Config, split: str | None = None) -> list[Sample]:
    """The split's samples with their image-level labels; an image without labels is an error (one line)."""
    samples = list_samples(cfg.data, split, need_seeds=False)
    for s in samples:
        if not s.labels:
            raise WeakclipError(f"{_labels_where(cfg)}: {s.id}: no image-level label (seeds need at least one "
                                f"class per image; set data.labels_file to the image-level labels)")
    return samples


def seeds_manifest(cfg: Config, split: str, samples: Sequence[Sample], save_cams: bool) -> dict:
    """Everything that changes a seed: CLIP and its weights, classes, labels, data and the seeds settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.seeds).items() if k != "crf_workers"}
    labels = json.dumps([[s.id, list(s.labels)] for s in samples])
    clip = dataclasses.asdict(cfg.model.clip)
    del clip["pretrained"]  # stands for the weights' identity, not the path
    clip["weights"] = clip_weights_identity(cfg.model.clip)
    return {"clip": clip, "seeds": settings, "split": split,
            "classes": cfg.data.class_names, "data_root": str(Path(cfg.data.root).resolve()),
            "labels_sha256": hashlib.sha256(labels.encode()).hexdigest(), "save_cams": save_cams}


def _finish(job: tuple) -> str:
    """Worker: the CRF seed (or the plain argmax seed) of one image, written atomically. Returns its id."""
    sample_id, cams, image_path, labels, settings, ignore_index, out_path, guard = job
    image = load_image(image_path) if settings.crf else None  # only the CRF looks at the image
    write_mask(out_path, seed_from_cams(cams, image, labels, settings, ignore_index), guard)
    return sample_id


def save_cams(path: Path, cams: np.ndarray, labels: Sequence[int], guard: RenameGuard | None = None) -> None:
    """``cams`` (K, H, W) float16 and ``classes`` (K,) the class index of each map, in one .npz."""
    with atomic_path(path, guard) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, cams=cams.astype(np.float16), classes=np.asarray(labels, dtype=np.int64))


def write_seeds(cfg: Config, output: str | Path, split: str | None = None, keep_cams: bool = False,
                progress: bool = True, shard: Shard | None = None, info: DistInfo | None = None,
                reset: bool = False, reset_flag: str = "--reset") -> dict | None:
    """Seeds for every image of ``split`` (default ``data.split``) into ``output`` (see
    :func:`~weakclip.jobs.run_jobs`); ``reset`` discards seeds written there with other settings, and a
    refusal names ``reset_flag``. Returns {"output", "written", "skipped", "missing"} on the main
    process, None elsewhere."""
    refuse_in_checkpoint(cfg.model.clip)  # before the folder is touched
    info = info or init_distributed(INFERENCE_TIMEOUT)
    split = split or cfg.data.split
    out = Path(output)
    samples = run_once(lambda: seed_samples(cfg, split), info)
    settings = run_once(lambda: seeds_manifest(cfg, split, samples, keep_cams), info)
    folder = OutputFolder(out, "seeds", settings, ("*.png", "cams", "summary.json"), reset, reset_flag)

    def jobs(images: Iterator[tuple[Sample, np.ndarray]], guard: RenameGuard) -> Iterator[tuple]:
        method = ClipES(load_clip(cfg.model.clip), cfg.data.class_names, cfg.seeds, info.device)

        def each() -> Iterator[tuple]:
            for s, image in images:
                labels = method.check_labels(s.labels, f"{_labels_where(cfg)}: {s.id}")
                cams = method.cams(image, labels)
                if keep_cams:
                    save_cams(out / "cams" / f"{s.id}.npz", cams, labels, guard)
                yield s.id, cams, s.image, labels, cfg.seeds, cfg.data.ignore_index, out / f"{s.id}.png", guard

        return each()

    summary = run_jobs(folder, samples, lambda s: (out / f"{s.id}.png").is_file(), jobs, _finish,
                       cfg.seeds.crf_workers if cfg.seeds.crf else 0, info, "seeds", shard, progress)
    return summary if info.is_main else None


def with_generated_seeds(cfg: Config, folder: str | Path, info=None, reset: bool = False) -> Config:
    """``cfg`` training on seeds made first by ``data.seeds_from`` (``clip-es``) into ``folder``; ``reset``
    (``weakclip train --reset``) discards seeds written there with other settings."""
    if cfg.data.seeds_from not in SOURCES:
        raise WeakclipError(f"data.seeds_from: expected one of {', '.join(SOURCES)}, got {cfg.data.seeds_from!r}")
    folder = Path(folder).resolve()
    summary = write_seeds(cfg, folder, progress=info is None or info.is_main, info=info, reset=reset)
    if summary is not None:
        print(f"seeds: {summary['output']} ({summary['written']} written, {summary['skipped']} already done)",
              flush=True)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seeds_dir=str(folder)))
