"""Typed experiment configs: dataclasses, YAML files with one-level ``base`` inheritance, ``--set`` overrides.

Named configs live in ``weakclip/configs/<name>.yaml``; ``list_configs()`` lists them. A config file may say
``base: voc`` to start from another config and change only some fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import WeakclipError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


@dataclass
class ClipConfig:
    """Which CLIP to wrap. ``pretrained`` is an open_clip tag, a local file, or null (random init)."""

    model: str = "ViT-B-16"  # an open_clip model name: ViT-B-16, RN50, RN101, ... (open_clip.list_models())
    pretrained: str | None = "openai"
    # Custom architecture for open_clip.CLIP(**arch) (embed_dim, vision_cfg, text_cfg); overrides ``model``.
    arch: dict | None = None
    normalize: str = "clip"  # "clip" or "imagenet" (released)
    # The CLIP weights are stored in the refiner checkpoint itself (converted released checkpoints, whose
    # CLIP drifted during training): ``pretrained`` is ignored and checkpoints keep CLIP's weights too.
    in_checkpoint: bool = False


@dataclass
class BackboneConfig:
    """How the frozen CLIP image tower feeds WeakCLIP (``weakclip.backbones``, ``weakclip parts``)."""

    type: str = "auto"  # a registered backbone ("clip-vit", "clip-resnet"); auto: the one for CLIP's image tower
    # clip-vit: 1-based block indices whose outputs are tapped; null picks depth * (1/3, 1/2, 2/3, 1): 4, 6, 8, 12.
    # clip-resnet taps its four stages: leave null.
    taps: list[int] | None = None
    class_token_twice: bool = False  # clip-vit, released quirk: CLS input = 2 * class_embedding + pos[0]
    # clip-resnet's dense embeddings: "attention-pool" (released: every position's output of the attention
    # pool's full self-attention) or "maskclip" (MaskCLIP: each position's value and output projection alone).
    dense: str = "attention-pool"


@dataclass
class CoAttentionConfig:
    """Co-attention matching (Eq. 7-9; Table 8 alpha/beta initial value) (``weakclip.coattention``)."""

    type: str = "bidirectional"  # "bidirectional", "released" (one layer per direction, as released) or "none"
    width: int = 256
    heads: int = 4
    layers: int = 1
    dropout: float = 0.1
    alpha_init: float = 0.1
    beta_init: float = 0.1


@dataclass
class ModelConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    co_attention: CoAttentionConfig = field(default_factory=CoAttentionConfig)
    # Reproduce the released code's forward where ours differs on purpose: class token added twice,
    # ImageNet normalisation, sizes that are not a multiple of the patch truncated instead of padded,
    # released loss details (auxiliary CE over all pixels, boundary-CRF colours by corner-aligned zoom and
    # truncation). Its co-attention form is co_attention.type: released.
    released: bool = False
    # Text side (Table 4 row "learnable prompts", Table 5 N).
    learnable_prompts: bool = True
    n_ctx: int = 8
    ctx_init_std: float = 1.0  # released: trunc_normal std 1
    name_length: int = 5  # SOT + up to 3 BPE tokens + EOT, as released
    prompt_template: str = "a photo of a {}."  # used when learnable_prompts is false
    # Visual side.
    pyramid_adapter: bool = True
    train_adapter: bool = True  # false = released behaviour (adapter stays at random init)
    # Text-guided decoder: score map concatenated at all four levels (false: only at 1/16, as DenseCLIP).
    text_guided_decoder: bool = True
    decoder_channels: int = 256
    decoder_dropout: float = 0.1


@dataclass
class CRFConfig:
    """Dense-CRF kernel parameters: Gaussian (sxy, compat) and bilateral (sxy, srgb, compat)."""

    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iters: int = 10


# CLIP-ES's background words and class-name synonyms (released code, VOC lists; COCO in configs/coco.yaml).
CLIP_ES_VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign",
)
CLIP_ES_VOC_PROMPT_NAMES = {
    "bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
    "tvmonitor": "tvmonitor screen",
}


@dataclass
class SeedsConfig:
    """CLIP-ES seeds from image-level labels (``weakclip seeds``) on the frozen ``model.clip``."""

    released: bool = False  # true: the released code's numbers, its box-clamp and CRF-colour bugs included
    template: str = "a clean origami {}."
    # Class name -> the words its prompt uses (synonyms in one string, as released); others as named.
    prompt_names: dict[str, str] = field(default_factory=lambda: dict(CLIP_ES_VOC_PROMPT_NAMES))
    background: list[str] = field(default_factory=lambda: list(CLIP_ES_VOC_BACKGROUND))
    box_threshold: float = 0.4  # CAA boxes: CAM > threshold * max (released: 0.4 VOC, 0.7 COCO)
    caa_layers: int = 8  # attention of the last N blocks
    sinkhorn_iters: int = 3
    crf: bool = True
    crf_params: CRFConfig = field(default_factory=lambda: CRFConfig(1.0, 3.0, 67.0, 3.0, 4.0, 10))
    confidence: float = 0.95  # CRF confidence below this -> ignore (255)
    bg_power: float = 1.0  # without CRF: background score (1 - max CAM)^power
    # "fp32", "fp16" or "bf16": the CLIP model cast to it once (the released code runs fp16 on GPUs).
    precision: str = "fp32"
    crf_workers: int = 2


@dataclass
class LossConfig:
    seed_weight: float = 1.0
    boundary_weight: float = 1.0
    aux_weight: float = 0.4
    tau: float = 0.07
    size: int = 64  # seeding and boundary losses are computed at size x size
    crf_backend: str = "auto"  # "auto", "torch" or "pydensecrf"
    crf: CRFConfig = field(default_factory=CRFConfig)
    crf_image_classes_only: bool = False  # restrict the boundary CRF to background + the image's classes


@dataclass
class DataConfig:
    kind: str = "voc"  # "voc", "coco" or "folder"
    root: str = "data/VOCdevkit/VOC2012"
    split: str = "train_aug"  # list name (voc/coco: ImageSets/Segmentation/<split>.txt)
    images_dir: str = "JPEGImages"
    seeds_dir: str = "Seeds"
    # "files": train on the seeds in seeds_dir; "clip-es": `weakclip train` first makes CLIP-ES seeds from the
    # image-level labels into <output>/seeds (resumable) and trains on them.
    seeds_from: str = "files"
    gt_dir: str = "SegmentationClass"
    labels_file: str | None = "cls_labels.json"  # image-level labels, id -> classes (prepare-voc/-coco)
    labels_from_seeds: bool = False  # opt-in: labels = the seed's classes (a class the CAM missed is lost)
    val_split: str | None = None  # ground-truth split for periodic validation
    class_names: list[str] = field(default_factory=lambda: list(VOC_CLASSES))
    ignore_index: int = 255


@dataclass
class TrainConfig:
    iters: int = 20000
    batch_size: int = 16  # in total, over all processes
    crop_size: int = 512
    base_size: list[int] = field(default_factory=lambda: [2048, 512])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    lr: float = 1e-4
    weight_decay: float = 3e-5
    warmup_iters: int = 1500
    min_lr: float = 1e-6
    # "auto": bf16 on GPUs with native bf16, else fp32, and fp32 in released mode (as the released code trains);
    # "bf16" (the frozen CLIP towers held in bf16, the rest under autocast) or "fp32".
    amp: str = "auto"
    workers: int = 4
    seed: int = 504
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 20
    val_every: int = 0  # 0: no periodic validation
    # Initial weights: a weakclip checkpoint, or a released .pth (its own architecture, in released mode).
    init_from: str | None = None


@dataclass
class InferConfig:
    short_side: int = 512
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    flip: bool = True
    crop_size: int = 512
    stride: int = 341
    label_filter: bool = True  # Eq. 14: classes outside the image-level label become 255
    crf: bool = True
    crf_params: CRFConfig = field(
        default_factory=lambda: CRFConfig(3.0, 3.0, 83.0, 5.0, 3.0, 10)
    )
    # Windows per network call, across views and flips (speed and memory only); null: 2 on CPUs, on GPUs as
    # many as fit in half the free memory, up to 16.
    batch_size: int | None = None
    crf_workers: int | None = None  # CRF processes; null: the cores available to the process but one
    save_probs_size: int = 128  # --save-probs keeps float16 probabilities at this short side
    # "fp32" (as released) or "bf16": the frozen CLIP towers cast to bf16 once, the rest under bf16 autocast;
    # pays on GPUs and on CPUs with AMX or AVX512-BF16 (elsewhere it is slower, with a warning).
    precision: str = "fp32"
    # How views are resized: "torch" (bilinear, antialiased when shrinking), "cv2" (OpenCV bilinear on uint8,
    # the released test pipeline; needs weakclip[released]), "auto": cv2 for released models, else torch.
    view_resize: str = "auto"


@dataclass
class RetrainConfig:
    """The fully supervised segmenter trained on pseudo masks (``weakclip retrain``).

    Defaults follow the released retraining recipe (deeplabv1-resnet38: SGD, poly 0.9, 40k iterations,
    batch 20, 448 crops, scale 0.5-1.5). Loop settings not listed here (workers, seed, amp, checkpoints,
    logging) are taken from ``train``.
    """

    arch: str = "deeplabv3plus"  # "deeplabv3plus", "deeplab-largefov" or "segformer"
    encoder: str | None = None  # null: the arch's default (resnet101, resnet38, mit_b2)
    encoder_weights: str | None = "imagenet"  # smp weights tag fetched by name; null: random init
    backbone_file: str | None = None  # local ImageNet weights for the encoder/backbone (every arch)
    iters: int = 40000
    batch_size: int = 20  # in total, over all processes
    crop_size: int = 448
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # times the image's own size
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9


@dataclass
class Config:
    name: str = "voc"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    @property
    def num_classes(self) -> int:
        return len(self.data.class_names)


def _configs_dir() -> Path:
    return Path(str(resources.files("weakclip") / "configs"))


def list_configs() -> list[str]:
    """Names of the configs shipped with the package."""
    return sorted(p.stem for p in _configs_dir().glob("*.yaml"))


def _resolve_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise WeakclipError(f"{path}: config file not found")
        return path
    shipped = _configs_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise WeakclipError(
            f"{name_or_path}: no such config (shipped: {', '.join(list_configs())}; or give a .yaml path)"
        )
    return shipped


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise WeakclipError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise WeakclipError(f"{path}: a config must be a mapping of sections")
    return data


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_tree(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = _resolve_file(name_or_path)
    if str(path) in seen:
        raise WeakclipError(f"{path}: 'base' chain loops back on itself")
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _merge(_load_tree(str(base), seen + (str(path),)), tree)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise WeakclipError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise WeakclipError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise WeakclipError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise WeakclipError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WeakclipError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WeakclipError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise WeakclipError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, tree: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise WeakclipError(f"{where}.{key}: unknown config key{hint}".lstrip("."))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}".lstrip("."))
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["train.iters=10", "data.root=/x"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise WeakclipError(f"--set {item}: expected key=value, e.g. train.iters=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def flatten(tree: object, keep: tuple[str, ...] = (), prefix: str = "") -> dict[str, object]:
    """A nested dict as {"a.b.c": leaf}; empty dicts and the entries named in ``keep`` are leaves."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update({f"{prefix}{key}": value} if key in keep else flatten(value, keep, f"{prefix}{key}."))
    return out


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new Config: ``cfg`` with ``key=value`` overrides applied as ``--set`` applies them (``cfg`` unchanged)."""
    return config_from_dict(_merge(config_to_dict(cfg), parse_overrides(overrides)))


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load a shipped config by name (``voc``) or a YAML file, then apply ``key=value`` overrides."""
    tree = _load_tree(name_or_path)
    tree.setdefault("name", Path(name_or_path).stem)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    return config_from_dict(tree)


# Model keys of configs written before backbones and co-attention became nested entries (checkpoints store
# their config): old key -> (section, new key).
_MOVED_MODEL_KEYS = {
    "coattn_width": ("co_attention", "width"), "coattn_heads": ("co_attention", "heads"),
    "coattn_layers": ("co_attention", "layers"), "coattn_dropout": ("co_attention", "dropout"),
    "alpha_init": ("co_attention", "alpha_init"), "beta_init": ("co_attention", "beta_init"),
}
_MOVED_CLIP_KEYS = {"taps": ("backbone", "taps"), "class_token_twice": ("backbone", "class_token_twice")}


def _upgrade_model_keys(tree: dict) -> dict:
    """``tree`` with the flat model keys of older configs moved to their nested entries (a warning names them)."""
    model = tree.get("model")
    if not isinstance(model, dict):
        return tree
    model = dict(model)
    moved = []
    if isinstance(model.get("co_attention"), bool):
        on = model.pop("co_attention")
        kind = ("released" if model.get("released") else "bidirectional") if on else "none"
        model["co_attention"] = {"type": kind}
        moved.append(f"model.co_attention: {str(on).lower()} -> model.co_attention.type: {kind}")
    clip = dict(model["clip"]) if isinstance(model.get("clip"), dict) else {}
    for source, table, prefix in ((model, _MOVED_MODEL_KEYS, "model"), (clip, _MOVED_CLIP_KEYS, "model.clip")):
        for old, (section, new) in table.items():
            if old in source:
                model.setdefault(section, {})[new] = source.pop(old)
                moved.append(f"{prefix}.{old} -> model.{section}.{new}")
    if not moved:
        return tree
    if isinstance(model.get("clip"), dict):
        model["clip"] = clip
    logging.getLogger(__name__).warning("config keys renamed: %s", "; ".join(moved))
    return {**tree, "model": model}


def config_from_dict(tree: dict) -> Config:
    """Build a validated :class:`Config` from a nested mapping (as saved by :func:`config_to_dict`); the
    flat model keys of older configs are accepted and moved to their nested entries."""
    return _build(Config, _upgrade_model_keys(tree), "")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (saved beside every output)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

