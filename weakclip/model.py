"""The WeakCLIP network: prompt-fed text encoder, pyramid adapter, co-attention matching, score map and
text-guided decoder (FPN neck + Semantic-FPN head) over a frozen CLIP.

Shapes for a (B, 3, H, W) input with a ViT-B/16 (C = 768, D = 512), K classes, h = H/16, w = W/16:
taps 4 x (B, C, h, w) -> adapter (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w), (B, C, h/2, w/2);
text (K, D) and visual tokens (B, 1 + hw, D) -> co-attention -> score map (B, K, h, w) cosine;
decoder -> logits (B, K, 4h, 4w), i.e. 1/4 of the input.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import ClipVisual, PromptTextEncoder, check_shapes, clip_architecture, input_stats, load_clip
from .config import ModelConfig
from .errors import WeakclipError

# Checkpoint key of the text position table when CLIP's weights are stored with the refiner's.
TEXT_POSITIONS = "text.positional_embedding"


def deconv2x2(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2)`` for 2x2 kernels, as one matrix product.

    Each input pixel writes its own 2x2 output block, so the deconvolution is a (C_in -> 4 C_out) product
    followed by a pixel shuffle; on CPUs this is faster than the library deconvolution, forward and backward.
    x (B, C_in, h, w), weight (C_in, C_out, 2, 2), bias (C_out,) -> (B, C_out, 2h, 2w).
    """
    b, c, h, w = x.shape
    n = weight.shape[1]
    y = torch.matmul(x.permute(0, 2, 3, 1), weight.reshape(c, n * 4))  # (B, h, w, C_out * 4)
    y = y.reshape(b, h, w, n, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, n, 2 * h, 2 * w)
    return y if bias is None else y + bias.view(1, n, 1, 1)


class Deconv2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(cin, cout, 2, stride=2)`` (same parameters and init) computed by :func:`deconv2x2`."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 2, stride=2)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        return deconv2x2(x, self.weight, self.bias)


class PyramidAdapter(nn.Module):
    """Turns four 1/16 ViT taps into 1/4, 1/8, 1/16 and 1/32 maps (GroupNorm(1) first on every level).

    The 1/32 max-pool floors odd grids, as the released code and ``nn.MaxPool2d``'s default do.
    """

    def __init__(self, width: int):
        super().__init__()
        self.level1 = nn.Sequential(
            nn.GroupNorm(1, width),
            Deconv2x2(width, width),
            nn.BatchNorm2d(width),
            nn.GELU(),
            Deconv2x2(width, width),
        )
        self.level2 = nn.Sequential(nn.GroupNorm(1, width), Deconv2x2(width, width))
        self.level3 = nn.GroupNorm(1, width)
        self.level4 = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(2, stride=2))

    def levels(self) -> list[nn.Module]:
        return [self.level1, self.level2, self.level3, self.level4]

    def forward(self, taps: list[Tensor]) -> list[Tensor]:
        """taps: 4 x (B, C, h, w) -> [(B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w), (B, C, h // 2, w // 2)]."""
        return [level(tap) for level, tap in zip(self.levels(), taps)]


def fused_lateral(level: nn.Module, lateral: nn.Conv2d, tap: Tensor, score: Tensor | None) -> Tensor:
    """``lateral(cat([level(tap), resize(score)]))`` without building the concatenated wide map.

    The 1x1 lateral is split into its adapter part and its score-map part, so the (C + K)-channel
    concatenation is never copied. When the adapter level ends in a 2x2 stride-2 deconvolution, that
    deconvolution and the lateral's adapter part, both linear, compose into one deconvolution straight to
    the neck width (768 -> 256 channels at 1/4 instead of 768 -> 768 and then 789 -> 256): the same function
    of the same parameters with about a third of the work, and no 768-channel 1/4-resolution map is stored
    for backward.

    tap (B, C, h, w), score (B, K, h', w') or None -> (B, lateral.out_channels, *level output size*).
    """
    width = lateral.in_channels - (score.shape[1] if score is not None else 0)
    w_feat = lateral.weight[:, :width, 0, 0]  # (N, C)
    last = level[-1] if isinstance(level, nn.Sequential) else level
    if isinstance(last, Deconv2x2):
        weight = torch.einsum("icxy,nc->inxy", last.weight, w_feat)  # (C_in, N, 2, 2)
        out = deconv2x2(level[:-1](tap), weight, w_feat @ last.bias + lateral.bias)
    else:
        out = F.conv2d(level(tap), w_feat[:, :, None, None], lateral.bias)
    if score is not None:
        s = F.interpolate(score, size=out.shape[2:], mode="bilinear", align_corners=True)
        out = out + torch.einsum("nk,bkhw->bnhw", lateral.weight[:, width:, 0, 0], s)
    return out


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


class CoAttention(nn.Module):
    """Co-attention matching (Eq. 7-8): text attends to pixels and pixels attend to text, each through a
    chain of decoder layers at ``width``; the updates are added back with per-channel scales alpha/beta.

    With ``chained`` false (the released form) every layer is applied to the projected inputs and only the
    last layer's output is kept, so only that layer matters: it alone is run.
    """

    def __init__(self, dim: int, width: int, heads: int, layers: int, dropout: float, alpha: float, beta: float,
                 chained: bool = True):
        super().__init__()
        self.chained = chained
        self.visual_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.text_layers = nn.ModuleList(DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.visual_layers = nn.ModuleList(DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.text_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.visual_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.apply(self._init)
        # alpha scales the text update (Eq. 7), beta the pixel update (Eq. 8).
        self.alpha = nn.Parameter(torch.full((dim,), alpha))
        self.beta = nn.Parameter(torch.full((dim,), beta))

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
        """text (B, K, D), visual (B, N, D) -> the branch outputs (B, K, D) and (B, N, D) before alpha/beta."""
        v, t = self.visual_proj(visual), self.text_proj(text)
        if self.chained:  # each layer refines the previous layer's output
            t_out, v_out = t, v
            for layer in self.text_layers:
                t_out = layer(t_out, v)
            for layer in self.visual_layers:
                v_out = layer(v_out, t)
        else:
            t_out, v_out = self.text_layers[-1](t, v), self.visual_layers[-1](v, t)
        return self.text_out(t_out), self.visual_out(v_out)

    def forward(self, text: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """text (B, K, D), visual (B, N, D) -> updated text (B, K, D) and visual (B, N, D)."""
        d_text, d_visual = self.deltas(text, visual)
        return text + self.alpha * d_text, visual + self.beta * d_visual


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPNNeck(nn.Module):
    """Feature pyramid: 1x1 laterals, top-down nearest-upsampled sums, 3x3 output convs (no norm)."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """feats: (B, C_i, *) per level -> (B, channels, *) per level."""
        return self.top_down([conv(f) for conv, f in zip(self.lateral, feats)])

    def top_down(self, lat: list[Tensor]) -> list[Tensor]:
        """Lateral outputs (B, channels, *) per level, finest first -> the neck's outputs, same shapes."""
        lat = list(lat)
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class SemanticFPNHead(nn.Module):
    """Semantic-FPN head: level i gets max(1, i) Conv-BN-ReLU blocks with x2 upsampling to the 1/4 level;
    the four maps are summed, then dropout and a 1x1 classifier."""

    def __init__(self, channels: int, num_classes: int, dropout: float, levels: int = 4):
        super().__init__()
        self.branches = nn.ModuleList()
        for level in range(levels):
            blocks: list[nn.Module] = []
            for _ in range(max(1, level)):
                blocks.append(conv_bn_relu(channels, channels))
                if level > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.branches.append(nn.Sequential(*blocks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def features(self, feats: list[Tensor]) -> Tensor:
        """feats: 4 x (B, channels, *) at 1/4..1/32 -> the branches' sum (B, channels, H/4, W/4).

        Each branch's output is bilinearly resized to the finest level's size and added (Semantic FPN).
        Every coarser branch ends in the same x2 bilinear upsampling, a linear map, so the branches whose
        pre-upsampling size is exactly half the finest are summed first and upsampled once: the same sum
        with a third of the 1/4-resolution work. A branch that does not land on the finest size (the
        floored 1/32 level of an odd grid) is upsampled and resized on its own, as the definition says.
        """
        out = self.branches[0](feats[0])
        half = (out.shape[2] // 2, out.shape[3] // 2)
        shared = 2 * half[0] == out.shape[2] and 2 * half[1] == out.shape[3]
        coarse = None
        for branch, f in zip(self.branches[1:], feats[1:]):
            y = branch[:-1](f)
            if shared and y.shape[2:] == half:
                coarse = y if coarse is None else coarse + y
                continue
            y = branch[-1](y)
            if y.shape[2:] != out.shape[2:]:
                y = F.interpolate(y, size=out.shape[2:], mode="bilinear", align_corners=False)
            out = out + y
        if coarse is not None:
            out = out + F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=False)
        return out

    def forward(self, feats: list[Tensor]) -> Tensor:
        """feats: 4 x (B, channels, *) at 1/4..1/32 -> logits (B, K, H/4, W/4)."""
        return self.classifier(self.dropout(self.features(feats)))


def cosine_score_map(text: Tensor, dense: Tensor) -> Tensor:
    """Eq. 4/9: text (B, K, D) and dense pixels (B, D, h, w) -> cosine similarities (B, K, h, w) in [-1, 1]."""
    return torch.einsum("bkd,bdhw->bkhw", F.normalize(text, dim=-1), F.normalize(dense, dim=1))


class WeakCLIP(nn.Module):
    """Frozen CLIP + learnable prompts + pyramid adapter + co-attention + text-guided decoder.

    ``forward(images)`` takes (B, 3, H, W) RGB in 0..255 (uint8 or float) and returns a dict with
    ``logits`` (B, K, ceil(H/4), ceil(W/4)) and ``score_map`` (B, K, ceil(H/16), ceil(W/16)) (cosine); with
    ``cfg.released`` the sizes are 4 floor(H/16) and floor(H/16), as the released patch convolution truncates.
    """

    def __init__(self, cfg: ModelConfig, class_names: list[str], clip_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names)
        released = cfg.released
        clip_model = clip_model if clip_model is not None else load_clip(cfg.clip)
        self.visual = ClipVisual(clip_model.visual, cfg.clip.taps, cfg.clip.class_token_twice or released,
                                 truncate=released)
        self.text = PromptTextEncoder(
            clip_model, self.class_names, cfg.n_ctx, cfg.name_length, cfg.learnable_prompts,
            cfg.prompt_template, cfg.ctx_init_std,
        )
        mean, std = input_stats("imagenet" if released else cfg.clip.normalize)
        # 0..255 constants computed in float64, so that they round to the released configs' float32 values.
        self.register_buffer("mean", torch.tensor([m * 255 for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([s * 255 for s in std]).view(1, 3, 1, 1), persistent=False)
        width, dim, k = self.visual.width, self.visual.embed_dim, len(self.class_names)
        self.co_attention = (
            CoAttention(dim, cfg.coattn_width, cfg.coattn_heads, cfg.coattn_layers, cfg.coattn_dropout,
                        cfg.alpha_init, cfg.beta_init, chained=not released)
            if cfg.co_attention else None
        )
        if cfg.pyramid_adapter:
            self.adapter = PyramidAdapter(width)
            self.adapter.requires_grad_(cfg.train_adapter)
            # Without the text-guided decoder the score map joins only the 1/16 level (as DenseCLIP).
            self.score_levels = (0, 1, 2, 3) if cfg.text_guided_decoder else (2,)
            in_ch = [width + (k if i in self.score_levels else 0) for i in range(4)]
            self.neck = FPNNeck(in_ch, cfg.decoder_channels)
            self.head = SemanticFPNHead(cfg.decoder_channels, k, cfg.decoder_dropout)
        else:
            self.adapter = self.neck = self.head = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB 0..255 -> float32 (x - mean) / std, the network's input."""
        return (images.float() - self.mean) / self.std

    def forward(self, images: Tensor, text: Tensor | None = None) -> dict[str, Tensor]:
        """images (B, 3, H, W) RGB 0..255 -> {"logits": (B, K, ceil(H/4), ceil(W/4)), "score_map": (B, K, h, w)}.

        ``text``: the class embeddings (K, D) of ``self.text()``, which do not depend on the images; pass
        them to reuse one computation over many forwards (inference), else they are computed here.
        """
        return self.forward_normalized(self.normalize(images), text)

    def forward_normalized(self, x: Tensor, text: Tensor | None = None) -> dict[str, Tensor]:
        """:meth:`forward` on an already normalised input x (B, 3, H, W)."""
        feats = self.visual(x)
        text = (self.text() if text is None else text).unsqueeze(0).expand(x.shape[0], -1, -1)
        dense = feats.dense
        if self.co_attention is not None:
            b, d, h, w = dense.shape
            tokens = torch.cat([feats.global_embedding[:, None], dense.flatten(2).transpose(1, 2)], dim=1)
            text, tokens = self.co_attention(text, tokens)
            dense = tokens[:, 1:].transpose(1, 2).reshape(b, d, h, w)
        score = cosine_score_map(text, dense)
        out_size = (-(-x.shape[2] // 4), -(-x.shape[3] // 4))
        if self.adapter is None:
            # Matching-only ablation: the scaled score map is the prediction.
            logits = F.interpolate(score / 0.07, size=out_size, mode="bilinear", align_corners=False)
            return {"logits": logits, "score_map": score}
        laterals = [
            fused_lateral(level, lateral, tap, score if i in self.score_levels else None)
            for i, (level, lateral, tap) in enumerate(zip(self.adapter.levels(), self.neck.lateral, feats.taps))
        ]
        logits = self.head(self.neck.top_down(laterals))
        return {"logits": logits[:, :, : out_size[0], : out_size[1]], "score_map": score}

    # ------------------------------------------------------------------------------- parameters, state

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, trainable and per module (CLIP towers, prompts, alpha/beta, ...)."""
        groups: dict[str, int] = OrderedDict()
        groups["clip_visual"] = sum(p.numel() for p in self.visual.parameters())
        text_tower = sum(p.numel() for n, p in self.text.named_parameters() if n != "ctx")
        groups["clip_text"] = text_tower
        groups["prompts"] = self.text.ctx.numel() if self.text.ctx is not None else 0
        if self.co_attention is not None:
            ab = self.co_attention.alpha.numel() + self.co_attention.beta.numel()
            groups["co_attention"] = sum(p.numel() for p in self.co_attention.parameters()) - ab
            groups["alpha_beta"] = ab
        for name in ("adapter", "neck", "head"):
            module = getattr(self, name)
            if module is not None:
                groups[name] = sum(p.numel() for p in module.parameters())
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"total": total, "trainable": trainable, "trainable_share": round(trainable / total, 4), **groups}

    def weakclip_state_dict(self) -> dict[str, Tensor]:
        """Everything but the frozen CLIP weights (those come from the CLIP checkpoint): params and BN stats.

        With ``cfg.clip.in_checkpoint`` the CLIP weights are kept too, the text tower's position table
        (a buffer outside ``state_dict``) included.
        """
        state = self.state_dict()
        if self.cfg.clip.in_checkpoint:
            return {**state, TEXT_POSITIONS: self.text.positional_embedding}
        frozen = ("visual.", "text.")  # CLIP's own weights; the prompts (text.ctx) are ours
        return {k: v for k, v in state.items() if k == "text.ctx" or not k.startswith(frozen)}

    def load_weakclip_state_dict(self, state: dict[str, Tensor], source: str) -> None:
        """Load :meth:`weakclip_state_dict` output; a key whose shape differs is one clear error line."""
        own = self.weakclip_state_dict()
        check_shapes(own, state, source, "the model built from this config")
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            detail = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
            raise WeakclipError(f"{source}: checkpoint does not fit the model built from this config ({detail})")
        state = dict(state)
        positions = state.pop(TEXT_POSITIONS, None)
        self.load_state_dict(state, strict=False)
        if positions is not None:
            self.text.positional_embedding.copy_(positions)


def build_model(cfg: ModelConfig, class_names: list[str], clip_model: nn.Module | None = None) -> WeakCLIP:
    """Build WeakCLIP for ``class_names``; CLIP comes from ``cfg.clip`` unless a model is passed in."""
    if len(class_names) < 2:
        raise WeakclipError("data.class_names: need at least two classes (background and one object)")
    return WeakCLIP(cfg, class_names, clip_model)


def build_architecture(cfg: ModelConfig, class_names: list[str]) -> WeakCLIP:
    """WeakCLIP with every tensor on the meta device: shapes and parameter counts, no weights (``weakclip info``)."""
    with torch.device("meta"):
        return build_model(cfg, class_names, clip_architecture(cfg.clip))
