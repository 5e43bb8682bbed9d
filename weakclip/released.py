"""The authors' released checkpoints (mmcv ``.pth`` files such as ``train_74p03_iter_8000.pth``).

A released checkpoint holds the whole model, CLIP included (its CLIP weights drifted slightly during the
released training, so no separate CLIP file is used). :func:`convert_state_dict` maps every official key
to this package's names, or names it as ignored with the reason; :func:`released_config` derives the
model section of a config from the tensor shapes and switches on ``model.released`` so that the forward
is the released one. Loading, converting and class mapping are :mod:`weakclip.checkpoints`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import BackboneConfig, ClipConfig, Config, ModelConfig
from .errors import WeakclipError
from .model import TEXT_POSITIONS

# Released tap indices (``out_indices`` [3, 5, 7, 11], 0-based) as this package's 1-based blocks.
RELEASED_TAPS = [4, 6, 8, 12]
# A released ResNet image tower is told apart by its attention pool; the released class gives it 32 heads.
RESNET_POOL_TABLE = "backbone.attnpool.positional_embedding"
RESNET_POOL_HEADS = 32
# Head width the released configs use everywhere (ViT 768 / 12, text 512 / 8, co-attention 256 / 4).
HEAD_WIDTH = 64

# The adapter levels, ViT or ResNet: ``fpn<i>`` is ``PyramidAdapter.level<i>`` layer for layer (a bare
# GroupNorm level has no index), so every adapter key lands there and none in the CLIP tower.
ADAPTER_RULE = (r"backbone\.fpn([1-4])\.(\d+\.)?(.+)", r"adapter.level\1.\2\3")
# (official pattern, our name); applied in order, first match wins. ``{last}`` is the co-attention's
# effective layer (the last of each stack).
_RULES: list[tuple[str, str]] = [
    (r"contexts", "text.ctx"),
    (r"gamma", "co_attention.alpha"),
    (r"beta", "co_attention.beta"),
    ADAPTER_RULE,
    (r"backbone\.(.+)", r"visual.visual.\1"),
    (r"text_encoder\.positional_embedding", TEXT_POSITIONS),
    (r"text_encoder\.(.+)", r"text.\1"),
    (r"context_decoder\.memory_proj\.(.+)", r"co_attention.visual_proj.\1"),
    (r"context_decoder\.text_proj\.(.+)", r"co_attention.text_proj.\1"),
    (r"context_decoder\.out_proj\.(.+)", r"co_attention.text_out.\1"),
    (r"context_decoder\.anti_out_proj\.(.+)", r"co_attention.visual_out.\1"),
    (r"context_decoder\.decoder\.{last}\.(.+)", r"co_attention.text_layers.0.\1"),
    (r"context_decoder\.anti_decoder\.{last}\.(.+)", r"co_attention.visual_layers.0.\1"),
    (r"neck\.lateral_convs\.(\d+)\.conv\.(.+)", r"neck.lateral.\1.\2"),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(.+)", r"neck.output.\1.\2"),
    (r"decode_head\.conv_seg\.(.+)", r"head.classifier.\1"),
    (r"decode_head\.scale_heads\.(\d+)\.(\d+)\.conv\.(.+)", r"head.branches.\1.\2.0.\3"),
    (r"decode_head\.scale_heads\.(\d+)\.(\d+)\.bn\.(.+)", r"head.branches.\1.\2.1.\3"),
]
# Attention projections inside a co-attention layer: official q_proj/k_proj/v_proj -> q/k/v.
_ATTN = re.compile(r"(self_attn|cross_attn)\.([qkv])_proj\.")
_DEAD_LAYER = re.compile(r"context_decoder\.(decoder|anti_decoder)\.(\d+)\.")
DEAD_LAYER_REASON = ("co-attention layer that the released forward never uses: every layer is applied to the "
                     "original inputs and only the last layer's output is kept")


@dataclass
class Conversion:
    """A released state dict in this package's names, what was left out and why, and the architecture."""

    state: dict[str, Tensor]
    ignored: dict[str, str] = field(default_factory=dict)
    mapping: dict[str, str] = field(default_factory=dict)  # official key -> our key
    arch: dict = field(default_factory=dict)  # open_clip.CLIP(**arch)
    model: dict = field(default_factory=dict)  # ModelConfig fields taken from the shapes


def is_torch_archive(path: str | Path) -> bool:
    """True for ``torch.save`` files (zip archives): released ``.pth`` checkpoints; ours are safetensors."""
    path = Path(path)
    return path.is_file() and zipfile.is_zipfile(path)


def read_released(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, meta) of an mmcv checkpoint; one clear error line when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise WeakclipError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad or unsafe file
        raise WeakclipError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "contexts" not in {k.removeprefix("module.") for k in state}:
        raise WeakclipError(f"{path}: not a released WeakCLIP checkpoint (no state_dict with 'contexts', "
                            f"'backbone.*', 'decode_head.*' keys)")
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    return {k.removeprefix("module."): v for k, v in state.items()}, meta


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _shape(state: dict[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise WeakclipError(f"{source}: '{key}' is missing, so this is not a complete released WeakCLIP model")
    return tuple(state[key].shape)


def _heads(width: int, heads: int | None, what: str, source: str) -> int:
    heads = heads or width // HEAD_WIDTH
    if heads < 1 or width % heads:
        raise WeakclipError(f"{source}: cannot split the {what} width {width} into {heads} heads; give the "
                            f"number of heads")
    return heads


def _square_grid(state: dict[str, Tensor], key: str, source: str) -> int:
    rows = _shape(state, key, source)[0] - 1
    grid = round(rows ** 0.5)
    if grid * grid != rows:
        raise WeakclipError(f"{source}: {key} has {rows + 1} rows, not a square grid + 1")
    return grid


def _vit_vision(state: dict[str, Tensor], source: str, heads: int | None) -> tuple[dict, int, str]:
    """open_clip ``vision_cfg``, the joint width D and the backbone type of a released ViT image tower."""
    width, _, patch, _ = _shape(state, "backbone.conv1.weight", source)
    grid = _square_grid(state, "backbone.positional_embedding", source)
    layers = _count(state, "backbone.transformer.resblocks.")
    if layers < max(RELEASED_TAPS):
        raise WeakclipError(f"{source}: the image encoder has {layers} blocks; the released taps need 12")
    heads = _heads(width, heads, "image encoder", source)
    vision = {"layers": layers, "width": width, "head_width": width // heads, "patch_size": patch,
              "image_size": grid * patch}
    return vision, _shape(state, "backbone.proj", source)[1], "clip-vit"


def _resnet_vision(state: dict[str, Tensor], source: str, heads: int | None) -> tuple[dict, int, str]:
    """The same for a released ``CLIPResNetWithAttention``: OpenAI's modified ResNet, whose attention pool the
    released class builds with 32 heads whatever the width (its table's grid gives the input size / 32)."""
    width = 2 * _shape(state, "backbone.conv1.weight", source)[0]  # the stem's first conv has width / 2
    grid = _square_grid(state, RESNET_POOL_TABLE, source)
    pool_width = 32 * width
    heads = heads or RESNET_POOL_HEADS
    if pool_width % heads:
        raise WeakclipError(f"{source}: cannot split the attention pool's width {pool_width} into {heads} heads; "
                            f"give the number of heads")
    vision = {"layers": [_count(state, f"backbone.layer{i}.") for i in range(1, 5)], "width": width,
              "head_width": pool_width // heads, "image_size": grid * 32}
    return vision, _shape(state, "backbone.attnpool.c_proj.weight", source)[0], "clip-resnet"


def convert_state_dict(state: dict[str, Tensor], source: str = "checkpoint", vision_heads: int | None = None,
                       text_heads: int | None = None, coattn_heads: int | None = None) -> Conversion:
    """Map a released state dict onto this package's model.

    The head counts are not stored in a state dict; by default they follow the released configs (64-wide
    heads; a ResNet's attention pool: 32). A ViT or a ResNet image tower (``CLIPResNetWithAttention``, told
    apart by its attention pool) is converted. Returns a :class:`Conversion` whose ``state`` loads with
    ``WeakCLIP.load_weakclip_state_dict`` into the model that ``released_config`` describes.
    """
    vision, embed_dim, backbone = (_resnet_vision if RESNET_POOL_TABLE in state else _vit_vision)(
        state, source, vision_heads)
    vocab, t_width = _shape(state, "text_encoder.token_embedding.weight", source)
    context_length = _shape(state, "text_encoder.positional_embedding", source)[0]
    if _shape(state, "text_encoder.text_projection", source)[1] != embed_dim:
        raise WeakclipError(f"{source}: image and text embeddings differ in width; the released model needs them equal")
    n_ctx = _shape(state, "contexts", source)[1]
    k = _shape(state, "decode_head.conv_seg.weight", source)[0]
    coattn_width = _shape(state, "context_decoder.text_proj.1.weight", source)[0]
    coattn_layers = _count(state, "context_decoder.decoder.")
    arch = {
        "embed_dim": embed_dim,
        "quick_gelu": True,  # OpenAI CLIP's activation, which the released encoders use
        "vision_cfg": vision,
        "text_cfg": {"context_length": context_length, "vocab_size": vocab, "width": t_width,
                     "heads": _heads(t_width, text_heads, "text encoder", source),
                     "layers": _count(state, "text_encoder.transformer.resblocks.")},
    }
    model = {
        "n_ctx": n_ctx, "name_length": context_length - n_ctx, "coattn_width": coattn_width,
        "coattn_heads": _heads(coattn_width, coattn_heads, "co-attention", source), "coattn_layers": 1,
        "decoder_channels": _shape(state, "neck.lateral_convs.0.conv.weight", source)[0],
        "num_classes": k, "backbone": backbone,
    }
    rules = [(re.compile(p.replace("{last}", str(coattn_layers - 1)) + "$"), r) for p, r in _RULES]
    out = Conversion(state={}, arch=arch, model=model)
    for key, tensor in state.items():
        dead = _DEAD_LAYER.match(key)
        if dead and int(dead.group(2)) < coattn_layers - 1:
            out.ignored[key] = DEAD_LAYER_REASON
            continue
        for pattern, repl in rules:
            if pattern.match(key):
                ours = _ATTN.sub(r"\1.\2.", pattern.sub(repl, key))
                break
        else:
            raise WeakclipError(f"{source}: '{key}' is not a key of the released WeakCLIP model")
        if key == "contexts":
            tensor = tensor.reshape(tensor.shape[-2:])  # (1, N, D) shared by all classes -> (N, D)
        out.state[ours] = tensor
        out.mapping[key] = ours
    return out


def released_adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter tensors (``backbone.fpn*``) of a released state dict, under ``PyramidAdapter``'s own names
    (``level1.0.weight``, ...), by the rule :func:`convert_state_dict` applies."""
    pattern = re.compile(ADAPTER_RULE[0] + "$")
    return {pattern.sub(ADAPTER_RULE[1], k).removeprefix("adapter."): v for k, v in state.items() if pattern.match(k)}


def released_config(base: Config, conversion: Conversion, class_names: list[str]) -> Config:
    """A copy of ``base`` with its model section replaced by the released architecture in ``released`` mode
    and its class names by ``class_names``, the checkpoint's (one per output slot, in slot order).

    The data, inference and training sections stay the base config's; ``base`` is not changed.
    """
    cfg = copy.deepcopy(base)
    m = conversion.model
    if len(class_names) != m["num_classes"]:
        raise WeakclipError(f"the checkpoint has {m['num_classes']} class slots but {len(class_names)} class names "
                            f"were given")
    cfg.data.class_names = list(class_names)
    old = cfg.model
    cfg.model = ModelConfig(
        clip=ClipConfig(model="released", pretrained=None, arch=copy.deepcopy(conversion.arch), normalize="imagenet",
                        in_checkpoint=True),
        backbone=(BackboneConfig(type="clip-vit", taps=list(RELEASED_TAPS), class_token_twice=True)
                  if m["backbone"] == "clip-vit" else BackboneConfig(type=m["backbone"])),
        co_attention=dataclasses.replace(old.co_attention, type="released", width=m["coattn_width"],
                                         heads=m["coattn_heads"], layers=m["coattn_layers"]),
        released=True, learnable_prompts=True, n_ctx=m["n_ctx"], ctx_init_std=1.0, name_length=m["name_length"],
        pyramid_adapter=True, train_adapter=False, text_guided_decoder=True,
        decoder_channels=m["decoder_channels"], decoder_dropout=old.decoder_dropout,
    )
    return cfg


def meta_class_names(meta: dict) -> list[str] | None:
    names = meta.get("CLASSES")
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None
