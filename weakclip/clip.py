"""Frozen CLIP on open_clip: loading its weights in every real format, and a text wrapper that inserts
learnable context vectors before each tokenised class name (the image towers are in ``weakclip.backbones``).

The text wrapper calls the open_clip model's own blocks, norms and projections and keeps them frozen:
``requires_grad=False`` and always in eval mode.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import zipfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import build_model_from_openai_state_dict
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from .config import ClipConfig
from .errors import WeakclipError
from .safepickle import torchscript_tensors

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_CLIP_SEED = 0
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


# ----------------------------------------------------------------------------------------------- loading


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released .pt files are TorchScript archives (a zip holding ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise WeakclipError(f"{path}: cannot read CLIP weights ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise WeakclipError(f"{path}: not a state dict of CLIP weights")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def check_shapes(expected: dict[str, Tensor], found: dict[str, Tensor], source: str, what: str) -> None:
    """Raise one clear line for the first key whose shape differs between a model and a file."""
    for key, tensor in found.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise WeakclipError(
                f"{source}: '{key}' has shape {tuple(tensor.shape)} in the file but {what} expects "
                f"{tuple(expected[key].shape)}"
            )


def require_batch_first(transformer: nn.Module, tower: str) -> None:
    """The wrappers feed (B, L, C) tokens; open_clip before 2.26.1 runs its transformers sequence-first,
    where the same call would silently attend across the batch."""
    if not getattr(transformer, "batch_first", False):
        version = importlib.metadata.version("open_clip_torch")
        raise WeakclipError(f"open_clip_torch {version}: the CLIP {tower} transformer runs sequence-first; weakclip "
                            "needs batch-first transformers (pip install 'open_clip_torch>=2.26.1,<4')")


def _create(cfg: ClipConfig, device: str = "cpu") -> nn.Module:
    if cfg.arch is not None:
        try:
            return open_clip.CLIP(**cfg.arch)
        except TypeError as exc:
            raise WeakclipError(f"model.clip.arch: not a valid open_clip.CLIP architecture ({exc})") from None
    if cfg.model not in open_clip.list_models():
        raise WeakclipError(f"model.clip.model: unknown open_clip model '{cfg.model}' (see open_clip.list_models())")
    return open_clip.create_model(cfg.model, pretrained=None, device=device)


def weights_file(pretrained: str) -> Path | None:
    """``model.clip.pretrained`` as a local weights file, or None when it names an open_clip tag."""
    if os.path.exists(pretrained) or pretrained.endswith(_WEIGHT_SUFFIXES) or os.sep in pretrained:
        return Path(pretrained)
    return None


def refuse_in_checkpoint(cfg: ClipConfig) -> None:
    """One line, never a silently random CLIP, for ``cfg.in_checkpoint`` where no checkpoint is loaded: those
    weights exist only inside a refiner checkpoint. Commands call it before they write anything."""
    if cfg.in_checkpoint:
        raise WeakclipError("model.clip.in_checkpoint: true, but no checkpoint is loaded here: those CLIP weights "
                            "exist only inside the refiner checkpoint the config was saved with; set "
                            "model.clip.in_checkpoint=false and model.clip.pretrained to a CLIP weights file")


def load_clip(cfg: ClipConfig, from_checkpoint: bool = False) -> nn.Module:
    """Build the open_clip model named by ``cfg`` and load its weights; returns an fp32 model in eval mode.

    ``cfg.pretrained`` may be null (random init, always the same: seed ``RANDOM_CLIP_SEED``), a local file
    (an OpenAI TorchScript archive, read for its tensors without running its code, or an open_clip / OpenAI
    state dict as .pt/.pth/.bin/.safetensors), or an open_clip pretrained tag, which open_clip downloads on a
    machine with network access. ``cfg.in_checkpoint`` (CLIP weights that only a refiner checkpoint holds)
    builds the random model the checkpoint's weights then replace, and only for a checkpoint being loaded
    (``from_checkpoint``): elsewhere it is refused in one line, never a silently random CLIP.
    """
    pretrained = cfg.pretrained
    if not from_checkpoint:
        refuse_in_checkpoint(cfg)
    if pretrained is None or cfg.in_checkpoint:
        # Random weights from a fixed seed: checkpoints hold no CLIP weights, so reloading one must rebuild
        # the very same random CLIP it was trained on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_CLIP_SEED)
            model = _create(cfg)
    elif (path := weights_file(pretrained)) is not None:
        if not path.is_file():
            raise WeakclipError(f"{path}: CLIP weights file not found")
        if _is_torchscript_archive(path):
            sd = torchscript_tensors(path)  # its tensors only: the archive's code never runs
            # Scalars OpenAI's archives carry, and the causal mask a scripted open_clip model keeps.
            for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                sd.pop(key, None)
            # open_clip infers the architecture but rounds weights to fp16; reload them at full precision.
            model = build_model_from_openai_state_dict(dict(sd), cast_dtype=None).float()
            model.load_state_dict({k: v.float() for k, v in sd.items()})
        else:
            sd = _read_state_dict(path)
            model = _create(cfg)
            expected = model.state_dict()
            check_shapes(expected, sd, str(path), f"CLIP model '{cfg.model}'")
            missing = sorted(set(expected) - set(sd))
            if missing:
                raise WeakclipError(
                    f"{path}: {len(missing)} weights of '{cfg.model}' are missing from the file (first: '{missing[0]}')"
                )
            model.load_state_dict({k: v for k, v in sd.items() if k in expected})
    else:
        tags = open_clip.list_pretrained_tags_by_model(cfg.model)
        if pretrained not in tags:
            raise WeakclipError(
                f"model.clip.pretrained: '{pretrained}' is neither a file nor a pretrained tag of "
                f"{cfg.model} (tags: {', '.join(tags) or 'none'})"
            )
        try:
            model = open_clip.create_model(cfg.model, pretrained=pretrained)
        except Exception as exc:  # noqa: BLE001 - hub and URL downloads fail in many ways offline
            raise WeakclipError(
                f"cannot fetch CLIP weights '{cfg.model}/{pretrained}' ({type(exc).__name__}); without network "
                f"access, download them elsewhere and pass a local file: --set model.clip.pretrained=/path/to/"
                f"ViT-B-16.pt (OpenAI archive) or open_clip_pytorch_model.bin / .safetensors"
            ) from None
    return _frozen(model.float())


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cast_frozen_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``module``'s frozen weights (floating parameters that do not require grad) and floating buffers to
    ``dtype``, in place, once; trainable parameters are left as they are. Returns ``module``.

    Autocast caches its casts only for weights that require grad: a frozen tower run under autocast is cast
    (and re-laid out for the half-precision kernels) at every call, slower than fp32 on CPUs. Held in the
    compute dtype, it runs outside autocast with no cast at all. Casting back to float32 does not restore
    the bits a half type dropped.
    """
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)
    return module


def clip_architecture(cfg: ClipConfig) -> nn.Module:
    """The frozen open_clip model of ``cfg`` with every tensor on the meta device: the architecture only
    (shapes, parameter counts) in a moment, no weights read, fetched or even initialised."""
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly" is not true here: nothing is
    try:
        with torch.device("meta"):
            return _frozen(_create(cfg, device="meta"))
    finally:
        logging.disable(logging.NOTSET)


# -------------------------------------------------------------------------------------------------- text


class PromptTextEncoder(nn.Module):
    """Frozen CLIP text tower fed with [SOT] + N learnable context vectors + the class-name tokens.

    With ``learnable`` false it encodes ``template.format(name)`` instead (the paper's fixed-prompt
    ablation). Features are pooled at the end-of-text token and projected: (K, D).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        class_names: list[str],
        n_ctx: int = 8,
        name_length: int = 5,
        learnable: bool = True,
        template: str = "a photo of a {}.",
        ctx_init_std: float = 1.0,
    ):
        super().__init__()
        src = clip_model.text if hasattr(clip_model, "text") else clip_model
        self.token_embedding = src.token_embedding
        self.transformer = src.transformer
        require_batch_first(self.transformer, "text")
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("positional_embedding", src.positional_embedding.detach(), persistent=False)
        for module in (self.token_embedding, self.transformer, self.ln_final):
            module.requires_grad_(False)
        if isinstance(self.text_projection, nn.Parameter) or self.text_projection is not None:
            self.text_projection.requires_grad_(False)

        tokenizer = open_clip.tokenizer.SimpleTokenizer()
        n_ctx = n_ctx if learnable else 0
        texts = class_names if learnable else [template.format(name) for name in class_names]
        encoded = [tokenizer.encode(t) for t in texts]
        if learnable:
            for name, ids in zip(class_names, encoded):
                if len(ids) > name_length - 2:
                    raise WeakclipError(
                        f"class name '{name}' is {len(ids)} BPE tokens but the text context holds "
                        f"{name_length - 2} (raise model.name_length or shorten the name)"
                    )
            length = name_length
        else:
            length = max(len(ids) for ids in encoded) + 2
        max_len = self.positional_embedding.shape[0]
        if n_ctx + length > max_len:
            raise WeakclipError(
                f"{n_ctx} context vectors + {length} name tokens exceed CLIP's text context of {max_len}"
            )
        tokens = torch.zeros(len(texts), length, dtype=torch.long)
        for k, ids in enumerate(encoded):
            seq = [tokenizer.sot_token_id, *ids, tokenizer.eot_token_id]
            tokens[k, : len(seq)] = torch.tensor(seq)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot_index", torch.tensor([len(ids) + 1 + n_ctx for ids in encoded]), persistent=False)
        self.n_ctx = n_ctx
        width = self.token_embedding.weight.shape[1]
        if n_ctx:
            ctx = torch.empty(n_ctx, width)
            nn.init.trunc_normal_(ctx, std=ctx_init_std, a=-2 * ctx_init_std, b=2 * ctx_init_std)
            self.ctx = nn.Parameter(ctx)
        else:
            self.ctx = None
        total = n_ctx + length
        mask = torch.full((total, total), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        # The shared-prefix pass needs open_clip's standard batch-first self-attention blocks.
        blocks = getattr(self.transformer, "resblocks", None)
        self.share_prefix = (
            bool(n_ctx) and blocks is not None
            and all(isinstance(b, ResidualAttentionBlock) and not hasattr(b, "ln_1_kv")
                    and isinstance(b.attn, nn.MultiheadAttention) and b.attn.batch_first for b in blocks)
        )

    def train(self, mode: bool = True) -> PromptTextEncoder:
        return super().train(False)

    def _shared_prefix_transformer(self, prefix: Tensor, names: Tensor) -> Tensor:
        """The causal text transformer over [SOT, ctx] + each class's name tokens, with the prefix run once.

        Under the causal mask the SOT and context positions see only each other, so their states are the
        same for every class: they are computed for one sequence, and each class's name tokens attend to
        that shared prefix. Same result as the full (K, P + S) pass with about half the work.
        prefix (1, P, width), names (K, S, width) -> names' final states (K, S, width).
        """
        k = names.shape[0]
        p = prefix.shape[1]
        mask_p, mask_s = self.attn_mask[:p, :p], self.attn_mask[p:, :]
        for block in self.transformer.resblocks:
            hp, hs = block.ln_1(prefix), block.ln_1(names)
            kv = torch.cat([hp.expand(k, -1, -1), hs], dim=1)
            prefix = prefix + block.ls_1(block.attention(q_x=hp, attn_mask=mask_p))
            names = names + block.ls_1(block.attention(q_x=hs, k_x=kv, v_x=kv, attn_mask=mask_s))
            prefix = prefix + block.ls_2(block.mlp(block.ln_2(prefix)))
            names = names + block.ls_2(block.mlp(block.ln_2(names)))
        return names

    def forward(self) -> Tensor:
        """Returns the projected class embeddings (K, D). Gradients reach ``ctx`` through the frozen tower."""
        x = self.token_embedding(self.tokens)  # (K, L, width)
        if self.ctx is not None:
            ctx = self.ctx.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1:]], dim=1)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        eot = self.eot_index
        if self.share_prefix:
            prefix = 1 + self.n_ctx
            x = self._shared_prefix_transformer(x[:1, :prefix], x[:, prefix:])
            eot = eot - prefix
        else:
            x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def resize_positions(table: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """A position table (1 + gh * gw, C) for a ``grid`` of gh x gw, its first row a class or pooled token's ->
    (1 + h * w, C) for ``size`` h x w: the grid rows resized bilinearly (align_corners false), the first kept."""
    if tuple(size) == tuple(grid):
        return table
    body = table[1:].reshape(1, *grid, -1).permute(0, 3, 1, 2)
    body = F.interpolate(body, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.cat([table[:1], body.flatten(2)[0].transpose(0, 1)])


# The released ViT is built for 512 x 512 inputs: at load it resizes CLIP's position grid once to 512 / p
# and stores that table; every forward resizes it again to the input's grid (official-code-notes). The
# released ResNet does the same to input_resolution / 32; no released ResNet config gives input_resolution,
# so 512 as for the ViT (and as DenseCLIP's ResNet configs, which it follows).
RELEASED_INPUT_SIZE = 512


def resize_positions_as_released(visual: nn.Module, size: int = RELEASED_INPUT_SIZE) -> None:
    """Replace a tower's position table by its resize to the grid of a ``size`` x ``size`` input, in place, as
    the released code does when it loads CLIP weights: a ViT's (1 + gh * gw, C) table to (size / p)^2 cells,
    a ResNet attention pool's (1 + g * g, C) table to (size / 32)^2 cells (its old grid read from the table)."""
    pool = getattr(visual, "attnpool", None)
    if pool is not None and hasattr(pool, "positional_embedding"):
        owner, name = pool, "positional_embedding"
        old = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
        grid, side = (old, old), size // 32
    elif getattr(visual, "grid_size", None) is not None and hasattr(visual, "positional_embedding"):
        owner, name = visual, "positional_embedding"
        grid, side = tuple(visual.grid_size), size // int(visual.conv1.kernel_size[0])
    else:
        return
    if grid == (side, side):
        return
    current = getattr(owner, name)
    table = resize_positions(current.detach(), grid, (side, side))
    setattr(owner, name, nn.Parameter(table, requires_grad=current.requires_grad))
    if owner is visual:
        visual.grid_size = (side, side)


def input_stats(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (RGB, 0..1 scale) for ``normalize`` = "clip" or "imagenet".

    Multiplied by 255 in float64 they give the 0..255 constants exactly as written in the released
    configs (123.675, 116.28, 103.53 / 58.395, 57.12, 57.375) once rounded to float32.
    """
    if normalize == "clip":
        return CLIP_MEAN, CLIP_STD
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise WeakclipError(f"model.clip.normalize: expected 'clip' or 'imagenet', got '{normalize}'")
