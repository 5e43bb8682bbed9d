"""open_clip's Vision Transformers (any size) as a WeakCLIP backbone: four tapped blocks at the patch stride,
every patch token projected into the joint space, the class token's embedding as the global one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ..clip import require_batch_first, resize_positions
from ..config import BackboneConfig
from ..errors import WeakclipError
from .base import BACKBONES, VisualBackbone, VisualFeatures


def default_taps(depth: int) -> list[int]:
    """Blocks tapped for a ViT of ``depth`` blocks (1-based): 4, 6, 8, 12 for 12; 8, 12, 16, 24 for 24."""
    return [max(1, round(depth * f)) for f in (1 / 3, 1 / 2, 2 / 3)] + [depth]


@BACKBONES.register("clip-vit")
class ClipViT(VisualBackbone):
    """Frozen open_clip ViT that returns tapped block outputs and dense projected embeddings.

    Any input whose sides are multiples of the patch size works: the positional embedding is interpolated
    (bilinear, from CLIP's own grid) at every forward. Other sizes are zero-padded on the right and bottom
    inside, so outputs cover ceil(H / p) x ceil(W / p) cells; with ``truncate`` (the released behaviour)
    the patch convolution drops the last H mod p rows and W mod p columns instead: floor(H / p) x floor(W / p).
    The block loop is ours (open_clip's forwards neither interpolate positions nor expose every token's
    projection); tests compare its taps and global embedding with open_clip's own forward.
    """

    def __init__(self, visual: nn.Module, taps: list[int] | None = None, class_token_twice: bool = False,
                 truncate: bool = False):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise WeakclipError(f"model.backbone: clip-vit needs a CLIP ViT image tower; got {type(visual).__name__}")
        if visual.attn_pool is not None or visual.pool_type != "tok" or getattr(visual, "final_ln_after_pool", False):
            raise WeakclipError("model.backbone: clip-vit needs a CLIP ViT that pools its class token "
                                "(no attentional or average pooling)")
        require_batch_first(visual.transformer, "image")
        self.visual = visual
        depth = len(visual.transformer.resblocks)
        self.taps = list(taps) if taps else default_taps(depth)
        if len(self.taps) != 4 or not all(1 <= t <= depth for t in self.taps) or sorted(self.taps) != self.taps:
            raise WeakclipError(f"model.backbone.taps: need 4 increasing block indices in 1..{depth}, got {self.taps}")
        self.class_token_twice = class_token_twice
        self.truncate = truncate
        self.patch_size = int(visual.conv1.kernel_size[0])
        width = int(visual.conv1.out_channels)
        self.tap_channels = [width] * 4
        self.tap_strides = [self.patch_size] * 4
        self.dense_stride = self.patch_size
        self.embed_dim = int(visual.proj.shape[1])
        self.grid = tuple(int(g) for g in visual.grid_size)

    @staticmethod
    def accepts(visual: nn.Module) -> bool:
        return isinstance(visual, VisionTransformer)

    @classmethod
    def from_config(cls, visual: nn.Module, cfg: BackboneConfig, released: bool) -> ClipViT:
        if cfg.dense != "attention-pool":
            raise WeakclipError("model.backbone.dense: clip-vit projects every token; 'dense' applies to clip-resnet")
        # The released code adds the class embedding twice and truncates sizes that are not a multiple of p.
        return cls(visual, cfg.taps, cfg.class_token_twice or released, truncate=released)

    @torch.no_grad()
    def forward(self, images: Tensor) -> VisualFeatures:
        """images: (B, 3, H, W) normalised -> taps 4 x (B, width, h, w) (before ``ln_post``), dense (B, D, h, w),
        global (B, D), on the h x w = ceil(H/p) x ceil(W/p) grid (floor with ``truncate``)."""
        v = self.visual
        p = self.patch_size
        pad_h, pad_w = (-images.shape[2]) % p, (-images.shape[3]) % p
        if (pad_h or pad_w) and not self.truncate:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        x = v.conv1(images)  # (B, C, gh, gw)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype)
        if self.class_token_twice:
            cls = 2 * cls
        x = torch.cat([cls.expand(b, 1, c), x], dim=1) + resize_positions(
            v.positional_embedding.to(x.dtype), self.grid, (gh, gw))
        x = v.ln_pre(x)
        taps: list[Tensor] = []
        for i, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if i in self.taps:
                taps.append(x[:, 1:].transpose(1, 2).reshape(b, c, gh, gw))
        x = v.ln_post(x) @ v.proj  # every token, not just the class token
        dense = x[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)
        return VisualFeatures(taps=taps, dense=dense, global_embedding=x[:, 0])
