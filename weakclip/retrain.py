"""``weakclip retrain`` and ``weakclip predict``: a fully supervised segmenter trained on pseudo masks
through the shared training engine, and test-time predictions through the shared inference.

Retraining follows the released recipe (deeplabv1-resnet38, see ``RetrainConfig``): random scale of each
image's own size, crop (image padded with 0, mask with 255), horizontal flip, colour jitter; ImageNet
normalisation; cross-entropy over the pixels whose mask is not 255; SGD with momentum, weight decay, the
head at 10x the learning rate, poly decay. Predictions use multi-scale + flip + dense CRF without the
Eq. 14 label filter (no image-level labels at test time) and accept a retrained segmenter or a WeakCLIP
refiner checkpoint; ``fmt="voc-test"`` lays them out for the PASCAL VOC evaluation server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from .checkpoints import FORMAT as REFINER_FORMAT
from .clip import IMAGENET_MEAN, IMAGENET_STD
from .config import Config, config_from_dict, dump_config
from .data.datasets import Sample, SegDataset, list_samples, preflight
from .data.transforms import TrainTransform
from .distributed import DistInfo, Shard, init_distributed, run_once
from .engine import LoopSpec, load_weights, poly, read_header, train_loop
from .errors import WeakclipError
from .fileio import write_text_atomic
from .infer import Predictor, refiner_from_checkpoint
from .jobs import INFERENCE_TIMEOUT, inference_fingerprint, write_label_maps
from .released import is_torch_archive
from .segmenters import Segmenter, build_segmenter

SEGMENTER_FORMAT = "segmenter"  # the "format" entry of a retrained segmenter's weights header
FORMATS = ("png", "voc-test")
# The PASCAL VOC evaluation server reads results/VOC2012/Segmentation/comp6_test_cls/<id>.png from the
# uploaded archive; comp6 is the competition for methods trained with data beyond VOC (ImageNet, CLIP).
VOC_TEST_DIR = Path("results", "VOC2012", "Segmentation", "comp6_test_cls")


def imagenet_normalize(images: Tensor) -> Tensor:
    """images (B, 3, H, W) uint8 RGB -> (B, 3, H, W) float32 normalised with the ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def split_samples(cfg: Config, split: str) -> list[Sample]:
    """The images of ``split`` in list order, without seeds, ground truth or image-level labels: neither
    retraining nor prediction needs labels, and test images have neither labels nor seeds."""
    return list_samples(cfg.data, split, need_seeds=False, need_labels=False)


# ------------------------------------------------------------------------------------------------ retrain


class OwnScaleTransform:
    """``TrainTransform`` with the random scale relative to each image's own size, as in the retraining
    recipe: (H, W) becomes (H r, W r), r ~ U(scale_range), then crop, flip, photometric distortion, pad.

    ``TrainTransform`` fits the rescaled image into (max(base) r, min(base) r); with base = the image's
    own (long, short) sides that is exactly the image scaled by r. No ``cat_max_ratio`` crop redraws.
    """

    def __init__(self, crop_size: int, scale_range: Sequence[float], ignore_index: int = 255) -> None:
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.ignore_index = ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """image (H, W, 3) uint8, label (H, W) uint8 -> (crop, crop, 3) and (crop, crop) uint8."""
        h, w = image.shape[:2]
        transform = TrainTransform(self.crop_size, (max(h, w), min(h, w)), self.scale_range,
                                   cat_max_ratio=1.0, ignore_index=self.ignore_index)
        return transform(image, label, rng)


def retrain_dataset(cfg: Config, masks_dir: Path, progress: bool = True) -> SegDataset:
    """The training split's images with ``masks_dir/<id>.png`` as labels, after a pre-flight check of every
    pair (mask present, same size as its image, values 0..K-1 or ``data.ignore_index``)."""
    samples = [dataclasses.replace(s, seed=masks_dir / f"{s.id}.png")
               for s in split_samples(cfg, cfg.data.split)]
    preflight(samples, cfg.num_classes, cfg.data.ignore_index, progress=progress)
    r = cfg.retrain
    transform = OwnScaleTransform(r.crop_size, r.scale_range, cfg.data.ignore_index)
    return SegDataset(samples, transform, cfg.num_classes, seed=cfg.train.seed, ignore_index=cfg.data.ignore_index)


def loop_spec(cfg: Config) -> LoopSpec:
    """Iterations and batch from ``retrain``; workers, seed, precision, checkpoints and logs from ``train``."""
    r, t = cfg.retrain, cfg.train
    return LoopSpec(iters=r.iters, batch_size=r.batch_size, workers=t.workers, seed=t.seed, amp=t.amp,
                    checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                    log_every=t.log_every)


def checkpoint_metadata(cfg: Config, masks_dir: Path) -> dict[str, str]:
    """Strings in every weights file's header: what tells a segmenter from a refiner checkpoint
    (``format``), its arch, the resolved config, the class names and the masks it was trained on."""
    return {"format": SEGMENTER_FORMAT, "arch": cfg.retrain.arch, "config": dump_config(cfg),
            "class_names": json.dumps(cfg.data.class_names), "masks": str(masks_dir.resolve())}


def segmentation_loss(ignore_index: int = 255) -> Callable[[nn.Module, dict], dict[str, Tensor]]:
    """``loss_fn(model, batch)`` for the engine: cross-entropy averaged over the pixels whose mask is not
    ``ignore_index`` (0, not NaN, for a batch without any; the engine would stop on NaN)."""

    def loss_fn(model: nn.Module, batch: dict) -> dict[str, Tensor]:
        logits = model(imagenet_normalize(batch["image"]))  # (B, K, H, W)
        target = batch["seed"]  # (B, H, W) int64
        total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        return {"total": total / (target != ignore_index).sum().clamp_min(1)}

    return loss_fn


def build_optimizer(model: Segmenter, cfg: Config) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay over the model's groups (pretrained part 1x, head 10x lr)."""
    r = cfg.retrain
    return torch.optim.SGD(model.param_groups(r.lr), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)


def retrain(cfg: Config, masks_dir: str | Path, output: str | Path, resume: bool = False,
            info: DistInfo | None = None) -> Path:
    """Train ``build_segmenter(cfg.retrain, K)`` on the training split's images with the pseudo masks
    ``masks_dir/<id>.png`` (255 ignored) into ``output``; returns the final weights' path.

    Under ``torchrun`` each process takes ``retrain.batch_size / world_size`` images per iteration.
    """
    info = info or init_distributed()
    masks_dir, output = Path(masks_dir), Path(output)
    if not masks_dir.is_dir():
        raise WeakclipError(f"{masks_dir}: pseudo-mask folder not found")
    torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
    model = build_segmenter(cfg.retrain, cfg.num_classes)  # first: a weights problem fails before preflight
    dataset = retrain_dataset(cfg, masks_dir, progress=info.is_main)
    if info.is_main:
        write_text_atomic(output / "config.yaml", dump_config(cfg))
    r = cfg.retrain
    return train_loop(model, dataset, segmentation_loss(cfg.data.ignore_index), build_optimizer(model, cfg),
                      poly(r.lr, r.iters, r.poly_power), loop_spec(cfg), output, info, resume=resume,
                      metadata=checkpoint_metadata(cfg, masks_dir))


# ------------------------------------------------------------------------------------------------ predict


def load_segmenter(cfg: Config, checkpoint: Path, header: dict[str, str]) -> Segmenter:
    """Build the segmenter a ``weakclip retrain`` checkpoint was trained as (arch and encoder from its
    header) and load its weights; its classes must be ``cfg``'s."""
    classes = json.loads(header["class_names"])
    if classes != list(cfg.data.class_names):
        raise WeakclipError(f"{checkpoint}: trained on {len(classes)} classes ({', '.join(classes[:3])}, ...), "
                            f"the config has {cfg.num_classes} ({', '.join(cfg.data.class_names[:3])}, ...)")
    trained = config_from_dict(yaml.safe_load(header["config"])).retrain
    # The checkpoint holds every weight: never fetch or read the initial ImageNet weights here.
    model = build_segmenter(dataclasses.replace(trained, encoder_weights=None, backbone_file=None), len(classes))
    load_weights(checkpoint, model)
    return model


def segmenter_predictor(model: Segmenter, device: torch.device, precision: str = "fp32") -> Predictor:
    """A segmenter as a Predictor: uint8 images, ImageNet-normalised here; fp32, or "bf16" autocast."""
    model.to(device).eval()

    def predict(images: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(imagenet_normalize(images))

    return predict


def load_predictor(cfg: Config, checkpoint: str | Path, device: torch.device
                   ) -> tuple[Predictor, nn.Module, Config]:
    """A Predictor, its model and the run config with the inference settings it runs with, from a
    retrained-segmenter or a WeakCLIP refiner checkpoint, told apart by the header. A released ``.pth`` is a
    refiner; for refiners ``infer.view_resize`` "auto" is resolved, and the model's outputs are ``cfg``'s
    classes first (:func:`weakclip.checkpoints.load_refiner`). ``cfg`` is not changed."""
    checkpoint = Path(checkpoint)
    if is_torch_archive(checkpoint):
        kind = REFINER_FORMAT
    else:
        header = read_header(checkpoint)
        kind = header.get("format")
    if kind == SEGMENTER_FORMAT:
        model = load_segmenter(cfg, checkpoint, header)
        return segmenter_predictor(model, device, cfg.infer.precision), model, cfg
    if kind == REFINER_FORMAT:
        predictor, model, used = refiner_from_checkpoint(cfg, checkpoint, device)
        return predictor, model, dataclasses.replace(cfg, infer=used.infer)
    raise WeakclipError(f"{checkpoint}: not written by `weakclip retrain` or `weakclip train` "
                        f"(header format {kind!r}, expected '{SEGMENTER_FORMAT}' or '{REFINER_FORMAT}')")


def _voc_test_layout(labels_dir: Path, ids: Sequence[str], output: Path) -> Path:
    """Link (else copy) ``labels_dir/<id>.png`` to ``output/VOC_TEST_DIR/<id>.png``, holding nothing else
    (a folder inside ``output``, whose manifest says that predict wrote it)."""
    dest = output / VOC_TEST_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():  # a rerun may have another split or checkpoint: only this run's maps stay
        old.unlink()
    for image_id in ids:
        src, dst = labels_dir / f"{image_id}.png", dest / f"{image_id}.png"
        try:
            os.link(src, dst)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, dst)
    return dest


def predict(cfg: Config, checkpoint: str | Path, split: str, output: str | Path, fmt: str = "png",
            shard: Shard | None = None, info: DistInfo | None = None, reset: bool = False) -> dict | None:
    """Label maps of ``split`` with ``cfg.infer`` (multi-scale + flip, sliding windows, dense CRF when
    ``infer.crf``), no label filter. Resumable and shardable (see ``write_label_maps``): under torchrun
    every rank calls it; listing and hashing run on rank 0 only.

    ``fmt="png"``: ``output/<id>.png`` (VOC-palette PNGs, ready for ``weakclip evaluate``).
    ``fmt="voc-test"``: ``output/results/VOC2012/Segmentation/comp6_test_cls/<id>.png`` and nothing else
    there (archive ``results/`` for the evaluation server), laid out once every image is done; the
    resumable working copy stays in ``output/labels``. ``output`` is an output folder of ``weakclip
    predict`` (see :class:`~weakclip.jobs.OutputFolder`; ``reset`` discards predictions made there with
    other settings). Returns {"output", "written", "skipped", "missing"} on the main process, None on the
    others.
    """
    if fmt not in FORMATS:
        raise WeakclipError(f"predict: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    output = Path(output)
    info = info or init_distributed(INFERENCE_TIMEOUT)
    samples = run_once(lambda: split_samples(cfg, split), info)
    predictor, model, cfg = load_predictor(cfg, checkpoint, info.device)
    maps_dir = "labels" if fmt == "voc-test" else "."
    fingerprint = run_once(lambda: inference_fingerprint(cfg, checkpoint, model, samples, use_labels=False), info)
    summary = write_label_maps(
        predictor, samples, output, cfg.infer, info, {**fingerprint, "format": fmt},
        use_labels=False, crf_params=cfg.infer.crf_params if cfg.infer.crf else None,
        ignore_index=cfg.data.ignore_index, desc="predict", shard=shard, command="predict", reset=reset,
        maps_dir=maps_dir, other_outputs=(str(VOC_TEST_DIR.parts[0]), "config.yaml"), num_classes=cfg.num_classes,
    )
    if not info.is_main:
        return None
    write_text_atomic(output / "config.yaml", dump_config(cfg))
    if fmt == "voc-test" and not summary["missing"]:
        summary["output"] = str(_voc_test_layout(output / maps_dir, [s.id for s in samples], output))
    return summary
