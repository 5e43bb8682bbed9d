"""The visual backbone interface: what WeakCLIP needs from a frozen image tower, and the registry of towers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import BackboneConfig
from ..registry import Registry


@dataclass
class VisualFeatures:
    """A backbone's outputs for a (B, 3, H, W) input.

    taps: 4 maps (B, tap_channels[i], ~H / tap_strides[i], ~W / tap_strides[i]), finest first; they feed the
        pyramid adapter;
    dense: (B, D, ~H / dense_stride, ~W / dense_stride) embeddings in CLIP's joint image-text space, one per
        position (the pixels the text is matched to);
    global_embedding: (B, D) the image embedding, as CLIP's ``encode_image`` at the tower's native size.
    """

    taps: list[Tensor]
    dense: Tensor
    global_embedding: Tensor


class VisualBackbone(nn.Module):
    """A frozen image tower seen through the interface WeakCLIP uses.

    Subclasses set ``tap_channels`` and ``tap_strides`` (4 each, finest first), ``dense_stride`` and
    ``embed_dim`` (D, the joint space), keep the open_clip tower as ``visual``, and implement
    ``forward(images (B, 3, H, W) normalised) -> VisualFeatures`` under ``torch.no_grad``. They are registered
    with ``@BACKBONES.register(name)`` and built by ``from_config``; ``accepts`` lets ``type: auto`` pick one.
    """

    tap_channels: list[int]
    tap_strides: list[int]
    dense_stride: int
    embed_dim: int

    @staticmethod
    def accepts(visual: nn.Module) -> bool:
        """Whether this backbone wraps an open_clip image tower of ``visual``'s kind (for ``type: auto``)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, visual: nn.Module, cfg: BackboneConfig, released: bool) -> VisualBackbone:
        raise NotImplementedError

    def train(self, mode: bool = True) -> VisualBackbone:
        # Frozen: dropout, patch dropout and BatchNorm statistics stay as in eval whatever the model does.
        return super().train(False)


BACKBONES: Registry[type[VisualBackbone]] = Registry("model.backbone.type")
