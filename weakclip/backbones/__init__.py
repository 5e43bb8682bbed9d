"""Visual backbones: frozen CLIP image towers behind one interface (taps, dense and global embeddings, channels
and strides), registered by name. ``list_backbones()`` lists them; ``build_backbone`` builds one from
``model.backbone``.

Adding one: subclass :class:`VisualBackbone`, set its channels and strides, implement ``forward``,
``accepts`` and ``from_config``, and decorate the class with ``@BACKBONES.register("name")``
(``resnet.py`` is the worked example).
"""

from __future__ import annotations

from torch import nn

from ..config import BackboneConfig
from ..errors import WeakclipError
from .base import BACKBONES, VisualBackbone, VisualFeatures
from .resnet import ClipResNet
from .vit import ClipViT, default_taps

__all__ = ["BACKBONES", "ClipResNet", "ClipViT", "VisualBackbone", "VisualFeatures", "build_backbone",
           "default_taps", "list_backbones"]


def list_backbones() -> list[str]:
    """Names ``model.backbone.type`` accepts (besides ``auto``)."""
    return BACKBONES.names()


def build_backbone(visual: nn.Module, cfg: BackboneConfig, released: bool = False) -> VisualBackbone:
    """The registered backbone ``cfg.type`` around the open_clip image tower ``visual``; ``auto`` picks the one
    that accepts the tower's kind."""
    name = cfg.type
    if name == "auto":
        found = [n for n in BACKBONES.names() if BACKBONES.get(n).accepts(visual)]
        if not found:
            raise WeakclipError(f"model.backbone.type: no registered backbone takes a {type(visual).__name__} "
                                f"image tower (registered: {', '.join(BACKBONES.names())})")
        name = found[0]
    return BACKBONES.get(name).from_config(visual, cfg, released)
