"""open_clip's modified ResNets (RN50, RN101, RN50x4, ...) as a WeakCLIP backbone: the four stages tapped at
strides 4, 8, 16, 32, dense embeddings from the attention pool's value and output projections at every
position of the last stage, and the attention pool's own output as the global embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import Tensor, nn

from ..clip import resize_positions
from ..config import BackboneConfig
from ..errors import WeakclipError
from .base import BACKBONES, VisualBackbone, VisualFeatures

STRIDE = 32  # of the last stage, which the attention pool reads


@BACKBONES.register("clip-resnet")
class ClipResNet(VisualBackbone):
    """Frozen open_clip ModifiedResNet (RN50, RN101, RN50x4, ...): four stages, attention-pool embeddings.

    The stem and the four stages are open_clip's own modules, called in turn (``forward_intermediates``
    exists only from open_clip 2.32). The attention pool attends from the mean token to all positions; its
    value and output projections applied to each position on their own give that position's embedding in the
    joint space, as DenseCLIP does for its ResNets. The pool's positional embedding is resized (bilinear) to
    the input's grid. Sides that are not a multiple of 32 are zero-padded on the right and bottom inside, so
    stage i covers ceil(H / 32) * 32 / s_i rows.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not isinstance(visual, ModifiedResNet):
            raise WeakclipError(f"model.backbone: clip-resnet needs a CLIP ModifiedResNet image tower; "
                                f"got {type(visual).__name__}")
        self.visual = visual
        stages = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
        self.tap_channels = [int(stage[-1].bn3.num_features) for stage in stages]
        self.tap_strides = [4, 8, 16, 32]
        self.dense_stride = STRIDE
        pool = visual.attnpool
        self.embed_dim = int(pool.c_proj.out_features)
        self.grid = round((pool.positional_embedding.shape[0] - 1) ** 0.5)

    @staticmethod
    def accepts(visual: nn.Module) -> bool:
        return isinstance(visual, ModifiedResNet)

    @classmethod
    def from_config(cls, visual: nn.Module, cfg: BackboneConfig, released: bool) -> ClipResNet:
        if cfg.taps is not None:
            raise WeakclipError("model.backbone.taps: clip-resnet taps its four stages; leave taps null")
        if cfg.class_token_twice:
            raise WeakclipError("model.backbone.class_token_twice: a ResNet has no class token")
        return cls(visual)

    def attention_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, h, w), the last stage -> dense (B, D, h, w) and global (B, D) embeddings."""
        pool = self.visual.attnpool
        b, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (hw, B, C)
        positions = resize_positions(pool.positional_embedding.to(x.dtype), (self.grid, self.grid), (h, w))
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + positions[:, None]
        # Only the mean token's query is kept by open_clip's pool; the other queries' outputs are not needed.
        pooled, _ = F.multi_head_attention_forward(
            query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=c, num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False,
        )
        dense = pool.c_proj(pool.v_proj(tokens[1:]))  # (hw, B, D)
        return dense.permute(1, 2, 0).reshape(b, -1, h, w), pooled[0]

    @torch.no_grad()
    def forward(self, images: Tensor) -> VisualFeatures:
        """images: (B, 3, H, W) normalised -> taps (B, C_i, H'/s_i, W'/s_i) for s = 4, 8, 16, 32, dense
        (B, D, H'/32, W'/32) and global (B, D), with H', W' = H, W rounded up to multiples of 32."""
        pad_h, pad_w = (-images.shape[2]) % STRIDE, (-images.shape[3]) % STRIDE
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        v = self.visual
        x = v.stem(images)
        taps: list[Tensor] = []
        for stage in (v.layer1, v.layer2, v.layer3, v.layer4):
            x = stage(x)
            taps.append(x)
        dense, global_embedding = self.attention_pool(x)
        return VisualFeatures(taps=taps, dense=dense, global_embedding=global_embedding)
