"""``weakclip train``: the WeakCLIP refiner on images + CAM seeds, through the shared training engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .checkpoints import checkpoint_metadata, load_refiner
from .clip import input_stats
from .config import Config, dump_config
from .data.datasets import SegDataset, list_samples, preflight
from .data.transforms import TrainTransform
from .distributed import DistInfo, init_distributed
from .engine import LoopSpec, resolve_amp, train_loop, warmup_cosine
from .fileio import write_text_atomic
from .losses import weakclip_losses
from .model import WeakCLIP, build_model
from .precision import DTYPES


def loop_spec(cfg: Config) -> LoopSpec:
    t = cfg.train
    return LoopSpec(iters=t.iters, batch_size=t.batch_size, workers=t.workers, seed=t.seed, amp=t.amp,
                    checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                    log_every=t.log_every, val_every=t.val_every)


def training_precision(cfg: Config, device: torch.device) -> str:
    """The precision training runs at: ``train.amp`` resolved for ``device`` (:func:`resolve_amp`), except
    that "auto" is fp32 in released mode, as the released code trains."""
    if cfg.train.amp == "auto" and cfg.model.released:
        return "fp32"
    return resolve_amp(cfg.train.amp, device)


def train_dataset(cfg: Config, progress: bool = True, model_cfg: Config | None = None) -> SegDataset:
    """The training split of ``cfg`` as an augmenting dataset, after a pre-flight check of every listed file.

    ``model_cfg``: the config of the model it feeds (default ``cfg``), whose normalisation sets the padding
    colour and whose classes (``cfg``'s first, then any more the model has) size the image-level labels.
    """
    model_cfg = model_cfg or cfg
    samples = list_samples(cfg.data, need_seeds=True)
    preflight(samples, cfg.num_classes, cfg.data.ignore_index, progress=progress)
    t = cfg.train
    # Crops are padded with the model's mean colour: 0 after normalisation, as the released pipeline pads.
    m = model_cfg.model
    mean, _ = input_stats("imagenet" if m.released else m.clip.normalize)
    transform = TrainTransform(t.crop_size, t.base_size, t.scale_range, t.cat_max_ratio, cfg.data.ignore_index,
                               pad_value=[v * 255 for v in mean])
    return SegDataset(samples, transform, model_cfg.num_classes, seed=t.seed, ignore_index=cfg.data.ignore_index)


def refiner_loss(cfg: Config):
    """``loss_fn(model, batch)`` for the engine: forward, then seeding + boundary + auxiliary losses."""

    def loss_fn(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model(batch["image"])
        return weakclip_losses(out["logits"], out["score_map"], batch["seed"], batch["image"], cfg.loss,
                               batch["labels"], released=cfg.model.released)

    return loss_fn


def build_optimizer(model: WeakCLIP, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only: frozen CLIP gets neither gradients nor optimizer state.

    The fused implementation updates all tensors in one kernel (about 4x faster than the per-tensor loop on
    CPUs for these 17M parameters); it is the same update rule.
    """
    return torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             fused=True)


def initial_model(cfg: Config, clip_model: nn.Module | None = None) -> tuple[WeakCLIP, Config]:
    """The model training starts from, and the config that describes it (``cfg`` is not changed).

    Built from ``cfg``; with ``train.init_from`` it is that checkpoint's model, with its architecture, CLIP
    and weights (:func:`weakclip.checkpoints.load_refiner`): its classes are ``cfg``'s in ``cfg``'s order
    (so the seeds' indices are its outputs'), then any more it has (trained, never supervised here).
    """
    if cfg.train.init_from is None:
        return build_model(cfg.model, cfg.data.class_names, clip_model), cfg
    return load_refiner(cfg.train.init_from, cfg, clip_model)


def train(cfg: Config, output: str | Path, resume: bool = False, info: DistInfo | None = None,
          clip_model: nn.Module | None = None, reset: bool = False) -> Path:
    """Train the refiner described by ``cfg`` into ``output``; returns the final weights' path. With
    ``data.seeds_from`` clip-es the seeds are made first into ``output/seeds``; ``reset`` discards seeds
    there written with other settings."""
    info = info or init_distributed()
    output = Path(output)
    if cfg.data.seeds_from != "files":
        from .seeds import with_generated_seeds

        cfg = with_generated_seeds(cfg, output / "seeds", info, reset)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    # The model first: a checkpoint's model (released normalisation, its classes) shapes the data.
    model, model_cfg = initial_model(cfg, clip_model)
    precision = training_precision(model_cfg, info.device)
    model.set_compute_dtype(DTYPES[precision])  # frozen towers cast once; the loop autocasts the rest
    dataset = train_dataset(cfg, progress=info.is_main, model_cfg=model_cfg)
    if info.is_main:
        write_text_atomic(output / "config.yaml", dump_config(model_cfg))
    validate = None
    if cfg.data.val_split and cfg.train.val_every:  # None (with a note) without ground truth
        from .infer import validator

        validate = validator(cfg, info)
    return train_loop(model, dataset, refiner_loss(model_cfg), build_optimizer(model, model_cfg),
                      warmup_cosine(cfg.train.lr, cfg.train.iters, cfg.train.warmup_iters, cfg.train.min_lr),
                      dataclasses.replace(loop_spec(cfg), amp=precision), output, info, resume=resume,
                      metadata=checkpoint_metadata(model_cfg), validate=validate)
