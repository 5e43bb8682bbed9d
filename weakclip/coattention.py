"""Co-attention matching (Eq. 7-8): class embeddings and pixel embeddings attend to each other before the
score map. Registered types, picked by ``model.co_attention.type`` (``list_co_attention()`` lists them):

- ``bidirectional``: text attends to pixels and pixels to text through chains of decoder layers;
- ``released``: the released code's form: each stack's layers all read the projected inputs and only the
  last one's output is kept, so one decoder layer per direction acts (released checkpoints convert to it);
- ``none``: no matching, the CLIP embeddings go to the score map unchanged (the ablation).

Every type maps (text (B, K, D), pixels (B, D, h, w), global (B, D)) to (text', pixels'), same shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CoAttentionConfig
from .errors import WeakclipError
from .registry import Registry

CO_ATTENTION: Registry = Registry("model.co_attention.type")


def list_co_attention() -> list[str]:
    """Names ``model.co_attention.type`` accepts."""
    return CO_ATTENTION.names()


def build_co_attention(cfg: CoAttentionConfig, dim: int) -> nn.Module:
    """The registered co-attention ``cfg.type`` for D = ``dim`` embeddings."""
    return CO_ATTENTION.get(cfg.type)(cfg, dim)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a biased output projection."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """query (B, Nq, W), memory (B, Nk, W) -> (B, Nq, W)."""
        b, nq, width = query.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, width // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(memory)), split(self.v(memory)))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, nq, width)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention to a memory, MLP."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, dropout)
        self.cross_attn = Attention(width, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.drop(self.mlp(self.norm3(x)))


@CO_ATTENTION.register("bidirectional")
class CoAttention(nn.Module):
    """Text attends to pixels and pixels to text, each through a chain of decoder layers (Eq. 7-8).

    Each direction runs ``layers`` decoder layers at ``width``, each refining the previous one's output; the
    updates are added back with per-channel scales alpha (text, Eq. 7) and beta (pixels, Eq. 8). The visual
    context is the global embedding followed by every pixel, as released."""

    def __init__(self, cfg: CoAttentionConfig, dim: int):
        super().__init__()
        if cfg.layers < 1 or cfg.width % cfg.heads:
            raise WeakclipError(f"model.co_attention: need layers >= 1 and width divisible by heads, got "
                                f"layers {cfg.layers}, width {cfg.width}, heads {cfg.heads}")
        width = cfg.width
        self.visual_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.text_layers = nn.ModuleList(DecoderLayer(width, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.visual_layers = nn.ModuleList(DecoderLayer(width, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.text_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.visual_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.apply(self._init)
        self.alpha = nn.Parameter(torch.full((dim,), cfg.alpha_init))
        self.beta = nn.Parameter(torch.full((dim,), cfg.beta_init))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def deltas(self, text: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """text (B, K, D), visual context (B, N, D) -> the branch outputs (B, K, D), (B, N, D) before alpha/beta."""
        v, t = self.visual_proj(visual), self.text_proj(text)
        t_out, v_out = t, v
        for layer in self.text_layers:  # each layer refines the previous layer's output
            t_out = layer(t_out, v)
        for layer in self.visual_layers:
            v_out = layer(v_out, t)
        return self.text_out(t_out), self.visual_out(v_out)

    @staticmethod
    def visual_context(pixels: Tensor, global_embedding: Tensor) -> Tensor:
        """pixels (B, D, h, w), global (B, D) -> the visual tokens (B, 1 + hw, D): global first, row-major."""
        return torch.cat([global_embedding[:, None], pixels.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, text: Tensor, pixels: Tensor, global_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """text (B, K, D), pixels (B, D, h, w), global (B, D) -> updated text (B, K, D) and pixels (B, D, h, w)."""
        b, d, h, w = pixels.shape
        d_text, d_visual = self.deltas(text, self.visual_context(pixels, global_embedding))
        # The updated global token is not used further (as released).
        d_pixels = d_visual[:, 1:].transpose(1, 2).reshape(b, d, h, w)
        return text + self.alpha * d_text, pixels + self.beta[:, None, None] * d_pixels


@CO_ATTENTION.register("released")
def released_co_attention(cfg: CoAttentionConfig, dim: int) -> CoAttention:
    """The released form: one decoder layer per direction, the only one of its stacks that acts.

    The released stacks apply every layer to the projected inputs and keep the last output, so exactly one
    layer per direction acts; that layer alone is built (the others would never get a gradient)."""
    if cfg.layers != 1:
        raise WeakclipError(
            f"model.co_attention.layers: the released form keeps only its last layer's output, so one layer per "
            f"direction acts whatever its config says; set layers: 1 (got {cfg.layers}), or use type: bidirectional "
            f"for chained layers")
    return CoAttention(cfg, dim)


@CO_ATTENTION.register("none")
class NoCoAttention(nn.Module):
    """The ablation without matching: text and pixels pass through unchanged (no parameters)."""

    def __init__(self, cfg: CoAttentionConfig, dim: int):
        super().__init__()

    def forward(self, text: Tensor, pixels: Tensor, global_embedding: Tensor) -> tuple[Tensor, Tensor]:
        return text, pixels
