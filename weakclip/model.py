"""The WeakCLIP network over a frozen CLIP: backbone taps -> pyramid adapter; prompts -> text embeddings;
co-attention matching -> cosine score map; text-guided decoder (score map joined to the pyramid, FPN neck,
Semantic-FPN head) -> logits at 1/4 of the input.

Shapes for a (B, 3, H, W) input, K classes, with ViT-B/16 (taps 4 x 768 channels at 1/16, D = 512) or RN50
(taps 256, 512, 1024, 2048 channels at 1/4, 1/8, 1/16, 1/32, D = 1024, pixels at 1/32):
adapter -> (B, C_i, H/4, W/4), (B, C_i, H/8, W/8), (B, C_i, H/16, W/16), (B, C_i, H/32, W/32);
co-attention + score map -> (B, K, h, w) cosine at the backbone's dense stride;
neck -> 4 x (B, 256, *) -> head -> logits (B, K, H/4, W/4).
The parts are registered and swappable: ``weakclip.backbones`` and ``weakclip.coattention``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import VisualBackbone, VisualFeatures, build_backbone
from .clip import (
    PromptTextEncoder,
    cast_frozen_,
    check_shapes,
    clip_architecture,
    input_stats,
    load_clip,
    resize_positions_as_released,
)
from .coattention import build_co_attention
from .config import ModelConfig
from .errors import WeakclipError
from .precision import HALF

# Checkpoint key of the text position table when CLIP's weights are stored with the refiner's.
TEXT_POSITIONS = "text.positional_embedding"


def deconv2x2(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2)`` for 2x2 kernels, as one matrix product.

    Each input pixel writes its own 2x2 output block, so the deconvolution is a (C_in -> 4 C_out) product
    followed by a pixel shuffle of whole channel vectors. The result is returned in channels-last memory,
    which the following norms, convolutions and 1x1 laterals read without reordering; on CPUs this is faster
    than the library deconvolution, forward and backward.
    x (B, C_in, h, w), weight (C_in, C_out, 2, 2), bias (C_out,) -> (B, C_out, 2h, 2w), channels-last.
    """
    b, c, h, w = x.shape
    n = weight.shape[1]
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
    cols = weight.permute(0, 2, 3, 1).reshape(c, 4 * n)  # (C_in, dy * dx * C_out)
    y = rows @ cols if bias is None else torch.addmm(bias.repeat(4), rows, cols)
    y = y.reshape(b, h, w, 2, 2, n).transpose(2, 3).reshape(b, 2 * h, 2 * w, n)
    return y.permute(0, 3, 1, 2)


class Deconv2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(cin, cout, 2, stride=2)`` (same parameters and init) computed by :func:`deconv2x2`."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 2, stride=2)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        return deconv2x2(x, self.weight, self.bias)


def adapter_level(channels: int, factor: float) -> nn.Module:
    """GroupNorm(1), then resampling by ``factor``: 2x2 deconvolutions (with BatchNorm and GELU between them)
    to enlarge, a max-pool (flooring odd sizes, as released) to shrink, nothing at 1."""
    norm = nn.GroupNorm(1, channels)
    if factor == 1:
        return norm
    if factor < 1:
        return nn.Sequential(norm, nn.MaxPool2d(round(1 / factor), stride=round(1 / factor)))
    layers: list[nn.Module] = [norm, Deconv2x2(channels, channels)]
    for _ in range(round(math.log2(factor)) - 1):
        layers += [nn.BatchNorm2d(channels), nn.GELU(), Deconv2x2(channels, channels)]
    return nn.Sequential(*layers)


def same_size_level(channels: int, convs: int) -> nn.Module:
    """GroupNorm(1), then ``convs`` 3x3 convolutions that keep the size (BatchNorm and GELU between two):
    the released ResNet adapter's levels (``CLIPResNetWithAttention`` ``fpn1`` .. ``fpn4``, same key order)."""
    norm = nn.GroupNorm(1, channels)
    if not convs:
        return norm
    layers: list[nn.Module] = [norm, nn.Conv2d(channels, channels, 3, padding=1)]
    for _ in range(convs - 1):
        layers += [nn.BatchNorm2d(channels), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1)]
    return nn.Sequential(*layers)


# 3x3 convolutions per level of the released ResNet adapter: fpn1 two (BN, GELU between), fpn2 and fpn4 one,
# fpn3 none (a bare GroupNorm); they take the place of the ViT adapter's resampling.
RESNET_LEVEL_CONVS = (2, 1, 0, 1)


class PyramidAdapter(nn.Module):
    """The pyramid adapter (Sec. 3.3.2): each tap, on its own, to one level of a 1/4, 1/8, 1/16, 1/32 pyramid
    (relative to the third tap's stride s: s/4, s/2, s, 2s).

    A ViT's four taps all sit at 1/16: the first is enlarged 4x (deconv, BN, GELU, deconv), the second 2x, the
    third kept, the fourth max-pooled to 1/32. A ResNet's stages already form that pyramid: as in the released
    ``CLIPResNetWithAttention``, 3x3 convolutions take the place of the resampling (level 1: conv, BN, GELU,
    conv; levels 2 and 4: one conv; level 3: none) and sizes are kept. GroupNorm(1) comes first on every level.
    """

    def __init__(self, channels: list[int], strides: list[int]):
        super().__init__()
        factors = [strides[i] / (strides[2] * 2.0 ** (i - 2)) for i in range(4)]
        if any(f <= 0 or not math.log2(f).is_integer() for f in factors):
            raise WeakclipError(f"the pyramid adapter needs tap strides that are powers of two apart from "
                                f"s/4, s/2, s, 2s; the backbone's are {strides}")
        if all(f == 1 for f in factors):
            levels = [same_size_level(c, n) for c, n in zip(channels, RESNET_LEVEL_CONVS)]
        else:
            levels = [adapter_level(c, f) for c, f in zip(channels, factors)]
        self.level1, self.level2, self.level3, self.level4 = levels

    def forward(self, taps: list[Tensor]) -> list[Tensor]:
        """taps: 4 x (B, C_i, h_i, w_i) -> 4 x (B, C_i, *) at 1/4, 1/8, 1/16, 1/32 (odd sizes floor at 1/32)."""
        return [level(tap) for level, tap in zip((self.level1, self.level2, self.level3, self.level4), taps)]


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPNNeck(nn.Module):
    """The text-guided FPN neck (Sec. 3.3.4): the score map, resized to each level in ``score_levels``
    (bilinear, corner-aligned), is concatenated after that level's channels; then 1x1 laterals, top-down
    nearest-upsampled sums and 3x3 output convs (no norm).

    Each lateral's weight is split into its feature part and its score part, so the (C + K)-channel
    concatenation is never built: lateral([f, s]) = W_f f + W_s s + b, the same function.
    """

    def __init__(self, in_channels: list[int], score_channels: int, score_levels: tuple[int, ...], channels: int):
        super().__init__()
        self.score_levels = tuple(score_levels)
        self.lateral = nn.ModuleList(
            nn.Conv2d(c + (score_channels if i in self.score_levels else 0), channels, 1)
            for i, c in enumerate(in_channels))
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @staticmethod
    def score_at(score: Tensor, size: tuple[int, ...]) -> Tensor:
        """score (B, K, h, w) -> (B, K, *size): bilinear, corner-aligned (as released)."""
        return F.interpolate(score, size=tuple(size), mode="bilinear", align_corners=True)

    def inputs(self, feats: list[Tensor], score: Tensor) -> list[Tensor]:
        """The (B, C_i [+ K], *) inputs the laterals see, concatenated (the forward never builds them)."""
        return [torch.cat([f, self.score_at(score, f.shape[2:])], 1) if i in self.score_levels else f
                for i, f in enumerate(feats)]

    def _lateral(self, i: int, feat: Tensor, score: Tensor) -> Tensor:
        conv = self.lateral[i]
        c = feat.shape[1]
        out = F.conv2d(feat, conv.weight[:, :c], conv.bias)
        if i in self.score_levels:
            out = out + F.conv2d(self.score_at(score, feat.shape[2:]), conv.weight[:, c:])
        return out

    def forward(self, feats: list[Tensor], score: Tensor) -> list[Tensor]:
        """feats: 4 x (B, C_i, *) finest first, score (B, K, h, w) -> 4 x (B, channels, *), same sizes."""
        # Channels-last throughout: the deconvolved levels already are, and the convolutions run faster on it.
        lat = [self._lateral(i, f.contiguous(memory_format=torch.channels_last), score) for i, f in enumerate(feats)]
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

    ``forward(images)`` takes (B, 3, H, W) RGB in 0..255 (uint8 or float) and returns a dict with ``logits``
    (B, K, ceil(H/4), ceil(W/4)) and ``score_map`` (B, K, h, w) (cosine, at the backbone's dense stride: ceil(H/16)
    for ViT-B/16); with ``cfg.released`` a ViT's sizes are 4 floor(H/16) and floor(H/16), as the released
    patch convolution truncates.

    The frozen CLIP towers compute in ``compute_dtype`` (float32 unless :meth:`set_compute_dtype` says
    otherwise) outside any autocast region; the trainable modules hold float32 weights and take float32
    inputs, under the caller's autocast when there is one.
    """

    def __init__(self, cfg: ModelConfig, class_names: list[str], clip_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names)
        released = cfg.released
        clip_model = clip_model if clip_model is not None else load_clip(cfg.clip)
        if released and not cfg.clip.in_checkpoint:  # CLIP's own weights: the released load-time resize
            resize_positions_as_released(clip_model.visual)
        self.visual: VisualBackbone = build_backbone(clip_model.visual, cfg.backbone, released)
        self.text = PromptTextEncoder(
            clip_model, self.class_names, cfg.n_ctx, cfg.name_length, cfg.learnable_prompts,
            cfg.prompt_template, cfg.ctx_init_std,
        )
        mean, std = input_stats("imagenet" if released else cfg.clip.normalize)
        # 0..255 constants computed in float64, so that they round to the released configs' float32 values.
        self.register_buffer("mean", torch.tensor([m * 255 for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([s * 255 for s in std]).view(1, 3, 1, 1), persistent=False)
        k = len(self.class_names)
        self.co_attention = build_co_attention(cfg.co_attention, self.visual.embed_dim)
        if cfg.pyramid_adapter:
            channels = self.visual.tap_channels
            self.adapter = PyramidAdapter(channels, self.visual.tap_strides)
            self.adapter.requires_grad_(cfg.train_adapter)
            # Without the text-guided decoder the score map joins only the 1/16 level (as DenseCLIP).
            score_levels = (0, 1, 2, 3) if cfg.text_guided_decoder else (2,)
            self.neck = FPNNeck(channels, k, score_levels, cfg.decoder_channels)
            self.head = SemanticFPNHead(cfg.decoder_channels, k, cfg.decoder_dropout)
        else:
            self.adapter = self.neck = self.head = None
        self.compute_dtype = torch.float32

    def set_compute_dtype(self, dtype: torch.dtype) -> WeakCLIP:
        """Hold the frozen CLIP towers (image and text) in ``dtype``, cast once here (:func:`cast_frozen_`);
        they then run outside autocast, and the trainable modules run under autocast of ``dtype`` (the
        inference predictor and the training loop open it). float32 is the default and exact; bf16 and fp16
        pay only where the hardware has them (:func:`weakclip.precision.native`). Returns the model."""
        cast_frozen_(self.visual, dtype)
        cast_frozen_(self.text, dtype)
        self.compute_dtype = dtype
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB 0..255 -> float32 (x - mean) / std, the network's input."""
        return (images.float() - self.mean) / self.std

    def forward(self, images: Tensor, text: Tensor | None = None) -> dict[str, Tensor]:
        """images (B, 3, H, W) RGB 0..255 -> {"logits": (B, K, ceil(H/4), ceil(W/4)), "score_map": (B, K, h, w)}.

        ``text``: the class embeddings (K, D) of :meth:`class_embeddings`, which do not depend on the images;
        pass them to reuse one computation over many forwards (inference), else they are computed here.
        """
        return self.forward_normalized(self.normalize(images), text)

    def class_embeddings(self) -> Tensor:
        """The prompts through the frozen text tower -> class embeddings (K, D) float32. The tower runs in
        :attr:`compute_dtype` outside autocast; gradients reach the learnable context."""
        with torch.autocast(self.mean.device.type, enabled=False):
            text = self.text()
        return text.float() if self.compute_dtype in HALF else text

    def forward_normalized(self, x: Tensor, text: Tensor | None = None) -> dict[str, Tensor]:
        """:meth:`forward` on an already normalised input x (B, 3, H, W)."""
        half = self.compute_dtype in HALF
        # The frozen tower runs in its own dtype: under autocast its weights would be cast at every call.
        with torch.autocast(x.device.type, enabled=False):
            feats = self.visual(x.to(self.compute_dtype) if half else x)  # taps, pixel and global embeddings
        if half:  # the trainable modules take float32 (autocast, when open, casts for them)
            feats = VisualFeatures([t.float() for t in feats.taps], feats.dense.float(),
                                   feats.global_embedding.float())
        text = (self.class_embeddings() if text is None else text).expand(x.shape[0], -1, -1)  # (B, K, D)
        text, pixels = self.co_attention(text, feats.dense, feats.global_embedding)  # Eq. 7-8
        score = cosine_score_map(text, pixels)  # Eq. 9
        out_size = (-(-x.shape[2] // 4), -(-x.shape[3] // 4))
        if self.adapter is None:
            # Matching-only ablation: the scaled score map is the prediction.
            logits = F.interpolate(score / 0.07, size=out_size, mode="bilinear", align_corners=False)
            return {"logits": logits, "score_map": score}
        pyramid = self.adapter(feats.taps)  # 1/4, 1/8, 1/16, 1/32
        logits = self.head(self.neck(pyramid, score))  # text-guided decoder
        return {"logits": logits[:, :, : out_size[0], : out_size[1]], "score_map": score}

    # ------------------------------------------------------------------------------- parameters, state

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, trainable, frozen and per module (CLIP towers, prompts, alpha/beta, ...)."""
        groups: dict[str, int] = OrderedDict()
        groups["clip_visual"] = sum(p.numel() for p in self.visual.parameters())
        groups["clip_text"] = sum(p.numel() for n, p in self.text.named_parameters() if n != "ctx")
        groups["prompts"] = self.text.ctx.numel() if self.text.ctx is not None else 0
        scales = [p for n, p in self.co_attention.named_parameters() if n in ("alpha", "beta")]
        groups["co_attention"] = sum(p.numel() for p in self.co_attention.parameters()) - sum(p.numel() for p in scales)
        groups["alpha_beta"] = sum(p.numel() for p in scales)
        for name in ("adapter", "neck", "head"):
            module = getattr(self, name)
            if module is not None:
                groups[name] = sum(p.numel() for p in module.parameters())
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"total": total, "trainable": trainable, "frozen": total - trainable,
                "trainable_share": round(trainable / total, 4), **groups}

    def weakclip_state_dict(self) -> dict[str, Tensor]:
        """Everything but the frozen CLIP weights (those come from the CLIP checkpoint): params and BN stats.

        With ``cfg.clip.in_checkpoint`` the CLIP weights are kept too, the text tower's position table
        (a buffer outside ``state_dict``) included, in float32 whatever :attr:`compute_dtype` (a model cast to
        a half type stores its rounded values).
        """
        state = self.state_dict()
        if self.cfg.clip.in_checkpoint:
            state = {**state, TEXT_POSITIONS: self.text.positional_embedding}
            return {k: v.float() if v.dtype in HALF else v for k, v in state.items()}
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
