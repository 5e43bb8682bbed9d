"""Every refiner checkpoint, read, written, converted and identified in one place.

Kinds: a ``weakclip train`` checkpoint (safetensors; its header stores the config it was trained with, its
class names and the identity of the CLIP weights under it), a converted or self-contained one
(``model.clip.in_checkpoint``: CLIP's weights are inside), and the authors' released ``.pth`` (mmcv
``state_dict`` + ``meta``, converted on the fly by :mod:`weakclip.released`). CLIP weights files in every
format are read by :func:`weakclip.clip.load_clip`.

:func:`load_refiner` returns the model and the config that describes it, and never changes its arguments.
Classes are matched by name at this boundary: the model is built with the classes it was trained with (a
released COCO checkpoint keeps its 91 category-id slots, 10 of them dead), then its class-dependent
weights are permuted so that output channel ``i`` is the run config's class ``i`` for every class the
config lists, the checkpoint's other classes following. Softmax over all the checkpoint's classes is
unchanged by the permutation, so probabilities are the released forward's, and every consumer (label
filter, CRF, written maps, training seeds) works in the config's contiguous class indices.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml

from .clip import RANDOM_CLIP_SEED, load_clip, weights_file
from .config import ClipConfig, Config, config_from_dict, dump_config, flatten
from .data.datasets import COCO_CATEGORY_IDS
from .engine import load_weights, read_header, save_weights
from .errors import WeakclipError, warn
from .fileio import file_sha256
from .model import WeakCLIP, build_model
from .released import convert_state_dict, is_torch_archive, meta_class_names, read_released, released_config

FORMAT = "weakclip"  # the "format" entry of a refiner checkpoint's header

# The 10 COCO category ids without annotations, named as in the released COCO checkpoints' 91-slot list.
COCO_DEAD_SLOTS = {12: "street sign", 26: "hat", 29: "shoe", 30: "eye glasses", 45: "plate", 66: "mirror",
                   68: "window", 69: "desk", 71: "door", 83: "blender"}

# Model settings that shape the trained weights (with the CLIP architecture: model.clip.arch, else
# model.clip.model): a run config must agree with the checkpoint on these.
ARCHITECTURE_KEYS = (
    "learnable_prompts", "n_ctx", "name_length", "pyramid_adapter", "co_attention.type",
    "co_attention.width", "co_attention.heads", "co_attention.layers", "text_guided_decoder", "decoder_channels",
)


# ----------------------------------------------------------------------------------------- identity


def clip_weights_identity(clip: ClipConfig) -> str:
    """Which CLIP weights a model runs with: a local file's sha256, an open_clip tag, the fixed random init, or
    the refiner checkpoint itself (released checkpoints carry their CLIP: the checkpoint's sha256 names it)."""
    if clip.in_checkpoint:
        return "stored in the checkpoint"
    if clip.pretrained is None:
        return f"random init (seed {RANDOM_CLIP_SEED})"
    path = weights_file(clip.pretrained)
    if path is not None and not path.is_file():
        raise WeakclipError(f"{path}: CLIP weights file not found")
    return f"sha256 {file_sha256(path)}" if path is not None else f"open_clip tag {clip.pretrained}"


def checkpoint_metadata(cfg: Config) -> dict[str, str]:
    """Strings stored in every refiner checkpoint's header: the resolved config, the class names and the
    identity of the CLIP weights the model was trained with (:func:`clip_weights_identity`)."""
    return {"format": FORMAT, "config": dump_config(cfg), "class_names": json.dumps(cfg.data.class_names),
            "clip_weights": clip_weights_identity(cfg.model.clip)}


# ---------------------------------------------------------------------------------------------- classes


def class_order(trained: list[str], wanted: list[str], source: str) -> list[int]:
    """The checkpoint's class index of each of ``wanted`` (the config's classes), then its other classes in
    their order: a permutation of ``range(len(trained))``. Refused in one line, naming the classes the
    checkpoint lacks, unless every wanted name is one of the checkpoint's."""
    if trained == wanted:
        return list(range(len(trained)))
    missing = [n for n in wanted if n not in trained]
    if missing:
        raise WeakclipError(
            f"{source}: trained on {len(trained)} classes ({', '.join(trained[:3])}, ...), the config has "
            f"{len(wanted)} ({', '.join(wanted[:3])}, ...); not in the checkpoint: {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    slots = [trained.index(n) for n in wanted]
    taken = set(slots)
    return slots + [i for i in range(len(trained)) if i not in taken]


@torch.no_grad()
def reorder_classes(model: WeakCLIP, order: list[int]) -> None:
    """Permute ``model``'s classes in place to ``order`` (new class i = old class ``order[i]``): the class
    names, their prompt tokens, the head's classifier rows and the score-map columns of the neck's laterals.
    The forward's outputs are permuted the same way (no class-dependent step mixes classes by position)."""
    k = model.num_classes
    if sorted(order) != list(range(k)):
        raise ValueError(f"not a permutation of {k} classes: {order}")
    if order == list(range(k)):
        return
    idx = torch.tensor(order)
    model.class_names = [model.class_names[i] for i in order]
    model.text.tokens = model.text.tokens[idx.to(model.text.tokens.device)]
    model.text.eot_index = model.text.eot_index[idx.to(model.text.eot_index.device)]
    if model.head is not None:
        classifier = model.head.classifier
        classifier.weight.copy_(classifier.weight[idx])
        classifier.bias.copy_(classifier.bias[idx])
    if model.neck is not None:
        for level in model.neck.score_levels:
            weight = model.neck.lateral[level].weight
            c = weight.shape[1] - k
            weight[:, c:] = weight[:, c:][:, idx].clone()


def released_class_names(meta: dict, num_slots: int, base: Config, source: str) -> list[str]:
    """The class names a released checkpoint was trained with: its meta's ``CLASSES``; without them, a
    91-slot checkpoint under an 81-class config is the released COCO label space (slot = category id,
    the config's names at their ids, the dead ids named as released); else the config's own names."""
    names = meta_class_names(meta)
    if names is not None:
        if len(names) != num_slots:
            raise WeakclipError(f"{source}: its meta lists {len(names)} classes but the model has {num_slots}")
        return names
    config = list(base.data.class_names)
    if num_slots == 1 + max(COCO_CATEGORY_IDS) and len(config) == 1 + len(COCO_CATEGORY_IDS):
        slots = [COCO_DEAD_SLOTS.get(i, "") for i in range(num_slots)]
        slots[0] = config[0]
        for contiguous, category in enumerate(COCO_CATEGORY_IDS, start=1):
            slots[category] = config[contiguous]
        return slots
    if len(config) != num_slots:
        raise WeakclipError(f"{source}: the checkpoint has {num_slots} classes and no class names (meta CLASSES), "
                            f"the config lists {len(config)} (data.class_names): pick the config it was trained "
                            f"with")
    return config


# --------------------------------------------------------------------------------------------- released


def load_released(path: str | Path, base: Config, **heads: int | None):
    """(model, config, conversion) for a released ``.pth``: converted in memory, built in released mode with
    the classes it was trained with (:func:`released_class_names`), weights loaded; ``base`` is not changed.
    ``heads``: ``vision_heads``, ``text_heads``, ``coattn_heads`` (see :func:`weakclip.released.convert_state_dict`).
    """
    state, meta = read_released(path)
    conversion = convert_state_dict(state, str(path), **heads)
    names = released_class_names(meta, conversion.model["num_classes"], base, str(path))
    cfg = released_config(base, conversion, names)
    model = build_model(cfg.model, cfg.data.class_names, load_clip(cfg.model.clip, from_checkpoint=True))
    model.load_weakclip_state_dict(conversion.state, str(path))
    return model, cfg, conversion


def convert_checkpoint(src: str | Path, dst: str | Path, base: Config, **heads: int | None) -> dict:
    """``weakclip convert-checkpoint``: a released ``.pth`` -> a weakclip safetensors checkpoint.

    The written file stores the derived config (:func:`load_refiner` rebuilds the model from it) with the
    checkpoint's own classes in its own order, the source's sha256 and the list of ignored official keys
    with their reasons. Returns a summary.
    """
    model, cfg, conversion = load_released(src, base, **heads)
    meta = {**checkpoint_metadata(cfg), "converted_from": Path(src).name, "source_sha256": file_sha256(src),
            "ignored_keys": json.dumps(conversion.ignored)}
    save_weights(Path(dst), model, meta)
    return {"output": str(dst), "mapped": len(conversion.mapping), "ignored": len(conversion.ignored),
            "ignored_reasons": sorted(set(conversion.ignored.values())), "classes": len(cfg.data.class_names),
            "source_sha256": meta["source_sha256"]}


# ---------------------------------------------------------------------------------------------- refiner


def _architecture(model: dict) -> dict:
    clip = model["clip"]
    flat = flatten(model, keep=("arch",))
    return {"clip.arch" if clip["arch"] else "clip.model": clip["arch"] or clip["model"],
            **{key: flat[key] for key in ARCHITECTURE_KEYS}}


def stored_config(checkpoint: Path) -> tuple[Config, dict[str, str]]:
    """The config stored in a refiner checkpoint's header, and the header."""
    header = read_header(checkpoint)
    if "config" not in header:
        raise WeakclipError(f"{checkpoint}: no config in its header (not a checkpoint written by weakclip train)")
    try:
        return config_from_dict(yaml.safe_load(header["config"])), header
    except (WeakclipError, yaml.YAMLError) as exc:
        raise WeakclipError(f"{checkpoint}: the config stored in it does not load ({exc})") from None


def _trained_model(checkpoint: Path, cfg: Config, clip_model: torch.nn.Module | None) -> tuple[WeakCLIP, Config]:
    """A weakclip checkpoint's model in its own class order, and the config it was trained with (CLIP from
    ``cfg`` unless the checkpoint holds it)."""
    trained, header = stored_config(checkpoint)
    class_order(trained.data.class_names, cfg.data.class_names, str(checkpoint))  # refuse before building
    if trained.model.clip.in_checkpoint:
        model = build_model(trained.model, trained.data.class_names,
                            load_clip(trained.model.clip, from_checkpoint=True))
        load_weights(checkpoint, model)
        return model, trained
    ours, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(trained.model)
    arch_ours, arch_theirs = _architecture(ours), _architecture(theirs)
    if arch_ours != arch_theirs:
        key = next(k for k in arch_theirs if arch_theirs[k] != arch_ours.get(k))
        where = key if key in arch_ours else "clip.arch" if key == "clip.model" else "clip.model"
        raise WeakclipError(f"{checkpoint}: trained with model.{key}={arch_theirs[key]!r}, the config has "
                            f"model.{where}={arch_ours[where]!r}")
    ours, theirs = flatten(ours, keep=("arch",)), flatten(theirs, keep=("arch",))
    differ = [k for k in theirs if k not in ("clip.pretrained", "clip.model", "clip.arch") and theirs[k] != ours.get(k)]
    if differ:
        warn(f"{checkpoint} was trained with " + ", ".join(f"model.{k}={theirs[k]!r}" for k in differ)
             + " (the config differs): the checkpoint's settings are used")
    clip = dataclasses.replace(trained.model.clip, pretrained=cfg.model.clip.pretrained)
    recorded = header.get("clip_weights")
    if clip_model is None and recorded is not None and recorded != (given := clip_weights_identity(clip)):
        raise WeakclipError(f"{checkpoint}: trained with CLIP weights {recorded}, the config's model.clip.pretrained "
                            f"gives {given}; pass the CLIP weights it was trained with")
    model_cfg = dataclasses.replace(trained.model, clip=clip)
    model = build_model(model_cfg, trained.data.class_names, clip_model)
    load_weights(checkpoint, model)
    return model, dataclasses.replace(trained, model=model_cfg)


def load_refiner(checkpoint: str | Path, cfg: Config, clip_model: torch.nn.Module | None = None
                 ) -> tuple[WeakCLIP, Config]:
    """(model, config used): the WeakCLIP model a checkpoint holds, with its weights, and ``cfg`` with the
    model section and class names that describe it. ``cfg`` is not changed.

    A ``weakclip train`` checkpoint is built from the config stored in it (settings, classes, architecture);
    the frozen CLIP's weights, which it does not hold, come from ``cfg.model.clip.pretrained`` (or
    ``clip_model``) and must be the ones it was trained with (sha256 recorded in its header). A run config
    whose architecture (``ARCHITECTURE_KEYS``) disagrees is refused in one line; other model settings that
    differ (taps, normalisation, ...) are the checkpoint's, with a warning. Self-contained checkpoints (a
    released ``.pth``, converted in memory in ``released`` mode; a converted one) run as they are, whatever
    the run config's model section.

    Classes: see the module docstring; the returned config's ``data.class_names`` are the model's, the
    config's own first (so ``num_classes`` may exceed the config's, by the checkpoint's other classes).
    """
    path = Path(checkpoint)
    if is_torch_archive(path):
        model, trained, _ = load_released(path, cfg)
    else:
        model, trained = _trained_model(path, cfg, clip_model)
    order = class_order(trained.data.class_names, cfg.data.class_names, str(path))
    reorder_classes(model, order)
    used = dataclasses.replace(cfg, model=trained.model,
                               data=dataclasses.replace(cfg.data, class_names=list(model.class_names)))
    return model, used
