"""open_clip's modified ResNets (RN50, RN101, RN50x4, ...) as a WeakCLIP backbone, as the released
``CLIPResNetWithAttention``: the four stages tapped at strides 4, 8, 16, 32, and the attention pool run as
full self-attention over [mean token, positions], whose output 0 is the global embedding and outputs 1..hw
the dense embeddings. MaskCLIP's per-position projection is available as ``dense: maskclip``."""

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
DENSE_MODES = ("attention-pool", "maskclip")


@BACKBONES.register("clip-resnet")
class ClipResNet(VisualBackbone):
    """Frozen open_clip ModifiedResNet (RN50, RN101, RN50x4, ...): four stages, attention-pool embeddings.

    The stem and the four stages are open_clip's own modules, called in turn (``forward_intermediates``
    exists only from open_clip 2.32). The attention pool's positional table is resized (bilinear, half-pixel
    centres) to the last stage's grid, added to [mean of the positions, each position], and every token
    attends to every token (the released ``AttentionPool2d``): the mean token's output is the global
    embedding (CLIP's ``encode_image``), each position's output its dense embedding. ``dense="maskclip"``
    instead projects each position on its own (value, then output projection: MaskCLIP's trick, not the
    released computation); the global embedding is unchanged.

    Sizes: with ``floor`` (the released behaviour) the stride-2 stem convolution gives ceil(H/2) and every
    average pool floors, so stage i has floor(ceil(H/2)/2) / 2^i rows and the right and bottom pixels that
    do not fill a pooling window are dropped. Without it (the default) sides that are not a multiple of 32
    are zero-padded on the right and bottom, so stage i covers ceil(H / 32) * 32 / s_i rows.
    """

    def __init__(self, visual: nn.Module, dense: str = "attention-pool", floor: bool = False):
        super().__init__()
        if not isinstance(visual, ModifiedResNet):
            raise WeakclipError(f"model.backbone: clip-resnet needs a CLIP ModifiedResNet image tower; "
                                f"got {type(visual).__name__}")
        if dense not in DENSE_MODES:
            raise WeakclipError(f"model.backbone.dense: expected one of {', '.join(DENSE_MODES)}; got '{dense}'")
        self.visual = visual
        self.dense_mode = dense
        self.floor = floor
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
        return cls(visual, cfg.dense, floor=released)

    def attention_pool(self, x: Tensor, trace: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, C, h, w), the last stage -> dense (B, D, h, w) and global (B, D) embeddings.

        ``trace`` (optional) receives the pool's inputs: ``pool_tokens`` (1 + hw, B, C) = [mean, positions
        row-major] + ``pos_embed`` (1 + hw, C), and ``attn`` (B, 1 + hw, 1 + hw), the attention weights
        averaged over heads (row 0: the mean token's query).
        """
        pool = self.visual.attnpool
        b, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (hw, B, C)
        positions = resize_positions(pool.positional_embedding.to(x.dtype), (self.grid, self.grid), (h, w))
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + positions[:, None]
        # MaskCLIP needs only the mean token's query; the released pool runs every token's.
        full = self.dense_mode == "attention-pool" or trace is not None
        out, weights = F.multi_head_attention_forward(
            query=tokens if full else tokens[:1], key=tokens, value=tokens, embed_dim_to_check=c,
            num_heads=pool.num_heads, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), bias_k=None,
            bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False,
            need_weights=trace is not None,
        )
        if trace is not None:
            trace.update(pool_tokens=tokens, pos_embed=positions, attn=weights)
        dense = out[1:] if self.dense_mode == "attention-pool" else pool.c_proj(pool.v_proj(tokens[1:]))  # (hw, B, D)
        return dense.permute(1, 2, 0).reshape(b, -1, h, w), out[0]

    @torch.no_grad()
    def forward(self, images: Tensor) -> VisualFeatures:
        """images: (B, 3, H, W) normalised -> taps (B, C_i, h_i, w_i) at strides 4, 8, 16, 32, dense
        (B, D, h_4, w_4) and global (B, D); h_i = ceil(H/32) * 32 / s_i (padded), or floor(ceil(H/2)/2) / 2^i
        with ``floor``."""
        pad_h, pad_w = (-images.shape[2]) % STRIDE, (-images.shape[3]) % STRIDE
        if (pad_h or pad_w) and not self.floor:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        v = self.visual
        x = v.stem(images)
        taps: list[Tensor] = []
        for stage in (v.layer1, v.layer2, v.layer3, v.layer4):
            x = stage(x)
            taps.append(x)
        dense, global_embedding = self.attention_pool(x)
        return VisualFeatures(taps=taps, dense=dense, global_embedding=global_embedding)
