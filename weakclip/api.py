"""The Python API: the code the ``weakclip`` commands run, one image at a time or one stage at a time.

- :class:`Refiner`: a trained refiner (a ``weakclip train`` checkpoint, a released ``.pth``, or a folder or
  Hugging Face Hub repository written by :meth:`Refiner.save_pretrained`); :meth:`Refiner.refine` gives the
  label map ``weakclip pseudo-masks`` writes for the image, byte for byte, with the same settings.
- :class:`ClipES`: CLIP-ES seeds from image-level labels; :meth:`ClipES.seed` gives the seed
  ``weakclip seeds`` writes.
- :func:`load_config` and the stages :func:`train`, :func:`pseudo_masks`, :func:`seeds`, :func:`evaluate`:
  the commands as functions that return paths and summaries.

Images are a path (decoded as the commands decode it: converted to RGB), a PIL image in mode RGB, or an
(H, W, 3) uint8 RGB array. Labels are foreground class names or indices (1..K-1, background excluded).
Nothing here changes the objects passed to it. Bad input raises :class:`~weakclip.errors.WeakclipError`
with one line naming the input and the problem.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch import Tensor

from .config import Config, dump_config, with_overrides
from .config import load_config as _load_config
from .errors import WeakclipError
from .fileio import write_text_atomic

if TYPE_CHECKING:
    from PIL import Image

    from .infer import Predictor

ImageLike = Union[str, "os.PathLike[str]", "Image.Image", np.ndarray]
LabelsLike = Sequence[Union[int, str]]
ConfigLike = Union[Config, str, "os.PathLike[str]"]

WEIGHTS = "model.safetensors"  # the files a save_pretrained folder (or hub repository) holds
CONFIG = "config.yaml"
MODEL_CARD = "README.md"

__all__ = ["ClipES", "Refined", "Refiner", "Seed", "evaluate", "load_config", "pseudo_masks", "seeds", "train"]


# ------------------------------------------------------------------------------------------------- input


def load_config(name_or_path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """A shipped config by name (``"voc"``, see ``weakclip configs``) or a YAML file, with ``key=value``
    ``overrides`` applied (as ``--set``), e.g. ``load_config("voc", ["data.root=/data/VOC2012"])``."""
    return _load_config(str(name_or_path), list(overrides))


def _config(config: ConfigLike, overrides: Sequence[str] = ()) -> Config:
    """A private copy of ``config`` (a Config, a shipped name or a YAML file) with ``overrides`` applied."""
    if isinstance(config, Config):
        return with_overrides(config, list(overrides)) if overrides else copy.deepcopy(config)
    return load_config(config, overrides)


def _device(device: torch.device | str | None) -> torch.device:
    """``device``, or the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_image(image: ImageLike) -> np.ndarray:
    """``image`` as (H, W, 3) uint8 RGB, values 0..255.

    A path is decoded as the commands decode images (grayscale and palette files converted to RGB); a PIL
    image must be in mode RGB and an array (H, W, 3) uint8: anything else (grayscale, RGBA, float) is an
    error rather than a guess at what its values mean.
    """
    from PIL import Image

    from .data.datasets import load_image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise WeakclipError(f"image: a PIL image in mode {image.mode}, expected RGB (use image.convert('RGB'))")
        return np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise WeakclipError(f"image: an array of shape {tuple(image.shape)} and dtype {image.dtype}, expected "
                                f"(H, W, 3) uint8 RGB")
        return np.ascontiguousarray(image)
    raise WeakclipError(f"image: a {type(image).__name__}, expected a path, a PIL image or an (H, W, 3) uint8 array")


def class_indices(labels: LabelsLike, class_names: Sequence[str]) -> list[int]:
    """Foreground class names or indices -> distinct indices in 1..K-1, in the given order."""
    if isinstance(labels, (str, int)):
        labels = [labels]
    out = []
    for label in labels:
        if isinstance(label, str):
            if label not in class_names[1:]:
                raise WeakclipError(f"labels: unknown class name {label!r} (the foreground classes are "
                                    f"{', '.join(class_names[1:])})")
            index = list(class_names).index(label)
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            index = int(label)
            if not 1 <= index < len(class_names):
                raise WeakclipError(f"labels: class index {index} is outside the foreground classes "
                                    f"1..{len(class_names) - 1}")
        else:
            raise WeakclipError(f"labels: {label!r} is neither a class name nor a class index")
        if index not in out:
            out.append(index)
    return out


# ----------------------------------------------------------------------------------------------- refiner


@dataclasses.dataclass(frozen=True)
class Refined:
    """One image refined as by ``weakclip pseudo-masks``.

    mask: (H, W) uint8 class indices; ``data.ignore_index`` (255) where the label filter marks a pixel
        unknown (its best class is not among the image's labels).
    probs: (len(classes), H, W) float32 in [0, 1]: the multi-scale probabilities of the kept classes,
        renormalised to sum to 1 at every pixel where they do not all underflow (the dense CRF's input, as
        ``--save-probs`` keeps it).
    classes: the class index of each channel of ``probs``, background (0) first.
    """

    mask: np.ndarray
    probs: np.ndarray
    classes: tuple[int, ...]


def _load_refiner(cfg: Config, checkpoint: Path, device: torch.device) -> tuple[Predictor, torch.nn.Module, Config]:
    """The one place the API loads a refiner: the commands' own loader (``cfg`` is not changed). Returns the
    predictor, the model and the config that describes it (the checkpoint's model section and classes: the
    config's first, then any more the checkpoint has)."""
    from .infer import refiner_from_checkpoint

    return refiner_from_checkpoint(cfg, checkpoint, device)


def _stored_config(checkpoint: Path) -> Config:
    """The config a weakclip checkpoint stores, or the shipped ``voc`` config for a released ``.pth``."""
    from .checkpoints import stored_config
    from .released import is_torch_archive

    if is_torch_archive(checkpoint):
        return load_config("voc")
    return stored_config(checkpoint)[0]


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The local folder of Hugging Face Hub repository ``repo_id`` through huggingface_hub's cache (its
    offline mode, ``HF_HUB_OFFLINE=1``, reads the cache alone)."""
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                   allow_patterns=[WEIGHTS, CONFIG, MODEL_CARD])
    except Exception as exc:  # noqa: BLE001 - the hub's errors differ between its versions
        first = str(exc).splitlines()[0] if str(exc) else "no answer"
        raise WeakclipError(f"{repo_id}: not a local path, and not found on the Hugging Face Hub or in its cache "
                            f"({type(exc).__name__}: {first})") from None
    return Path(folder)


def _pretrained_folder(source: str | os.PathLike[str], revision: str | None,
                       cache_dir: str | os.PathLike[str] | None) -> Path:
    """A save_pretrained folder: ``source`` itself when it is a local folder, else a hub repository's."""
    path = Path(source)
    if path.is_dir():
        folder = path
    elif path.exists() or os.path.isabs(source) or str(source).count("/") != 1:
        raise WeakclipError(f"{source}: not a folder written by save_pretrained, nor a hub id (owner/name)")
    else:
        folder = _hub_snapshot(str(source), revision, cache_dir)
    if not (folder / WEIGHTS).is_file():
        raise WeakclipError(f"{folder}: no {WEIGHTS} (not a folder written by save_pretrained)")
    return folder


class Refiner:
    """A trained WeakCLIP refiner: multi-scale x flip sliding-window probabilities, the Eq. 14 label filter
    and the dense CRF, as ``weakclip pseudo-masks`` runs them (settings: ``config.infer``).

    Build one with :meth:`from_checkpoint` or :meth:`from_pretrained`; :meth:`refine` refines an image,
    :meth:`refine_many` a stream of them, :meth:`logits` runs the network alone, :meth:`save_pretrained`
    writes a folder that :meth:`from_pretrained` reads anywhere.

    Attributes:
        config: the config that runs (model and inference settings, the checkpoint's classes: the run
            config's first); a copy, never the caller's.
        model: the WeakCLIP network (eval mode, on ``device``).
        device: where the network runs.
        checkpoint: the weights file it was loaded from.
    """

    def __init__(self, predict: Predictor, model: torch.nn.Module, config: Config, device: torch.device,
                 checkpoint: Path, live: int | None = None):
        self._predict = predict
        # The run config's classes lead the model's outputs; others (a released COCO checkpoint's dead
        # slots) are never written: pixels they win become ignore_index, as in pseudo-masks.
        self._live = live or len(config.data.class_names)
        self.model = model
        self.config = config
        self.device = device
        self.checkpoint = checkpoint

    def __repr__(self) -> str:
        return (f"Refiner({self.checkpoint}, {len(self.class_names)} classes, CLIP "
                f"{self.config.model.clip.model}, device={self.device})")

    @property
    def class_names(self) -> list[str]:
        """The run config's class names, background first (index 0): the indices masks are written in."""
        return list(self.config.data.class_names[: self._live])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], config: ConfigLike | None = None,
                        device: torch.device | str | None = None, overrides: Sequence[str] = ()) -> Refiner:
        """Load a refiner as ``weakclip pseudo-masks --checkpoint path`` does.

        Args:
            path: a ``weakclip train`` or ``convert-checkpoint`` checkpoint (.safetensors), an authors'
                released ``.pth``, or a folder written by :meth:`save_pretrained`.
            config: the run config (a Config, a shipped name or a YAML file); by default the one the
                checkpoint stores (a save_pretrained folder: its config.yaml; a released ``.pth``: ``voc``).
                The model is always built as the checkpoint was trained; the config gives the inference
                settings, the data section and the CLIP weights file when the checkpoint does not hold them.
            device: where the network runs (default: the GPU when there is one, else the CPU).
            overrides: ``key=value`` settings applied to the config, as ``--set``.
        """
        path = Path(path)
        if path.is_dir():
            if config is None and (path / CONFIG).is_file():
                config = path / CONFIG
            path = path / WEIGHTS
        if not path.is_file():
            raise WeakclipError(f"{path}: checkpoint not found")
        cfg = _config(_stored_config(path) if config is None else config, overrides)
        device = _device(device)
        predict, model, used = _load_refiner(cfg, path, device)
        return cls(predict, model, used, device, path, live=cfg.num_classes)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike[str], config: ConfigLike | None = None,
                        device: torch.device | str | None = None, overrides: Sequence[str] = (),
                        revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Refiner:
        """Load a folder written by :meth:`save_pretrained`, or a Hugging Face Hub repository holding one
        (``"owner/name"``, fetched through huggingface_hub into its cache; ``HF_HUB_OFFLINE=1`` reads the
        cache alone). ``revision``: a branch, tag or commit of the repository; ``cache_dir``: the hub cache
        (default: huggingface_hub's, ``HF_HUB_CACHE``). Other arguments as :meth:`from_checkpoint`."""
        folder = _pretrained_folder(source, revision, cache_dir)
        return cls.from_checkpoint(folder, config, device, overrides)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """The network alone: images (B, 3, h, w) uint8 RGB -> logits (B, K, h', w') float32 (at the
        network's output stride), one window, no view averaging."""
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise WeakclipError(f"images: a tensor of shape {tuple(images.shape)} and dtype {images.dtype}, "
                                f"expected (B, 3, h, w) uint8")
        return self._predict(images.to(self.device)).float()

    @torch.no_grad()
    def refine(self, image: ImageLike, labels: LabelsLike | None = None) -> Refined:
        """The pseudo mask of one image, equal to what ``weakclip pseudo-masks`` writes for it.

        Args:
            image: a path, a PIL RGB image or an (H, W, 3) uint8 RGB array.
            labels: the image's foreground classes (names or indices). With ``infer.label_filter`` on (the
                default) the CRF keeps background and these classes, and pixels whose best class is
                another one become ``data.ignore_index``; without labels, or with the filter off, the
                classes present in the argmax are kept (as at test time).
        Returns:
            :class:`Refined`: mask (H, W) uint8, probs (C, H, W) float32, classes (C,).
        """
        from .infer import crf_inputs, finish_label_map, multiscale_probs

        rgb = read_image(image)
        cfg = self.config
        keep = class_indices(labels, self.class_names) if labels is not None else None
        probs = multiscale_probs(self._predict, rgb, cfg.infer, self.device)
        kept, keys, unknown = crf_inputs(probs, keep if cfg.infer.label_filter else None, self._live)
        kept = kept.cpu().numpy().astype(np.float32)
        mask = finish_label_map(kept, keys, rgb, unknown.cpu().numpy(),
                                cfg.infer.crf_params if cfg.infer.crf else None, cfg.data.ignore_index)
        return Refined(mask=mask, probs=kept, classes=tuple(keys))

    def refine_many(self, images: Iterable[ImageLike], labels: Iterable[LabelsLike | None] | None = None
                    ) -> Iterator[Refined]:
        """:meth:`refine` over ``images`` (with one labels entry per image, or none), yielded in order as each
        is done; windows go through the network ``infer.batch_size`` at a time across each image's views."""
        labels = labels if labels is not None else itertools.repeat(None)
        for image, image_labels in zip(images, labels):
            yield self.refine(image, image_labels)

    def save_pretrained(self, folder: str | os.PathLike[str], metrics: dict[str, float] | None = None) -> Path:
        """Write ``folder`` for :meth:`from_pretrained` (or a Hugging Face Hub upload, e.g.
        ``huggingface_hub.upload_folder``): ``model.safetensors`` (the weights a ``weakclip train`` checkpoint
        holds, its config in the header; a released model's CLIP weights too), ``config.yaml`` and a model
        card ``README.md`` (classes, backbone, CLIP weights' identity, training settings, seeds' source, the
        inference protocol and ``metrics`` when given, e.g. {"pseudo-mask mIoU (VOC train)": 0.74}).
        Returns the folder."""
        from .checkpoints import checkpoint_metadata
        from .engine import save_weights

        folder = Path(folder)
        save_weights(folder / WEIGHTS, self.model, checkpoint_metadata(self.config))
        # The weights' header names every output; config.yaml, the run config, only the classes written.
        run = dataclasses.replace(self.config, data=dataclasses.replace(self.config.data, class_names=self.class_names))
        write_text_atomic(folder / CONFIG, dump_config(run))
        write_text_atomic(folder / MODEL_CARD, model_card(self.config, self.model, metrics))
        return folder


def model_card(cfg: Config, model: torch.nn.Module, metrics: dict[str, float] | None = None) -> str:
    """The README.md of a save_pretrained folder: what ``model`` (built from ``cfg``) is, what made it and
    how it infers."""
    from .checkpoints import clip_weights_identity

    m, t, i, d = cfg.model, cfg.train, cfg.infer, cfg.data
    clip = m.clip.model if m.clip.arch is None else f"{m.clip.model} (custom architecture, see config.yaml)"
    seeds = ("CLIP-ES from the image-level labels (`weakclip seeds`, settings in config.yaml `seeds`)"
             if d.seeds_from == "clip-es" else f"files (`data.seeds_dir`: {d.seeds_dir})")
    lines = [
        "---", "library_name: weakclip", "tags:", "- weakly-supervised-semantic-segmentation", "- clip", "---", "",
        f"# WeakCLIP refiner: {cfg.name}", "",
        "Refines CAM seeds into pseudo masks for weakly-supervised semantic segmentation with a frozen CLIP.", "",
        "```python", "import weakclip", "", 'refiner = weakclip.Refiner.from_pretrained("<this folder or hub id>")',
        'refined = refiner.refine("image.jpg", labels=[...])  # refined.mask: (H, W) uint8', "```", "",
        "## Model", "",
        f"- classes ({len(d.class_names)}, background first): {', '.join(d.class_names)}",
        f"- CLIP: {clip}; image backbone {type(model.visual).__name__} (`{m.backbone.type}`), taps "
        f"{getattr(model.visual, 'taps', m.backbone.taps)}; released mode: {m.released}",
        f"- CLIP weights: {clip_weights_identity(m.clip)}",
        f"- co-attention: `{m.co_attention.type}`; learnable prompts: {m.learnable_prompts} ({m.n_ctx} tokens); "
        f"decoder channels: {m.decoder_channels}",
        "", "## Training", "",
        f"- seeds: {seeds}",
        f"- {t.iters} iterations, batch {t.batch_size}, lr {t.lr}, weight decay {t.weight_decay}, crop {t.crop_size}, "
        f"seed {t.seed}",
        "", "## Inference protocol", "",
        f"- views: scales {i.scales} of a {i.short_side}-pixel short side, flip {i.flip}, resized with "
        f"`{i.view_resize}`; sliding {i.crop_size}-pixel windows, stride {i.stride}; probabilities averaged",
        f"- label filter (Eq. 14, image-level labels): {i.label_filter}; dense CRF: {i.crf}"
        + (f" ({dataclasses.asdict(i.crf_params)})" if i.crf else ""),
        f"- unknown pixels: {d.ignore_index}",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|",
                  *(f"| {name} | {value} |" for name, value in metrics.items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ CLIP-ES


@dataclasses.dataclass(frozen=True)
class Seed:
    """One image's CLIP-ES seed, as ``weakclip seeds`` writes it.

    mask: (H, W) uint8 class indices; ``data.ignore_index`` (255) where the dense CRF is not confident.
    cams: (len(classes), H, W) float16 in [0, 1], one min-max normalised CAM per label.
    classes: the class index of each CAM, in the order the labels were given.
    """

    mask: np.ndarray
    cams: np.ndarray
    classes: tuple[int, ...]


class ClipES:
    """CLIP-ES seeds (frozen CLIP, no training) from image-level labels, with the ``seeds`` settings of a
    config, as ``weakclip seeds`` makes them. Build one with :meth:`from_config`; :meth:`seed` seeds an image.

    Attributes:
        config: the config that runs (a copy); ``method``: the per-image CLIP-ES method.
    """

    def __init__(self, method, config: Config):
        self.method = method
        self.config = config

    @classmethod
    def from_config(cls, config: ConfigLike, device: torch.device | str | None = None,
                    overrides: Sequence[str] = ()) -> ClipES:
        """CLIP-ES with ``config``'s CLIP (``model.clip``), classes and ``seeds`` settings (a Config, a shipped
        name or a YAML file, with ``--set``-style ``overrides``); ``device`` as :meth:`Refiner.from_checkpoint`."""
        from .clip import load_clip
        from .clip_es import ClipES as Method

        cfg = _config(config, overrides)
        return cls(Method(load_clip(cfg.model.clip), cfg.data.class_names, cfg.seeds, _device(device)), cfg)

    def seed(self, image: ImageLike, labels: LabelsLike) -> Seed:
        """The seed of one image from its foreground ``labels`` (names or indices, at least one), equal to
        what ``weakclip seeds`` writes for it. Returns :class:`Seed`: mask (H, W) uint8, cams (K, H, W)
        float16, classes (K,)."""
        from .clip_es import make_seed

        rgb = read_image(image)
        keep = class_indices(labels, self.config.data.class_names)
        mask, cams = make_seed(self.method, rgb, keep, self.config.data.ignore_index)
        return Seed(mask=mask, cams=cams, classes=tuple(keep))


# ------------------------------------------------------------------------------------------------- stages


def train(config: ConfigLike, output: str | os.PathLike[str], resume: bool = False, reset: bool = False) -> Path:
    """``weakclip train``: train the refiner of ``config`` into the run folder ``output`` (checkpoints, logs,
    resolved config); ``resume`` continues from its newest checkpoint; ``reset`` discards seeds made there
    (``data.seeds_from: clip-es``) with other settings. Returns the final weights' path."""
    from .train import train as run

    return run(_config(config), output, resume=resume, reset=reset)


def pseudo_masks(config: ConfigLike, checkpoint: str | os.PathLike[str], output: str | os.PathLike[str],
                 split: str | None = None, save_probs: bool = False, reset: bool = False) -> dict:
    """``weakclip pseudo-masks``: the refiner's label maps of ``split`` (default ``data.split``) into
    ``output`` (resumable; a folder written with other settings is refused unless ``reset``). Returns
    {"output", "written", "skipped", "missing"}; under torchrun, ranks other than 0 get {}."""
    from .jobs import pseudo_masks as run

    return run(_config(config), checkpoint, output, split=split, save_probs=save_probs, reset=reset) or {}


def seeds(config: ConfigLike, output: str | os.PathLike[str], split: str | None = None,
          save_cams: bool = False, reset: bool = False) -> dict:
    """``weakclip seeds``: CLIP-ES seeds of ``split`` (default ``data.split``) into ``output``, usable as
    ``data.seeds_dir`` (a folder written with other settings is refused unless ``reset``). Returns
    {"output", "written", "skipped", "missing"}; other ranks get {}."""
    from .seeds import write_seeds

    return write_seeds(_config(config), output, split=split, keep_cams=save_cams, reset=reset) or {}


def evaluate(config: ConfigLike, pred: str | os.PathLike[str], gt: str | os.PathLike[str],
             ids: Sequence[str] | None = None, progress: bool = False) -> dict:
    """``weakclip evaluate``: score the label PNGs in ``pred`` against ``gt`` (the listed ``ids``, else every
    prediction) with ``config``'s classes. Returns {"miou" (percent, 0..100), "per_class", "pixel_accuracy",
    ...} as ``--json`` writes it (NaN as None)."""
    from .metrics import evaluate_dirs

    cfg = _config(config)
    result = evaluate_dirs(pred, gt, cfg.data.class_names, ids=ids, ignore_index=cfg.data.ignore_index,
                           progress=progress)
    return result.to_json_dict()
