"""CLIP-ES (Lin et al., CVPR 2023): CAMs and seeds from image-level labels with a frozen CLIP ViT, no training.

Per image, with K image labels and B background words scored together:

1. the image at one scale, each side rounded up to a multiple of the patch size (PIL bicubic);
2. every block but the last without autograd, keeping the head-averaged attention of the blocks CAA uses;
3. the last block once with autograd; image embedding = mean of the patch tokens after ``ln_post``,
   projected; softmax over the K labels + B background words of ``exp(logit_scale) * cos``;
4. Grad-CAM of each label's probability at the last block's ``ln_1`` output, from the single forward:
   the backward is linear in its seed gradient, so on accelerators the K backwards run as one batched
   (vmapped) backward; on CPUs, where that measured slower, one backward per label;
5. class-aware attention affinity (CAA): the mean attention of the last ``caa_layers`` blocks, Sinkhorn
   normalised, symmetrised and squared, applied to each CAM from the source tokens inside the CAM's
   threshold boxes; min-max, bilinear resize to the image size, float16;
6. seeds: background (1 - max_k cam)^power; optionally a dense CRF over background + the image's labels,
   pixels whose CRF confidence is below ``confidence`` become 255.

``released: true`` reproduces the released code (linyq2117/CLIP-ES) number for number, including its box
clamp that drops the last grid row and column, its colour image for the CRF (BGR minus the mean, wrapped to
uint8) and its fp16-rounded positional embedding; the default fixes those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from PIL import Image
from torch import Tensor, nn

from .clip import CLIP_MEAN, CLIP_STD, cast_frozen_, resize_positions
from .config import SeedsConfig
from .crf import dense_crf_pydensecrf
from .errors import WeakclipError
from .precision import HALF, compute_dtype, warn_if_slow

# The released code's "mean_bgr" subtracted from the CRF colour image (its bug; see ``crf_image``).
CRF_MEAN_BGR = (104.008, 116.669, 122.675)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise WeakclipError('CLIP-ES seeds need OpenCV: pip install "weakclip[seeds]"') from None
    return cv2


# ------------------------------------------------------------------------------------------------- text


def prompt_tokens(prompts: Sequence[str], context_length: int, names: Sequence[str] | None = None) -> Tensor:
    """CLIP BPE tokens (N, context_length) of ``prompts``; a prompt that does not fit is an error, not cut."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    out = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for i, text in enumerate(prompts):
        ids = [tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id]
        if len(ids) > context_length:
            name = f"class {names[i]!r}" if names else f"prompt {text!r}"
            raise WeakclipError(f"seeds: {name}: its prompt {text!r} is {len(ids)} tokens but CLIP's text "
                                f"context holds {context_length} (shorten the name, seeds.prompt_names or "
                                f"seeds.template)")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _encode_one(model: nn.Module, tokens: Tensor) -> Tensor:
    """One prompt (1, ctx) through the text tower with the explicit-softmax attention -> (1, D)."""
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in model.transformer.resblocks:
        x, _ = _attend(block, x, model.attn_mask)
    x = model.ln_final(x)[:, int(tokens[0].argmax())]
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


@torch.no_grad()
def text_features(model: nn.Module, tokens: Tensor, exact: bool = False) -> Tensor:
    """L2-normalised text embeddings (N, D) of tokens (N, ctx), one prompt (template) per row.

    ``exact`` encodes one prompt at a time with the explicit-softmax attention, as the released code does
    (open_clip's batched fused attention differs by ~2e-7); it needs open_clip's plain CLIP text tower.
    """
    if exact and hasattr(model, "token_embedding") and getattr(model, "text_pool_type", "argmax") == "argmax":
        feats = torch.cat([_encode_one(model, t[None]) for t in tokens])
    else:
        feats = model.encode_text(tokens)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return feats / feats.norm(dim=-1, keepdim=True)  # the template mean (of one) is normalised again


def class_prompts(class_names: Sequence[str], cfg: SeedsConfig) -> tuple[list[str], list[str]]:
    """Names and prompts of the foreground classes (class_names[1:]), then of the background words."""
    names = list(class_names[1:]) + list(cfg.background)
    words = [cfg.prompt_names.get(name, name) for name in class_names[1:]] + list(cfg.background)
    if cfg.template.count("{}") != 1:
        raise WeakclipError(f"seeds.template: {cfg.template!r} must hold one '{{}}' for the class name")
    return names, [cfg.template.replace("{}", w) for w in words]


# ------------------------------------------------------------------------------------------------ image


def preprocess(image: np.ndarray, patch: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, ceil(H/p)*p, ceil(W/p)*p) CLIP-normalised ``dtype`` (PIL bicubic)."""
    h, w = image.shape[:2]
    gh, gw = -(-h // patch), -(-w // patch)
    resized = np.asarray(Image.fromarray(image).resize((gw * patch, gh * patch), Image.BICUBIC))
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).to(dtype).div(255)
    mean, std = torch.tensor(CLIP_MEAN, dtype=dtype), torch.tensor(CLIP_STD, dtype=dtype)
    return ((x - mean[:, None, None]) / std[:, None, None])[None]


def positional_embedding(visual: VisionTransformer, gh: int, gw: int, round_fp16: bool) -> Tensor:
    """(1 + gh*gw, C): class row + the checkpoint's grid bilinearly resized (align_corners false) to gh x gw."""
    grid = tuple(int(g) for g in visual.grid_size)
    work = _work_dtype(visual.positional_embedding.dtype)
    pos = resize_positions(visual.positional_embedding.to(work), grid, (gh, gw))
    return pos.half().to(work) if round_fp16 else pos


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the half types, the dtype itself otherwise: maps are summed and normalised in at least
    float32, and a float64 run (the parity check's rounding measure) stays float64 throughout."""
    return torch.promote_types(dtype, torch.float32)


def _numpy(x: Tensor) -> np.ndarray:
    return x.to(_work_dtype(x.dtype)).cpu().numpy()


def check_visual(visual: nn.Module) -> None:
    """CLIP-ES needs a plain ViT: standard residual attention blocks with nn.MultiheadAttention."""
    if not isinstance(visual, VisionTransformer):
        raise WeakclipError(f"CLIP-ES seeds need a CLIP ViT image tower; got {type(visual).__name__} (make the seeds "
                            f"with a ViT config, e.g. weakclip seeds --config voc, and train on them via data.seeds_dir)")
    blocks = visual.transformer.resblocks
    if not all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, nn.MultiheadAttention)
               for b in blocks):
        raise WeakclipError("CLIP-ES seeds need open_clip's standard ViT blocks (nn.MultiheadAttention)")
    if visual.proj is None:
        raise WeakclipError("CLIP-ES seeds need a CLIP ViT with an output projection (visual.proj)")


def _attend(block: ResidualAttentionBlock, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One block on (1, L, C) tokens; returns the new tokens and the head-averaged attention (L, L)."""
    y = block.ln_1(x)
    a, weights = block.attn(y, y, y, need_weights=True, attn_mask=mask)
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x))), weights[0]


@torch.no_grad()
def encode_until_last(visual: VisionTransformer, pixels: Tensor, attn_from: int, round_pos: bool,
                      exact: bool) -> tuple[Tensor, list[Tensor]]:
    """Tokens entering the last block (1, L, C) and the attention maps (L, L) of blocks ``attn_from``..depth-2.

    Blocks before ``attn_from`` need no attention map and run open_clip's fused attention unless ``exact``
    (then every block takes the explicit softmax path, as the released code does).
    """
    x = visual.conv1(pixels)
    _, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(1, 1, c), x], dim=1)
    x = visual.ln_pre(x + positional_embedding(visual, gh, gw, round_pos).to(x.dtype))
    attns = []
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks[:-1]):
        if i >= attn_from or exact:
            x, weights = _attend(block, x)
            if i >= attn_from:
                attns.append(weights)
        else:
            x = block(x)
    return x, attns


@dataclass
class LastBlock:
    """Outputs of :func:`last_block_gradcam` for K labels on an h x w grid (n = h*w, C channels).

    probs: (K + B,) softmax; activation: (n, C) ``ln_1`` output of the patch tokens; grads: (K, n, C)
    d probs[k] / d activation; attention: (L, L) the last block's head-averaged attention; image_embed: (D,).
    """

    probs: Tensor
    activation: Tensor
    grads: Tensor
    attention: Tensor
    image_embed: Tensor


def last_block_gradcam(model: nn.Module, tokens: Tensor, text: Tensor, k: int, batched: bool = True) -> LastBlock:
    """The last block once with autograd, scores against ``text`` (K + B, D) and the K labels' gradients:
    one batched backward, or (``batched`` false) one backward per label as released (the same values up
    to float summation order, ~1e-10)."""
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    with torch.enable_grad():
        x = tokens.detach()
        y = block.ln_1(x).detach().requires_grad_(True)
        a, weights = block.attn(y, y, y, need_weights=True)
        x = x + block.ls_1(a)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        embed = visual.ln_post(x)[:, 1:].mean(dim=1) @ visual.proj  # (1, D)
        img = embed / embed.norm(dim=-1, keepdim=True)
        txt = text / text.norm(dim=-1, keepdim=True)
        probs = (model.logit_scale.exp() * img @ txt.to(img.dtype).T).softmax(dim=-1)[0]
        if batched:
            seeds = torch.eye(k, probs.shape[0], dtype=probs.dtype, device=probs.device)
            (grads,) = torch.autograd.grad(probs, y, grad_outputs=seeds, is_grads_batched=True)
        else:
            grads = torch.stack([torch.autograd.grad(probs[i], y, retain_graph=i < k - 1)[0] for i in range(k)])
    return LastBlock(probs=probs.detach(), activation=y.detach()[0, 1:], grads=grads[:, 0, 1:],
                     attention=weights.detach()[0], image_embed=embed.detach()[0])


def _minmax(x: np.ndarray) -> np.ndarray:
    """(x - min) / (1e-7 + max of the shifted map), per map over the last two axes."""
    x = x - x.min(axis=(-2, -1), keepdims=True)
    return x / (1e-7 + x.max(axis=(-2, -1), keepdims=True))


def gradcam(activation: np.ndarray, grads: np.ndarray, h: int, w: int) -> np.ndarray:
    """Grad-CAM maps (K, h, w) from activation (n, C) and grads (K, n, C), min-max normalised twice.

    Computed in float32 numpy (float64 for float64 inputs) in the released order (spatial mean of the gradient, weighted channel sum,
    ReLU): the same sums in another order move a float16 CAM by one unit in the last place.
    """
    act = activation.T.reshape(1, -1, h, w)  # (1, C, h, w)
    g = grads.transpose(0, 2, 1).reshape(grads.shape[0], -1, h, w)  # (K, C, h, w)
    weights = np.mean(g, axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * act).sum(axis=1), 0)
    return _minmax(_minmax(cam)).astype(np.promote_types(activation.dtype, np.float32))


# -------------------------------------------------------------------------------------------------- CAA


def transition_matrix(attns: Sequence[Tensor], sinkhorn_iters: int) -> tuple[Tensor, Tensor]:
    """Affinity (n, n) = mean of the attention maps without the class row/column, and the transition
    matrix: ``sinkhorn_iters`` x (column then row normalisation), symmetrised, squared."""
    aff = torch.stack([a[1:, 1:] for a in attns]).mean(dim=0)
    aff = aff.to(_work_dtype(aff.dtype))
    t = aff
    for _ in range(sinkhorn_iters):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    return aff, t @ t


def cam_boxes(cam: np.ndarray, threshold: float, released: bool) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1), exclusive ends, around every contour of ``uint8(255 cam) > threshold * max``.

    The released code clamps the exclusive ends to w-1 / h-1, which drops the last column and row (a
    one-row contour on the bottom row gives an empty box); ``released`` keeps that. No contour gives the
    empty box (0, 0, 0, 0).
    """
    cv2 = _cv2()
    h, w = cam.shape
    s = (cam * 255).astype(np.uint8)
    _, binary = cv2.threshold(s, int(threshold * np.max(s)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return [(0, 0, 0, 0)]
    boxes = []
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        x1, y1 = x + bw, y + bh
        if released:
            x1, y1 = min(x1, w - 1), min(y1, h - 1)
        boxes.append((x, y, x1, y1))
    return boxes


def box_mask(boxes: Sequence[tuple[int, int, int, int]], h: int, w: int, dtype: torch.dtype = torch.float32
             ) -> Tensor:
    """(h*w,) ``dtype``: 1 on grid cells inside any box."""
    mask = torch.zeros(h, w, dtype=dtype)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1
    return mask.reshape(-1)


def resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, h, w) float32 (or float64) -> (K, height, width) with OpenCV's bilinear resize (as released)."""
    cv2 = _cv2()
    return np.stack([cv2.resize(m, (width, height)) for m in maps]).astype(maps.dtype)


# -------------------------------------------------------------------------------------------- the method


class ClipES:
    """CLIP-ES on a frozen open_clip CLIP: ``cams`` per image; text features are computed once here.

    Args:
        model: an open_clip CLIP with a ViT image tower (fp32, eval, frozen); with ``cfg.precision`` fp16 or
            bf16 it is cast to that dtype here, in place, once.
        class_names: all classes, background first (its prompt is never used).
        cfg: the ``seeds`` settings.
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str], cfg: SeedsConfig,
                 device: torch.device | str = "cpu"):
        check_visual(model.visual)
        dtype = compute_dtype(cfg.precision, "seeds.precision")
        if not 0 < cfg.box_threshold < 1:
            raise WeakclipError(f"seeds.box_threshold: expected a number in (0, 1), got {cfg.box_threshold}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if dtype in HALF:  # cast once: no autocast re-casts the frozen weights at every image
            warn_if_slow(dtype, self.device, "seeds.precision")
            cast_frozen_(self.model, dtype)
        self.class_names = list(class_names)
        self.patch = int(model.visual.conv1.kernel_size[0])
        depth = len(model.visual.transformer.resblocks)
        self.attn_from = max(0, depth - cfg.caa_layers)
        context = int(getattr(model, "context_length", 77))
        names, prompts = class_prompts(class_names, cfg)
        self.tokens = prompt_tokens(prompts, context, names).to(self.device)
        self.text = text_features(model, self.tokens, exact=cfg.released)  # (K_fg + B, D)
        self.num_fg = len(class_names) - 1
        # One vmapped backward for all labels saves kernel launches on accelerators; on CPUs a backward per
        # label of the same single forward measured faster (1.19 s against 1.49 s for ViT-B/16, 768 tokens,
        # 2 labels, 1 thread). The released code runs the forward again for every label.
        self.batched_backward = not cfg.released and self.device.type != "cpu"

    def check_labels(self, labels: Sequence[int], where: str) -> list[int]:
        """Image labels as a list of distinct foreground indices; an empty or out-of-range list is an error."""
        labels = list(dict.fromkeys(int(c) for c in labels))
        if not labels:
            raise WeakclipError(f"{where}: the image has no image-level label (CLIP-ES needs at least one class)")
        bad = [c for c in labels if not 1 <= c <= self.num_fg]
        if bad:
            raise WeakclipError(f"{where}: label {bad[0]} is outside the class list 1..{self.num_fg}")
        return labels

    def cams(self, image: np.ndarray, labels: Sequence[int], trace: dict | None = None) -> np.ndarray:
        """CAMs (K, H, W) float16 in label order for image (H, W, 3) uint8 RGB and K foreground labels.

        ``trace``, when given, receives every intermediate (for the parity check against the released code).
        """
        cfg = self.cfg
        h0, w0 = image.shape[:2]
        labels = self.check_labels(labels, "labels")
        k = len(labels)
        weight = self.model.visual.conv1.weight.dtype
        pixels = preprocess(image, self.patch, _work_dtype(weight)).to(self.device, weight)
        gh, gw = pixels.shape[2] // self.patch, pixels.shape[3] // self.patch
        idx = torch.tensor([c - 1 for c in labels] + list(range(self.num_fg, self.text.shape[0])),
                           device=self.device)
        tokens, attns = encode_until_last(self.model.visual, pixels, self.attn_from, cfg.released,
                                          exact=cfg.released)
        last = last_block_gradcam(self.model, tokens, self.text[idx], k, batched=self.batched_backward)
        raw = gradcam(_numpy(last.activation), _numpy(last.grads), gh, gw)
        aff, trans = transition_matrix([*attns, last.attention], cfg.sinkhorn_iters)
        trans = trans.cpu()
        boxes = [cam_boxes(c, cfg.box_threshold, cfg.released) for c in raw]
        masks = torch.stack([box_mask(b, gh, gw, trans.dtype) for b in boxes])
        refined = torch.stack([(trans * masks[i]) @ torch.from_numpy(raw[i]).reshape(-1, 1)
                               for i in range(k)]).reshape(k, gh, gw).numpy()
        highres = resize(_minmax(refined), h0, w0)
        if trace is not None:
            trace.update(
                input=pixels, tokens_before_last_block=tokens[0], attn_layers=[*attns, last.attention],
                probs=last.probs, image_embed=last.image_embed, activation=last.activation,
                grads=last.grads, cam_raw=raw, boxes=boxes, affinity=aff, trans_mat=trans, aff_mask=masks,
                cam_refined=refined, cam_refined_highres=highres, cam_raw_highres=resize(raw, h0, w0),
                pos_embed=positional_embedding(self.model.visual, gh, gw, cfg.released))
        return highres.astype(np.float16)


def background_scores(cams: np.ndarray, power: float) -> np.ndarray:
    """(K, H, W) float16 CAMs -> (1 + K, H, W) float16: (1 - max_k cam)^power stacked before the CAMs."""
    bg = np.power(1 - np.max(cams, axis=0, keepdims=True), power).astype(cams.dtype)
    return np.concatenate([bg, cams], axis=0)


def seed_without_crf(cams: np.ndarray, labels: Sequence[int], power: float) -> np.ndarray:
    """(H, W) uint8 class indices: argmax over background + CAMs (ties go to background, then label order)."""
    keys = np.asarray([0, *labels], dtype=np.uint8)
    return keys[np.argmax(background_scores(cams, power), axis=0)]


def crf_image(image: np.ndarray, released: bool) -> np.ndarray:
    """The colour image the CRF compares, (H, W, 3) uint8.

    Released: BGR minus ``CRF_MEAN_BGR`` cast to uint8 with wrap-around (its bug: colours just below and
    just above a channel mean look 255 apart), written out explicitly so no platform cast decides it.
    Otherwise the RGB image itself.
    """
    if not released:
        return np.ascontiguousarray(image)
    shifted = image[..., ::-1].astype(np.float32) - np.asarray(CRF_MEAN_BGR, dtype=np.float32)
    return np.ascontiguousarray((np.trunc(shifted).astype(np.int64) % 256).astype(np.uint8))


def crf_seed(cams: np.ndarray, image: np.ndarray, labels: Sequence[int], cfg: SeedsConfig,
             ignore_index: int = 255, trace: dict | None = None) -> np.ndarray:
    """(H, W) uint8 seed: dense CRF over background + the image's labels on float16 scores
    [(1 - max cam), cams] (not renormalised, as released), ``ignore_index`` where the CRF's confidence is
    below ``cfg.confidence``."""
    probs = background_scores(cams, 1)
    rgb = crf_image(image, cfg.released)
    q = dense_crf_pydensecrf(probs, rgb, cfg.crf_params)
    keys = np.asarray([0, *labels], dtype=np.uint8)
    label = keys[np.argmax(q, axis=0)]
    if trace is not None:
        trace.update(crf_image=rgb, crf_prob_in=probs, crf_q=q, pseudo_label_crf=label.copy())
    label[np.max(q, axis=0) < cfg.confidence] = ignore_index
    return label


def seed_from_cams(cams: np.ndarray, image: np.ndarray | None, labels: Sequence[int], cfg: SeedsConfig,
                   ignore_index: int = 255) -> np.ndarray:
    """(H, W) uint8 seed from CAMs (K, H, W) in ``labels`` order: the CRF seed with ``cfg.crf`` (which needs
    the (H, W, 3) uint8 RGB image), else the argmax seed (which does not)."""
    if cfg.crf:
        return crf_seed(cams, image, labels, cfg, ignore_index)
    return seed_without_crf(cams, labels, cfg.bg_power)


def make_seed(method: ClipES, image: np.ndarray, labels: Sequence[int], ignore_index: int = 255
              ) -> tuple[np.ndarray, np.ndarray]:
    """(seed (H, W) uint8, CAMs (K, H, W) float16) for one image, as ``weakclip seeds`` writes them."""
    cams = method.cams(image, labels)
    labels = method.check_labels(labels, "labels")
    return seed_from_cams(cams, image, labels, method.cfg, ignore_index), cams
